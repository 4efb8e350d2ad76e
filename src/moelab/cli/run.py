"""`moelab train`, `eval`, `generate` and `info`: the commands on one run or config."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from moelab.cli.common import (
    add_config_flags,
    add_run_flags,
    add_sampling_flags,
    config_overrides,
    default_out,
    log_err,
    resolve_config,
    sampling_params,
)
from moelab.errors import MoelabError


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model. With no arguments: the default small MoE on the embedded corpus (the Python
    standard library's source), about 11 minutes on a 2-core CPU, then the validation loss and a
    short sample. --resume continues the run in --out from its newest checkpoint (or from the
    checkpoint given), exactly where it stopped."""
    from moelab.infer.generate import training_sample
    from moelab.rundir import RunDir
    from moelab.train.trainer import Trainer, describe_result

    if args.resume is not None:
        if not args.out and args.resume is True:
            raise MoelabError("--resume needs the run: give --out RUN_DIR (or --resume CHECKPOINT_DIR)")
        resume = True if args.resume is True else Path(args.resume)
        out = Path(args.out) if args.out else Path(args.resume).parent.parent
        if args.config or args.preset:
            raise MoelabError(
                "--resume continues the run with its saved config; only --set train.* / monitor.* / parallel.* and --max-minutes may change"
            )
        run = RunDir(out)
        cfg = run.load_config()
        overrides = config_overrides(args)
        # NOTE (distributed): parallel.* may change, so that a run resumes at another world size.
        changeable = ("train.", "monitor.", "parallel.")
        checkpoints = run.checkpoints()
        if checkpoints and checkpoints[-1].name == "step_0000000":
            # An imported or upcycled run (or one stopped before its first step) has read no data
            # yet: it may be pointed at other data.
            changeable += ("data.",)
        bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith(changeable)]
        if bad:
            allowed = ", ".join(c + "*" for c in changeable)
            raise MoelabError(
                f"--set {bad[0]} cannot change a resumed run; only {allowed} settings (and --data before the first step) may change"
            )
        if overrides:
            from moelab.config import apply_overrides, build_config

            saved_scope = cfg.train.decay_scope
            cfg = build_config(apply_overrides(cfg.to_dict(), overrides))
            if cfg.train.decay_scope != saved_scope:
                # NOTE: the scope decides the optimizer's parameter groups, which the checkpoint's
                # optimizer state restores as they were saved
                raise MoelabError(
                    f"--set train.decay_scope={cfg.train.decay_scope} cannot change a resumed run: it started with "
                    f"{saved_scope!r}, and the optimizer state it resumes keeps that scope's parameter groups"
                )
    else:
        cfg = resolve_config(args)
        resume = False
        out = (
            Path(args.out)
            if args.out
            else default_out(args.preset or (Path(args.config).stem if args.config else "small-moe"))
        )
    trainer = Trainer(cfg, out, resume=resume, log=log_err, progress=not args.quiet, sampler=training_sample)
    result = trainer.fit()
    if trainer.is_main:  # (distributed) rank 0 reports for the whole run
        print(describe_result(result))
        if result.sample:
            print("sample: def " + result.sample)
    if not math.isfinite(result.val_loss):
        # NOTE: not a usage error (exit 2): the run diverged; its directory and checkpoints stay for diagnose
        log_err(
            f"moelab: error: the run ended with a non-finite validation loss ({result.val_loss}); "
            f"see `moelab diagnose {result.run_dir}`"
        )
        return 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Validation loss and perplexity of a run (its newest checkpoint) or of one checkpoint, on the
    run's own validation split (or on --data).

    With --tasks, lm-evaluation-harness tasks instead: on the model in this process, or through a
    running `moelab serve` (--server URL). Local task files (--include a YAML file or a folder) work
    offline; the results go to RUN/eval/lm_eval-<time>.json, every example's log-likelihoods included.
    """
    if args.tasks is not None:
        return _eval_tasks(args)
    import torch

    from moelab.data.loader import eval_batches
    from moelab.data.shards import prepare_data
    from moelab.device import resolve_device
    from moelab.rundir import load_model

    if args.batch_size < 1:
        raise MoelabError(f"--batch-size {args.batch_size} is not allowed: sequences per batch, an integer >= 1")
    if args.batches < 0:
        raise MoelabError(f"--batches {args.batches} is not allowed: an integer >= 0 (0 = the whole validation split)")
    device = resolve_device(args.device)
    loaded = load_model(args.run, device)
    data_cfg = loaded.cfg.data
    if args.data:
        data_cfg.source = args.data
    data = prepare_data(data_cfg, log=log_err)
    if data.tokenizer.to_json() != loaded.tokenizer.to_json() and not args.data:
        raise MoelabError("the run's data no longer tokenises with the run's tokenizer: the data changed")
    batches = eval_batches(data.val, args.batch_size, data_cfg.seq_len, args.batches or 10**9)
    model = loaded.model
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x.to(device)).logits
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), y.to(device).reshape(-1), reduction="sum"
                )
            )
            count += y.numel()
    loss = total / count
    result = {
        "run": str(loaded.run.path),
        "checkpoint": loaded.checkpoint.name,
        "step": loaded.step,
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50)),
        "tokens": count,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{loaded.run.path} {loaded.checkpoint.name}: validation loss {loss:.4f}, perplexity {result['val_ppl']:.2f} over {count:,} tokens"
        )
    return 0


def _eval_tasks(args: argparse.Namespace) -> int:
    from moelab.extras import require

    require("moelab eval --tasks", "eval")
    from moelab.device import resolve_device
    from moelab.infer.harness import MoelabLM, run_tasks
    from moelab.rundir import load_model, resolve_checkpoint

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise MoelabError("--tasks is empty: give task names or task YAML files, separated by commas")
    if args.limit is not None and args.limit < 1:
        raise MoelabError(f"--limit {args.limit} is not allowed: examples per task, an integer >= 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise MoelabError(f"--num-fewshot {args.num_fewshot} is not allowed: an integer >= 0")
    if args.batch_size < 1:
        raise MoelabError(f"--batch-size {args.batch_size} is not allowed: sequences per batch, an integer >= 1")
    if args.server:
        run, _ = resolve_checkpoint(args.run)
        lm, label = None, f"server {args.server}"
    else:
        loaded = load_model(args.run, resolve_device(args.device))
        run = loaded.run
        lm, label = MoelabLM(loaded.model, loaded.tokenizer, args.batch_size), loaded.checkpoint.name
    result = run_tasks(
        lm,
        tasks,
        Path(run.path) / "eval",
        include=args.include or [],
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        server_url=args.server,
        batch_size=args.batch_size,
    )
    if args.json:
        print(json.dumps({"path": str(result.path), "results": result.results}, default=str))
    else:
        for task, metrics in result.results.items():
            shown = ", ".join(
                f"{name.split(',')[0]} {value:.4f}"
                for name, value in metrics.items()
                if isinstance(value, float) and "stderr" not in name
            )
            print(f"{task} ({label}): {shown}")
        print(f"results and per-example log-likelihoods: {result.path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text from a trained run, streamed to the terminal as it is produced."""
    from moelab.device import resolve_device
    from moelab.infer.generate import generate
    from moelab.infer.moe_layer import prepare_for_inference
    from moelab.rundir import load_model

    params = sampling_params(args)
    if args.max_new_tokens < 1:
        raise MoelabError(f"--max-new-tokens {args.max_new_tokens} is not allowed: an integer >= 1")
    loaded = load_model(args.run, resolve_device(args.device))
    prompt_tokens = len(loaded.tokenizer.encode(args.prompt))
    if prompt_tokens >= loaded.cfg.model.max_seq_len:
        raise MoelabError(
            f"the prompt is {prompt_tokens} tokens; the model's context window is {loaded.cfg.model.max_seq_len}"
        )
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate(
        prepare_for_inference(loaded.model),
        loaded.tokenizer,
        args.prompt,
        args.max_new_tokens,
        params,
        seed=args.seed,
        on_text=emit,
    )
    sys.stdout.write("\n")
    return 0


