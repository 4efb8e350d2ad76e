"""Router health metrics and training guardrails.

`router_health` turns one logging interval's router statistics into the per-layer metrics written
to metrics.jsonl (keys `router.<layer>.<name>`). `Monitor` applies the rules (non-finite loss,
loss and grad-norm spikes, expert collapse, dead experts, router-logit growth) and says which action
each triggers: warn, stop or rollback.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from moelab.config import MonitorConfig


# ---------------------------------------------------------------------------------------------
# Metrics from hand-checkable inputs (unit-tested on built routing tables)


def load_metrics(tokens_per_expert: list[float]) -> dict[str, float | list[float]]:
    """Token share per expert, imbalance (max/mean), coefficient of variation, MaxVio."""
    load = torch.tensor(tokens_per_expert, dtype=torch.float64)
    total = float(load.sum())
    if total <= 0:
        n = len(tokens_per_expert)
        return {"share": [0.0] * n, "imbalance": 0.0, "cv": 0.0, "maxvio": 0.0}
    mean = load.mean()
    return {
        "share": (load / total).tolist(),
        "imbalance": float(load.max() / mean),
        "cv": float(load.std(unbiased=False) / mean),
        "maxvio": float((load.max() - mean) / mean),  # Wang et al. 2024 (loss-free balancing)
    }


def entropy(p: list[float]) -> float:
    """Shannon entropy in nats of a distribution (normalised first)."""
    t = torch.tensor(p, dtype=torch.float64)
    s = float(t.sum())
    if s <= 0:
        return 0.0
    t = t / s
    t = t[t > 0]
    return float(-(t * t.log()).sum())


def expert_similarity(gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, float]:
    """Pairwise cosine similarity of experts' flattened weights: max and mean over pairs."""
    E = gate_up.shape[0]
    if E < 2:
        return {"similarity_max": 0.0, "similarity_mean": 0.0}
    flat = torch.cat([gate_up.detach().reshape(E, -1), down.detach().reshape(E, -1)], dim=1).float()
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = flat @ flat.T
    off = sim[~torch.eye(E, dtype=torch.bool, device=sim.device)]
    return {"similarity_max": float(off.max()), "similarity_mean": float(off.mean())}


def expert_norms(tensors: list[torch.Tensor]) -> list[float]:
    """Per-expert L2 norm over stacked [E, ...] tensors (weights or their gradients)."""
    squares = sum(t.detach().float().reshape(t.shape[0], -1).square().sum(1) for t in tensors)
    return squares.sqrt().tolist()


