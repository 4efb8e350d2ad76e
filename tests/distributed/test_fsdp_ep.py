"""FSDP2 with expert parallelism (`parallel.data_parallel = "fsdp"`, `parallel.expert = P`; issue #20)
on gloo CPU processes, against one process on the global batch:

* the layout: dense parameters sharded over all ranks, each rank's E / P experts sharded over the
  replica ranks only (4 processes: P = 2 x 2 replicas; 2 processes: P = 2, 1 replica);
* training steps: losses, every parameter's gradient, gradient norms, router health and the weights
  after AdamW steps equal one process's;
* the trainer (at 2 processes with activation checkpointing): losses and norms by step; the single-process checkpoint format (experts gathered to
  [E, ...]) resumes at 1 process and a one-process checkpoint resumes under FSDP + EP; sharded (DCP)
  checkpoints resume at the same layout, at another world and expert-parallel size and in one
  process with the uninterrupted losses, and `moelab consolidate` writes exactly their weights;
* bad layouts fail on every rank with one line and exit 2, before any work.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from moelab.cli import main
from moelab.config import load_config
from moelab.distributed.expert_parallel import expert_parallel_param_names, gather_rows
from moelab.distributed.layout import make_layout
from moelab.distributed.runtime import Distributed
from moelab.distributed.sharded import read_full
from moelab.model import Transformer
from moelab.model.health import health_to_metrics, router_health
from moelab.rundir import RunDir
from moelab.train.trainer import Trainer
from tests.distributed.harness import run_workers
from tests.distributed.test_expert_parallel import TOL, TOL_WEIGHTS, _max_diff, _run_config
from tests.distributed.test_trainer import assert_close_by_step, evals, losses

# ---------------------------------------------------------------------------------------------
# Model level: gradients of every parameter


def _full(t: torch.Tensor, expert_rows: bool, d: Distributed) -> torch.Tensor:
    """The whole tensor of a sharded parameter (or gradient), on every rank."""
    t = t.detach()
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return gather_rows(t, d.expert_group, d.layout.expert, dst_global=None) if expert_rows else t


def _fsdp_ep_model_worker(rank: int, world: int, expert: int, steps: int) -> dict:
    cfg = _run_config(world, expert)
    cfg.parallel.data_parallel = "fsdp"
    cfg.validate()
    d = Distributed(make_layout(cfg, world, rank, rank), torch.device("cpu"), "fsdp")
    torch.manual_seed(0)
    ref = Transformer(cfg.model)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    d.shard(model)
    train_model = d.wrap(model)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # after sharding: moments are shards too
    experts = set(expert_parallel_param_names(model))
    params = dict(model.named_parameters())

    # the layout: dense parameters over all ranks, expert rows over this rank's replicas only
    replicas = [r for r in range(world) if r % expert == rank % expert]
    layout = {
        "dense meshes": sorted({str(p.device_mesh.mesh.tolist()) for n, p in params.items() if n not in experts}),
        "expert mesh": params["blocks.0.ffn.experts.gate_up_proj"].device_mesh.mesh.tolist(),
        "expert local rows": params["blocks.0.ffn.experts.gate_up_proj"].to_local().shape[0],
        "replicas": replicas,
    }

    B, S = cfg.train.batch_size, 12
    per = B // world
    gen = torch.Generator().manual_seed(5)
    diffs: dict[str, float] = {}

    def note(key: str, value: float) -> None:
        diffs[key] = max(diffs.get(key, 0.0), value)

    for _ in range(steps):
        tokens = torch.randint(0, 64, (B, S + 1), generator=gen)
        x, y = tokens[:, :-1], tokens[:, 1:]
        out = ref(x)
        loss_ref = F.cross_entropy(out.logits.reshape(-1, 64), y.reshape(-1))
        (loss_ref + out.aux_loss).backward()
        norm_ref = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0))

        mine = slice(rank * per, (rank + 1) * per)
        out_local = train_model(x[mine])
        loss = F.cross_entropy(out_local.logits.reshape(-1, 64), y[mine].reshape(-1))
        (loss + out_local.aux_loss).backward()
        d.finish_backward(model)
        # gradients before clipping (the reference's are clipped in place: compare after both clip)
        norm = d.clip_grad_norm(model, 1.0)
        loss_mean, aux_mean = d.mean(float(loss.detach()), float(out_local.aux_loss.detach()))
        note("loss", abs(loss_mean - float(loss_ref.detach())))
        note("aux_loss", abs(aux_mean - float(out.aux_loss.detach())))
        note("grad_norm", abs(norm - norm_ref))
        for name, p_ref in ref.named_parameters():
            p = params[name]
            note("grad " + name, _max_diff(_full(p.grad, name in experts, d), p_ref.grad))
        health = health_to_metrics(d.router_health(model, with_similarity=True))
        health_ref = health_to_metrics(router_health(ref, ref.router_stats(), True))
        assert health.keys() == health_ref.keys()
        for key, value in health_ref.items():
            got, want = (torch.tensor(v, dtype=torch.float64) for v in (health[key], value))
            note("health " + key, _max_diff(got, want))
        opt_ref.step(), opt.step()
        opt_ref.zero_grad(), opt.zero_grad()
        ref.update_router_biases()
        d.update_router_biases(model)
    for name, p_ref in ref.named_parameters():
        note("weights after steps", _max_diff(_full(params[name], name in experts, d), p_ref))
    return {"diffs": diffs, "layout": layout}


def _check_model_worker(results: list[dict], world: int, expert: int) -> None:
    for rank, result in enumerate(results):
        layout = result["layout"]
        assert layout["dense meshes"] == [str(list(range(world)))], layout
        assert layout["expert mesh"] == layout["replicas"] == list(range(rank % expert, world, expert)), layout
        # 4 experts over P ranks, each block FSDP-split over the W / P replicas
        assert layout["expert local rows"] == 4 // expert // (world // expert), layout
        diffs = result["diffs"]
        bad = {k: v for k, v in diffs.items() if not v <= (TOL_WEIGHTS if k == "weights after steps" else TOL)}
        assert not bad, f"rank {rank}: {bad}"
        assert any(k.startswith("grad blocks.0.ffn.experts") for k in diffs)


# ---------------------------------------------------------------------------------------------
# The trainer: metrics and checkpoints

SETTINGS = [
    "train.max_steps=4",
    "train.log_every=1",
    "train.eval_every=4",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=3",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "train.grad_accum=2",
    "model.moe.bias_update_rate=0.01",
    "data.seq_len=16",
]
FSDP_EP = ["parallel.data_parallel=fsdp", "parallel.expert=2"]
SHARDED = ["train.checkpoint_format=sharded"]
KEYS = ("grad_norm", "aux_loss", "router.0.entropy", "router.1.z_loss", "router.1.similarity_max")
STEP2 = "checkpoints/step_0000002"
STEP4 = "checkpoints/step_0000004"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, token_cache):
    """The uninterrupted single-process run every run here is compared with."""
    out = tmp_path_factory.mktemp("fsdp-ep") / "single"
    Trainer(load_config(preset="tiny", overrides=SETTINGS), out, log=lambda s: None, progress=False).fit()
    return out


def _assert_metrics_match(run, reference) -> None:
    assert_close_by_step(losses(run), losses(reference), [1, 2, 3, 4])
    single = {r["step"]: r for r in RunDir(reference).read_metrics() if "loss" in r}
    for r in RunDir(run).read_metrics():
        if "loss" in r:
            for key in KEYS:
                assert abs(r[key] - single[r["step"]][key]) <= TOL, (key, r["step"], r[key], single[r["step"]][key])
            assert r["router.0.tokens"] == single[r["step"]]["router.0.tokens"]


def _assert_weights_match(checkpoint, reference_checkpoint) -> None:
    got, want = (
        load_file(str(checkpoint / "model.safetensors")),
        load_file(str(reference_checkpoint / "model.safetensors")),
    )
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].shape == t.shape, name
        assert _max_diff(got[name], t) <= TOL_WEIGHTS, name


def _copy_at_step2(src, dst) -> None:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / STEP4)


def _resume(rank: int, world: int, run: str, overrides: list[str]) -> None:
    cfg = RunDir(run).load_config()
    for item in overrides:
        key, value = item.split("=")
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, type(getattr(getattr(cfg, section), field))(value))
    trainer = Trainer(cfg, run, resume=True, log=lambda s: None, progress=False)
    assert trainer.step == 2
    trainer.fit()


def _four_process_session(rank: int, world: int, fresh: str, same: str) -> dict:
    """Every 4-process check in one session (starting 4 processes on 2 cores costs more than the checks)."""
    model = _fsdp_ep_model_worker(rank, world, 2, 2)
    cfg = load_config(preset="tiny", overrides=SETTINGS + FSDP_EP + SHARDED)
    Trainer(cfg, fresh, log=lambda s: None, progress=False).fit()
    if rank == 0:
        _copy_at_step2(Path(fresh), Path(same))
    dist.barrier()
    _resume(rank, world, same, [])  # 4 -> 4, the same layout: DCP into the FSDP + EP shards
    return model


@pytest.fixture(scope="module")
def four(reference, tmp_path_factory) -> SimpleNamespace:
    """W = 4, P = 2: experts over [0, 1] and [2, 3], each expert's copies FSDP-sharded over [0, 2] / [1, 3]."""
    root = tmp_path_factory.mktemp("fsdp-ep4")
    fresh, same = root / "fresh", root / "same"
    model = run_workers(_four_process_session, 4, str(fresh), str(same), timeout=240)
    return SimpleNamespace(model=model, fresh=fresh, same=same)


