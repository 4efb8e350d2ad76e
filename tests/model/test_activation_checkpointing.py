"""Activation checkpointing: the same losses, gradients (router included), router statistics,
balancing loads and biases as without, over several optimizer steps; the replay in the backward
records nothing (MoE.recording)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import moelab.model.transformer as transformer_module
from moelab.config import ModelConfig, MoEConfig
from moelab.model import Transformer

V = 97


def tiny(moe: MoEConfig | None) -> ModelConfig:
    return ModelConfig(
        vocab_size=V, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=40, moe=moe
    )


BASE = dict(num_experts=4, top_k=2, expert_hidden=16, bias_update_rate=0.01, num_shared_experts=1)
CONFIGS = {
    "dense": tiny(None),
    "moe-dropless-jitter": tiny(MoEConfig(**BASE, jitter=0.1)),
    "moe-capacity-first-dense": tiny(MoEConfig(**BASE, capacity_factor=1.0, first_dense=1)),
    "moe-expert-choice": tiny(MoEConfig(**BASE, routing="expert_choice")),
    "moe-sigmoid": tiny(MoEConfig(**BASE, scoring="sigmoid")),
}


def train(cfg: ModelConfig, checkpointing: bool, balance_over_step: bool, steps: int = 3, accum: int = 2) -> list:
    """`steps` AdamW steps of `accum` micro-batches; per step everything that could differ."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.train()
    model.activation_checkpointing = checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    record = []
    for _ in range(steps):
        model.start_step(balance_over_step)
        losses = []
        for _ in range(accum):
            tokens = torch.randint(0, V, (4, 33), generator=gen)
            out = model(tokens[:, :-1])
            loss = F.cross_entropy(out.logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
            ((loss + out.aux_loss) / accum).backward()
            losses.append((loss.item(), out.aux_loss.item()))
        record.append(
            {
                "losses": losses,
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                "stats": model.router_stats(),
                "step_balance_loss": model.step_balance_loss(),
                "load": [m.load_since_update.clone() for m in model.moe_layers()],
            }
        )
        opt.step()
        opt.zero_grad()
        model.update_router_biases()
        record[-1]["bias"] = [m.router.expert_bias.clone() for m in model.moe_layers()]
    record.append({"weights": {n: p.detach().clone() for n, p in model.named_parameters()}})
    return record


def assert_same(got: list, want: list, tol: float = 1e-6) -> None:
    for step, (a, b) in enumerate(zip(got[:-1], want[:-1])):
        for (la, xa), (lb, xb) in zip(a["losses"], b["losses"]):
            assert abs(la - lb) <= tol and abs(xa - xb) <= tol, (step, a["losses"], b["losses"])
        assert a["grads"].keys() == b["grads"].keys()
        for name in a["grads"]:
            assert torch.allclose(a["grads"][name], b["grads"][name], rtol=0, atol=tol), (step, name)
        assert a["stats"] == b["stats"], step  # counts, entropy, z-loss, max logit: exactly equal
        assert abs(a["step_balance_loss"] - b["step_balance_loss"]) <= tol
        for la, lb in zip(a["load"], b["load"]):
            assert torch.equal(la, lb), step
        for ba, bb in zip(a["bias"], b["bias"]):
            assert torch.equal(ba, bb), step
    for name, w in got[-1]["weights"].items():
        assert torch.allclose(w, want[-1]["weights"][name], rtol=0, atol=tol), name


@pytest.mark.parametrize("balance_over_step", [False, True], ids=["micro-batch-balance", "step-balance"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_checkpointing_changes_nothing_but_memory(name: str, balance_over_step: bool) -> None:
    cfg = CONFIGS[name]
    assert_same(train(cfg, True, balance_over_step), train(cfg, False, balance_over_step))


def test_the_replay_would_count_twice_without_the_guard(monkeypatch) -> None:
    """The test above is not vacuous: with the replay recording like a forward, the statistics, the
    bias load and the step's balancing load (so the second micro-batch's Switch loss) differ."""
    cfg = CONFIGS["moe-dropless-jitter"]
    want = train(cfg, False, True)
    monkeypatch.setattr(
        transformer_module, "_checkpoint_contexts", lambda block: (contextlib.nullcontext(), contextlib.nullcontext())
    )
    got = train(cfg, True, True)
    assert got[0]["stats"] != want[0]["stats"]
    assert not torch.equal(got[0]["load"][0], want[0]["load"][0])
    assert abs(got[0]["losses"][1][1] - want[0]["losses"][1][1]) > 1e-6  # the aux loss of micro-batch 2


def test_checkpointing_only_where_gradients_are_taken() -> None:
    """Evaluation and cached decoding run the blocks directly (nothing to recompute)."""
    torch.manual_seed(0)
    model = Transformer(CONFIGS["moe-dropless-jitter"])
    tokens = torch.randint(0, V, (2, 16))
    model.eval()
    want = model(tokens).logits
    model.activation_checkpointing = True
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, want)
    model.train()
    out = model(tokens)
    assert out.logits.grad_fn is not None
    # the replay flag is back on after a backward
    (out.logits.sum() + out.aux_loss).backward()
    assert all(bool(m.recording) for m in model.moe_layers())
