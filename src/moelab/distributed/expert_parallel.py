"""Expert parallelism: each rank of an expert-parallel group holds E / P of every MoE layer's experts,
and token-slots travel to the rank that holds their expert and back with all-to-alls.

Shape legend: T tokens on this rank, D model width, I expert hidden size, E experts, El = E / P local
experts, P ranks in the expert-parallel group, S slots this rank routed (grouped by expert), R slots
this rank received for its local experts.

One MoE layer's forward on every rank of the group:

    router (local)  ->  slots grouped by global expert, i.e. by destination rank (experts are
                        owned contiguously: rank q holds experts q*El .. (q+1)*El - 1)
    counts          ->  all_to_all_single of the [P, El] slot counts: who sends me how many
    dispatch        ->  all_to_all_single of the slots' inputs [S, D] -> [R, D]
    experts         ->  regroup the received slots by local expert, grouped matmuls (dispatch.grouped_mm)
    return          ->  all_to_all_single back [R, D] -> [S, D], in the order the slots were sent
    combine         ->  weighted index_add into the tokens, as in dispatch.experts_swiglu

Autograd flows through both all-to-alls (`all_to_all`: its backward is the reverse all-to-all).
Everything else of the MoE layer (router, shared experts, losses, statistics) stays local and is
reduced over ranks by moelab.distributed.data_parallel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moelab.model.dispatch import DispatchPlan, grouped_mm
from moelab.model.moe import Experts, MoE


@dataclass
class CommMeter:
    """Optional accounting of the expert all-to-alls (benchmarks): bytes this rank sent and seconds
    spent inside the collectives, forward and backward. On CUDA the timing synchronises the device,
    so it is only for measurement runs."""

    bytes_sent: int = 0
    seconds: float = 0.0
    calls: int = 0
    by_phase: dict[str, float] = field(default_factory=dict)

    def reset(self) -> None:
        self.bytes_sent, self.seconds, self.calls = 0, 0.0, 0
        self.by_phase.clear()


def _timed_all_to_all(out, inp, out_splits, in_splits, group, meter: CommMeter | None, phase: str) -> None:
    if meter is None:
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
        return
    if inp.is_cuda:
        torch.cuda.synchronize(inp.device)
    t0 = time.perf_counter()
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
    if inp.is_cuda:
        torch.cuda.synchronize(inp.device)
    dt = time.perf_counter() - t0
    rank = dist.get_rank(group)
    own = in_splits[rank] if in_splits is not None else inp.shape[0] // dist.get_world_size(group)
    row_bytes = inp[0].numel() * inp.element_size() if inp.shape[0] else 0
    meter.bytes_sent += (inp.shape[0] - own) * row_bytes  # rows kept on this rank never leave it
    meter.seconds += dt
    meter.calls += 1
    meter.by_phase[phase] = meter.by_phase.get(phase, 0.0) + dt


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; the gradient takes the reverse trip."""

    @staticmethod
    def forward(ctx, x_ND, out_splits, in_splits, group, meter, phase):
        ctx.splits = (out_splits, in_splits)
        ctx.group, ctx.meter, ctx.phase = group, meter, phase
        out = x_ND.new_empty((sum(out_splits),) + tuple(x_ND.shape[1:]))
        _timed_all_to_all(out, x_ND.contiguous(), out_splits, in_splits, group, meter, phase)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits),) + tuple(grad_out.shape[1:]))
        # NOTE: rows that came from rank q go back to rank q: the same collective with the splits swapped.
        _timed_all_to_all(
            grad_in, grad_out.contiguous(), in_splits, out_splits, ctx.group, ctx.meter, ctx.phase + "_backward"
        )
        return grad_in, None, None, None, None, None


