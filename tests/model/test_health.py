"""Router-health statistics on hand-built routing tables with known values, and on real forwards;
the per-layer record's metrics.jsonl round trip and the one judgement of a layer."""

from __future__ import annotations

import json
import math
import random
from dataclasses import fields

import pytest
import torch

from moelab.config import (
    ModelConfig,
    MoEConfig,
    MonitorConfig,
)
from moelab.model import Transformer
from moelab.model.health import (
    LayerHealth,
    collapse_score,
    effective_experts,
    entropy,
    expert_norms,
    expert_weight_stats,
    health_from_metrics,
    health_to_metrics,
    judge_layer,
    load_metrics,
    router_health,
    routing_skewed,
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
    health = router_health(model, stats)
    assert list(health) == [1]  # only the layers given
    h = health[1]
    assert h.share == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert h.imbalance == pytest.approx(2.0) and h.maxvio == pytest.approx(1.0)
    assert h.cv == pytest.approx(math.sqrt(75) / 15)
    assert (h.z_loss, h.max_logit, h.dropped_frac, h.entropy, h.tokens) == (3.5, 4.25, 0.125, 1.1, 30.0)
    assert h.marginal_entropy == pytest.approx(entropy([0.4, 0.2, 0.2, 0.2]))
    assert h.effective_experts == pytest.approx(effective_experts([0.5, 1 / 6, 1 / 6, 1 / 6]))
    assert h.collapse_score == pytest.approx(collapse_score([0.5, 1 / 6, 1 / 6, 1 / 6], 2))
    assert h.similarity_max == pytest.approx(1.0) and h.similarity_pair == [2, 3]
    assert h.weight_norm == pytest.approx(expert_norms([experts.gate_up_proj, experts.down_proj]), rel=1e-5)
    assert h.grad_norm is None  # no backward yet
    assert (h.starved, h.dead, h.dead_experts) == (None, None, None)  # the monitor fills these
    h = router_health(model, stats, with_similarity=False)[1]
    assert h.similarity_max is None and len(h.weight_norm) == 4


def test_router_health_writes_the_metrics_jsonl_keys_in_their_order() -> None:
    """The on-disk names and order of a layer's keys, as every earlier version wrote them."""
    model = tiny_model().train()
    out = model(torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(3)))
    (out.logits.float().square().mean() + out.aux_loss).backward()
    health = router_health(model, model.router_stats())
    for h, (starved, dead) in zip(health.values(), [(1, 0), (0, 1)]):
        h.starved, h.dead, h.dead_experts = starved, dead, [2] * dead
    metrics = health_to_metrics(health)
    names = (
        "tokens share imbalance cv maxvio effective_experts collapse_score entropy marginal_entropy z_loss "
        "max_logit dropped_frac weight_norm similarity_max similarity_mean similarity_pair grad_norm "
        "starved dead dead_experts"
    ).split()
    assert list(metrics) == [f"router.{layer}.{name}" for layer in (0, 1) for name in names]
    assert metrics["router.1.dead_experts"] == [2] and metrics["router.0.starved"] == 1


def test_router_health_on_a_real_forward_and_backward() -> None:
    model = tiny_model().train()
    x = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(1))
    out = model(x)
    (out.logits.float().square().mean() + out.aux_loss).backward()
    health = router_health(model, model.router_stats())
    for layer in (0, 1):
        h = health[layer]
        assert h.tokens == 48
        assert sum(h.share) == pytest.approx(1.0)
        assert 0 <= h.entropy <= math.log(4) + 1e-6
        # entropy is concave: the mean distribution is at least as spread as the average token's
        assert h.marginal_entropy >= h.entropy - 1e-6
        assert h.z_loss > 0 and h.max_logit != 0
        assert h.dropped_frac == 0.0  # dropless
        grads = model.blocks[layer].ffn.experts
        assert h.grad_norm == pytest.approx(expert_norms([grads.gate_up_proj.grad, grads.down_proj.grad]))
    assert model.router_stats()[0]["tokens"] == 0  # read and reset


def test_dropped_fraction_with_a_capacity() -> None:
    model = tiny_model(capacity_factor=0.5).train()
    model(torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(2)))
    h = router_health(model, model.router_stats())
    assert 0.4 <= h[0].dropped_frac < 1.0  # half the slots fit at best


def test_one_rule_judges_skewed_routing() -> None:
    """routing_skewed is the collapse rule inside judge_layer, which the monitor applies per
    interval and diagnose at the end."""
    cfg = MonitorConfig(collapse_score=0.5)
    assert routing_skewed(0.5, 1.0, cfg) and not routing_skewed(0.49, 50.0, cfg)  # imbalance is off by default
    assert not routing_skewed(None, None, cfg)
    both = MonitorConfig(collapse_score=0.5, collapse_imbalance=3.0)
    assert (
        routing_skewed(0.1, 3.0, both) and not routing_skewed(0.1, 2.99, both) and not routing_skewed(None, None, both)
    )
    assert routing_skewed(None, 4.0, both)  # metrics without a score: the imbalance alone decides


