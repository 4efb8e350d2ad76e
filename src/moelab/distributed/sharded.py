"""Sharded checkpoints (`train.checkpoint_format = "sharded"`, with FSDP): every process writes its
own shards with torch.distributed.checkpoint (DCP) instead of gathering the full state to rank 0.

<run>/checkpoints/step_000123/
    dcp/                 DCP files: __<rank>_0.distcp (each rank's shards) and .metadata, of the state
                         dict {"model": sharded model state, "optim": sharded optimizer state}
                         ("optim" only once a step was taken: see fsdp.full_state's NOTE)
    trainer.pt           what the single format keeps besides the weights and the optimizer moments
                         (counters, the global loader position, RNG, monitor, "ranks", "parallel");
                         "optimizer" holds the param_groups only (empty state), "sharded" the names
                         of the optimizer's parameters in single-format index order
    manifest.json        sha256 of every file above, DCP files included; "format": "sharded"

The write follows the single format's rule: rank 0 makes the temporary folder, every rank writes its
shards there (DCP's save ends with a barrier once .metadata is written), rank 0 adds trainer.pt, then
the manifest, and renames the folder into place. A folder without manifest is never read.

Reading: under FSDP at any world size every rank loads its shards of the new layout (DCP reshards);
one process, or `moelab consolidate`, reads the whole state without a process group (`no_dist`) into
the single format's (weights, optimizer state).

FSDP with expert parallelism: a rank's expert tensors (and their moments) are its [El, ...] rows,
FSDP-sharded over the replicas. They are written as what they are, a piece of the one [E, ...]
tensor sharded over the (ep, replica) mesh (`_global_expert_view`), so the files hold the same keys
and full shapes as any other layout's: DCP reads them back at another world size or expert-parallel
size, with or without expert parallelism, and in one process.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from moelab.checkpoint import (
    SHARDED_DIR,
    TRAINER_FILE,
    begin_checkpoint,
    finish_checkpoint,
    is_sharded,
    load_trainer_state,
    save_checkpoint,
    verify_checkpoint,
)
from moelab.distributed.checkpoint import RANK_KEYS, global_loader_state
from moelab.distributed.expert_parallel import expert_parallel_param_names
from moelab.distributed.layout import Layout
from moelab.errors import CheckpointError

FORMAT = "sharded"


def _index_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


# ---------------------------------------------------------------------------------------------
# Expert rows under FSDP with expert parallelism


def _global_expert_view(t: torch.Tensor, expert_mesh: DeviceMesh) -> DTensor:
    """This rank's FSDP shard of its [El, ...] expert rows as a DTensor of the global [E, ...] tensor
    on the (ep, replica) mesh: dim 0 split over ep (expert blocks), each block over the replicas (as
    FSDP split it: torch.chunk). Shares storage with `t`: DCP loads into it in place."""
    assert isinstance(t, DTensor), "expert rows are FSDP-sharded under fsdp with expert parallelism"
    shape = torch.Size((t.shape[0] * expert_mesh.size(0),) + tuple(t.shape[1:]))
    stride = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        stride[d] = stride[d + 1] * shape[d + 1]
    return DTensor.from_local(
        t.to_local(), expert_mesh, [Shard(0), Shard(0)], run_check=False, shape=shape, stride=tuple(stride)
    )


def _expert_views(state: dict[str, Any], model: nn.Module, expert_mesh: DeviceMesh | None) -> dict[str, Any]:
    """{"model": ..., "optim": ...} with every expert tensor (weights, moments) replaced by its
    global view; the other entries are the same objects."""
    if expert_mesh is None:
        return state
    names = set(expert_parallel_param_names(model))
    out = dict(state)
    out["model"] = {k: _global_expert_view(v, expert_mesh) if k in names else v for k, v in state["model"].items()}
    if "optim" in state:
        entries = {
            k: {
                key: _global_expert_view(v, expert_mesh) if torch.is_tensor(v) and v.dim() else v
                for key, v in entry.items()
            }
            if k in names
            else entry
            for k, entry in state["optim"]["state"].items()
        }
        out["optim"] = {**state["optim"], "state": entries}
    return out


# ---------------------------------------------------------------------------------------------
# Saving: every rank writes its shards


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
    protected: frozenset[int],
    layout: Layout,
    world_group,
    expert_mesh: DeviceMesh | None = None,
) -> None:
    """Every rank calls this; all return once the checkpoint is in place. expert_mesh: the (ep,
    replica) mesh under expert parallelism (moelab.distributed.fsdp.Meshes.experts)."""
    has_optim = bool(optimizer.state)  # the same on every rank (before or after the first step)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if has_optim:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    state = _expert_views(state, model, expert_mesh)
    # NOTE: rank 0 alone starts and finishes the checkpoint; whatever it meets there (a full disk, a
    # missing directory) is broadcast, so that every rank fails with it instead of waiting in the
    # next collective for a rank that has gone.
    begun: list[Any] = [None]
    if layout.rank == 0:
        try:
            begun = [("ok", str(begin_checkpoint(run_dir, step)))]
        except Exception as exc:
            begun = [("failed", f"{type(exc).__name__}: {exc}")]
    dist.broadcast_object_list(begun, src=0, group=world_group)
    status, value = begun[0]
    if status != "ok":
        raise CheckpointError(f"checkpoint {step} could not be started on rank 0: {value}")
    tmp = Path(value)
    finished: list[Any] = [None]
    try:
        dcp.save(state, storage_writer=FileSystemWriter(tmp / SHARDED_DIR), process_group=world_group)
        mine = {k: trainer_state[k] for k in RANK_KEYS if k in trainer_state}
        ranks: list[dict[str, Any]] | None = [None] * layout.world if layout.rank == 0 else None  # type: ignore[list-item]
        dist.gather_object(mine, ranks, dst=0, group=world_group)
        if layout.rank == 0:
            try:
                local = optimizer.state_dict()
                saved = {
                    **trainer_state,
                    "optimizer": {"state": {}, "param_groups": local["param_groups"]},
                    "sharded": {"optimizer": has_optim, "names": _index_names(optimizer, model)},
                    "loader": global_loader_state(trainer_state["loader"]),
                    "ranks": ranks,
                    "parallel": {"world": layout.world, "expert": layout.expert},
                }
                torch.save(saved, tmp / TRAINER_FILE)
                finish_checkpoint(run_dir, step, tmp, keep, protected, fmt=FORMAT)
            except Exception as exc:
                finished = [f"{type(exc).__name__}: {exc}"]
                raise
    finally:
        # NOTE: nobody goes on before the checkpoint is in place, and everyone learns whether rank 0
        # put it there (the broadcast is the barrier).
        dist.broadcast_object_list(finished, src=0, group=world_group)
        if layout.rank == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if finished[0] is not None:
        raise CheckpointError(f"checkpoint {step} could not be finished on rank 0: {finished[0]}")


# ---------------------------------------------------------------------------------------------
# Checking a checkpoint against the model


def _saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        metadata = FileSystemReader(str(path / SHARDED_DIR)).read_metadata()
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path}: {path / SHARDED_DIR} is not a readable DCP checkpoint: {exc}"
        ) from None
    return {
        key[len("model.") :]: tuple(meta.size)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }


def check_fits(path: Path, model: nn.Module, expert: int = 1) -> None:
    """One-line CheckpointError naming the first mismatch between the checkpoint's weights and the
    model's (names, then full shapes; an FSDP model's DTensors report their full shape, expert rows
    under expert parallelism `expert` times theirs)."""
    saved = _saved_shapes(path)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name in expert_parallel_param_names(model):
        expected[name] = (expected[name][0] * expert,) + expected[name][1:]
    tied = set(expected) - set(model_state_names(model))
    missing = sorted(set(expected) - set(saved) - tied)
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (another config?): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, shape in saved.items():
        if shape != expected[name]:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model (another config?): {name} has shape {shape}, "
                f"the model expects {expected[name]}"
            )


def model_state_names(model: nn.Module) -> list[str]:
    """The names the single format saves (a tied LM head once)."""
    seen: set[int] = set()
    names = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        names.append(name)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names += [n for n in model.state_dict() if n not in params]  # buffers
    return names


# ---------------------------------------------------------------------------------------------
# Loading under FSDP: every rank reads its shards (any world size)


def load_sharded_into_fsdp(path: Path, model: nn.Module, expert_mesh: DeviceMesh | None = None) -> dict[str, Any]:
    """Verify, load the weights into the (FSDP) model, return trainer.pt's state; the optimizer
    follows in `restore_optimizer` (the runtime's local_trainer_state, which has the optimizer)."""
    path = Path(path)
    verify_checkpoint(path)
    check_fits(path, model, expert_mesh.size(0) if expert_mesh is not None else 1)
    state = load_trainer_state(path, lambda: None)
    msd = get_model_state_dict(model)
    # NOTE: the expert views share storage with msd's tensors: DCP fills those in place.
    dcp.load(_expert_views({"model": msd}, model, expert_mesh), checkpoint_id=str(path / SHARDED_DIR))
    set_model_state_dict(model, msd)
    return {**state, "sharded_path": str(path)}


def restore_optimizer(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module, expert_mesh: DeviceMesh | None = None
) -> dict[str, Any]:
    """Load the checkpoint's optimizer shards into the FSDP optimizer; the state with "optimizer"
    the optimizer's own (sharded) state dict."""
    state = dict(state)
    path = Path(state.pop("sharded_path"))
    info = state.pop("sharded")
    if info["optimizer"]:
        # NOTE: get_optimizer_state_dict initialises an empty state with an lr-0 step; every entry
        # (the step count included) is then overwritten by the checkpoint's.
        osd = get_optimizer_state_dict(model, optimizer)
        views = _expert_views({"model": {}, "optim": osd}, model, expert_mesh)
        dcp.load({"optim": views["optim"]}, checkpoint_id=str(path / SHARDED_DIR))
        set_optimizer_state_dict(model, optimizer, osd)
        state["optimizer"] = optimizer.state_dict()
    return state


# ---------------------------------------------------------------------------------------------
# Reading without a process group: one process, consolidation


def read_full(path: Path) -> dict[str, Any]:
    """The whole DCP state dict ({"model": ..., "optim": ...}) as plain tensors, in this process."""
    sd: dict[str, Any] = {}
    try:
        _load_state_dict(
            sd,
            storage_reader=FileSystemReader(str(path / SHARDED_DIR)),
            planner=_EmptyStateDictLoadPlanner(),
            no_dist=True,
        )
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: {path / SHARDED_DIR} cannot be read: {exc}") from None
    return sd


def load_sharded_single(path: Path, model: nn.Module) -> dict[str, Any]:
    """Verify a sharded checkpoint, load its full weights into the plain `model` and return the
    trainer state of the single format (the optimizer state numbered by parameter index)."""
    path = Path(path)
    verify_checkpoint(path)
    check_fits(path, model)
    state = load_trainer_state(path, lambda: None)
    sd = read_full(path)
    keep = set(model_state_names(model))
    weights = {k: v for k, v in sd["model"].items() if k in keep}
    model.load_state_dict(weights, strict=False)
    info = state.pop("sharded")
    if info["optimizer"]:
        index = {name: i for i, name in enumerate(info["names"])}
        entries = sd["optim"]["state"]
        unknown = sorted(set(entries) - set(index))
        if unknown:
            raise CheckpointError(f"checkpoint {path}: optimizer state for unknown parameters {unknown[:5]}")
        state["optimizer"] = {
            "state": {index[name]: dict(entry) for name, entry in entries.items()},
            "param_groups": state["optimizer"]["param_groups"],
        }
    return state


# ---------------------------------------------------------------------------------------------
# moelab consolidate


def consolidate(source: str | Path, out: str | Path) -> Path:
    """Write a sharded checkpoint (or a run's newest checkpoint) in the single-process format as
    the only checkpoint of the new run directory `out` (the run's other files copied): generate,
    export and any world size's resume then read it. Returns the new checkpoint's directory."""
    from moelab.model import Transformer
    from moelab.rundir import resolve_checkpoint

    run, checkpoint = resolve_checkpoint(source)
    if not is_sharded(checkpoint):
        raise CheckpointError(f"checkpoint {checkpoint} is already in the single-process format")
    out = Path(out)
    if out.resolve().is_relative_to(run.path.resolve()):
        raise CheckpointError(f"{out} is inside the run {run.path}; choose an output run directory outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not an empty directory; choose a new output run directory")
    model = Transformer(run.load_config().model)
    state = load_sharded_single(checkpoint, model)
    out.mkdir(parents=True, exist_ok=True)
    for item in run.path.iterdir():
        if item.name == "checkpoints":
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)
    step = int(state["step"])
    return save_checkpoint(out, step, model, state, keep=1)
