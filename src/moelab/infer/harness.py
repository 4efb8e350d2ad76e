"""lm-evaluation-harness on a moelab model: an in-process model class, and running tasks on a run.

`MoelabLM` is the harness's `TemplateLM` over a loaded `Transformer`: the harness splits each
request into context and continuation tokens (moving a context's trailing spaces into the
continuation, an empty context conditioned on the end-of-text token, as its Hugging Face model
does), and this class scores them with one batched forward per group of requests. With the same
tokenizer file the token ids equal those `lm_eval --model hf` sees on the run's export, so the
two give the same log-likelihoods (a test checks it per example).

The harness's other route is the OpenAI-compatible server (`--model local-completions` with
`echo` and `logprobs`); `run_tasks` takes either.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from lm_eval import simple_evaluate, utils
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager

from moelab.data.tokenizer import TextTokenizer
from moelab.errors import MoelabError
from moelab.files import write_atomic
from moelab.infer.generate import generate
from moelab.infer.sampling import SamplingParams
from moelab.model import Transformer


class MoelabLM(TemplateLM):
    """A moelab model for the harness: log-likelihoods (multiple choice, perplexity) and
    generation (greedy unless the task asks for sampling)."""

    def __init__(self, model: Transformer, tokenizer: TextTokenizer, batch_size: int = 8):
        super().__init__()
        if batch_size < 1:
            raise MoelabError(f"batch size {batch_size} is not allowed: an integer >= 1")
        self.model = model.eval()
        self.text_tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = model.cfg.max_seq_len
        self.model_device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.text_tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # moelab tokenizers add no special tokens: a document starts after the end-of-text token,
        # which the harness prepends itself where a context is empty (prefix_token_id).
        return self.text_tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.text_tokenizer.decode(tokens)

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation)
        for each (context ids, continuation ids), in batches of sequences of similar length."""
        too_long = next((len(cont) for _, cont in pairs if len(cont) > self.max_length), None)
        if too_long is not None:
            raise MoelabError(
                f"a continuation of {too_long} tokens is longer than the model's context ({self.max_length} tokens): "
                "it cannot be scored whole; leave this task out or use a model with a longer context"
            )
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        # NOTE: the input keeps the last max_length tokens of context + continuation, as the
        # harness's Hugging Face model does; the continuation itself is never cut.
        inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(inputs[batch[0]])
            ids_BT = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            for row, i in enumerate(batch):
                ids_BT[row, : len(inputs[i])] = torch.tensor(inputs[i])
            logits_BTV = self.model(ids_BT.to(self.model_device)).logits.float()
            logprobs_BTV = torch.log_softmax(logits_BTV, dim=-1).cpu()
            for row, i in enumerate(batch):
                cont = pairs[i][1]
                end = len(inputs[i])
                span_CV = logprobs_BTV[row, end - len(cont) : end]
                target_C = torch.tensor(cont)
                logprob = float(span_CV.gather(1, target_C[:, None]).sum())
                greedy = bool((span_CV.argmax(-1) == target_C).all())
                results[i] = (logprob, greedy)
        return results  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self._score([(list(ctx), list(cont)) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood, in disjoint windows of the context length (the
        harness's rolling-window rule, as its Hugging Face model applies it)."""
        totals = []
        for (text,) in (r.args for r in requests):
            windows = [
                utils.make_disjoint_window(w)
                for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            totals.append(sum(logprob for logprob, _ in self._score(windows)))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", 256)))
            temperature = float(kwargs.pop("temperature", 0.0))
            if not kwargs.pop("do_sample", False):
                temperature = 0.0
            ids = self.tok_encode(context)[-(self.max_length - 1) :]
            room = self.max_length - len(ids)
            text = generate(
                self.model,
                self.text_tokenizer,
                self.tok_decode(ids),
                max_new_tokens=max(1, min(max_new, room)),
                params=SamplingParams(temperature=temperature),
                seed=0,
            )
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            outputs.append(text)
        return outputs


class _TaskFileLoader(yaml.SafeLoader):
    """YAML as the harness reads task files, with its `!function` tags accepted unresolved."""


_TaskFileLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def check_task_files(paths: Sequence[str | Path]) -> list[Path]:
    """Every task YAML under `paths` (files or folders), each checked to parse into a table.

    The harness skips a file it cannot parse with a log line, and the task then looks unknown;
    here the file and its error are named instead."""
    files: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            found = sorted(path.rglob("*.yaml")) + sorted(path.rglob("*.yml"))
            if not found:
                raise MoelabError(f"--include {path}: no task files (*.yaml) in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise MoelabError(f"--include {path}: no such file or folder (give a task YAML file or a folder of them)")
    for file in files:
        try:
            loaded = yaml.load(file.read_text(), Loader=_TaskFileLoader)  # noqa: S506 - a SafeLoader subclass
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise MoelabError(f"task file {file} does not parse{at}: {problem}") from None
        if not isinstance(loaded, dict):
            raise MoelabError(f"task file {file} holds {type(loaded).__name__}, expected a table of task settings")
    return files


@dataclass(frozen=True)
class HarnessResult:
    results: dict[str, Any]  # per task: the harness's metrics (e.g. acc, acc_stderr)
    samples: dict[str, list[dict]]  # per task: every example's arguments and model responses
    path: Path  # where the JSON was written


def run_tasks(
    lm: MoelabLM | None,
    tasks: Sequence[str],
    out_dir: Path,
    include: Sequence[str | Path] = (),
    limit: int | None = None,
    num_fewshot: int | None = None,
    server_url: str | None = None,
    batch_size: int = 8,
    seed: int = 1234,
) -> HarnessResult:
    """Run harness tasks on the in-process `lm`, or through a moelab server at `server_url`
    (its /v1/completions), and write the results as JSON under `out_dir`.

    A task is a name the harness knows, a name defined in the `include` files or folders, or the
    path of a task YAML file (its folder is then included)."""
    if server_url:
        model: Any = "local-completions"
        base = server_url.rstrip("/")
        served_name, context = _served_model(base)
        model_args: Any = {
            "base_url": base + "/v1/completions",
            "model": served_name,
            # the server's own tokenizer (/tokenize, /tokenizer_info), so no tokenizer files here
            "tokenizer_backend": "remote",
            "max_length": context,
            "num_concurrent": 1,
            "max_retries": 1,
        }
    else:
        model, model_args = lm, None
    check_task_files(include)
    include = list(include)
    names = []
    for task in tasks:
        if task.endswith((".yaml", ".yml")):
            path = Path(task).expanduser()
            if not path.is_file():
                raise MoelabError(f"task file {path} does not exist")
            (config,) = [yaml.load(f.read_text(), Loader=_TaskFileLoader) for f in check_task_files([path])]  # noqa: S506
            if "task" not in config:
                raise MoelabError(f"task file {path} has no 'task' name")
            include.append(path.parent)
            names.append(str(config["task"]))
        else:
            names.append(task)
    manager = TaskManager(include_path=[str(p) for p in include] or None)
    known = set(manager.all_tasks)
    unknown = [t for t in names if t not in known]
    if unknown:
        places = ", ".join(str(p) for p in include) or "the harness's own tasks"
        raise MoelabError(
            f"unknown task(s) {', '.join(unknown)}: not found in {places}; give a task name, a task YAML file, "
            "or --include a folder of task files"
        )
    started = time.time()
    try:
        output = _evaluate(model, model_args, names, num_fewshot, limit, batch_size, manager, seed)
    except (OSError, ConnectionError) as exc:
        # NOTE: a hub task without network, or a server that does not answer: the harness's own
        # message, on one line, instead of a traceback.
        raise MoelabError(f"the harness stopped: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from None
    if output is None:  # the harness returns None on ranks other than 0
        raise MoelabError("the harness returned no results")
    record = {
        "tasks": names,
        "model": "server " + server_url if server_url else "in-process",
        "limit": limit,
        "num_fewshot": num_fewshot,
        "seconds": round(time.time() - started, 2),
        "results": output["results"],
        "configs": output.get("configs", {}),
        "versions": output.get("versions", {}),
        "n_samples": output.get("n-samples", {}),
        "samples": output.get("samples", {}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"lm_eval-{time.strftime('%Y%m%dT%H%M%S')}.json"
    write_atomic(path, json.dumps(record, indent=1, default=utils.handle_non_serializable))
    return HarnessResult(output["results"], output.get("samples", {}), path)


def _served_model(base_url: str) -> tuple[str, int]:
    """The served model's name (/v1/models) and context length (/tokenizer_info, as vLLM has it)."""
    import urllib.request

    def get(path: str):
        with urllib.request.urlopen(base_url + path, timeout=10) as response:
            return json.loads(response.read())

    try:
        return str(get("/v1/models")["data"][0]["id"]), int(get("/tokenizer_info")["model_max_length"])
    except (OSError, KeyError, IndexError, TypeError, ValueError) as exc:  # URLError is an OSError
        raise MoelabError(
            f"--server {base_url}: not a running moelab server ({type(exc).__name__}: {exc}); "
            "give the address of `moelab serve`, e.g. http://127.0.0.1:8000"
        ) from None


def _evaluate(model, model_args, names, num_fewshot, limit, batch_size, manager, seed):
    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=names,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        task_manager=manager,
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=1000,
    )
