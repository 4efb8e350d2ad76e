"""`moelab diagnose RUN_DIR`: explain a run's router health and guardrail events after the fact.

Reads a run directory's metrics.jsonl, alerts.jsonl and config.toml (nothing else: no model, no
data), and returns a `Diagnosis`: a verdict (healthy / degraded / collapsed, naming the layers and
why), one summary per MoE layer over the end of the run, the alerts with the step each fired, and
the spikes and rollbacks. `write_report` renders it as one self-contained HTML page with plots.

Router metrics are read back as `LayerHealth` records (moelab.model.health), the type the trainer
wrote them from, and a layer's status comes from `judge_layer` applied to one record of the tail's
means: the judgement the training monitor applies to every interval. The verdict uses the
thresholds of the run's own monitor settings (MonitorConfig), so it agrees with the alerts the run
raised.

Tolerant of runs written by older versions: metrics they lack are None in their records and left
out of tables and plots, a config that no longer validates is read for the few values needed, and
where a run has no alerts.jsonl the layer rules are replayed over its metrics.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from moelab.config import MonitorConfig
from moelab.errors import MoelabError
from moelab.extras import require
from moelab.files import read_jsonl
from moelab.model.health import LayerHealth, health_from_metrics, judge_layer, router_layers
from moelab.rundir import RunDir
from moelab.train.monitor import Monitor

STATUS_ORDER = ("healthy", "degraded", "collapsed")
LAYER_RULES = ("collapse", "dead_experts", "logit_growth")
REPORT_NEEDS = "the diagnose report (--no-report skips it)"  # what names matplotlib when it is missing
TAIL_FRACTION = 0.2  # the end of the run that layer verdicts describe: its last 20% of intervals
# LayerHealth fields summarised over the tail (means; max_logit: the largest)
SUMMARY_FIELDS = (
    "imbalance",
    "cv",
    "maxvio",
    "effective_experts",
    "collapse_score",
    "entropy",
    "marginal_entropy",
    "z_loss",
    "max_logit",
    "dropped_frac",
    "similarity_max",
)


@dataclass
class RunInfo:
    """What the diagnosis needs from config.toml, read leniently."""

    moe: bool
    num_experts: int
    top_k: int
    log_every: int
    max_steps: int
    architecture: str
    monitor: MonitorConfig


@dataclass
class LayerDiagnosis:
    layer: int
    status: str  # healthy | degraded | collapsed
    reasons: list[str]
    summary: dict[str, float]  # metric -> mean over the tail of the run (dead: at the end)


@dataclass
class Diagnosis:
    run: Path
    info: RunInfo
    status: str  # healthy | degraded | collapsed
    verdict: str  # plain language, a few sentences
    layers: list[LayerDiagnosis]
    alerts: list[dict[str, Any]]  # what the run raised
    alerts_source: str  # alerts.jsonl | metrics.jsonl | none
    train: list[dict[str, Any]]  # logging intervals of the surviving trajectory, in step order
    evals: list[dict[str, Any]]
    abandoned: list[dict[str, Any]] = field(default_factory=list)  # intervals undone by a rollback
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    stops: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None  # summary.json, if training finished
    replayed: list[dict[str, Any]] = field(
        default_factory=list
    )  # layer rules rerun, for runs older than the current rules

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": str(self.run),
            "status": self.status,
            "verdict": self.verdict,
            "architecture": self.info.architecture,
            "layers": [{"layer": d.layer, "status": d.status, "reasons": d.reasons, **d.summary} for d in self.layers],
            "alerts": self.alerts,
            "alerts_source": self.alerts_source,
            "replayed_layer_alerts": self.replayed,
            "rollbacks": self.rollbacks,
            "stops": self.stops,
        }


# ---------------------------------------------------------------------------------------------
# Reading a run


def read_run_info(run: RunDir) -> RunInfo:
    """Config values the diagnosis needs. A config that no longer validates (written by another
    version) is read key by key, with defaults for what is missing."""
    try:
        data = tomllib.loads(run.config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MoelabError(f"{run.config_path} is not readable TOML: {exc}") from None
    model = data.get("model", {}) if isinstance(data.get("model"), dict) else {}
    moe = model.get("moe") if isinstance(model.get("moe"), dict) else None
    train = data.get("train", {}) if isinstance(data.get("train"), dict) else {}
    monitor = MonitorConfig()
    known = {f.name for f in fields(MonitorConfig)}
    table = data.get("monitor") if isinstance(data.get("monitor"), dict) else {}
    for key, value in table.items():
        default = getattr(monitor, key) if key in known else None
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and (isinstance(default, float) or isinstance(value, int))
            )
        else:
            ok = default is not None and isinstance(value, type(default))
        if ok:
            setattr(monitor, key, type(default)(value))
    E = int(moe.get("num_experts", 8)) if moe is not None else 0
    k = int(moe.get("top_k", 2)) if moe is not None else 1
    base = f"{model.get('n_layers', '?')} layers, d_model {model.get('d_model', '?')}"
    if moe is None:
        arch = f"{base}, dense FFN"
    else:
        arch = f"{base}, MoE E={E} k={k} I={moe.get('expert_hidden', '?')}"
        if moe.get("num_shared_experts"):
            arch += f" +{moe['num_shared_experts']} shared"
        arch += f", aux loss {moe.get('aux_loss_coef', 0.01):g}, z-loss {moe.get('z_loss_coef', 0.001):g}"
    return RunInfo(
        moe=moe is not None,
        num_experts=E,
        top_k=k,
        log_every=int(train.get("log_every", 10)),
        max_steps=int(train.get("max_steps", 0)),
        architecture=arch,
        monitor=monitor,
    )


def split_metrics(rows: list[dict[str, Any]]) -> tuple[list, list, list, list, list, list]:
    """(train intervals, evaluations, alert events, rollbacks, stops, abandoned intervals) of a
    metrics.jsonl in file order. A rollback to step t undoes the intervals and evaluations after t
    that were logged before it: they move to `abandoned` (evaluations are dropped)."""
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    alerts, rollbacks, stops, abandoned = [], [], [], []
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            continue
        event = row.get("event")
        if event == "rollback":
            to = row.get("to_step", row["step"])
            abandoned += [r for r in train if r["step"] > to]
            train = [r for r in train if r["step"] <= to]
            evals = [r for r in evals if r["step"] <= to]
            rollbacks.append(row)
        elif event == "alert":
            alerts.append(row)
        elif event == "stop":
            stops.append(row)
        elif event is None and "loss" in row:
            train.append(row)
        elif event is None and "val_loss" in row:
            evals.append(row)
    return train, evals, alerts, rollbacks, stops, abandoned


def replay_layer_alerts(train: list[dict[str, Any]], info: RunInfo) -> list[dict[str, Any]]:
    """The layer rules (collapse, dead experts, logit growth) run again over logged metrics, for
    runs written before alerts.jsonl existed. Spikes need per-step values, which are not logged."""
    monitor = Monitor(info.monitor, info.num_experts, info.top_k)
    out = []
    for row in train:
        health = health_from_metrics(row)
        if len(health) < len(router_layers(row)):
            continue  # a layer without its load metrics cannot be judged
        for alert in monitor.check_interval(
            int(row["step"]), float(row.get("loss", 0.0)), float(row.get("grad_norm", 0.0)), health
        ):
            if alert.rule in LAYER_RULES:
                out.append(alert.to_dict())
    return out


def alert_layer(alert: dict[str, Any]) -> int | None:
    """The layer an alert is about (None for run-wide rules). Alerts carry it."""
    if isinstance(alert.get("layer"), int):
        return alert["layer"]
    if "layer" not in alert and alert.get("rule") in LAYER_RULES:
        return _legacy_alert_layer(alert)
    return None


def _legacy_alert_layer(alert: dict[str, Any]) -> int | None:
    """LEGACY: alert lines in metrics.jsonl written before they carried the layer had it only in the
    message text ("layer 3: ..."). Only runs written by those versions reach this."""
    message = str(alert.get("message", ""))
    if message.startswith("layer "):
        head = message[6:].split(":", 1)[0]
        return int(head) if head.isdigit() else None
    return None


def layer_history(train: list[dict[str, Any]], layer: int) -> list[tuple[int, LayerHealth]]:
    """(step, record) of the layer over the intervals that logged its router metrics."""
    out = []
    for row in train:
        health = LayerHealth.from_metrics(row, layer)
        if health is not None:
            out.append((row["step"], health))
    return out


def layer_series(train: list[dict[str, Any]], layer: int, name: str) -> tuple[list[int], list[Any]]:
    """(steps, values) of one LayerHealth field over the intervals that logged it."""
    pts = [(step, getattr(h, name)) for step, h in layer_history(train, layer) if getattr(h, name) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _tail_health(train: list[dict[str, Any]], layer: int, info: RunInfo) -> LayerHealth | None:
    """The layer over the end of the run as one record: each summarised field's mean over the last
    20% of intervals (max_logit: the largest; dead: the last logged), judged like one interval.
    Records that predate the collapse score and effective experts have them computed from the share."""
    tail = [h for _, h in layer_history(train[-max(3, math.ceil(TAIL_FRACTION * len(train))) :], layer)]
    if not tail:
        return None
    values = {name: _finite([getattr(h, name) for h in tail]) for name in SUMMARY_FIELDS}
    values["collapse_score"] = _finite([h.score(info.top_k) for h in tail])
    values["effective_experts"] = _finite([h.n_effective() for h in tail])
    means = {
        name: (max(v) if name == "max_logit" else statistics.fmean(v)) if v else None for name, v in values.items()
    }
    E = max(len(h.share) for h in tail)
    share_E = [statistics.fmean(h.share[e] for h in tail if e < len(h.share)) for e in range(E)]
    _, dead = layer_series(train, layer, "dead")
    return LayerHealth(share=share_E, **means, dead=dead[-1] if dead else None)


def _summary(tail: LayerHealth | None) -> dict[str, float]:
    """The tail record's summarised fields, as the layer table and --json show them."""
    if tail is None:
        return {}
    out = {name: float(getattr(tail, name)) for name in SUMMARY_FIELDS if getattr(tail, name) is not None}
    if tail.dead is not None:
        out["dead"] = float(tail.dead)
    return out


