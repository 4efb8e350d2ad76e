"""Every monitor rule on crafted metric streams (fires when it should, quiet on a healthy stream);
actions, re-arming and checkpoint state; and the guardrails end to end on the tiny preset (NaN ->
rollback -> skip -> finish). The statistics the rules read: tests/model/test_health.py."""

from __future__ import annotations

import io
import json
import math
import os
import random
import statistics

import pytest
import torch

from moelab.checkpoint import list_checkpoints
from moelab.config import (
    MonitorConfig,
    build_config,
    load_config,
)
from moelab.errors import ConfigError
from moelab.files import read_jsonl
from moelab.model.health import (
    LayerHealth,
    collapse_score,
    load_metrics,
)
from moelab.rundir import RunDir
from moelab.train.monitor import Monitor
from moelab.train.trainer import Trainer

# ---------------------------------------------------------------------------------------------
# Rules on crafted metric streams


def layer_health(
    share: list[float], layer: int = 0, top_k: int = 2, max_logit: float = 3.0, tokens: float = 1000.0
) -> dict[int, LayerHealth]:
    """The router_health fields the rules read, for one layer."""
    metrics = load_metrics([s * tokens for s in share])
    metrics.update(tokens=tokens, max_logit=max_logit, collapse_score=collapse_score(metrics["share"], top_k))
    return {layer: LayerHealth(**metrics)}


def noisy_share(rng: random.Random, E: int = 8, spread: float = 0.3) -> list[float]:
    raw = [1.0 + spread * (rng.random() - 0.5) * 2 for _ in range(E)]
    return [r / sum(raw) for r in raw]


def run_intervals(monitor: Monitor, shares, start: int = 1, rule: str | None = None, **kwargs) -> list:
    alerts = []
    for i, share in enumerate(shares):
        alerts += monitor.check_interval(start + i, 3.0, 1.0, layer_health(share, **kwargs))
    return [a for a in alerts if rule is None or a.rule == rule]


def test_healthy_stream_raises_nothing() -> None:
    rng = random.Random(0)
    monitor = Monitor(MonitorConfig(), num_experts=8, top_k=2)
    alerts = []
    for step in range(1, 2001):  # falling noisy loss, a gradient norm that drifts, balanced routing
        loss = 2.5 + 3.0 * math.exp(-step / 300) + 0.05 * rng.gauss(0, 1)
        grad = 0.4 + 0.6 * math.exp(-step / 200) + 0.03 * rng.gauss(0, 1) + step * 1e-4
        assert monitor.check_step(step, loss, grad) is None
        if step % 10 == 0:
            health = layer_health(noisy_share(rng), max_logit=2.0 + step / 400)
            alerts += monitor.check_interval(step, loss, grad, health)
            assert health[0].dead == 0 and health[0].starved == 0
    assert alerts == []


def test_nan_rule_names_what_was_not_finite_and_uses_the_configured_action() -> None:
    monitor = Monitor(MonitorConfig(on_nan="stop"))
    alert = monitor.check_step(7, float("nan"), 1.0)
    assert (alert.rule, alert.action, alert.step) == ("nan", "stop", 7)
    assert "loss" in alert.message
    alert = Monitor(MonitorConfig()).check_step(8, 2.0, float("inf"))
    assert alert.action == "rollback" and "gradient norm" in alert.message
    assert Monitor(MonitorConfig()).check_step(9, 2.0, 1.0) is None


