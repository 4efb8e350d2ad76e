"""The same code on a GPU: these run where CUDA is present (skipped on CPU-only machines)."""

from __future__ import annotations

import copy

import pytest
import torch

from moelab.config import ModelConfig, MoEConfig, load_config
from moelab.model import KVCache, Transformer
from tests.model.test_moe import fresh_tokens, make_moe
from tests.reference import moe_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_experts=8, top_k=2, expert_hidden=32),
        dict(num_experts=16, top_k=4, expert_hidden=16, num_shared_experts=1, capacity_factor=1.0),
        dict(num_experts=8, top_k=2, expert_hidden=32, routing="expert_choice"),
    ],
)
def test_moe_on_cuda_matches_float64_reference(kwargs) -> None:
    moe = make_moe(64, seed=0, **kwargs)
    x = fresh_tokens(moe, 96, 64, torch.Generator().manual_seed(1))
    ref, _, _, _ = moe_reference(copy.deepcopy(moe).double(), x.double())
    gpu = copy.deepcopy(moe).cuda()
    assert gpu.experts.matmul == "auto"  # fp32 on CUDA: the padded bmm path
    y, _ = gpu(x.cuda()[None])
    torch.testing.assert_close(y[0].double().cpu(), ref, atol=5e-4, rtol=1e-3)  # TF32-tolerant


def test_bf16_autocast_uses_grouped_kernel_and_stays_close() -> None:
    moe = make_moe(128, seed=2, num_experts=8, top_k=2, expert_hidden=64).cuda()
    x = torch.randn(1, 512, 128, device="cuda")
    with torch.no_grad():
        exact, _ = moe(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast, _ = moe(x)
    rel = (fast.float() - exact).norm() / exact.norm()
    assert rel < 2e-2


def test_kv_cache_decoding_on_cuda() -> None:
    cfg = ModelConfig(
        vocab_size=97,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=96,
        max_seq_len=48,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32),
    )
    from moelab.infer.moe_layer import prepare_for_inference

    torch.manual_seed(0)
    model = prepare_for_inference(Transformer(cfg).cuda())  # decode steps take the gathered few-token path
    tokens = torch.randint(0, 97, (2, 20), device="cuda")
    with torch.no_grad():
        full = model(tokens).logits
        cache = KVCache(cfg, 2, 48, "cuda", torch.float32)
        steps = [model(tokens[:, :5], cache=cache).logits]
        for p in range(5, 20):
            steps.append(
                model(tokens[:, p : p + 1], positions_BT=torch.full((2, 1), p, device="cuda"), cache=cache).logits
            )
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-3, rtol=1e-3)


def test_training_on_cuda_with_bf16_autocast_and_resume(tmp_path) -> None:
    from moelab.rundir import RunDir
    from moelab.train.trainer import Trainer

    cfg = load_config(preset="tiny", overrides=["train.device=cuda", "train.max_steps=40", "train.sample_tokens=8"])
    run = tmp_path / "run"
    result = Trainer(cfg, run, log=lambda s: None, progress=False).fit(stop_at=20)
    resumed = Trainer(RunDir(run).load_config(), run, resume=True, log=lambda s: None, progress=False)
    assert resumed.amp_dtype == torch.bfloat16
    result = resumed.fit()
    evals = [r["val_loss"] for r in RunDir(run).read_metrics() if "val_loss" in r]
    assert result.step == 40 and result.val_loss < 0.8 * evals[0]
