"""`moelab compare`, `sweep` and `forecast`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from moelab.analysis.tuning import DEFAULT_FRACTION as TUNE_FRACTION_DEFAULT
from moelab.errors import MoelabError


def _models_from_args(args: argparse.Namespace):
    from moelab.cli.common import config_overrides
    from moelab.config import load_config

    overrides = config_overrides(args)
    models = []
    for path in args.config or []:
        models.append((Path(path).stem, load_config(path, None, overrides)))
    for preset in args.preset or []:
        models.append((preset, load_config(None, preset, overrides)))
    if not models:
        models.append(("small-moe", load_config(None, "small-moe", overrides)))
    names = [n for n, _ in models]
    if len(set(names)) != len(names) or "dense" in names:
        raise MoelabError(f"model names must be unique and not 'dense': {names}")
    return models


def cmd_compare(args: argparse.Namespace) -> int:
    """Train a dense baseline and one or more MoE models on the same data, order, seed and budget,
    and report quality against cost: parameters, FLOPs, throughput, memory, validation loss, and the
    compute multiplier (the share of the dense training FLOPs at which the MoE first reached the
    dense model's final loss). The dense twin is derived from the first MoE config (--match active:
    same FLOPs per token; total: same parameter count) unless --baseline gives one.

    --tune searches each model's own learning rate (and optionally batch size and WSD decay
    fraction) with short runs before the final runs; --seeds N repeats the final runs over N seeds
    and reports the loss gap and multiplier with 95% intervals, and a verdict that follows them.
    plan.json lists every run; interrupted comparisons resume: finished runs are reused. Writes
    compare.json, PNG plots and report.html."""
    from moelab.analysis.budget import Budget
    from moelab.analysis.compare import compare
    from moelab.analysis.render import compare_text
    from moelab.analysis.tuning import TuneSpec
    from moelab.cli.common import config_overrides, log_err
    from moelab.config import load_config

    if args.tune is None and args.tune_fraction is not None:
        raise MoelabError(f"--tune-fraction {args.tune_fraction:g} needs --tune")
    fraction = TUNE_FRACTION_DEFAULT if args.tune_fraction is None else args.tune_fraction
    tune = TuneSpec.parse(args.tune, fraction) if args.tune is not None else None
    if args.seeds < 1:
        raise MoelabError(f"--seeds {args.seeds} is not allowed: the number of seeds per model, an integer >= 1")
    if args.evals < 1:
        raise MoelabError(f"--evals {args.evals} is not allowed: evaluations per learning curve, an integer >= 1")
    models = _models_from_args(args)
    budget = Budget.parse(args.budget) if args.budget else None
    if args.max_minutes is not None and budget is None:
        budget = Budget("minutes", args.max_minutes)
    baseline = load_config(args.baseline, None, config_overrides(args)) if args.baseline else None
    out = Path(args.out) if args.out else Path("runs") / "compare"
    results = compare(
        models,
        out,
        budget,
        args.match,
        baseline,
        args.evals,
        log=log_err,
        progress=not args.quiet,
        cooldowns=not args.no_cooldown,
        tune=tune,
        seeds=args.seeds,
    )
    print(compare_text(results))
    print(f"\nreport: {out / 'report.html'}  data: {out / 'compare.json'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """At fixed active compute, vary the number of experts E and the granularity G (experts of
    hidden size A/G with top-k = G, where A is the base model's routed active hidden size), train
    each point under the same budget, and plot validation loss against total parameters, memory,
    training and inference throughput with the Pareto frontier marked. Finished points are reused
    when the sweep is run again. Writes sweep.json, PNG plots and report.html."""
    from moelab.analysis.budget import Budget
    from moelab.analysis.render import sweep_text
    from moelab.analysis.sweep import parse_int_list, sweep
    from moelab.cli.common import log_err, resolve_config

    base = resolve_config(args)
    experts = parse_int_list(args.experts, "--experts")
    granularities = parse_int_list(args.granularity, "--granularity")
    budget = Budget.parse(args.budget) if args.budget else None
    if args.max_minutes is not None and budget is None:
        budget = Budget("minutes", args.max_minutes)
    out = Path(args.out) if args.out else Path("runs") / "sweep"
    results = sweep(base, experts, granularities, out, budget, args.evals, log=log_err, progress=not args.quiet)
    print(sweep_text(results))
    print(f"\nreport: {out / 'report.html'}  data: {out / 'sweep.json'}")
    return 0


def _parse_floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not v > 0 for v in values):
        raise MoelabError(f"{flag} {text!r} is not allowed: a comma-separated list of numbers > 0, e.g. 5e5,1.5e6")
    return values


def cmd_forecast(args: argparse.Namespace) -> int:
    """Train a ladder of small dense and MoE runs (the base MoE config at several widths and token
    budgets, each with its dense twin), fit the scaling law
    L(N, D, E) = c + a N^-alpha E^-(b + g ln(N/N0) + h ln(D/D0)) + B D^-beta with bootstrap uncertainty, and
    predict dense and MoE loss at --target-params / --target-tokens. Says whether the MoE advantage
    is predicted to grow, shrink or flip, and why; warns when the target is far outside the ladder,
    the fit is poor, or the ladder's own advantage shrinks with training tokens. Backtests itself:
    the law is refitted without one rung (--holdout, the largest by default) and its prediction for
    that rung is printed beside what the rung measured. Finished ladder runs are reused."""
    from moelab.analysis.forecast import forecast_report, parse_holdout, run_ladder
    from moelab.analysis.render import forecast_text
    from moelab.analysis.sweep import parse_int_list
    from moelab.cli.common import log_err, resolve_config

    base = resolve_config(args)
    if base.model.moe is None:
        raise MoelabError("forecast needs an MoE config: its dense twin is derived at every width")
    widths = parse_int_list(args.widths, "--widths")  # model widths are integers: 64.5 is refused, not truncated
    tokens = _parse_floats(args.tokens, "--tokens")
    for flag, value in (("--target-params", args.target_params), ("--target-tokens", args.target_tokens)):
        if not (math.isfinite(value) and value > 0):
            raise MoelabError(f"{flag} {value} is not allowed: a finite number > 0")
    if args.bootstrap < 1:
        raise MoelabError(f"--bootstrap {args.bootstrap} is not allowed: bootstrap refits, an integer >= 1")
    holdout = parse_holdout(args.holdout, widths, tokens)
    out = Path(args.out) if args.out else Path("runs") / "forecast"
    points = run_ladder(base, widths, tokens, out, log=log_err, progress=not args.quiet)
    try:
        data = forecast_report(
            points, args.target_params, args.target_tokens, base.model.moe.num_experts, args.bootstrap, out, holdout
        )
    except ValueError as exc:
        raise MoelabError(f"cannot fit the ladder: {exc}") from None
    print(forecast_text(data))
    print(f"\nreport: {out / 'report.html'}  data: {out / 'forecast.json'}")
    return 0


def register(sub, command) -> None:
    from moelab.cli.common import add_config_flags

    p = command(sub, "compare", cmd_compare, "dense vs MoE at matched compute: curves, costs, compute multiplier")
    add_config_flags(p, many=True)
    p.add_argument("--baseline", help="a dense config file to use instead of the derived dense twin")
    p.add_argument(
        "--match",
        default="active",
        choices=["active", "total"],
        help="pair the dense model by FLOPs per token (active) or by total parameters",
    )
    p.add_argument(
        "--budget",
        help="per model: tokens=N, flops=N or minutes=N (default: the first MoE config's max_steps, as FLOPs)",
    )
    p.add_argument("--evals", type=int, default=12, help="evaluations per learning curve")
    p.add_argument(
        "--tune",
        action="append",
        nargs="?",
        const="",
        metavar="NAME=V1,V2,...",
        help="tune each model before its final runs: alone, lr over 5 values a factor of 2 apart around each model's own; "
        "or give a grid, repeatable: lr=1e-3,2e-3,4e-3 batch=16,32 decay=0.1,0.2 (decay needs a wsd schedule)",
    )
    p.add_argument(
        "--tune-fraction",
        type=float,
        default=None,
        help=f"share of each model's budget one tuning run spends, in (0, 1] (default {TUNE_FRACTION_DEFAULT:g})",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="final runs per model over seeds base, base+1, ... (initialisation and data order); >= 2 gives 95%% intervals",
    )
    p.add_argument(
        "--no-cooldown",
        action="store_true",
        help="with a wsd schedule, skip the cooled-down branches and read the multiplier on the raw evaluation curve",
    )
    p.add_argument("--out", help="output directory (default runs/compare)")
    p.add_argument("--max-minutes", type=float, help="per model wall-time budget (same as --budget minutes=M)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command(sub, "sweep", cmd_sweep, "vary expert count and granularity at fixed active compute")
    add_config_flags(p)
    p.add_argument("--experts", default="1,4,8,16,32", help="comma-separated expert counts E")
    p.add_argument("--granularity", default="1,2,4", help="comma-separated granularities G (top-k = G, I = A / G)")
    p.add_argument(
        "--budget", help="per point: tokens=N, flops=N or minutes=N (default: the base config's max_steps, as FLOPs)"
    )
    p.add_argument("--evals", type=int, default=6, help="evaluations per run")
    p.add_argument("--out", help="output directory (default runs/sweep)")
    p.add_argument("--max-minutes", type=float, help="per point wall-time budget (same as --budget minutes=M)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command(sub, "forecast", cmd_forecast, "scaling-law forecast: does the MoE advantage grow, shrink or flip?")
    add_config_flags(p)
    p.add_argument("--widths", default="64,96,128", help="comma-separated model widths (d_model) of the ladder")
    p.add_argument("--tokens", default="5e5,1.5e6", help="comma-separated training token budgets of the ladder")
    p.add_argument("--target-params", type=float, default=1e8, help="active non-embedding parameters to forecast")
    p.add_argument("--target-tokens", type=float, default=2e9, help="training tokens to forecast")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap refits for the uncertainty")
    p.add_argument(
        "--holdout",
        default="largest",
        help="the rung to backtest on: largest (default), none, or wWIDTH-tTOKENS, e.g. w128-t2e6",
    )
    p.add_argument("--out", help="output directory (default runs/forecast)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
