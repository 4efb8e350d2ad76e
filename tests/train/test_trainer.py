"""End-to-end training on the tiny preset: learning happens, resume is exact, damage is refused."""

from __future__ import annotations

import json

import pytest

from moelab.checkpoint import list_checkpoints
from moelab.config import load_config
from moelab.errors import CheckpointError
from moelab.rundir import RunDir
from moelab.train.trainer import Trainer


def quiet(cfg, out, **kwargs):
    return Trainer(cfg, out, log=lambda s: None, progress=False, **kwargs)


def losses(run) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in RunDir(run).read_metrics() if "loss" in r]


def test_tiny_training_loss_falls_well_below_its_start(tmp_path) -> None:
    cfg = load_config(preset="tiny")
    result = quiet(cfg, tmp_path / "run").fit()
    evals = [r["val_loss"] for r in RunDir(tmp_path / "run").read_metrics() if "val_loss" in r]
    assert evals[0] > 5.0  # about ln(260) before training
    assert result.val_loss < 0.65 * evals[0]
    assert result.step == cfg.train.max_steps
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_loss"] == result.val_loss


RESUME_SETTINGS = [
    "train.max_steps=16",
    "train.log_every=1",
    "train.eval_every=4",
    "train.checkpoint_every=4",
    "train.sample_tokens=0",
    "train.grad_accum=2",
    "model.moe.bias_update_rate=0.01",
    "model.moe.jitter=0.1",
]


def test_resume_gives_bit_identical_losses(tmp_path) -> None:
    straight = tmp_path / "straight"
    quiet(load_config(preset="tiny", overrides=RESUME_SETTINGS), straight).fit()
    split = tmp_path / "split"
    first = quiet(load_config(preset="tiny", overrides=RESUME_SETTINGS), split).fit(stop_at=6)
    assert first.step == 6 and first.stopped_by == "stop_at"
    resumed = quiet(RunDir(split).load_config(), split, resume=True)
    assert resumed.step == 6
    resumed.fit()
    assert losses(split) == losses(straight)  # exact float equality, every step
    # evaluations on the shared schedule agree too (the split run also evaluated when it stopped)
    evals = lambda run: [
        (r["step"], r["val_loss"]) for r in RunDir(run).read_metrics() if "val_loss" in r and r["step"] % 4 == 0
    ]
    assert evals(split) == evals(straight)


def test_damaged_checkpoint_is_refused_naming_the_file_and_offering_the_previous(tmp_path) -> None:
    run = tmp_path / "run"
    quiet(
        load_config(
            preset="tiny",
            overrides=[
                "train.max_steps=8",
                "train.checkpoint_every=4",
                "train.keep_checkpoints=3",
                "train.sample_tokens=0",
            ],
        ),
        run,
    ).fit()
    checkpoints = list_checkpoints(run)
    assert [c.name for c in checkpoints] == ["step_0000000", "step_0000004", "step_0000008"]
    weights = checkpoints[-1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        quiet(RunDir(run).load_config(), run, resume=True)
    message = str(info.value)
    assert str(weights) in message and "sha256" in message
    assert str(checkpoints[-2]) in message  # the previous good one is offered
    # resuming from the offered checkpoint works
    trainer = quiet(RunDir(run).load_config(), run, resume=checkpoints[-2])
    assert trainer.step == 4


def test_incomplete_checkpoint_is_refused(tmp_path) -> None:
    run = tmp_path / "run"
    quiet(
        load_config(
            preset="tiny", overrides=["train.max_steps=4", "train.checkpoint_every=2", "train.sample_tokens=0"]
        ),
        run,
    ).fit()
    latest = list_checkpoints(run)[-1]
    (latest / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete.*manifest.json is missing"):
        quiet(RunDir(run).load_config(), run, resume=True)


def test_checkpoints_keep_the_last_k(tmp_path) -> None:
    run = tmp_path / "run"
    quiet(
        load_config(
            preset="tiny",
            overrides=[
                "train.max_steps=12",
                "train.checkpoint_every=2",
                "train.keep_checkpoints=2",
                "train.sample_tokens=0",
            ],
        ),
        run,
    ).fit()
    assert [c.name for c in list_checkpoints(run)] == ["step_0000010", "step_0000012"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