def all_to_all(
    x_ND: torch.Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group,
    meter: CommMeter | None = None,
    phase: str = "all_to_all",
) -> torch.Tensor:
    """Send rows in_splits[q] of x to rank q of `group`, receive out_splits[q] rows from rank q (in
    rank order); differentiable."""
    return _AllToAll.apply(x_ND, out_splits, in_splits, group, meter, phase)


class ExpertParallelExperts(nn.Module):
    """The local El of an MoE layer's E experts, with the same parameter names as `Experts`
    (gate_up_proj [El, 2I, D], down_proj [El, D, I]) so that state-dict keys do not change; a
    checkpoint stores the gathered [E, ...] tensors (moelab.distributed.checkpoint)."""

    def __init__(
        self,
        gate_up_El2ID: torch.Tensor,
        down_ElDI: torch.Tensor,
        *,
        num_experts: int,
        shard: int,
        group,
        group_size: int,
        matmul: str = "auto",
    ):
        super().__init__()
        if num_experts != gate_up_El2ID.shape[0] * group_size:
            raise ValueError(
                f"{gate_up_El2ID.shape[0]} local experts x {group_size} ranks is not {num_experts} experts"
            )
        self.num_experts = num_experts
        self.num_local = num_experts // group_size
        self.shard = shard  # position in the expert-parallel group
        self.group = group
        self.group_size = group_size
        self.meter: CommMeter | None = None  # set by benchmarks
        self.matmul = matmul  # grouped matmul implementation, as moelab.model.moe.Experts.matmul
        self.gate_up_proj = nn.Parameter(gate_up_El2ID)  # [El, 2I, D]
        self.down_proj = nn.Parameter(down_ElDI)  # [El, D, I]

    @classmethod
    def from_full(cls, full: Experts, *, shard: int, group, group_size: int) -> "ExpertParallelExperts":
        """Keep experts shard*El .. (shard+1)*El - 1 of a full `Experts` (copies, so that the full
        tensors can be freed)."""
        E = full.gate_up_proj.shape[0]
        rows = slice(shard * (E // group_size), (shard + 1) * (E // group_size))
        return cls(
            full.gate_up_proj.detach()[rows].clone(),
            full.down_proj.detach()[rows].clone(),
            num_experts=E,
            shard=shard,
            group=group,
            group_size=group_size,
            matmul=full.matmul,
        )

    def extra_repr(self) -> str:
        return f"experts {self.shard * self.num_local}..{(self.shard + 1) * self.num_local - 1} of {self.num_experts} (rank {self.shard} of {self.group_size})"

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        T, D = x_TD.shape
        P, El = self.group_size, self.num_local
        compute_dtype = x_TD.dtype
        if torch.is_autocast_enabled(x_TD.device.type):
            # NOTE: as in dispatch.experts_swiglu: grouped_mm is not covered by autocast.
            compute_dtype = torch.get_autocast_dtype(x_TD.device.type)

        # 1. Counts first: recv_PEl[p, j] = slots rank p sends to my local expert j.
        send_PEl = plan.tokens_per_expert_E.reshape(P, El)
        recv_PEl = torch.empty_like(send_PEl)
        _timed_all_to_all(recv_PEl, send_PEl.contiguous(), None, None, self.group, self.meter, "counts")
        counts = torch.stack([send_PEl.sum(1), recv_PEl.sum(1)]).tolist()  # one host sync: the split sizes
        send_splits, recv_splits = counts[0], counts[1]

        # 2. Dispatch: slots are grouped by global expert, hence by destination rank.
        x_SD = x_TD.to(compute_dtype).index_select(0, plan.token_index_S)
        x_RD = all_to_all(x_SD, recv_splits, send_splits, self.group, self.meter, "dispatch")

        # 3. Received rows arrive by source rank, then by local expert: regroup by local expert
        # (a stable sort keeps each expert's rows in source-rank order).
        R = x_RD.shape[0]
        expert_of_row = torch.arange(El, device=x_RD.device).repeat(
            P
        )  # [P*El]: local expert of each (source, expert) block
        local_expert_R = torch.repeat_interleave(expert_of_row, recv_PEl.reshape(-1), output_size=R)
        order_R = torch.sort(local_expert_R, stable=True).indices
        tokens_per_local_El = recv_PEl.sum(0)
        x_grouped_RD = x_RD.index_select(0, order_R)
        gate_up_R2I = grouped_mm(x_grouped_RD, self.gate_up_proj.to(compute_dtype), tokens_per_local_El, self.matmul)
        gate_RI, up_RI = gate_up_R2I.chunk(2, dim=-1)
        y_grouped_RD = grouped_mm(
            F.silu(gate_RI) * up_RI, self.down_proj.to(compute_dtype), tokens_per_local_El, self.matmul
        )
        if R == 0:
            # NOTE: no slot reached this rank's experts. Keep the weights in the graph so that their
            # (zero) gradient exists on every rank: under FSDP the replicas reduce-scatter it, a
            # collective that every rank must join (the padded matmul skips empty inputs).
            y_grouped_RD = y_grouped_RD + 0.0 * (self.gate_up_proj.sum() + self.down_proj.sum()).to(y_grouped_RD.dtype)
        undo_R = torch.empty_like(order_R)
        undo_R[order_R] = torch.arange(R, device=order_R.device)
        y_RD = y_grouped_RD.index_select(0, undo_R)  # back to the order the rows arrived in

        # 4. Return trip, then combine. NOTE: the routing weight scales the expert output here on the
        # sending rank (experts_swiglu scales the hidden activation: the same linear map), so the
        # router's gradient never crosses ranks and the weights need no all-to-all of their own.
        y_SD = all_to_all(y_RD, send_splits, recv_splits, self.group, self.meter, "combine")
        acc_dtype = torch.promote_types(y_SD.dtype, torch.float32)
        weighted_SD = y_SD.to(acc_dtype) * plan.weight_S.to(acc_dtype)[:, None]
        out_TD = torch.zeros(T, D, dtype=acc_dtype, device=x_TD.device)
        out_TD.index_add_(0, plan.token_index_S, weighted_SD)
        return out_TD.to(x_TD.dtype)


def expert_parallel_modules(model: nn.Module) -> list[tuple[str, ExpertParallelExperts]]:
    """(qualified name, module) of every expert-parallel experts module of a model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)]


def expert_parallel_param_names(model: nn.Module) -> list[str]:
    """Names of the parameters that hold only this rank's experts (sharded along dim 0)."""
    return [f"{name}.{p}" for name, m in expert_parallel_modules(model) for p in ("gate_up_proj", "down_proj")]


def shard_experts(model: nn.Module, *, shard: int, group, group_size: int) -> None:
    """Replace every MoE layer's `experts` with its expert-parallel share (in place). Every rank
    builds the same full model first (same seed), so the shards are exactly the single-process
    initialisation."""
    for moe in [m for m in model.modules() if isinstance(m, MoE)]:
        moe.experts = ExpertParallelExperts.from_full(moe.experts, shard=shard, group=group, group_size=group_size)


def gather_rows(local: torch.Tensor, group, group_size: int, dst_global: int | None) -> torch.Tensor | None:
    """Concatenate the [El, ...] shards of an expert-parallel group along dim 0 (shard order).
    dst_global None: every rank receives the [E, ...] tensor (all_gather); otherwise only that
    global rank does (gather) and the others get None. Collective over `group`."""
    local = local.detach().contiguous()
    if dst_global is None:
        parts = [torch.empty_like(local) for _ in range(group_size)]
        dist.all_gather(parts, local, group=group)
        return torch.cat(parts, 0)
    receiving = dist.get_rank() == dst_global
    parts = [torch.empty_like(local) for _ in range(group_size)] if receiving else None
    dist.gather(local, parts, dst=dst_global, group=group)
    return torch.cat(parts, 0) if receiving else None