@pytest.mark.parametrize("which", ["loss", "grad"])
def test_spike_fires_at_its_step_is_reported_at_the_interval_and_only_once(which) -> None:
    rng = random.Random(1)
    monitor = Monitor(MonitorConfig(spike_window=40, on_spike="rollback"))
    alerts = []
    for step in range(1, 121):
        loss, grad = 3.0 + 0.02 * rng.gauss(0, 1), 1.0 + 0.02 * rng.gauss(0, 1)
        if step == 73:
            loss, grad = (4.5, grad) if which == "loss" else (loss, 5.0)
        monitor.check_step(step, loss, grad)
        if step % 10 == 0:
            found = monitor.check_interval(step, loss, grad, {})
            if found:
                assert step == 80  # reported at the end of the interval holding step 73
            alerts += found
    rule = "loss_spike" if which == "loss" else "grad_spike"
    assert [(a.rule, a.step, a.action) for a in alerts] == [(rule, 73, "rollback")]
    assert alerts[0].value == (4.5 if which == "loss" else 5.0) and alerts[0].threshold < alerts[0].value


@pytest.mark.parametrize(
    "peak, min_ratio, fires",
    [
        (2.0, 3.0, False),  # a healthy-run-sized transient (8+ sigma here, 2x the mean): quiet by default
        (2.0, 0.0, True),  # without the floor the sigma rule alone fires on it
        (3.5, 3.0, True),  # a blow-up beyond the floor fires
    ],
)
def test_grad_spike_needs_both_sigma_and_ratio_to_the_mean(peak, min_ratio, fires) -> None:
    rng = random.Random(3)
    monitor = Monitor(MonitorConfig(spike_window=40, grad_spike_min_ratio=min_ratio))
    mean_before = []
    for step in range(1, 61):
        grad = 0.5 * (1.0 + 0.05 * rng.gauss(0, 1))
        if step == 55:
            grad = peak * statistics.fmean(mean_before[-40:])
        mean_before.append(grad)
        monitor.check_step(step, 3.0, grad)
    alerts = monitor.check_interval(60, 3.0, 0.5, {})
    assert [a.rule for a in alerts] == (["grad_spike"] if fires else [])
    if fires:
        assert alerts[0].step == 55
        assert alerts[0].threshold >= min_ratio * 0.5 * 0.9  # the floor is part of the limit
        # the message names the floor when there is one
        assert ("x the mean" in alerts[0].message) == (min_ratio > 0)
        if min_ratio > 0:
            assert f"at least {min_ratio:g}x the mean" in alerts[0].message


def test_spike_judging_waits_for_half_a_window() -> None:
    monitor = Monitor(MonitorConfig(spike_window=40))
    for step in range(1, 20):
        monitor.check_step(step, 3.0, 1.0)
    monitor.check_step(20, 30.0, 1.0)  # 19 values: not yet judged
    assert monitor.check_interval(20, 3.0, 1.0, {}) == []


def test_a_lasting_level_shift_alerts_once_then_adapts() -> None:
    rng = random.Random(2)
    monitor = Monitor(MonitorConfig(spike_window=40))
    alerts = []
    for step in range(1, 401):
        loss = (3.0 if step < 100 else 3.6) + 0.02 * rng.gauss(0, 1)
        monitor.check_step(step, loss, 1.0)
        if step % 10 == 0:
            alerts += monitor.check_interval(step, loss, 1.0, {})
    assert 1 <= len(alerts) <= 4 and all(a.rule == "loss_spike" for a in alerts)
    assert alerts[0].step == 100 and alerts[-1].step < 200


def test_interval_reports_step_maxima() -> None:
    monitor = Monitor(MonitorConfig())
    for step, (loss, grad) in enumerate([(3.0, 1.0), (3.5, 0.5), (2.9, 2.0)], start=1):
        monitor.check_step(step, loss, grad)
    metrics: dict = {}
    monitor.check_interval(3, 3.1, 2.0, {}, metrics)
    assert metrics == {"loss_max": 3.5, "grad_norm_max": 2.0}
    metrics = {}
    monitor.check_interval(4, 3.1, 2.0, {}, metrics)
    assert metrics == {}  # nothing since the last interval


