"""lm-evaluation-harness on moelab models: the in-process model class against a full forward and
against the harness's own Hugging Face model on the run's export, and `moelab eval --tasks`."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("lm_eval")

from moelab.cli import main  # noqa: E402
from moelab.infer.harness import MoelabLM, check_task_files, run_tasks  # noqa: E402

TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def make_task(folder, name="moelab_tiny_mc", examples=5, seed=None, max_chars=None):
    """A local multiple-choice task over fresh random Python-like snippets (no download); with
    max_chars, every question + choice fits in that many characters (no truncation)."""
    rng = random.Random(seed)
    words = ["def", "return", "self", "import", "class", "for", "in", "range", "print", "None", "x", "y", "(", ")"]
    rows = []
    while len(rows) < examples:
        question = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
        if rng.random() < 0.3:
            question += " "  # a trailing space: the harness moves it into every continuation
        choices = [" " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(3)]
        if max_chars and max(len(question) + 1 + len(c) for c in choices) > max_chars:
            continue
        rows.append({"question": question, "choices": choices, "answer": rng.randrange(3)})
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(TASK.format(name=name, data=data))
    return rows


def per_example(samples):
    """[[log-likelihood of each choice] for each example], in document order."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return [[resp[0] for resp in s["filtered_resps"]] for s in ordered]


def hf_per_example(folder, task: str):
    """The harness's own Hugging Face model on the export in folder/hf, on the task defined in folder."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    output = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(folder / "hf"), "dtype": "float32", "device": "cpu"},
        tasks=[task],
        task_manager=TaskManager(include_path=[str(folder)]),
        log_samples=True,
    )
    return per_example(output["samples"][task])


def forward_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """The reference: split as the harness does, then one full forward and log_softmax in float64."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    ids = whole[-(model.cfg.max_seq_len + 1) :]
    n_cont = len(whole) - n_context
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)[-n_cont:]
    return float(logprobs.gather(1, torch.tensor(ids[-n_cont:])[:, None]).sum())


def test_in_process_loglikelihoods_equal_a_full_forward(tiny, tmp_path):
    rows = make_task(tmp_path, examples=6)
    lm = MoelabLM(tiny.model, tiny.tokenizer, batch_size=4)
    result = run_tasks(lm, ["moelab_tiny_mc"], tmp_path / "out", include=[tmp_path])
    got = per_example(result.samples["moelab_tiny_mc"])
    # the harness's context is the question and the task's target delimiter, " "
    want = [
        [forward_loglikelihood(tiny.model, tiny.tokenizer, r["question"] + " ", c) for c in r["choices"]] for r in rows
    ]
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), atol=1e-4)
    accuracy = sum(max(range(3), key=lambda i: g[i]) == r["answer"] for g, r in zip(got, rows)) / len(rows)
    assert result.results["moelab_tiny_mc"]["acc,none"] == pytest.approx(accuracy)
    written = json.loads(result.path.read_text())
    assert per_example(written["samples"]["moelab_tiny_mc"]) == got


def test_rolling_loglikelihood_covers_every_token_once(tiny):
    """Perplexity requests: a text longer than the context is scored in disjoint windows; the sum
    equals scoring each token once given the window's preceding tokens."""
    from lm_eval.api.instance import Instance

    lm = MoelabLM(tiny.model, tiny.tokenizer, batch_size=3)
    L = tiny.model.cfg.max_seq_len
    text = "".join(random.choice("abcdefgh \n") for _ in range(int(L * 2.5)))
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [tiny.tokenizer.eos_id] + tiny.tokenizer.encode(text)
    want, start = 0.0, 0
    with torch.no_grad():
        while start < len(ids) - 1:  # predict ids[start+1 : start+1+L] from the L tokens before each
            end = min(start + L, len(ids) - 1)
            first = max(0, end - L)
            logits = tiny.model(torch.tensor([ids[first:end]])).logits[0].double()
            logprobs = torch.log_softmax(logits, -1)
            for t in range(start, end):
                want += float(logprobs[t - first, ids[t + 1]])
            start = end
    assert got == pytest.approx(want, abs=1e-3)


