"""`moelab diagnose` on hand-written run directories with known outcomes (healthy, collapsed,
degraded, rolled back, dense, written by an older version), bad input, the CLI, and a real run."""

from __future__ import annotations

import json
import math

import pytest

from moelab.analysis.diagnose import (
    diagnose,
    diagnose_text,
    split_metrics,
    write_report,
)
from moelab.cli import main
from moelab.config import load_config
from moelab.errors import MoelabError
from moelab.model.health import LayerHealth, collapse_score, effective_experts, entropy, health_to_metrics, load_metrics
from moelab.rundir import RunDir
from moelab.train.monitor import Monitor

E, K = 4, 2  # the tiny preset's experts
BALANCED = [0.26, 0.25, 0.25, 0.24]
COLLAPSED = [0.5, 0.5, 0.0, 0.0]


def layer_metrics(layer: int, share: list[float], dead: int = 0, max_logit: float = 2.0, full: bool = True) -> dict:
    m = load_metrics([s * 1000 for s in share])
    if full:
        m.update(
            tokens=1000.0,
            effective_experts=effective_experts(share),
            collapse_score=collapse_score(share, K),
            entropy=0.9 * math.log(E),
            marginal_entropy=entropy(share),
            z_loss=1.5,
            max_logit=max_logit,
            dropped_frac=0.0,
            weight_norm=[1.0] * E,
            grad_norm=[0.1] * E,
            similarity_max=0.05,
            similarity_mean=0.0,
            similarity_pair=[0, 1],
            starved=dead,
            dead=dead,
            dead_experts=list(range(dead)),
        )
    return {f"router.{layer}.{k}": v for k, v in m.items()}


def interval(step: int, shares: dict[int, list[float]], loss: float | None = None, **kw) -> dict:
    row = {
        "step": step,
        "tokens": step * 512,
        "loss": 5.0 - step / 100 if loss is None else loss,
        "grad_norm": 0.5,
        "lr": 1e-3,
    }
    for layer, share in shares.items():
        row.update(layer_metrics(layer, share, **kw))
    return row


def make_run(
    tmp_path,
    name: str,
    rows: list[dict],
    alerts: list[dict] | None = None,
    dense: bool = False,
    summary: dict | None = None,
    overrides: list[str] | None = None,
):
    cfg = load_config(preset="tiny", overrides=(["model.moe=none"] if dense else []) + (overrides or []))
    run = RunDir(tmp_path / name)
    run.create(cfg)
    run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if alerts is not None:
        run.alerts_path.write_text("".join(json.dumps(a) + "\n" for a in alerts))
    if summary is not None:
        run.summary_path.write_text(json.dumps(summary))
    return run.path


def steps(n: int = 20, every: int = 5):
    return range(every, every * n + 1, every)


def test_healthy_run(tmp_path) -> None:
    rows = [{"step": 0, "val_loss": 5.5}] + [interval(s, {0: BALANCED, 1: BALANCED}) for s in steps()]
    d = diagnose(make_run(tmp_path, "ok", rows))
    assert d.status == "healthy" and [ld.status for ld in d.layers] == ["healthy", "healthy"]
    assert "Healthy routing: both MoE layers" in d.verdict and "No non-finite steps" in d.verdict
    assert d.layers[0].summary["effective_experts"] == pytest.approx(effective_experts(BALANCED))
    assert d.alerts == [] and d.alerts_source == "none"


def test_collapsed_layer_is_named_with_the_alert_step(tmp_path) -> None:
    rows = [interval(s, {0: BALANCED, 1: BALANCED if s <= 40 else COLLAPSED}, dead=0) for s in steps()]
    alert = {
        "step": 65,
        "rule": "collapse",
        "action": "warn",
        "layer": 1,
        "message": "layer 1: routing collapsed onto 2.0 effective experts of 4",
    }
    d = diagnose(make_run(tmp_path, "bad", rows, [alert]))
    assert d.status == "collapsed"
    assert [ld.status for ld in d.layers] == ["healthy", "collapsed"]
    assert "Layer 1 collapsed (layer 1: routing concentrated on 2.0 effective experts of 4" in d.verdict
    text = diagnose_text(d)
    assert "verdict: COLLAPSED" in text and "step     65  collapse" in text


def test_dead_experts_at_the_end_and_a_recovered_collapse_are_degraded(tmp_path) -> None:
    rows = [interval(s, {0: BALANCED}) for s in steps(10)] + [
        interval(s, {0: [0.3, 0.3, 0.38, 0.02]}, dead=1) for s in range(55, 101, 5)
    ]
    d = diagnose(make_run(tmp_path, "dead", rows))
    assert d.status == "degraded" and "1 dead expert at the end" in d.verdict
    rows = [interval(s, {0: BALANCED, 1: BALANCED}) for s in steps()]
    alerts = [{"step": 30, "rule": "collapse", "action": "warn", "layer": 0, "message": "layer 0: routing collapsed"}]
    d = diagnose(make_run(tmp_path, "recovered", rows, alerts))
    assert d.status == "degraded" and [ld.status for ld in d.layers] == ["degraded", "healthy"]
    assert "recovered, but raised collapse alerts during the run" in d.verdict