def _layer_status(layer: int, tail: LayerHealth | None, alerts: list[dict[str, Any]], info: RunInfo) -> LayerDiagnosis:
    cfg = info.monitor
    summary = _summary(tail)
    reasons: list[str] = []
    status = "healthy"
    judged = judge_layer(tail, cfg, info.top_k) if tail is not None else None
    if judged is not None and judged.skewed:
        status = "collapsed"
        reasons.append(
            f"routing concentrated on {tail.n_effective():.1f} effective experts of {info.num_experts} at the end "
            f"(collapse score {judged.score:.2f})"
        )
    dead = int(summary.get("dead", 0))
    if dead:
        status = max(status, "degraded", key=STATUS_ORDER.index)
        reasons.append(f"{dead} dead expert{'s' if dead > 1 else ''} at the end")
    if judged is not None and judged.logit_grown:
        status = max(status, "degraded", key=STATUS_ORDER.index)
        reasons.append(f"max router logit {tail.max_logit:.1f} above {cfg.logit_growth:g}")
    mine = [a for a in alerts if alert_layer(a) == layer and a.get("rule") in LAYER_RULES]
    fired = sorted({a["rule"] for a in mine})
    if fired and status == "healthy":
        status = "degraded"
        reasons.append(
            "recovered, but raised " + _join([r.replace("_", " ") for r in fired]) + " alerts during the run"
        )
    if mine:
        reasons.append(f"first flagged at step {min(a['step'] for a in mine)}")
    return LayerDiagnosis(layer, status, reasons, summary)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _verdict(
    info: RunInfo, layers: list[LayerDiagnosis], alerts: list[dict[str, Any]], rollbacks: list, stops: list, train: list
) -> tuple[str, str]:
    sentences: list[str] = []
    by_status = {s: [d for d in layers if d.status == s] for s in STATUS_ORDER}
    run_status = "healthy"
    if not info.moe:
        sentences.append(
            "Dense model: there is no router to diagnose; only the loss, gradient and guardrail events are shown."
        )
    elif not layers:
        sentences.append("No router metrics were logged, so the routing cannot be judged.")
    elif by_status["collapsed"]:
        run_status = "collapsed"
    elif by_status["degraded"]:
        run_status = "degraded"
    for status in ("collapsed", "degraded"):
        group = by_status[status]
        if group:
            names = _join([str(d.layer) for d in group])
            detail = "; ".join(f"layer {d.layer}: {', '.join(d.reasons)}" for d in group)
            verb = (
                ("collapsed" if len(group) == 1 else "have collapsed")
                if status == "collapsed"
                else ("is degraded" if len(group) == 1 else "are degraded")
            )
            sentences.append(f"Layer{'s' if len(group) > 1 else ''} {names} {verb} ({detail}).")
    if info.moe and layers and run_status == "healthy":
        n_effs = [d.summary["effective_experts"] for d in layers if "effective_experts" in d.summary]
        span = (
            f"{min(n_effs):.1f}"
            if f"{min(n_effs):.1f}" == f"{max(n_effs):.1f}"
            else f"{min(n_effs):.1f} to {max(n_effs):.1f}"
        )
        spread = f" ({span} effective experts of {info.num_experts} at the end)" if n_effs else ""
        which = (
            "the MoE layer uses its"
            if len(layers) == 1
            else ("both MoE layers use their" if len(layers) == 2 else f"all {len(layers)} MoE layers use their")
        )
        sentences.append(f"Healthy routing: {which} experts{spread}, with no dead experts and no router alerts.")
    nan = [a for a in alerts if a.get("rule") == "nan"]
    spikes = [a for a in alerts if a.get("rule") in ("loss_spike", "grad_spike")]
    events = []
    if nan:
        events.append(f"{len(nan)} non-finite step{'s' if len(nan) > 1 else ''} (first at step {nan[0]['step']})")
    if rollbacks:
        events.append(f"{len(rollbacks)} rollback{'s' if len(rollbacks) > 1 else ''}")
    if spikes:
        events.append(
            f"{len(spikes)} loss or gradient spike{'s' if len(spikes) > 1 else ''} (first at step {spikes[0]['step']})"
        )
    if events:
        sentences.append("Training events: " + ", ".join(events) + ".")
        if run_status == "healthy":
            run_status = "degraded"
    else:
        sentences.append("No non-finite steps, spikes or rollbacks.")
    if stops:
        sentences.append(
            f"The monitor stopped the run at step {stops[-1]['step']}: {str(stops[-1].get('message', '')).removeprefix('stopping: ')}."
        )
        if run_status == "healthy":
            run_status = "degraded"
    if train:
        sentences.append(
            f"{len(train)} logging intervals up to step {train[-1]['step']}"
            + (f" of {info.max_steps}." if info.max_steps else ".")
        )
    return run_status, " ".join(sentences)