def router_health(model: nn.Module, router_stats: dict[int, dict[str, Any]], with_similarity: bool = True) -> dict[str, Any]:
    """Flat metrics `router.<layer>.<name>` for one logging interval."""
    out: dict[str, Any] = {}
    layers = {i: b.ffn for i, b in enumerate(model.blocks) if b.is_moe}
    for layer, stats in router_stats.items():
        moe = layers[layer]
        prefix = f"router.{layer}."
        metrics: dict[str, Any] = load_metrics(stats["tokens_per_expert"])
        metrics["entropy"] = stats["entropy"]  # mean per-token routing entropy
        metrics["marginal_entropy"] = entropy(stats["mean_prob"])  # entropy of the mean routing
        metrics["z_loss"] = stats["z_loss"]
        metrics["max_logit"] = stats["max_logit"]
        metrics["dropped_frac"] = stats["dropped_frac"]
        experts = [moe.experts.gate_up_proj, moe.experts.down_proj]
        metrics["weight_norm"] = expert_norms(experts)
        if all(p.grad is not None for p in experts):
            metrics["grad_norm"] = expert_norms([p.grad for p in experts])
        if with_similarity:
            metrics.update(expert_similarity(*experts))
        for name, value in metrics.items():
            out[prefix + name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Rules


@dataclass
class Alert:
    step: int
    rule: str  # nan | loss_spike | grad_spike | collapse | dead_experts | logit_growth
    action: str  # warn | stop | rollback
    message: str
    layer: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class RollingStats:
    def __init__(self, window: int):
        self.values: deque[float] = deque(maxlen=window)

    def is_spike(self, value: float, sigma: float, min_points: int) -> bool:
        if len(self.values) < min_points:
            return False
        mean = sum(self.values) / len(self.values)
        var = sum((v - mean) ** 2 for v in self.values) / len(self.values)
        # NOTE: a floor on the spread keeps a very flat curve from flagging ordinary noise.
        std = max(math.sqrt(var), 0.02 * abs(mean), 1e-8)
        return value > mean + sigma * std

    def push(self, value: float) -> None:
        self.values.append(value)


class Monitor:
    """Stateful rules over the logged metrics; its state goes into checkpoints."""

    def __init__(self, cfg: MonitorConfig, num_experts: int = 0, top_k: int = 1):
        self.cfg = cfg
        self.num_experts = num_experts
        self.top_k = top_k
        self.loss = RollingStats(cfg.spike_window)
        self.grad = RollingStats(cfg.spike_window)
        self.starved: dict[str, list[int]] = {}  # layer -> consecutive starved intervals per expert
        self.skewed: dict[str, int] = {}  # layer -> consecutive intervals above the collapse threshold
        self.rollbacks = 0
        self.flagged: set[tuple[str, int | None]] = set()  # (rule, layer) already alerted: alert once

    @property
    def collapse_threshold(self) -> float:
        """Imbalance (max/mean load) that counts as collapse: halfway between balanced (1) and
        everything on k experts (E/k), unless configured."""
        if self.cfg.collapse_imbalance > 0:
            return self.cfg.collapse_imbalance
        return 1.0 + 0.5 * (self.num_experts / max(self.top_k, 1) - 1.0)

    def check_step(self, step: int, loss: float, grad_norm: float) -> Alert | None:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return None
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        return Alert(step, "nan", self.cfg.on_nan, f"non-finite {what} at step {step} (loss {loss}, grad norm {grad_norm})")

    def check_interval(self, step: int, loss: float, grad_norm: float, health: dict[str, Any]) -> list[Alert]:
        alerts: list[Alert] = []
        min_points = max(5, self.cfg.spike_window // 2)
        if self.loss.is_spike(loss, self.cfg.spike_sigma, min_points):
            alerts.append(Alert(step, "loss_spike", self.cfg.on_spike, f"loss spike at step {step}: {loss:.3f} vs recent mean {sum(self.loss.values) / len(self.loss.values):.3f}"))
        if self.grad.is_spike(grad_norm, self.cfg.spike_sigma, min_points):
            alerts.append(Alert(step, "grad_spike", self.cfg.on_spike, f"gradient-norm spike at step {step}: {grad_norm:.3g} vs recent mean {sum(self.grad.values) / len(self.grad.values):.3g}"))
        self.loss.push(loss)
        self.grad.push(grad_norm)
        for layer in sorted({int(k.split(".")[1]) for k in health if k.startswith("router.")}):
            alerts.extend(self._layer_rules(step, layer, health))
        return alerts

    def _once(self, rule: str, layer: int | None, alert: Alert) -> list[Alert]:
        if (rule, layer) in self.flagged:
            return []
        self.flagged.add((rule, layer))
        return [alert]

    def _layer_rules(self, step: int, layer: int, health: dict[str, Any]) -> list[Alert]:
        p = f"router.{layer}."
        alerts: list[Alert] = []
        imbalance = health[p + "imbalance"]
        self.skewed[str(layer)] = self.skewed.get(str(layer), 0) + 1 if imbalance >= self.collapse_threshold else 0
        if self.skewed[str(layer)] >= self.cfg.persist_intervals:
            share = health[p + "share"]
            top = max(range(len(share)), key=share.__getitem__)
            alerts += self._once("collapse", layer, Alert(
                step, "collapse", self.cfg.on_collapse,
                f"layer {layer}: routing collapsed, max/mean expert load {imbalance:.2f} (threshold {self.collapse_threshold:.2f}) "
                f"for {self.skewed[str(layer)]} intervals; expert {top} takes {share[top]:.0%} of slots",
                layer))
        share = health[p + "share"]
        E = len(share)
        floor = self.cfg.dead_share / E
        counters = self.starved.setdefault(str(layer), [0] * E)
        for e, s in enumerate(share):
            counters[e] = counters[e] + 1 if s < floor else 0
        dead = [e for e, c in enumerate(counters) if c >= self.cfg.persist_intervals]
        if dead:
            alerts += self._once("dead_experts", layer, Alert(
                step, "dead_experts", self.cfg.on_dead,
                f"layer {layer}: {len(dead)} dead expert(s) {dead[:8]} (share below {floor:.2%} for {self.cfg.persist_intervals} intervals)",
                layer))
        health[p + "dead"] = len(dead)
        max_logit = health[p + "max_logit"]
        if max_logit > self.cfg.logit_growth:
            alerts += self._once("logit_growth", layer, Alert(
                step, "logit_growth", self.cfg.on_logit_growth,
                f"layer {layer}: max router logit {max_logit:.1f} exceeds {self.cfg.logit_growth:g} (bf16 softmax loses precision)",
                layer))
        return alerts

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": list(self.loss.values),
            "grad": list(self.grad.values),
            "starved": {k: list(v) for k, v in self.starved.items()},
            "skewed": dict(self.skewed),
            "rollbacks": self.rollbacks,
            "flagged": [[rule, -1 if layer is None else layer] for rule, layer in sorted(self.flagged, key=str)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.values.extend(float(v) for v in state.get("loss", []))
        self.grad.values.extend(float(v) for v in state.get("grad", []))
        self.starved = {k: [int(x) for x in v] for k, v in state.get("starved", {}).items()}
        self.skewed = {k: int(v) for k, v in state.get("skewed", {}).items()}
        self.rollbacks = int(state.get("rollbacks", 0))
        self.flagged = {(rule, None if layer == -1 else int(layer)) for rule, layer in state.get("flagged", [])}
