"""PNG plots of `moelab diagnose`: expert-load heatmaps, balance, entropy, router logits, loss and
gradient norm with spikes and rollbacks marked. matplotlib's object API only (no pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moelab.analysis.diagnose import Diagnosis, alert_layer, layer_series
from moelab.analysis.plots import COLORS, save

LAYERS_PER_HEATMAP = 4  # heatmaps per figure, so deep models give several readable figures


def _figure(rows: int, width: float = 9.0, row_height: float = 2.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, row_height * rows + 0.6), dpi=110, layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _finite_pts(steps: list[int], values: list[Any]) -> tuple[list[int], list[float]]:
    pts = [(s, float(v)) for s, v in zip(steps, values) if isinstance(v, (int, float)) and math.isfinite(v)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _mark_layer_alerts(ax, d: Diagnosis, layer: int | None, rules: tuple[str, ...]) -> None:
    """Small labelled ticks at the steps where the given rules fired (for `layer`, or any layer)."""
    for a in d.alerts:
        if a.get("rule") in rules and (layer is None or alert_layer(a) == layer):
            ax.axvline(a["step"], color="#d93025", lw=0.8, ls=":", alpha=0.8)


def loss_plot(d: Diagnosis, out: Path) -> tuple[Path, str]:
    fig, (ax_loss, ax_grad) = _figure(2, row_height=2.8)
    steps = [r["step"] for r in d.train]
    ax_loss.plot(steps, [r["loss"] for r in d.train], color=_color(0), lw=1.2, label="train loss (interval mean)")
    if d.abandoned:
        ax_loss.scatter(
            [r["step"] for r in d.abandoned],
            [r["loss"] for r in d.abandoned],
            s=10,
            color="#999",
            label="undone by a rollback",
            zorder=2,
        )
    evals = [r for r in d.evals if isinstance(r.get("val_loss"), (int, float))]
    if evals:
        ax_loss.plot(
            [r["step"] for r in evals],
            [r["val_loss"] for r in evals],
            "o-",
            ms=3,
            lw=1,
            color=_color(1),
            label="validation loss",
        )
    grads = [
        (r["step"], r["grad_norm"])
        for r in d.train
        if isinstance(r.get("grad_norm"), (int, float)) and r["grad_norm"] > 0
    ]
    if grads:
        ax_grad.plot(
            [g[0] for g in grads],
            [g[1] for g in grads],
            color=_color(2),
            lw=1.2,
            label="grad norm (last step of interval)",
        )
    gmax = [
        (r["step"], r["grad_norm_max"])
        for r in d.train
        if isinstance(r.get("grad_norm_max"), (int, float)) and r["grad_norm_max"] > 0
    ]
    if gmax:
        ax_grad.plot(
            [g[0] for g in gmax],
            [g[1] for g in gmax],
            color=_color(2),
            lw=0.8,
            alpha=0.45,
            label="grad norm (max over interval)",
        )
    spread = [g[1] for g in grads + gmax]
    if spread and max(spread) > 20 * min(spread):  # log scale only where it helps: early norms can be 100x later ones
        ax_grad.set_yscale("log")
    for rule, ax, label in (("loss_spike", ax_loss, "loss spike"), ("grad_spike", ax_grad, "grad-norm spike")):
        hits = [a for a in d.alerts if a.get("rule") == rule and isinstance(a.get("value"), (int, float))]
        if hits:
            ax.scatter(
                [a["step"] for a in hits],
                [a["value"] for a in hits],
                marker="^",
                s=60,
                color="#d93025",
                zorder=4,
                label=label,
            )
    nans = [a["step"] for a in d.alerts if a.get("rule") == "nan"]
    for ax in (ax_loss, ax_grad):
        for i, step in enumerate(nans):
            ax.axvline(
                step, color="#d93025", lw=1.0, alpha=0.6, label="non-finite step" if i == 0 and ax is ax_loss else None
            )
        for i, r in enumerate(d.rollbacks):
            ax.axvline(
                r["step"], color="#7b1fa2", ls="--", lw=1.2, label="rollback" if i == 0 and ax is ax_loss else None
            )
    last = max([r["step"] for r in d.train + d.evals + d.rollbacks + d.stops] or [1])

    def label(step: int, text: str, row: int, color: str) -> None:
        # Text right of the line, or left of it near the right edge so it is not cut off.
        right = step > 0.8 * last
        ax_loss.annotate(
            text,
            (step, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(-3 if right else 3, -12 - 10 * row),
            textcoords="offset points",
            fontsize=7,
            color=color,
            ha="right" if right else "left",
        )

    for i, r in enumerate(d.rollbacks):
        label(r["step"], f"rollback to {r.get('to_step', '?')}", i % 3, "#7b1fa2")
    for r in d.stops:
        ax_loss.axvline(r["step"], color="black", lw=1.2)
        label(r["step"], "stopped", 3, "black")
    ys = [r["loss"] for r in d.train if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])] + [
        r["val_loss"] for r in evals
    ]
    if len(ys) > 4:  # the first intervals sit far above the rest; keep the interesting range
        lo, hi = min(ys), sorted(ys)[int(0.9 * (len(ys) - 1))]
        ax_loss.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.35 * (hi - lo + 1e-9))
    ax_loss.set_ylabel("loss (nats/token)")
    ax_grad.set_ylabel("gradient norm")
    ax_grad.set_xlabel("step")
    for ax in (ax_loss, ax_grad):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    return save(
        fig, out / "loss.png"
    ), "Loss and gradient norm; spikes (triangles), non-finite steps (red lines) and rollbacks (dashed) marked"


def load_heatmaps(d: Diagnosis, out: Path) -> list[tuple[Path, str]]:
    from matplotlib.colors import TwoSlopeNorm

    layers = [ld.layer for ld in d.layers]
    E, k = d.info.num_experts, max(d.info.top_k, 1)
    plots = []
    for chunk_start in range(0, len(layers), LAYERS_PER_HEATMAP):
        chunk = layers[chunk_start : chunk_start + LAYERS_PER_HEATMAP]
        fig, axes = _figure(len(chunk), row_height=max(1.6, 0.16 * E + 0.9))
        mesh = None
        for ax, layer in zip(axes, chunk):
            steps, shares = layer_series(d.train, layer, "share")
            rows = [(s, v) for s, v in zip(steps, shares) if isinstance(v, list) and v]
            if not rows:
                ax.text(0.5, 0.5, "no expert shares logged", ha="center", va="center", transform=ax.transAxes)
                continue
            n = max(len(v) for _, v in rows)
            grid = [[(v[e] * n if e < len(v) else float("nan")) for _, v in rows] for e in range(n)]
            top = max(2.0, n / k)
            mesh = ax.pcolormesh(
                [s for s, _ in rows],
                list(range(n)),
                grid,
                shading="nearest",
                cmap="RdBu_r",
                norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top),
            )
            ax.set_ylabel(f"layer {layer}\nexpert")
            if n <= 16:
                ax.set_yticks(range(n))
                ax.tick_params(axis="y", labelsize=6)
            _mark_layer_alerts(ax, d, layer, ("collapse", "dead_experts"))
        axes[-1].set_xlabel("step")
        if mesh is not None:
            fig.colorbar(mesh, ax=axes, label="share x E (1 = fair share)", shrink=0.9)
        name = f"load_heatmap_{chunk[0]}.png"
        caption = f"Expert load over time, layers {', '.join(map(str, chunk))}: share of routed slots x E (white = fair share; dotted: collapse / dead-expert alerts)"
        plots.append((save(fig, out / name), caption))
    return plots


def _per_layer(ax, d: Diagnosis, name: str, scale: float = 1.0) -> bool:
    drawn = False
    for i, ld in enumerate(d.layers):
        steps, values = _finite_pts(*layer_series(d.train, ld.layer, name))
        if steps:
            ax.plot(steps, [v / scale for v in values], color=_color(i), lw=1.1, label=f"layer {ld.layer}")
            drawn = True
    if drawn:
        ax.legend(fontsize=7, ncol=min(4, len(d.layers)), loc="best")
    else:
        ax.text(
            0.5, 0.5, f"{name} not logged by this run", ha="center", va="center", transform=ax.transAxes, fontsize=8
        )
    ax.grid(alpha=0.3)
    return drawn


def balance_plot(d: Diagnosis, out: Path) -> tuple[Path, str]:
    E, k = d.info.num_experts, max(d.info.top_k, 1)
    cfg = d.info.monitor
    fig, (ax_imb, ax_eff, ax_cv) = _figure(3, row_height=2.4)
    _per_layer(ax_imb, d, "imbalance")
    ax_imb.axhline(E / k, color="#555", ls="--", lw=0.8)
    ax_imb.annotate(
        f"E/k = {E / k:g}: all on k experts",
        (0.0, E / k),
        xycoords=("axes fraction", "data"),
        xytext=(3, -10),
        textcoords="offset points",
        fontsize=7,
        color="#555",
    )
    ax_imb.set_ylabel("max / mean load")
    if not _per_layer(ax_eff, d, "effective_experts"):
        # Older runs: compute from the shares.
        from moelab.model.health import effective_experts

        for i, ld in enumerate(d.layers):
            steps, shares = layer_series(d.train, ld.layer, "share")
            ax_eff.plot(
                steps, [effective_experts(s) for s in shares], color=_color(i), lw=1.1, label=f"layer {ld.layer}"
            )
    line = E - cfg.collapse_score * (E - k)
    ax_eff.axhline(line, color="#d93025", ls="--", lw=0.9)
    ax_eff.annotate(
        f"collapse below {line:.2g} (score {cfg.collapse_score:g})",
        (0.0, line),
        xycoords=("axes fraction", "data"),
        xytext=(3, -10),
        textcoords="offset points",
        fontsize=7,
        color="#d93025",
    )
    ax_eff.set_ylim(0, E * 1.05)
    ax_eff.set_ylabel("effective experts")
    _mark_layer_alerts(ax_eff, d, None, ("collapse",))
    _per_layer(ax_cv, d, "cv")
    ax_cv.set_ylabel("coefficient of variation")
    ax_cv.set_xlabel("step")
    return (
        save(fig, out / "balance.png"),
        "Load balance per layer: max/mean load, effective number of experts (dotted: collapse alerts) and coefficient of variation",
    )


def entropy_plot(d: Diagnosis, out: Path) -> tuple[Path, str]:
    E = d.info.num_experts
    lnE = math.log(E) if E > 1 else 1.0
    fig, (ax_tok, ax_mean) = _figure(2, row_height=2.4)
    _per_layer(ax_tok, d, "entropy", lnE)
    ax_tok.set_ylabel("per-token entropy / ln E")
    _per_layer(ax_mean, d, "marginal_entropy", lnE)
    ax_mean.set_ylabel("mean-routing entropy / ln E")
    ax_mean.set_xlabel("step")
    for ax in (ax_tok, ax_mean):
        ax.set_ylim(0, 1.05)
    return save(
        fig, out / "entropy.png"
    ), "Router entropy as a fraction of ln E: per token (confidence) and of the mean routing distribution (spread)"


def logit_plot(d: Diagnosis, out: Path) -> tuple[Path, str]:
    cfg = d.info.monitor
    fig, (ax_z, ax_max) = _figure(2, row_height=2.4)
    _per_layer(ax_z, d, "z_loss")
    ax_z.set_ylabel("router z-loss")
    _per_layer(ax_max, d, "max_logit")
    top = max([1e-3] + [v for ld in d.layers for v in _finite_pts(*layer_series(d.train, ld.layer, "max_logit"))[1]])
    if top >= 0.3 * cfg.logit_growth:
        ax_max.axhline(cfg.logit_growth, color="#d93025", ls="--", lw=0.9)
        ax_max.annotate(
            f"alert above {cfg.logit_growth:g}",
            (0.0, cfg.logit_growth),
            xycoords=("axes fraction", "data"),
            xytext=(3, -10),
            textcoords="offset points",
            fontsize=7,
            color="#d93025",
        )
        ax_max.set_ylim(0, max(top, cfg.logit_growth) * 1.1)
    else:  # far below the limit: drawing it would flatten the curves into the axis
        ax_max.set_ylim(0, top * 1.3)
        ax_max.annotate(
            f"alert limit {cfg.logit_growth:g} is off the scale",
            (0.0, 1.0),
            xycoords="axes fraction",
            xytext=(3, -10),
            textcoords="offset points",
            fontsize=7,
            color="#d93025",
        )
    ax_max.set_ylabel("max router logit")
    ax_max.set_xlabel("step")
    _mark_layer_alerts(ax_max, d, None, ("logit_growth",))
    return save(
        fig, out / "logits.png"
    ), "Router z-loss and the largest router logit per layer (dashed: the logit-growth limit)"


def experts_plot(d: Diagnosis, out: Path) -> tuple[Path, str]:
    fig, (ax_dead, ax_drop, ax_sim) = _figure(3, row_height=2.2)
    _per_layer(ax_dead, d, "dead")
    ax_dead.set_ylabel("dead experts")
    _per_layer(ax_drop, d, "dropped_frac", 0.01)
    ax_drop.set_ylabel("dropped slots (%)")
    _per_layer(ax_sim, d, "similarity_max")
    ax_sim.set_ylabel("max expert similarity")
    ax_sim.set_xlabel("step")
    return save(
        fig, out / "experts.png"
    ), "Dead experts, slots dropped by capacity, and the cosine similarity of the most similar pair of experts"


def diagnose_plots(d: Diagnosis, out: Path) -> dict[str, list[tuple[Path, str]]]:
    """Every plot of the report, written as PNGs into `out`: (path, caption) pairs by report section
    (training, load, router)."""
    plots: dict[str, list[tuple[Path, str]]] = {"training": [loss_plot(d, out)] if d.train or d.evals else []}
    if d.layers:
        plots["load"] = load_heatmaps(d, out)
        plots["router"] = [balance_plot(d, out), entropy_plot(d, out), logit_plot(d, out), experts_plot(d, out)]
    return plots
