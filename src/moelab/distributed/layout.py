"""Which rank does what: the data- and expert-parallel layout, and the layouts that cannot work.

W processes (the world, launched by torchrun) all read different data: every rank is a data-parallel
rank. Expert parallelism splits the E routed experts of each MoE layer over groups of P consecutive
ranks (an expert-parallel group; consecutive so that on a multi-GPU node its all-to-alls stay inside
the node). The W / P groups hold the same experts, so each expert has W / P replicas, one per group;
the ranks holding the same experts form an expert-replica group.

    W = 4, P = 2:   expert-parallel groups  [0, 1] [2, 3]      (rank r holds experts of shard r % P)
                    expert-replica groups   [0, 2] [1, 3]      (expert gradients are summed here)

Everything here is plain arithmetic on the config and the world size, checked before any process
group exists, so a bad launch fails on every rank at once with the same message.
"""

from __future__ import annotations

from dataclasses import dataclass

from moelab.config import RunConfig
from moelab.errors import MoelabError


@dataclass(frozen=True)
class Layout:
    world: int  # W, processes
    rank: int  # this process, 0..W-1
    local_rank: int  # this process on its node (selects the GPU)
    expert: int  # P, expert-parallel group size (1: every rank holds every expert)
    num_experts: int  # E (0 for a dense model)

    @property
    def expert_rank(self) -> int:
        """Position in the expert-parallel group: which shard of the experts this rank holds."""
        return self.rank % self.expert

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.expert

    @property
    def expert_groups(self) -> list[list[int]]:
        """Expert-parallel groups: P consecutive ranks that together hold all E experts."""
        return [list(range(g * self.expert, (g + 1) * self.expert)) for g in range(self.world // self.expert)]

    @property
    def replica_groups(self) -> list[list[int]]:
        """Ranks that hold the same experts (one per expert-parallel group)."""
        return [list(range(j, self.world, self.expert)) for j in range(self.expert)]

    @property
    def expert_slice(self) -> slice:
        """This rank's experts, as a slice of the stacked [E, ...] expert tensors."""
        n = self.local_experts
        return slice(self.expert_rank * n, (self.expert_rank + 1) * n)


def check_layout(cfg: RunConfig, world: int, device_type: str) -> None:
    """Refuse layouts that cannot work, with the setting to change. Called on every rank before
    any process group or data work, so every rank exits with the same error."""
    P = cfg.parallel.expert
    moe = cfg.model.moe
    if P > 1 and moe is None:
        raise MoelabError(
            f"parallel.expert = {P} needs an MoE model (model.moe); a dense model has no experts to split"
        )
    if moe is not None and moe.num_experts % P:
        raise MoelabError(
            f"parallel.expert = {P} does not divide model.moe.num_experts = {moe.num_experts}: each rank must hold the same number of experts"
        )
    if world % P:
        how = (
            "launch with torchrun --nproc-per-node N (N a multiple of it)" if world == 1 else "launch a multiple of it"
        )
        raise MoelabError(f"the world size {world} is not a multiple of parallel.expert = {P}: {how}")
    B = cfg.train.batch_size
    if B % world:
        raise MoelabError(
            f"train.batch_size = {B} is the global batch (sequences per micro-batch over all {world} processes) "
            f"and must be a multiple of the world size {world}; each process reads batch_size / world sequences"
        )
    backend = cfg.parallel.backend
    if backend == "nccl" and device_type != "cuda":
        raise MoelabError(
            f"parallel.backend = 'nccl' needs CUDA devices; this run uses {device_type}: use 'gloo' or 'auto'"
        )


def make_layout(cfg: RunConfig, world: int, rank: int, local_rank: int) -> Layout:
    moe = cfg.model.moe
    return Layout(
        world=world,
        rank=rank,
        local_rank=local_rank,
        expert=cfg.parallel.expert,
        num_experts=moe.num_experts if moe else 0,
    )
