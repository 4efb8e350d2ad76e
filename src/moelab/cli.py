"""`moelab <command>`: one subcommand per user task. Each command is a thin layer over functions
that tests and users can call directly; its help text is the handler's docstring.

Bad input (config, paths, data, checkpoints) ends with one line `moelab: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from moelab.errors import MoelabError

EXIT_USAGE = 2


# ---------------------------------------------------------------------------------------------
# Shared flags: the same names mean the same thing in every command


def add_config_flags(p: argparse.ArgumentParser, many: bool = False) -> None:
    """CONFIG and --preset (one model, or several with many=True), --set and --data."""
    if many:
        p.add_argument("config", nargs="*", help="TOML config files, one per model")
        p.add_argument("--preset", action="append", help="a preset from configs/ (repeatable)")
    else:
        p.add_argument("config", nargs="?", help="a TOML config file (default: the small-moe preset)")
        p.add_argument("--preset", help="a preset from configs/ (small-moe, small-dense, tiny, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help="override one setting, e.g. --set model.moe.num_experts=16 (repeatable)")
    p.add_argument("--data", help="training text: a file, a directory, a .jsonl file, or 'stdlib' (the embedded corpus)")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="run directory to create (default: runs/<preset>-<time>)")
    p.add_argument("--max-minutes", type=float, help="stop training after this many minutes (a checkpoint is saved)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def config_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.append(f"data.source={json.dumps(args.data)}")
    if getattr(args, "max_minutes", None) is not None:
        if args.max_minutes <= 0:
            raise MoelabError(f"--max-minutes {args.max_minutes} is not allowed: a number of minutes > 0")
        overrides.append(f"train.max_minutes={args.max_minutes}")
    return overrides


def resolve_config(args: argparse.Namespace):
    from moelab.config import load_config

    return load_config(getattr(args, "config", None), args.preset, config_overrides(args))


def default_out(prefix: str) -> Path:
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def log_err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model. With no arguments: the default small MoE on the embedded corpus (the Python
    standard library's source), about 11 minutes on a 2-core CPU, then the validation loss and a
    short sample. --resume continues the run in --out from its newest checkpoint (or from the
    checkpoint given), exactly where it stopped."""
    from moelab.rundir import RunDir
    from moelab.train.trainer import Trainer, describe_result

    if args.resume is not None:
        if not args.out and args.resume is True:
            raise MoelabError("--resume needs the run: give --out RUN_DIR (or --resume CHECKPOINT_DIR)")
        resume = True if args.resume is True else Path(args.resume)
        out = Path(args.out) if args.out else Path(args.resume).parent.parent
        if args.config or args.preset:
            raise MoelabError("--resume continues the run with its saved config; only --set train.* / monitor.* / parallel.* and --max-minutes may change")
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
            raise MoelabError(f"--set {bad[0]} cannot change a resumed run; only {allowed} settings (and --data before the first step) may change")
        if overrides:
            from moelab.config import apply_overrides, build_config

            cfg = build_config(apply_overrides(cfg.to_dict(), overrides))
    else:
        cfg = resolve_config(args)
        resume = False
        out = Path(args.out) if args.out else default_out(args.preset or (Path(args.config).stem if args.config else "small-moe"))
    trainer = Trainer(cfg, out, resume=resume, log=log_err, progress=not args.quiet)
    result = trainer.fit()
    if trainer.is_main:  # (distributed) rank 0 reports for the whole run
        print(describe_result(result))
        if result.sample:
            print("sample: def " + result.sample)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Validation loss and perplexity of a run (its newest checkpoint) or of one checkpoint, on the
    run's own validation split (or on --data)."""
    import torch

    from moelab.data.loader import eval_batches
    from moelab.data.shards import prepare_data
    from moelab.rundir import load_model
    from moelab.train.trainer import resolve_device

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
            total += float(torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.to(device).reshape(-1), reduction="sum"))
            count += y.numel()
    loss = total / count
    result = {"run": str(loaded.run.path), "checkpoint": loaded.checkpoint.name, "step": loaded.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "tokens": count}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{loaded.run.path} {loaded.checkpoint.name}: validation loss {loss:.4f}, perplexity {result['val_ppl']:.2f} over {count:,} tokens")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text from a trained run, streamed to the terminal as it is produced."""
    from moelab.infer.generate import generate
    from moelab.infer.sampling import SamplingParams
    from moelab.rundir import load_model
    from moelab.train.trainer import resolve_device

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    try:
        params.validate()
    except ValueError as exc:
        raise MoelabError(str(exc)) from None
    if args.max_new_tokens < 1:
        raise MoelabError(f"--max-new-tokens {args.max_new_tokens} is not allowed: an integer >= 1")
    loaded = load_model(args.run, resolve_device(args.device))
    prompt_tokens = len(loaded.tokenizer.encode(args.prompt))
    if prompt_tokens >= loaded.cfg.model.max_seq_len:
        raise MoelabError(f"the prompt is {prompt_tokens} tokens; the model's context window is {loaded.cfg.model.max_seq_len}")
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate(loaded.model, loaded.tokenizer, args.prompt, args.max_new_tokens, params, seed=args.seed, on_text=emit)
    sys.stdout.write("\n")
    return 0


