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


# ---------------------------------------------------------------------------------------------
# Run directories are never stranded, and a resume logs what an uninterrupted run logs

INTERVAL_SETTINGS = [
    "train.max_steps=12",
    "train.log_every=4",
    "train.eval_every=4",
    "train.checkpoint_every=3",
    "train.sample_tokens=0",
]


def training_rows(run) -> list[dict]:
    """metrics.jsonl's training lines without the wall-clock fields."""
    timing = {"tokens_per_s", "train_s", "elapsed_s"}
    return [{k: v for k, v in r.items() if k not in timing} for r in RunDir(run).read_metrics() if "loss" in r]


def test_resume_inside_a_logging_interval_logs_what_an_uninterrupted_run_logs(tmp_path) -> None:
    """Checkpoint at step 6, logging every 4 steps: the line at step 8 averages steps 5-8 in both."""
    straight = tmp_path / "straight"
    quiet(load_config(preset="tiny", overrides=INTERVAL_SETTINGS), straight).fit()
    split = tmp_path / "split"
    quiet(load_config(preset="tiny", overrides=INTERVAL_SETTINGS), split).fit(stop_at=6)
    quiet(RunDir(split).load_config(), split, resume=True).fit()
    assert [r["step"] for r in training_rows(split)] == [4, 8, 12]
    assert training_rows(split) == training_rows(straight)  # exact, every field but the timings


def test_resuming_a_finished_run_changes_nothing(tmp_path) -> None:
    run = tmp_path / "run"
    first = quiet(load_config(preset="tiny", overrides=INTERVAL_SETTINGS), run).fit()
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    for _ in range(2):
        again = quiet(RunDir(run).load_config(), run, resume=True).fit()
        assert again == first
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints


def test_a_run_that_stopped_before_its_first_checkpoint_starts_again_in_place(tmp_path) -> None:
    run = tmp_path / "run"
    cfg = load_config(preset="tiny", overrides=INTERVAL_SETTINGS)
    quiet(cfg, run)  # set up (directory, config, tokenizer) and then "crash" before fit's first checkpoint
    (run / "metrics.jsonl").write_text('{"step": 0, "val_loss": 9.9}\n')  # a line of the failed attempt
    assert RunDir(run).is_run() and not RunDir(run).checkpoints()
    with pytest.raises(Exception, match="continue it with --resume"):
        quiet(load_config(preset="tiny", overrides=INTERVAL_SETTINGS), run)
    said: list[str] = []
    Trainer(RunDir(run).load_config(), run, resume=True, log=said.append, progress=False).fit()
    assert any("starting it from step 0" in s for s in said)
    clean = tmp_path / "clean"
    quiet(load_config(preset="tiny", overrides=INTERVAL_SETTINGS), clean).fit()
    assert training_rows(run) == training_rows(clean)
    assert [r["val_loss"] for r in RunDir(run).read_metrics() if r.get("step") == 0] == [
        r["val_loss"] for r in RunDir(clean).read_metrics() if r.get("step") == 0
    ]


def test_a_checkpoint_write_killed_midway_leaves_a_run_that_resumes(tmp_path) -> None:
    run = tmp_path / "run"
    quiet(load_config(preset="tiny", overrides=INTERVAL_SETTINGS), run).fit(stop_at=6)
    half = run / "checkpoints" / ".tmp-step_0000009-x1y2"  # what a kill -9 inside save_checkpoint leaves
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 100)
    said: list[str] = []
    result = Trainer(RunDir(run).load_config(), run, resume=True, log=said.append, progress=False).fit()
    assert result.step == 12 and not half.exists()
    assert any("unfinished checkpoint write" in s for s in said)


def test_a_trainer_state_that_cannot_load_offers_the_previous_checkpoint(tmp_path) -> None:
    import hashlib

    run = tmp_path / "run"
    quiet(load_config(preset="tiny", overrides=INTERVAL_SETTINGS), run).fit(stop_at=6)
    newest = list_checkpoints(run)[-1]
    (newest / "trainer.pt").write_bytes(b"garbage that is no pickle")
    manifest = json.loads((newest / "manifest.json").read_text())
    data = (newest / "trainer.pt").read_bytes()
    manifest["files"]["trainer.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (newest / "manifest.json").write_text(json.dumps(manifest))  # verification passes; loading must not
    with pytest.raises(CheckpointError) as err:
        quiet(RunDir(run).load_config(), run, resume=True)
    text = str(err.value)
    assert "cannot be loaded" in text and "previous good checkpoint is" in text and "weights_only" not in text
