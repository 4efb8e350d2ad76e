"""The transformer: KV-cached decoding equals a full forward; attention equals a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moelab.config import ModelConfig, MoEConfig
from moelab.model import KVCache, Transformer


def tiny(moe: MoEConfig | None = None, **kwargs) -> ModelConfig:
    base = dict(vocab_size=97, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=40)
    base.update(kwargs)
    return ModelConfig(moe=moe, **base)


CONFIGS = {
    "dense": tiny(),
    "moe": tiny(MoEConfig(num_experts=4, top_k=2, expert_hidden=16)),
    "moe-shared-every2": tiny(MoEConfig(num_experts=8, top_k=2, expert_hidden=8, num_shared_experts=1, every=2)),
    "moe-sigmoid-first-dense": tiny(
        MoEConfig(num_experts=4, top_k=1, expert_hidden=16, scoring="sigmoid", first_dense=1), tie_embeddings=False
    ),
    "mha": tiny(MoEConfig(num_experts=4, top_k=2, expert_hidden=16), n_kv_heads=4),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kv_cached_decoding_equals_full_forward(name: str) -> None:
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (3, 25))
    full = model(tokens).logits
    cache = KVCache(cfg, batch=3, max_len=cfg.max_seq_len, device="cpu", dtype=torch.float32)
    prefill = model(tokens[:, :9], cache=cache).logits
    steps = [prefill]
    for p in range(9, 25):  # one token per step
        positions = torch.full((3, 1), p)
        steps.append(model(tokens[:, p : p + 1], positions_BT=positions, cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-4)


def test_cache_rows_at_different_positions() -> None:
    """Two sequences of different lengths decode side by side in one batch (continuous batching)."""
    torch.manual_seed(1)
    cfg = CONFIGS["moe"]
    model = Transformer(cfg).eval()
    a = torch.randint(0, cfg.vocab_size, (1, 12))
    b = torch.randint(0, cfg.vocab_size, (1, 7))
    cache = KVCache(cfg, batch=4, max_len=cfg.max_seq_len, device="cpu", dtype=torch.float32)
    rows = torch.tensor([2, 0])
    model(a[:, :11], cache=cache, rows_B=rows[:1])
    model(b[:, :6], cache=cache, rows_B=rows[1:])
    step = torch.cat([a[:, 11:], b[:, 6:]])  # [2, 1]
    positions = torch.tensor([[11], [6]])
    logits = model(step, positions_BT=positions, cache=cache, rows_B=rows).logits
    torch.testing.assert_close(logits[0, -1], model(a).logits[0, -1], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits[1, -1], model(b).logits[0, -1], atol=2e-5, rtol=1e-4)


def reference_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Dense-model forward in float64 from the weights, written out by hand (no SDPA)."""
    cfg = model.cfg
    sd = {k: v.double() for k, v in model.state_dict().items()}
    H, G, Dh = cfg.n_heads, cfg.kv_heads, cfg.resolved_head_dim
    B, T = tokens.shape

    def norm(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)

    def rope(x):  # x [B, heads, T, Dh]
        half = Dh // 2
        freqs = 1.0 / cfg.rope_theta ** (torch.arange(half, dtype=torch.float64) * 2 / Dh)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None]
        c, s = ang.cos(), ang.sin()
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    x = sd["embed.weight"][tokens]
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        h = norm(x, sd[p + "attn_norm.weight"])
        q = (h @ sd[p + "attn.q_proj.weight"].T).view(B, T, H, Dh).transpose(1, 2)
        k = (h @ sd[p + "attn.k_proj.weight"].T).view(B, T, G, Dh).transpose(1, 2)
        v = (h @ sd[p + "attn.v_proj.weight"].T).view(B, T, G, Dh).transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(H // G, dim=1)
        v = v.repeat_interleave(H // G, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        att = torch.softmax(scores, -1) @ v
        x = x + att.transpose(1, 2).reshape(B, T, H * Dh) @ sd[p + "attn.o_proj.weight"].T
        h = norm(x, sd[p + "ffn_norm.weight"])
        gu = h @ sd[p + "ffn.gate_up_proj.weight"].T
        g, u = gu.chunk(2, -1)
        x = x + (F.silu(g) * u) @ sd[p + "ffn.down_proj.weight"].T
    x = norm(x, sd["norm.weight"])
    return x @ sd["lm_head.weight"].T


def test_dense_forward_matches_float64_reference() -> None:
    torch.manual_seed(2)
    for cfg in (CONFIGS["dense"], tiny(n_kv_heads=1), tiny(tie_embeddings=False, n_heads=6, n_kv_heads=3)):
        model = Transformer(cfg)
        with torch.no_grad():  # make the norms non-trivial
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        tokens = torch.randint(0, cfg.vocab_size, (2, 31))
        torch.testing.assert_close(
            model(tokens).logits.double(), reference_forward(model, tokens), atol=1e-4, rtol=1e-4
        )


def test_layer_placement() -> None:
    cfg = tiny(MoEConfig(every=2, first_dense=0), n_layers=6)
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]
    cfg = tiny(MoEConfig(first_dense=2), n_layers=4)
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, False, True, True]
    model = Transformer(tiny(MoEConfig(num_experts=4, top_k=2, expert_hidden=8, first_dense=1), n_layers=3))
    assert [b.is_moe for b in model.blocks] == [False, True, True]
    assert len(model.moe_layers()) == 2


def test_aux_loss_only_in_training_and_stats_per_layer() -> None:
    torch.manual_seed(3)
    cfg = CONFIGS["moe-shared-every2"]
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    model.train()
    out = model(tokens)
    assert float(out.aux_loss.detach()) > 0
    stats = model.router_stats()
    assert sorted(stats) == [1]  # layer 1 is the only MoE layer of 3 with every=2
    assert sum(stats[1]["tokens_per_expert"]) == 2 * 16 * 2
    model.eval()
    assert float(model(tokens).aux_loss) == 0.0
    assert model.router_stats()[1]["tokens"] == 0


def test_tied_embeddings_share_storage() -> None:
    model = Transformer(CONFIGS["dense"])
    assert model.lm_head.weight is model.embed.weight
    untied = Transformer(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embed.weight