def _moe_summary(moe) -> str:
    text = f"MoE E={moe.num_experts} k={moe.top_k} I={moe.expert_hidden}"
    if moe.num_shared_experts:
        text += (
            f" + {moe.num_shared_experts} shared expert(s) of hidden {moe.shared_expert_hidden or moe.expert_hidden}"
        )
    return text


def cmd_info(args: argparse.Namespace) -> int:
    """Total and active parameters, FLOPs per token (training and inference) and a training memory
    estimate, for a config, a preset or a run directory. With --data naming a tokenised directory
    (and no config): its documents, tokens per split, shards, dtype and tokenizer."""
    if args.data and not args.config and not args.preset:
        from moelab.cli.data import print_data_info
        from moelab.data.shards import token_dir_of

        if (path := token_dir_of(args.data)) is not None:
            return print_data_info(path, args.json)
    from moelab.model import accounting as acc
    from moelab.rundir import RunDir
    from moelab.train.progress import format_count

    if args.config and Path(args.config).is_dir():
        cfg = RunDir(args.config).load_config()
    else:
        cfg = resolve_config(args)
    mcfg = cfg.model
    vocab = mcfg.vocab_size or (cfg.data.vocab_size if cfg.data.tokenizer == "bpe" else 260)
    counts = acc.param_counts(mcfg, vocab)
    seq = cfg.data.seq_len
    memory = acc.memory_estimate_bytes(mcfg, cfg.train.batch_size, seq, vocab)
    info = {
        "architecture": "dense" if mcfg.moe is None else _moe_summary(mcfg.moe),
        "vocab_size": vocab,
        "params": counts.to_dict(),
        "train_flops_per_token": acc.train_flops_per_token(mcfg, seq, vocab),
        "inference_flops_per_token": acc.inference_flops_per_token(mcfg, seq // 2, vocab),
        "memory_bytes": memory,
        "moe_layers": [i for i in range(mcfg.n_layers) if mcfg.is_moe_layer(i)],
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(
        f"architecture            {info['architecture']}, {mcfg.n_layers} layers, d_model {mcfg.d_model}, vocabulary {vocab}"
    )
    print(
        f"total parameters        {format_count(counts.total)} ({counts.total:,}; {format_count(counts.total_non_embedding)} without embeddings)"
    )
    print(
        f"active parameters       {format_count(counts.active)} ({counts.active:,}; {format_count(counts.active_non_embedding)} without embeddings)"
    )
    print(f"training FLOPs/token    {format_count(info['train_flops_per_token'])} (seq_len {seq})")
    print(f"inference FLOPs/token   {format_count(info['inference_flops_per_token'])} (at context {seq // 2})")
    print(
        f"training memory         ~{memory['total'] / 2**20:.0f} MiB at batch {cfg.train.batch_size} (weights {memory['weights'] / 2**20:.1f}, optimizer {memory['optimizer'] / 2**20:.1f}, activations {memory['activations'] / 2**20:.0f} MiB)"
    )
    if info["moe_layers"]:
        print(f"MoE layers              {info['moe_layers']}")
    return 0


def register(sub, command) -> None:
    """Add these commands to the `moelab` parser."""
    p = command(sub, "train", cmd_train, "train a model (default: the small MoE on the embedded corpus)")
    add_config_flags(p)
    add_run_flags(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue the run in --out from its newest checkpoint, or from CHECKPOINT",
    )

    p = command(sub, "eval", cmd_eval, "validation loss and perplexity of a run or checkpoint")
    p.add_argument("run", metavar="RUN_DIR", help="a run directory or one of its checkpoints")
    p.add_argument("--data", help="evaluate on this data's validation split instead of the run's")
    p.add_argument("--batches", type=int, default=0, help="at most this many batches (0 = the whole validation split)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tasks", help="lm-evaluation-harness tasks instead: names or task YAML files, comma-separated")
    p.add_argument(
        "--include", action="append", metavar="PATH", help="a task YAML file or a folder of them (repeatable)"
    )
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's own)")
    p.add_argument(
        "--server", metavar="URL", help="evaluate through a running `moelab serve` at URL (e.g. http://127.0.0.1:8000)"
    )

    p = command(sub, "generate", cmd_generate, "generate text from a run, streamed")
    p.add_argument("run", metavar="RUN_DIR", help="a run directory or one of its checkpoints")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=128)
    add_sampling_flags(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    p = command(sub, "info", cmd_info, "parameters, FLOPs per token and memory of a config or run")
    add_config_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
