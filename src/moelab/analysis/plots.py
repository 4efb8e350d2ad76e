"""PNG plots for the reports, drawn with matplotlib's object API (no pyplot global state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def new_figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig, fig.add_subplot()


def save(fig, path: Path) -> Path:
    fig.savefig(path)
    return path


def compare_plots(results: dict[str, Any], out: Path) -> list[tuple[Path, str]]:
    """Validation loss against training FLOPs and against training time, one line per model."""
    plots = []
    dense_final = results["models"]["dense"]["val_loss"]
    for key, xlabel, filename, caption in (
        (
            "flops",
            "training FLOPs",
            "loss_vs_flops.png",
            "Validation loss vs training FLOPs (dashed: the dense model's final loss)",
        ),
        ("train_s", "training time (s)", "loss_vs_time.png", "Validation loss vs training wall time"),
    ):
        fig, ax = new_figure()
        for i, (name, r) in enumerate(results["models"].items()):
            c = r["curve"]
            xs, ys = c[key], c["val_loss"]
            points = [(x, y) for x, y in zip(xs, ys) if x > 0]
            if points:
                ax.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    marker="o",
                    ms=3,
                    color=COLORS[i % len(COLORS)],
                    label=f"{name}: {r['architecture']}",
                )
            if key == "flops" and r.get("cooldown_curve"):
                cooled = r["cooldown_curve"]
                ax.plot(
                    cooled["flops"],
                    cooled["val_loss"],
                    ls=":",
                    marker="D",
                    ms=4,
                    color=COLORS[i % len(COLORS)],
                    label=f"{name}: cooled down at smaller budgets",
                )
        ax.axhline(dense_final, color="#555", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        _zoom(ax, [y for r in results["models"].values() for y in r["curve"]["val_loss"][1:]])
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        plots.append((save(fig, out / filename), caption))
    return plots


def tuning_plot(tuning: dict[str, Any], out: Path) -> tuple[Path, str]:
    """Each arm's final tuning loss against its learning rate (one line per value of the other
    tuned settings); the chosen point circled."""
    fig, ax = new_figure()
    for i, (arm, t) in enumerate(tuning.items()):
        color = COLORS[i % len(COLORS)]
        others = sorted({tuple((k, v) for k, v in p["settings"].items() if k != "lr") for p in t["points"]})
        for j, other in enumerate(others):
            pts = sorted(
                (p["settings"]["lr"], p["val_loss"])
                for p in t["points"]
                if tuple((k, v) for k, v in p["settings"].items() if k != "lr") == other and p["val_loss"] is not None
            )
            suffix = (" (" + ", ".join(f"{k} {v:g}" for k, v in other) + ")") if other else ""
            ax.plot(
                [x for x, _ in pts],
                [y for _, y in pts],
                marker="o",
                ms=4,
                ls=["-", "--", ":", "-."][j % 4],
                color=color,
                label=f"{arm}{suffix}",
            )
        ax.scatter(
            [t["best"]["lr"]],
            [t["best_val_loss"]],
            s=140,
            facecolors="none",
            edgecolors=color,
            linewidths=1.5,
            zorder=4,
        )
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss of the tuning run")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    first = next(iter(tuning.values()))
    caption = f"Tuning: final validation loss against learning rate at {first['fraction']:g} of the budget ({first['budget_text']}); circled: each arm's choice"
    return save(fig, out / "tuning.png"), caption


def _zoom(ax, ys: Sequence[float]) -> None:
    """Keep the interesting part of a learning curve: drop the first evaluation's spike."""
    if len(ys) >= 2:
        lo, hi = min(ys), sorted(ys)[int(0.8 * (len(ys) - 1))]
        pad = 0.08 * (hi - lo + 1e-9)
        ax.set_ylim(lo - pad, hi + 4 * pad)


