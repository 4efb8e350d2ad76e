"""FSDP2 (`parallel.data_parallel = "fsdp"`) on 2 CPU processes (gloo): the losses, gradient norms
and router statistics of one process (hence of DDP, tests/distributed/test_trainer.py) over several
optimizer steps with gradient accumulation, and checkpoints in the single-process format that resume
at another world size (2 -> 1 and 1 -> 2) with the uninterrupted run's next losses."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from moelab.cli import main
from moelab.config import load_config
from moelab.errors import ConfigError
from moelab.rundir import RunDir
from moelab.train.trainer import Trainer
from tests.distributed.harness import run_workers
from tests.distributed.test_trainer import SETTINGS, assert_close_by_step, evals, losses

FSDP = ["parallel.data_parallel=fsdp"]
KEYS = ("grad_norm", "aux_loss", "router.0.entropy", "router.1.z_loss", "router.1.similarity_max")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, token_cache):
    """The uninterrupted single-process run the FSDP runs are compared with."""
    out = tmp_path_factory.mktemp("fsdp") / "single"
    Trainer(load_config(preset="tiny", overrides=SETTINGS), out, log=lambda s: None, progress=False).fit()
    return out


def _fsdp_runs(rank: int, world: int, fresh: str, resumed: str, checkpoint: str) -> dict:
    # a new run under FSDP
    cfg = load_config(preset="tiny", overrides=SETTINGS + FSDP)
    result = Trainer(cfg, fresh, log=lambda s: None, progress=False).fit()
    # 1 -> 2: a single-process checkpoint continued under FSDP
    cfg = RunDir(resumed).load_config()
    cfg.parallel.data_parallel = "fsdp"
    trainer = Trainer(cfg, resumed, resume=checkpoint, log=lambda s: None, progress=False)
    assert trainer.step == 2
    trainer.fit()
    return {"val_loss": result.val_loss}


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_across_world_sizes(reference, tmp_path) -> None:
    fresh = tmp_path / "fsdp2"
    resumed = tmp_path / "single-copy"
    shutil.copytree(reference, resumed)
    results = run_workers(_fsdp_runs, 2, str(fresh), str(resumed), str(resumed / "checkpoints" / "step_0000002"))
    assert results[0]["val_loss"] == results[1]["val_loss"]

    # 4 optimizer steps of 2 micro-batches: the single-process losses, norms and router statistics
    assert_close_by_step(losses(fresh), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(fresh), evals(reference), [0, 2, 4])
    single = {r["step"]: r for r in RunDir(reference).read_metrics() if "loss" in r}
    for r in RunDir(fresh).read_metrics():
        if "loss" in r:
            for key in KEYS:
                assert abs(r[key] - single[r["step"]][key]) <= 1e-5, (key, r[key], single[r["step"]][key])
            assert r["router.0.tokens"] == single[r["step"]]["router.0.tokens"]
    assert json.loads((fresh / "summary.json").read_text())["parallel"] == {
        "world": 2,
        "expert": 1,
        "data_parallel": "fsdp",
    }
    # 1 -> 2 continued with the uninterrupted losses
    assert_close_by_step(losses(resumed), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(resumed), evals(reference), [2, 4])

    # the checkpoint is the single-process format: full tensors, one loader position
    ckpt = fresh / "checkpoints" / "step_0000002"
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("blocks.0.ffn.experts.gate_up_proj").get_shape() == [4, 128, 64]
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["parallel"] == {"world": 2, "expert": 1} and len(state["ranks"]) == 2
    single_state = torch.load(reference / "checkpoints" / "step_0000002" / "trainer.pt", weights_only=True)
    want, got = single_state["optimizer"], state["optimizer"]
    assert got["param_groups"] == want["param_groups"]
    assert {i: {k: v.shape for k, v in e.items()} for i, e in got["state"].items()} == {
        i: {k: v.shape for k, v in e.items()} for i, e in want["state"].items()
    }
    for i, entry in want["state"].items():
        assert torch.allclose(got["state"][i]["exp_avg"], entry["exp_avg"], atol=1e-6), i

    # 2 -> 1: one process continues from step 2 with the uninterrupted run's losses
    assert (
        main(["train", "--out", str(fresh), "--resume", str(ckpt), "--quiet", "--set", "parallel.data_parallel=ddp"])
        == 0
    )
    assert_close_by_step(losses(fresh), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(fresh), evals(reference), [2, 4])


def test_fsdp_settings_that_do_not_work_are_refused() -> None:
    # (fsdp with parallel.expert > 1 works: tests/distributed/test_fsdp_ep.py)
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny", overrides=["parallel.data_parallel=fsdp", "train.compile=true"])
    assert str(err.value) == (
        "train.compile = True is not allowed: false with parallel.data_parallel = 'fsdp' (the combination is not tested)"
    )
    with pytest.raises(ConfigError, match="parallel.data_parallel = 'zero' is not allowed: ddp or fsdp"):
        load_config(preset="tiny", overrides=["parallel.data_parallel=zero"])


def test_fsdp_refusal_exits_2_with_one_line(tmp_path, capsys) -> None:
    out = tmp_path / "x"
    args = ["train", "--preset", "tiny", "--out", str(out), "--set", "parallel.data_parallel=fsdp"]
    assert main(args + ["--set", "train.compile=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.compile = True is not allowed" in err[0], err
    assert not out.exists()


def _fsdp_checkpointed(rank: int, world: int, out: str) -> None:
    cfg = load_config(
        preset="tiny", overrides=SETTINGS + FSDP + ["train.activation_checkpointing=true", "train.max_steps=2"]
    )
    Trainer(cfg, out, log=lambda s: None, progress=False).fit()


@pytest.mark.slow
def test_fsdp_with_activation_checkpointing_matches_one_process(reference, tmp_path) -> None:
    run_workers(_fsdp_checkpointed, 2, str(tmp_path / "ac"))
    assert_close_by_step(losses(tmp_path / "ac"), losses(reference), [1, 2])
