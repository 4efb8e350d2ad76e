"""Sharded checkpoints (`train.checkpoint_format = "sharded"`, FSDP on 2 CPU processes with gloo):
every rank writes its shards with torch.distributed.checkpoint, the manifest covers the DCP files,
a write killed midway is ignored, the checkpoint resumes at 2 processes (DCP into the FSDP shards)
and at 1 (read whole without a process group) with the uninterrupted losses, and `moelab
consolidate` turns it into the single-process format (exactly the shards' values; the
single-process run's within tolerance) that `moelab export` reads."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from moelab.checkpoint import is_sharded, manifest_problem, verify_checkpoint
from moelab.cli import main
from moelab.config import load_config
from moelab.distributed.sharded import read_full
from moelab.errors import ConfigError
from moelab.rundir import RunDir
from moelab.train.trainer import Trainer
from tests.distributed.harness import run_workers
from tests.distributed.test_trainer import SETTINGS as DIST_SETTINGS
from tests.distributed.test_trainer import assert_close_by_step, evals, losses

# no bias balancing: export refuses selection biases, and the consolidated run is exported here
SETTINGS = [s for s in DIST_SETTINGS if not s.startswith("model.moe.bias_update_rate")]

SHARDED = ["parallel.data_parallel=fsdp", "train.checkpoint_format=sharded"]
STEP2 = "checkpoints/step_0000002"
STEP4 = "checkpoints/step_0000004"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, token_cache):
    """The uninterrupted single-process run (single format) the sharded runs are compared with."""
    out = tmp_path_factory.mktemp("sharded") / "single"
    Trainer(load_config(preset="tiny", overrides=SETTINGS), out, log=lambda s: None, progress=False).fit()
    return out


def _sharded_runs(rank: int, world: int, fresh: str, resumed: str) -> None:
    cfg = load_config(preset="tiny", overrides=SETTINGS + SHARDED)
    Trainer(cfg, fresh, log=lambda s: None, progress=False).fit()
    # 2 -> 2: the step-2 sharded checkpoint loaded into the FSDP shards (model and optimizer)
    if rank == 0:
        shutil.copytree(fresh, resumed)
        shutil.rmtree(f"{resumed}/{STEP4}")
    dist.barrier()
    trainer = Trainer(RunDir(resumed).load_config(), resumed, resume=True, log=lambda s: None, progress=False)
    assert trainer.step == 2
    trainer.fit()


@pytest.mark.slow
def test_sharded_checkpoints_resume_at_any_world_size_and_consolidate(reference, tmp_path, capsys) -> None:
    fresh, resumed = tmp_path / "fsdp2", tmp_path / "fsdp2-resumed"
    run_workers(_sharded_runs, 2, str(fresh), str(resumed))
    assert_close_by_step(losses(fresh), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(losses(resumed), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(resumed), evals(reference), [2, 4])

    # the format: each rank's .distcp and the .metadata, all in the manifest; no model.safetensors
    ckpt = fresh / STEP2
    manifest = verify_checkpoint(ckpt)
    assert manifest["format"] == "sharded" and is_sharded(ckpt)
    assert set(manifest["files"]) == {"trainer.pt", "dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"}
    assert not (ckpt / "model.safetensors").exists()
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["parallel"] == {"world": 2, "expert": 1} and len(state["ranks"]) == 2

    # consolidation: exactly the shards' values; the single-process run's within tolerance
    out = tmp_path / "consolidated"
    assert main(["consolidate", str(ckpt), str(out)]) == 0
    single = out / STEP2
    verify_checkpoint(single)
    weights = load_file(str(single / "model.safetensors"))
    shards = read_full(ckpt)
    for name, t in weights.items():
        assert torch.equal(t, shards["model"][name]), name
    want = load_file(str(reference / STEP2 / "model.safetensors"))
    assert set(weights) == set(want)
    for name, t in want.items():
        assert torch.allclose(weights[name], t, atol=1e-5, rtol=0), name
    got_opt = torch.load(single / "trainer.pt", weights_only=True)["optimizer"]
    want_opt = torch.load(reference / STEP2 / "trainer.pt", weights_only=True)["optimizer"]
    assert got_opt["param_groups"] == want_opt["param_groups"]
    assert set(got_opt["state"]) == set(want_opt["state"])
    for i, entry in want_opt["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(got_opt["state"][i][key], entry[key], atol=1e-6), (i, key)
        assert float(got_opt["state"][i]["step"]) == float(entry["step"])
    # ... which export reads; the sharded checkpoint itself is refused with the way out
    capsys.readouterr()
    assert main(["export", str(out), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    capsys.readouterr()
    assert main(["export", str(ckpt), str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "moelab consolidate" in err[0], err

    # a write killed midway at step 4 (a temporary folder, never renamed) is ignored: a 1-process
    # resume of the newest checkpoint takes step 2 (read whole) and continues with the same losses
    shutil.copytree(fresh / STEP4, fresh / "checkpoints" / ".tmp-step_0000004-killed")
    (fresh / "checkpoints" / ".tmp-step_0000004-killed" / "manifest.json").unlink()
    shutil.rmtree(fresh / STEP4)
    assert main(["train", "--out", str(fresh), "--resume", "--quiet"]) == 0
    assert not (fresh / "checkpoints" / ".tmp-step_0000004-killed").exists()
    assert_close_by_step(losses(fresh), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(fresh), evals(reference), [2, 4])
    # one process writes the single format whatever train.checkpoint_format says
    assert not is_sharded(fresh / STEP4) and (fresh / STEP4 / "model.safetensors").is_file()

    # a sharded checkpoint of another model: one line naming the mismatch, exit 2
    other = tmp_path / "other"
    shutil.copytree(fresh, other)
    shutil.rmtree(other / STEP4)
    config = (other / "config.toml").read_text()
    assert "num_experts = 4" in config
    (other / "config.toml").write_text(config.replace("num_experts = 4", "num_experts = 8"))
    capsys.readouterr()
    assert main(["consolidate", str(other / STEP2), str(tmp_path / "other-out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit this model" in err[0] and "has shape" in err[0], err
    assert not (tmp_path / "other-out").exists()


def test_sharded_format_needs_fsdp() -> None:
    with pytest.raises(ConfigError, match="train.checkpoint_format = 'sharded' is not allowed"):
        load_config(preset="tiny", overrides=["train.checkpoint_format=sharded"])
    with pytest.raises(ConfigError, match="single or sharded"):
        load_config(preset="tiny", overrides=["train.checkpoint_format=zip"])
    cfg = load_config(preset="tiny", overrides=SHARDED)
    assert cfg.train.checkpoint_format == "sharded"
    assert load_config(preset="tiny").train.checkpoint_format == "single"


def test_sharded_manifest_names() -> None:
    digest = {"sha256": "0" * 64, "bytes": 1}
    files = {"trainer.pt": digest, "dcp/.metadata": digest, "dcp/__0_0.distcp": digest}
    assert manifest_problem({"step": 2, "format": "sharded", "files": files}, 2) is None
    # the single format still needs its weights, and DCP names only inside a sharded checkpoint
    assert manifest_problem({"step": 2, "files": files}, 2) == "lists no model.safetensors"
    for bad in ("dcp/../x", "dcp/.hidden", "other/__0_0.distcp", "dcp/"):
        problem = manifest_problem({"step": 2, "format": "sharded", "files": {**files, bad: digest}}, 2)
        assert problem is not None and "outside the checkpoint" in problem, bad
    problem = manifest_problem({"step": 2, "format": "sharded", "files": {"trainer.pt": digest}}, 2)
    assert problem == "lists no dcp/.metadata"


def _failing_rank0_write(rank: int, world: int, out: str, fmt: str) -> str:
    """Train with rank 0's checkpoint write failing (a full disk, say); return what each rank raised."""
    import moelab.distributed.checkpoint as gathered
    import moelab.distributed.sharded as sharded

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if rank == 0:  # only rank 0 touches the run directory's checkpoints
        if fmt == "sharded":
            sharded.begin_checkpoint = disk_full
        else:
            gathered.save_checkpoint = disk_full
    overrides = SETTINGS + ["parallel.data_parallel=fsdp", f"train.checkpoint_format={fmt}"]
    try:
        Trainer(load_config(preset="tiny", overrides=overrides), out, log=lambda s: None, progress=False).fit()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["sharded", "single"])
def test_a_failed_checkpoint_write_on_rank_0_stops_every_rank_with_its_reason(fmt, tmp_path, token_cache) -> None:
    # without the broadcast of rank 0's outcome the other rank waits in the next collective until
    # the harness's timeout (or returns as if the checkpoint existed)
    outcomes = run_workers(_failing_rank0_write, 2, str(tmp_path / "run"), fmt, timeout=120)
    assert all("No space left on device" in o for o in outcomes), outcomes
    assert "rank 0" in outcomes[1]
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))
