"""Check a forecast against a run beyond its ladder: train the ladder (reusing finished runs), train one
larger rung with the ladder's own configs, fit the law on the ladder alone, and print the forecast for
the larger rung beside what it measured. Writes OUT/validation.json.

    python benchmarks/forecast_beyond.py --widths 32,64,96 --tokens 2.5e5,5e5,1e6 --width 128 --at-tokens 2e6 \\
        --ladder runs/study/forecast-w32-96 --out runs/study/forecast-validate
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moelab.analysis.forecast import forecast_report, run_ladder
from moelab.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small-moe")
    parser.add_argument("--widths", default="32,64,96")
    parser.add_argument("--tokens", default="2.5e5,5e5,1e6")
    parser.add_argument("--width", type=int, default=128, help="the larger rung's width")
    parser.add_argument("--at-tokens", type=float, default=2e6, help="the larger rung's tokens")
    parser.add_argument(
        "--ladder", default="runs/study/forecast-w32-96", help="the ladder's output directory (its runs are reused)"
    )
    parser.add_argument("--out", default="runs/study/forecast-validate")
    args = parser.parse_args()
    base = load_config(preset=args.preset)
    widths = [int(w) for w in args.widths.split(",")]
    tokens = [float(t) for t in args.tokens.split(",")]
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    ladder = run_ladder(base, widths, tokens, Path(args.ladder), log=log, progress=False)
    big = run_ladder(base, [args.width], [args.at_tokens], Path(args.ladder), log=log, progress=False)
    dense, moe = (next(p for p in big if (p.E == 1) == is_dense) for is_dense in (True, False))
    out = Path(args.out)
    data = forecast_report(ladder, moe.N, moe.D, moe.E, 100, out, holdout=(max(widths), max(tokens)))
    f = data["forecast"]
    result = {
        "target": {"width": args.width, "N": moe.N, "D": moe.D, "E": moe.E, "dense_N": dense.N},
        "predicted": {
            "dense": f["dense"],
            "dense_interval": f["dense_ci"],
            "moe": f["moe"],
            "moe_interval": f["moe_ci"],
            "advantage": f["advantage"],
            "advantage_interval": f["advantage_ci"],
            "trend": f["trend"],
            "warnings": f["warnings"],
        },
        "measured": {"dense": dense.loss, "moe": moe.loss, "advantage": dense.loss - moe.loss},
        "covered": {
            "dense": f["dense_ci"][0] <= dense.loss <= f["dense_ci"][1],
            "moe": f["moe_ci"][0] <= moe.loss <= f["moe_ci"][1],
            "advantage": f["advantage_ci"][0] <= dense.loss - moe.loss <= f["advantage_ci"][1],
        },
        "backtest": data["backtest"],
    }
    (out / "validation.json").write_text(json.dumps(result, indent=1))
    print(f"{'':10s} {'predicted':>10s} {'95% interval':>22s} {'measured':>10s} {'error':>8s} covered")
    for key, interval in (("dense", f["dense_ci"]), ("moe", f["moe_ci"]), ("advantage", f["advantage_ci"])):
        pred, meas = result["predicted"][key], result["measured"][key]
        error = f"{100 * (pred - meas) / meas:+.1f}%" if key != "advantage" else f"{pred - meas:+.3f}"
        print(
            f"{key:10s} {pred:10.4f} [{interval[0]:9.4f}, {interval[1]:9.4f}] {meas:10.4f} {error:>8s} {result['covered'][key]}"
        )


if __name__ == "__main__":
    main()