def test_collapse_fires_after_persisting_and_rearms_after_recovery() -> None:
    cfg = MonitorConfig(persist_intervals=3, on_collapse="stop")
    monitor = Monitor(cfg, num_experts=8, top_k=2)
    collapsed = [0.5, 0.5] + [0.0] * 6
    balanced = [0.125] * 8
    alerts = run_intervals(monitor, [collapsed] * 2)
    assert alerts == []  # not yet persistent
    alerts = run_intervals(monitor, [collapsed], start=3, rule="collapse")
    assert [(a.rule, a.step, a.layer, a.action) for a in alerts] == [("collapse", 3, 0, "stop")]
    assert "2.0 effective experts of 8" in alerts[0].message
    assert run_intervals(monitor, [collapsed] * 5, start=4) == []  # a lasting collapse: reported once
    assert run_intervals(monitor, [balanced], start=9) == []  # recovered: re-armed
    again = run_intervals(monitor, [collapsed] * 3, start=10, rule="collapse")
    assert [(a.rule, a.step) for a in again] == [("collapse", 12)]


def test_a_de_facto_shared_expert_is_not_a_collapse() -> None:
    monitor = Monitor(MonitorConfig(persist_intervals=2), num_experts=8, top_k=2)
    shared = [0.5] + [0.5 / 7] * 7  # every token picks expert 0; max/mean = E/k
    assert run_intervals(monitor, [shared] * 10) == []


def test_collapse_imbalance_is_an_optional_absolute_trigger() -> None:
    monitor = Monitor(MonitorConfig(persist_intervals=2, collapse_imbalance=3.5), num_experts=8, top_k=2)
    shared = [0.5] + [0.5 / 7] * 7  # max/mean 4
    alerts = run_intervals(monitor, [shared] * 2)
    assert [a.rule for a in alerts] == ["collapse"]


def test_dead_experts_are_counted_every_interval_and_alert_after_persisting() -> None:
    monitor = Monitor(MonitorConfig(persist_intervals=3, dead_share=0.1, on_dead="rollback"), num_experts=4, top_k=2)
    floor = 0.1 / 4
    starving = [0.34, 0.33, 0.32, 0.01]  # expert 3 below 2.5%
    counts, alerts = [], []
    for step, share in enumerate([starving, starving, starving, starving, [0.25] * 4, starving], start=1):
        health = layer_health(share)
        alerts += [(step, a) for a in monitor.check_interval(step, 3.0, 1.0, health)]
        counts.append((health[0].starved, health[0].dead, health[0].dead_experts))
    assert counts == [(1, 0, []), (1, 0, []), (1, 1, [3]), (1, 1, [3]), (0, 0, []), (1, 0, [])]
    assert [(s, a.rule, a.action, a.value, a.threshold) for s, a in alerts] == [
        (3, "dead_experts", "rollback", 1.0, floor)
    ]


def test_an_interval_without_tokens_leaves_the_counters_alone() -> None:
    monitor = Monitor(MonitorConfig(persist_intervals=2), num_experts=4, top_k=2)
    starving = [0.5, 0.3, 0.2, 0.0]
    run_intervals(monitor, [starving])
    health = layer_health([0.0] * 4, tokens=0.0)
    assert monitor.check_interval(2, 3.0, 1.0, health) == []
    assert health[0].dead == 0
    alerts = run_intervals(monitor, [starving], start=3, rule="dead_experts")
    assert [a.step for a in alerts] == [3]


def test_logit_growth_alerts_once_with_hysteresis() -> None:
    monitor = Monitor(MonitorConfig(logit_growth=30.0, on_logit_growth="stop"), num_experts=4, top_k=2)
    balanced = [0.25] * 4
    fired = []
    for step, logit in enumerate([10.0, 29.0, 31.0, 29.0, 31.5, 26.0, 32.0, float("nan")], start=1):
        fired += [
            (step, a.action) for a in monitor.check_interval(step, 3.0, 1.0, layer_health(balanced, max_logit=logit))
        ]
    # 31 fires; 29 and 31.5 stay within the hysteresis band; 26 re-arms; 32 fires again; NaN stays firing
    assert fired == [(3, "stop"), (7, "stop")]
    fresh = Monitor(MonitorConfig(), num_experts=4, top_k=2)
    assert [a.rule for a in fresh.check_interval(1, 3.0, 1.0, layer_health(balanced, max_logit=float("inf")))] == [
        "logit_growth"
    ]


