"""The ladder behind a scaling forecast: dense and MoE runs at several widths and token budgets,
trained (or reused), fitted with moelab.analysis.scaling, and extrapolated to a larger budget."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

from moelab.analysis.budget import Budget, apply_budget, planned_flops
from moelab.analysis.campaign import Campaign, PlannedRun
from moelab.analysis.compare import dense_twin
from moelab.analysis.runs import campaign_run, require_study_packages
from moelab.analysis.scaling import Point, backtest, bootstrap, fit_law, forecast
from moelab.config import RunConfig
from moelab.errors import MoelabError
from moelab.files import write_atomic


def _scaled(value: int, factor: float, multiple: int = 8) -> int:
    return max(multiple, int(round(value * factor / multiple)) * multiple)


def scale_width(base: RunConfig, width: int) -> RunConfig:
    """The base model at another width: head size kept, heads, FFN and expert sizes scaled."""
    cfg = copy.deepcopy(base)
    m = cfg.model
    factor = width / m.d_model
    head_dim = m.resolved_head_dim
    if width % head_dim:
        raise MoelabError(f"ladder width {width} is not a multiple of the head size {head_dim}")
    group = m.n_heads // m.kv_heads
    m.n_heads = width // head_dim
    m.n_kv_heads = max(1, m.n_heads // group) if m.n_kv_heads else 0
    m.head_dim = 0 if m.head_dim == 0 else head_dim
    m.d_model = width
    m.ffn_hidden = _scaled(m.ffn_hidden, factor)
    if m.moe is not None:
        shared = _scaled(m.moe.shared_expert_hidden, factor) if m.moe.shared_expert_hidden else 0
        m.moe = dataclasses.replace(
            m.moe, expert_hidden=_scaled(m.moe.expert_hidden, factor), shared_expert_hidden=shared
        )
    return cfg.validate()


def ladder_configs(
    base: RunConfig, widths: list[int], tokens: list[float], evals: int = 4
) -> list[tuple[str, RunConfig]]:
    if base.model.moe is None:
        raise MoelabError("the forecast ladder needs an MoE base config (its dense twin is derived)")
    runs = []
    for width in widths:
        moe = scale_width(base, width)
        for name, cfg in (("dense", dense_twin(moe)), ("moe", moe)):
            for count in tokens:
                label = f"{name}-w{width}-t{count:.3g}"
                runs.append((label, apply_budget(cfg, Budget("tokens", count), evals)))
    return runs


def rung_name(width: int, tokens: float) -> str:
    return f"w{width}-t{tokens:.3g}"


def parse_holdout(text: str, widths: list[int], tokens: list[float]) -> tuple[int, float] | None:
    """The rung --holdout names: 'largest' (the widest model at the most tokens, the default),
    'none', or 'wWIDTH-tTOKENS' (e.g. w128-t2e6) of the ladder. Checked before anything trains."""
    text = text.strip().lower()
    if text == "none":
        return None
    rungs = len(widths) * len(tokens)
    if text == "largest":
        width, count = max(widths), max(tokens)
    else:
        width_text, sep, tokens_text = text.partition("-t")
        try:
            width, count = int(width_text.removeprefix("w")), float(tokens_text)
        except ValueError:
            width, count = -1, math.nan
        known = [rung_name(w, t) for w in widths for t in tokens]
        if (
            not (sep and width_text.startswith("w"))
            or width not in widths
            or not any(math.isclose(count, t, rel_tol=1e-6) for t in tokens)
        ):
            raise MoelabError(
                f"--holdout {text!r} is not a rung of the ladder: one of {', '.join(known)}, 'largest' or 'none'"
            )
        count = next(t for t in tokens if math.isclose(count, t, rel_tol=1e-6))
    if rungs < 5 and text != "largest":
        raise MoelabError(
            f"--holdout {text!r} needs a ladder of at least 5 rungs (widths x tokens) to fit without it; this one has {rungs}"
        )
    return width, count


def run_ladder(
    base: RunConfig,
    widths: list[int],
    tokens: list[float],
    out: Path,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> list[Point]:
    points = []
    configs = ladder_configs(base, widths, tokens)
    # the fit (scipy) and its plots (matplotlib) come after the ladder: refuse before training it
    require_study_packages("moelab forecast", [cfg for _, cfg in configs], "matplotlib", "scipy")
    campaign = Campaign([PlannedRun(label, planned_flops(cfg)) for label, cfg in configs], log)
    for label, cfg in configs:
        summary = campaign_run(campaign, label, cfg, Path(out) / "runs" / label, log, progress)
        vocab = summary["params"]
        moe = cfg.model.moe
        points.append(
            Point(
                N=float(vocab["active_non_embedding"]),
                D=float(summary["tokens"]),
                E=float(moe.num_experts if moe else 1),
                loss=float(summary["val_loss"]),
                label=label,
            )
        )
    return points


def ladder_backtest(points: list[Point], holdout: tuple[int, float] | None, samples: int) -> dict[str, Any] | None:
    """Fit the ladder without its held-out rung and compare the prediction with the rung's runs;
    {"skipped": why} when the rest cannot be fitted."""
    if holdout is None:
        return None
    rung = rung_name(*holdout)
    held = {p.label.split("-", 1)[0]: p for p in points if p.label.endswith("-" + rung)}
    rest = [p for p in points if not p.label.endswith("-" + rung)]
    if set(held) != {"dense", "moe"}:
        return {"skipped": f"the ladder has no dense and MoE run at rung {rung}"}
    try:
        result = backtest(rest, held["dense"], held["moe"], rung, samples=samples)
    except ValueError as exc:
        return {"skipped": f"the ladder without rung {rung} cannot be fitted ({exc}); add widths or token budgets"}
    return result.to_dict()


def forecast_report(
    points: list[Point],
    target_params: float,
    target_tokens: float,
    experts: float,
    samples: int,
    out: Path,
    holdout: tuple[int, float] | None = None,
) -> dict[str, Any]:
    fit = bootstrap(points, fit_law(points), samples=samples)
    result = forecast(fit, points, target_params, target_tokens, experts)
    data = {
        "points": [p.__dict__ for p in points],
        "law": fit.law.to_dict(),
        "spread_95": fit.spread(),
        "r2": fit.r2,
        "rmse_log": fit.rmse_log,
        "bootstrap_fits": len(fit.bootstrap),
        "forecast": result.to_dict(),
        "backtest": ladder_backtest(points, holdout, samples),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "forecast.json", json.dumps(data, indent=1))
    from moelab.analysis.plots import scaling_plots
    from moelab.analysis.render import render_forecast

    plots = scaling_plots(points, fit.law, result, out)
    (out / "report.html").write_text(render_forecast(data, plots))
    return data
