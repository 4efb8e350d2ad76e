"""Router health statistics: per-layer load, entropy, collapse, dead experts, logits and expert
weights, computed from a model's MoE layers and one interval's routing statistics.

`router_health` returns one `LayerHealth` per MoE layer: a typed record with a field per metric.
It is written to metrics.jsonl as flat keys `router.<layer>.<name>` (`LayerHealth.to_metrics`) and
read back by the same class (`LayerHealth.from_metrics`), so no other module parses those keys.
`judge_layer` is the one judgement of a layer (collapse, starved experts, logit growth): the
training monitor (moelab.train.monitor) applies it to every interval and diagnose to the end of a
run. The functions take plain lists and tensors so that each is unit-tested on hand-built routing
tables; the monitor, the distributed runtime and diagnose compute no statistic of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from moelab.config import MonitorConfig


def load_metrics(tokens_per_expert: list[float]) -> dict[str, float | list[float]]:
    """Token share per expert and three views of its imbalance:

    imbalance  max / mean load (1 = balanced; E/k = everything on k experts under top-k routing)
    cv         coefficient of variation, std / mean (population std; 0 = balanced)
    maxvio     (max - mean) / mean, the MaxVio of Wang et al. 2024 (loss-free balancing)

    An interval with no tokens has no share to speak of: zeros, which the rules skip."""
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
        "maxvio": float((load.max() - mean) / mean),
    }


def entropy(p: list[float]) -> float:
    """Shannon entropy in nats of a distribution (normalised first; zeros contribute nothing)."""
    t = torch.tensor(p, dtype=torch.float64)
    s = float(t.sum())
    if s <= 0:
        return 0.0
    t = t / s
    t = t[t > 0]
    return float(-(t * t.log()).sum())


def effective_experts(share: list[float]) -> float:
    """exp(entropy of the load share): the number of equally loaded experts that would have the
    same entropy. E when balanced; k when top-k routing sends everything to the same k experts."""
    return math.exp(entropy(share)) if sum(share) > 0 else 0.0


def collapse_score(share: list[float], top_k: int) -> float:
    """How far routing has concentrated, from 0 (balanced, E effective experts) to 1 (k effective
    experts: every token goes to the same k, the least spread top-k routing can have).

    NOTE: this uses the entropy of the load, not max/mean. One expert that every token picks as one
    of its k (a de facto shared expert, common and harmless in small models) already drives max/mean
    to its ceiling E/k, while the other E-1 experts still share the rest; the effective count sees
    that those experts are in use. A collapse also starves the others, which max/mean cannot tell."""
    E = len(share)
    k = max(1, min(top_k, E))
    if E <= k or sum(share) <= 0:
        return 0.0
    score = (E - effective_experts(share)) / (E - k)
    return min(1.0, max(0.0, score))


def expert_weight_stats(gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, Any]:
    """Per-expert weight L2 norms and pairwise cosine similarity of the experts' flattened weights
    (max and mean over pairs, and the most similar pair), from one E x E Gram matrix.

    NOTE: the Gram matrix is summed per projection instead of concatenating the flattened experts,
    which would copy every expert weight each logging interval; the E x E arithmetic after it runs
    on the CPU in float64 (tiny, and one device sync). Cosine similarity of raw weights finds copies
    (upcycled experts that never diverged, experts trained on the same tokens); it does not see
    experts that compute the same function with permuted hidden units."""
    E = gate_up.shape[0]
    gram_EE = sum(
        torch.mm(w.detach().reshape(E, -1).float(), w.detach().reshape(E, -1).float().T) for w in (gate_up, down)
    )
    gram = gram_EE.double().cpu()
    norms = gram.diagonal().clamp_min(0).sqrt()
    out: dict[str, Any] = {"weight_norm": norms.tolist()}
    if E < 2:
        out.update(similarity_max=0.0, similarity_mean=0.0, similarity_pair=[0, 0])
        return out
    cos = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    off = ~torch.eye(E, dtype=torch.bool)
    best = int(cos.masked_fill(~off, -math.inf).argmax())
    i, j = sorted(divmod(best, E))
    out.update(similarity_max=float(cos[i, j]), similarity_mean=float(cos[off].mean()), similarity_pair=[i, j])
    return out


def expert_norms(tensors: list[torch.Tensor]) -> list[float]:
    """Per-expert L2 norm over stacked [E, ...] tensors (weights or their gradients), all together."""
    E = tensors[0].shape[0]
    per_tensor = [torch.linalg.vector_norm(t.detach().reshape(E, -1), dim=1, dtype=torch.float32) for t in tensors]
    return torch.stack(per_tensor).double().cpu().square().sum(0).sqrt().tolist()


# ---------------------------------------------------------------------------------------------
# The per-layer record


@dataclass(kw_only=True)
class LayerHealth:
    """One MoE layer's router health over one logging interval (docs/monitoring.md defines each
    field). The load fields are in every version's metrics; the rest are None where a run was
    written before they were logged (or, for the optional ones, where they were not measured).

    NOTE: the field names are the on-disk names and their order the key order of a layer's keys in
    a metrics.jsonl line: never rename a field, or runs already written read it as missing."""

    tokens: float | None = None  # tokens routed in the interval
    share: list[float]  # [E] slots each expert processed / all processed slots
    imbalance: float  # max / mean load
    cv: float  # std / mean load
    maxvio: float  # (max - mean) / mean load
    effective_experts: float | None = None  # exp(entropy of share)
    collapse_score: float | None = None  # 0 balanced .. 1 all tokens on the same k experts
    entropy: float | None = None  # mean per-token routing entropy (nats)
    marginal_entropy: float | None = None  # entropy of the mean routing distribution (nats)
    z_loss: float | None = None
    max_logit: float | None = None
    dropped_frac: float | None = None
    weight_norm: list[float] | None = None  # [E]
    similarity_max: float | None = None  # only with monitor.expert_similarity
    similarity_mean: float | None = None
    similarity_pair: list[int] | None = None  # [2]
    grad_norm: list[float] | None = None  # [E]; only after a backward pass
    # Filled by the monitor, which counts starved intervals per expert (moelab.train.monitor).
    starved: int | None = None  # experts below the dead-share floor in this interval
    dead: int | None = None  # experts starved for persist_intervals intervals
    dead_experts: list[int] | None = None

    def to_metrics(self, layer: int) -> dict[str, Any]:
        """The flat metrics.jsonl keys `router.<layer>.<name>`; fields that are None are left out."""
        return {f"router.{layer}.{f.name}": v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    @classmethod
    def from_metrics(cls, record: dict[str, Any], layer: int) -> LayerHealth | None:
        """The layer's record from a metrics line, or None when the line has no load metrics for it.
        Keys a run did not write read as None; keys this version does not know are ignored."""
        prefix = f"router.{layer}."
        values = {f.name: record[prefix + f.name] for f in fields(cls) if record.get(prefix + f.name) is not None}
        if any(name not in values for name in LOAD_FIELDS):
            return None
        return cls(**values)

    def score(self, top_k: int) -> float:
        """The collapse score; computed from the share for runs that predate it."""
        return self.collapse_score if self.collapse_score is not None else collapse_score(self.share, top_k)

    def n_effective(self) -> float:
        """The effective number of experts; computed from the share for runs that predate it."""
        return self.effective_experts if self.effective_experts is not None else effective_experts(self.share)


LOAD_FIELDS = ("share", "imbalance", "cv", "maxvio")  # load_metrics' output: in every version's metrics


def router_layers(record: dict[str, Any]) -> list[int]:
    """The MoE layers a metrics record has router metrics for."""
    return sorted(
        {
            int(k.split(".")[1])
            for k in record
            if k.startswith("router.") and k.count(".") >= 2 and k.split(".")[1].isdigit()
        }
    )


def health_from_metrics(record: dict[str, Any]) -> dict[int, LayerHealth]:
    """Every layer's record in a metrics line (layers without load metrics are left out)."""
    layers = {layer: LayerHealth.from_metrics(record, layer) for layer in router_layers(record)}
    return {layer: h for layer, h in layers.items() if h is not None}