# ---------------------------------------------------------------------------------------------
# The per-layer record in metrics.jsonl, and the one judgement of a layer


def random_health(rng: random.Random, E: int = 6) -> LayerHealth:
    raw = [rng.random() for _ in range(E)]
    share = [r / sum(raw) for r in raw]
    vec = lambda: [rng.uniform(0.1, 3.0) for _ in range(E)]  # noqa: E731
    return LayerHealth(
        tokens=float(rng.randrange(1, 10_000)),
        share=share,
        **{k: v for k, v in load_metrics(share).items() if k != "share"},
        effective_experts=effective_experts(share),
        collapse_score=collapse_score(share, 2),
        entropy=rng.uniform(0, math.log(E)),
        marginal_entropy=rng.uniform(0, math.log(E)),
        z_loss=rng.uniform(0, 20),
        max_logit=rng.uniform(-5, 40),
        dropped_frac=rng.random(),
        weight_norm=vec(),
        similarity_max=rng.uniform(-1, 1),
        similarity_mean=rng.uniform(-1, 1),
        similarity_pair=sorted(rng.sample(range(E), 2)),
        grad_norm=vec(),
        starved=rng.randrange(E),
        dead=rng.randrange(E),
        dead_experts=sorted(rng.sample(range(E), 2)),
    )


@pytest.mark.parametrize("seed", range(5))
def test_layer_health_round_trips_through_a_metrics_line(seed) -> None:
    rng = random.Random(seed)
    health = {0: random_health(rng), 3: random_health(rng)}
    if seed % 2:  # optional fields left out are absent on disk and None when read back
        health[3].similarity_max = health[3].similarity_mean = health[3].similarity_pair = health[3].grad_norm = None
    line = json.dumps({"step": 10, "loss": 3.0, **health_to_metrics(health)})
    record = json.loads(line)
    assert health_from_metrics(record) == health
    assert LayerHealth.from_metrics(record, 3) == health[3] and LayerHealth.from_metrics(record, 1) is None
    assert ("router.3.grad_norm" in record) == (seed % 2 == 0)


def test_a_record_from_an_older_version_reads_with_its_newer_fields_none() -> None:
    """The first monitor's keys: no tokens, effective experts, collapse score, starved or dead
    expert list; a layer whose load metrics are missing is not read at all."""
    share = [0.5, 0.5, 0.0, 0.0]
    old = {f"router.0.{k}": v for k, v in load_metrics([s * 100 for s in share]).items()}
    old.update({f"router.0.{k}": v for k, v in dict(entropy=0.6, max_logit=3.0, weight_norm=[1.0] * 4, dead=2).items()})
    old["router.1.entropy"] = 0.5  # no load metrics for layer 1
    old["router.0.retired_metric"] = 7  # a key this version does not know
    health = health_from_metrics(old)
    assert list(health) == [0]
    h = health[0]
    assert (h.share, h.entropy, h.max_logit, h.dead) == (share, 0.6, 3.0, 2)
    newer = ("tokens", "effective_experts", "collapse_score", "starved", "dead_experts", "grad_norm", "z_loss")
    assert all(getattr(h, name) is None for name in newer)
    assert h.score(top_k=2) == pytest.approx(1.0) and h.n_effective() == pytest.approx(2.0)  # from the share
    assert set(h.to_metrics(0)) == set(old) - {"router.1.entropy", "router.0.retired_metric"}


def test_judge_layer() -> None:
    cfg = MonitorConfig(collapse_score=0.5, dead_share=0.1, logit_growth=30.0)
    names = [f.name for f in fields(LayerHealth)]
    assert names[:5] == ["tokens", "share", "imbalance", "cv", "maxvio"]

    def record(share, **kw) -> LayerHealth:
        return LayerHealth(share=share, **{k: v for k, v in load_metrics(share).items() if k != "share"}, **kw)

    judged = judge_layer(record([0.5, 0.5, 0.0, 0.0], max_logit=31.0), cfg, top_k=2)
    assert (judged.routed, judged.skewed, judged.starved, judged.logit_grown) == (True, True, [2, 3], True)
    assert judged.score == pytest.approx(1.0)  # computed from the share: the record predates the score
    judged = judge_layer(record([0.25] * 4, collapse_score=0.7, max_logit=float("nan")), cfg, top_k=2)
    assert judged.skewed and judged.score == 0.7 and judged.logit_grown  # the logged score is judged
    judged = judge_layer(record([0.26, 0.25, 0.25, 0.24], max_logit=29.0), cfg, top_k=2)
    assert (judged.skewed, judged.starved, judged.logit_grown) == (False, [], False)
    empty = judge_layer(record([0.0] * 4, tokens=0.0, max_logit=50.0), cfg, top_k=2)
    assert (empty.routed, empty.skewed, empty.starved, empty.logit_grown) == (False, False, [], True)
