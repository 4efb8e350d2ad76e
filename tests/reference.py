"""Independent float64 references for the fast paths: a per-expert (and per-token) loop MoE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def swiglu(x, gate_up, down):
    """x [N, D] through one SwiGLU with gate_up [2I, D] (gate rows first) and down [D, I]."""
    hidden = gate_up.shape[0] // 2
    h = x @ gate_up.T
    return (F.silu(h[:, :hidden]) * h[:, hidden:]) @ down.T


def routing_scores(moe, x):
    cfg = moe.cfg
    logits = x @ moe.router.weight.T
    if cfg.scoring == "softmax":
        scores = torch.softmax(logits, -1)
    else:
        scores = torch.sigmoid(logits)
    return logits, scores


def route(moe, x):
    """Routing by plain loops: returns a list of (token, expert, weight) slots kept, the number of
    slots dropped, and the smallest score gap at a selection boundary (to detect near-ties)."""
    cfg = moe.cfg
    T = x.shape[0]
    E, k = cfg.num_experts, cfg.top_k
    logits, scores = routing_scores(moe, x)
    scores_list = scores.tolist()
    # selection on the logits (monotone in the scores); with a balancing bias, the bias is added to
    # the logits for softmax scoring and to the scores for sigmoid scoring
    biased = cfg.bias_update_rate > 0
    select_base = (scores if biased and cfg.scoring == "sigmoid" else logits).tolist()
    min_gap = math.inf
    slots = []
    dropped = 0
    if cfg.routing == "expert_choice":
        factor = cfg.capacity_factor or 1.0
        capacity = max(1, min(T, math.ceil(factor * T * k / E)))
        for e in range(E):
            ranked = sorted(range(T), key=lambda t: -scores_list[t][e])
            if capacity < T:
                min_gap = min(min_gap, scores_list[ranked[capacity - 1]][e] - scores_list[ranked[capacity]][e])
            for t in ranked[:capacity]:
                slots.append((t, e, scores[t, e] * cfg.route_scale))
        covered = {t for t, _, _ in slots}
        dropped = T - len(covered)
        return slots, dropped, min_gap
    bias = moe.router.expert_bias.tolist() if biased else [0.0] * E
    choices = []
    for t in range(T):
        select = [select_base[t][e] + bias[e] for e in range(E)]
        ranked = sorted(range(E), key=lambda e: -select[e])
        if k < E:
            min_gap = min(min_gap, select[ranked[k - 1]] - select[ranked[k]])
        chosen = ranked[:k]
        weights = [scores[t, e] for e in chosen]
        if cfg.renormalize:
            total = sum(weights)
            weights = [w / total for w in weights]
        weights = [w * cfg.route_scale for w in weights]
        choices.append(list(zip(chosen, weights)))
    capacity = None if cfg.capacity_factor is None else max(1, math.ceil(cfg.capacity_factor * T * k / E))
    used = [0] * E
    # GShard priority: all first choices (in token order), then all second choices, ...
    for rank in range(k):
        for t in range(T):
            e, w = choices[t][rank]
            if capacity is not None and used[e] >= capacity:
                dropped += 1
                continue
            used[e] += 1
            slots.append((t, e, w))
    return slots, dropped, min_gap


def moe_reference(moe, x):
    """Output of MoE module `moe` (any dtype; run it in float64) for tokens x [T, D] with a loop
    over experts; returns (y [T, D], slots, dropped, min_gap)."""
    slots, dropped, min_gap = route(moe, x)
    y = torch.zeros_like(x)
    gate_up, down = moe.experts.gate_up_proj, moe.experts.down_proj
    for e in range(moe.cfg.num_experts):
        mine = [(t, w) for t, ee, w in slots if ee == e]
        if not mine:
            continue
        tokens = torch.tensor([t for t, _ in mine])
        weights = torch.stack([w for _, w in mine])
        out = swiglu(x[tokens], gate_up[e], down[e]) * weights[:, None]
        y = y.index_add(0, tokens, out)
    if moe.shared is not None:
        shared = swiglu(x, moe.shared.gate_up_proj.weight, moe.shared.down_proj.weight)
        if moe.shared_gate is not None:
            shared = torch.sigmoid(x @ moe.shared_gate.weight.T) * shared
        y = y + shared
    return y, slots, dropped, min_gap