def test_logit_growth_at_the_end_is_degraded(tmp_path) -> None:
    rows = [interval(s, {0: BALANCED}, max_logit=5.0 + s) for s in steps()]  # up to 105
    d = diagnose(make_run(tmp_path, "logits", rows))
    assert d.status == "degraded" and "max router logit 105.0 above 30" in d.verdict


def test_rollbacks_undo_intervals_and_are_reported(tmp_path) -> None:
    rows = [
        interval(5, {0: BALANCED}),
        interval(10, {0: BALANCED}),
        {"step": 10, "val_loss": 4.0},
        interval(15, {0: BALANCED}, loss=9.0),
        {"step": 17, "event": "alert", "rule": "nan", "action": "rollback", "message": "non-finite loss at step 17"},
        {"step": 17, "event": "rollback", "to_step": 10, "rule": "nan"},
        interval(15, {0: BALANCED}, loss=4.8),
        interval(20, {0: BALANCED}),
    ]
    train, evals, alerts, rollbacks, stops, abandoned = split_metrics(rows)
    assert [r["step"] for r in train] == [5, 10, 15, 20] and train[2]["loss"] == 4.8
    assert [r["loss"] for r in abandoned] == [9.0] and len(evals) == 1 and len(alerts) == 1 and stops == []
    d = diagnose(
        make_run(
            tmp_path,
            "rolled",
            rows,
            [{"step": 17, "rule": "nan", "action": "rollback", "message": "non-finite loss at step 17"}],
        )
    )
    assert d.status == "degraded"
    assert "1 non-finite step (first at step 17), 1 rollback" in d.verdict
    html = write_report(d.run).read_text()
    assert "rolled back to step 10" in html


def test_report_is_self_contained_with_every_plot(tmp_path) -> None:
    rows = [{"step": 0, "val_loss": 5.5}] + [
        interval(s, {0: BALANCED, 1: COLLAPSED if s > 50 else BALANCED}) for s in steps()
    ]
    rows.insert(8, {"step": 40, "val_loss": 4.6})
    alerts = [
        {"step": 75, "rule": "collapse", "action": "warn", "layer": 1, "message": "layer 1: collapsed <b>"},
        {
            "step": 33,
            "rule": "loss_spike",
            "action": "warn",
            "message": "loss spike at step 33",
            "value": 6.0,
            "threshold": 5.0,
        },
    ]
    run = make_run(tmp_path, "report", rows, alerts, summary={"step": 100, "val_loss": 4.2, "stopped_by": "max_steps"})
    path = write_report(run)
    assert path == run / "diagnose.html"
    html = path.read_text()
    assert html.count("data:image/png;base64,") == 6  # loss, one heatmap figure, balance, entropy, logits, experts
    assert "COLLAPSED" in html and "loss spike at step 33" in html and "&lt;b&gt;" in html  # escaped
    assert 'src="http' not in html and "<script" not in html  # nothing to fetch
    other = write_report(run, tmp_path / "elsewhere.html")
    assert other.is_file()


def test_dense_run_says_so(tmp_path) -> None:
    rows = [{"step": 0, "val_loss": 5.5}] + [{"step": s, "loss": 5 - s / 100, "grad_norm": 0.4} for s in steps()]
    d = diagnose(make_run(tmp_path, "dense", rows, dense=True))
    assert d.layers == [] and d.status == "healthy"
    assert d.verdict.startswith("Dense model: there is no router to diagnose")
    html = write_report(d.run).read_text()
    assert html.count("data:image/png;base64,") == 1 and "Dense model" in html


def test_run_written_before_the_current_rules(tmp_path) -> None:
    """Older metrics: share and imbalance only, an old-style alert line in metrics.jsonl and no
    alerts.jsonl, a config with a key this version does not know."""
    rows = []
    for s in steps():
        row = {"step": s, "loss": 4.0, "grad_norm": 0.5}
        row.update(layer_metrics(0, COLLAPSED if s > 30 else BALANCED, full=False))
        rows.append(row)
    rows.append(
        {
            "step": 45,
            "event": "alert",
            "rule": "collapse",
            "action": "warn",
            "message": "layer 0: routing collapsed, max/mean expert load 2.00",
        }
    )
    run = make_run(tmp_path, "old", rows)
    config = (
        (run / "config.toml").read_text().replace("persist_intervals = 5", "retired_setting = 3\npersist_intervals = 2")
    )
    (run / "config.toml").write_text(config)
    d = diagnose(run)
    assert d.info.monitor.persist_intervals == 2
    assert d.alerts_source == "metrics.jsonl" and d.alerts[0]["rule"] == "collapse"
    assert [a["step"] for a in d.replayed if a["rule"] == "collapse"] == [40]  # collapsed from 35, persists 2
    assert d.status == "collapsed" and "predates the current router rules" in d.verdict
    html = write_report(run).read_text()
    assert "replayed over its logged metrics" in html
    assert html.count("data:image/png;base64,") == 6


