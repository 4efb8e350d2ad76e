"""The moe_decode kernel (C) against a float64 per-expert loop, and the build that compiles it. Its use
by the serving layer (binding, when it applies): tests/infer/test_moe_layer.py."""

from __future__ import annotations

import copy
import logging
import threading

import pytest
import torch

from moelab.kernels import build, moe_decode
from moelab.model.moe import MoE
from tests.model.test_moe import fresh_tokens, make_moe
from tests.reference import moe_reference, route

needs_kernel = pytest.mark.skipif(build.compiler() is None, reason="no C compiler on this machine")
pytestmark = needs_kernel

CONFIGS = [
    dict(num_experts=8, top_k=2, expert_hidden=16),
    # the default preset's recipe: fine-grained experts, a shared expert, route_scale = k
    dict(num_experts=64, top_k=6, expert_hidden=8, num_shared_experts=1, shared_expert_hidden=16, route_scale=6.0),
    dict(num_experts=16, top_k=4, expert_hidden=12, renormalize=False, route_scale=2.0, num_shared_experts=2),
    dict(num_experts=8, top_k=3, expert_hidden=16, scoring="sigmoid", bias_update_rate=0.1),
    dict(
        num_experts=8,
        top_k=2,
        expert_hidden=16,
        scoring="sigmoid",
        renormalize=False,
        num_shared_experts=1,
        shared_expert_gate=True,
    ),
    dict(num_experts=16, top_k=4, expert_hidden=8, bias_update_rate=0.1, route_scale=2.5, num_shared_experts=1),
    dict(num_experts=4, top_k=4, expert_hidden=5),  # k = E, odd hidden size
    dict(num_experts=16, top_k=3, expert_hidden=8, renormalize=False, bias_update_rate=0.1),
]


def layer_weights(moe: MoE) -> tuple:
    bias = moe.router.expert_bias if moe.cfg.bias_update_rate > 0 else None
    shared = (moe.shared.gate_up_proj.weight, moe.shared.down_proj.weight) if moe.shared is not None else (None, None)
    gate = moe.shared_gate.weight if moe.shared_gate is not None else None
    return (moe.router.weight, bias, moe.experts.gate_up_proj, moe.experts.down_proj, *shared, gate)


def routing_of(moe: MoE) -> dict:
    cfg = moe.cfg
    return dict(top_k=cfg.top_k, scoring=cfg.scoring, renormalize=cfg.renormalize, route_scale=cfg.route_scale)


def biased(moe: MoE, gen: torch.Generator) -> MoE:
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.randn(moe.cfg.num_experts, generator=gen) * 0.3)
    return moe.eval()


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("D", [40, 64])  # 40: not a multiple of the kernel's 16-wide vectors
def test_kernel_matches_float64_reference(kwargs, D) -> None:
    gen = torch.Generator().manual_seed(21)
    moe = biased(make_moe(D, seed=3, **kwargs), gen)
    ref64 = copy.deepcopy(moe).double()
    # 11 tokens: experts with several tokens, even and odd numbers of them (the kernel takes
    # tokens two at a time where the CPU has 32 vector registers)
    for T in (1, 3, 11):
        x = fresh_tokens(moe, T, D, gen)
        y, expert_TK, weight_TK = moe_decode.moe_decode(x, *layer_weights(moe), return_routing=True, **routing_of(moe))
        y_ref, slots, _, _ = moe_reference(ref64, x.double())
        torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=1e-4)
        for t in range(T):  # the same experts with the same weights, whatever their order
            want = sorted((e, float(w.detach())) for tt, e, w in slots if tt == t)
            got = sorted(zip(expert_TK[t].tolist(), weight_TK[t].tolist()))
            assert [e for e, _ in got] == [e for e, _ in want]
            torch.testing.assert_close(
                torch.tensor([w for _, w in got]), torch.tensor([w for _, w in want], dtype=torch.float32)
            )


