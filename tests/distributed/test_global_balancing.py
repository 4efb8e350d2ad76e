"""Global-batch balancing (train.balance_scope = "step") across 2 gloo processes with gradient
accumulation: the step's Switch loss, averaged over ranks, equals one forward over the global batch."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_workers
from tests.train.test_balance import balancing_moe, switch_reference

ROWS_PER_RANK, MICRO_BATCHES = 20, 2


def global_batch() -> torch.Tensor:
    return torch.randn(2 * ROWS_PER_RANK, 16, generator=torch.Generator().manual_seed(8))


def _worker(rank: int, world: int) -> float:
    from moelab.distributed import data_parallel as dp

    moe = balancing_moe(9)  # the same weights on every rank
    dp.install_global_balancing(moe)
    moe.balance_over_step = True
    moe.start_step()
    mine = global_batch()[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
    for chunk in mine.chunk(MICRO_BATCHES):
        moe(chunk[None])
    return moe.step_balance_loss()


def test_step_balance_loss_over_two_processes_equals_the_global_batch_value() -> None:
    per_rank = run_workers(_worker, 2, timeout=120)
    _, reference = switch_reference(balancing_moe(9), global_batch())
    assert sum(per_rank) / 2 == pytest.approx(reference, rel=1e-5)
    assert per_rank[0] != pytest.approx(per_rank[1], rel=1e-3)  # each rank's own probabilities
