"""The recipe study of docs/recipe.md: which change to the default MoE recipe closes the decay-phase
gap to its dense twin. Each factor is changed alone against the default.

Stage 1, screen (one seed): the default `small-moe` at the budget where the flip appeared (the
default's tokens with half the batch and twice the steps, WSD: 16 x 800), the learning rate the
tuned comparison chose for every arm at half this budget (3e-3), seed 0; one MoE run per factor. Finished runs are reused, so the screen resumes
where it stopped; `--only` trains a subset (run two shells with OMP_NUM_THREADS=1 to use both cores).

    python benchmarks/recipe_study.py screen [--only NAME,...] [--seeds 0,1,2] [--out runs/recipe-screen]
    python benchmarks/recipe_study.py table [--out runs/recipe-screen] [--json docs/results/recipe-screen.json]

Stage 2, confirm: the factors that beat the default by more than the seed spread, each as a tuned,
seeded comparison against the dense twin (`moelab compare --tune --seeds 3`) at both budgets;
`confirm` prints those commands for the chosen factors.

    python benchmarks/recipe_study.py confirm --factors NAME,...
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moelab.analysis.runs import train_or_reuse  # noqa: E402
from moelab.config import load_config  # noqa: E402
from moelab.rundir import RunDir  # noqa: E402
from moelab.train.schedule import decay_start  # noqa: E402

# The flip's recipe (docs/recipe.md): the default tokens (3,276,800 = 16 x 256 x 800), WSD.
BASE = [
    "train.batch_size=16",
    "train.schedule=wsd",
    "train.max_steps=800",
    "train.lr=3e-3",
    "train.eval_every=50",
    "train.sample_tokens=0",
    "train.seed=0",
]

# name -> (what changes, overrides on top of BASE)
FACTORS: dict[str, tuple[str, list[str]]] = {
    "default": ("the small-moe preset as it is", []),
    "dense": ("its dense twin (same active compute)", ["@dense"]),
    "coupling-lr": ("Switch coefficient and bias rate follow the learning rate", ["train.balance_coupling=lr"]),
    "coupling-stop": ("balancing off in the decay phase", ["train.balance_coupling=stop_at_decay"]),
    "freeze-at-decay": ("router frozen when the decay starts", ["train.router_freeze_at_decay=true"]),
    "aux-0.003": ("Switch coefficient 0.01 -> 0.003", ["model.moe.aux_loss_coef=0.003"]),
    "aux-0.001": ("Switch coefficient 0.01 -> 0.001", ["model.moe.aux_loss_coef=0.001"]),
    "aux-0": ("no load balancing at all (Switch coefficient 0, no bias)", ["model.moe.aux_loss_coef=0"]),
    "aux-free": (
        "no Switch loss; bias balancing (DeepSeek-V3) at rate 1e-3",
        ["model.moe.aux_loss_coef=0", "model.moe.bias_update_rate=0.001"],
    ),
    "expert-lr-2x": ("router and routed experts at twice the learning rate", ["model.moe.lr_scale=2.0"]),
    "no-shared": (
        "no shared expert; k=8 keeps 512 active units (8 x 64)",
        ["model.moe.num_shared_experts=0", "model.moe.top_k=8", "model.moe.route_scale=8.0"],
    ),
    "lr-1.5e-3": ("the default at half the shared learning rate (tuning the MoE arm)", ["train.lr=1.5e-3"]),
    "lr-6e-3": ("the default at twice the shared learning rate (tuning the MoE arm)", ["train.lr=6e-3"]),
    "dense-lr-1.5e-3": ("the dense twin at half the shared learning rate (tuning it)", ["@dense", "train.lr=1.5e-3"]),
    "dense-lr-6e-3": ("the dense twin at twice the shared learning rate (tuning it)", ["@dense", "train.lr=6e-3"]),
    # Which part of the model the decay phase helps (train.decay_scope): the parameters outside the
    # scope keep the peak learning rate through the decay; "no-decay" keeps it for all.
    "decay-ffn-only": ("only the MoE layers (router, experts, shared expert) decay", ["train.decay_scope=ffn"]),
    "decay-rest-only": ("everything but the MoE layers decays", ["train.decay_scope=non_ffn"]),
    "no-decay": ("no decay (constant learning rate after the warmup)", ["train.schedule=constant"]),
    "dense-decay-ffn-only": ("the dense twin, only its FFNs decay", ["@dense", "train.decay_scope=ffn"]),
    "dense-decay-rest-only": (
        "the dense twin, everything but its FFNs decays",
        ["@dense", "train.decay_scope=non_ffn"],
    ),
    "dense-no-decay": ("the dense twin without decay", ["@dense", "train.schedule=constant"]),
    "coarse-16x2": (
        "coarser experts: E=16, k=2, I=192 (same active expert width as 6 x 64, half the total)",
        ["model.moe.num_experts=16", "model.moe.top_k=2", "model.moe.expert_hidden=192", "model.moe.route_scale=2.0"],
    ),
}


def factor_config(name: str, seed: int = 0):
    overrides = [o for o in FACTORS[name][1] if not o.startswith("@")]
    cfg = load_config(preset="small-moe", overrides=BASE + overrides + [f"train.seed={seed}"])
    if "@dense" in FACTORS[name][1]:
        from moelab.analysis.compare import dense_twin

        cfg = dense_twin(cfg)
    return cfg


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / (name if seed == 0 else f"{name}-seed{seed}")


def screen(out: Path, only: list[str] | None, seeds: list[int]) -> None:
    for name in only or list(FACTORS):
        if name not in FACTORS:
            raise SystemExit(f"unknown factor {name!r}; known: {', '.join(FACTORS)}")
        for seed in seeds:
            train_or_reuse(name, factor_config(name, seed), run_dir(out, name, seed), log=print, progress=False)


def final_loss(run: Path) -> tuple[float | None, float | None]:
    """(final validation loss, wall seconds) of a finished run, else (None, None)."""
    summary = RunDir(run).read_summary()
    if summary is None:
        return None, None
    return summary["val_loss"], summary.get("wall_s")


def decay_gain(run: Path, cfg) -> float | None:
    """Validation loss just before the WSD decay minus the final one: what the decay phase bought."""
    # the base recipe's decay start, also for a variant without a decay (what it gained meanwhile)
    start = decay_start(cfg.train) or decay_start(factor_config("default").train)
    rows = [r for r in RunDir(run).read_metrics() if "val_loss" in r]
    before = [r["val_loss"] for r in rows if r["step"] <= start]
    return (before[-1] - rows[-1]["val_loss"]) if before and rows else None


def table(out: Path, json_path: Path | None) -> None:
    base, _ = final_loss(out / "default")
    dense, _ = final_loss(out / "dense")
    rows = []
    for name, (what, overrides) in FACTORS.items():
        loss, wall = final_loss(out / name)
        if loss is None:
            continue
        cfg = factor_config(name)
        more = [final_loss(p)[0] for p in sorted(out.glob(f"{name}-seed*"))]
        seed_losses = [loss] + [v for v in more if v is not None]
        rows.append(
            {
                "factor": name,
                "what": what,
                "overrides": overrides,
                "val_loss": loss,
                "val_loss_seeds": seed_losses,  # seed 0 first (the other columns are seed 0's)
                "vs_default": None if base is None else loss - base,
                "vs_dense": None if dense is None else loss - dense,
                "decay_gain": decay_gain(out / name, cfg),
                "wall_s": wall,
            }
        )
    print(
        "| factor | change | final val loss | vs default | vs dense | decay-phase gain | wall min | all seeds: mean (n) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")

    def fmt(v, spec="+.4f"):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    for r in rows:
        print(
            f"| {r['factor']} | {r['what']} | {r['val_loss']:.4f} | {fmt(r['vs_default'])} | {fmt(r['vs_dense'])} | "
            f"{fmt(r['decay_gain'], '.4f')} | {fmt((r['wall_s'] or 0) / 60, '.1f')} | "
            + (
                f"{sum(r['val_loss_seeds']) / len(r['val_loss_seeds']):.4f} ({len(r['val_loss_seeds'])})"
                if len(r["val_loss_seeds"]) > 1
                else ""
            )
            + " |"
        )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(
            json.dumps({"base_overrides": BASE, "preset": "small-moe", "seed": 0, "rows": rows}, indent=1) + "\n"
        )
        print(f"wrote {json_path}")


def _curve(run: Path) -> tuple[dict[int, float], dict[int, dict]]:
    """(validation loss by step, training row by step) of a finished run."""
    rows = RunDir(run).read_metrics()
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}, {r["step"]: r for r in rows if "loss" in r}


def _train_loss(rows: dict[int, dict], lo: int, hi: int) -> float:
    """Mean logged training loss over steps (lo, hi] (each row averages its log interval)."""
    values = [r["loss"] for s, r in rows.items() if lo < s <= hi]
    return sum(values) / len(values)


ROUTER_KEYS = ("entropy", "max_logit", "effective_experts", "similarity_mean")


def decay_analysis(out: Path, json_path: Path | None) -> None:
    """Where the flip happens and what the decay phase changes, over every seed of the default MoE
    and its dense twin (paired by seed, Student-t intervals), and the decay-scope localisation."""
    from moelab.analysis.intervals import mean_interval

    curves: dict[Path, tuple[dict[int, float], dict[int, dict]]] = {}

    def curve(run: Path) -> tuple[dict[int, float], dict[int, dict]]:
        # NOTE: the default and dense runs serve three tables; their metrics are read once
        if run not in curves:
            curves[run] = _curve(run)
        return curves[run]

    base_cfg = factor_config("default")
    start = decay_start(base_cfg.train)
    before = max(s for s in curve(out / "default")[0] if s <= start)  # the last evaluation before the decay
    end = base_cfg.train.max_steps
    per_arm: dict[str, list[dict]] = {}
    for arm in ("default", "dense"):
        for seed in range(100):
            run = run_dir(out, arm, seed)
            if RunDir(run).read_summary() is None:
                break
            val, train = curve(run)
            log_every = base_cfg.train.eval_every
            row = {
                "seed": seed,
                "val_mid": val[end // 2],
                "val_before": val[before],
                "val_final": val[end],
                "val_gain": val[before] - val[end],
                "train_before": _train_loss(train, before - log_every, before),
                "train_final": _train_loss(train, end - log_every, end),
            }
            row["train_gain"] = row["train_before"] - row["train_final"]
            row["val_curve"] = {str(step): loss for step, loss in sorted(val.items())}
            if f"router.0.{ROUTER_KEYS[0]}" in train[end]:
                layers = sorted({k.split(".")[1] for k in train[end] if k.startswith("router.")}, key=int)
                for key in ROUTER_KEYS:
                    for step, tag in ((before, "before"), (end, "final")):
                        row[f"{key}_{tag}"] = [train[step][f"router.{layer}.{key}"] for layer in layers]
            per_arm.setdefault(arm, []).append(row)
    n = min(len(per_arm.get("default", [])), len(per_arm.get("dense", [])))
    paired = {}
    print(
        f"evaluations at step {end // 2} (mid), {before} (before the decay, which starts at {start}) and {end}; "
        f"{n} paired seeds"
    )
    print("| quantity | default MoE (mean) | dense (mean) | MoE - dense, 95% interval | seeds MoE worse |")
    print("| --- | --- | --- | --- | --- |")
    for key in ("val_mid", "val_before", "val_final", "val_gain", "train_before", "train_final", "train_gain"):
        moe = [r[key] for r in per_arm["default"][:n]]
        dense = [r[key] for r in per_arm["dense"][:n]]
        diff = mean_interval([a - b for a, b in zip(moe, dense)])
        worse = sum((a < b) if key.endswith("gain") else (a > b) for a, b in zip(moe, dense))
        paired[key] = {"moe": moe, "dense": dense, "moe_minus_dense": diff.to_dict(), "seeds_moe_worse": worse}
        print(
            f"| {key} | {sum(moe) / n:.4f} | {sum(dense) / n:.4f} | {diff.mean:+.4f} [{diff.lo:+.4f}, {diff.hi:+.4f}] "
            f"| {worse} of {n} |"
        )
    print("\n| step | default MoE val loss (mean) | dense (mean) | MoE - dense, 95% interval |")
    print("| --- | --- | --- | --- |")
    gap_curve = []
    steps = sorted(int(s) for s in per_arm["default"][0]["val_curve"] if int(s) > 0)
    for step in steps:
        moe = [r["val_curve"][str(step)] for r in per_arm["default"][:n]]
        dense = [r["val_curve"][str(step)] for r in per_arm["dense"][:n]]
        diff = mean_interval([a - b for a, b in zip(moe, dense)])
        gap_curve.append(
            {"step": step, "moe": sum(moe) / n, "dense": sum(dense) / n, "moe_minus_dense": diff.to_dict()}
        )
        if step % 100 == 0 or step == before:
            print(
                f"| {step} | {sum(moe) / n:.4f} | {sum(dense) / n:.4f} | {diff.mean:+.4f} [{diff.lo:+.4f}, {diff.hi:+.4f}] |"
            )
    localisation = []  # every seed that has a run of the decay-scope factors
    scope_names = ("decay-ffn-only", "decay-rest-only", "dense-decay-ffn-only", "dense-decay-rest-only")
    for seed in range(100):
        if not any(RunDir(run_dir(out, name, seed)).read_summary() is not None for name in scope_names):
            continue
        for name in ("default", "decay-ffn-only", "decay-rest-only", "no-decay"):
            for arm_name in (name, "dense" if name == "default" else f"dense-{name}"):
                run = run_dir(out, arm_name, seed)
                if RunDir(run).read_summary() is None:
                    continue
                val, _ = curve(run)
                localisation.append({"seed": seed, "run": arm_name, "val_before": val[before], "val_final": val[end]})
    by_run = {(r["seed"], r["run"]): r for r in localisation}
    for r in localisation:  # what the decay itself bought: the gain beyond the same arm's run without decay
        plain = by_run.get((r["seed"], "dense-no-decay" if r["run"].startswith("dense") else "no-decay"))
        r["gain"] = r["val_before"] - r["val_final"]
        r["gain_beyond_no_decay"] = None if plain is None else plain["val_final"] - r["val_final"]
    if localisation:
        print(
            f"\n| seed | run | what decays | val before decay | final | gain, step {before} to {end} | of it, beyond no decay |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in localisation:
            what = FACTORS[r["run"]][0] if r["run"] in FACTORS else r["run"]
            beyond = "" if r["gain_beyond_no_decay"] is None else f"{r['gain_beyond_no_decay']:.4f}"
            print(
                f"| {r['seed']} | {r['run']} | {what} | {r['val_before']:.4f} | {r['val_final']:.4f} | {r['gain']:.4f} "
                f"| {beyond} |"
            )
    no_decay = []  # seeds with both arms trained with and without the decay
    for seed in range(100):
        names = ("no-decay", "dense-no-decay", "default", "dense")
        runs = [run_dir(out, name, seed) for name in names]
        if any(RunDir(run).read_summary() is None for run in runs):
            break
        gains = {}
        for name, run in zip(names, runs):
            val, _ = curve(run)
            gains[name] = val[before] - val[end]
        no_decay.append(
            {
                "seed": seed,
                "moe_gain_no_decay": gains["no-decay"],
                "dense_gain_no_decay": gains["dense-no-decay"],
                "moe_gain_of_the_decay": gains["default"] - gains["no-decay"],
                "dense_gain_of_the_decay": gains["dense"] - gains["dense-no-decay"],
            }
        )
    if no_decay:
        print(f"\nper seed, step {before} to {end}: gain without decay, and what the decay adds to it")
        print("| seed | MoE, no decay | dense, no decay | MoE: the decay's own gain | dense: the decay's own gain |")
        print("| --- | --- | --- | --- | --- |")
        for r in no_decay:
            print(
                f"| {r['seed']} | {r['moe_gain_no_decay']:.4f} | {r['dense_gain_no_decay']:.4f} | "
                f"{r['moe_gain_of_the_decay']:.4f} | {r['dense_gain_of_the_decay']:.4f} |"
            )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "base_overrides": BASE,
            "preset": "small-moe",
            "eval_before_decay": before,
            "decay_start": start,
            "final_step": end,
            "per_seed": per_arm,
            "paired": paired,
            "gap_curve": gap_curve,
            "localisation": localisation,
            "no_decay_seeds": no_decay,
        }
        json_path.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {json_path}")


def confirm(factors: list[str]) -> None:
    for name in factors:
        sets = " ".join(f"--set {o}" for o in FACTORS[name][1] if not o.startswith("@"))
        for budget, extra in (("default", ""), ("flip", "--set train.batch_size=16 --set train.schedule=wsd ")):
            print(
                f"moelab compare {extra}{sets} --tune lr=1.5e-3,3e-3,6e-3 --tune-fraction 0.5 --seeds 3 "
                f"--out runs/recipe/{name}-{budget}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["screen", "table", "confirm", "decay"])
    ap.add_argument("--only", default="", help="comma-separated factors (screen)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (screen); seed 0 is the run named NAME")
    ap.add_argument("--factors", default="", help="comma-separated factors (confirm)")
    ap.add_argument("--out", default="runs/recipe-screen")
    ap.add_argument(
        "--json",
        default=None,
        help="where table / decay write their JSON (default docs/results/recipe-screen.json / recipe-decay.json; '' for none)",
    )
    args = ap.parse_args()
    out = Path(args.out)
    if args.stage == "screen":
        screen(out, [n for n in args.only.split(",") if n] or None, [int(x) for x in args.seeds.split(",")])
    elif args.stage == "table":
        table(out, Path(args.json or "docs/results/recipe-screen.json") if args.json != "" else None)
    elif args.stage == "decay":
        decay_analysis(out, Path(args.json or "docs/results/recipe-decay.json") if args.json != "" else None)
    else:
        confirm([n for n in args.factors.split(",") if n])


if __name__ == "__main__":
    main()