def test_kernel_output_keeps_the_input_shape_and_fails_the_reference_when_wrong() -> None:
    """[B, S, D] in, [B, S, D] out; and the comparison is sharp enough to see one expert's weight off."""
    gen = torch.Generator().manual_seed(22)
    moe = make_moe(32, seed=4, num_experts=8, top_k=2, expert_hidden=16).eval()
    x = fresh_tokens(moe, 4, 32, gen)
    y = moe_decode.moe_decode(x.view(2, 2, 32), *layer_weights(moe), **routing_of(moe))
    assert y.shape == (2, 2, 32)
    y_ref, slots, _, _ = moe_reference(copy.deepcopy(moe).double(), x.double())
    torch.testing.assert_close(y.view(4, 32).double(), y_ref, atol=2e-5, rtol=1e-4)
    broken = copy.deepcopy(moe)
    with torch.no_grad():
        broken.experts.down_proj[slots[0][1]] *= 1.01
    y_broken = moe_decode.moe_decode(x, *layer_weights(broken), **routing_of(broken))
    assert not torch.allclose(y_broken.double(), y_ref, atol=2e-5, rtol=1e-4)


def test_large_activations_and_nan_inputs() -> None:
    """The kernel's own exp (silu) over gate activations far into both tails, against float64; and
    a NaN token gives NaN, as in PyTorch, without disturbing the other tokens."""
    gen = torch.Generator().manual_seed(26)
    moe = make_moe(32, seed=11, num_experts=8, top_k=2, expert_hidden=16, num_shared_experts=1).eval()
    with torch.no_grad():
        moe.experts.gate_up_proj.mul_(40.0)  # gate values of +-100 and more: exp under- and overflows
        moe.shared.gate_up_proj.weight.mul_(40.0)
    x = fresh_tokens(moe, 3, 32, gen)
    y = moe_decode.moe_decode(x, *layer_weights(moe), **routing_of(moe))
    y_ref = moe_reference(copy.deepcopy(moe).double(), x.double())[0].detach()
    assert y_ref.abs().max() > 1e3
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4 * float(y_ref.abs().max()), rtol=1e-4)
    x[1, 5] = float("nan")
    y = moe_decode.moe_decode(x, *layer_weights(moe), **routing_of(moe))
    assert torch.isnan(y[1]).all()
    torch.testing.assert_close(y[[0, 2]].double(), y_ref[[0, 2]], atol=1e-4 * float(y_ref.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_a_nan_logit_and_saturated_scores_route_as_the_pytorch_path(scoring) -> None:
    """torch.topk ranks NaN first, and the kernel does too (the token's output is NaN on both
    paths); sigmoid scores saturate to 1.0 above a logit of about 17, and both paths select on the
    logits, so saturated experts are told apart the same way."""
    gen = torch.Generator().manual_seed(27)
    moe = make_moe(32, seed=14, num_experts=8, top_k=2, expert_hidden=16, scoring=scoring).eval()
    with torch.no_grad():
        moe.router.weight.mul_(30.0)  # logits of +-50 and more
    torch_path = copy.deepcopy(moe)  # the training layer: PyTorch only
    x = torch.randn(4, 32, generator=gen)
    with torch.no_grad():
        logits = x @ moe.router.weight.T
        assert (torch.sigmoid(logits) == 1.0).sum(-1).min() >= 2  # ties among the top scores
        y, expert_TK, _ = moe_decode.moe_decode(x, *layer_weights(moe), return_routing=True, **routing_of(moe))
        y_torch = torch_path(x[None])[0][0]
    torch.testing.assert_close(y, y_torch, atol=1e-4, rtol=1e-4)
    slots, _, _ = route(copy.deepcopy(moe).double(), x.double())
    assert [sorted(row) for row in expert_TK.tolist()] == [
        sorted(e for t, e, _ in slots if t == tok) for tok in range(4)
    ]
    with torch.no_grad():
        moe.router.weight[5] = float("nan")  # expert 5 scores NaN for every token
        torch_path.router.weight[5] = float("nan")
        y, expert_TK, _ = moe_decode.moe_decode(x, *layer_weights(moe), return_routing=True, **routing_of(moe))
        y_torch = torch_path(x[None])[0][0]
    assert (expert_TK[:, 0] == 5).all()
    assert torch.isnan(y).all() and torch.isnan(y_torch).all()


def test_ties_choose_the_lower_expert_index() -> None:
    """A zero router scores every expert alike: the kernel takes experts 0..k-1 at equal weights."""
    moe = make_moe(32, seed=4, num_experts=8, top_k=3, expert_hidden=16, route_scale=1.5).eval()
    with torch.no_grad():
        moe.router.weight.zero_()
    _, expert_TK, weight_TK = moe_decode.moe_decode(
        torch.randn(2, 32), *layer_weights(moe), return_routing=True, **routing_of(moe)
    )
    assert expert_TK.tolist() == [[0, 1, 2], [0, 1, 2]]
    torch.testing.assert_close(weight_TK, torch.full((2, 3), 0.5))


def test_bad_tensors_are_refused_with_what_was_wrong() -> None:
    moe = make_moe(32, seed=5, num_experts=8, top_k=2, expert_hidden=16, num_shared_experts=1)
    router, bias, gate_up, down, s_gate_up, s_down, s_gate = layer_weights(moe)
    x = torch.randn(1, 32)
    with pytest.raises(ValueError, match=r"down has shape \(8, 32, 15\), expected \(8, 32, 16\)"):
        moe_decode.bind(router, bias, gate_up, down[..., :15], s_gate_up, s_down, top_k=2)
    with pytest.raises(ValueError, match=r"router has shape"):
        moe_decode.bind(router[:7], bias, gate_up, down, s_gate_up, s_down, top_k=2)
    with pytest.raises(ValueError, match=r"top_k 9 \(allowed 1..8\)"):
        moe_decode.bind(router, bias, gate_up, down, s_gate_up, s_down, top_k=9)
    with pytest.raises(ValueError, match="scoring 'cosine'"):
        moe_decode.bind(router, bias, gate_up, down, s_gate_up, s_down, top_k=2, scoring="cosine")
    with pytest.raises(ValueError, match="come together"):
        moe_decode.bind(router, bias, gate_up, down, s_gate_up, None, top_k=2)
    with pytest.raises(ValueError, match="fp32, contiguous CPU"):
        moe_decode.bind(router, bias, gate_up.bfloat16(), down, s_gate_up, s_down, top_k=2)
    with pytest.raises(ValueError, match="fp32, contiguous CPU"):
        moe_decode.bind(
            router, bias, gate_up.transpose(1, 2).contiguous().transpose(1, 2), down, s_gate_up, s_down, top_k=2
        )
    kernel = moe_decode.bind(router, bias, gate_up, down, s_gate_up, s_down, top_k=2)
    with pytest.raises(ValueError, match=r"x must be a contiguous fp32 CPU tensor \[\.\.\., 32\]"):
        kernel(torch.randn(1, 31))
    with pytest.raises(ValueError, match="x must be"):
        kernel(x.double())
    with pytest.raises(ValueError, match="x must be"):
        kernel(torch.randn(32, 2).t())


def test_concurrent_calls_on_one_binding_agree_with_sequential_ones() -> None:
    """The kernel keeps no state between calls (its scratch is per call), and ctypes releases the
    GIL while it runs: threads may share a binding."""
    moe = make_moe(64, seed=6, num_experts=16, top_k=4, expert_hidden=16, num_shared_experts=1)
    kernel = moe_decode.bind(*layer_weights(moe), **routing_of(moe))
    xs = [torch.randn(2, 64) for _ in range(8)]
    want = [kernel(x) for x in xs]
    got: list = [None] * len(xs)

    def work(i: int) -> None:
        for _ in range(50):
            got[i] = kernel(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w, g in zip(want, got):
        assert torch.equal(w, g)


# ---------------------------------------------------------------------------------------------
# Build


def test_build_caches_the_library_by_content(tmp_path) -> None:
    first = build.build("moe_decode", tmp_path)
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path and first.name.startswith("moe_decode-") and first.suffix == ".so"
    assert build.build("moe_decode", tmp_path) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def test_build_failure_says_why_and_load_falls_back(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(build.KernelBuildError, match="no C compiler found"):
        build.build("moe_decode", tmp_path)
    fake = tmp_path / "broken-cc"
    fake.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(build.KernelBuildError, match=r"failed \(exit 3\): broken-cc: cannot compile"):
        build.build("moe_decode")
    with caplog.at_level(logging.WARNING, logger="moelab.kernels.build"):
        assert build.load("moe_decode") is None
    assert "using the PyTorch path" in caplog.text
    assert not any((tmp_path / "cache" / "kernels").glob("*.so"))


def test_the_moe_decode_kernel_can_be_switched_off(monkeypatch, caplog) -> None:
    monkeypatch.setenv("MOELAB_MOE_DECODE", "0")
    assert build.load("moe_decode") is None
    monkeypatch.setenv("MOELAB_MOE_DECODE", "1")
    assert build.load("moe_decode") is not None
    monkeypatch.setenv("MOELAB_MOE_DECODE", "maybe")
    with caplog.at_level(logging.WARNING, logger="moelab.kernels.build"):
        assert build.load("moe_decode") is not None
    assert "MOELAB_MOE_DECODE='maybe' is not one of 0, off" in caplog.text
