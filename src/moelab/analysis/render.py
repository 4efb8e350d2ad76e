"""Terminal tables and HTML pages for compare and sweep results."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from moelab.analysis import report
from moelab.train.progress import format_count, format_duration


def _mult(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f}"


COMPARE_HEADERS = [
    "model",
    "architecture",
    "lr",
    "total params",
    "active params",
    "train FLOPs/token",
    "train tok/s",
    "wall time",
    "peak memory",
    "val loss",
    "val ppl",
    "infer tok/s (batch 1)",
    "compute multiplier",
]


def _loss_cell(r: dict[str, Any]) -> str:
    losses = r.get("val_loss_seeds") or [r["val_loss"]]
    if len(losses) < 2:
        return f"{r['val_loss']:.4f}"
    return f"{r['val_loss']:.4f} (sd {statistics.stdev(losses):.4f}, {len(losses)} seeds)"


def _mult_cell(r: dict[str, Any]) -> str:
    text = _mult(r.get("compute_multiplier"))
    iv = r.get("compute_multiplier_interval")
    if iv and iv["lo"] is not None:
        text += f" [{iv['lo']:.2f}, " + ("not reached" if iv["hi"] is None else f"{iv['hi']:.2f}") + "]"
    if r.get("multiplier_method") == "cooldown branches":
        text += " (cooldowns)"
    return text


def compare_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, r in results["models"].items():
        lr = r.get("settings", {}).get("lr")
        rows.append(
            [
                name,
                r["architecture"],
                "-" if lr is None else f"{lr:g}" + (" (tuned)" if r.get("tuned_settings") else ""),
                format_count(r["total_params"]),
                format_count(r["active_params"]),
                format_count(r["train_flops_per_token"]),
                format_count(r["tokens_per_s"]),
                format_duration(r["wall_s"]),
                f"{r['peak_memory_bytes'] / 2**20:.0f} MiB",
                _loss_cell(r),
                f"{r['val_ppl']:.2f}",
                f"{r['inference_tokens_per_s']:.0f}",
                "baseline" if name == "dense" else _mult_cell(r),
            ]
        )
    return rows


TUNING_HEADERS = ["model", "settings", "final val loss", ""]


def tuning_rows(tuning: dict[str, Any]) -> list[list[str]]:
    rows = []
    for arm, t in tuning.items():
        for p in t["points"]:
            chosen = p["settings"] == t["best"]
            settings = ", ".join(f"{k} {v:g}" for k, v in p["settings"].items())
            loss = "diverged" if p["val_loss"] is None else f"{p['val_loss']:.4f}"
            rows.append([arm, settings, loss, "<- chosen" if chosen else ""])
    return rows


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _setup_line(results: dict[str, Any]) -> str:
    seeds = results.get("seeds", [0])
    pairing = "active compute" if results["match"] == "active" else "total parameters"
    tuned = "each model tuned on its own grid" if results.get("tuned") else "untuned (shared settings)"
    return f"budget: {results['budget_text']}, pairing: matched {pairing}, {tuned}, {len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))})"


def compare_text(results: dict[str, Any]) -> str:
    lines = [_setup_line(results), ""]
    if results.get("tuning"):
        first = next(iter(results["tuning"].values()))
        lines += [
            f"tuning at {first['fraction']:g} of the budget ({first['budget_text']}):",
            text_table(TUNING_HEADERS, tuning_rows(results["tuning"])),
            "",
        ]
    lines.append(text_table(COMPARE_HEADERS, compare_rows(results)))
    lines.append("")
    lines += [v["text"] for v in results["verdicts"].values()]
    lines += [f"NOTE: {c}" for c in results.get("caveats", [])]
    return "\n".join(lines)


def render_compare(results: dict[str, Any], plots: list[tuple[Path, str]]) -> str:
    pairing = (
        "matched active compute (same FLOPs per token)" if results["match"] == "active" else "matched total parameters"
    )
    verdict_html = "".join(report.verdict(v["text"], v["kind"]) for v in results["verdicts"].values())
    verdict_html += "".join(report.verdict(c, "warn") for c in results.get("caveats", []))
    notes = report.paragraph(
        "Compute multiplier: the fraction of the dense model's training FLOPs at which the MoE first reached the dense "
        "model's final validation loss, interpolated between evaluations. Below 1, the MoE buys the dense quality for "
        "less compute; 'not reached' means it never got there within its budget. With several seeds, seed i of every "
        "model shares its initialisation seed and data order, so the comparison is paired: the final-loss gap gets a 95% "
        "Student-t interval over the per-seed gaps, the multiplier the same on the log scale (its value is the geometric "
        "mean over seeds), and the verdict follows the gap's interval. Losses in the table are means over seeds. "
        "With a warmup-stable-decay schedule "
        "the mid-run evaluations are taken before the learning rate decays, so they understate what a shorter run "
        "reaches: the MoE is then also cooled down from its stable phase at 50%, 62.5%, 75% and 87.5% of the budget "
        "(branches that decay over the schedule's decay fraction, exactly as a run with that budget would) and the "
        "multiplier is read on those cooled-down losses ('cooldowns'); the evaluation-curve value is kept in compare.json."
    )
    sections = [("", verdict_html)]
    if results.get("tuning"):
        first = next(iter(results["tuning"].values()))
        sections.append(
            (
                "Tuning",
                report.paragraph(
                    f"Every model was trained at each point of its own grid with {first['fraction']:g} of the budget "
                    f"({first['budget_text']}, a complete shorter run of its schedule, seed {results['seeds'][0]}); its final runs use "
                    "the point with the lowest final validation loss."
                )
                + report.table(TUNING_HEADERS, tuning_rows(results["tuning"])),
            )
        )
    sections += [
        ("Models", report.table(COMPARE_HEADERS, compare_rows(results)) + notes),
        ("Learning curves and tuning", report.figures(plots)),
    ]
    return report.page("moelab compare: dense vs sparse", _setup_line(results) + f"; {pairing}", sections)


SWEEP_HEADERS = [
    "point",
    "E",
    "G (=k)",
    "I",
    "total params",
    "val loss",
    "train tok/s",
    "infer tok/s",
    "peak memory",
    "Pareto-optimal for",
]


def sweep_rows(results: dict[str, Any]) -> list[list[str]]:
    names = {
        "total_params": "params",
        "peak_memory_bytes": "memory",
        "tokens_per_s": "train speed",
        "inference_tokens_per_s": "infer speed",
    }
    rows = []
    for r in results["rows"]:
        optimal = [names[k] for k, labels in results["pareto"].items() if r["label"] in labels]
        rows.append(
            [
                r["label"],
                str(r["experts"]),
                str(r["granularity"]),
                str(r["expert_hidden"]),
                format_count(r["total_params"]),
                f"{r['val_loss']:.4f}",
                format_count(r["tokens_per_s"]),
                f"{r['inference_tokens_per_s']:.0f}",
                f"{r['peak_memory_bytes'] / 2**20:.0f} MiB",
                ", ".join(optimal) or "-",
            ]
        )
    return rows


def sweep_text(results: dict[str, Any]) -> str:
    lines = [
        f"budget: {results['budget_text']}, fixed active compute",
        "",
        text_table(SWEEP_HEADERS, sweep_rows(results)),
        "",
    ]
    lines.append(f"lowest validation loss: {results['best']}")
    lines += [f"skipped {s}" for s in results["skipped"]]
    return "\n".join(lines)


def render_sweep(results: dict[str, Any], plots: list[tuple[Path, str]]) -> str:
    best = next(r for r in results["rows"] if r["label"] == results["best"])
    worst = max(results["rows"], key=lambda r: r["val_loss"])
    summary = (
        f"Lowest validation loss: {best['label']} ({best['val_loss']:.4f}, {format_count(best['total_params'])} parameters); "
        f"highest: {worst['label']} ({worst['val_loss']:.4f}). Every point spends the same FLOPs per token."
    )
    skipped = report.paragraph("Skipped: " + "; ".join(results["skipped"])) if results["skipped"] else ""
    return report.page(
        "moelab sweep: experts and granularity at fixed active compute",
        f"budget {results['budget_text']}",
        [
            ("", report.verdict(summary, "good")),
            ("Points", report.table(SWEEP_HEADERS, sweep_rows(results)) + skipped),
            ("Quality against cost", report.figures(plots)),
        ],
    )


TREND_VERB = {"grows": "grow", "shrinks": "shrink", "flips": "flip", "holds": "hold"}
LAW_TEXT = "L(N, D, E) = c + a N^-alpha E^-(b + g ln(N/N0) + h ln(D/D0)) + B D^-beta"
LAW_CONSTANTS = ("c", "a", "alpha", "b", "g", "h", "B", "beta")


def backtest_rows(bt: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, label in (("dense", "dense"), ("moe", "MoE"), ("advantage", "advantage (dense - MoE)")):
        lo, hi = bt["interval"][key]
        fmt = "{:+.4f}" if key == "advantage" else "{:.4f}"
        error = (
            f"{bt['error_percent'][key]:+.1f}%"
            if key in bt["error_percent"]
            else f"{bt['predicted'][key] - bt['measured'][key]:+.4f} nats"
        )
        rows.append(
            [
                label,
                fmt.format(bt["predicted"][key]),
                f"[{fmt.format(lo)}, {fmt.format(hi)}]",
                fmt.format(bt["measured"][key]),
                error,
                "yes" if bt["covered"][key] else "NO",
            ]
        )
    return rows


BACKTEST_HEADERS = ["model", "predicted", "95% interval", "measured", "error", "covered"]


def forecast_text(data: dict[str, Any]) -> str:
    f = data["forecast"]
    law = data["law"]
    spread = data["spread_95"]
    level = f.get("level", 0.9)
    lines = [f"fitted law: {LAW_TEXT}", ""]
    for name in LAW_CONSTANTS:
        lo, hi = spread.get(name, (float("nan"), float("nan")))
        lines.append(f"  {name:6s} {law.get(name, 0.0):10.4g}   95% bootstrap interval [{lo:.4g}, {hi:.4g}]")
    lines.append(
        f"  N0     {law['n0']:10.4g}   D0 {law.get('d0', 1.0):.4g}; R^2 {data['r2']:.4f}, rms log residual {data['rmse_log']:.4f}, {len(data['points'])} runs, {data['bootstrap_fits']} bootstrap fits"
    )
    lines += [
        "",
        f"forecast at N = {f['N']:.3g} active parameters, D = {f['D']:.3g} tokens, E = {f['E']:g} experts ({level:.0%} prediction intervals):",
        f"  dense  {f['dense']:.4f}  [{f['dense_ci'][0]:.4f}, {f['dense_ci'][1]:.4f}]",
        f"  MoE    {f['moe']:.4f}  [{f['moe_ci'][0]:.4f}, {f['moe_ci'][1]:.4f}]",
        f"  MoE advantage {f['advantage']:+.4f} nats [{f['advantage_ci'][0]:+.4f}, {f['advantage_ci'][1]:+.4f}]",
    ]
    bt = data.get("backtest")
    if bt and "skipped" in bt:
        lines += ["", f"backtest skipped: {bt['skipped']}"]
    elif bt:
        lines += [
            "",
            f"backtest: the law refitted without rung {bt['rung']} ({bt['fitted_runs']} runs) against what that rung measured:",
            text_table(BACKTEST_HEADERS, backtest_rows(bt)),
        ]
    lines += ["", f"The MoE advantage is predicted to {TREND_VERB[f['trend']].upper()}: {f['why']}."]
    lines += [f"WARNING: {w}" for w in f["warnings"]]
    if bt and "covered" in bt and not all(bt["covered"].values()):
        lines.append(
            f"WARNING: the backtest's intervals missed what rung {bt['rung']} measured: treat the forecast above with at least that much doubt"
        )
    return "\n".join(lines)


def render_forecast(data: dict[str, Any], plots: list[tuple[Path, str]]) -> str:
    f = data["forecast"]
    level = f.get("level", 0.9)
    kind = {"grows": "good", "holds": "good", "shrinks": "warn", "flips": "bad"}[f["trend"]]
    warnings = "".join(report.verdict("Warning: " + w, "warn") for w in f["warnings"])
    law = data["law"]
    rows = [
        [n, f"{law.get(n, 0.0):.4g}", *(f"{v:.4g}" for v in data["spread_95"].get(n, (float("nan"), float("nan"))))]
        for n in LAW_CONSTANTS
    ]
    runs = [[p["label"], f"{p['N']:.3g}", f"{p['D']:.3g}", f"{p['E']:g}", f"{p['loss']:.4f}"] for p in data["points"]]
    bt = data.get("backtest")
    if bt and "skipped" in bt:
        backtest_html = report.paragraph("Skipped: " + bt["skipped"])
    elif bt:
        missed = not all(bt["covered"].values())
        backtest_html = report.paragraph(
            f"The law refitted without rung {bt['rung']} ({bt['fitted_runs']} runs), its prediction for that rung against what "
            f"the rung's runs measured. Read the forecast's error from this: the target lies much further from the ladder."
        ) + report.table(BACKTEST_HEADERS, backtest_rows(bt))
        if missed:
            backtest_html = (
                report.verdict(f"The backtest's intervals missed what rung {bt['rung']} measured.", "bad")
                + backtest_html
            )
    else:
        backtest_html = report.paragraph("No backtest (--holdout none).")
    return report.page(
        "moelab forecast: will the MoE advantage survive a larger budget?",
        f"target: {f['N']:.3g} active parameters, {f['D']:.3g} tokens, {f['E']:g} experts",
        [
            (
                "",
                report.verdict(f"The MoE advantage is predicted to {TREND_VERB[f['trend']]}: {f['why']}.", kind)
                + warnings,
            ),
            (
                "Forecast",
                report.table(
                    ["model", "loss", f"{level:.0%} low", f"{level:.0%} high"],
                    [
                        ["dense", f"{f['dense']:.4f}", f"{f['dense_ci'][0]:.4f}", f"{f['dense_ci'][1]:.4f}"],
                        ["MoE", f"{f['moe']:.4f}", f"{f['moe_ci'][0]:.4f}", f"{f['moe_ci'][1]:.4f}"],
                        [
                            "advantage (dense - MoE)",
                            f"{f['advantage']:+.4f}",
                            f"{f['advantage_ci'][0]:+.4f}",
                            f"{f['advantage_ci'][1]:+.4f}",
                        ],
                    ],
                )
                + report.paragraph(
                    "Prediction intervals: every bootstrap refit's prediction times the residual scatter of the fit "
                    "(corrected for the number of fitted constants), so they say what a run at the target could measure."
                ),
            ),
            ("Backtest", backtest_html),
            (
                "Fitted law",
                report.paragraph(f"{LAW_TEXT}, fitted on log loss; intervals from refits on resampled runs.")
                + report.table(["constant", "value", "95% low", "95% high"], rows)
                + report.paragraph(
                    f"R^2 = {data['r2']:.4f}, rms log residual {data['rmse_log']:.4f}, N0 = {law['n0']:.4g}, D0 = {law.get('d0', 1.0):.4g}."
                ),
            ),
            ("Fit and ladder", report.figures(plots)),
            ("Ladder runs", report.table(["run", "active params N", "tokens D", "experts E", "final val loss"], runs)),
        ],
    )