@pytest.mark.slow
def test_in_process_matches_the_harness_hf_model_on_the_export(tiny, tiny_run, tmp_path):
    """`moelab eval --tasks` and `lm_eval --model hf` on the run's Hugging Face export score the
    same examples equally (1e-4): same tokens, same model."""
    pytest.importorskip("accelerate")
    from moelab.interop.export import export_hf

    export_hf(tiny_run, tmp_path / "hf")
    make_task(tmp_path, examples=5)
    ours = run_tasks(MoelabLM(tiny.model, tiny.tokenizer), ["moelab_tiny_mc"], tmp_path / "out", include=[tmp_path])
    a = torch.tensor(per_example(ours.samples["moelab_tiny_mc"]))
    b = torch.tensor(hf_per_example(tmp_path, "moelab_tiny_mc"))
    assert a.shape == b.shape == (5, 3)
    assert (a - b).abs().max() < 1e-4


@pytest.mark.slow
def test_through_the_server_matches_the_harness_hf_model_on_the_export(tiny, tiny_run, tiny_servable, tmp_path):
    """The harness's own OpenAI-completions client (`local-completions`: echo + logprobs, the
    server's /tokenize) against `moelab serve` scores every example as `lm_eval --model hf` does on
    the run's export (1e-4)."""
    pytest.importorskip("accelerate")
    pytest.importorskip("tenacity")
    import httpx

    from moelab.infer.http_transport import BackgroundServer
    from moelab.infer.server import ServerSettings, create_app
    from moelab.interop.export import export_hf
    from tests.infer.helpers import wait_for

    export_hf(tiny_run, tmp_path / "hf")
    # NOTE: within the context window; beyond it the harness's API client keeps one token less of
    # context than its Hugging Face model (and MoelabLM) do.
    make_task(tmp_path, name="moelab_served_mc", examples=5, max_chars=tiny.model.cfg.max_seq_len - 4)
    server = BackgroundServer(create_app(lambda: tiny_servable, ServerSettings(model_name="tiny"))).start()
    try:
        wait_for(lambda: httpx.get(server.url + "/health").status_code == 200, what="the model to load")
        served = run_tasks(None, ["moelab_served_mc"], tmp_path / "a", include=[tmp_path], server_url=server.url)
    finally:
        server.stop()
    a = torch.tensor(per_example(served.samples["moelab_served_mc"]))
    b = torch.tensor(hf_per_example(tmp_path, "moelab_served_mc"))
    assert a.shape == b.shape == (5, 3)
    assert (a - b).abs().max() < 1e-4
    assert json.loads(served.path.read_text())["model"] == f"server {server.url}"


def test_eval_tasks_cli_writes_results_into_the_run(tiny_run, tmp_path, capsys):
    make_task(tmp_path, name="moelab_cli_mc", examples=4)
    code = main(["eval", str(tiny_run), "--tasks", str(tmp_path / "moelab_cli_mc.yaml"), "--limit", "3", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads(open(printed["path"]).read())
    assert printed["path"].startswith(str(tiny_run / "eval"))
    assert written["n_samples"]["moelab_cli_mc"]["effective"] == 3
    assert len(written["samples"]["moelab_cli_mc"]) == 3


def test_bad_task_input_is_one_line_and_exit_2(tiny_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "t.yaml").write_text("task: x\n  dataset_path: [json\n")
    err_lines = []

    def run(*argv):
        assert main(["eval", str(tiny_run), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        err_lines.append(err[-1])
        return err[-1]

    assert "does not parse (line 2)" in run("--tasks", "x", "--include", str(broken))
    make_task(tmp_path, name="moelab_ok_mc", examples=2)
    assert "unknown task(s) nosuch" in run("--tasks", "nosuch", "--include", str(tmp_path / "moelab_ok_mc.yaml"))
    assert "no such file or folder" in run("--tasks", "x", "--include", str(tmp_path / "missing"))
    assert "--limit 0 is not allowed" in run("--tasks", "x", "--limit", "0")
    assert "does not exist" in run("--tasks", str(tmp_path / "absent.yaml"))
    assert all(line.startswith("moelab: error: ") for line in err_lines)
    assert not (tiny_run / "eval" / "x").exists()


def test_task_files_check_accepts_function_tags(tmp_path):
    (tmp_path / "t.yaml").write_text("task: t\nprocess_docs: !function utils.process\n")
    assert check_task_files([tmp_path]) == [tmp_path / "t.yaml"]


def test_server_that_is_not_there_is_one_line(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--tasks", "x", "--server", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("moelab: error: --server http://127.0.0.1:9: not a running moelab server")