def _two_process_session(rank: int, world: int, fresh: str, resumed: str, at2: str, bad: str) -> dict:
    """Every 2-process check in one session: W = 2, P = 2 (one replica: the experts are not FSDP-split)."""
    model = _fsdp_ep_model_worker(rank, world, 2, 2)
    # with activation checkpointing: the recomputed forward repeats the all-to-alls and the experts' all-gather
    cfg = load_config(preset="tiny", overrides=SETTINGS + FSDP_EP + ["train.activation_checkpointing=true"])
    Trainer(cfg, fresh, log=lambda s: None, progress=False).fit()
    # 1 -> 2: a one-process checkpoint continued under FSDP + EP (experts sliced, moments too)
    _resume(rank, world, resumed, ["parallel.data_parallel=fsdp", "parallel.expert=2"])
    # the 4-process FSDP + EP sharded checkpoint at 2 processes without expert parallelism: DCP reshards
    _resume(rank, world, at2, ["parallel.expert=1"])
    return {"model": model, "bad": _bad_layouts(rank, world, bad)}


@pytest.fixture(scope="module")
def two(reference, four, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("fsdp-ep2")
    fresh, resumed, at2, bad = root / "fresh", root / "single-copy", root / "at2-fsdp", root / "bad"
    _copy_at_step2(reference, resumed)
    _copy_at_step2(four.fresh, at2)
    results = run_workers(_two_process_session, 2, str(fresh), str(resumed), str(at2), str(bad), timeout=240)
    return SimpleNamespace(
        model=[r["model"] for r in results], bad=[r["bad"] for r in results], fresh=fresh, resumed=resumed, at2=at2
    )


@pytest.mark.slow
def test_fsdp_ep_4_processes_gradients_equal_one_process(four) -> None:
    _check_model_worker(four.model, 4, 2)


@pytest.mark.slow
def test_fsdp_ep_2_processes_gradients_equal_one_process(two) -> None:
    _check_model_worker(two.model, 2, 2)


@pytest.mark.slow
def test_fsdp_ep_4_processes_trains_as_one_process_with_sharded_checkpoints(four, reference, tmp_path) -> None:
    _assert_metrics_match(four.fresh, reference)
    assert_close_by_step(evals(four.fresh), evals(reference), [0, 4])
    # resumed at the same layout from the step-2 sharded checkpoint
    assert_close_by_step(losses(four.same), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(four.same), evals(reference), [4])
    ckpt = four.fresh / STEP2
    assert {p.name for p in (ckpt / "dcp").iterdir()} == {".metadata"} | {f"__{r}_0.distcp" for r in range(4)}
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["parallel"] == {"world": 4, "expert": 2} and len(state["ranks"]) == 4

    # 4 -> 1 process (read whole)
    at1 = tmp_path / "at1"
    _copy_at_step2(four.fresh, at1)
    assert main(["train", "--out", str(at1), "--resume", "--quiet", "--set", "parallel.expert=1"]) == 0
    assert_close_by_step(losses(at1), losses(reference), [1, 2, 3, 4])


@pytest.mark.slow
def test_fsdp_ep_sharded_checkpoint_consolidates_to_the_weights(four, reference, tmp_path) -> None:
    ckpt = four.fresh / STEP2
    out = tmp_path / "consolidated"
    assert main(["consolidate", str(ckpt), str(out)]) == 0
    # exactly the shards' values, full [E, ...] experts; the one-process weights within tolerance
    weights = load_file(str(out / STEP2 / "model.safetensors"))
    shards = read_full(ckpt)
    for name, t in weights.items():
        assert torch.equal(t, shards["model"][name]), name
    assert weights["blocks.0.ffn.experts.gate_up_proj"].shape[0] == 4
    _assert_weights_match(out / STEP2, reference / STEP2)
    want_opt = torch.load(reference / STEP2 / "trainer.pt", weights_only=True)["optimizer"]
    got_opt = torch.load(out / STEP2 / "trainer.pt", weights_only=True)["optimizer"]
    assert set(got_opt["state"]) == set(want_opt["state"])
    for i, entry in want_opt["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert _max_diff(got_opt["state"][i][key], entry[key]) <= 1e-6, (i, key)


@pytest.mark.slow
def test_fsdp_ep_sharded_checkpoint_reshards_to_2_processes_without_expert_parallelism(two, reference) -> None:
    assert_close_by_step(losses(two.at2), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(two.at2), evals(reference), [4])


@pytest.mark.slow
def test_fsdp_ep_2_processes_single_format_checkpoints(two, reference) -> None:
    _assert_metrics_match(two.fresh, reference)
    # 1 -> 2 continued with the uninterrupted losses
    assert_close_by_step(losses(two.resumed), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(two.resumed), evals(reference), [4])

    # the single-process format: full experts gathered from both ranks, one-process weights and moments
    ckpt = two.fresh / STEP2
    _assert_weights_match(ckpt, reference / STEP2)
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["parallel"] == {"world": 2, "expert": 2} and len(state["ranks"]) == 2
    want = torch.load(reference / STEP2 / "trainer.pt", weights_only=True)["optimizer"]
    assert state["optimizer"]["param_groups"] == want["param_groups"]
    for i, entry in want["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert state["optimizer"]["state"][i][key].shape == entry[key].shape, (i, key)
            assert _max_diff(state["optimizer"]["state"][i][key], entry[key]) <= 1e-6, (i, key)

    # 2 -> 1: one process continues from step 2 with the uninterrupted losses
    args = ["train", "--out", str(two.fresh), "--resume", str(ckpt), "--quiet"]
    assert main(args + ["--set", "parallel.data_parallel=ddp", "--set", "parallel.expert=1"]) == 0
    assert_close_by_step(losses(two.fresh), losses(reference), [1, 2, 3, 4])
    assert_close_by_step(evals(two.fresh), evals(reference), [4])


# ---------------------------------------------------------------------------------------------
# Bad layouts: one line, exit 2, on every rank, before any work


def _bad_layouts(rank: int, world: int, out: str) -> list[tuple[int, list[str]]]:
    codes = []
    # the mesh does not divide (2 ranks into groups of 4); 3 does not divide the 4 experts
    for bad in ("parallel.expert=4", "parallel.expert=3"):
        err = io.StringIO()
        args = ["train", "--preset", "tiny", "--out", out, "--set", "parallel.data_parallel=fsdp", "--set", bad]
        with contextlib.redirect_stderr(err):
            code = main(args)
        codes.append((code, err.getvalue().strip().splitlines()))
    return codes


@pytest.mark.slow
def test_fsdp_ep_bad_layouts_fail_every_rank_with_one_line(two) -> None:
    for rank, results in enumerate(two.bad):
        assert results == [
            (2, ["moelab: error: the world size 2 is not a multiple of parallel.expert = 4: launch a multiple of it"]),
            (2, ["moelab: error: parallel.expert = 3 is not allowed: a divisor of model.moe.num_experts (4)"]),
        ], (rank, results)
    assert not (two.fresh.parent / "bad").exists()  # no process started any work


def test_fsdp_with_expert_parallelism_is_accepted_by_the_config() -> None:
    cfg = load_config(preset="tiny", overrides=FSDP_EP + SHARDED)
    assert (cfg.parallel.data_parallel, cfg.parallel.expert, cfg.train.checkpoint_format) == ("fsdp", 2, "sharded")
