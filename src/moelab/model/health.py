"""Router health statistics: per-layer load, entropy, collapse, dead experts, logits and expert
weights, computed from a model's MoE layers and one interval's routing statistics.

`router_health` turns them into the per-layer metrics written to metrics.jsonl as
`router.<layer>.<name>`. The functions take plain lists and tensors so that each is unit-tested on
hand-built routing tables. The training monitor (moelab.train.monitor), the distributed runtime and
diagnose all read these; none of them computes a statistic of its own.
"""

from __future__ import annotations

import math
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


def routing_skewed(score: float | None, imbalance: float | None, cfg: MonitorConfig) -> bool:
    """Whether one interval's routing of a layer counts towards a collapse: the collapse score at or
    above monitor.collapse_score, or (when set) max/mean load at or above monitor.collapse_imbalance.
    The one rule the training monitor (persisting over intervals) and diagnose (at the end) apply."""
    if score is not None and score >= cfg.collapse_score:
        return True
    return cfg.collapse_imbalance > 0 and imbalance is not None and imbalance >= cfg.collapse_imbalance


def router_health(
    model: nn.Module, router_stats: dict[int, dict[str, Any]], with_similarity: bool = True
) -> dict[str, Any]:
    """Flat metrics `router.<layer>.<name>` for one logging interval (see docs/monitoring.md).

    Routing metrics cover every training forward since the last read (`router_stats` comes from
    `Transformer.router_stats()`); weight norms and similarity are of the current weights; gradient
    norms are of the current gradients (after clipping: what the optimizer applies), so call this
    after the backward pass and before the optimizer step."""
    out: dict[str, Any] = {}
    blocks = {i: b.ffn for i, b in enumerate(model.blocks) if b.is_moe}
    for layer, stats in router_stats.items():
        moe = blocks[layer]
        metrics: dict[str, Any] = {"tokens": stats["tokens"]}
        metrics.update(load_metrics(stats["tokens_per_expert"]))
        metrics["effective_experts"] = effective_experts(metrics["share"])
        metrics["collapse_score"] = collapse_score(metrics["share"], moe.cfg.top_k)
        metrics["entropy"] = stats["entropy"]  # mean per-token routing entropy (nats)
        metrics["marginal_entropy"] = entropy(stats["mean_prob"])  # entropy of the mean routing distribution
        metrics["z_loss"] = stats["z_loss"]
        metrics["max_logit"] = stats["max_logit"]
        metrics["dropped_frac"] = stats["dropped_frac"]
        experts = [moe.experts.gate_up_proj, moe.experts.down_proj]
        if with_similarity:
            metrics.update(expert_weight_stats(*experts))
        else:
            metrics["weight_norm"] = expert_norms(experts)
        if all(p.grad is not None for p in experts):
            metrics["grad_norm"] = expert_norms([p.grad for p in experts])
        for name, value in metrics.items():
            out[f"router.{layer}.{name}"] = value
    return out


def router_layers(record: dict[str, Any]) -> list[int]:
    """The MoE layers a metrics record has router metrics for."""
    return sorted(
        {
            int(k.split(".")[1])
            for k in record
            if k.startswith("router.") and k.count(".") >= 2 and k.split(".")[1].isdigit()
        }
    )
