"""Dense SwiGLU feed-forward: down(silu(x W_gate) * (x W_up))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """The dense FFN. Gate and up projections are fused into one [2H, D] weight (gate rows first),
    the layout Hugging Face uses for fused experts, so one matmul serves both."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gate_up_proj = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(gate) * up)
        # NOTE: without autograd (inference) the product is taken in place on the silu output, as the
        # MoE experts do (moelab.model.dispatch), so dense-vs-MoE speed compares like with like.
        return self.down_proj(F.silu(gate).mul_(up))