def diagnose(run_dir: str | Path) -> Diagnosis:
    """Diagnose a run directory (see the module docstring). Raises MoelabError for a path that is not
    a run directory or a run with no metrics."""
    path = Path(run_dir)
    if not path.exists():
        raise MoelabError(f"{path} does not exist; give a run directory (one that `moelab train --out` wrote)")
    if not path.is_dir():
        raise MoelabError(f"{path} is a file; give a run directory (one that `moelab train --out` wrote)")
    run = RunDir(path)
    if not run.is_run():
        raise MoelabError(f"{path} is not a moelab run directory (it has no config.toml)")
    if not run.metrics_path.is_file():
        raise MoelabError(
            f"run {path} has no metrics.jsonl yet: train it first (metrics are written every train.log_every steps)"
        )
    info = read_run_info(run)
    train, evals, alert_events, rollbacks, stops, abandoned = split_metrics(read_jsonl(run.metrics_path))
    if not train and not evals:
        raise MoelabError(f"run {path} has no metrics yet: metrics.jsonl holds no training interval or evaluation")
    if run.alerts_path.is_file():
        alerts, source = read_jsonl(run.alerts_path), "alerts.jsonl"
    elif alert_events:
        alerts, source = alert_events, "metrics.jsonl"
    else:
        alerts, source = [], "none"  # the trainer writes alerts.jsonl at the first alert: none fired
    alerts = sorted(
        (a for a in alerts if isinstance(a, dict) and isinstance(a.get("step"), (int, float))), key=lambda a: a["step"]
    )
    layer_ids = sorted({layer for r in train for layer in router_layers(r)})
    # NOTE: a run logged before the collapse score existed raised its layer alerts under older rules
    # (an older collapse rule fired on healthy runs); judge its layers by the current rules, replayed.
    predates = bool(layer_ids) and all(h.collapse_score is None for _, h in layer_history(train, layer_ids[0]))
    replayed = replay_layer_alerts(train, info) if predates else []
    layer_alerts = replayed + [a for a in alerts if a.get("rule") not in LAYER_RULES] if predates else alerts
    layers = [_layer_status(layer, _tail_health(train, layer, info), layer_alerts, info) for layer in layer_ids]
    status, verdict = _verdict(info, layers, alerts, rollbacks, stops, train)
    if predates:
        verdict += (
            " (This run predates the current router rules: its layers were judged by replaying them over its metrics.)"
        )
    return Diagnosis(
        path,
        info,
        status,
        verdict,
        layers,
        alerts,
        source,
        train,
        evals,
        abandoned,
        rollbacks,
        stops,
        run.read_summary(),
        replayed,
    )


