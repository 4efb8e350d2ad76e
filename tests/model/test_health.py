"""Router-health statistics on hand-built routing tables with known values, and on real forwards."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.config import (
    ModelConfig,
    MoEConfig,
)
from moelab.model import Transformer
from moelab.model.health import (
    collapse_score,
    effective_experts,
    entropy,
    expert_norms,
    expert_weight_stats,
    load_metrics,
    router_health,
)

# ---------------------------------------------------------------------------------------------
# Metrics on hand-built routing tables


def test_load_metrics_of_a_known_table() -> None:
    m = load_metrics([30, 10, 10, 10])  # mean 15; deviations 15, -5, -5, -5 -> variance 75
    assert m["share"] == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert m["imbalance"] == pytest.approx(2.0)
    assert m["cv"] == pytest.approx(math.sqrt(75) / 15)
    assert m["maxvio"] == pytest.approx(1.0)


def test_load_metrics_balanced_and_empty() -> None:
    m = load_metrics([7, 7, 7, 7, 7])
    assert m["share"] == pytest.approx([0.2] * 5)
    assert (m["imbalance"], m["cv"], m["maxvio"]) == pytest.approx((1.0, 0.0, 0.0))
    empty = load_metrics([0, 0, 0])
    assert empty == {"share": [0.0, 0.0, 0.0], "imbalance": 0.0, "cv": 0.0, "maxvio": 0.0}


def test_entropy_of_known_distributions() -> None:
    assert entropy([0.25] * 4) == pytest.approx(math.log(4))
    assert entropy([1.0, 0.0, 0.0]) == 0.0
    assert entropy([0.5, 0.5, 0.0, 0.0]) == pytest.approx(math.log(2))
    assert entropy([2.0, 2.0]) == pytest.approx(math.log(2))  # normalised first
    assert entropy([0.0, 0.0]) == 0.0


def test_effective_experts_and_collapse_score() -> None:
    assert effective_experts([0.125] * 8) == pytest.approx(8)
    assert effective_experts([0.5, 0.5, 0, 0, 0, 0, 0, 0]) == pytest.approx(2)
    assert collapse_score([0.125] * 8, top_k=2) == pytest.approx(0.0)
    assert collapse_score([0.5, 0.5] + [0.0] * 6, top_k=2) == pytest.approx(1.0)  # all tokens on the same 2
    # One expert every token uses plus an even spread over the rest (a de facto shared expert):
    # max/mean is at its ceiling E/k, but the score sees 3 of 4 experts in use.
    share = [0.5, 1 / 6, 1 / 6, 1 / 6]
    assert load_metrics([x * 600 for x in share])["imbalance"] == pytest.approx(2.0)
    n_eff = math.exp(-(0.5 * math.log(0.5) + 0.5 * math.log(1 / 6)))
    assert collapse_score(share, top_k=2) == pytest.approx((4 - n_eff) / 2)
    assert collapse_score(share, top_k=2) < 0.5
    assert collapse_score([1.0, 0, 0, 0], top_k=1) == pytest.approx(1.0)
    assert collapse_score([0.0] * 4, top_k=2) == 0.0
    assert collapse_score([0.5, 0.5], top_k=2) == 0.0  # E == k: nothing to collapse


def _experts(E: int, I: int, D: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, D, generator=gen), torch.randn(E, D, I, generator=gen)


def test_expert_similarity_identical_opposite_and_norms() -> None:
    gate_up, down = _experts(4, 3, 5)
    gate_up[1], down[1] = gate_up[0].clone(), down[0].clone()  # expert 1 is a copy of expert 0
    gate_up[2], down[2] = -gate_up[0], -down[0]  # expert 2 is its negative
    stats = expert_weight_stats(gate_up, down)
    assert stats["similarity_max"] == pytest.approx(1.0)
    assert stats["similarity_pair"] == [0, 1]
    flat = torch.cat([gate_up.reshape(4, -1), down.reshape(4, -1)], 1).double()
    cos = torch.nn.functional.normalize(flat, dim=1) @ torch.nn.functional.normalize(flat, dim=1).T
    off = ~torch.eye(4, dtype=torch.bool)
    assert stats["similarity_mean"] == pytest.approx(float(cos[off].mean()))
    assert stats["weight_norm"] == pytest.approx(flat.norm(dim=1).tolist())
    assert cos[0, 2] == pytest.approx(-1.0)


def test_expert_similarity_of_orthogonal_experts_is_zero() -> None:
    E, I, D = 3, 2, 6
    gate_up, down = torch.zeros(E, 2 * I, D), torch.zeros(E, D, I)
    for e in range(E):
        gate_up[e, 0, e] = 3.0  # disjoint supports: orthogonal
        down[e, e, 0] = 4.0
    stats = expert_weight_stats(gate_up, down)
    assert stats["similarity_max"] == pytest.approx(0.0)
    assert stats["similarity_mean"] == pytest.approx(0.0)
    assert stats["weight_norm"] == pytest.approx([5.0, 5.0, 5.0])  # sqrt(3^2 + 4^2)


def test_expert_norms_combine_tensors_per_expert() -> None:
    a = torch.zeros(2, 3, 4)
    b = torch.zeros(2, 4, 5)
    a[0, 0, 0], b[0, 1, 1] = 3.0, 4.0
    a[1] = 1.0  # 12 ones
    assert expert_norms([a, b]) == pytest.approx([5.0, math.sqrt(12)])


def tiny_model(**moe) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=32,
        d_model=16,
        n_layers=2,
        n_heads=2,
        ffn_hidden=32,
        max_seq_len=16,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=8, **moe),
    )
    return Transformer(cfg)


def test_router_health_passes_router_statistics_through_and_derives_the_rest() -> None:
    model = tiny_model()
    experts = model.blocks[1].ffn.experts
    with torch.no_grad():
        experts.gate_up_proj[3] = experts.gate_up_proj[2]
        experts.down_proj[3] = experts.down_proj[2]
    stats = {
        1: {
            "tokens_per_expert": [30.0, 10.0, 10.0, 10.0],
            "mean_prob": [0.4, 0.2, 0.2, 0.2],
            "tokens": 30.0,
            "dropped_frac": 0.125,
            "entropy": 1.1,
            "z_loss": 3.5,
            "max_logit": 4.25,
        }
    }
    h = router_health(model, stats)
    assert not any(k.startswith("router.0.") for k in h)  # only the layers given
    p = "router.1."
    assert h[p + "share"] == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert h[p + "imbalance"] == pytest.approx(2.0) and h[p + "maxvio"] == pytest.approx(1.0)
    assert h[p + "cv"] == pytest.approx(math.sqrt(75) / 15)
    assert (h[p + "z_loss"], h[p + "max_logit"], h[p + "dropped_frac"], h[p + "entropy"], h[p + "tokens"]) == (
        3.5,
        4.25,
        0.125,
        1.1,
        30.0,
    )
    assert h[p + "marginal_entropy"] == pytest.approx(entropy([0.4, 0.2, 0.2, 0.2]))
    assert h[p + "effective_experts"] == pytest.approx(effective_experts([0.5, 1 / 6, 1 / 6, 1 / 6]))
    assert h[p + "collapse_score"] == pytest.approx(collapse_score([0.5, 1 / 6, 1 / 6, 1 / 6], 2))
    assert h[p + "similarity_max"] == pytest.approx(1.0) and h[p + "similarity_pair"] == [2, 3]
    assert h[p + "weight_norm"] == pytest.approx(expert_norms([experts.gate_up_proj, experts.down_proj]), rel=1e-5)
    assert p + "grad_norm" not in h  # no backward yet
    h = router_health(model, stats, with_similarity=False)
    assert p + "similarity_max" not in h and len(h[p + "weight_norm"]) == 4


def test_router_health_on_a_real_forward_and_backward() -> None:
    model = tiny_model().train()
    x = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(1))
    out = model(x)
    (out.logits.float().square().mean() + out.aux_loss).backward()
    h = router_health(model, model.router_stats())
    for layer in (0, 1):
        p = f"router.{layer}."
        assert h[p + "tokens"] == 48
        assert sum(h[p + "share"]) == pytest.approx(1.0)
        assert 0 <= h[p + "entropy"] <= math.log(4) + 1e-6
        # entropy is concave: the mean distribution is at least as spread as the average token's
        assert h[p + "marginal_entropy"] >= h[p + "entropy"] - 1e-6
        assert h[p + "z_loss"] > 0 and h[p + "max_logit"] != 0
        assert h[p + "dropped_frac"] == 0.0  # dropless
        grads = model.blocks[layer].ffn.experts
        assert h[p + "grad_norm"] == pytest.approx(expert_norms([grads.gate_up_proj.grad, grads.down_proj.grad]))
    assert model.router_stats()[0]["tokens"] == 0  # read and reset


def test_dropped_fraction_with_a_capacity() -> None:
    model = tiny_model(capacity_factor=0.5).train()
    model(torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(2)))
    h = router_health(model, model.router_stats())
    assert 0.4 <= h["router.0.dropped_frac"] < 1.0  # half the slots fit at best


def test_one_rule_judges_skewed_routing() -> None:
    """routing_skewed is the rule the monitor applies per interval and diagnose at the end."""
    from moelab.config import MonitorConfig
    from moelab.model.health import routing_skewed

    cfg = MonitorConfig(collapse_score=0.5)
    assert routing_skewed(0.5, 1.0, cfg) and not routing_skewed(0.49, 50.0, cfg)  # imbalance is off by default
    assert not routing_skewed(None, None, cfg)
    both = MonitorConfig(collapse_score=0.5, collapse_imbalance=3.0)
    assert (
        routing_skewed(0.1, 3.0, both) and not routing_skewed(0.1, 2.99, both) and not routing_skewed(None, None, both)
    )
    assert routing_skewed(None, 4.0, both)  # metrics without a score: the imbalance alone decides