def test_rules_are_per_layer() -> None:
    monitor = Monitor(MonitorConfig(persist_intervals=1), num_experts=4, top_k=2)
    health = {**layer_health([0.25] * 4, layer=0), **layer_health([0.5, 0.5, 0.0, 0.0], layer=3)}
    alerts = monitor.check_interval(1, 3.0, 1.0, health)
    assert sorted((a.rule, a.layer) for a in alerts) == [("collapse", 3), ("dead_experts", 3)]


def test_a_rollback_restarts_the_persistence_counters() -> None:
    monitor = Monitor(MonitorConfig(persist_intervals=3), num_experts=8, top_k=2)
    collapsed = [0.5, 0.5] + [0.0] * 6
    assert run_intervals(monitor, [collapsed] * 2) == []
    monitor.rollbacks += 1  # what the trainer does when it rolls back
    assert run_intervals(monitor, [collapsed] * 2, start=3) == []  # counted again from 1
    assert [a.rule for a in run_intervals(monitor, [collapsed], start=5)] == ["collapse", "dead_experts"]


def test_state_dict_round_trip_gives_the_same_future_alerts() -> None:
    rng = random.Random(3)
    cfg = MonitorConfig(persist_intervals=3, spike_window=20)
    stream = []
    for step in range(1, 121):
        loss = 3.0 + 0.02 * rng.gauss(0, 1) + (2.0 if step == 95 else 0.0)
        share = [0.5, 0.5] + [0.0] * 6 if 60 <= step < 100 else noisy_share(rng)
        stream.append((step, loss, share))

    def play(monitor: Monitor, part) -> list:
        out = []
        for step, loss, share in part:
            monitor.check_step(step, loss, 1.0)
            if step % 5 == 0:
                out += [a.to_dict() for a in monitor.check_interval(step, loss, 1.0, layer_health(share))]
        return out

    straight = Monitor(cfg, 8, 2)
    expected = play(straight, stream)
    first = Monitor(cfg, 8, 2)
    head = play(first, stream[:72])  # mid-interval, mid-collapse
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # the trainer's checkpoint path: weights_only loading
    buffer.seek(0)
    second = Monitor(cfg, 8, 2)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert head + play(second, stream[72:]) == expected
    assert {a["rule"] for a in expected} >= {"collapse", "loss_spike", "dead_experts"}


def test_state_from_the_first_monitor_version_loads() -> None:
    old = {
        "loss": [3.0, 2.9],
        "grad": [1.0, 1.1],
        "starved": {"0": [0, 2]},
        "skewed": {"0": 4},
        "rollbacks": 1,
        "flagged": [["collapse", 0], ["nan", -1]],
    }
    monitor = Monitor(MonitorConfig(), 2, 1)
    monitor.load_state_dict(old)
    assert list(monitor.loss.values) == [3.0, 2.9] and monitor.skewed == {"0": 4} and monitor.rollbacks == 1
    assert monitor.firing == {("collapse", 0)}
    assert monitor.check_interval(1, 3.0, 1.0, {}) == []  # and it carries on


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("collapse_score", 0.0, "a number in (0, 1]"),
        ("collapse_score", 1.5, "a number in (0, 1]"),
        ("collapse_imbalance", 0.8, "0 (off) or a number > 1"),
        ("on_nan", "explode", "one of ('warn', 'stop', 'rollback')"),
        ("on_collapse", "ignore", "one of ('warn', 'stop', 'rollback')"),
        ("spike_window", 5, "an integer >= 10"),
        ("spike_sigma", 0.0, "a number > 0"),
        ("grad_spike_sigma", float("inf"), "a finite number"),
        ("spike_min_rel", 1.0, "a fraction in [0, 1)"),
        ("grad_spike_min_ratio", -1.0, "a number >= 0"),
        ("dead_share", 1.0, "a fraction in (0, 1)"),
        ("persist_intervals", 0, "an integer >= 1"),
        ("logit_growth", -1.0, "a number > 0"),
        ("max_rollbacks", -1, "an integer >= 0"),
    ],
)
def test_bad_monitor_settings_name_field_value_and_allowed(key, value, allowed) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"monitor": {key: value}})
    assert info.value.field == f"monitor.{key}"
    assert allowed in str(info.value) and repr(value) in str(info.value)


