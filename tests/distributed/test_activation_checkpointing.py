"""Activation checkpointing under torchrun-style data and expert parallelism (2 gloo processes): the
recomputation repeats the layer's collectives on every rank, and losses, gradients, statistics and
weights still equal one process's (the one-process model checkpoints too; that checkpointing
changes nothing in one process is tests/model/test_activation_checkpointing.py)."""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_workers


def _checkpointed_model_worker(rank: int, world: int, expert: int, steps: int) -> dict:
    import tests.distributed.test_expert_parallel as ep

    plain = ep.Transformer

    class Checkpointed(plain):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.activation_checkpointing = True

    ep.Transformer = Checkpointed  # this worker process only: both models of the comparison
    return ep._model_worker(rank, world, expert, steps)


@pytest.mark.slow
@pytest.mark.parametrize("expert", [2, 1], ids=["expert-parallel-2", "data-parallel-2"])
def test_checkpointed_training_steps_equal_one_process(expert: int) -> None:
    from tests.distributed.test_expert_parallel import TOL, TOL_WEIGHTS

    for rank, diffs in enumerate(run_workers(_checkpointed_model_worker, 2, expert, 3, timeout=300)):
        bad = {k: v for k, v in diffs.items() if not v <= (TOL_WEIGHTS if k == "weights after steps" else TOL)}
        assert not bad, f"rank {rank}: {bad}"
