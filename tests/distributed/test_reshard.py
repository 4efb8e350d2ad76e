"""Resharding sharded (DCP) checkpoints at 4 processes (FSDP, gloo on CPU; issue #20): a 4-process
FSDP run has the losses of one process, and its step-2 sharded checkpoint resumes at 2 processes
(DCP reshards 4 -> 2 on load: weights and AdamW moments) and at 1 process (read whole) with the
uninterrupted run's next losses. Kept as small as the tiny model allows: 4 processes share 2 cores.
(1 -> 2, a single-format checkpoint continued under FSDP, is tests/distributed/test_fsdp.py.)"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed as dist

from moelab.cli import main
from moelab.config import load_config
from moelab.rundir import RunDir
from moelab.train.trainer import Trainer
from tests.distributed.harness import run_workers
from tests.distributed.test_trainer import assert_close_by_step, evals, losses

# batch 8 (tiny): 2 sequences per rank at 4 processes, 4 at 2
SETTINGS = [
    "train.max_steps=4",
    "train.log_every=1",
    "train.eval_every=4",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=3",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "data.seq_len=16",
]
SHARDED = ["parallel.data_parallel=fsdp", "train.checkpoint_format=sharded"]
STEP2 = "checkpoints/step_0000002"
STEP4 = "checkpoints/step_0000004"


def _fsdp4(rank: int, world: int, out: str) -> None:
    Trainer(load_config(preset="tiny", overrides=SETTINGS + SHARDED), out, log=lambda s: None, progress=False).fit()


def _resume(rank: int, world: int, run: str) -> None:
    trainer = Trainer(RunDir(run).load_config(), run, resume=True, log=lambda s: None, progress=False)
    assert trainer.step == 2
    trainer.fit()


def _copy_at_step2(src, dst) -> None:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / STEP4)


@pytest.mark.slow
def test_sharded_checkpoint_of_4_processes_resumes_at_2_and_1(tmp_path, token_cache) -> None:
    reference = tmp_path / "single"
    Trainer(load_config(preset="tiny", overrides=SETTINGS), reference, log=lambda s: None, progress=False).fit()

    fresh = tmp_path / "fsdp4"
    run_workers(_fsdp4, 4, str(fresh), timeout=300.0)
    assert_close_by_step(losses(fresh), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(fresh), evals(reference), [0, 4])
    ckpt = fresh / STEP2
    assert {p.name for p in (ckpt / "dcp").iterdir()} == {".metadata"} | {f"__{r}_0.distcp" for r in range(4)}
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["parallel"] == {"world": 4, "expert": 1} and len(state["ranks"]) == 4

    # 4 -> 2: every rank loads its shards of the new layout (model and optimizer moments)
    at2 = tmp_path / "fsdp4-at2"
    _copy_at_step2(fresh, at2)
    run_workers(_resume, 2, str(at2), timeout=300.0)
    assert_close_by_step(losses(at2), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(at2), evals(reference), [4])
    assert dist.is_available() and not dist.is_initialized()

    # 4 -> 1: one process reads the whole state
    at1 = tmp_path / "fsdp4-at1"
    _copy_at_step2(fresh, at1)
    assert main(["train", "--out", str(at1), "--resume", "--quiet"]) == 0
    assert_close_by_step(losses(at1), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(at1), evals(reference), [4])
