"""Checkpoints of distributed runs in the single-process format, so any world size can resume them.

A checkpoint written by W processes is the checkpoint one process would have written:

    model.safetensors   full [E, ...] expert tensors, gathered from the expert-parallel ranks
    trainer.pt          optimizer state with full expert moments (gathered the same way); "loader" is
                        the global position (world 1, the global batch); "torch_rng" / "python_rng"
                        are rank 0's. Two additions that a single process ignores:
                        "ranks": every rank's own loader state and RNG states, in rank order;
                        "parallel": {"world": W, "expert": P}

Rank 0 writes it (the others take part in the gathers), and every rank reads it back: expert tensors
and their optimizer moments are sliced to the rank's experts, the loader continues from the same
global position at the new world size, and each rank's RNG continues where it was (same world
size) or starts from a seed of (train.seed, step, rank) (new ranks).

NOTE: gathering to one file suits models whose experts fit one host's memory a layer at a time;
beyond that, FSDP runs write sharded checkpoints (train.checkpoint_format = "sharded",
moelab.distributed.sharded).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from moelab.checkpoint import (
    MODEL_FILE,
    load_trainer_state,
    model_state,
    save_checkpoint,
    verify_checkpoint,
)
from moelab.distributed.expert_parallel import (
    expert_parallel_modules,
    expert_parallel_param_names,
    gather_rows,
)
from moelab.distributed.layout import Layout
from moelab.errors import CheckpointError, MoelabError

RANK_KEYS = ("loader", "torch_rng", "python_rng", "cuda_rng")


# ---------------------------------------------------------------------------------------------
# Saving: gather to rank 0


def _sharded_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [
        (f"{name}.{attr}", getattr(m, attr))
        for name, m in expert_parallel_modules(model)
        for attr in ("gate_up_proj", "down_proj")
    ]


def full_model_state(model: nn.Module, layout: Layout, expert_group) -> dict[str, torch.Tensor] | None:
    """The weights one process would save (experts gathered), on global rank 0; None elsewhere.
    Collective over rank 0's expert-parallel group (the other groups hold copies)."""
    sharded = _sharded_params(model)
    full: dict[str, torch.Tensor] = {}
    if sharded and layout.rank < layout.expert:
        for name, p in sharded:  # one tensor at a time: rank 0 holds the full model only on the CPU
            t = gather_rows(p, expert_group, layout.expert, dst_global=0)
            if t is not None:
                full[name] = t.cpu()
    if layout.rank != 0:
        return None
    state = model_state(model)
    state.update(full)
    return state


def _param_indices(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(parameter) -> its index in optimizer.state_dict() (params numbered in group order)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {id(p): i for i, p in enumerate(params)}


def full_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, layout: Layout, expert_group
) -> dict[str, Any] | None:
    """optimizer.state_dict() with the expert moments gathered to [E, ...], on global rank 0."""
    state = optimizer.state_dict()
    sharded = _sharded_params(model)
    if not sharded:
        return state if layout.rank == 0 else None
    index = _param_indices(optimizer)
    if layout.rank < layout.expert:
        packed = dict(state["state"])
        for _, p in sharded:
            i = index[id(p)]
            entry = packed.get(i)
            if entry is None:  # no step taken yet: the same on every rank
                continue
            full_entry = {}
            for key, value in entry.items():
                # moments have the parameter's shape; scalars such as "step" are the same everywhere
                if torch.is_tensor(value) and value.dim() > 0 and value.shape == p.shape:
                    value = gather_rows(value, expert_group, layout.expert, dst_global=0)
                full_entry[key] = value
            packed[i] = full_entry  # NOTE: a new dict: the optimizer's own state must stay local
        state = {**state, "state": packed}
    return state if layout.rank == 0 else None


def global_loader_state(rank_state: dict[str, int]) -> dict[str, int]:
    """A rank's loader state as one process reading the global batch would have it: ranks advance
    in lockstep, so `index` windows of each rank's order are index * world of the global order."""
    world = int(rank_state.get("world", 1))
    return {
        **rank_state,
        "index": int(rank_state["index"]) * world,
        "batch_size": int(rank_state["batch_size"]) * world,
        "rank": 0,
        "world": 1,
    }


def save_distributed_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
    protected: frozenset[int],
    layout: Layout,
    expert_group,
    world_group,
) -> None:
    """Every rank calls this; rank 0 writes the checkpoint; all return once it is complete."""
    weights = full_model_state(model, layout, expert_group)
    optim = full_optimizer_state(optimizer, model, layout, expert_group)
    full = (weights, optim) if layout.rank == 0 else None
    save_gathered_checkpoint(run_dir, step, model, trainer_state, keep, protected, layout, world_group, full)


def save_gathered_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    trainer_state: dict[str, Any],
    keep: int,
    protected: frozenset[int],
    layout: Layout,
    world_group,
    full: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
) -> None:
    """Write the checkpoint of the full (weights, optimizer state) gathered to rank 0 (`full`, None on
    the other ranks), with every rank's loader and RNG state. Every rank calls it."""
    mine = {k: trainer_state[k] for k in RANK_KEYS if k in trainer_state}
    ranks: list[dict[str, Any]] | None = [None] * layout.world if layout.rank == 0 else None  # type: ignore[list-item]
    dist.gather_object(mine, ranks, dst=0, group=world_group)
    failed: list[str | None] = [None]
    try:
        if layout.rank == 0:
            assert full is not None
            weights, optim = full
            state = {
                **trainer_state,
                "optimizer": optim,
                "loader": global_loader_state(trainer_state["loader"]),
                "ranks": ranks,
                "parallel": {"world": layout.world, "expert": layout.expert},
            }
            try:
                save_checkpoint(run_dir, step, model, state, keep, protected, weights=weights)
            except Exception as exc:
                failed = [f"{type(exc).__name__}: {exc}"]
                raise
    finally:
        # NOTE: nobody goes on (to read the checkpoint list, or roll back to it) before the
        # checkpoint is in place, and every rank learns whether rank 0 wrote it (the broadcast is
        # the barrier): a failed write stops every rank with its reason, launched by torchrun or not.
        dist.broadcast_object_list(failed, src=0, group=world_group)
    if failed[0] is not None:
        raise CheckpointError(f"checkpoint {step} could not be written on rank 0: {failed[0]}")


