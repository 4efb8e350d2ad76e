"""`moelab train` on 2 CPU processes (gloo): the same losses as one process, rank-0-only output, and
checkpoints that resume at another world size (2 -> 1 and 1 -> 2) with the next steps' losses of the
uninterrupted run. The 2-process runs use torchrun (the command line) or spawned workers (the API)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from moelab.cli import main
from moelab.config import load_config
from moelab.infer.generate import training_sample
from moelab.rundir import RunDir
from moelab.train.trainer import Trainer
from tests.distributed.harness import run_workers, torchrun

TOL = 1e-5
SETTINGS = [
    "train.max_steps=4",
    "train.log_every=1",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=3",
    "train.eval_batches=2",
    "train.sample_tokens=0",
    "train.grad_accum=2",
    "model.moe.bias_update_rate=0.01",
    "data.seq_len=32",
]


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunDir(run).read_metrics() if "loss" in r}


def evals(run) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in RunDir(run).read_metrics() if "val_loss" in r}


def assert_close_by_step(got: dict[int, float], want: dict[int, float], steps) -> None:
    for step in steps:
        assert abs(got[step] - want[step]) <= TOL, (step, got[step], want[step])
    print("max difference over steps", list(steps), max(abs(got[s] - want[s]) for s in steps))  # shown with -s


@pytest.fixture(scope="module")
def reference(tmp_path_factory, token_cache):
    """The uninterrupted single-process run every distributed run is compared with."""
    out = tmp_path_factory.mktemp("dist") / "single"
    Trainer(load_config(preset="tiny", overrides=SETTINGS), out, log=lambda s: None, progress=False).fit()
    return out


@pytest.mark.slow
def test_torchrun_expert_parallel_matches_one_process_and_resumes_on_one(reference, tmp_path) -> None:
    run = tmp_path / "ep2"
    args = ["-m", "moelab", "train", "--preset", "tiny", "--quiet", "--out", str(run), "--set", "parallel.expert=2"]
    for s in SETTINGS:
        args += ["--set", s]
    proc = torchrun(args, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone reports and writes metrics: one summary line, one metrics line per step
    assert proc.stdout.count("finished at step 4") == 1, proc.stdout
    rows = RunDir(run).read_metrics()
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert_close_by_step(losses(run), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(run), evals(reference), [0, 2, 4])
    single = {r["step"]: r for r in RunDir(reference).read_metrics() if "loss" in r}
    for r in rows:
        if "loss" in r:
            for key in ("grad_norm", "aux_loss", "router.0.entropy", "router.1.z_loss", "router.1.similarity_max"):
                assert abs(r[key] - single[r["step"]][key]) <= TOL, (key, r[key], single[r["step"]][key])
            assert r["router.0.tokens"] == single[r["step"]]["router.0.tokens"]
            assert r["router.1.share"] == pytest.approx(single[r["step"]]["router.1.share"], abs=TOL)
    assert json.loads((run / "summary.json").read_text())["parallel"] == {"world": 2, "expert": 2}

    # the checkpoint is in the single-process format: full experts, global loader position
    ckpt = run / "checkpoints" / "step_0000002"
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("blocks.0.ffn.experts.gate_up_proj").get_shape() == [4, 128, 64]
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["parallel"] == {"world": 2, "expert": 2} and len(state["ranks"]) == 2
    assert state["loader"]["world"] == 1 and state["loader"]["batch_size"] == 8
    assert [r["loader"]["rank"] for r in state["ranks"]] == [0, 1]

    # 2 -> 1: one process continues from step 2 with the uninterrupted run's losses
    assert main(["train", "--out", str(run), "--resume", str(ckpt), "--quiet", "--set", "parallel.expert=1"]) == 0
    assert_close_by_step(losses(run), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(run), evals(reference), [2, 4])


def _resume_on_two(rank: int, world: int, run: str, checkpoint: str, fresh_out: str) -> dict:
    cfg = RunDir(run).load_config()
    cfg.parallel.expert = 2  # 1 -> 2, and the experts re-split over the two ranks
    trainer = Trainer(cfg, run, resume=checkpoint, log=lambda s: None, progress=False)
    assert trainer.step == 2
    trainer.fit()
    # the same world size, data parallel only (every rank holds every expert), with a sample
    dp_cfg = load_config(preset="tiny", overrides=SETTINGS + ["train.sample_tokens=4"])
    dp = Trainer(dp_cfg, fresh_out, log=lambda s: None, progress=False, sampler=training_sample).fit()
    return {"sample": dp.sample, "val_loss": dp.val_loss}


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_and_data_parallel_matches(reference, tmp_path) -> None:
    run = tmp_path / "single-copy"
    shutil.copytree(reference, run)
    fresh = tmp_path / "dp2"
    results = run_workers(_resume_on_two, 2, str(run), str(run / "checkpoints" / "step_0000002"), str(fresh))
    # 1 -> 2 continues with the uninterrupted losses
    assert_close_by_step(losses(run), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(run), evals(reference), [2, 4])
    # plain data parallelism on 2 processes: the same run as one process
    assert_close_by_step(losses(fresh), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(fresh), evals(reference), [0, 2, 4])
    assert results[0]["val_loss"] == results[1]["val_loss"]
    assert results[0]["sample"] and results[1]["sample"] == ""  # rank 0 alone samples
    assert not any(p.name.startswith(".") for p in (fresh / "checkpoints").iterdir())


@pytest.mark.slow
def test_torchrun_bad_layout_fails_every_rank_with_one_message(tmp_path) -> None:
    run = tmp_path / "bad"
    proc = torchrun(
        [
            "-m",
            "moelab",
            "train",
            "--preset",
            "tiny",
            "--out",
            str(run),
            "--set",
            "model.moe.num_experts=8",
            "--set",
            "parallel.expert=4",
        ],
        nproc=2,
        timeout=120,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moelab: error:")]
    assert errors == [
        "moelab: error: the world size 2 is not a multiple of parallel.expert = 4: launch a multiple of it"
    ], proc.stderr[-2000:]
    assert not run.exists()  # no process started any work


def test_expert_parallelism_without_torchrun_says_how_to_launch(tmp_path, capsys) -> None:
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "x"), "--set", "parallel.expert=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "moelab: error: the world size 1 is not a multiple of parallel.expert = 2: launch with torchrun --nproc-per-node N (N a multiple of it)"
    ]
    assert not (tmp_path / "x").exists()
