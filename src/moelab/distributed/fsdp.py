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

With expert parallelism (parallel.expert = P > 1, "fsdp+ep", as torchtitan's dp2ep) the ranks form a
2-D mesh (ep, replica): rank r = i * P + j holds expert shard j (layout.expert_rank) and is replica i
of it. The dense parameters (attention, norms, embeddings, routers, shared experts) are sharded over
all W ranks as above; each MoE layer's local experts [El, ...] (moelab.distributed.expert_parallel,
the all-to-all dispatch unchanged) are their own FSDP unit over the W / P ranks of the "replica"
dimension, so their gradients are reduced over those ranks only. Checkpoints gather the experts over
both dimensions (full_state) or slice them (load_checkpoint); moelab.distributed.sharded writes them
as one [E, ...] tensor sharded over (ep, replica).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from moelab.checkpoint import MODEL_FILE, load_trainer_state, verify_checkpoint
from moelab.distributed.expert_parallel import expert_parallel_modules, expert_parallel_param_names, gather_rows
from moelab.errors import CheckpointError


@dataclass(frozen=True)
class Meshes:
    """dp: all W ranks (the dense parameters). experts: the (ep, replica) mesh of the expert rows
    under expert parallelism (None without): mesh[j, i] = rank i * P + j, so "ep" is an
    expert-parallel group (consecutive ranks, layout.expert_groups) and "replica" the ranks holding
    the same experts (layout.replica_groups)."""

    dp: DeviceMesh
    experts: DeviceMesh | None = None

    @property
    def replica(self) -> DeviceMesh | None:
        return None if self.experts is None else self.experts["replica"]


def make_meshes(device_type: str, world: int, expert: int = 1) -> Meshes:
    """The meshes of W ranks with expert-parallel groups of `expert` ranks. Collective."""
    dp = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    if expert == 1:
        return Meshes(dp)
    ranks_PR = torch.arange(world).reshape(world // expert, expert).T  # [ep, replica]
    return Meshes(dp, DeviceMesh(device_type, ranks_PR, mesh_dim_names=("ep", "replica")))


def shard_model(model: nn.Module, meshes: Meshes, bf16: bool) -> nn.Module:
    """fully_shard every block, then the root, in place (the module keeps its class's methods and
    its parameter names); under expert parallelism each MoE layer's experts first, over the replica
    ranks. bf16: on CUDA, compute in bf16 and reduce gradients in fp32."""
    kwargs: dict[str, Any] = {}
    if bf16 and meshes.dp.device_type == "cuda":  # NOTE: not exercised by the CPU tests
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        # NOTE: the last block's parameters are needed again at once by the backward: keep them
        # gathered after its forward (as torchtitan does).
        if meshes.replica is not None and block.is_moe:
            # NOTE: the expert rows differ along "ep": they must not join the block's all-rank unit.
            # Their own unit (sharded before the block, which then leaves them out) reduces their
            # gradients over the replicas only; a replica mesh of one rank is a no-op shard.
            fully_shard(block.ffn.experts, mesh=meshes.replica, reshard_after_forward=i < last, **kwargs)
        fully_shard(block, mesh=meshes.dp, reshard_after_forward=i < last, **kwargs)
    fully_shard(model, mesh=meshes.dp, **kwargs)
    return model


def _expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in expert_parallel_modules(model) for p in (m.gate_up_proj, m.down_proj)]


def scale_expert_grads(model: nn.Module, expert: int) -> None:
    """After the backward: FSDP averaged each expert shard's gradient over its W / P replicas, and
    each replica's gradient is already the sum over its P-rank expert-parallel group's losses (the
    all-to-all backward). Dividing by P makes it the sum over all W ranks / W: the gradient of the
    global mean loss, as for the dense parameters."""
    if expert == 1:
        return
    for p in _expert_params(model):
        if p.grad is not None:
            p.grad.div_(expert)


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


def _norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device)
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # a partial sum of squares on each rank -> the norm over the mesh
    return total.float()