def tradeoff_plots(
    rows: list[dict[str, Any]], out: Path, costs: Sequence[tuple[str, str, bool]]
) -> list[tuple[Path, str]]:
    """Quality (validation loss) against each cost; Pareto-optimal points circled and joined.
    costs: (row key, axis label, higher-is-better) — throughput is converted to seconds per token."""
    from moelab.analysis.curves import pareto_front

    plots = []
    for key, label, higher_better in costs:
        pts = [((1.0 / r[key]) if higher_better else r[key], r["val_loss"]) for r in rows]
        front = pareto_front(pts)
        fig, ax = new_figure(5.2, 3.8)
        for i, r in enumerate(rows):
            ax.scatter(pts[i][0], pts[i][1], color=COLORS[i % len(COLORS)], s=30, zorder=3)
            ax.annotate(r["label"], pts[i], fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.plot(
            [pts[i][0] for i in front],
            [pts[i][1] for i in front],
            color="#2e9e5b",
            lw=1.5,
            zorder=2,
            label="Pareto frontier",
        )
        ax.scatter(
            [pts[i][0] for i in front],
            [pts[i][1] for i in front],
            s=110,
            facecolors="none",
            edgecolors="#2e9e5b",
            zorder=4,
        )
        ax.set_xlabel(("seconds per token (1 / " + label + ")") if higher_better else label)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        name = f"pareto_{key}.png"
        plots.append((save(fig, out / name), f"Validation loss vs {label}; circled: Pareto-optimal"))
    return plots


def scaling_plots(points, law, result, out: Path) -> list[tuple[Path, str]]:
    """Fitted law against the ladder's runs (loss vs active parameters, one line per architecture
    and token budget), extended to the forecast target."""
    import numpy as np

    fig, ax = new_figure()
    budgets = sorted({p.D for p in points})
    n_lo = min(p.N for p in points) / 1.5
    n_hi = max(max(p.N for p in points) * 1.5, result.N * 1.2)
    grid = np.logspace(np.log10(n_lo), np.log10(n_hi), 80)
    moe_E = max(p.E for p in points)
    for i, D in enumerate(budgets):
        color = COLORS[i % len(COLORS)]
        for E, style, marker in ((1.0, "-", "o"), (moe_E, "--", "s")):
            pts = [p for p in points if p.D == D and p.E == E]
            ax.scatter([p.N for p in pts], [p.loss for p in pts], color=color, marker=marker, s=25, zorder=3)
            ax.plot(
                grid,
                law.loss(grid, D, E),
                style,
                color=color,
                lw=1,
                label=f"{'dense' if E == 1 else f'MoE E={E:g}'}, {D:.2g} tokens",
            )
    ax.scatter([result.N], [result.dense], marker="*", s=120, color="black", zorder=4, label="forecast: dense")
    ax.scatter([result.N], [result.moe], marker="*", s=120, color="#d62728", zorder=4, label="forecast: MoE")
    # NOTE: the intervals are drawn as they are, not as errors around the point: they are bootstrap
    # percentiles, and an extrapolated point estimate can lie outside its own interval (matplotlib
    # rejects the negative error that would give).
    for lo, hi in (result.dense_ci, result.moe_ci):
        ax.vlines(result.N, lo, hi, color="#555", lw=1)
        ax.hlines([lo, hi], result.N / 1.04, result.N * 1.04, color="#555", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("active non-embedding parameters")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    plots = [
        (
            save(fig, out / "scaling_fit.png"),
            f"Fitted law (lines) against ladder runs (points); stars: forecast at {result.N:.3g} parameters, {result.D:.3g} tokens (the forecast's own token count; lines use each ladder budget)",
        )
    ]
    fig, ax = new_figure(5.2, 3.6)
    pred = [float(law.loss(p.N, p.D, p.E)) for p in points]
    ax.scatter(pred, [p.loss for p in points], color=COLORS[0])
    lo, hi = min(pred + [p.loss for p in points]), max(pred + [p.loss for p in points])
    ax.plot([lo, hi], [lo, hi], color="#888", lw=0.8)
    ax.set_xlabel("fitted loss")
    ax.set_ylabel("measured loss")
    ax.grid(alpha=0.3)
    plots.append((save(fig, out / "scaling_residuals.png"), "Measured against fitted loss for every ladder run"))
    return plots