def health_to_metrics(health: dict[int, LayerHealth]) -> dict[str, Any]:
    """The flat metrics.jsonl keys of every layer's record, layer by layer."""
    return {k: v for layer, h in sorted(health.items()) for k, v in h.to_metrics(layer).items()}


# ---------------------------------------------------------------------------------------------
# Judging a layer


@dataclass
class LayerJudgement:
    """What the rules see in one layer's record, before any persistence over intervals."""

    routed: bool  # the record has routed tokens; without them the routing says nothing
    score: float  # the collapse score judged
    skewed: bool  # routing concentrated enough to count towards a collapse
    starved: list[int]  # experts below the dead-share floor
    logit_grown: bool  # max router logit above monitor.logit_growth, or not finite


def routing_skewed(score: float | None, imbalance: float | None, cfg: MonitorConfig) -> bool:
    """Whether routing counts towards a collapse: the collapse score at or above
    monitor.collapse_score, or (when set) max/mean load at or above monitor.collapse_imbalance."""
    if score is not None and score >= cfg.collapse_score:
        return True
    return cfg.collapse_imbalance > 0 and imbalance is not None and imbalance >= cfg.collapse_imbalance


def dead_floor(cfg: MonitorConfig, num_experts: int) -> float:
    """Share below which an expert counts as starved in an interval."""
    return cfg.dead_share / max(num_experts, 1)