def clip_grad_norm(model: nn.Module, max_norm: float, expert_group=None) -> float:
    """The norm of the whole gradient (the shards' squares summed over ranks) and clipping.

    Under expert parallelism the expert shards live on another mesh (DTensor ops do not mix
    meshes): their norm over the replicas covers this rank's experts only, so its square is summed
    over the expert-parallel group before it joins the dense parameters'."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    experts = {id(p) for p in _expert_params(model)}
    dense = [p for p in params if id(p) not in experts]
    routed = [p for p in params if id(p) in experts]
    device = local_tensor(params[0].grad).device
    sq_dense = _norm([p.grad for p in dense], device).square()
    sq_experts = _norm([p.grad for p in routed], device).square()
    if expert_group is not None:
        dist.all_reduce(sq_experts, group=expert_group)
    total = (sq_dense + sq_experts).sqrt()
    if torch.isfinite(torch.tensor(max_norm)):
        for group in (dense, routed):  # one mesh per call
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
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


def _gather(
    t: torch.Tensor, expert_rows: bool, rank: int, expert_group, expert: int, cpu: bool = True
) -> torch.Tensor | None:
    """The full tensor on rank 0 (None elsewhere): all-gathered over its FSDP mesh and, for expert
    rows, gathered over rank 0's expert-parallel group. Collective: every rank calls it."""
    full = _full(t.detach())
    if expert_rows and expert > 1:
        full = gather_rows(full, expert_group, expert, dst_global=0) if rank < expert else None
    if rank != 0:
        return None
    return full.cpu().contiguous() if cpu else full


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, expert_group=None, expert: int = 1
) -> tuple[dict, dict] | None:
    """(weights, optimizer.state_dict()) as one process would save them, on rank 0 (None elsewhere),
    one tensor at a time. Collective: every rank calls it."""
    experts = set(expert_parallel_param_names(model))
    tied = _tied(model)
    weights = {}
    for name, t in model.state_dict().items():
        if name in tied:
            continue  # saved once, as model_state does
        weights[name] = _gather(t, name in experts, rank, expert_group, expert)
    # NOTE: the optimizer's own state dict (DTensor moments, numbered by parameter) rather than
    # get_optimizer_state_dict, which initialises an empty state with an lr-0 step (one Adam step
    # too many); every rank holds the same entries, in the same order.
    local = optimizer.state_dict()
    names = _index_names(optimizer, model)
    state = {}
    for i in sorted(local["state"]):
        entry = {}
        for key, value in local["state"][i].items():
            if torch.is_tensor(value) and value.dim() > 0:  # a moment, shaped like its parameter
                value = _gather(value, names[i] in experts, rank, expert_group, expert)
            entry[key] = value
        state[i] = entry
    if rank != 0:
        return None
    return weights, {"state": state, "param_groups": local["param_groups"]}


def _local_experts(full: torch.Tensor, name: str, layout, where: str) -> torch.Tensor:
    """This rank's rows of a checkpoint's [E, ...] expert tensor."""
    E = layout.num_experts
    if full.dim() == 0 or full.shape[0] != E:
        raise CheckpointError(f"{where}: {name} has shape {tuple(full.shape)}, the model has {E} experts")
    return full[layout.expert_slice]


def load_checkpoint(path: Path, model: nn.Module, layout=None) -> dict[str, Any]:
    """Verify a checkpoint and load its full weights into the sharded model (every rank reads the
    file and keeps its shards; under expert parallelism (`layout`) its experts first); returns the
    full trainer state (to `shard_optimizer_state`)."""
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
    if layout is not None and layout.expert > 1:
        for name in expert_parallel_param_names(model):
            weights[name] = _local_experts(weights[name], name, layout, str(file))
    try:
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, ValueError) as exc:  # a shape mismatch
        raise CheckpointError(f"{file} does not fit this model: {exc}") from None
    return load_trainer_state(path, lambda: None)  # weights loaded above


def shard_optimizer_state(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module, layout=None
) -> dict[str, Any]:
    """Load a full, single-process optimizer state into the sharded optimizer (every rank holds the
    full state and keeps its shards; expert moments sliced to its experts first) and return the
    optimizer's own (sharded) state dict."""
    if not state.get("state"):
        # NOTE: no step taken yet; set_optimizer_state_dict would initialise the state with a step
        # (see full_state). optimizer.load_state_dict of this state empties it, as in one process.
        return state
    names = _index_names(optimizer, model)
    experts = set(expert_parallel_param_names(model)) if layout is not None and layout.expert > 1 else set()
    entries = {}
    for i, entry in state.get("state", {}).items():
        name = names[int(i)]
        if name in experts:
            entry = {
                k: _local_experts(v, name, layout, "the optimizer state") if torch.is_tensor(v) and v.dim() else v
                for k, v in entry.items()
            }
        entries[name] = entry
    full = {
        "state": entries,
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))
    return optimizer.state_dict()


# ---------------------------------------------------------------------------------------------
# Router health reads whole experts


def gathered_layer(
    model: nn.Module, layer: int, rank: int, expert_group=None, expert: int = 1
) -> SimpleNamespace | None:
    """On rank 0, a stand-in for `model` with layer `layer`'s experts (weights and gradients)
    gathered (over the expert-parallel group too), in the shape moelab.model.health.router_health
    reads. Collective."""
    moe = model.blocks[layer].ffn
    full = {}
    for attr in ("gate_up_proj", "down_proj"):
        p = getattr(moe.experts, attr)
        has_grad = torch.tensor([p.grad is not None], dtype=torch.int32, device=local_tensor(p).device)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MIN)
        t = _gather(p, True, rank, expert_group, expert, cpu=False)
        g = _gather(p.grad, True, rank, expert_group, expert, cpu=False) if bool(has_grad.item()) else None
        if t is not None:
            t.grad = g
        full[attr] = t
    if rank != 0:
        return None
    blocks = [SimpleNamespace(is_moe=False, ffn=None) for _ in model.blocks]
    blocks[layer] = SimpleNamespace(is_moe=True, ffn=SimpleNamespace(cfg=moe.cfg, experts=SimpleNamespace(**full)))
    return SimpleNamespace(blocks=blocks)
