"""The experts' SwiGLU over consecutive groups of experts, with its own backward (CPU path).

Shape legend: T tokens, D model width, E experts, I expert hidden size, S token-slots grouped by
expert, c the slots of one chunk, G the experts of one chunk.

`experts_swiglu` in moelab.model.dispatch runs every slot at once: the gathered inputs [S, D], the
projections [S, 2I], the hidden [S, I] and the outputs [S, D] are each one buffer of S rows. With
fine-grained experts S = k*T is large (64 MB per [S, D] buffer at T=4096, k=8, D=512), and on the
CPU every buffer that size is a fresh mapping from the allocator whose pages fault in on first
write: the gather and the scatter then cost more than the data they move. Here the experts are
taken in consecutive groups holding about `rows_per_chunk` slots; each group gathers its slots'
tokens, runs both grouped matmuls and adds its weighted outputs into the tokens before the next
group starts, so the buffers are small, are reused by the allocator, and stay in cache between the
projections.

The backward (`ChunkedExpertsSwiGLU`) keeps the gathered inputs [S, D] and the first projection's
output [S, 2I] per chunk (what the weight gradients and the SwiGLU's derivative need; the one-shot
path keeps these and the hidden activations too) and recomputes the cheap rest per chunk: the
hidden activation and the routing weight's product. It returns the gradients of the tokens, of the routing weights, and of both expert
weights; each chunk writes its own experts' weight gradients, so nothing is accumulated over
chunks but the tokens' gradient.

The chunk bounds need the per-expert counts on the host (one `.tolist()`): free on the CPU, a
synchronisation on CUDA, and a graph break under torch.compile; those keep the one-shot path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# NOTE: the chunk size is set in bytes of the largest per-chunk buffer, so that coarse experts
# (I = 1024, a [c, 2I] projection of 8 KiB per row) and fine ones (I = 256) get chunks of the same
# footprint; the value is measured (docs/architecture.md, Measured choices).
CHUNK_BYTES = 4 * 2**20


def chunk_bounds(tokens_per_expert: list[int], min_rows: int) -> list[tuple[int, int, int, int]]:
    """(first expert, end expert, first slot, end slot) of consecutive expert groups, each holding
    at least `min_rows` slots (the last one what is left); an expert is never split, so one
    expert with more slots makes its chunk larger. Every expert belongs to exactly one chunk."""
    bounds: list[tuple[int, int, int, int]] = []
    first_expert = first_slot = slot = 0
    for expert, count in enumerate(tokens_per_expert):
        slot += count
        if slot - first_slot >= min_rows:
            bounds.append((first_expert, expert + 1, first_slot, slot))
            first_expert, first_slot = expert + 1, slot
    if first_expert < len(tokens_per_expert):
        bounds.append((first_expert, len(tokens_per_expert), first_slot, slot))
    return bounds


def rows_per_chunk(d_model: int, hidden: int, element_size: int) -> int:
    """Slots per chunk so that the largest per-chunk buffer ([c, 2I] or [c, D]) is CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (max(2 * hidden, d_model) * element_size))


def _offsets(tokens_per_expert: list[int], device: torch.device) -> torch.Tensor:
    """[G] int32 cumulative slot counts, the grouped matmul's group ends."""
    return torch.tensor(tokens_per_expert, dtype=torch.int64, device=device).cumsum(0).to(torch.int32)


def _hidden(gate_up_c2I: torch.Tensor) -> torch.Tensor:
    gate_cI, up_cI = gate_up_c2I.chunk(2, dim=-1)
    return F.silu(gate_cI).mul_(up_cI)