# ---------------------------------------------------------------------------------------------
# End to end on the tiny preset


def quiet(cfg, out, **kwargs):
    return Trainer(cfg, out, log=kwargs.pop("log", lambda s: None), progress=False, **kwargs)


@pytest.fixture(scope="module")
def healthy_tiny(tmp_path_factory):
    """The tiny preset as it is: the healthy run the NaN-injected one is compared with."""
    run = tmp_path_factory.mktemp("monitor") / "healthy"
    result = quiet(load_config(preset="tiny", overrides=["train.sample_tokens=0"]), run).fit()
    return run, result


@pytest.mark.slow
def test_healthy_tiny_run_raises_no_alert_and_logs_every_metric(healthy_tiny) -> None:
    run, result = healthy_tiny
    assert result.stopped_by == "max_steps"
    assert not (run / "alerts.jsonl").exists()
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 60 // 5
    names = [
        "share",
        "imbalance",
        "cv",
        "maxvio",
        "effective_experts",
        "collapse_score",
        "starved",
        "dead",
        "dead_experts",
        "entropy",
        "marginal_entropy",
        "z_loss",
        "max_logit",
        "dropped_frac",
        "weight_norm",
        "grad_norm",
        "similarity_max",
        "similarity_mean",
        "similarity_pair",
        "tokens",
    ]
    for row in rows:
        for layer in (0, 1):
            missing = [n for n in names if f"router.{layer}.{n}" not in row]
            assert not missing, (row["step"], layer, missing)
        assert row["grad_norm_max"] >= row["grad_norm"] and row["loss_max"] >= row["loss"] - 1e-9


@pytest.mark.slow
def test_injected_nan_is_rolled_back_skipped_and_survived(healthy_tiny, tmp_path) -> None:
    healthy, clean = healthy_tiny
    run = tmp_path / "nan"
    # tiny checkpoints every 30 steps: the NaN at step 40 rolls back to 30 and skips batches 31-40.
    cfg = load_config(preset="tiny", overrides=["train.sample_tokens=0", "monitor.debug_nan_step=40"])
    result = quiet(cfg, run).fit()
    assert result.stopped_by == "max_steps" and result.step == 60
    alerts = read_jsonl(run / "alerts.jsonl")
    assert [(a["rule"], a["step"], a["action"]) for a in alerts] == [("nan", 40, "rollback")]
    rows = read_jsonl(run / "metrics.jsonl")
    assert [(r["step"], r["to_step"]) for r in rows if r.get("event") == "rollback"] == [(40, 30)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rollbacks"] == 1 and summary["alerts"] == 1
    # The skipped window (10 of 60 batches) hardly matters: the final loss is close to the clean run's.
    assert abs(result.val_loss - clean.val_loss) / clean.val_loss < 0.03
    assert math.isfinite(result.val_loss)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("MOELAB_HEALTHY_PRESET"),
    reason="set MOELAB_HEALTHY_PRESET=small-moe to train a whole preset (minutes)",
)
def test_a_whole_preset_raises_no_false_alarm(tmp_path) -> None:
    """The no-false-alarm check on a full preset, e.g. after its MoE settings change:
    MOELAB_HEALTHY_PRESET=small-moe pytest tests/train/test_monitor.py -k false_alarm"""
    run = tmp_path / "run"
    quiet(load_config(preset=os.environ["MOELAB_HEALTHY_PRESET"], overrides=["train.sample_tokens=0"]), run).fit()
    alerts = read_jsonl(run / "alerts.jsonl")
    assert alerts == [], "\n".join(f"step {a['step']}: [{a['rule']}] {a['message']}" for a in alerts)


