"""What the trainer asks of torch.distributed, in one object per process (`Distributed`).

The trainer keeps its single-process loop and calls this object at a few marked places: set-up
(process groups, expert sharding, DDP), the backward pass (expert gradients, the global gradient
norm, the mean loss), router statistics and bias balancing, evaluation, and checkpoints. Nothing is
kept at module level: the process groups live on the object and are passed explicitly.
"""

from __future__ import annotations

import atexit
import math
import os
import random
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moelab.checkpoint import is_sharded
from moelab.config import RunConfig
from moelab.distributed import checkpoint as dcp
from moelab.distributed import data_parallel as dp
from moelab.distributed import fsdp, sharded
from moelab.distributed.expert_parallel import gather_rows, shard_experts
from moelab.distributed.layout import Layout, check_layout, make_layout
from moelab.errors import CheckpointError, MoelabError
from moelab.model.health import LayerHealth, router_health


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise MoelabError(f"{name} = {os.environ[name]!r} is not an integer (torchrun sets it)") from None


def world_size() -> int:
    """Processes in this run: the initialised process group's, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def wanted(cfg: RunConfig) -> bool:
    """Whether a run needs torch.distributed: several processes, or expert parallelism asked for
    (a single process then fails the layout check, saying how to launch)."""
    return world_size() > 1 or cfg.parallel.expert > 1


def _device_type(cfg: RunConfig) -> str:
    name = cfg.train.device
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class Distributed:
    """One process of a data- and expert-parallel run (see moelab.distributed.layout)."""

    def __init__(
        self,
        layout: Layout,
        device: torch.device,
        data_parallel: str = "ddp",
        bf16: bool = False,
        checkpoint_format: str = "single",
    ):
        self.layout = layout
        # "sharded": FSDP ranks write their own shards (moelab.distributed.sharded)
        self.checkpoint_format = checkpoint_format
        self.device = device
        self.fsdp = data_parallel == "fsdp"  # parameters sharded with FSDP2 (moelab.distributed.fsdp), else DDP
        self.bf16 = bf16  # (FSDP on CUDA) bf16 compute with fp32 gradient reduction
        self.meshes: fsdp.Meshes | None = None  # (FSDP) set by `wrap`
        self.world_group = dist.group.WORLD
        # Every rank creates every subgroup, in the same order (new_group is collective).
        self.expert_group = None  # this rank's expert-parallel group (P > 1)
        self.replica_group = None  # the ranks holding the same experts (W / P > 1)
        if layout.expert > 1:
            for ranks in layout.expert_groups:
                group = dist.new_group(ranks)
                if layout.rank in ranks:
                    self.expert_group = group
            if layout.world > layout.expert:
                for ranks in layout.replica_groups:
                    group = dist.new_group(ranks)
                    if layout.rank in ranks:
                        self.replica_group = group

    @classmethod
    def from_env(cls, cfg: RunConfig, timeout_s: float = 1800.0) -> "Distributed":
        """Check the layout, then join (or create) the process group torchrun set up."""
        world = world_size()
        device_type = _device_type(cfg)
        check_layout(cfg, world, device_type)  # before any collective, so every rank fails alike
        if device_type == "cuda" and not torch.cuda.is_available():
            raise MoelabError("train.device = 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
        if not dist.is_initialized():
            backend = cfg.parallel.backend
            if backend == "auto":
                backend = "nccl" if device_type == "cuda" else "gloo"
            if device_type == "cuda":
                torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
            # NOTE: a run has no end-of-life hook (the command line just returns); tear the group
            # down at exit, as NCCL warns about communicators left open otherwise.
            atexit.register(_destroy_if_initialized)
        rank = dist.get_rank()
        local_rank = _env_int("LOCAL_RANK", rank)
        if device_type == "cuda":
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        bf16 = cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and device.type == "cuda")
        return cls(
            make_layout(cfg, world, rank, local_rank),
            device,
            cfg.parallel.data_parallel,
            bf16,
            cfg.train.checkpoint_format,
        )

    # -- who am I ------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def is_main(self) -> bool:
        return self.layout.rank == 0

    @property
    def full_model_here(self) -> bool:
        """Whether this rank holds every parameter (no expert parallelism, no FSDP): it can generate alone."""
        return self.layout.expert == 1 and not self.fsdp

    def barrier(self) -> None:
        dist.barrier(group=self.world_group)

    def main_first_begin(self) -> None:
        """Rank 0 runs the code up to `main_first_end` first (it fills the token cache and creates
        the run directory), then the others: no two processes write the same files at once."""
        self.barrier()  # everyone has finished what came before (e.g. checking the output directory)
        if not self.is_main:
            self.barrier()  # wait for rank 0's main_first_end

    def main_first_end(self) -> None:
        if self.is_main:
            self.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of a small picklable object, on every rank."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.world_group)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (decisions all ranks must take together)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.world_group)
        return bool(t.item() > 0)

    def summary(self, cfg: RunConfig) -> dict[str, Any]:
        """What summary.json records about the processes."""
        parallel = {"world": self.world, "expert": cfg.parallel.expert}
        if self.fsdp:
            parallel["data_parallel"] = "fsdp"
        return {"parallel": parallel}

    def describe(self) -> str:
        L = self.layout
        ep = (
            f"expert parallel over {L.expert} ranks ({L.local_experts} of {L.num_experts} experts each)"
            if L.expert > 1
            else "experts replicated"
        )
        kind = "FSDP (parameters, gradients and optimizer state sharded)" if self.fsdp else "data parallel"
        if self.fsdp and L.expert > 1:
            ep += f", each expert's copies FSDP-sharded over {L.world // L.expert} replicas"
        return f"distributed: {L.world} processes ({dist.get_backend()}), {kind} over all, {ep}"

    # -- the model -----------------------------------------------------------------------------

    def shard(self, model: nn.Module) -> None:
        """Keep this rank's experts (before the model moves to its device) and make the balancing
        loss global. Every rank must have built the same model (same seed)."""
        if self.layout.expert > 1:
            shard_experts(model, shard=self.layout.expert_rank, group=self.expert_group, group_size=self.layout.expert)
        dp.install_global_balancing(model, self.world_group)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call for training forwards: DDP over the replicated parameters, or the
        model itself sharded in place by FSDP (then the optimizer must be built after this)."""
        if self.fsdp:
            self.meshes = fsdp.make_meshes(self.device.type, self.world, self.layout.expert)
            return fsdp.shard_model(model, self.meshes, self.bf16)
        return dp.wrap_ddp(model, self.device, self.world_group)

    def no_sync(self, train_model: nn.Module, last_micro_batch: bool):
        """Gradient accumulation: DDP (and FSDP) reduce once, after the last micro-batch."""
        if self.fsdp:
            return fsdp.gradient_sync(train_model, last_micro_batch)
        return nullcontext() if last_micro_batch else train_model.no_sync()

    def finish_backward(self, model: nn.Module) -> None:
        if self.fsdp:  # FSDP reduced the gradients (experts over their replicas) in the backward
            fsdp.scale_expert_grads(model, self.layout.expert)
            return
        dp.sync_expert_grads(model, self.world, self.replica_group, self.world // self.layout.expert)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        if self.fsdp:
            return fsdp.clip_grad_norm(model, max_norm, self.expert_group)
        return dp.clip_grad_norm(model, max_norm, self.expert_group)

    def mean(self, *values: float) -> list[float]:
        return dp.all_reduce_mean(list(values), self.world, self.device, self.world_group)

    def sum(self, *values: float) -> list[float]:
        return [v * self.world for v in self.mean(*values)]

    def update_router_biases(self, model: nn.Module) -> None:
        dp.reduce_balancing_load(model, self.world_group)
        model.update_router_biases()

    def router_health(self, model: nn.Module, with_similarity: bool) -> dict[int, LayerHealth]:
        """Each MoE layer's router-health record for the global batch (statistics summed over ranks,
        experts gathered): computed on rank 0 and broadcast, so every rank's monitor decides alike."""
        dp.reduce_router_stats(model, self.world_group)
        stats = model.router_stats()
        health: dict[int, LayerHealth] | None = None
        if self.fsdp:  # every rank takes part in gathering each layer's experts
            health = {}
            for layer in stats:
                view = fsdp.gathered_layer(model, layer, self.rank, self.expert_group, self.layout.expert)
                if view is not None:
                    health.update(router_health(view, {layer: stats[layer]}, with_similarity))
        elif self.layout.expert == 1:
            if self.is_main:
                health = router_health(model, stats, with_similarity)
        elif self.layout.rank < self.layout.expert:  # rank 0's expert-parallel group gathers
            health = {}
            for layer in stats:
                view = self._gathered_layer(model, layer)
                if view is not None:
                    health.update(router_health(view, {layer: stats[layer]}, with_similarity))
        return self.broadcast(health)

    def _gathered_layer(self, model: nn.Module, layer: int) -> SimpleNamespace | None:
        """On rank 0, a stand-in for `model` with layer `layer`'s full experts (and gradients), in
        the shape moelab.model.health.router_health reads; one layer at a time bounds the memory."""
        moe = model.blocks[layer].ffn
        experts = moe.experts
        full = {}
        for attr in ("gate_up_proj", "down_proj"):
            p = getattr(experts, attr)
            t = gather_rows(p, self.expert_group, self.layout.expert, dst_global=0)
            g = gather_rows(p.grad, self.expert_group, self.layout.expert, dst_global=0) if p.grad is not None else None
            if t is not None:
                t.grad = g
            full[attr] = t
        if not self.is_main:
            return None
        blocks = [SimpleNamespace(is_moe=False, ffn=None) for _ in model.blocks]
        blocks[layer] = SimpleNamespace(is_moe=True, ffn=SimpleNamespace(cfg=moe.cfg, experts=SimpleNamespace(**full)))
        return SimpleNamespace(blocks=blocks)

    # -- evaluation ----------------------------------------------------------------------------

    def eval_rows(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """This rank's rows of an evaluation batch. Every rank must run the same number of
        forwards (the expert all-to-alls are collective), so a rank left without rows evaluates
        the first row again and does not count it (the third value)."""
        per = math.ceil(x.shape[0] / self.world)
        start = min(self.rank * per, x.shape[0])
        stop = min(start + per, x.shape[0])
        if stop == start:
            return x[:1], y[:1], False
        return x[start:stop], y[start:stop], True

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(
        self,
        run_dir: Path,
        step: int,
        model: nn.Module,
        optimizer,
        trainer_state: dict[str, Any],
        keep: int,
        protected: frozenset[int],
    ) -> None:
        if self.fsdp and self.checkpoint_format == "sharded":
            sharded.save_sharded_checkpoint(
                run_dir,
                step,
                model,
                optimizer,
                trainer_state,
                keep,
                protected,
                self.layout,
                self.world_group,
                self._expert_mesh,
            )
            return
        if self.fsdp:
            full = fsdp.full_state(model, optimizer, self.rank, self.expert_group, self.layout.expert)
            dcp.save_gathered_checkpoint(
                run_dir, step, model, trainer_state, keep, protected, self.layout, self.world_group, full
            )
            return
        dcp.save_distributed_checkpoint(
            run_dir,
            step,
            model,
            optimizer,
            trainer_state,
            keep,
            protected,
            self.layout,
            self.expert_group,
            self.world_group,
        )

    def load_checkpoint(self, path: Path, model: nn.Module) -> dict[str, Any]:
        if is_sharded(path):
            if self.fsdp:
                return sharded.load_sharded_into_fsdp(path, model, self._expert_mesh)
            raise CheckpointError(
                f"checkpoint {path} is in the sharded format: resume it with parallel.data_parallel = 'fsdp' "
                f"or in one process, or write the single format with: moelab consolidate {path} OUT_RUN"
            )
        if self.fsdp:
            return fsdp.load_checkpoint(path, model, self.layout)
        return dcp.load_sharded_checkpoint(path, model, self.layout)

    def local_trainer_state(
        self, state: dict[str, Any], optimizer, model: nn.Module, batch_per_rank: int, seed: int
    ) -> dict[str, Any]:
        if self.fsdp and "sharded_path" in state:
            state = sharded.restore_optimizer(state, optimizer, model, self._expert_mesh)
            return dcp.local_trainer_state(state, optimizer, model, batch_per_rank, self.layout, seed, shard=False)
        if self.fsdp:
            state = {
                **state,
                "optimizer": fsdp.shard_optimizer_state(state["optimizer"], optimizer, model, self.layout),
            }
            return dcp.local_trainer_state(state, optimizer, model, batch_per_rank, self.layout, seed, shard=False)
        return dcp.local_trainer_state(state, optimizer, model, batch_per_rank, self.layout, seed)

    @property
    def _expert_mesh(self):
        """(FSDP with expert parallelism) the (ep, replica) mesh of the expert rows, else None."""
        return None if self.meshes is None else self.meshes.experts

    def seed_rank(self, seed: int) -> None:
        """After the (identical) model initialisation, give ranks other than 0 their own random
        stream (router jitter); rank 0 keeps the single-process stream."""
        if self.rank > 0:
            s = dcp.rank_seed(seed, 0, self.rank)
            torch.manual_seed(s)
            random.seed(s)


def _destroy_if_initialized() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
