"""The MoE layer against a float64 per-expert loop, plus the routing semantics each option promises."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from moelab.config import MoEConfig
from moelab.model.dispatch import grouped_mm, plan_token_choice
from moelab.model.mlp import SwiGLU
from moelab.model.moe import MoE
from tests.reference import moe_reference, route, routing_scores


def make_moe(D: int, seed: int, **kwargs) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(D, MoEConfig(**kwargs))
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
            if name == "router.weight":
                p.mul_(3.0)  # spread the routing so that near-ties are rare
    return moe


def fresh_tokens(moe: MoE, T: int, D: int, gen: torch.Generator, min_gap: float = 1e-5) -> torch.Tensor:
    """Random tokens whose top-k selection is not a near-tie (fp32 vs fp64 could pick differently)."""
    ref64 = copy.deepcopy(moe).double()
    for _ in range(50):
        x = torch.randn(T, D, generator=gen)
        _, _, _, gap = moe_reference(ref64, x.double())
        if gap > min_gap:
            return x
    raise AssertionError("could not draw inputs without near-ties")


def check_against_reference(moe: MoE, x: torch.Tensor, impl: str) -> None:
    moe.experts.matmul = impl
    moe.train()
    ref = copy.deepcopy(moe).double()
    x32 = x.clone().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    y, aux = moe(x32[None])
    y = y[0]
    y_ref, _, _, _ = moe_reference(ref, x64)
    torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=1e-4)
    # Autograd off (inference): the in-place SwiGLU path. Eval mode routes the same way (no jitter
    # here), so the output must equal the same reference.
    moe.eval()
    with torch.inference_mode():
        y_inf = moe(x.clone()[None])[0][0]
    moe.train()
    torch.testing.assert_close(y_inf.double(), y_ref, atol=2e-5, rtol=1e-4)
    upstream = torch.randn_like(y_ref)
    (y * upstream.float()).sum().backward()
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, atol=2e-5, rtol=1e-4)
    for (name, p), (_, p_ref) in zip(moe.named_parameters(), ref.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad.double(), p_ref.grad, atol=2e-5, rtol=1e-4, msg=name)


CASES = [
    # (D, T, kwargs)
    (32, 40, dict(num_experts=4, top_k=1, expert_hidden=16)),
    (32, 64, dict(num_experts=8, top_k=2, expert_hidden=24)),
    (32, 64, dict(num_experts=8, top_k=2, expert_hidden=16, route_scale=2.5)),
    (48, 37, dict(num_experts=16, top_k=4, expert_hidden=8, renormalize=False)),
    (32, 50, dict(num_experts=8, top_k=3, expert_hidden=16, scoring="sigmoid")),
    (32, 50, dict(num_experts=6, top_k=2, expert_hidden=16, num_shared_experts=2, shared_expert_hidden=12)),
    (32, 30, dict(num_experts=4, top_k=2, expert_hidden=16, num_shared_experts=1, shared_expert_gate=True)),
    (32, 64, dict(num_experts=8, top_k=2, expert_hidden=16, capacity_factor=0.75)),
    (32, 48, dict(num_experts=8, top_k=2, expert_hidden=16, routing="expert_choice")),
    (32, 48, dict(num_experts=8, top_k=1, expert_hidden=16, routing="expert_choice", capacity_factor=2.0)),
    (32, 3, dict(num_experts=16, top_k=2, expert_hidden=8)),  # most experts receive no token
]


@pytest.mark.parametrize("impl", ["grouped_mm", "padded", "chunked"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_moe_forward_and_gradients_match_per_expert_loop(case: int, impl: str) -> None:
    D, T, kwargs = CASES[case]
    gen = torch.Generator().manual_seed(1000 + case)
    for trial in range(2):  # fresh weights and tokens each trial
        moe = make_moe(D, seed=10 * case + trial, **kwargs)
        x = fresh_tokens(moe, T, D, gen)
        check_against_reference(moe, x, impl)


def test_some_experts_receive_no_token_in_the_sparse_case() -> None:
    D, T, kwargs = CASES[-1]
    moe = make_moe(D, seed=3, **kwargs)
    x = torch.randn(T, D)
    slots, _, _ = route(copy.deepcopy(moe).double(), x.double())
    assert len({e for _, e, _ in slots}) < kwargs["num_experts"]


def test_one_expert_top1_equals_dense_swiglu() -> None:
    D, hidden = 32, 48
    for seed in range(3):
        moe = make_moe(D, seed=seed, num_experts=1, top_k=1, expert_hidden=hidden, aux_loss_coef=0.0, z_loss_coef=0.0)
        dense = SwiGLU(D, hidden)
        with torch.no_grad():
            dense.gate_up_proj.weight.copy_(moe.experts.gate_up_proj[0])
            dense.down_proj.weight.copy_(moe.experts.down_proj[0])
        x = torch.randn(2, 17, D)
        y_moe, _ = moe(x)
        torch.testing.assert_close(y_moe, dense(x), atol=1e-6, rtol=1e-5)


def test_capacity_drops_exactly_the_gshard_slots() -> None:
    # 6 tokens, 3 experts, k = 2, capacity 3. First choices: e0 e0 e0 e0 e1 e2 -> token 3's first
    # choice is the 4th for e0 and is dropped. Second choices fill what is left in token order.
    expert_index = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 1], [1, 2], [2, 0]])
    weight = torch.rand(6, 2)
    plan = plan_token_choice(expert_index, weight, num_experts=3, capacity=3)
    kept = set()
    start = 0
    for e, count in enumerate(plan.tokens_per_expert_E.tolist()):
        for s in range(start, start + count):
            kept.add((int(plan.token_index_S[s]), e))
        start += count
    # e0: first choices of tokens 0,1,2 (token 3's dropped; token 5's second choice dropped)
    # e1: second choices of 0,1,3 then first choice of 4 -> order: first choice 4, then 0, 1 (3 dropped)
    # e2: first choice of 5, second choices of 2 and 4
    assert kept == {(0, 0), (1, 0), (2, 0), (4, 1), (0, 1), (1, 1), (5, 2), (2, 2), (4, 2)}
    assert int(plan.dropped_slots) == 3
    assert plan.tokens_per_expert_E.tolist() == [3, 3, 3]
    for s in range(plan.token_index_S.numel()):
        t = int(plan.token_index_S[s])
        e = sum(1 for c in plan.tokens_per_expert_E.cumsum(0).tolist() if c <= s)
        r = expert_index[t].tolist().index(e)
        assert float(plan.weight_S[s]) == float(weight[t, r])


def test_capacity_dropped_fraction_is_reported() -> None:
    moe = make_moe(16, seed=0, num_experts=4, top_k=2, expert_hidden=8, capacity_factor=0.5)
    x = torch.randn(40, 16)
    moe.train()
    moe(x[None])
    stats = moe.read_stats()
    _, dropped, _ = route(copy.deepcopy(moe).double(), x.double())
    assert dropped > 0
    assert stats["dropped_frac"] == pytest.approx(dropped / (40 * 2))
    assert sum(stats["tokens_per_expert"]) == 40 * 2 - dropped
    assert max(stats["tokens_per_expert"]) <= math.ceil(0.5 * 40 * 2 / 4)


def test_expert_choice_gives_each_expert_exactly_its_capacity() -> None:
    for T, factor in [(48, None), (30, 1.5), (7, 4.0)]:
        moe = make_moe(
            16, seed=T, num_experts=4, top_k=2, expert_hidden=8, routing="expert_choice", capacity_factor=factor
        )
        moe.train()
        moe(torch.randn(1, T, 16))
        stats = moe.read_stats()
        capacity = min(T, math.ceil((factor or 1.0) * T * 2 / 4))
        assert stats["tokens_per_expert"] == [float(capacity)] * 4


@pytest.mark.parametrize("scoring,rate", [("softmax", 0.05), ("sigmoid", 0.01)])
def test_bias_balancing_reduces_imbalance_on_skewed_input(scoring: str, rate: float) -> None:
    torch.manual_seed(0)
    E = 8
    moe = make_moe(
        16, seed=0, num_experts=E, top_k=2, expert_hidden=8, bias_update_rate=rate, aux_loss_coef=0.0, scoring=scoring
    )
    direction = torch.randn(16)
    direction = 3 * direction / direction.norm()
    with torch.no_grad():  # skew: experts 0 and 1 align with the mean input direction
        moe.router.weight[0] = direction
        moe.router.weight[1] = 0.8 * direction
    moe.train()

    def imbalance() -> float:
        moe(torch.randn(1, 512, 16) + direction)
        load = torch.tensor(moe.read_stats()["tokens_per_expert"])
        return float(load.max() / load.mean())

    before = imbalance()
    moe.update_bias()
    for _ in range(300):
        imbalance()
        moe.update_bias()
    after = sum(imbalance() for _ in range(5)) / 5
    assert before > 3.0
    assert after < 1.7
    assert abs(float(moe.router.expert_bias.mean())) < 1e-5  # centred


def test_eval_forward_changes_neither_statistics_nor_biases() -> None:
    moe = make_moe(16, seed=1, num_experts=4, top_k=2, expert_hidden=8, bias_update_rate=0.1)
    moe.train()
    moe(torch.randn(1, 20, 16))
    moe.update_bias()
    moe(torch.randn(1, 20, 16))
    before_stats = moe.read_stats(reset=False)
    before_bias = moe.router.expert_bias.clone()
    before_load = moe.load_since_update.clone()
    moe.eval()
    _, aux = moe(torch.randn(1, 33, 16))
    assert moe.read_stats(reset=False) == before_stats
    assert torch.equal(moe.router.expert_bias, before_bias)
    assert torch.equal(moe.load_since_update, before_load)
    assert aux is None  # no balancing loss outside training


def test_aux_and_z_loss_values() -> None:
    moe = make_moe(16, seed=2, num_experts=4, top_k=2, expert_hidden=8, aux_loss_coef=0.5, z_loss_coef=0.25)
    moe.train()
    x = torch.randn(30, 16)
    _, aux = moe(x[None])
    logits, probs = routing_scores(copy.deepcopy(moe).double(), x.double())
    slots, _, _ = route(copy.deepcopy(moe).double(), x.double())
    share = torch.zeros(4, dtype=torch.float64)
    for _, e, _ in slots:
        share[e] += 1.0 / len(slots)
    switch = 4 * (share * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    assert float(aux.detach()) == pytest.approx(float(0.5 * switch + 0.25 * z), rel=1e-5)


def test_router_statistics_values() -> None:
    moe = make_moe(16, seed=4, num_experts=4, top_k=2, expert_hidden=8)
    moe.train()
    xs = [torch.randn(25, 16), torch.randn(15, 16)]
    for x in xs:
        moe(x[None])
    stats = moe.read_stats()
    x = torch.cat(xs).double()
    logits, probs = routing_scores(copy.deepcopy(moe).double(), x)
    counts = [0.0] * 4
    for xi in xs:
        for _, e, _ in route(copy.deepcopy(moe).double(), xi.double())[0]:
            counts[e] += 1
    assert stats["tokens_per_expert"] == counts
    entropy = -(probs * probs.log()).sum(-1).mean()
    assert stats["entropy"] == pytest.approx(float(entropy), rel=1e-5)
    assert stats["max_logit"] == pytest.approx(float(logits.max()), rel=1e-5)
    assert stats["z_loss"] == pytest.approx(float(torch.logsumexp(logits, -1).square().mean()), rel=1e-5)
    assert stats["mean_prob"] == pytest.approx(probs.mean(0).tolist(), rel=1e-5)
    assert stats["tokens"] == 40
    # read with reset: the next read is empty
    assert moe.read_stats()["tokens"] == 0


def test_router_math_is_fp32_for_bf16_inputs() -> None:
    moe = make_moe(16, seed=5, num_experts=4, top_k=2, expert_hidden=8)
    routing = moe.router(torch.randn(10, 16).bfloat16())
    assert routing.logits_TE.dtype == torch.float32
    assert routing.plan.weight_S.dtype == torch.float32


def test_jitter_only_in_training() -> None:
    moe = make_moe(16, seed=6, num_experts=4, top_k=2, expert_hidden=8, jitter=0.5)
    x = torch.randn(1, 64, 16)
    moe.eval()
    a, _ = moe(x)
    b, _ = moe(x)
    assert torch.equal(a, b)
    moe.train()
    torch.manual_seed(0)
    c, _ = moe(x)
    torch.manual_seed(1)
    d, _ = moe(x)
    assert not torch.equal(c, d)


@pytest.mark.parametrize("impl", ["grouped_mm", "padded"])
def test_grouped_mm_matches_loop_with_empty_groups(impl: str) -> None:
    gen = torch.Generator().manual_seed(7)
    counts = torch.tensor([0, 5, 0, 3, 9, 0])
    x = torch.randn(int(counts.sum()), 12, generator=gen, requires_grad=True)
    w = torch.randn(6, 8, 12, generator=gen, requires_grad=True)  # rows of 16-byte multiples
    out = grouped_mm(x, w, counts, impl)
    ref, start = [], 0
    for e, c in enumerate(counts.tolist()):
        ref.append(x[start : start + c] @ w[e].T)
        start += c
    ref = torch.cat(ref)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad((out * g).sum(), (x, w))
    rx, rw = torch.autograd.grad((ref * g).sum(), (x, w))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