def _moe_summary(moe) -> str:
    text = f"MoE E={moe.num_experts} k={moe.top_k} I={moe.expert_hidden}"
    if moe.num_shared_experts:
        text += f" + {moe.num_shared_experts} shared expert(s) of hidden {moe.shared_expert_hidden or moe.expert_hidden}"
    return text


def cmd_info(args: argparse.Namespace) -> int:
    """Total and active parameters, FLOPs per token (training and inference) and a training memory
    estimate, for a config, a preset or a run directory."""
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
    print(f"architecture            {info['architecture']}, {mcfg.n_layers} layers, d_model {mcfg.d_model}, vocabulary {vocab}")
    print(f"total parameters        {format_count(counts.total)} ({counts.total:,}; {format_count(counts.total_non_embedding)} without embeddings)")
    print(f"active parameters       {format_count(counts.active)} ({counts.active:,}; {format_count(counts.active_non_embedding)} without embeddings)")
    print(f"training FLOPs/token    {format_count(info['train_flops_per_token'])} (seq_len {seq})")
    print(f"inference FLOPs/token   {format_count(info['inference_flops_per_token'])} (at context {seq // 2})")
    print(f"training memory         ~{memory['total'] / 2**20:.0f} MiB at batch {cfg.train.batch_size} (weights {memory['weights'] / 2**20:.1f}, optimizer {memory['optimizer'] / 2**20:.1f}, activations {memory['activations'] / 2**20:.0f} MiB)")
    if info["moe_layers"]:
        print(f"MoE layers              {info['moe_layers']}")
    return 0


# ---------------------------------------------------------------------------------------------


def _command(sub, name: str, handler: Callable[[argparse.Namespace], int], summary: str) -> argparse.ArgumentParser:
    description = inspect.cleandoc(handler.__doc__ or summary)
    p = sub.add_parser(name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=handler)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moelab", description="Train, diagnose, compare and serve sparse mixture-of-experts language models.")
    from moelab import __version__

    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _command(sub, "train", cmd_train, "train a model (default: the small MoE on the embedded corpus)")
    add_config_flags(p)
    add_run_flags(p)
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT", help="continue the run in --out from its newest checkpoint, or from CHECKPOINT")

    p = _command(sub, "eval", cmd_eval, "validation loss and perplexity of a run or checkpoint")
    p.add_argument("run", metavar="RUN_DIR", help="a run directory or one of its checkpoints")
    p.add_argument("--data", help="evaluate on this data's validation split instead of the run's")
    p.add_argument("--batches", type=int, default=0, help="at most this many batches (0 = the whole validation split)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _command(sub, "generate", cmd_generate, "generate text from a run, streamed")
    p.add_argument("run", metavar="RUN_DIR", help="a run directory or one of its checkpoints")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    p = _command(sub, "info", cmd_info, "parameters, FLOPs per token and memory of a config or run")
    add_config_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    for register in _extra_commands():
        register(sub, _command)
    return parser


def _extra_commands() -> list[Callable]:
    """Commands that live beside their subsystem (compare, diagnose, serve, export, ...)."""
    from moelab.analysis import cli as analysis_cli
    from moelab.analysis import diagnose_cli
    from moelab.infer import cli as infer_cli
    from moelab.interop import cli as interop_cli

    return [analysis_cli.register, diagnose_cli.register, infer_cli.register, interop_cli.register]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.handler(args)
    except MoelabError as exc:
        # NOTE (distributed): under torchrun every rank meets the same bad input; rank 0 says it once.
        if os.environ.get("RANK", "0") == "0":
            log_err(f"moelab: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        log_err("moelab: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
