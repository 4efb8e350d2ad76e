"""Expert parallelism on 2 (and 4) CPU processes with gloo against one process on the global batch:
the all-to-all's gradient, MoE layer outputs, balancing losses, gradients, router statistics and
bias updates, and whole-model training steps (DDP + expert parallelism), all within 1e-5."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moelab.config import (
    DataConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from moelab.distributed import data_parallel as dp
from moelab.distributed.expert_parallel import (
    all_to_all,
    expert_parallel_param_names,
    gather_rows,
    shard_experts,
)
from moelab.distributed.layout import make_layout
from moelab.distributed.runtime import Distributed
from moelab.model import Transformer
from moelab.model.health import health_to_metrics, router_health
from moelab.model.moe import MoE
from tests.distributed.harness import run_workers

TOL = 1e-5
# NOTE: weights after AdamW steps get a looser bound: Adam divides each update by the gradient's own
# RMS, so an element whose gradient is near eps (1e-8) turns a 1e-11 rounding difference of the
# summation order into ~1e-3 of its update (lr 1e-2). Losses and gradients are held to TOL.
TOL_WEIGHTS = 1e-4


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# The all-to-all autograd function


def _all_to_all_worker(rank: int, world: int) -> dict:
    group = dist.new_group(list(range(world)))
    # Uneven splits per pair, equal totals per rank (so both ranks make the same number of gradcheck calls).
    in_splits = [1, 3] if rank == 0 else [3, 1]
    out_splits = [1, 3] if rank == 0 else [3, 1]
    x = (torch.arange(12, dtype=torch.float64).reshape(4, 3) + 100 * rank).requires_grad_(True)
    out = all_to_all(x, out_splits, in_splits, group)
    # rank 0 keeps its first row and receives rank 1's first 3 rows; rank 1 gets rank 0's last 3 rows, keeps its last
    other = torch.arange(12, dtype=torch.float64).reshape(4, 3) + 100 * (1 - rank)
    expected = torch.cat([x.detach()[:1], other[:3]]) if rank == 0 else torch.cat([other[1:], x.detach()[3:]])
    forward_ok = bool(torch.equal(out.detach(), expected))
    # the gradient is the reverse trip: row i of x gets the upstream gradient of wherever row i went
    upstream = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    (out * upstream).sum().backward()
    theirs = [torch.empty(4, 3, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(theirs, upstream, group=group)
    want = torch.cat([theirs[0][:1], theirs[1][:3]]) if rank == 0 else torch.cat([theirs[0][1:], theirs[1][3:]])
    # NOTE: torch.autograd.gradcheck cannot be used: both ranks perturb their inputs at once and
    # each sees the other's perturbation, so the numerical Jacobian is not this rank's.
    return {"forward": forward_ok, "grad": bool(torch.equal(x.grad, want))}


@pytest.mark.slow
def test_all_to_all_gradient_is_the_reverse_all_to_all(two_processes) -> None:
    for result in two_processes["all_to_all"]:
        assert result == {"forward": True, "grad": True}


# ---------------------------------------------------------------------------------------------
# One MoE layer: expert parallel over the ranks vs one process on every rank's tokens together

LAYER_CASES = {
    "softmax top-2, aux + z-loss, grouped_mm": (
        dict(num_experts=4, top_k=2, expert_hidden=32, aux_loss_coef=0.01, z_loss_coef=0.001),
        "grouped_mm",
        None,
    ),
    "softmax top-2, padded": (
        dict(num_experts=4, top_k=2, expert_hidden=32, aux_loss_coef=0.01, z_loss_coef=0.001),
        "padded",
        None,
    ),
    "sigmoid, bias balancing, gated shared expert, 8 experts": (
        dict(
            num_experts=8,
            top_k=2,
            expert_hidden=24,
            scoring="sigmoid",
            bias_update_rate=0.05,
            num_shared_experts=1,
            shared_expert_gate=True,
            route_scale=2.0,
            aux_loss_coef=0.02,
        ),
        "auto",
        [0.3, -0.2, 0.1, 0.0, -0.4, 0.2, 0.0, 0.05],
    ),
    "top-1, no renormalisation": (
        dict(num_experts=4, top_k=1, expert_hidden=32, renormalize=False, aux_loss_coef=0.01),
        "auto",
        None,
    ),
    # every token picks rank 0's experts: rank 1 receives no slot at all (empty all-to-all parts)
    "all slots on one rank": (
        dict(num_experts=4, top_k=2, expert_hidden=32, bias_update_rate=1e-6, aux_loss_coef=0.01),
        "auto",
        [0.0, 0.0, -1e4, -1e4],
    ),
}


def _make_moe(D: int, kwargs: dict, bias: list[float] | None) -> MoE:
    torch.manual_seed(1234)
    moe = MoE(D, MoEConfig(**kwargs))
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
            if name == "router.weight":
                p.mul_(3.0)  # spread the routing so that near-ties are rare
        if bias is not None:
            moe.router.expert_bias.copy_(torch.tensor(bias))
    return moe


def _layer_worker(rank: int, world: int) -> dict:
    group = dist.new_group(list(range(world)))
    D, T = 32, 24  # T tokens per rank
    out = {}
    for case, (kwargs, impl, bias) in LAYER_CASES.items():
        full = _make_moe(D, kwargs, bias)
        ref = copy.deepcopy(full)
        ep = copy.deepcopy(full)
        for m in (ref, ep):
            m.experts.matmul = impl
            m.train()
        shard_experts(ep, shard=rank, group=group, group_size=world)
        dp.install_global_balancing(ep, group)
        gen = torch.Generator().manual_seed(7)
        x_global = torch.randn(world * T, D, generator=gen)
        u_global = torch.randn(world * T, D, generator=gen)
        rows = slice(rank * T, (rank + 1) * T)

        # one process on the global batch: loss = mean over ranks of (y_r . u_r) + the global aux loss
        x_ref = x_global.clone().requires_grad_(True)
        y_ref, aux_ref = ref(x_ref[None])
        ((y_ref[0] * u_global).sum() / world + aux_ref).backward()

        # this rank: its own tokens, its own share of the loss (DDP would average the ranks' gradients)
        x = x_global[rows].clone().requires_grad_(True)
        y, aux = ep(x[None])
        ((y[0] * u_global[rows]).sum() + aux).backward()
        diffs = {"output": _max_diff(y[0], y_ref[0, rows].detach())}
        aux_mean = aux.detach().clone()
        dist.all_reduce(aux_mean, group=group)
        diffs["aux_loss"] = abs(float(aux_mean) / world - float(aux_ref))
        diffs["input_grad"] = _max_diff(x.grad / world, x_ref.grad[rows])
        dp.sync_expert_grads(ep, world, None, 1)
        sharded = set(expert_parallel_param_names(ep))
        for (name, p), (_, p_ref) in zip(ep.named_parameters(), ref.named_parameters()):
            g = p.grad.detach().clone()
            if name in sharded:
                g = gather_rows(g, group, world, dst_global=None)
            else:  # what DDP does to a replicated parameter
                dist.all_reduce(g, group=group)
                g /= world
            diffs[f"grad {name}"] = _max_diff(g, p_ref.grad)
        # router statistics and the bias-balancing update of the global batch
        dp.reduce_router_stats(ep, group)
        mine, theirs = ep.read_stats(), ref.read_stats()
        for key in ("tokens_per_expert", "mean_prob", "tokens", "dropped_frac", "entropy", "z_loss", "max_logit"):
            diffs[f"stat {key}"] = _max_diff(torch.tensor(mine[key]), torch.tensor(theirs[key]))
        dp.reduce_balancing_load(ep, group)
        ep.update_bias()
        ref.update_bias()
        diffs["expert_bias after update"] = _max_diff(ep.router.expert_bias, ref.router.expert_bias)
        out[case] = diffs
    return out


@pytest.mark.slow
def test_expert_parallel_layer_equals_one_process_on_the_global_batch(two_processes) -> None:
    for rank, per_case in enumerate(two_processes["layer"]):
        for case, diffs in per_case.items():
            bad = {k: v for k, v in diffs.items() if not v <= TOL}
            assert not bad, f"rank {rank}, {case}: {bad}"


# With a capacity (or expert choice), each rank routes its own micro-batch, as plain data
# parallelism does: expert parallelism must then equal the full layer on the rank's own tokens.
LOCAL_CASES = {
    "token choice with capacity 1.0": dict(
        num_experts=4, top_k=2, expert_hidden=32, capacity_factor=1.0, aux_loss_coef=0.0
    ),
    "expert choice": dict(num_experts=4, top_k=2, expert_hidden=32, routing="expert_choice", aux_loss_coef=0.0),
}


def _local_worker(rank: int, world: int) -> dict:
    group = dist.new_group(list(range(world)))
    D, T = 32, 24
    out = {}
    for case, kwargs in LOCAL_CASES.items():
        full = _make_moe(D, kwargs, None)
        ep = copy.deepcopy(full)
        full.train(), ep.train()
        shard_experts(ep, shard=rank, group=group, group_size=world)
        gen = torch.Generator().manual_seed(11 + rank)
        x_local = torch.randn(T, D, generator=gen)
        u = torch.randn(T, D, generator=gen)
        x1, x2 = x_local.clone().requires_grad_(True), x_local.clone().requires_grad_(True)
        y1, aux1 = full(x1[None])
        ((y1[0] * u).sum() + aux1).backward()
        y2, aux2 = ep(x2[None])
        ((y2[0] * u).sum() + aux2).backward()
        diffs = {
            "output": _max_diff(y2, y1.detach()),
            "input_grad": _max_diff(x2.grad, x1.grad),
            "router grad": _max_diff(ep.router.weight.grad, full.router.weight.grad),
        }
        # an expert's gradient gathers every rank's tokens: the sum of the ranks' local gradients
        for attr in ("gate_up_proj", "down_proj"):
            g = getattr(full.experts, attr).grad.clone()
            dist.all_reduce(g, group=group)
            n = g.shape[0] // world
            diffs[f"grad {attr}"] = _max_diff(getattr(ep.experts, attr).grad, g[rank * n : (rank + 1) * n])
        out[case] = diffs
    return out


@pytest.mark.slow
def test_expert_parallel_with_capacity_routes_each_ranks_batch_like_data_parallelism(two_processes) -> None:
    for rank, per_case in enumerate(two_processes["local"]):
        for case, diffs in per_case.items():
            bad = {k: v for k, v in diffs.items() if not v <= TOL}
            assert not bad, f"rank {rank}, {case}: {bad}"


# ---------------------------------------------------------------------------------------------
# The whole model: DDP + expert parallelism through `Distributed`, a few AdamW steps


def _run_config(world: int, expert: int) -> RunConfig:
    moe = MoEConfig(
        num_experts=4,
        top_k=2,
        expert_hidden=32,
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
        bias_update_rate=0.01,
        num_shared_experts=1,
    )
    model = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=16, moe=moe
    )
    cfg = RunConfig(
        model=model,
        data=DataConfig(seq_len=12),
        train=TrainConfig(batch_size=2 * world),
        parallel=ParallelConfig(expert=expert),
    )
    return cfg.validate()


def _model_worker(rank: int, world: int, expert: int, steps: int) -> dict:
    cfg = _run_config(world, expert)
    d = Distributed(make_layout(cfg, world, rank, rank), torch.device("cpu"))
    torch.manual_seed(0)
    ref = Transformer(cfg.model)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    d.shard(model)
    ddp = d.wrap(model)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sharded = set(expert_parallel_param_names(model))
    B, S = cfg.train.batch_size, 12
    per = B // world
    gen = torch.Generator().manual_seed(5)
    diffs: dict[str, float] = {}

    def note(key: str, value: float) -> None:
        diffs[key] = max(diffs.get(key, 0.0), value)

    for step in range(steps):
        tokens = torch.randint(0, 64, (B, S + 1), generator=gen)
        x, y = tokens[:, :-1], tokens[:, 1:]
        out = ref(x)
        loss_ref = F.cross_entropy(out.logits.reshape(-1, 64), y.reshape(-1))
        (loss_ref + out.aux_loss).backward()
        norm_ref = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0))

        mine = slice(rank * per, (rank + 1) * per)
        out_local = ddp(x[mine])
        loss = F.cross_entropy(out_local.logits.reshape(-1, 64), y[mine].reshape(-1))
        (loss + out_local.aux_loss).backward()
        d.finish_backward(model)
        norm = d.clip_grad_norm(model, 1.0)
        loss_mean, aux_mean = d.mean(float(loss.detach()), float(out_local.aux_loss.detach()))
        note("loss", abs(loss_mean - float(loss_ref.detach())))
        note("aux_loss", abs(aux_mean - float(out.aux_loss.detach())))
        note("grad_norm", abs(norm - norm_ref))
        for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
            g = gather_rows(p.grad, d.expert_group, expert, dst_global=None) if name in sharded else p.grad
            note(
                "grad " + name.split(".", 2)[-1] if name.startswith("blocks.") else "grad " + name,
                _max_diff(g, p_ref.grad),
            )
        # compared as the metrics.jsonl keys: every field of every layer, by name
        health = health_to_metrics(d.router_health(model, with_similarity=True))
        health_ref = health_to_metrics(router_health(ref, ref.router_stats(), True))
        assert health.keys() == health_ref.keys()
        for key, value in health_ref.items():
            note(
                "health " + key.split(".", 2)[-1],
                _max_diff(torch.tensor(health[key], dtype=torch.float64), torch.tensor(value, dtype=torch.float64)),
            )
        opt_ref.step(), opt.step()
        opt_ref.zero_grad(), opt.zero_grad()
        ref.update_router_biases()
        d.update_router_biases(model)
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        w = gather_rows(p, d.expert_group, expert, dst_global=None) if name in sharded else p.detach()
        note("weights after steps", _max_diff(w, p_ref.detach()))
    note(
        "expert_bias after steps",
        max(
            _max_diff(a.router.expert_bias, b.router.expert_bias) for a, b in zip(model.moe_layers(), ref.moe_layers())
        ),
    )
    return diffs


@pytest.mark.slow
@pytest.mark.parametrize("expert", [2, 1], ids=["expert-parallel-2", "data-parallel-2"])
def test_model_training_steps_equal_one_process(two_processes, expert: int) -> None:
    for rank, diffs in enumerate(two_processes[f"model expert={expert}"]):
        bad = {k: v for k, v in diffs.items() if not v <= (TOL_WEIGHTS if k == "weights after steps" else TOL)}
        assert not bad, f"rank {rank}: {bad}"


def _two_process_checks(rank: int, world: int) -> dict:
    """Every 2-process check in one session: starting processes costs more than the checks."""
    return {
        "all_to_all": _all_to_all_worker(rank, world),
        "layer": _layer_worker(rank, world),
        "local": _local_worker(rank, world),
        "model expert=2": _model_worker(rank, world, 2, 3),
        "model expert=1": _model_worker(rank, world, 1, 3),
    }


@pytest.fixture(scope="module")
def two_processes() -> dict[str, list]:
    per_rank = run_workers(_two_process_checks, 2, timeout=300)
    return {key: [r[key] for r in per_rank] for key in per_rank[0]}


@pytest.mark.slow
def test_hybrid_four_processes_expert_parallel_two_with_two_replicas() -> None:
    """W=4, P=2: expert gradients are summed over the replica groups [0, 2] and [1, 3]."""
    for rank, diffs in enumerate(run_workers(_model_worker, 4, 2, 2, timeout=300)):
        bad = {k: v for k, v in diffs.items() if not v <= (TOL_WEIGHTS if k == "weights after steps" else TOL)}
        assert not bad, f"rank {rank}: {bad}"
