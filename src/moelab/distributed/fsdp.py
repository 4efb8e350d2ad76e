"""FSDP2 data parallelism (`parallel.data_parallel = "fsdp"`): parameters, gradients and optimizer
state sharded over the data-parallel ranks with `fully_shard`, checkpoints in the single-process
format.

Each transformer block is one FSDP unit (its parameters all-gathered for its forward and backward,
then freed), and the root holds the rest (embedding, final norm, a tied or separate LM head). The
parameters become DTensors sharded on dim 0 over a 1-D DeviceMesh of all ranks; the gradients are
reduce-scattered (averaged over the ranks, as DDP averages them), and the optimizer, built after
sharding, keeps its moments as shards of the same layout.

What stays as under DDP (moelab.distributed.data_parallel): the losses are means over ranks, the
Switch loss uses the global slot counts, and the router statistics and the bias-balancing load are
buffers, which FSDP leaves alone, summed over ranks when read.

Not combined with expert parallelism (parallel.expert > 1; refused by the config check).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from moelab.checkpoint import MODEL_FILE, load_trainer_state, verify_checkpoint
from moelab.errors import CheckpointError

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: nn.Module, device: torch.device, world: int, bf16: bool) -> nn.Module:
    """fully_shard every block, then the root, in place (the module keeps its class's methods and
    its parameter names). bf16: on CUDA, compute in bf16 and reduce gradients in fp32."""
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    mp = None
    if bf16 and device.type == "cuda":  # NOTE: not exercised by the CPU tests
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mp is not None:
        kwargs["mp_policy"] = mp
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        # NOTE: the last block's parameters are needed again at once by the backward: keep them
        # gathered after its forward (as torchtitan does).
        fully_shard(block, reshard_after_forward=i < last, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextmanager
def gradient_sync(model: nn.Module, sync: bool):
    """Gradient accumulation: reduce-scatter only in the last micro-batch's backward (the others
    accumulate unsharded gradients locally)."""
    assert isinstance(model, FSDPModule)
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """The norm of the whole gradient (the shards' squares summed over ranks) and clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(total, DTensor):
        total = total.full_tensor()  # a partial sum of squares on each rank -> the global norm
    if torch.isfinite(torch.tensor(max_norm)):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.full_tensor() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------------------------
# Names: the single-process checkpoint numbers optimizer entries by parameter; FSDP's state dicts
# name them (fully qualified names, unchanged by fully_shard).


def _tied(model: nn.Module) -> dict[str, str]:
    """Second names of shared parameters -> the first name (a tied LM head -> the embedding)."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def _index_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The parameter name of each index of optimizer.state_dict() (params numbered in group order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


# ---------------------------------------------------------------------------------------------
# Checkpoints


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> tuple[dict, dict] | None:
    """(weights, optimizer.state_dict()) as one process would save them, on rank 0 (None elsewhere).
    Collective: every rank calls it."""
    weights = get_model_state_dict(model, options=_GATHER)
    # NOTE: get_optimizer_state_dict initialises an empty optimizer state by taking a step with zero
    # gradients (and lr 0), which would count one Adam step too many: before the first step (the
    # same on every rank) the local state dict, empty, is already the single-process one.
    optim = get_optimizer_state_dict(model, optimizer, options=_GATHER) if optimizer.state else None
    if rank != 0:
        return None
    for name in _tied(model):
        weights.pop(name, None)  # saved once, as model_state does
    weights = {k: v.detach().contiguous() for k, v in weights.items()}
    names = _index_names(optimizer, model)
    index = {n: i for i, n in enumerate(names)}
    local = optimizer.state_dict()  # the hyper-parameters, with integer params
    if optim is None:
        return weights, local
    state = {index[name]: dict(entry) for name, entry in optim["state"].items()}
    return weights, {"state": state, "param_groups": local["param_groups"]}


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    """Verify a checkpoint and load its full weights into the sharded model (every rank reads the
    file and keeps its shards); returns the full trainer state (to `shard_optimizer_state`)."""
    path = Path(path)
    verify_checkpoint(path)
    file = path / MODEL_FILE
    try:
        weights = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from None
    for name, source in _tied(model).items():
        if source in weights:
            weights[name] = weights[source]
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{file} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, ValueError) as exc:  # a shape mismatch
        raise CheckpointError(f"{file} does not fit this model: {exc}") from None
    return load_trainer_state(path, lambda: None)  # weights loaded above


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """Load a full, single-process optimizer state into the sharded optimizer (every rank holds the
    full state and keeps its shards) and return the optimizer's own (sharded) state dict."""
    if not state.get("state"):
        # NOTE: no step taken yet; set_optimizer_state_dict would initialise the state with a step
        # (see full_state). optimizer.load_state_dict of this state empties it, as in one process.
        return state
    names = _index_names(optimizer, model)
    full = {
        "state": {names[int(i)]: entry for i, entry in state.get("state", {}).items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))
    return optimizer.state_dict()


# ---------------------------------------------------------------------------------------------
# Router health reads whole experts


def gathered_layer(model: nn.Module, layer: int, rank: int) -> SimpleNamespace | None:
    """On rank 0, a stand-in for `model` with layer `layer`'s experts (weights and gradients)
    gathered, in the shape moelab.model.health.router_health reads. Collective."""
    moe = model.blocks[layer].ffn
    full = {}
    for attr in ("gate_up_proj", "down_proj"):
        p = getattr(moe.experts, attr)
        t = _full(p.detach())
        has_grad = torch.tensor([p.grad is not None], dtype=torch.int32, device=t.device)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MIN)
        g = _full(p.grad) if bool(has_grad.item()) else None
        t.grad = g
        full[attr] = t
    if rank != 0:
        return None
    blocks = [SimpleNamespace(is_moe=False, ffn=None) for _ in model.blocks]
    blocks[layer] = SimpleNamespace(is_moe=True, ffn=SimpleNamespace(cfg=moe.cfg, experts=SimpleNamespace(**full)))
    return SimpleNamespace(blocks=blocks)
