"""The attention options added for Hugging Face architectures (model.qkv_bias, model.qk_norm)
against an independent float64 reference; off by default, counted by the accounting."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.config import ModelConfig, MoEConfig
from moelab.errors import ConfigError
from moelab.model import KVCache, Transformer
from moelab.model.accounting import param_counts
from tests.interop.conftest import perturb_


def rms(x, weight, eps):
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def reference_attention(attn, x, cfg: ModelConfig):
    """Causal grouped-query attention with optional q/k/v biases and q/k RMSNorm, in float64, with
    rotary tables built here (rotate-half convention)."""
    B, T, _ = x.shape
    H, G, Dh = cfg.n_heads, cfg.kv_heads, cfg.resolved_head_dim
    p = {n: t.double() for n, t in attn.state_dict().items()}
    q = x @ p["q_proj.weight"].T + p.get("q_proj.bias", 0.0)
    k = x @ p["k_proj.weight"].T + p.get("k_proj.bias", 0.0)
    v = x @ p["v_proj.weight"].T + p.get("v_proj.bias", 0.0)
    if cfg.qk_norm == "full":
        q, k = rms(q, p["q_norm.weight"], cfg.norm_eps), rms(k, p["k_norm.weight"], cfg.norm_eps)
    q, k, v = q.view(B, T, H, Dh), k.view(B, T, G, Dh), v.view(B, T, G, Dh)
    if cfg.qk_norm == "head":
        q, k = rms(q, p["q_norm.weight"], cfg.norm_eps), rms(k, p["k_norm.weight"], cfg.norm_eps)
    freq = cfg.rope_theta ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq[None]
    cos, sin = torch.cat([angle.cos()] * 2, -1)[None, :, None], torch.cat([angle.sin()] * 2, -1)[None, :, None]
    rotate = lambda t: torch.cat([-t[..., Dh // 2 :], t[..., : Dh // 2]], -1)
    q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
    out = torch.zeros(B, T, H, Dh, dtype=torch.float64)
    for h in range(H):
        g = h // (H // G)
        scores = torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, g]) / math.sqrt(Dh)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out[:, :, h] = torch.softmax(scores, -1) @ v[:, :, g]
    return out.reshape(B, T, H * Dh) @ p["o_proj.weight"].T


@pytest.mark.parametrize("qk_norm", ["none", "head", "full"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_attention_options_match_a_float64_reference(qk_norm, qkv_bias) -> None:
    cfg = ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=32,
        max_seq_len=16,
        qk_norm=qk_norm,
        qkv_bias=qkv_bias,
        rope_theta=500.0,
    )
    model = Transformer(cfg)
    perturb_(model, scale=0.3)
    attn = model.blocks[0].attn.double()
    x = torch.randn(2, 16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    T = x.shape[1]
    cos, sin = model.rope_cos[:T][None].double(), model.rope_sin[:T][None].double()
    got = attn(x, cos, sin, None, None, 0, None)
    assert torch.allclose(got, reference_attention(attn, x, cfg), atol=1e-6, rtol=0)  # rotary tables are fp32


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_cached_decoding_matches_the_full_forward_with_qk_norm(qk_norm) -> None:
    cfg = ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=32,
        max_seq_len=16,
        qk_norm=qk_norm,
        qkv_bias=True,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=8),
    )
    model = Transformer(cfg).eval()
    perturb_(model, scale=0.3)
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(cfg, 1, 12, "cpu", torch.float32)
        steps = [model(ids[:, :6], cache=cache).logits]
        for t in range(6, 12):
            steps.append(model(ids[:, t : t + 1], positions_BT=torch.tensor([[t]]), cache=cache).logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_options_are_off_by_default_and_validated() -> None:
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, ffn_hidden=32)
    names = set(Transformer(cfg).state_dict())
    assert not any("q_norm" in n or "k_norm" in n or n.endswith(".bias") for n in names)
    with pytest.raises(ConfigError, match="model.qk_norm"):
        ModelConfig(vocab_size=50, qk_norm="layer").validate()
    model = Transformer(
        ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, ffn_hidden=32, qkv_bias=True, qk_norm="head")
    )
    attn = model.blocks[0].attn
    assert torch.equal(attn.q_proj.bias, torch.zeros(32)) and torch.equal(attn.q_norm.weight, torch.ones(8))


@pytest.mark.parametrize("qk_norm", ["none", "head", "full"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_accounting_counts_the_new_parameters(qk_norm, qkv_bias) -> None:
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, num_shared_experts=1, shared_expert_gate=True)
    cfg = ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_hidden=32,
        qk_norm=qk_norm,
        qkv_bias=qkv_bias,
        moe=moe,
    )
    model = Transformer(cfg)
    assert param_counts(cfg).total == sum(p.numel() for p in model.parameters())
