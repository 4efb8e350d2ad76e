"""Dense vs sparse at matched compute: train a dense baseline and MoE variants on the same data, in
the same order, with the same seed and budget, then report quality against cost.

The pairing is explicit: `active` (default) gives the dense model the FLOPs per token of the MoE,
`total` gives it the MoE's total parameter count. The budget is tokens, FLOPs or minutes per model.
The headline number is the compute multiplier: the fraction of the dense model's training FLOPs at
which the MoE first reached the dense model's final validation loss.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable

from moelab.analysis.budget import DEFAULT_EVALS, Budget, apply_budget, default_budget, planned_flops
from moelab.analysis.campaign import Campaign, PlannedRun
from moelab.analysis.curves import compute_multiplier
from moelab.analysis.intervals import (
    Interval,
    judge_gap,
    mean_interval,
    multiplier_interval,
)
from moelab.analysis.runs import (
    campaign_run,
    cooldown_curve,
    cooldown_points,
    eval_curve,
    inference_tokens_per_s,
    require_study_packages,
)
from moelab.analysis.tuning import (
    TuneSpec,
    choose,
    grid_points,
    point_label,
    with_point,
)
from moelab.config import RunConfig
from moelab.errors import MoelabError
from moelab.files import write_atomic


def _moe_ffn_equivalent(cfg: RunConfig) -> tuple[float, float]:
    """(active, total) FFN hidden size per layer of a dense model with the MoE's per-token FLOPs and
    its parameter count, averaged over all layers (dense layers of the MoE model included)."""
    m = cfg.model
    moe = m.moe
    D = m.d_model
    active_sum = total_sum = 0.0
    for layer in range(m.n_layers):
        if m.is_moe_layer(layer):
            extra = moe.num_experts * D + (
                D if moe.num_shared_experts and moe.shared_expert_gate else 0
            )  # router, gate
            active_sum += moe.top_k * moe.expert_hidden + moe.shared_hidden_total + extra / (3 * D)
            total_sum += moe.num_experts * moe.expert_hidden + moe.shared_hidden_total + extra / (3 * D)
        else:
            active_sum += m.ffn_hidden
            total_sum += m.ffn_hidden
    return active_sum / m.n_layers, total_sum / m.n_layers


def dense_twin(cfg: RunConfig, match: str = "active") -> RunConfig:
    """The dense model paired with an MoE config: same everything, every FFN dense, with the
    hidden size that matches the MoE's FLOPs per token (`active`) or its total parameters (`total`)."""
    if cfg.model.moe is None:
        raise MoelabError("the model to compare against a dense twin must be an MoE (it has no [model.moe] section)")
    if match not in ("active", "total"):
        raise MoelabError(
            f"--match {match!r} is not allowed: active (same FLOPs per token) or total (same parameter count)"
        )
    active, total = _moe_ffn_equivalent(cfg)
    twin = copy.deepcopy(cfg)
    twin.model.moe = None
    twin.model.ffn_hidden = max(1, round(active if match == "active" else total))
    return twin.validate()


def seed_run_name(arm: str, seed_index: int, seed: int, settings: dict[str, float] | None = None) -> str:
    """A final run's directory name: the arm, its tuned settings (so that a rerun whose wider grid
    chooses another point trains new runs beside the old ones), and the seed after the first (so that
    a rerun with more seeds reuses the runs it has)."""
    base = f"{arm}-{point_label(settings)}" if settings else arm
    return base if seed_index == 0 else f"{base}-seed{seed}"


def with_seed(cfg: RunConfig, seed: int) -> RunConfig:
    cfg = copy.deepcopy(cfg)
    cfg.train.seed = seed
    return cfg.validate()


TUNE_EVALS = 2  # a tuning run is judged by its final validation loss only


