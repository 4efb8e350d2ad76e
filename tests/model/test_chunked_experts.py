"""The chunked CPU experts path against a float64 per-expert loop, over many plans and chunkings."""

from __future__ import annotations

import pytest
import torch

import moelab.model.chunked_experts as chunked
import moelab.model.dispatch as dispatch
from moelab.model.dispatch import DispatchPlan, experts_swiglu
from tests.reference import swiglu


def random_plan(T: int, E: int, k: int, gen: torch.Generator, skew: float = 0.0, empty: int = 0) -> DispatchPlan:
    """Each token picks k distinct experts; `skew` > 0 sends most tokens to expert 0, `empty`
    experts (the last ones) receive none."""
    live = E - empty
    logits_TE = torch.randn(T, live, generator=gen)
    logits_TE[:, 0] += skew
    expert_TK = logits_TE.topk(min(k, live), dim=-1).indices
    weight_TK = torch.rand(expert_TK.shape, generator=gen) + 0.1
    return dispatch.plan_token_choice(expert_TK, weight_TK, E)


def reference(x_TD, plan: DispatchPlan, gate_up, down):
    """float64 loop: every expert's slots through its SwiGLU, weighted, added to their tokens."""
    out = torch.zeros(x_TD.shape, dtype=torch.float64)
    start = 0
    for e, count in enumerate(plan.tokens_per_expert_E.tolist()):
        tokens = plan.token_index_S[start : start + count]
        y = swiglu(x_TD[tokens], gate_up[e], down[e]) * plan.weight_S[start : start + count, None]
        out = out.index_add(0, tokens, y)
        start += count
    return out


def check(T, D, I, E, k, gen, skew=0.0, empty=0, dtype=torch.float32, atol=2e-5, rtol=1e-4):
    plan = random_plan(T, E, k, gen, skew, empty)
    x = torch.randn(T, D, generator=gen)
    gate_up = torch.randn(E, 2 * I, D, generator=gen) / D**0.5
    down = torch.randn(E, D, I, generator=gen) / I**0.5
    weight = plan.weight_S.clone()
    leaves = [t.to(dtype).requires_grad_(True) for t in (x, weight, gate_up, down)]
    leaves64 = [t.double().requires_grad_(True) for t in (x, weight, gate_up, down)]
    plan32 = DispatchPlan(plan.token_index_S, leaves[1], plan.tokens_per_expert_E, plan.dropped_slots)
    out = experts_swiglu(leaves[0], plan32, leaves[2], leaves[3], "chunked")
    plan64 = DispatchPlan(plan.token_index_S, leaves64[1], plan.tokens_per_expert_E, plan.dropped_slots)
    ref = reference(leaves64[0], plan64, leaves64[2], leaves64[3])
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    upstream = torch.randn(T, D, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * upstream).sum(), leaves)
    grads64 = torch.autograd.grad((ref * upstream).sum(), leaves64)
    for name, g, g64 in zip(("x", "routing weight", "gate_up", "down"), grads, grads64):
        torch.testing.assert_close(g.double(), g64, atol=atol * 10, rtol=rtol * 10, msg=name)
    # Autograd off (evaluation): the same forward without the saved projections.
    with torch.no_grad():
        out_eval = experts_swiglu(leaves[0], plan32, leaves[2], leaves[3], "chunked")
    torch.testing.assert_close(out_eval, out.detach(), atol=0, rtol=0)


SHAPES = [
    # (T, D, I, E, k, skew, empty)
    (64, 16, 8, 8, 2, 0.0, 0),
    (97, 32, 12, 16, 4, 0.0, 3),  # the last experts receive nothing
    (128, 16, 8, 12, 3, 6.0, 0),  # nearly every token's first choice is expert 0
    (50, 24, 16, 6, 1, 0.0, 5),  # one live expert: a single chunk holds every slot
    (1, 16, 8, 8, 2, 0.0, 0),  # one token
    (200, 32, 4, 32, 8, 2.0, 4),
]


@pytest.mark.parametrize("rows", [1, 7, 64, 10_000])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_chunked_forward_and_gradients_match_per_expert_loop(shape, rows, monkeypatch) -> None:
    T, D, I, E, k, skew, empty = SHAPES[shape]
    # rows slots per chunk: 1 makes every expert a chunk, 10_000 one chunk for everything
    monkeypatch.setattr(chunked, "CHUNK_BYTES", rows * max(2 * I, D) * 4)
    gen = torch.Generator().manual_seed(100 * shape + rows)
    for _ in range(2):  # fresh plans, weights and tokens each trial
        check(T, D, I, E, k, gen, skew, empty)


def test_chunked_bf16_matches_float64_loosely(monkeypatch) -> None:
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 40 * 64 * 2)
    check(96, 32, 16, 8, 2, torch.Generator().manual_seed(5), dtype=torch.bfloat16, atol=3e-2, rtol=3e-2)


