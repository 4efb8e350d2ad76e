"""What every `moelab` command shares: config flags (CONFIG, --preset, --set, --data), run flags,
sampling flags, and the one-line error output. The same flag names mean the same thing everywhere.

Bad input (config, paths, data, checkpoints) ends with one line `moelab: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from moelab.errors import MoelabError

EXIT_USAGE = 2


def add_config_flags(p: argparse.ArgumentParser, many: bool = False) -> None:
    """CONFIG and --preset (one model, or several with many=True), --set and --data."""
    if many:
        p.add_argument("config", nargs="*", help="TOML config files, one per model")
        p.add_argument("--preset", action="append", help="a preset from configs/ (repeatable)")
    else:
        p.add_argument("config", nargs="?", help="a TOML config file (default: the small-moe preset)")
        p.add_argument("--preset", help="a preset from configs/ (small-moe, small-dense, tiny, ...)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one setting, e.g. --set model.moe.num_experts=16 (repeatable)",
    )
    p.add_argument(
        "--data",
        help="training data: a text file, a directory, a .jsonl or .parquet file, a `datasets` save_to_disk "
        "directory, 'stdlib' (the embedded corpus), or tokens (tokens:DIR from `moelab tokenize`, nanoGPT bins)",
    )


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="run directory to create (default: runs/<preset>-<time>)")
    p.add_argument("--max-minutes", type=float, help="stop training after this many minutes (a checkpoint is saved)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def config_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.append(f"data.source={json.dumps(args.data)}")
    if getattr(args, "max_minutes", None) is not None:
        if not (math.isfinite(args.max_minutes) and args.max_minutes > 0):
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


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """--temperature, --top-p, --top-k, --seed: for generate and chat."""
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)


def sampling_params(args: argparse.Namespace):
    """The SamplingParams the sampling flags give, validated."""
    from moelab.infer.sampling import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    try:
        params.validate()
    except ValueError as exc:
        raise MoelabError(str(exc)) from None
    return params
