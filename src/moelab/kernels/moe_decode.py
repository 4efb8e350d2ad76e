"""Python side of the moe_decode kernel (moe_decode.c): validation, binding, the call.

The kernel runs one MoE layer (router, top-k, the k chosen experts, shared experts) for a few fp32
tokens on the CPU in a single call. It reads the weights where they lie (no copy) and the GIL is
released while it runs (ctypes does that), so a server's other threads keep going.

`bind` checks a layer's weights once (dtype, device, contiguity, consistent shapes: the kernel
trusts them) and returns a `MoEDecodeKernel` that holds the tensors and their addresses; a caller
reuses it for as long as those are the layer's weights (moelab.infer.moe_layer.MoEDecodeBinding checks that).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from moelab.kernels import build


class LayerArgs(ctypes.Structure):
    """Mirror of `moelab_moe_layer` in moe_decode.c."""

    _fields_ = [
        ("D", ctypes.c_int64),
        ("E", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("I", ctypes.c_int64),
        ("Hs", ctypes.c_int64),
        ("scoring", ctypes.c_int64),
        ("renormalize", ctypes.c_int64),
        ("route_scale", ctypes.c_float),
        *(
            (name, ctypes.c_void_p)
            for name in ("router", "bias", "gate_up", "down", "sh_gate_up", "sh_down", "sh_gate")
        ),
    ]


@functools.cache
def _kernel():
    # NOTE: one build-and-load per process (MOELAB_MOE_DECODE is read then); the library is immutable once loaded.
    lib = build.load("moe_decode")
    if lib is None:
        return None
    fn = lib.moelab_moe_decode_f32
    fn.argtypes = [
        ctypes.POINTER(LayerArgs),
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    """Whether the kernel is compiled and loaded (False without a C compiler or with MOELAB_MOE_DECODE=0)."""
    return _kernel() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernel can read these tensors in place: fp32, contiguous, on the CPU (None is allowed)."""
    f32 = torch.float32
    return all(t is None or (t.dtype is f32 and t.is_cpu and t.is_contiguous()) for t in tensors)