# ---------------------------------------------------------------------------------------------
# Text and HTML


LAYER_HEADERS = [
    "layer",
    "status",
    "max/mean",
    "CV",
    "MaxVio",
    "effective experts",
    "dead",
    "token entropy",
    "mean-routing entropy",
    "z-loss",
    "max logit",
    "dropped",
    "max similarity",
]


def _fmt(summary: dict[str, float], name: str, spec: str) -> str:
    value = summary.get(name)
    return "-" if value is None else format(value, spec)


def layer_rows(d: Diagnosis) -> list[list[str]]:
    lnE = math.log(d.info.num_experts) if d.info.num_experts > 1 else 1.0
    rows = []
    for ld in d.layers:
        s = ld.summary
        ent = lambda name: "-" if name not in s else f"{s[name]:.2f} ({s[name] / lnE:.0%})"
        rows.append(
            [
                str(ld.layer),
                ld.status,
                _fmt(s, "imbalance", ".2f"),
                _fmt(s, "cv", ".2f"),
                _fmt(s, "maxvio", ".2f"),
                _fmt(s, "effective_experts", ".2f") + f" / {d.info.num_experts}",
                _fmt(s, "dead", ".0f"),
                ent("entropy"),
                ent("marginal_entropy"),
                _fmt(s, "z_loss", "#.3g"),
                _fmt(s, "max_logit", ".2f"),
                "-" if "dropped_frac" not in s else f"{s['dropped_frac']:.1%}",
                _fmt(s, "similarity_max", ".2f"),
            ]
        )
    return rows