def _either_side(measure, path, threshold: float) -> tuple[list[float], list[float]]:
    """Two shares a step apart on `path` (t from 0 to 1), the first with `measure` below the
    threshold and the second at or above it."""
    t = next(i / 200 for i in range(201) if measure(path(i / 200)) >= threshold)
    below, above = path(t - 1 / 200), path(t)
    assert measure(below) < threshold <= measure(above)
    return below, above


@pytest.mark.parametrize(
    "setting, measure, path",
    [
        # from balanced to everything on two experts
        ("collapse_score", lambda s: collapse_score(s, K), lambda t: [(1 - t) / E + t * c for c in COLLAPSED]),
        # one expert taking more and more, the rest evenly (a low collapse score throughout)
        ("collapse_imbalance", lambda s: load_metrics(s)["imbalance"], lambda t: [(1 + t) / E] + [(3 - t) / E / 3] * 3),
    ],
)
def test_monitor_and_diagnose_judge_a_layer_alike(tmp_path, setting, measure, path) -> None:
    """The training monitor's collapse alert and diagnose's layer status both come from
    judge_layer: on the same records they agree, on each side of the threshold."""
    overrides = ["monitor.collapse_imbalance=1.6"] if setting == "collapse_imbalance" else []
    cfg = load_config(preset="tiny", overrides=overrides).monitor
    for side, share in zip(("below", "above"), _either_side(measure, path, getattr(cfg, setting))):
        monitor = Monitor(cfg, E, K)
        rows, fired = [], []
        for s in steps():
            m = load_metrics([x * 1000 for x in share])
            health = {0: LayerHealth(tokens=1000.0, **m, collapse_score=collapse_score(share, K), max_logit=2.0)}
            fired += [a for a in monitor.check_interval(s, 4.0, 0.5, health) if a.rule == "collapse"]
            rows.append({"step": s, "loss": 4.0, "grad_norm": 0.5, **health_to_metrics(health)})
        run = make_run(tmp_path, f"{setting}-{side}", rows, [a.to_dict() for a in fired], overrides=overrides)
        status = diagnose(run).layers[0].status
        assert bool(fired) == (side == "above"), (side, share)
        assert (status == "collapsed") == (side == "above"), (side, share, status)


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is a file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "not a moelab run directory"),
    ],
)
def test_bad_paths(tmp_path, setup, message) -> None:
    with pytest.raises(MoelabError, match=message):
        diagnose(setup(tmp_path))


def test_runs_without_metrics(tmp_path) -> None:
    run = make_run(tmp_path, "nometrics", [])
    (run / "metrics.jsonl").unlink()
    with pytest.raises(MoelabError, match="has no metrics.jsonl yet"):
        diagnose(run)
    run = make_run(
        tmp_path,
        "events-only",
        [{"step": 3, "event": "alert", "rule": "nan", "action": "warn", "message": "x"}, {"not": "a metric"}],
    )
    with pytest.raises(MoelabError, match="no training interval or evaluation"):
        diagnose(run)
    (run / "config.toml").write_text("[model\n")
    with pytest.raises(MoelabError, match="not readable TOML"):
        diagnose(run)


def test_cli(tmp_path, capsys) -> None:
    run = make_run(tmp_path, "cli", [interval(s, {0: BALANCED}) for s in steps()])
    out = tmp_path / "r.html"
    assert main(["diagnose", str(run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "verdict: HEALTHY" in text and f"report: {out}" in text and out.is_file()
    assert main(["diagnose", str(run), "--json", "--no-report"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "healthy" and data["layers"][0]["layer"] == 0
    assert main(["diagnose", str(tmp_path / "nope")]) == 2
    assert "moelab: error:" in capsys.readouterr().err
    assert main(["diagnose", str(run), "--out", str(tmp_path)]) == 2  # a directory is not a file name
    assert "is a directory" in capsys.readouterr().err


def test_on_a_real_run(tiny_run) -> None:
    d = diagnose(tiny_run)
    assert [ld.layer for ld in d.layers] == [0, 1]
    assert d.status == "healthy", d.verdict
    assert all(0 < ld.summary["effective_experts"] <= E for ld in d.layers)
    assert write_report(tiny_run, tiny_run / "diagnose-test.html").read_text().count("data:image/png;base64,") == 6
