"""Training guardrails over the router health metrics of moelab.model.health.

`Monitor` applies the rules and says which action each one triggers (warn, stop or rollback):

    nan           non-finite loss or gradient norm at a step          (checked every step)
    loss_spike    step loss above rolling mean + k sigma               (checked every step, reported
    grad_spike    step gradient norm above rolling mean + k' sigma      at the next logging interval)
                  and at least r times the rolling mean
    collapse      routing concentrated on few experts for n intervals (per MoE layer, per interval)
    dead_experts  experts below a share floor for n intervals         (per MoE layer, per interval)
    logit_growth  max router logit above a limit                      (per MoE layer, per interval)

The layer rules read each layer's `LayerHealth` record and judge it with
moelab.model.health.judge_layer, the judgement diagnose also applies; what the monitor adds is
persistence over intervals, the starved/dead counts it fills into the records, and when to alert.
The monitor's state (rolling windows, persistence counters, armed rules) goes into
checkpoints so that a resumed run carries on exactly; docs/monitoring.md explains every threshold.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from moelab.config import MonitorConfig
from moelab.model.health import LayerHealth, dead_floor, effective_experts, judge_layer

# ---------------------------------------------------------------------------------------------
# Rules


RULES = ("nan", "loss_spike", "grad_spike", "collapse", "dead_experts", "logit_growth")


@dataclass
class Alert:
    step: int  # the step the condition was seen at (spikes are reported at the next interval)
    rule: str  # one of RULES
    action: str  # warn | stop | rollback
    message: str
    layer: int | None = None
    value: float | None = None  # the measured value that tripped the rule
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class RollingStats:
    """Mean and standard deviation of the last `window` values, for spike detection."""

    def __init__(self, window: int):
        self.values: deque[float] = deque(maxlen=window)

    def mean_std(self) -> tuple[float, float]:
        n = len(self.values)
        mean = sum(self.values) / n
        var = sum((v - mean) ** 2 for v in self.values) / n
        return mean, math.sqrt(var)

    def limit(self, sigma: float, rel_floor: float, min_points: int, min_ratio: float = 0.0) -> float | None:
        """mean + sigma * std over the window, and at least min_ratio * mean; None while the window
        is still filling. NOTE: the spread is floored at a fraction of the mean so a very flat
        stretch of the curve does not turn ordinary noise into a spike."""
        if len(self.values) < min_points:
            return None
        mean, std = self.mean_std()
        return max(mean + sigma * max(std, rel_floor * abs(mean), 1e-12), min_ratio * mean)

    def push(self, value: float, cap: float | None = None) -> None:
        # NOTE: a spike enters the window clipped to the limit it broke: left whole it would inflate
        # the spread and hide the next spike; left out, a lasting level shift would alarm forever.
        self.values.append(value if cap is None else min(value, cap))


@dataclass
class _Spike:
    """The first spiking step of a logging interval, its peak and how many steps spiked."""

    step: int
    value: float
    limit: float
    mean: float
    peak: float
    count: int = 1


class Monitor:
    """Stateful rules over the per-step values and the logged metrics; its state goes into checkpoints.

    The trainer calls `check_step` every step (returns a `nan` alert or None: the step must then be
    skipped) and `check_interval` at every logging interval (returns the alerts to act on, fills
    the stateful fields `starved`, `dead` and `dead_experts` of each layer's `LayerHealth`, and adds
    the interval's `loss_max` and `grad_norm_max` to the metrics line it is given).

    Layer rules alert when their condition starts to hold and re-arm once it has cleared, so a
    collapse that recovers and comes back (or persists after a rollback) is reported again, while a
    lasting condition is reported once instead of every interval."""

    def __init__(self, cfg: MonitorConfig, num_experts: int = 0, top_k: int = 1):
        self.cfg = cfg
        self.num_experts = num_experts
        self.top_k = top_k
        self.loss = RollingStats(cfg.spike_window)
        self.grad = RollingStats(cfg.spike_window)
        self.pending: dict[str, _Spike] = {}  # spike rule -> spike seen since the last interval
        self.interval_max: dict[str, float] = {}  # loss / grad_norm -> max over the interval's steps
        self.starved: dict[str, list[int]] = {}  # layer -> consecutive starved intervals per expert
        self.skewed: dict[str, int] = {}  # layer -> consecutive intervals above the collapse threshold
        self.firing: set[tuple[str, int]] = set()  # (rule, layer) alerted and not yet cleared
        self.rollbacks = 0  # incremented by the trainer on every rollback
        self.rollbacks_seen = 0

    @property
    def min_points(self) -> int:
        """Values needed in a rolling window before spikes are judged: half the window."""
        return max(5, self.cfg.spike_window // 2)

    # -- every step ----------------------------------------------------------------------------

    def check_step(self, step: int, loss: float, grad_norm: float) -> Alert | None:
        """A `nan` alert when the loss or gradient norm is not finite (the step must be skipped);
        otherwise records the values for the spike rules and returns None."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            return Alert(
                step, "nan", self.cfg.on_nan, f"non-finite {what} at step {step} (loss {loss}, grad norm {grad_norm})"
            )
        for key, value in (("loss", loss), ("grad_norm", grad_norm)):
            self.interval_max[key] = max(self.interval_max.get(key, -math.inf), value)
        self._spike("loss_spike", self.loss, step, loss, self.cfg.spike_sigma)
        # NOTE: healthy runs have single steps at 1.6-2.2x the rolling gradient norm (7.6 sigma and
        # more, docs/monitoring.md), transients the loss does not follow; the ratio floor keeps
        # those quiet while blow-ups, many times the mean, still fire.
        self._spike("grad_spike", self.grad, step, grad_norm, self.cfg.grad_spike_sigma, self.cfg.grad_spike_min_ratio)
        return None

    def _spike(
        self, rule: str, stats: RollingStats, step: int, value: float, sigma: float, min_ratio: float = 0.0
    ) -> None:
        limit = stats.limit(sigma, self.cfg.spike_min_rel, self.min_points, min_ratio)
        spiking = limit is not None and value > limit
        if spiking:
            seen = self.pending.get(rule)
            if seen is None:
                self.pending[rule] = _Spike(step, value, limit, stats.mean_std()[0], value)
            else:
                seen.peak, seen.count = max(seen.peak, value), seen.count + 1
        stats.push(value, limit if spiking else None)

    # -- every logging interval ------------------------------------------------------------------

    def check_interval(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        health: dict[int, LayerHealth],
        metrics: dict[str, Any] | None = None,
    ) -> list[Alert]:
        """Alerts for the interval ending at `step`: spikes seen since the last interval, then the
        layer rules on `health` (router_health's records, whose stateful fields this fills in). The
        interval's per-step maxima go into `metrics`, the interval's metrics line, when given. `loss`
        and `grad_norm` are the interval's logged values; the spike rules judge the per-step values
        that `check_step` saw instead, so they are not used here."""
        if self.rollbacks != self.rollbacks_seen:
            # NOTE: the trainer rolled back since the last interval: the model is an older one, so
            # the persistence counters describe a trajectory that no longer exists. Start them again.
            self.rollbacks_seen = self.rollbacks
            self.starved.clear()
            self.skewed.clear()
            self.firing.clear()
        alerts = self._spike_alerts()
        if metrics is not None:
            metrics.update({f"{key}_max": value for key, value in self.interval_max.items()})
        self.interval_max.clear()
        for layer, record in sorted(health.items()):
            alerts.extend(self._layer_rules(step, layer, record))
        return alerts

    def _spike_alerts(self) -> list[Alert]:
        alerts = []
        cfg = self.cfg
        rules = (
            ("loss_spike", "loss", ".3f", f"+ {cfg.spike_sigma:g} sigma"),
            (
                "grad_spike",
                "gradient norm",
                ".3g",
                f"+ {cfg.grad_spike_sigma:g} sigma"
                + (f", and at least {cfg.grad_spike_min_ratio:g}x the mean," if cfg.grad_spike_min_ratio > 0 else ""),
            ),
        )
        for rule, what, fmt, rule_text in rules:
            s = self.pending.pop(rule, None)
            if s is None:
                continue
            more = f"; {s.count} spiking steps in the interval, peak {s.peak:{fmt}}" if s.count > 1 else ""
            alerts.append(
                Alert(
                    s.step,
                    rule,
                    cfg.on_spike,
                    f"{what} spike at step {s.step}: {s.value:{fmt}} above the limit {s.limit:{fmt}} "
                    f"(rolling mean {s.mean:{fmt}} {rule_text} over up to {cfg.spike_window} steps){more}",
                    value=s.value,
                    threshold=s.limit,
                )
            )
        return alerts

    def _fire(self, rule: str, layer: int, condition: bool, alert: Alert | None) -> list[Alert]:
        """Alert once when a condition starts to hold; re-arm when it clears."""
        key = (rule, layer)
        if not condition:
            self.firing.discard(key)
            return []
        if key in self.firing:
            return []
        self.firing.add(key)
        return [alert]

    def _dead(self, key: str) -> list[int]:
        """Experts of a layer starved for persist_intervals consecutive intervals."""
        return [e for e, c in enumerate(self.starved.get(key, [])) if c >= self.cfg.persist_intervals]

    def _layer_rules(self, step: int, layer: int, health: LayerHealth) -> list[Alert]:
        cfg = self.cfg
        share = health.share
        E = len(share)
        key = str(layer)
        judged = judge_layer(health, cfg, self.top_k)
        if not judged.routed:
            # An interval without routed tokens says nothing about the routing: counters stay put.
            health.dead_experts = self._dead(key)
            health.starved, health.dead = 0, len(health.dead_experts)
            return []
        alerts: list[Alert] = []

        # Collapse: routing concentrated on few experts (collapse score), or max/mean load above an
        # absolute limit when one is configured, for persist_intervals consecutive intervals.
        score = judged.score
        self.skewed[key] = self.skewed.get(key, 0) + 1 if judged.skewed else 0
        collapsed = self.skewed[key] >= cfg.persist_intervals
        top = max(range(E), key=share.__getitem__)
        n_eff = effective_experts(share)
        alerts += self._fire(
            "collapse",
            layer,
            collapsed,
            Alert(
                step,
                "collapse",
                cfg.on_collapse,
                f"layer {layer}: routing collapsed onto {n_eff:.1f} effective experts of {E} (collapse score {score:.2f} >= "
                f"{cfg.collapse_score:g} for {self.skewed[key]} intervals); expert {top} takes {share[top]:.0%} of the slots, "
                f"max/mean load {health.imbalance:.2f}",
                layer,
                value=score,
                threshold=cfg.collapse_score,
            )
            if collapsed
            else None,
        )

        # Dead experts: share below dead_share / E for persist_intervals consecutive intervals.
        floor = dead_floor(cfg, E)
        counters = self.starved.get(key)
        if counters is None or len(counters) != E:
            counters = [0] * E
        starved = set(judged.starved)
        self.starved[key] = [c + 1 if e in starved else 0 for e, c in enumerate(counters)]
        dead = self._dead(key)
        health.starved, health.dead, health.dead_experts = len(starved), len(dead), dead
        alerts += self._fire(
            "dead_experts",
            layer,
            bool(dead),
            Alert(
                step,
                "dead_experts",
                cfg.on_dead,
                f"layer {layer}: {len(dead)} dead expert(s) {dead[:8]}{'...' if len(dead) > 8 else ''} "
                f"(share below {floor:.2%} for {cfg.persist_intervals} intervals)",
                layer,
                value=float(len(dead)),
                threshold=floor,
            )
            if dead
            else None,
        )

        # Router logit growth: a non-finite logit counts as grown.
        max_logit = health.max_logit if health.max_logit is not None else 0.0
        grown = judged.logit_grown
        key_fire = ("logit_growth", layer)
        if key_fire in self.firing and math.isfinite(max_logit) and max_logit > 0.9 * cfg.logit_growth:
            grown = True  # NOTE: hysteresis: re-arm only below 90% of the limit, so a logit hovering at it alerts once
        alerts += self._fire(
            "logit_growth",
            layer,
            grown,
            Alert(
                step,
                "logit_growth",
                cfg.on_logit_growth,
                f"layer {layer}: max router logit {max_logit:.1f} exceeds {cfg.logit_growth:g} "
                "(softmax in bf16 loses precision; consider router z-loss)",
                layer,
                value=max_logit,
                threshold=cfg.logit_growth,
            )
            if grown
            else None,
        )
        return alerts

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": list(self.loss.values),
            "grad": list(self.grad.values),
            "pending": {rule: asdict(s) for rule, s in self.pending.items()},
            "interval_max": dict(self.interval_max),
            "starved": {k: list(v) for k, v in self.starved.items()},
            "skewed": dict(self.skewed),
            "firing": [[rule, layer] for rule, layer in sorted(self.firing)],
            "rollbacks": self.rollbacks,
            "rollbacks_seen": self.rollbacks_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict`; checkpoints written by earlier versions (without some keys,
        or with the old alert-once `flagged` list) load too."""
        self.loss.values.clear()
        self.grad.values.clear()
        self.loss.values.extend(float(v) for v in state.get("loss", []))
        self.grad.values.extend(float(v) for v in state.get("grad", []))
        self.pending = {rule: _Spike(**s) for rule, s in state.get("pending", {}).items()}
        self.interval_max = {k: float(v) for k, v in state.get("interval_max", {}).items()}
        self.starved = {k: [int(x) for x in v] for k, v in state.get("starved", {}).items()}
        self.skewed = {k: int(v) for k, v in state.get("skewed", {}).items()}
        firing = state.get("firing", state.get("flagged", []))
        self.firing = {(str(rule), int(layer)) for rule, layer in firing if layer is not None and int(layer) >= 0}
        self.rollbacks = int(state.get("rollbacks", 0))
        self.rollbacks_seen = int(state.get("rollbacks_seen", self.rollbacks))
