"""Dense SwiGLU feed-forward: down(silu(x W_gate) * (x W_up))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_product(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up (* weight): the hidden activation of a SwiGLU, dense FFN and experts alike.

    NOTE: with autograd off (inference, evaluation) the products are taken in place on the silu
    output, one buffer instead of two or three (measured: docs/architecture.md, Measured choices).
    With autograd on, the plain expression keeps
    the tensors the backward needs."""
    if torch.is_grad_enabled():
        hidden = F.silu(gate) * up
        return hidden if weight is None else hidden * weight
    hidden = F.silu(gate).mul_(up)
    return hidden if weight is None else hidden.mul_(weight)


class SwiGLU(nn.Module):
    """The dense FFN. Gate and up projections are fused into one [2H, D] weight (gate rows first),
    the layout Hugging Face uses for fused experts, so one matmul serves both."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gate_up_proj = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: F.linear on the weights rather than calling the two Linear modules: at decode the
        # FFN is overhead-bound and each module call costs about as much as a small matmul.
        gate, up = F.linear(x, self.gate_up_proj.weight).chunk(2, dim=-1)
        return F.linear(swiglu_product(gate, up), self.down_proj.weight)