ALERT_HEADERS = ["step", "rule", "action", "layer", "message"]


def alert_rows(d: Diagnosis) -> list[list[str]]:
    rows = [
        [
            str(a["step"]),
            str(a.get("rule", "?")),
            str(a.get("action", "?")),
            "-" if alert_layer(a) is None else str(alert_layer(a)),
            str(a.get("message", "")),
        ]
        for a in d.alerts
    ]
    rows += [
        [
            str(r["step"]),
            "rollback",
            "-",
            "-",
            f"rolled back to step {r.get('to_step', '?')} after a {r.get('rule', '?')} alert; the batches since that checkpoint were skipped",
        ]
        for r in d.rollbacks
    ]
    rows += [[str(r["step"]), "stop", "-", "-", str(r.get("message", ""))] for r in d.stops]
    return sorted(rows, key=lambda r: int(r[0]))


def diagnose_text(d: Diagnosis) -> str:
    from moelab.analysis.render import text_table

    lines = [f"{d.run}: {d.info.architecture}", "", f"verdict: {d.status.upper()}", d.verdict, ""]
    if d.layers:
        lines += [
            text_table(LAYER_HEADERS, layer_rows(d)),
            "",
            "(means over the last 20% of logging intervals; max logit: the largest; dead: at the end)",
            "",
        ]
    rows = alert_rows(d)
    lines.append(f"alerts and events: {len(rows) or 'none'}")
    lines += _alert_lines(rows)
    if d.replayed:
        lines.append(f"current layer rules replayed over the metrics (the run predates them): {len(d.replayed)}")
        lines += _alert_lines(
            [[str(a["step"]), a["rule"], a["action"], str(a.get("layer", "-")), a["message"]] for a in d.replayed]
        )
    return "\n".join(lines)


def _alert_lines(rows: list[list[str]], limit: int = 30) -> list[str]:
    lines = [
        f"  step {r[0]:>6}  {r[1]:<13} {r[2]:<8} {('layer ' + r[3]) if r[3] != '-' else '':<8} {r[4]}"
        for r in rows[:limit]
    ]
    if len(rows) > limit:
        lines.append(f"  ... and {len(rows) - limit} more (see the report)")
    return lines


