"""Data parallelism: gradients, norms, losses and router statistics made equal to those of one
process training on the global batch (every rank's micro-batch together).

Each rank's loss is the mean over its own B / W sequences, and the global loss is the mean of the
ranks' losses (they all hold the same number of tokens). Hence:

* replicated parameters (everything but the experts under expert parallelism): DDP averages their
  gradients over the W ranks, which is exactly the gradient of the global loss;
* expert-parallel parameters: each rank's shard already receives, through the all-to-all, the
  gradient of the losses of all P ranks of its expert-parallel group. Summing over the W / P
  replicas of the shard gives the sum over all W ranks, and dividing by W turns that into the
  gradient of the mean (`sync_expert_grads`);
* the Switch balancing loss E * sum_e f_e P_e of the global batch is linear in the mean router
  probability P_e, with f_e (the share of slots, no gradient) a global quantity: each rank uses the
  global f_e (`reduce_slot_counts`, installed as MoE.reduce_slot_counts) with its own P_e, and the
  mean of the ranks' losses - what DDP's average differentiates - is the global loss, value and
  gradient. The z-loss is a mean over tokens, so the mean of the ranks' z-losses is already global;
* router statistics and the bias-balancing load are sums (and one max) over tokens: summed over
  ranks they are the single-process values (`reduce_router_stats`, `reduce_balancing_load`).
"""

from __future__ import annotations

import inspect
import math
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moelab.distributed.expert_parallel import (
    expert_parallel_modules,
    expert_parallel_param_names,
)
from moelab.model.moe import _STAT_NAMES, MoE

_FORWARDS = _STAT_NAMES.index("forwards")
_MAX_LOGIT = _STAT_NAMES.index("max_logit")


def wrap_ddp(model: nn.Module, device: torch.device, group=None) -> DistributedDataParallel:
    """DDP over `group` for every parameter except the expert-parallel shards, which differ by rank
    (their gradients are handled by `sync_expert_grads`)."""
    ignore = expert_parallel_param_names(model)
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    kwargs = {"process_group": group, "device_ids": [device] if device.type == "cuda" else None}
    # NOTE: buffers are not re-broadcast every forward: the statistics buffers are per rank by design
    # (reduced when read), and the balancing bias is kept identical by reducing the load it follows.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:  # torch < 2.13
        kwargs["broadcast_buffers"] = False
    return DistributedDataParallel(model, **kwargs)


def _all_reduce_counts(counts_E: torch.Tensor, group) -> torch.Tensor:
    out = counts_E.detach().clone()
    dist.all_reduce(out, group=group)
    return out


def install_global_balancing(model: nn.Module, group=None) -> None:
    """Make every MoE layer's balancing loss use the slot counts of the global batch."""
    for moe in model.modules():
        if isinstance(moe, MoE):
            moe.reduce_slot_counts = partial(_all_reduce_counts, group=group)


def sync_expert_grads(model: nn.Module, world: int, replica_group, replicas: int) -> None:
    """Turn each expert shard's gradient (the sum over its expert-parallel group's losses) into the
    gradient of the global mean loss: sum over the shard's replicas, divide by the world size."""
    params = [p for _, m in expert_parallel_modules(model) for p in (m.gate_up_proj, m.down_proj)]
    if not params:
        return
    for p in params:
        if p.grad is None:  # no slot reached these experts on any rank of the group
            p.grad = torch.zeros_like(p)
    if replicas > 1:
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # one collective for every layer
        dist.all_reduce(flat, group=replica_group)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n
    for p in params:
        p.grad.div_(world)


def clip_grad_norm(model: nn.Module, max_norm: float, expert_group) -> float:
    """Global gradient norm (of the whole model, as one process would compute it) and clipping.

    Replicated gradients are identical on every rank after DDP; expert shards are disjoint within
    an expert-parallel group, so their squared norms are summed over that group."""
    sharded = {id(p) for _, m in expert_parallel_modules(model) for p in (m.gate_up_proj, m.down_proj)}
    params = [p for p in model.parameters() if p.grad is not None]
    replicated = [p.grad for p in params if id(p) not in sharded]
    expert = [p.grad for p in params if id(p) in sharded]
    device = params[0].grad.device if params else torch.device("cpu")
    zero = torch.zeros((), device=device)
    sq_replicated = torch.nn.utils.get_total_norm(replicated).float().square() if replicated else zero
    sq_expert = torch.nn.utils.get_total_norm(expert).float().square() if expert else zero.clone()
    if expert_group is not None:
        dist.all_reduce(sq_expert, group=expert_group)
    total = (sq_replicated + sq_expert).sqrt()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_([p for p in params], max_norm, total)
    return float(total)


def all_reduce_mean(values: list[float], world: int, device: torch.device, group=None) -> list[float]:
    """Mean over ranks of a few floats (one collective; gloo has no AVG, so SUM / world)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return (t / world).tolist()


def reduce_router_stats(model: nn.Module, group=None) -> None:
    """Sum every MoE layer's statistics buffers over ranks, in place (max for the largest logit),
    so that `read_stats` returns the values of the global batch. Every rank must call it."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        return
    buffers = [b for m in layers for b in (m.stat_tokens_per_expert, m.stat_prob_sum, m.stat_scalars)]
    flat = torch.cat([b.reshape(-1).double() for b in buffers])
    max_logit = torch.stack([m.stat_scalars[_MAX_LOGIT] for m in layers]).clone()
    dist.all_reduce(flat, group=group)
    dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=group)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()
    for m, value in zip(layers, max_logit):
        m.stat_scalars[_MAX_LOGIT] = value
        # "forwards" counts forward passes (it only tells whether max_logit is set): keep this rank's.
        m.stat_scalars[_FORWARDS] = m.stat_scalars[_FORWARDS] / dist.get_world_size(group)


def reduce_balancing_load(model: nn.Module, group=None) -> None:
    """Sum the load since the last bias update over ranks before `update_bias`, so that every rank
    applies the same update, the one the global batch calls for."""
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.cfg.bias_update_rate > 0]
    if not layers:
        return
    flat = torch.cat([m.load_since_update for m in layers])
    dist.all_reduce(flat, group=group)
    for m, load in zip(layers, flat.split([m.load_since_update.numel() for m in layers])):
        m.load_since_update.copy_(load)
