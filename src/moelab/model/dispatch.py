"""Token dispatch for MoE layers: group token-slots by expert, run grouped matmuls, combine.

Shape legend: T tokens, k experts per token, E experts, S token-slots after routing (T*k when
nothing is dropped), D model width, I expert hidden size, C expert capacity.

The hot path has no Python loop over experts: slots are sorted by expert once, every projection is
one grouped matmul over the sorted slots (`torch._grouped_mm`, or a padded `bmm` where that kernel
is unavailable), and outputs return to their tokens with one weighted `index_add_`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelab.model.chunked_experts import chunked_experts_swiglu
from moelab.model.grouped_mm_op import grouped_mm_op
from moelab.model.mlp import swiglu_product


@dataclass
class DispatchPlan:
    """Which token each expert slot processes, grouped by expert."""

    token_index_S: torch.Tensor  # [S] int64, token of each slot, slots of expert 0 first
    weight_S: torch.Tensor  # [S] fp32, routing weight of each slot
    tokens_per_expert_E: torch.Tensor  # [E] int64, slots kept per expert (sums to S)
    dropped_slots: torch.Tensor  # [] int64, slots routed but dropped by capacity (or tokens with no expert)


def count_per_expert(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: how many entries of `expert_index` name each expert."""
    if torch.compiler.is_compiling():
        # NOTE: bincount's output length depends on the data, which breaks a compiled graph;
        # scatter_add into E zeros has a fixed shape and gives the same counts.
        counts_E = torch.zeros(num_experts, dtype=torch.int64, device=expert_index.device)
        return counts_E.scatter_add_(0, expert_index, torch.ones_like(expert_index))
    return torch.bincount(expert_index, minlength=num_experts)


def plan_token_choice(
    expert_index_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
) -> DispatchPlan:
    """Group the (token, choice) slots of top-k routing by expert.

    With a capacity, each expert keeps at most `capacity` slots, in GShard/Switch priority order:
    every token's first choice before any second choice, and within a choice rank, earlier tokens
    first. Dropped slots contribute nothing (the token passes through the residual connection).
    """
    T, k = expert_index_TK.shape
    # NOTE: rank-major order (all first choices, then all second choices) so that a stable sort by
    # expert gives exactly the GShard priority order within each expert.
    expert_of_slot = expert_index_TK.t().reshape(-1)  # [k*T], slot s = rank * T + token
    # NOTE: sort(...).indices, not argsort(stable=True): the same order, far faster on CPU
    # (measured: docs/architecture.md, Measured choices).
    order = torch.sort(expert_of_slot, stable=True).indices  # [k*T] slots grouped by expert
    tokens_per_expert = count_per_expert(expert_of_slot, num_experts)  # [E]
    dropped = tokens_per_expert.new_zeros(())
    if capacity is not None:
        group_start = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert  # [E]
        position_in_expert = torch.arange(order.numel(), device=order.device) - group_start[expert_of_slot[order]]
        keep = position_in_expert < capacity
        kept = torch.clamp(tokens_per_expert, max=capacity)
        dropped = tokens_per_expert.sum() - kept.sum()
        order = order[keep]
        tokens_per_expert = kept
    weight_slots = weight_TK.t().reshape(-1)
    return DispatchPlan(
        token_index_S=order % T,
        weight_S=weight_slots[order],
        tokens_per_expert_E=tokens_per_expert,
        dropped_slots=dropped,
    )


def plan_expert_choice(token_index_EC: torch.Tensor, weight_EC: torch.Tensor, num_tokens: int) -> DispatchPlan:
    """Expert choice: expert e processes tokens token_index_EC[e]; slots are already grouped."""
    E, C = token_index_EC.shape
    covered = torch.zeros(num_tokens, dtype=torch.bool, device=token_index_EC.device)
    covered[token_index_EC.reshape(-1)] = True
    return DispatchPlan(
        token_index_S=token_index_EC.reshape(-1),
        weight_S=weight_EC.reshape(-1),
        tokens_per_expert_E=torch.full((E,), C, dtype=torch.int64, device=token_index_EC.device),
        dropped_slots=(~covered).sum(),  # tokens no expert chose
    )


