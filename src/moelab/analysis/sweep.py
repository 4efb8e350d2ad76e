"""Expert count and granularity at fixed active compute: quality against cost, Pareto frontier.

Granularity G follows Krajewski et al. (2024): with the base model's routed active hidden size
A = k * I, a point (E, G) uses experts of hidden size I = A / G and activates k = G of them, so every
point spends the same FLOPs per token on routed experts (plus the router's E * D). E = 1, G = 1 is a
dense FFN in MoE clothing. Shared experts, if the base has them, are kept as they are.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from moelab.analysis.budget import Budget, apply_budget, default_budget, planned_flops
from moelab.analysis.campaign import Campaign, PlannedRun
from moelab.analysis.compare import describe_architecture
from moelab.analysis.curves import pareto_front
from moelab.analysis.runs import campaign_run, inference_tokens_per_s, require_study_packages
from moelab.config import RunConfig
from moelab.errors import MoelabError
from moelab.files import write_atomic

COSTS = [
    ("total_params", "total parameters", False),
    ("peak_memory_bytes", "peak training memory (bytes)", False),
    ("tokens_per_s", "training tokens/s", True),
    ("inference_tokens_per_s", "inference tokens/s (batch 1)", True),
]


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise MoelabError(f"{flag} {text!r} is not allowed: a comma-separated list of integers >= 1, e.g. 1,4,8,16")
    return values


def sweep_points(
    base: RunConfig, experts: list[int], granularities: list[int]
) -> tuple[list[tuple[str, RunConfig]], list[str]]:
    """Configs for every feasible (E, G) and a list of skipped points with the reason."""
    moe = base.model.moe
    if moe is None:
        raise MoelabError("sweep needs an MoE base config (with a [model.moe] section)")
    if moe.routing != "token_choice":
        raise MoelabError("sweep varies top-k; use a token_choice base config")
    active = moe.top_k * moe.expert_hidden
    scale_per_k = moe.route_scale / moe.top_k  # keep the routed output scale per active expert
    points, skipped = [], []
    for G in granularities:
        for E in experts:
            label = f"E{E}-G{G}"
            if active % G:
                skipped.append(f"{label}: active hidden {active} is not divisible by G={G}")
                continue
            if E < G:
                skipped.append(f"{label}: needs at least G={G} experts to activate G of them")
                continue
            cfg = copy.deepcopy(base)
            cfg.model.moe = dataclasses.replace(
                moe, num_experts=E, top_k=G, expert_hidden=active // G, route_scale=scale_per_k * G
            )
            points.append((label, cfg.validate()))
    if not points:
        raise MoelabError("no feasible (E, G) point: " + "; ".join(skipped))
    return points, skipped


def sweep(
    base: RunConfig,
    experts: list[int],
    granularities: list[int],
    out: Path,
    budget: Budget | None = None,
    evals: int = 6,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    points, skipped = sweep_points(base, experts, granularities)
    require_study_packages("moelab sweep", [cfg for _, cfg in points], "matplotlib")
    if budget is None:
        budget = default_budget(base)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    planned_points = [(label, apply_budget(cfg, budget, evals)) for label, cfg in points]
    campaign = Campaign([PlannedRun(label, planned_flops(cfg)) for label, cfg in planned_points], log)
    for label, planned in planned_points:
        run = out / "runs" / label
        summary = campaign_run(campaign, label, planned, run, log, progress)
        moe = planned.model.moe
        rows.append(
            {
                "label": label,
                "experts": moe.num_experts,
                "granularity": moe.top_k,
                "expert_hidden": moe.expert_hidden,
                "architecture": describe_architecture(planned),
                "run": str(run),
                "total_params": summary["params"]["total"],
                "active_params": summary["params"]["active"],
                "train_flops_per_token": summary["train_flops_per_token"],
                "val_loss": summary["val_loss"],
                "tokens_per_s": summary["tokens_per_s"],
                "inference_tokens_per_s": inference_tokens_per_s(run),
                "peak_memory_bytes": summary["peak_memory_bytes"],
            }
        )
    fronts = {}
    for key, _, higher_better in COSTS:
        pts = [((1.0 / r[key]) if higher_better else r[key], r["val_loss"]) for r in rows]
        fronts[key] = [rows[i]["label"] for i in pareto_front(pts)]
    best = min(rows, key=lambda r: r["val_loss"])
    results = {
        "budget": budget.__dict__,
        "budget_text": budget.describe(),
        "rows": rows,
        "pareto": fronts,
        "skipped": skipped,
        "best": best["label"],
    }
    write_atomic(out / "sweep.json", json.dumps(results, indent=1))
    from moelab.analysis.plots import tradeoff_plots
    from moelab.analysis.render import render_sweep

    plots = tradeoff_plots(rows, out, COSTS)
    (out / "report.html").write_text(render_sweep(results, plots))
    return results