def _shape_error(
    router_ED, bias_E, gate_up_E2ID, down_EDI, shared_gate_up_2HD, shared_down_DH, shared_gate_1D
) -> str | None:
    """What is missing or inconsistent about the shapes, or None."""
    for name, t in (("router", router_ED), ("gate_up", gate_up_E2ID), ("down", down_EDI)):
        if t is None:
            return f"{name} is required (got None)"
    if gate_up_E2ID.dim() != 3 or gate_up_E2ID.shape[1] % 2:
        return f"gate_up must be [E, 2I, D], got {tuple(gate_up_E2ID.shape)}"
    E, two_I, D = gate_up_E2ID.shape
    Hs = 0 if shared_gate_up_2HD is None else shared_gate_up_2HD.shape[0] // 2
    expected = (
        ("router", router_ED, (E, D)),
        ("bias", bias_E, (E,)),
        ("down", down_EDI, (E, D, two_I // 2)),
        ("shared gate_up", shared_gate_up_2HD, (2 * Hs, D)),
        ("shared down", shared_down_DH, (D, Hs)),
        ("shared gate", shared_gate_1D, (1, D)),
    )
    for name, t, shape in expected:
        if t is not None and t.shape != shape:
            return f"{name} has shape {tuple(t.shape)}, expected {shape} for gate_up {tuple(gate_up_E2ID.shape)}"
    if (shared_gate_up_2HD is None) != (shared_down_DH is None) or (
        shared_gate_1D is not None and shared_gate_up_2HD is None
    ):
        return "shared gate_up and shared down come together, and shared gate only with them"
    return None


class MoEDecodeKernel:
    """One MoE layer's weights, checked and bound for the kernel: it holds the tensors and the
    addresses they had. Whoever keeps a binding must see that the memory has not moved
    (`share_memory_()`, a `.data` swap) before calling it; moelab.infer.moe_layer.MoEDecodeBinding does."""

    def __init__(
        self,
        fn,
        weights: tuple[torch.Tensor | None, ...],
        top_k: int,
        scoring: str,
        renormalize: bool,
        route_scale: float,
    ):
        router_ED, bias_E, gate_up_E2ID, down_EDI, shared_gate_up_2HD, shared_down_DH, shared_gate_1D = weights
        E, two_I, D = gate_up_E2ID.shape
        self._fn = fn
        self._weights = weights
        self.d_model = D
        self.top_k = top_k
        args = LayerArgs(D, E, top_k, two_I // 2, 0 if shared_gate_up_2HD is None else shared_gate_up_2HD.shape[0] // 2)
        args.scoring, args.renormalize, args.route_scale = int(scoring == "sigmoid"), int(renormalize), route_scale
        for name, t in zip(("router", "bias", "gate_up", "down", "sh_gate_up", "sh_down", "sh_gate"), weights):
            setattr(args, name, _ptr(t))
        self._args = ctypes.byref(args)
        self._args_obj = args  # byref does not keep its target alive

    def __call__(self, x: torch.Tensor, return_routing: bool = False):
        """Output for x [..., D] (fp32, contiguous, CPU; shape of x), or with return_routing also the
        chosen experts [T, k] (int64) and their weights [T, k], T = x.numel() / D."""
        D = self.d_model
        if x.dim() == 0 or x.shape[-1] != D or not usable(x):
            raise ValueError(
                f"x must be a contiguous fp32 CPU tensor [..., {D}], got {x.dtype} {tuple(x.shape)} on {x.device}"
            )
        return self.run(x, x.numel(), return_routing)

    def run(self, x: torch.Tensor, numel: int, return_routing: bool = False):
        """__call__ without checking x, for callers that have: fp32, contiguous, on the CPU, last
        dim D, `numel` elements."""
        T = numel // self.d_model
        out = torch.empty_like(x)
        if not return_routing:  # the decode step: nothing here it does not need
            if self._fn(self._args, T, x.data_ptr(), out.data_ptr(), None, None):
                raise MemoryError("the moe_decode kernel could not allocate its scratch")
            return out
        expert_TK = torch.empty(T, self.top_k, dtype=torch.int64)
        weight_TK = torch.empty(T, self.top_k)
        if self._fn(self._args, T, x.data_ptr(), out.data_ptr(), expert_TK.data_ptr(), weight_TK.data_ptr()):
            raise MemoryError("the moe_decode kernel could not allocate its scratch")
        return out, expert_TK, weight_TK


def bind(
    router_ED: torch.Tensor,
    bias_E: torch.Tensor | None,
    gate_up_E2ID: torch.Tensor,
    down_EDI: torch.Tensor,
    shared_gate_up_2HD: torch.Tensor | None = None,
    shared_down_DH: torch.Tensor | None = None,
    shared_gate_1D: torch.Tensor | None = None,
    *,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    route_scale: float = 1.0,
) -> MoEDecodeKernel:
    """Check one layer's weights and bind them (layouts: moe_decode.c). Raises ValueError on tensors
    or settings the kernel cannot take, RuntimeError when the kernel is unavailable."""
    fn = _kernel()
    if fn is None:
        raise RuntimeError("the moe_decode kernel is unavailable (no C compiler, or MOELAB_MOE_DECODE=0)")
    weights = (router_ED, bias_E, gate_up_E2ID, down_EDI, shared_gate_up_2HD, shared_down_DH, shared_gate_1D)
    if (problem := _shape_error(*weights)) is not None:
        raise ValueError(problem)
    E = gate_up_E2ID.shape[0]
    if not 1 <= top_k <= E or scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"top_k {top_k} (allowed 1..{E}) or scoring {scoring!r} (allowed softmax, sigmoid)")
    if not usable(*weights):
        raise ValueError("the moe_decode kernel reads fp32, contiguous CPU tensors only")
    return MoEDecodeKernel(fn, weights, top_k, scoring, renormalize, route_scale)


def moe_decode(x: torch.Tensor, *weights: torch.Tensor | None, return_routing: bool = False, **routing):
    """One MoE layer in one call: `bind(*weights, **routing)(x)`. For repeated calls keep the binding."""
    return bind(*weights, **routing)(x, return_routing=return_routing)