HOW_TO_READ = """
<ul>
<li><b>Expert load heatmaps</b>: each row an expert, each column a logging interval; colour is the expert's share of
routed slots times E, so 1 (white) is its fair share, red experts take more, blue ones less, dark blue is starved. A
collapse shows as a few red rows with the rest blue.</li>
<li><b>Balance</b>: max/mean load (1 = balanced, E/k = everything on k experts) and the effective number of experts,
exp(entropy of the load). The collapse rule fires when the effective number stays under the dashed line for
persist_intervals intervals.</li>
<li><b>Entropy</b>, as a fraction of ln E: per-token entropy (how sure the router is about each token; low is
normal as it learns) and the entropy of the mean routing distribution (how spread the router's preferences are
over the whole batch; low means the router prefers the same experts for every token).</li>
<li><b>Router logits</b>: z-loss (mean squared log-sum-exp) and the largest logit; steady growth warns of softmax
precision loss in low precision long before it breaks.</li>
<li><b>Loss and gradient norm</b>: spikes are marked with triangles, non-finite steps with red lines and rollbacks
with dashed purple lines labelled with the step they went back to; grey points are intervals a rollback undid.</li>
</ul>
"""


def _alert_table_html(d: Diagnosis) -> str:
    from moelab.analysis import report

    rows = alert_rows(d)
    # NOTE: the shared report style right-aligns cells (for numbers); this table is words.
    out = "<style>.alerts td, .alerts th { text-align: left; }</style>"
    if rows:
        note = (
            " (from the alert lines of metrics.jsonl: this run has no alerts.jsonl)"
            if d.alerts_source == "metrics.jsonl"
            else ""
        )
        out += report.paragraph(
            f"{len(rows)} alerts and events raised during training{note}, in step order."
        ) + _alerts_table(rows)
    else:
        out += report.paragraph("No alerts were raised during training.")
    if d.replayed:
        replayed = [
            [str(a["step"]), a["rule"], a["action"], str(a.get("layer", "-")), a["message"]] for a in d.replayed
        ]
        out += report.paragraph(
            "This run predates the current router rules; replayed over its logged metrics, they give:"
        ) + _alerts_table(replayed)
    return out


def _alerts_table(rows: list[list[str]]) -> str:
    from moelab.analysis import report

    return '<div class="alerts">' + report.table(ALERT_HEADERS, rows) + "</div>"


def render_html(d: Diagnosis, plots: dict[str, list[tuple[Path, str]]]) -> str:
    """The report page; `plots` maps a section (training, load, router) to its (png, caption) pairs."""
    from moelab.analysis import report

    kind = {"healthy": "good", "degraded": "warn", "collapsed": "bad"}[d.status]
    meta = f"{d.run} — {d.info.architecture}"
    if d.summary:
        meta += f"; {d.summary.get('step', '?')} steps, final validation loss {d.summary.get('val_loss', float('nan')):.4f} (stopped by {d.summary.get('stopped_by', '?')})"
    sections = [("", report.verdict(f"Verdict: {d.status.upper()}. {d.verdict}", kind))]
    if d.layers:
        sections.append(
            (
                "MoE layers at the end of the run",
                report.table(LAYER_HEADERS, layer_rows(d))
                + report.paragraph(
                    "Means over the last 20% of logging intervals (max logit: the largest; dead: at the end). Entropies in nats, "
                    "with the fraction of ln E in brackets. Max similarity: the most similar pair of experts (cosine of their weights)."
                ),
            )
        )
    sections.append(("Alerts", _alert_table_html(d)))
    for key, title in (
        ("training", "Loss, gradient norm and guardrail events"),
        ("load", "Expert load over time"),
        ("router", "Balance, entropy, router logits and experts"),
    ):
        if plots.get(key):
            sections.append((title, report.figures(plots[key])))
    sections.append(("How to read this report", HOW_TO_READ))
    return report.page(f"moelab diagnose: {d.run.name}", meta, sections)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Diagnose a run and write its self-contained HTML report (default RUN_DIR/diagnose.html)."""
    return render_report(diagnose(run_dir), out)


def render_report(d: Diagnosis, out: str | Path | None = None) -> Path:
    """Write the self-contained HTML report of a diagnosis (default RUN_DIR/diagnose.html)."""
    target = Path(out) if out is not None else d.run / "diagnose.html"
    if target.is_dir():
        raise MoelabError(f"--out {target} is a directory; give a file name such as {target / 'diagnose.html'}")
    if not target.parent.is_dir():
        raise MoelabError(f"--out {target}: the directory {target.parent} does not exist")
    require(REPORT_NEEDS, "report", "matplotlib")
    from moelab.analysis.diagnose_plots import diagnose_plots

    with tempfile.TemporaryDirectory(prefix="moelab-diagnose-") as tmp:
        plots = diagnose_plots(d, Path(tmp))
        page = render_html(d, plots)  # the PNGs are embedded, so the temporary files can go
    target.write_text(page, encoding="utf-8")
    return target