def grouped_mm_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` has a kernel for these operands.

    CPU kernels exist for float32 and bfloat16, the CUDA kernel for bfloat16 on SM80 or newer; both
    (the backward too) need row strides that are multiples of 16 bytes, i.e. K and N aligned.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    N, K = weight.shape[-2], weight.shape[-1]
    if (N * x.element_size()) % 16 or (K * x.element_size()) % 16:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(x.device)
        return x.dtype == torch.bfloat16 and major >= 8
    return False


def grouped_mm(
    x_SK: torch.Tensor, weight_ENK: torch.Tensor, tokens_per_expert_E: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    """out[s] = x[s] @ weight[e(s)].T for slots grouped by expert; returns [S, N].

    impl: "auto" (grouped_mm where it has a kernel, else padded bmm), "grouped_mm" or "padded";
    "chunked" (a dispatch choice of experts_swiglu, which callers such as expert parallelism pass
    through from Experts.matmul) means "auto" here.
    """
    if impl in ("auto", "chunked"):
        impl = "grouped_mm" if grouped_mm_available(x_SK, weight_ENK) else "padded"
    if impl == "grouped_mm":
        offsets_E = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
        if x_SK.dtype != torch.bfloat16 and torch.compiler.is_compiling():
            # NOTE: aten._grouped_mm's shape rule refuses fp32 under tracing (moelab.model.grouped_mm_op)
            return grouped_mm_op(x_SK, weight_ENK, offsets_E)
        return torch._grouped_mm(x_SK, weight_ENK.transpose(-2, -1), offs=offsets_E)
    if impl == "padded":
        return _padded_grouped_mm(x_SK, weight_ENK, tokens_per_expert_E)
    raise ValueError(f"unknown grouped matmul implementation {impl!r}; use auto, grouped_mm or padded")


def _padded_grouped_mm(x_SK: torch.Tensor, weight_ENK: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Fallback without a grouped kernel: scatter slots into a zero-padded [E, C_max, K] batch, one
    bmm, gather back. Costs memory proportional to the most loaded expert."""
    E, N, K = weight_ENK.shape
    S = x_SK.shape[0]
    if S == 0:
        return x_SK.new_zeros(0, N)
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=x_SK.device), tokens_per_expert_E, output_size=S)
    group_start = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    row_in_group = torch.arange(S, device=x_SK.device) - group_start[expert_of_row]
    capacity = int(tokens_per_expert_E.max())
    padded_ECK = x_SK.new_zeros(E, capacity, K)
    padded_ECK = padded_ECK.index_put((expert_of_row, row_in_group), x_SK)
    out_ECN = torch.bmm(padded_ECK, weight_ENK.transpose(-2, -1))
    return out_ECN[expert_of_row, row_in_group]


def chunked_available(x_TD: torch.Tensor, gate_up_E2ID: torch.Tensor, down_EDI: torch.Tensor) -> bool:
    """Whether "auto" takes the chunked path (moelab.model.chunked_experts): eager CPU code where
    the grouped kernel runs both projections. On CUDA its host-side chunk bounds would synchronise
    every layer, and under torch.compile they would break the graph; those keep the one-shot path."""
    return (
        x_TD.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and grouped_mm_available(x_TD, gate_up_E2ID)
        and grouped_mm_available(x_TD, down_EDI)
    )


def experts_swiglu(
    x_TD: torch.Tensor,
    plan: DispatchPlan,
    gate_up_E2ID: torch.Tensor,
    down_EDI: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """Run every slot through its expert's SwiGLU and sum the weighted outputs per token: [T, D].

    impl: "auto" (chunk by chunk on the CPU, else one grouped matmul per projection over all slots,
    or padded bmm where no grouped kernel runs), "chunked", "grouped_mm" (all slots at once, the
    reference for the chunked path) or "padded". The chunked path is differentiable once (no
    `create_graph` double backward); "grouped_mm" is where one is needed."""
    T, D = x_TD.shape
    compute_dtype = x_TD.dtype
    if torch.is_autocast_enabled(x_TD.device.type):
        # NOTE: grouped_mm is not covered by autocast; cast operands ourselves so that bf16 autocast
        # on CUDA reaches the bf16 grouped kernel instead of silently running in fp32.
        compute_dtype = torch.get_autocast_dtype(x_TD.device.type)
    gate_up = gate_up_E2ID.to(compute_dtype)
    down = down_EDI.to(compute_dtype)
    x_compute_TD = x_TD.to(compute_dtype)
    chunked = impl == "auto" and chunked_available(x_compute_TD, gate_up, down)
    if impl == "chunked":
        if not chunked_available(x_compute_TD, gate_up, down):
            raise ValueError(
                f"the chunked experts path needs eager CPU code with fp32 or bf16 operands whose rows are "
                f"multiples of 16 bytes (got {x_compute_TD.dtype} on {x_TD.device.type}, D={D}, "
                f"I={down.shape[-1]}); use matmul='auto'"
            )
        chunked = True
    if chunked:
        out_TD = chunked_experts_swiglu(
            x_compute_TD,
            plan.token_index_S,
            plan.weight_S.to(compute_dtype),
            plan.tokens_per_expert_E,
            gate_up,
            down,
        )
        return out_TD.to(x_TD.dtype)
    x_SD = x_compute_TD.index_select(0, plan.token_index_S)  # [S, D], grouped by expert
    gate_up_S2I = grouped_mm(x_SD, gate_up, plan.tokens_per_expert_E, impl)  # [S, 2I]
    gate_SI, up_SI = gate_up_S2I.chunk(2, dim=-1)
    # NOTE: the routing weight scales the activation before the down projection (a linear map),
    # which equals scaling the output but touches I instead of D values per slot.
    hidden_SI = swiglu_product(gate_SI, up_SI, plan.weight_S.to(compute_dtype)[:, None])
    out_SD = grouped_mm(hidden_SI, down, plan.tokens_per_expert_E, impl)  # [S, D]
    # Accumulate in at least fp32: several experts add into one token.
    acc_dtype = torch.promote_types(out_SD.dtype, torch.float32)
    out_TD = torch.zeros(T, D, dtype=acc_dtype, device=x_TD.device)
    out_TD.index_add_(0, plan.token_index_S, out_SD.to(acc_dtype))
    return out_TD.to(x_TD.dtype)
