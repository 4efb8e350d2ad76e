"""The grouped matmul as a custom operator, so that torch.compile can trace it in fp32.

Shape legend: S token-slots grouped by expert, E experts, K input width, N output width.

NOTE: the fake-tensor (meta) rule of `aten._grouped_mm` in this PyTorch accepts bf16 only (it
mirrors the CUDA kernel's checks), while the CPU kernel also runs fp32: tracing the fp32 path
stops with "Expected inputs of BF16 type". These operators call the same kernel, so the numbers are
the eager ones; they carry their own shape rule, and the backward is built from them too, so a
compiled graph holds each grouped matmul as one opaque call. Eager code keeps calling
`torch._grouped_mm` directly (moelab.model.dispatch.grouped_mm).
"""

from __future__ import annotations

import torch


@torch.library.custom_op("moelab::grouped_mm", mutates_args=())
def grouped_mm_op(x_SK: torch.Tensor, weight_ENK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """out[s] = x[s] @ weight[e(s)].T, slots of expert e ending at offsets_E[e]: [S, N]."""
    return torch._grouped_mm(x_SK.contiguous(), weight_ENK.transpose(-2, -1), offs=offsets_E)


@grouped_mm_op.register_fake
def _(x_SK: torch.Tensor, weight_ENK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return x_SK.new_empty(x_SK.shape[0], weight_ENK.shape[1])


@torch.library.custom_op("moelab::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(grad_SN: torch.Tensor, x_SK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """The weight's gradient [E, N, K]: grad[slots of e].T @ x[slots of e] for every expert e."""
    return torch._grouped_mm(grad_SN.contiguous().t(), x_SK.contiguous(), offs=offsets_E)


@grouped_mm_weight_grad.register_fake
def _(grad_SN: torch.Tensor, x_SK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return grad_SN.new_empty(offsets_E.shape[0], grad_SN.shape[1], x_SK.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x_SK, weight_ENK, offsets_E = inputs
    ctx.save_for_backward(x_SK, weight_ENK, offsets_E)


def _backward(ctx, grad_SN: torch.Tensor):
    x_SK, weight_ENK, offsets_E = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:  # grad[s] @ weight[e(s)]: the same operator on the transposed weight
        grad_x = grouped_mm_op(grad_SN, weight_ENK.transpose(-2, -1), offsets_E)
    if ctx.needs_input_grad[1]:
        grad_w = grouped_mm_weight_grad(grad_SN, x_SK, offsets_E)
    return grad_x, grad_w, None


grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)
