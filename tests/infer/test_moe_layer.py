"""The MoE layer as serving runs it (moelab.infer.moe_layer): `prepare_for_inference`, the few-token
paths and the moe_decode kernel's use, each against the training layer's grouped path and a float64
per-expert loop."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from moelab.infer import moe_layer
from moelab.infer.moe_layer import MOE_DECODE_MAX_TOKENS, InferenceMoE, prepare_for_inference
from moelab.kernels import build, moe_decode
from moelab.model.moe import MoE
from tests.kernels.test_moe_decode import CONFIGS, biased
from tests.model.test_moe import fresh_tokens, make_moe
from tests.reference import moe_reference

needs_kernel = pytest.mark.skipif(build.compiler() is None, reason="no C compiler on this machine")


def inference(moe: MoE, use_moe_decode: bool = True) -> InferenceMoE:
    """The serving form of a trained layer (shares its weights)."""
    return InferenceMoE(moe.eval(), use_moe_decode)


# ---------------------------------------------------------------------------------------------
# prepare_for_inference


def test_prepare_for_inference_swaps_moe_layers_over_the_same_weights() -> None:
    from moelab.config import load_config
    from moelab.model import Transformer

    cfg = load_config(preset="small-moe", overrides=["model.n_layers=2", "model.vocab_size=300"]).model
    model = Transformer(cfg)
    before = dict(model.state_dict(keep_vars=True))
    params_before = {name: id(p) for name, p in model.named_parameters()}
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        logits_trained = model.eval()(tokens).logits
    model.train()
    assert prepare_for_inference(model) is model
    assert not model.training
    assert all(type(m) is InferenceMoE for m in model.moe_layers()) and model.moe_layers()
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)  # same names, same order: checkpoints and export unchanged
    assert all(after[name] is before[name] for name in before)  # the very same tensors
    assert {name: id(p) for name, p in model.named_parameters()} == params_before
    layers = model.moe_layers()
    prepare_for_inference(model, use_moe_decode=False)  # idempotent; the switch is updated
    assert model.moe_layers() == layers and not any(m.use_moe_decode for m in layers)
    with torch.no_grad():
        logits_served = model(tokens).logits
    torch.testing.assert_close(logits_served, logits_trained, atol=1e-5, rtol=1e-5)


def test_inference_layer_refuses_training() -> None:
    layer = inference(make_moe(16, seed=1, num_experts=4, top_k=2, expert_hidden=8)).train()
    with pytest.raises(RuntimeError, match="for evaluation"):
        layer(torch.randn(1, 2, 16))


# ---------------------------------------------------------------------------------------------
# Few-token paths


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_experts=8, top_k=2, expert_hidden=16),
        dict(num_experts=16, top_k=4, expert_hidden=8, renormalize=False, route_scale=2.0, num_shared_experts=1),
        dict(num_experts=8, top_k=2, expert_hidden=16, scoring="sigmoid", bias_update_rate=0.1),
        # the decode router's shortcut (softmax over the k chosen logits) with a selection bias and a scale
        dict(num_experts=16, top_k=4, expert_hidden=8, bias_update_rate=0.1, route_scale=2.5, num_shared_experts=1),
    ],
)
@pytest.mark.parametrize("use_moe_decode", [True, False])
def test_few_token_decode_path_matches_reference(kwargs, use_moe_decode) -> None:
    """Eval forwards with few tokens take the moe_decode kernel, or without it the few-token
    PyTorch paths (no grouping); same outputs as the reference and the training layer's grouped path."""
    gen = torch.Generator().manual_seed(11)
    grouped = make_moe(32, seed=5, **kwargs)
    with torch.no_grad():
        grouped.router.expert_bias.copy_(torch.randn(grouped.cfg.num_experts, generator=gen) * 0.1)
    moe = inference(grouped, use_moe_decode)
    for T in (1, 3):
        x = fresh_tokens(moe, T, 32, gen)
        assert T * moe.cfg.top_k <= moe.few_token_max_slots
        with torch.no_grad():
            y, _ = moe(x[None])
            ref, _, _, _ = moe_reference(copy.deepcopy(moe).double(), x.double())
            y_grouped, _ = grouped(x[None])
        torch.testing.assert_close(y[0].double(), ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(y, y_grouped, atol=1e-6, rtol=1e-5)


def test_few_token_decode_path_under_bf16_autocast_matches_grouped_path() -> None:
    """The serving engine runs bf16 autocast on GPUs; the gathered decode path casts like the
    grouped path does and sums the k experts in fp32 (checked here with CPU autocast)."""
    gen = torch.Generator().manual_seed(12)
    grouped = make_moe(32, seed=6, num_experts=16, top_k=4, expert_hidden=8, num_shared_experts=1).eval()
    moe = inference(grouped)
    x = fresh_tokens(moe, 2, 32, gen, min_gap=1e-2)  # far from ties: bf16 must pick the same experts
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(x[None])
        y_grouped, _ = grouped(x[None])
    assert y.dtype == y_grouped.dtype
    torch.testing.assert_close(y.float(), y_grouped.float(), atol=3e-2, rtol=3e-2)
    with torch.no_grad():
        y32, _ = moe(x[None])
    assert (y.float() - y32).abs().max() > 0  # autocast really ran the experts in bf16
    torch.testing.assert_close(y.float(), y32, atol=5e-2, rtol=5e-2)


def test_decode_path_choice_on_cpu(monkeypatch) -> None:
    """Without the moe_decode kernel: one token with autograd off reads its experts in place; a few
    tokens gather small experts' weights but take the grouped path when one expert is large (the
    copy would cost more)."""
    calls: list[str] = []
    for name in ("experts_swiglu_one_token", "experts_swiglu_gathered"):
        real = getattr(moe_layer, name)
        monkeypatch.setattr(moe_layer, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    gen = torch.Generator().manual_seed(13)
    # the PyTorch paths only (the kernel's use: below)
    small = inference(make_moe(32, seed=7, num_experts=8, top_k=2, expert_hidden=16), use_moe_decode=False)
    large = inference(make_moe(128, seed=8, num_experts=4, top_k=2, expert_hidden=512), False)  # 3*I*D = 196,608
    capped = inference(make_moe(32, seed=9, num_experts=8, top_k=2, expert_hidden=16, capacity_factor=0.5), False)
    for moe, T, grad, expected in [
        (small, 1, False, ["experts_swiglu_one_token"]),
        (small, 1, True, ["experts_swiglu_gathered"]),  # autograd on: weights keep their gradient
        (small, 3, False, ["experts_swiglu_gathered"]),
        (large, 1, False, ["experts_swiglu_one_token"]),
        (large, 3, False, []),  # grouped
        (capped, 1, False, []),  # a capacity drops slots: grouped
        (capped, 3, False, []),
    ]:
        calls.clear()
        D = moe.router.weight.shape[1]
        x = torch.randn(1, T, D, generator=gen)
        with torch.set_grad_enabled(grad):
            y, _ = moe(x)
        ref, _, _, _ = moe_reference(copy.deepcopy(moe).double(), x[0].double())
        assert calls == expected, (T, grad)
        torch.testing.assert_close(y[0].detach().double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("T", [1, 3])
def test_few_token_expert_paths_keep_float64(T) -> None:
    """Float64 inputs stay float64 through both few-token expert paths (the k experts are not
    summed in fp32); checked against an explicit float64 per-slot computation."""
    from moelab.infer.few_token import experts_swiglu_gathered, experts_swiglu_one_token

    gen = torch.Generator().manual_seed(14)
    E, k, I, D = 8, 3, 16, 32
    gate_up = torch.randn(E, 2 * I, D, generator=gen, dtype=torch.float64)
    down = torch.randn(E, D, I, generator=gen, dtype=torch.float64)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64)
    expert_TK = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    weight_TK = torch.rand(T, k, generator=gen, dtype=torch.float64)
    ref = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(expert_TK[t, j])
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            ref[t] += weight_TK[t, j] * (down[e] @ (torch.nn.functional.silu(gate) * up))
    with torch.no_grad():
        outs = [experts_swiglu_gathered(x, expert_TK, weight_TK, gate_up, down)]
        if T == 1:
            outs.append(experts_swiglu_one_token(x, expert_TK, weight_TK, gate_up, down))
    for out in outs:
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# The moe_decode kernel's use


def count_kernel_runs(monkeypatch) -> list[int]:
    runs: list[int] = []
    real = moe_decode.MoEDecodeKernel.run

    def counted(self, x, numel, return_routing=False):
        runs.append(numel // self.d_model)
        return real(self, x, numel, return_routing)

    monkeypatch.setattr(moe_decode.MoEDecodeKernel, "run", counted)
    return runs


@needs_kernel
@pytest.mark.parametrize("kwargs", CONFIGS[:5])
def test_moe_eval_forward_of_few_tokens_runs_the_kernel(monkeypatch, kwargs) -> None:
    runs = count_kernel_runs(monkeypatch)
    gen = torch.Generator().manual_seed(23)
    moe = inference(biased(make_moe(48, seed=7, **kwargs), gen))
    for T in (1, 2, 20):  # 20: experts shared between tokens, grouped in the kernel
        x = fresh_tokens(moe, T, 48, gen)
        with torch.inference_mode():
            y, aux = moe(x[None])
        assert aux is None
        y_ref, _, _, _ = moe_reference(copy.deepcopy(moe).double(), x.double())
        torch.testing.assert_close(y[0].double(), y_ref, atol=2e-5, rtol=1e-4)
        torch_path = inference(copy.deepcopy(moe), use_moe_decode=False)
        with torch.no_grad():
            y_torch, _ = torch_path(x[None])
        torch.testing.assert_close(y, y_torch, atol=1e-5, rtol=1e-4)  # fp32 both, summed in other orders
    assert runs == [1, 2, 20]


@needs_kernel
def test_moe_takes_the_pytorch_path_where_the_kernel_does_not_apply(monkeypatch) -> None:
    runs = count_kernel_runs(monkeypatch)
    gen = torch.Generator().manual_seed(24)
    D = 32
    plain = inference(make_moe(D, seed=8, num_experts=8, top_k=2, expert_hidden=16))
    x = fresh_tokens(plain, 1, D, gen)[None]
    cases = {
        "autograd on": (plain, lambda m: m(x)),
        "the training layer": (make_moe(D, seed=8, num_experts=8, top_k=2, expert_hidden=16).eval(), lambda m: m(x)),
        "switched off": (copy.deepcopy(plain), lambda m: (setattr(m, "use_moe_decode", False), m(x))),
        "bf16 weights": (copy.deepcopy(plain).bfloat16(), lambda m: m(x.bfloat16())),
        "bf16 experts, fp32 input": (_with_bf16_experts(plain), lambda m: m(x)),
        "float64": (copy.deepcopy(plain).double(), lambda m: m(x.double())),
        "autocast": (plain, lambda m: _autocast(m, x)),
        "too many tokens": (plain, lambda m: m(torch.randn(1, MOE_DECODE_MAX_TOKENS + 1, D))),
        "non-contiguous input": (plain, lambda m: m(torch.randn(1, 1, 2 * D)[..., ::2])),
        "capacity": (
            inference(make_moe(D, seed=8, num_experts=8, top_k=2, expert_hidden=16, capacity_factor=1.0)),
            lambda m: m(x),
        ),
        "expert choice": (
            inference(make_moe(D, seed=8, num_experts=8, top_k=2, expert_hidden=16, routing="expert_choice")),
            lambda m: m(x),
        ),
    }
    for name, (moe, call) in cases.items():
        grad = name == "autograd on"
        with torch.set_grad_enabled(grad):
            call(moe)
        assert runs == [], name
    with torch.no_grad():
        plain(x)
    assert runs == [1]


@needs_kernel
def test_large_experts_leave_multi_threaded_runs_to_pytorch(monkeypatch) -> None:
    """The kernel is single-threaded: with more than one torch thread, experts of more than 2^17
    weights take the PyTorch path (which splits their products over the threads)."""
    runs = count_kernel_runs(monkeypatch)
    large = inference(make_moe(256, seed=12, num_experts=4, top_k=2, expert_hidden=192))  # 3*I*D = 147,456
    small = inference(make_moe(32, seed=12, num_experts=4, top_k=2, expert_hidden=16))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                large(torch.randn(1, 1, 256))
                small(torch.randn(1, 1, 32))
    finally:
        torch.set_num_threads(threads)
    assert runs == [1, 1, 1]  # large at 1 thread, small at 1 and 2


def _with_bf16_experts(moe: MoE) -> MoE:
    moe = copy.deepcopy(moe)
    moe.experts.bfloat16()  # the PyTorch path casts the chosen experts to the input's dtype
    return moe


def _autocast(moe, x):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return moe(x)


@needs_kernel
def test_binding_follows_the_weights(monkeypatch) -> None:
    """The kernel reads the weights where they lie (in-place updates are seen at once) and is
    re-bound whenever a weight is replaced or its memory moves. Each step changes the weights
    afterwards in place, so a kernel still reading an old copy would be caught."""
    runs = count_kernel_runs(monkeypatch)
    gen = torch.Generator().manual_seed(25)
    D = 32
    moe = inference(make_moe(D, seed=9, num_experts=8, top_k=2, expert_hidden=16, num_shared_experts=1))
    x = fresh_tokens(moe, 1, D, gen)

    def check(m: MoE) -> None:
        with torch.no_grad():
            y, _ = m(x[None])
        y_ref, _, _, _ = moe_reference(copy.deepcopy(m).double(), x.double())
        torch.testing.assert_close(y[0].double(), y_ref, atol=2e-5, rtol=1e-4)

    def nudge(m: MoE) -> None:  # an in-place change of every weight
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.1)

    steps = {
        "in place only": lambda: None,
        "the whole layer converted there and back": lambda: moe.double().float(),
        "one submodule converted (no MoE._apply)": lambda: moe.experts.double().float(),
        "a bare .data swap": lambda: setattr(moe.router.weight, "data", torch.randn_like(moe.router.weight) * 3.0),
        "share_memory_ (what torch.multiprocessing does to a tensor it sends)": lambda: (
            moe.experts.gate_up_proj.share_memory_()
        ),
        "swap_tensors": lambda: torch.utils.swap_tensors(
            moe.experts.down_proj, nn.Parameter(moe.experts.down_proj.detach().clone())
        ),
        "load_state_dict(assign=True)": lambda: moe.load_state_dict(
            copy.deepcopy(
                make_moe(D, seed=10, num_experts=8, top_k=2, expert_hidden=16, num_shared_experts=1).state_dict()
            ),
            assign=True,
        ),
        "a new Parameter": lambda: setattr(
            moe.experts, "down_proj", nn.Parameter(torch.randn_like(moe.experts.down_proj) * 0.1)
        ),
        "a new shared-expert Parameter": lambda: setattr(
            moe.shared.gate_up_proj, "weight", nn.Parameter(torch.randn_like(moe.shared.gate_up_proj.weight) * 0.1)
        ),
        # settings: a new (frozen) config for the router (and the reference, which reads moe.cfg)
        "a new config": lambda: setattr(
            moe,
            "cfg",
            setattr(moe.router, "cfg", dataclasses.replace(moe.cfg, route_scale=3.0, renormalize=False))
            or moe.router.cfg,
        ),
    }
    check(moe)
    for name, step in steps.items():
        step()
        check(moe)
        nudge(moe)
        try:
            check(moe)
        except AssertionError as e:
            raise AssertionError(f"after {name}") from e
    clone = copy.deepcopy(moe)  # the copy binds its own weights
    with torch.no_grad():
        clone.router.weight.mul_(-1.0)
    check(clone)
    check(moe)
    doubled = {name: p * 2 for name, p in moe.named_parameters()}  # functional_call swaps the Parameters in
    with torch.no_grad():
        y_swapped, _ = torch.func.functional_call(moe, doubled, (x[None],))
    ref = copy.deepcopy(moe).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(2)
    torch.testing.assert_close(y_swapped[0].double(), moe_reference(ref, x.double())[0], atol=4e-5, rtol=1e-4)
    check(moe)  # and back
    assert len(runs) == 1 + 2 * len(steps) + 4


@needs_kernel
def test_missing_weights_fail_in_pytorch_not_in_the_kernel() -> None:
    """A weight set to None (nn.Module allows it) never reaches the kernel as a NULL pointer."""
    moe = inference(make_moe(32, seed=13, num_experts=8, top_k=2, expert_hidden=16))
    with pytest.raises(ValueError, match="down is required"):
        moe_decode.bind(moe.router.weight, None, moe.experts.gate_up_proj, None, top_k=2)
    moe.experts.down_proj = None
    with torch.no_grad(), pytest.raises(TypeError):
        moe(torch.randn(1, 1, 32))


@needs_kernel
def test_decoding_a_model_with_and_without_the_kernel_gives_the_same_tokens() -> None:
    from moelab.config import load_config
    from moelab.model import Transformer

    cfg = load_config(preset="small-moe", overrides=["model.n_layers=2", "model.vocab_size=300"]).model
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    for moe in model.moe_layers():  # small logits gaps would make greedy decoding fragile: spread them
        with torch.no_grad():
            moe.router.weight.mul_(20.0)
    prompt = torch.randint(0, cfg.vocab_size, (1, 8))

    def greedy(use_moe_decode: bool) -> tuple[list[int], torch.Tensor]:
        prepare_for_inference(model, use_moe_decode)
        from moelab.model import KVCache

        cache = KVCache(cfg, 1, 64, "cpu", torch.float32)
        tokens, logits_seen = [], []
        with torch.inference_mode():
            logits = model(prompt, cache=cache).logits[:, -1]
            for p in range(8, 24):
                token = int(logits.argmax())
                tokens.append(token)
                logits = model(torch.tensor([[token]]), positions_BT=torch.tensor([[p]]), cache=cache).logits[:, -1]
                logits_seen.append(logits)
        return tokens, torch.cat(logits_seen)

    tokens_kernel, logits_kernel = greedy(True)
    tokens_torch, logits_torch = greedy(False)
    assert tokens_kernel == tokens_torch
    torch.testing.assert_close(logits_kernel, logits_torch, atol=1e-4, rtol=1e-4)
