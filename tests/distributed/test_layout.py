"""The parts of distributed training that need no processes: layouts and their errors, the per-rank
data order, and the conversions of checkpoint state between world sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelab.config import load_config
from moelab.data.loader import BatchLoader
from moelab.distributed.checkpoint import (
    global_loader_state,
    rank_loader_state,
    shard_optimizer_state,
)
from moelab.distributed.expert_parallel import (
    expert_parallel_param_names,
    shard_experts,
)
from moelab.distributed.layout import Layout, check_layout, make_layout
from moelab.errors import ConfigError, MoelabError
from moelab.model import Transformer


def tiny(*overrides: str):
    return load_config(preset="tiny", overrides=list(overrides))


@pytest.mark.parametrize(
    "overrides,world,device,message",
    [
        (
            ["parallel.expert=2"],
            1,
            "cpu",
            "the world size 1 is not a multiple of parallel.expert = 2: launch with torchrun",
        ),
        (
            ["model.moe.num_experts=8", "parallel.expert=4"],
            2,
            "cpu",
            "the world size 2 is not a multiple of parallel.expert = 4",
        ),
        (["train.batch_size=6"], 4, "cpu", "train.batch_size = 6 is the global batch"),
        (["parallel.backend=nccl"], 2, "cpu", "parallel.backend = 'nccl' needs CUDA devices"),
    ],
)
def test_impossible_layouts_are_refused_with_the_setting_to_change(overrides, world, device, message) -> None:
    with pytest.raises(MoelabError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_layout(tiny(*overrides), world, device)


def test_config_refuses_experts_that_do_not_split_and_expert_parallel_dense_models() -> None:
    with pytest.raises(
        ConfigError, match=r"parallel\.expert = 3 is not allowed: a divisor of model\.moe\.num_experts \(4\)"
    ):
        tiny("parallel.expert=3")
    with pytest.raises(ConfigError, match=r"parallel\.expert = 2 is not allowed: 1 for a dense model"):
        load_config(preset="small-dense", overrides=["parallel.expert=2"])


def test_good_layouts_pass() -> None:
    check_layout(tiny("parallel.expert=2"), 2, "cpu")
    check_layout(tiny("parallel.expert=2"), 4, "cpu")
    check_layout(tiny(), 8, "cuda")


def test_groups_of_a_hybrid_layout() -> None:
    layout = Layout(world=4, rank=3, local_rank=3, expert=2, num_experts=8)
    assert layout.expert_groups == [[0, 1], [2, 3]]
    assert layout.replica_groups == [[0, 2], [1, 3]]
    assert layout.expert_rank == 1 and layout.local_experts == 4
    assert layout.expert_slice == slice(4, 8)


def test_ranks_read_together_exactly_the_batches_of_one_process_across_epochs() -> None:
    """With num_windows % world != 0 too: every rank starts each epoch at the same step, when one
    process reading the global batch does, and the union of their batches is its batch."""
    seq, B, world = 4, 6, 3
    tokens = np.arange(seq * 47 + 1, dtype=np.int64)  # 47 windows: not a multiple of 3
    single = BatchLoader(tokens, B, seq, seed=5)
    ranks = [BatchLoader(tokens, B // world, seq, seed=5, rank=r, world=world) for r in range(world)]
    for _ in range(40):  # several epochs
        x, _ = single.next_batch()
        parts = [loader.next_batch()[0] for loader in ranks]
        assert len({loader.epoch for loader in ranks}) == 1
        assert ranks[0].epoch == single.epoch
        together = sorted(map(tuple, torch.cat(parts).tolist()))
        assert together == sorted(map(tuple, x.tolist()))
        assert global_loader_state(ranks[0].state_dict())["index"] == single.state_dict()["index"]


def test_loader_state_moves_between_world_sizes() -> None:
    layout2 = Layout(world=2, rank=1, local_rank=1, expert=1, num_experts=4)
    layout1 = Layout(world=1, rank=0, local_rank=0, expert=1, num_experts=4)
    saved_by_one = {
        "epoch": 3,
        "index": 16,
        "seed": 0,
        "num_windows": 100,
        "batch_size": 8,
        "seq_len": 64,
        "rank": 0,
        "world": 1,
    }
    # 1 -> 2: the same global position, half the batch each
    state = rank_loader_state({"loader": saved_by_one}, 4, layout2)
    assert (state["epoch"], state["index"], state["batch_size"], state["world"], state["rank"]) == (3, 8, 4, 2, 1)
    # 2 -> 1 through the global form a 2-process checkpoint stores
    global_state = global_loader_state(state)
    assert rank_loader_state({"loader": global_state}, 8, layout1)["index"] == 16
    # the same world size takes the rank's own saved state
    mine = dict(state, index=10)
    assert rank_loader_state({"loader": global_state, "ranks": [{"loader": {}}, {"loader": mine}]}, 4, layout2) is mine
    with pytest.raises(MoelabError, match="global batch of 8 sequences, this run has train.batch_size = 12"):
        rank_loader_state({"loader": saved_by_one}, 6, layout2)


def test_optimizer_moments_are_sliced_to_the_local_experts() -> None:
    cfg = tiny("model.vocab_size=260")
    torch.manual_seed(0)
    full = Transformer(cfg.model)
    opt_full = torch.optim.AdamW(full.parameters())
    for p in full.parameters():
        p.grad = torch.randn_like(p)
    opt_full.step()
    torch.manual_seed(0)
    local = Transformer(cfg.model)
    shard_experts(local, shard=1, group=None, group_size=2)
    opt_local = torch.optim.AdamW(local.parameters())
    layout = make_layout(tiny("parallel.expert=2"), 2, 1, 1)
    state = shard_optimizer_state(opt_full.state_dict(), opt_local, local, layout)
    opt_local.load_state_dict(state)
    sharded = set(expert_parallel_param_names(local))
    for (name, p), p_full in zip(local.named_parameters(), full.parameters()):
        moments, full_moments = opt_local.state[p], opt_full.state[p_full]
        want = full_moments["exp_avg"][2:4] if name in sharded else full_moments["exp_avg"]
        assert torch.equal(moments["exp_avg"], want), name
    with pytest.raises(MoelabError, match="optimizer state of .* has shape"):
        shard_optimizer_state(opt_local.state_dict(), opt_local, local, layout)  # already sliced