def test_only_the_inputs_that_need_it_get_gradients(monkeypatch) -> None:
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 10 * 32 * 4)
    gen = torch.Generator().manual_seed(9)
    T, D, I, E, k = 60, 16, 16, 8, 2
    plan = random_plan(T, E, k, gen)
    x = torch.randn(T, D, generator=gen, requires_grad=True)
    gate_up = torch.randn(E, 2 * I, D, generator=gen) / D**0.5  # frozen experts
    down = torch.randn(E, D, I, generator=gen) / I**0.5
    out = experts_swiglu(x, plan, gate_up, down, "chunked")
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    x64 = x.detach().double().requires_grad_(True)
    plan64 = DispatchPlan(plan.token_index_S, plan.weight_S.double(), plan.tokens_per_expert_E, plan.dropped_slots)
    ref = reference(x64, plan64, gate_up.double(), down.double())
    (gx64,) = torch.autograd.grad(ref.square().sum(), x64)
    torch.testing.assert_close(gx.double(), gx64, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_chunk_bounds_cover_every_expert_once_and_split_greedily(seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    E = int(torch.randint(1, 70, (1,), generator=gen))
    counts = torch.randint(0, 50, (E,), generator=gen)
    counts[torch.rand(E, generator=gen) < 0.3] = 0
    rows = int(torch.randint(1, 200, (1,), generator=gen))
    bounds = chunked.chunk_bounds(counts.tolist(), rows)
    ends = counts.cumsum(0).tolist()
    expert = slot = 0
    for i, (e0, e1, s0, s1) in enumerate(bounds):
        assert (e0, s0) == (expert, slot) and e1 > e0
        assert s1 == ends[e1 - 1]  # the chunk's slots are exactly its experts' slots
        if i < len(bounds) - 1:
            assert s1 - s0 >= rows  # full
            assert ends[e1 - 2] - s0 < rows if e1 - 1 > e0 else True  # and not one expert longer than needed
        expert, slot = e1, s1
    assert expert == E and slot == int(counts.sum())


def test_auto_takes_the_chunked_path_on_the_cpu_and_padded_where_no_grouped_kernel(monkeypatch) -> None:
    calls = []
    real = dispatch.chunked_experts_swiglu
    monkeypatch.setattr(dispatch, "chunked_experts_swiglu", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(3)
    plan = random_plan(20, 4, 2, gen)
    experts_swiglu(torch.randn(20, 16), plan, torch.randn(4, 16, 16), torch.randn(4, 16, 8), "auto")
    assert calls == [1]
    # rows of 10 fp32 values are not 16-byte aligned: no grouped kernel, so the padded bmm
    experts_swiglu(torch.randn(20, 10), plan, torch.randn(4, 12, 10), torch.randn(4, 10, 6), "auto")
    experts_swiglu(torch.randn(20, 16), plan, torch.randn(4, 16, 16), torch.randn(4, 16, 8), "grouped_mm")
    assert calls == [1]


def test_explicit_chunked_refuses_what_it_cannot_run_and_grouped_mm_reads_it_as_auto() -> None:
    gen = torch.Generator().manual_seed(11)
    plan = random_plan(12, 4, 2, gen)
    x, gate_up, down = torch.randn(12, 16).double(), torch.randn(4, 16, 16).double(), torch.randn(4, 16, 8).double()
    with pytest.raises(ValueError, match="chunked experts path needs .*float64"):
        experts_swiglu(x, plan, gate_up, down, "chunked")
    # expert parallelism passes Experts.matmul on to grouped_mm: "chunked" must run there as "auto"
    counts = torch.tensor([3, 0, 5])
    xs, w = torch.randn(8, 16, generator=gen), torch.randn(3, 8, 16, generator=gen)
    torch.testing.assert_close(
        dispatch.grouped_mm(xs, w, counts, "chunked"), dispatch.grouped_mm(xs, w, counts, "auto")
    )


def _moe_grads(moe, x, impl, checkpointed: bool, autocast: bool):
    moe.experts.matmul = impl
    moe.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if checkpointed:
            y, aux = torch.utils.checkpoint.checkpoint(moe, xg[None], use_reentrant=False)
        else:
            y, aux = moe(xg[None])
    (y.float().square().sum() + aux).backward()
    return [xg.grad] + [p.grad.clone() for p in moe.parameters()]


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_under_activation_checkpointing_and_autocast_equals_the_one_shot_path(autocast, monkeypatch) -> None:
    from moelab.config import MoEConfig
    from moelab.model.moe import MoE

    monkeypatch.setattr(chunked, "CHUNK_BYTES", 24 * 64 * 4)  # several chunks
    torch.manual_seed(4)
    moe = MoE(32, MoEConfig(num_experts=8, top_k=2, expert_hidden=16)).train()
    with torch.no_grad():
        for p in moe.parameters():  # the layer leaves initialisation to the model
            p.normal_(0.0, p.shape[-1] ** -0.5)
    x = torch.randn(70, 32)
    reference = _moe_grads(moe, x, "grouped_mm", checkpointed=False, autocast=autocast)
    got = _moe_grads(moe, x, "chunked", checkpointed=True, autocast=autocast)
    tol = dict(atol=3e-2, rtol=3e-2) if autocast else dict(atol=1e-5, rtol=1e-4)
    for g, r in zip(got, reference):
        torch.testing.assert_close(g, r, **tol)