def chunked_experts_forward(
    x_TD: torch.Tensor,
    token_index_S: torch.Tensor,
    weight_S: torch.Tensor,
    gate_up_E2ID: torch.Tensor,
    down_EDI: torch.Tensor,
    tokens_per_expert: list[int],
    bounds: list[tuple[int, int, int, int]],
    keep: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """sum over each token's slots of weight * SwiGLU_e(x): [T, D] in fp32 or wider. `keep`, when
    given, receives each chunk's gathered inputs [c, D] and first projection [c, 2I] (for the
    backward)."""
    T, D = x_TD.shape
    acc_dtype = torch.promote_types(x_TD.dtype, torch.float32)
    out_TD = torch.zeros(T, D, dtype=acc_dtype, device=x_TD.device)
    for e0, e1, s0, s1 in bounds:
        if s1 == s0:
            continue
        offsets_G = _offsets(tokens_per_expert[e0:e1], x_TD.device)
        token_index_c = token_index_S[s0:s1]
        x_cD = x_TD.index_select(0, token_index_c)
        gate_up_c2I = torch._grouped_mm(x_cD, gate_up_E2ID[e0:e1].transpose(-2, -1), offs=offsets_G)
        if keep is not None:
            keep += [x_cD, gate_up_c2I]
        hidden_cI = _hidden(gate_up_c2I).mul_(weight_S[s0:s1, None])
        y_cD = torch._grouped_mm(hidden_cI, down_EDI[e0:e1].transpose(-2, -1), offs=offsets_G)
        out_TD.index_add_(0, token_index_c, y_cD if y_cD.dtype == acc_dtype else y_cD.to(acc_dtype))
    return out_TD


class ChunkedExpertsSwiGLU(torch.autograd.Function):
    """Autograd for `chunked_experts_forward` over (x_TD, weight_S, gate_up_E2ID, down_EDI)."""

    @staticmethod
    def forward(ctx, x_TD, weight_S, gate_up_E2ID, down_EDI, token_index_S, tokens_per_expert, bounds):
        kept: list[torch.Tensor] = []
        out_TD = chunked_experts_forward(
            x_TD, token_index_S, weight_S, gate_up_E2ID, down_EDI, tokens_per_expert, bounds, keep=kept
        )
        # NOTE: x_TD itself is not kept: the backward needs only the gathered rows (in `kept`) and
        # its shape and dtype.
        ctx.save_for_backward(weight_S, gate_up_E2ID, down_EDI, token_index_S, *kept)
        ctx.x_meta = (x_TD.shape, x_TD.dtype, x_TD.device)
        ctx.tokens_per_expert = tokens_per_expert
        ctx.bounds = bounds
        return out_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out_TD):
        weight_S, gate_up_E2ID, down_EDI, token_index_S, *kept = ctx.saved_tensors
        needs_x, needs_weight, needs_gate_up, needs_down = ctx.needs_input_grad[:4]
        x_shape, dtype, device = ctx.x_meta
        grad_out_TD = grad_out_TD.to(dtype)
        acc_dtype = torch.promote_types(dtype, torch.float32)
        grad_x_TD = torch.zeros(x_shape, dtype=acc_dtype, device=device) if needs_x else None
        grad_weight_S = torch.zeros_like(weight_S) if needs_weight else None
        # NOTE: empty, not zeros: every chunk writes its experts' rows (an expert without slots gets
        # the zeros of an empty grouped product), so zero-filling both first would be wasted
        # (measured: docs/architecture.md, Measured: the MoE layer).
        grad_gate_up = torch.empty_like(gate_up_E2ID) if needs_gate_up else None
        grad_down = torch.empty_like(down_EDI) if needs_down else None
        for e0, e1, s0, s1 in ctx.bounds:
            if s1 == s0:  # a chunk of experts without slots: no product writes their gradients
                for grad in (grad_gate_up, grad_down):
                    if grad is not None:
                        grad[e0:e1] = 0
        chunks = [b for b in ctx.bounds if b[3] > b[2]]
        for (e0, e1, s0, s1), x_cD, gate_up_c2I in zip(chunks, kept[0::2], kept[1::2]):
            offsets_G = _offsets(ctx.tokens_per_expert[e0:e1], device)
            token_index_c = token_index_S[s0:s1]
            weight_c1 = weight_S[s0:s1, None]
            grad_y_cD = grad_out_TD.index_select(0, token_index_c)
            # d hidden = d y @ down_e; hidden = silu(gate) * up * weight
            grad_hidden_cI = torch._grouped_mm(grad_y_cD, down_EDI[e0:e1], offs=offsets_G)
            gate_cI, up_cI = gate_up_c2I.chunk(2, dim=-1)
            I = gate_cI.shape[-1]
            silu_cI = F.silu(gate_cI)
            product_cI = silu_cI * up_cI  # silu(gate) * up, before the routing weight
            if needs_weight:
                grad_weight_S[s0:s1] = torch.linalg.vecdot(grad_hidden_cI, product_cI).to(weight_S.dtype)
            if needs_down:  # d down_e = d y[e].T @ hidden[e]
                hidden_cI = product_cI.mul_(weight_c1)
                grad_down[e0:e1] = torch._grouped_mm(grad_y_cD.t(), hidden_cI, offs=offsets_G)
            if not (needs_x or needs_gate_up):
                continue
            grad_product_cI = grad_hidden_cI.mul_(weight_c1)
            # NOTE: the fused silu_backward and products written straight into the two halves, not
            # the spelled-out derivative (sigmoid, products, a cat): measured in docs/architecture.md.
            grad_gate_up_c2I = torch.empty_like(gate_up_c2I)
            torch.ops.aten.silu_backward.grad_input(
                grad_product_cI * up_cI, gate_cI, grad_input=grad_gate_up_c2I[:, :I]
            )
            torch.mul(grad_product_cI, silu_cI, out=grad_gate_up_c2I[:, I:])
            if needs_gate_up:  # d gate_up_e = d h[e].T @ x[e]
                grad_gate_up[e0:e1] = torch._grouped_mm(grad_gate_up_c2I.t(), x_cD, offs=offsets_G)
            if needs_x:
                grad_x_cD = torch._grouped_mm(grad_gate_up_c2I, gate_up_E2ID[e0:e1], offs=offsets_G)
                grad_x_TD.index_add_(0, token_index_c, grad_x_cD.to(acc_dtype))
        if grad_x_TD is not None:
            grad_x_TD = grad_x_TD.to(dtype)
        return grad_x_TD, grad_weight_S, grad_gate_up, grad_down, None, None, None


def chunked_experts_swiglu(
    x_TD: torch.Tensor,
    token_index_S: torch.Tensor,
    weight_S: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    gate_up_E2ID: torch.Tensor,
    down_EDI: torch.Tensor,
) -> torch.Tensor:
    """The experts' weighted SwiGLU summed per token, [T, D] in the accumulation dtype (fp32 or
    wider): the same result as moelab.model.dispatch.experts_swiglu, chunk by chunk."""
    tokens_per_expert = tokens_per_expert_E.tolist()
    E, two_I, D = gate_up_E2ID.shape
    bounds = chunk_bounds(tokens_per_expert, rows_per_chunk(D, two_I // 2, x_TD.element_size()))
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (x_TD, weight_S, gate_up_E2ID, down_EDI)):
        return chunked_experts_forward(x_TD, token_index_S, weight_S, gate_up_E2ID, down_EDI, tokens_per_expert, bounds)
    return ChunkedExpertsSwiGLU.apply(x_TD, weight_S, gate_up_E2ID, down_EDI, token_index_S, tokens_per_expert, bounds)