# ---------------------------------------------------------------------------------------------
# Loading: every rank reads and keeps its share


def load_sharded_checkpoint(path: Path, model: nn.Module, layout: Layout) -> dict[str, Any]:
    """Verify a checkpoint, load this rank's share of its weights into `model` (expert tensors
    sliced to the local experts) and return the full trainer state (to `local_trainer_state`)."""
    path = Path(path)
    verify_checkpoint(path)
    file = path / MODEL_FILE
    sharded = set(expert_parallel_param_names(model))
    expected = {name: tuple(t.shape) for name, t in model_state(model).items()}
    rows = layout.expert_slice
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or unexpected:
                raise CheckpointError(
                    f"{file} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
            for name in sorted(keys):
                want = expected[name]
                if name in sharded:
                    want = (want[0] * layout.expert,) + want[1:]
                part = f.get_slice(name)
                shape = tuple(part.get_shape())
                if shape != want:
                    raise CheckpointError(f"{file}: {name} has shape {shape}, the model expects {want}")
                # read only this rank's experts from the file
                state[name] = part[rows] if name in sharded else f.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from None
    model.load_state_dict(state, strict=False)
    return load_trainer_state(path, lambda: None)  # weights loaded above


def shard_optimizer_state(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module, layout: Layout
) -> dict[str, Any]:
    """Slice the expert moments of a full optimizer state to this rank's experts."""
    sharded = _sharded_params(model)
    if not sharded or not state.get("state"):
        return state
    index = _param_indices(optimizer)
    packed = dict(state["state"])
    rows = layout.expert_slice
    for name, p in sharded:
        i = index[id(p)]
        entry = packed.get(i)
        if entry is None:
            continue
        local = {}
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0:
                full_shape = (p.shape[0] * layout.expert,) + tuple(p.shape[1:])
                if tuple(value.shape) != full_shape:
                    raise CheckpointError(
                        f"the optimizer state of {name} ({key}) has shape {tuple(value.shape)}, expected {full_shape}"
                    )
                value = value[rows].clone()
            local[key] = value
        packed[i] = local
    return {**state, "state": packed}


def rank_seed(seed: int, step: int, rank: int) -> int:
    """A seed for rank `rank` of a run at `step`: differs between ranks, the same on every launch."""
    digest = hashlib.sha256(f"moelab-rank-seed:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rank_loader_state(state: dict[str, Any], batch_per_rank: int, layout: Layout) -> dict[str, int]:
    """This rank's loader state: its own (same world size) or the global position of the saved
    state mapped onto this world size."""
    ranks = state.get("ranks")
    if ranks and len(ranks) == layout.world and int(ranks[layout.rank]["loader"].get("world", 1)) == layout.world:
        return ranks[layout.rank]["loader"]
    saved = state["loader"]
    world = int(saved.get("world", 1))
    global_batch = int(saved["batch_size"]) * world
    if global_batch != batch_per_rank * layout.world:
        raise MoelabError(
            f"the checkpoint's data loader had a global batch of {global_batch} sequences, this run has "
            f"train.batch_size = {batch_per_rank * layout.world}: the data or its settings changed since the checkpoint"
        )
    used = int(saved["index"]) * world  # windows of the epoch's order consumed by all ranks together
    if used % layout.world:
        raise MoelabError(
            f"the checkpoint's data position ({used} windows) does not split over {layout.world} processes"
        )
    return {
        **saved,
        "batch_size": batch_per_rank,
        "rank": layout.rank,
        "world": layout.world,
        "index": used // layout.world,
    }


def local_trainer_state(
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    batch_per_rank: int,
    layout: Layout,
    seed: int,
    shard: bool = True,
) -> dict[str, Any]:
    """The trainer state this rank resumes from: its optimizer shard, its loader position and its
    RNG streams (in the trainer.pt layout a single process reads). shard=False: the optimizer
    state is already this rank's (FSDP shards it itself)."""
    local = dict(state)
    if shard:
        local["optimizer"] = shard_optimizer_state(state["optimizer"], optimizer, model, layout)
    local["loader"] = rank_loader_state(state, batch_per_rank, layout)
    ranks = state.get("ranks")
    same_world = bool(ranks) and len(ranks) == layout.world
    if same_world:
        for key in ("torch_rng", "python_rng", "cuda_rng"):
            local.pop(key, None)
            if key in ranks[layout.rank]:
                local[key] = ranks[layout.rank][key]
    elif layout.rank > 0:
        # A rank that did not exist when the checkpoint was written: its own stream, from a seed.
        s = rank_seed(seed, int(state.get("step", 0)), layout.rank)
        local["torch_rng"] = torch.Generator().manual_seed(s).get_state()
        local["python_rng"] = json.dumps(random.Random(s).getstate())
        local.pop("cuda_rng", None)
        if torch.cuda.is_available():
            torch.cuda.manual_seed(s)
    local.pop("ranks", None)
    local.pop("parallel", None)
    return local
