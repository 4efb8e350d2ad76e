"""Does the monitor flag a collapsing run before its validation loss falls behind a healthy one?
And does a healthy run stay free of alerts?

Trains two runs of the same preset with the same data, order, seed and step budget:

    healthy     the preset as it is (load-balancing loss and router z-loss on)
    collapsing  the same with load balancing switched off (model.moe.aux_loss_coef = 0,
                model.moe.z_loss_coef = 0): nothing stops the router from sending more and more
                tokens to the experts that already get the most ("rich get richer")

and reports: every alert of the healthy run (there should be none: a false alarm fails the check),
the collapsing run's first alert, and the first evaluation from which the collapsing run's validation
loss stays behind the healthy run's by more than --margin. Writes a `moelab diagnose` report into
each run directory and collapse_demo.json into --out. Finished runs are reused when run again.

    python benchmarks/collapse_demo.py [--preset small-moe] [--out runs/collapse-demo] [--set KEY=VALUE ...]
        [--collapse-set KEY=VALUE ...] [--margin 0.01] [--only healthy|collapsing] [--quiet]

--only healthy trains just the healthy run and exits with status 1 if it raised any alert: the
no-false-alarm check to rerun whenever a preset's MoE settings change. Exit status 1 also when the
collapsing run is not flagged, or is flagged only after it fell behind. (--only collapsing trains just
the collapsing run, e.g. in a second process beside --only healthy; a later run without --only
reuses both and compares them.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moelab.config import load_config  # noqa: E402
from moelab.rundir import RunDir, read_jsonl  # noqa: E402
from moelab.train.trainer import Trainer  # noqa: E402

COLLAPSE = ["model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0"]


def train(name: str, preset: str, overrides: list[str], out: Path, quiet: bool, trace: bool) -> Path:
    run = out / name
    if RunDir(run).read_summary() is not None:
        print(f"{name}: reusing the finished run in {run}", file=sys.stderr)
        return run
    cfg = load_config(preset=preset, overrides=overrides)
    if cfg.model.moe is None:
        raise SystemExit(f"preset {preset!r} has no MoE layers: there is no router to collapse")
    trainer = Trainer(cfg, run, log=lambda s: print(f"{name}: {s}", file=sys.stderr), progress=not quiet)
    if not trace:
        trainer.fit()
        return run
    # Every step's loss and gradient norm, to calibrate the spike rules (metrics.jsonl holds
    # interval means only).
    check_step = trainer.monitor.check_step
    with open(run / "steps.jsonl", "a") as steps:

        def traced(step: int, loss: float, grad_norm: float):
            steps.write(json.dumps({"step": step, "loss": loss, "grad_norm": grad_norm}) + "\n")
            return check_step(step, loss, grad_norm)

        trainer.monitor.check_step = traced
        trainer.fit()
    return run


def alerts(run: Path) -> list[dict[str, Any]]:
    return read_jsonl(run / "alerts.jsonl")


def val_curve(run: Path) -> dict[int, float]:
    """step -> validation loss (the last evaluation logged for a step wins, as after a rollback)."""
    return {r["step"]: r["val_loss"] for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r}


def fell_behind(
    healthy: dict[int, float], collapsing: dict[int, float], margin: float
) -> tuple[int | None, int | None]:
    """(first evaluation step where the collapsing run is behind by more than margin, first step
    from which it stays behind by more than margin at every later shared evaluation)."""
    steps = sorted(set(healthy) & set(collapsing) - {0})
    behind = [collapsing[s] - healthy[s] > margin for s in steps]
    first = next((s for s, b in zip(steps, behind) if b), None)
    stays = None
    for i in range(len(steps) - 1, -1, -1):
        if not behind[i]:
            break
        stays = steps[i]
    return first, stays


def report(run: Path) -> str | None:
    try:
        from moelab.analysis.diagnose import write_report

        return str(write_report(run))
    except ImportError as exc:  # matplotlib is optional (the `report` extra)
        print(f"no report for {run}: {exc}", file=sys.stderr)
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small-moe")
    ap.add_argument("--out", default="runs/collapse-demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="for both runs")
    ap.add_argument(
        "--collapse-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="for the collapsing run only, after the built-in ones",
    )
    ap.add_argument("--margin", type=float, default=0.01, help="validation loss gap (nats) that counts as behind")
    ap.add_argument(
        "--only", choices=["healthy", "collapsing"], help="train only this run (healthy: exit 1 on any alert)"
    )
    ap.add_argument(
        "--trace-steps", action="store_true", help="also write every step's loss and grad norm to RUN/steps.jsonl"
    )
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    collapse_overrides = args.overrides + COLLAPSE + args.collapse_set
    if args.only == "collapsing":
        train("collapsing", args.preset, collapse_overrides, out, args.quiet, args.trace_steps)
        return 0
    healthy = train("healthy", args.preset, args.overrides, out, args.quiet, args.trace_steps)
    healthy_alerts = alerts(healthy)
    result: dict[str, Any] = {
        "preset": args.preset,
        "overrides": args.overrides,
        "healthy": {
            "run": str(healthy),
            "alerts": healthy_alerts,
            "val_loss": RunDir(healthy).read_summary()["val_loss"],
            "report": report(healthy),
        },
    }
    print(f"healthy run: {len(healthy_alerts)} alert(s), final validation loss {result['healthy']['val_loss']:.4f}")
    for a in healthy_alerts:
        print(f"  FALSE ALARM step {a['step']}: [{a['rule']}] {a['message']}")
    ok = not healthy_alerts
    if args.only is None:
        collapsing = train("collapsing", args.preset, collapse_overrides, out, args.quiet, args.trace_steps)
        found = alerts(collapsing)
        router_alerts = [a for a in found if a["rule"] in ("collapse", "dead_experts")]
        first_alert = min((a["step"] for a in router_alerts), default=None)
        first_behind, stays_behind = fell_behind(val_curve(healthy), val_curve(collapsing), args.margin)
        result["collapsing"] = {
            "run": str(collapsing),
            "overrides": collapse_overrides,
            "alerts": found,
            "first_router_alert_step": first_alert,
            "first_behind_step": first_behind,
            "stays_behind_from_step": stays_behind,
            "val_loss": RunDir(collapsing).read_summary()["val_loss"],
            "report": report(collapsing),
        }
        c = result["collapsing"]
        print(
            f"collapsing run: {len(found)} alert(s), final validation loss {c['val_loss']:.4f} "
            f"({c['val_loss'] - result['healthy']['val_loss']:+.4f} vs healthy)"
        )
        for a in found:
            print(f"  step {a['step']}: [{a['rule']} -> {a['action']}] {a['message']}")
        print(f"first collapse / dead-expert alert: step {first_alert}")
        print(
            f"validation loss behind the healthy run by > {args.margin:g} nats: first at step {first_behind}, "
            f"and for good from step {stays_behind}"
        )
        flagged_early = first_alert is not None and (stays_behind is None or first_alert < stays_behind)
        ok = ok and flagged_early
        if first_alert is None:
            print("NOT FLAGGED: the collapsing run raised no collapse or dead-expert alert")
    for name in ("healthy", "collapsing"):
        if name in result and result[name]["report"]:
            print(f"report: {result[name]['report']}")
    (out / "collapse_demo.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'collapse_demo.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