def compare(
    moe_cfgs: list[tuple[str, RunConfig]],
    out: Path,
    budget: Budget | None = None,
    match: str = "active",
    baseline: RunConfig | None = None,
    evals: int = DEFAULT_EVALS,
    log: Callable[[str], None] = print,
    progress: bool = True,
    cooldowns: bool = True,
    tune: TuneSpec | None = None,
    seeds: int = 1,
) -> dict[str, Any]:
    """Train (or reuse) the dense baseline and each MoE variant, then write compare.json, plots and
    report.html into `out`. Returns the comparison as a dict.

    With `tune`, every arm is first searched over its own grid (learning rate at least) at
    `tune.fraction` of the budget, and its final runs use its best point. With `seeds` > 1 the final
    runs repeat over seeds base, base + 1, ... (initialisation and data order; seed i is shared by
    all arms, so the comparison is paired) and the gap and multiplier get 95% intervals."""
    if not moe_cfgs:
        raise MoelabError("compare needs at least one MoE config")
    if not (isinstance(seeds, int) and seeds >= 1):
        raise MoelabError(f"--seeds {seeds!r} is not allowed: the number of seeds per model, an integer >= 1")
    out = Path(out)
    first_name, first = moe_cfgs[0]
    dense = baseline if baseline is not None else dense_twin(first, match)
    if dense.model.moe is not None:
        raise MoelabError("the baseline config must be dense (no [model.moe] section)")
    if budget is None:
        budget = default_budget(first)
    arms = [("dense", dense)] + moe_cfgs
    for name, cfg in arms[1:]:
        if cfg.data != dense.data or cfg.train.seed != dense.train.seed:
            raise MoelabError(
                f"variant {name} must use the same data and seed as the baseline (set them with --set for all models)"
            )
    base_seed = dense.train.seed
    seed_list = [base_seed + i for i in range(seeds)]
    # Everything that can be refused is refused before the output directory is touched.
    # NOTE: scipy gives the intervals over seeds, so one seed does without it.
    require_study_packages("moelab compare", [cfg for _, cfg in arms], "matplotlib", *(("scipy",) if seeds > 1 else ()))
    grids = {name: tune.grid_for(cfg) for name, cfg in arms} if tune is not None else {}
    tune_budget = Budget(budget.kind, budget.amount * tune.fraction) if tune is not None else None
    tuning_runs = (
        [
            (arm, point, f"{arm}-{point_label(point)}", apply_budget(with_point(cfg, point), tune_budget, TUNE_EVALS))
            for arm, cfg in arms
            for point in grid_points(grids.get(arm, {}))
        ]
        if tune is not None
        else []
    )
    planned = [(name, apply_budget(cfg, budget, evals)) for name, cfg in arms]
    finals = [(name, i, seed_run_name(name, i, s)) for name, _ in planned for i, s in enumerate(seed_list)]
    campaign = Campaign(
        [PlannedRun(f"tune/{label}", planned_flops(cfg)) for _, _, label, cfg in tuning_runs]
        + [PlannedRun(run, planned_flops(dict(planned)[arm])) for arm, _, run in finals],
        log,
    )

    out.mkdir(parents=True, exist_ok=True)

    def write_plan(chosen: dict[str, dict[str, float]]) -> None:
        """plan.json: every run; a tuned arm's final runs get their paths once its tuning has chosen."""
        finals_plan = []
        for arm, i, run in finals:
            known = tune is None or arm in chosen
            path = out / "runs" / seed_run_name(arm, i, seed_list[i], chosen.get(arm))
            finals_plan.append(
                {
                    "name": run,
                    "stage": "final",
                    "arm": arm,
                    "seed": seed_list[i],
                    "settings": chosen.get(arm) if tune is not None else "the arm's config (untuned)",
                    "path": str(path) if known else None,  # None: chosen by tuning, ARM-<settings>[-seedS]
                }
            )
        tuning_plan = [
            {
                "name": f"tune/{label}",
                "stage": "tune",
                "arm": arm,
                "settings": point,
                "path": str(out / "runs" / "tune" / label),
                "config": cfg.to_dict(),
            }
            for arm, point, label, cfg in tuning_runs
        ]
        plan = {
            "budget": budget.__dict__,
            "match": match,
            "seeds": seed_list,
            "tune": tune.to_dict() if tune is not None else None,
            "models": {n: c.to_dict() for n, c in planned},
            "runs": tuning_plan + finals_plan,
        }
        write_atomic(out / "plan.json", json.dumps(plan, indent=1))

    write_plan({})

    results: dict[str, Any] = {
        "budget": budget.__dict__,
        "budget_text": budget.describe(),
        "match": match,
        "seeds": seed_list,
        "tuned": tune is not None,
        "tuning": {},
        "caveats": [],
        "models": {},
    }
    chosen: dict[str, dict[str, float]] = {}
    for arm, cfg in arms:
        if tune is None:
            continue
        points = []
        for a, point, label, tcfg in tuning_runs:
            if a != arm:
                continue
            summary = campaign_run(campaign, f"tune/{label}", tcfg, out / "runs" / "tune" / label, log, progress)
            finished = summary.get("stopped_by") == "max_steps" and math.isfinite(summary.get("val_loss", math.nan))
            points.append((point, summary["val_loss"] if finished else math.inf))
        choice = choose(arm, points, grids[arm])
        chosen[arm] = choice.best
        results["tuning"][arm] = {
            "grid": {k: list(v) for k, v in grids[arm].items()},
            "points": [{"settings": p, "val_loss": (loss if math.isfinite(loss) else None)} for p, loss in points],
            "best": choice.best,
            "best_val_loss": choice.best_loss,
            "fraction": tune.fraction,
            "budget_text": tune_budget.describe(),
            "warnings": list(choice.warnings),
        }
        results["caveats"] += list(choice.warnings)
    if tune is not None:
        write_plan(chosen)
    else:
        settings = f"lr {dense.train.lr:g}, batch {dense.train.batch_size}, schedule {dense.train.schedule}"
        results["caveats"].append(
            f"Untuned: every model trained with the same settings ({settings}); a comparison is only as good as its "
            "worse-tuned arm, and a better-tuned dense model can flip this verdict. Rerun with --tune."
        )
    if seeds == 1:
        results["caveats"].append(
            "One seed: no interval on the gap or the multiplier; differences of a few hundredths of a nat can be seed noise. Rerun with --seeds 3 or more."
        )

    per_seed: dict[str, list[dict[str, Any]]] = {}
    originals = dict(arms)
    for name, cfg in planned:
        final_cfg = apply_budget(with_point(originals[name], chosen[name]), budget, evals) if name in chosen else cfg
        per_seed[name] = []
        for i, seed in enumerate(seed_list):
            run_cfg = with_seed(final_cfg, seed)
            display = seed_run_name(name, i, seed)  # as in plan.json and the progress lines
            run_name = seed_run_name(name, i, seed, chosen.get(name))
            run = out / "runs" / run_name
            wsd_branches = cooldowns and run_cfg.train.schedule == "wsd" and run_cfg.model.moe is not None
            branch_steps = frozenset(start for _, start in cooldown_points(run_cfg)) if wsd_branches else frozenset()
            summary = campaign_run(campaign, display, run_cfg, run, log, progress, branch_steps)
            flops, seconds, losses = eval_curve(run)
            entry = {
                "seed": seed,
                "run": str(run),
                "summary": summary,
                "curve": {"flops": flops, "train_s": seconds, "val_loss": losses},
            }
            if wsd_branches:
                # NOTE: mid-run points of a WSD run have not decayed their learning rate, so they
                # understate what a run with that smaller budget reaches. Cooled-down branches measure it.
                cooled = cooldown_curve(run_name, run_cfg, run, out / "runs", log, progress)
                entry["cooldown_curve"] = {"flops": [f for f, _ in cooled], "val_loss": [v for _, v in cooled]}
            per_seed[name].append(entry)
        results["models"][name] = _model_entry(name, final_cfg, per_seed[name], chosen.get(name))

    base_seeds = per_seed["dense"]
    for name, _ in planned[1:]:
        r = results["models"][name]
        gaps, mults = [], []
        for d, m in zip(base_seeds, per_seed[name]):
            gaps.append(m["summary"]["val_loss"] - d["summary"]["val_loss"])
            curve = m.get("cooldown_curve", m["curve"])
            mults.append(
                compute_multiplier(d["curve"]["flops"], d["curve"]["val_loss"], curve["flops"], curve["val_loss"])
            )
        gap, mult = mean_interval(gaps), multiplier_interval(mults)
        c, b = r["curve"], results["models"]["dense"]["curve"]
        r["compute_multiplier_curve"] = compute_multiplier(b["flops"], b["val_loss"], c["flops"], c["val_loss"])
        r["multiplier_method"] = "cooldown branches" if "cooldown_curve" in per_seed[name][0] else "evaluation curve"
        r["compute_multiplier"] = mult.mean if math.isfinite(mult.mean) else None
        r["compute_multiplier_seeds"] = mults
        r["compute_multiplier_interval"] = mult.to_dict()
        r["loss_gap"] = gap.mean
        r["loss_gap_seeds"] = gaps
        r["loss_gap_interval"] = gap.to_dict()
        r["verdict"] = judge_gap(gap)
    results["verdicts"] = verdicts(results)
    write_atomic(out / "compare.json", json.dumps(results, indent=1))
    from moelab.analysis.plots import compare_plots, tuning_plot
    from moelab.analysis.render import render_compare

    plots = compare_plots(results, out)
    if results["tuning"]:
        plots.append(tuning_plot(results["tuning"], out))
    (out / "report.html").write_text(render_compare(results, plots))
    return results


