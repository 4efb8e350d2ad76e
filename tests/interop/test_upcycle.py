"""Sparse upcycling: the MoE starts equal to the dense model (logits within 1e-5) and then trains
with `moelab train --out RUN --resume` from a fresh optimizer at step 0."""

from __future__ import annotations

import pytest
import torch

from moelab.checkpoint import list_checkpoints
from moelab.cli import main
from moelab.config import load_config
from moelab.errors import MoelabError
from moelab.interop.upcycle import upcycle
from moelab.rundir import RunDir, load_model
from moelab.train.trainer import Trainer

DENSE = [
    "model.moe=none",
    "train.max_steps=6",
    "train.eval_every=6",
    "train.checkpoint_every=6",
    "train.log_every=2",
    "train.sample_tokens=0",
]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, token_cache):
    out = tmp_path_factory.mktemp("dense") / "run"
    Trainer(load_config(preset="tiny", overrides=DENSE), out, log=lambda s: None, progress=False).fit()
    return out


@pytest.mark.parametrize(("experts", "top_k", "granularity"), [(4, 2, 1), (4, 2, 2), (8, 4, 4)])
def test_upcycled_model_starts_equal_to_the_dense_one(dense_run, tmp_path, experts, top_k, granularity) -> None:
    result = upcycle(dense_run, tmp_path / "moe", experts, top_k, granularity)
    assert result.max_logit_diff <= 1e-5
    dense, moe = load_model(dense_run), load_model(tmp_path / "moe")
    cfg = moe.cfg.model.moe
    assert (cfg.num_experts, cfg.top_k, cfg.expert_hidden) == (
        experts,
        top_k,
        dense.cfg.model.ffn_hidden // granularity,
    )
    assert all(moe.cfg.model.is_moe_layer(i) for i in range(moe.cfg.model.n_layers))
    ids = torch.randint(0, dense.cfg.model.vocab_size, (4, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = float((moe.model(ids).logits - dense.model(ids).logits).abs().max())
    print(f"upcycle E={experts} k={top_k} G={granularity}: max |logit diff| at step 0 {diff:.2e}")
    assert diff <= 1e-5
    # the experts really are the FFN's pieces: the upcycled model is not a relabelled dense model
    assert moe.model.blocks[0].ffn.experts.gate_up_proj.shape[0] == experts


def test_upcycled_run_trains_with_resume(dense_run, tmp_path) -> None:
    out = tmp_path / "moe"
    assert (
        main(
            [
                "upcycle",
                str(dense_run),
                str(out),
                "--experts",
                "4",
                "--top-k",
                "2",
                "--granularity",
                "2",
                "--set",
                "model.moe.aux_loss_coef=0.02",
            ]
        )
        == 0
    )
    assert load_model(out).cfg.model.moe.aux_loss_coef == 0.02
    args = [
        "train",
        "--out",
        str(out),
        "--resume",
        "--quiet",
        "--set",
        "train.max_steps=12",
        "--set",
        "train.eval_every=6",
        "--set",
        "train.checkpoint_every=6",
    ]
    assert main(args) == 0
    metrics = RunDir(out).read_metrics()
    evals = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    dense_final = [r["val_loss"] for r in RunDir(dense_run).read_metrics() if "val_loss" in r][-1]
    assert evals[0][0] == 0 and abs(evals[0][1] - dense_final) < 1e-4  # starts where the dense model ended
    assert evals[-1][0] == 12 and evals[-1][1] < evals[0][1]  # and trains
    losses = [r["loss"] for r in metrics if "loss" in r]
    assert losses[-1] < losses[0]
    # step 0 now holds a complete checkpoint (optimizer state and all), so ordinary resumes follow
    assert [c.name for c in list_checkpoints(out)][-1] == "step_0000012"
    again = Trainer(RunDir(out).load_config(), out, resume=True, log=lambda s: None, progress=False)
    assert again.step == 12 and again.optimizer.state


def test_upcycle_refuses_what_cannot_start_equal(dense_run, tmp_path, tiny_run) -> None:
    cases = [
        ((tiny_run, 4, 2, 1), "already a mixture of experts"),
        ((dense_run, 4, 2, 3), "--granularity 3"),
        ((dense_run, 6, 2, 4), "--experts 6"),
        ((dense_run, 4, 1, 2), "--top-k 1"),
        ((dense_run, 4, 8, 1), "--top-k 8"),
    ]
    for (run, experts, top_k, granularity), fragment in cases:
        with pytest.raises(MoelabError, match=fragment.replace("-", r"\-")):
            upcycle(run, tmp_path / "out", experts, top_k, granularity)
    with pytest.raises(MoelabError, match="model.d_model"):
        upcycle(dense_run, tmp_path / "out", 4, 2, 1, ["model.d_model=32"])
    assert not (tmp_path / "out").exists()
