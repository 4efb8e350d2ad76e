"""Parameter and FLOP counts against hand counts, the built model, and PyTorch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moelab.config import ModelConfig, MoEConfig
from moelab.model import Transformer
from moelab.model import accounting as acc


def test_dense_counts_by_hand() -> None:
    # V=10, D=8, 1 layer, 2 heads (Dh=4), 1 kv head, FFN 16, tied.
    cfg = ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=16, max_seq_len=6)
    embed = 10 * 8  # 80
    attn = 8 * 8 + 2 * (8 * 4) + 8 * 8  # q 64, k 32, v 32, o 64 = 192
    ffn = 3 * 8 * 16  # 384
    norms = 8 + 8 + 8  # 24
    counts = acc.param_counts(cfg)
    assert counts.total == embed + attn + ffn + norms == 680
    assert counts.active == counts.total
    assert counts.embedding == 80
    # matmul weights per token: attention 192 + ffn 384 + lm head 80 = 656
    assert acc.matmul_params_per_token(cfg) == 656
    # forward at seq_len 5: 2*656 + 4 * layers(1) * H(2) * Dh(4) * (5+1)/2 = 1312 + 96
    assert acc.forward_flops_per_token(cfg, 5) == 1312 + 96
    assert acc.train_flops_per_token(cfg, 5) == 3 * (1312 + 96)
    # inference with 3 cached tokens: attends to 4 keys
    assert acc.inference_flops_per_token(cfg, 3) == 1312 + 4 * 2 * 4 * 4


def test_moe_counts_by_hand() -> None:
    # 2 layers, MoE every 2nd layer (layer 1): E=4, k=2, I=6, 1 shared expert of hidden 5 with gate; untied.
    moe = MoEConfig(
        num_experts=4,
        top_k=2,
        expert_hidden=6,
        num_shared_experts=1,
        shared_expert_hidden=5,
        shared_expert_gate=True,
        every=2,
    )
    cfg = ModelConfig(
        vocab_size=10, d_model=8, n_layers=2, n_heads=2, ffn_hidden=16, max_seq_len=6, tie_embeddings=False, moe=moe
    )
    attn = 4 * 64  # MHA: q, k, v, o each 8x8
    dense_layer = attn + 3 * 8 * 16 + 16  # 256 + 384 + norms 16 = 656
    expert = 3 * 8 * 6  # 144
    moe_common = attn + 16 + 4 * 8 + 3 * 8 * 5 + 8  # router 32, shared 120, gate 8 -> 432
    total = 2 * 80 + 8 + dense_layer + moe_common + 4 * expert  # 160 + 8 + 656 + 440 + 576
    active = 2 * 80 + 8 + dense_layer + moe_common + 2 * expert
    counts = acc.param_counts(cfg)
    assert counts.total == total == 1832
    assert counts.active == active == 1544
    assert counts.expert_total == 576 and counts.expert_active == 288
    assert counts.embedding == 160
    matmul = (dense_layer - 16) + (moe_common - 16 + 2 * expert) + 80
    assert acc.matmul_params_per_token(cfg) == matmul


@pytest.mark.parametrize(
    "moe",
    [
        None,
        MoEConfig(
            num_experts=4, top_k=2, expert_hidden=8, num_shared_experts=2, shared_expert_gate=True, first_dense=1
        ),
    ],
)
@pytest.mark.parametrize("tie", [True, False])
def test_total_parameters_equal_the_built_model(moe, tie) -> None:
    cfg = ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=40,
        max_seq_len=16,
        tie_embeddings=tie,
        moe=moe,
    )
    model = Transformer(cfg)
    assert acc.param_counts(cfg).total == sum(p.numel() for p in model.parameters())


def test_forward_flops_equal_pytorch_flop_counter_for_dense() -> None:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=16)
    model = Transformer(cfg)
    T = 16
    # the math backend decomposes attention into matmuls the counter sees
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.randint(0, 64, (1, T)))
    counted = counter.get_total_flops()
    # PyTorch counts the full T x T attention square; ours counts the causal half (keys <= query).
    square = 4.0 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * T  # per token
    ours_with_square = acc.forward_flops_per_token(cfg, T) - acc.attention_flops_per_token(cfg, (T + 1) / 2) + square
    assert counted == pytest.approx(T * ours_with_square, rel=1e-9)


def test_moe_forward_flops_equal_counter_with_padded_experts() -> None:
    """With expert-choice routing every expert processes exactly C tokens, so the padded bmm does
    no padding and PyTorch's counter sees exactly the active expert work."""
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, routing="expert_choice")
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=16, moe=moe)
    model = Transformer(cfg)
    for layer in model.moe_layers():
        layer.experts.matmul = "padded"
    T = 16
    # the math backend decomposes attention into matmuls the counter sees
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.randint(0, 64, (1, T)))
    square = 4.0 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * T
    ours = acc.forward_flops_per_token(cfg, T) - acc.attention_flops_per_token(cfg, (T + 1) / 2) + square
    assert counter.get_total_flops() == pytest.approx(T * ours, rel=1e-9)


def test_moe_with_top_k_experts_of_width_i_matches_dense_of_width_k_i() -> None:
    """The matched-compute rule used by compare: E experts of width I with top-k cost the same
    FLOPs as a dense FFN of width k*I (up to the router)."""
    dense = ModelConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=4, ffn_hidden=128, max_seq_len=32)
    sparse = ModelConfig(
        vocab_size=100,
        d_model=64,
        n_layers=2,
        n_heads=4,
        ffn_hidden=128,
        max_seq_len=32,
        moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=64),
    )
    router = 2 * 2 * 8 * 64  # 2 FLOPs * layers * E * D
    assert acc.forward_flops_per_token(sparse, 32) - acc.forward_flops_per_token(dense, 32) == router