def _model_entry(
    name: str, cfg: RunConfig, seed_runs: list[dict[str, Any]], tuned: dict[str, float] | None
) -> dict[str, Any]:
    """One arm of the comparison: costs from its first seed's run, losses averaged over seeds."""
    first = seed_runs[0]
    summary = first["summary"]
    losses = [s["summary"]["val_loss"] for s in seed_runs]
    mean_loss = math.fsum(losses) / len(losses)
    curves = [s["curve"] for s in seed_runs]
    # Every seed evaluates at the same steps, so the curves average point by point.
    length = min(len(c["val_loss"]) for c in curves)
    mean_curve = {
        "flops": curves[0]["flops"][:length],
        "train_s": curves[0]["train_s"][:length],
        "val_loss": [math.fsum(c["val_loss"][i] for c in curves) / len(curves) for i in range(length)],
    }
    entry = {
        "run": first["run"],
        "runs": [s["run"] for s in seed_runs],
        "kind": "dense" if cfg.model.moe is None else "moe",
        "architecture": describe_architecture(cfg),
        "settings": {
            "lr": cfg.train.lr,
            "batch_size": cfg.train.batch_size,
            "schedule": cfg.train.schedule,
            "decay_fraction": cfg.train.decay_fraction,
        },
        "tuned_settings": tuned,
        "total_params": summary["params"]["total"],
        "active_params": summary["params"]["active"],
        "train_flops_per_token": summary["train_flops_per_token"],
        "train_flops": summary["flops"],
        "tokens": summary["tokens"],
        "tokens_per_s": summary["tokens_per_s"],
        "train_s": summary["train_s"],
        "wall_s": summary["wall_s"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "val_loss": mean_loss,
        "val_loss_seeds": losses,
        "val_ppl": math.exp(min(mean_loss, 50.0)),
        "inference_tokens_per_s": inference_tokens_per_s(Path(first["run"])),
        "curve": mean_curve,
        "seed_curves": curves,
    }
    if "cooldown_curve" in first:
        cooled = [s["cooldown_curve"] for s in seed_runs]
        entry["cooldown_curve"] = {
            "flops": cooled[0]["flops"],
            "val_loss": [
                math.fsum(c["val_loss"][i] for c in cooled) / len(cooled) for i in range(len(cooled[0]["val_loss"]))
            ],
        }
    return entry


def describe_architecture(cfg: RunConfig) -> str:
    m = cfg.model
    base = f"{m.n_layers}L d{m.d_model}"
    if m.moe is None:
        return f"{base} dense FFN {m.ffn_hidden}"
    moe = m.moe
    parts = [f"E={moe.num_experts} k={moe.top_k} I={moe.expert_hidden}"]
    if moe.num_shared_experts:
        parts.append(f"+{moe.num_shared_experts} shared ({moe.shared_expert_hidden or moe.expert_hidden})")
    if moe.routing == "expert_choice":
        parts.append("expert choice")
    return f"{base} MoE " + " ".join(parts)


def verdicts(results: dict[str, Any]) -> dict[str, dict[str, str]]:
    """One plain sentence per MoE variant, following the interval of its final-loss gap when there
    are several seeds, and whether it is good or bad news."""
    base = results["models"]["dense"]
    out = {}
    for name, r in results["models"].items():
        if name == "dense":
            continue
        gap = Interval(**r["loss_gap_interval"]) if "loss_gap_interval" in r else Interval(r["loss_gap"], None, None, 1)
        mult_iv = Interval(**r["compute_multiplier_interval"]) if "compute_multiplier_interval" in r else None
        mult = r["compute_multiplier"]
        verdict = judge_gap(gap)
        if verdict == "single":
            out[name] = _single_seed_verdict(name, r, base, mult)
            continue
        n = gap.n
        interval_text = f"95% interval [{gap.lo:+.4f}, {gap.hi:+.4f}], paired over {n} seeds"
        mult_text = "" if mult_iv is None else f"compute multiplier {mult_iv.text('{:.2f}')}"
        if verdict == "wins":
            text = (
                f"{name} WINS: its final validation loss is {-gap.mean:.4f} nats below the dense model's "
                f"(gap MoE - dense {gap.mean:+.4f}, {interval_text}); "
                f"{mult_text}: it reached the dense model's final loss with {mult:.0%} of the dense training FLOPs."
            )
            kind = "good"
        elif verdict == "loses":
            text = (
                f"{name} LOSES to the dense model: its final validation loss is {gap.mean:.4f} nats above the dense model's "
                f"(gap MoE - dense {gap.mean:+.4f}, {interval_text}). "
                f"At this budget, sparsity did not pay off."
            )
            kind = "bad"
        else:
            text = (
                f"This budget cannot tell {name} and the dense model apart: the final-loss gap (MoE - dense) is "
                f"{gap.mean:+.4f} nats with a 95% interval [{gap.lo:+.4f}, {gap.hi:+.4f}] (paired over {n} seeds) that contains 0. "
                "More seeds or a larger budget are needed for a verdict."
            )
            kind = "warn"
        out[name] = {"text": text, "kind": kind}
    return out


def _single_seed_verdict(name: str, r: dict[str, Any], base: dict[str, Any], mult: float | None) -> dict[str, str]:
    if mult is None:
        text = (
            f"{name} did NOT reach the dense model's final validation loss ({base['val_loss']:.4f}) within the same budget: "
            f"it ended at {r['val_loss']:.4f} ({r['loss_gap']:+.4f}). At this budget, sparsity did not pay off."
        )
        kind = "bad"
    elif mult <= 1.0:
        text = (
            f"{name} reached the dense model's final validation loss ({base['val_loss']:.4f}) with {mult:.0%} of the dense "
            f"training FLOPs (compute multiplier {mult:.2f}) and ended {abs(r['loss_gap']):.4f} nats lower."
        )
        kind = "good" if mult <= 0.9 else "warn"
    else:
        text = f"{name} needed {mult:.2f}x the dense training FLOPs to match the dense model: sparsity did not pay off."
        kind = "bad"
    return {"text": text + " (one seed: no interval)", "kind": kind}