def _poison_every_time(trainer, step) -> None:
    trainer.counters.nan_injected = False  # the debug NaN comes back on every replay: a persistent fault


SHORT = [
    "train.max_steps=12",
    "train.checkpoint_every=4",
    "train.log_every=2",
    "train.eval_every=12",
    "train.sample_tokens=0",
]


def test_exhausted_rollbacks_stop_the_run_with_a_clear_message(tmp_path) -> None:
    run = tmp_path / "run"
    said: list[str] = []
    cfg = load_config(preset="tiny", overrides=SHORT + ["monitor.debug_nan_step=6", "monitor.max_rollbacks=2"])
    result = quiet(cfg, run, log=said.append, step_hook=_poison_every_time).fit()
    assert result.stopped_by == "monitor" and result.step == 5
    rows = read_jsonl(run / "metrics.jsonl")
    assert [(r["step"], r["to_step"]) for r in rows if r.get("event") == "rollback"] == [(6, 4), (6, 4)]
    stop = [r for r in rows if r.get("event") == "stop"]
    assert len(stop) == 1 and "rollback retries exhausted (2 of monitor.max_rollbacks = 2 used)" in stop[0]["message"]
    assert "non-finite loss at step 6" in stop[0]["message"]
    assert any("rollback retries exhausted" in s for s in said)  # said even without a progress bar
    assert len(read_jsonl(run / "alerts.jsonl")) == 3
    assert int(list_checkpoints(run)[-1].name.split("_")[1]) == 5  # the last good step is saved


def test_stop_action_stops_at_the_bad_step(tmp_path) -> None:
    run = tmp_path / "run"
    cfg = load_config(preset="tiny", overrides=SHORT + ["monitor.debug_nan_step=7", "monitor.on_nan=stop"])
    result = quiet(cfg, run).fit()
    assert result.stopped_by == "monitor" and result.step == 6
    assert not [r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "rollback"]
    assert RunDir(run).read_summary()["stopped_by"] == "monitor"


def test_warn_action_on_nan_skips_the_step_and_continues(tmp_path) -> None:
    run = tmp_path / "run"
    cfg = load_config(preset="tiny", overrides=SHORT + ["monitor.debug_nan_step=7", "monitor.on_nan=warn"])
    result = quiet(cfg, run).fit()
    assert result.stopped_by == "max_steps" and result.step == 12 and math.isfinite(result.val_loss)
    assert [a["rule"] for a in read_jsonl(run / "alerts.jsonl")] == ["nan"]


def test_an_interval_rule_with_action_stop_stops_the_run(tmp_path) -> None:
    run = tmp_path / "run"
    # max/mean load is above 1.0001 in any real interval: the rule fires at the first one.
    cfg = load_config(
        preset="tiny",
        overrides=SHORT
        + ["monitor.collapse_imbalance=1.0001", "monitor.persist_intervals=1", "monitor.on_collapse=stop"],
    )
    result = quiet(cfg, run).fit()
    assert result.stopped_by == "monitor" and result.step == 2
    alerts = read_jsonl(run / "alerts.jsonl")
    assert "collapse" in {a["rule"] for a in alerts} and all(
        a["action"] == "stop" for a in alerts if a["rule"] == "collapse"
    )
    rows = read_jsonl(run / "metrics.jsonl")
    assert any(r.get("event") == "stop" for r in rows)
    # the alert rows of metrics.jsonl carry the layer, as alerts.jsonl does
    layers = {a["layer"] for a in alerts if a["rule"] == "collapse"}
    assert layers and {r["layer"] for r in rows if r.get("event") == "alert" and r.get("rule") == "collapse"} == layers