def judge_layer(health: LayerHealth, cfg: MonitorConfig, top_k: int) -> LayerJudgement:
    """The one judgement of a layer's routing. The training monitor judges every interval and
    counts how long each condition persists; diagnose judges the end of a run (one record of the
    tail's means), so a run's verdict agrees with the alerts it raised. `top_k` scores records
    that predate the collapse score."""
    max_logit = health.max_logit
    grown = max_logit is not None and (not math.isfinite(max_logit) or max_logit > cfg.logit_growth)
    if (health.tokens is not None and health.tokens <= 0) or sum(health.share) <= 0:
        # NOTE: every expert of an empty interval is below the floor; that is no evidence of starving.
        return LayerJudgement(routed=False, score=0.0, skewed=False, starved=[], logit_grown=grown)
    score = health.score(top_k)
    floor = dead_floor(cfg, len(health.share))
    return LayerJudgement(
        routed=True,
        score=score,
        skewed=routing_skewed(score, health.imbalance, cfg),
        starved=[e for e, s in enumerate(health.share) if s < floor],
        logit_grown=grown,
    )


# ---------------------------------------------------------------------------------------------
# From the model


def router_health(
    model: nn.Module, router_stats: dict[int, dict[str, Any]], with_similarity: bool = True
) -> dict[int, LayerHealth]:
    """Each MoE layer's record for one logging interval (see docs/monitoring.md), keyed by layer.

    Routing metrics cover every training forward since the last read (`router_stats` comes from
    `Transformer.router_stats()`); weight norms and similarity are of the current weights; gradient
    norms are of the current gradients (after clipping: what the optimizer applies), so call this
    after the backward pass and before the optimizer step. The monitor fills the stateful fields."""
    blocks = {i: b.ffn for i, b in enumerate(model.blocks) if b.is_moe}
    return {layer: _layer_health(blocks[layer], stats, with_similarity) for layer, stats in router_stats.items()}


def _layer_health(moe: nn.Module, stats: dict[str, Any], with_similarity: bool) -> LayerHealth:
    load = load_metrics(stats["tokens_per_expert"])
    experts = [moe.experts.gate_up_proj, moe.experts.down_proj]
    weights = expert_weight_stats(*experts) if with_similarity else {"weight_norm": expert_norms(experts)}
    grads = all(p.grad is not None for p in experts)
    return LayerHealth(
        tokens=stats["tokens"],
        **load,
        effective_experts=effective_experts(load["share"]),
        collapse_score=collapse_score(load["share"], moe.cfg.top_k),
        entropy=stats["entropy"],  # mean per-token routing entropy (nats)
        marginal_entropy=entropy(stats["mean_prob"]),  # entropy of the mean routing distribution
        z_loss=stats["z_loss"],
        max_logit=stats["max_logit"],
        dropped_frac=stats["dropped_frac"],
        **weights,
        grad_norm=expert_norms([p.grad for p in experts]) if grads else None,
    )
