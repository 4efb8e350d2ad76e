"""A study's budget per model (tokens, training FLOPs or minutes) and the config that spends it."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moelab.config import RunConfig
from moelab.errors import MoelabError
from moelab.model import accounting as acc

DEFAULT_EVALS = 12  # evaluation points per learning curve


@dataclass(frozen=True)
class Budget:
    kind: str  # tokens | flops | minutes
    amount: float

    @staticmethod
    def parse(text: str) -> "Budget":
        """'tokens=2e6', 'flops=1.5e14' or 'minutes=10'."""
        kind, _, value = text.partition("=")
        kind = kind.strip().lower()
        try:
            amount = float(value)
        except ValueError:
            amount = float("nan")
        if kind not in ("tokens", "flops", "minutes") or not (amount > 0 and math.isfinite(amount)):
            raise MoelabError(
                f"--budget {text!r} is not allowed: tokens=N, flops=N or minutes=N with N > 0 (e.g. tokens=2e6)"
            )
        return Budget(kind, amount)

    def describe(self) -> str:
        return {
            "tokens": f"{self.amount:.3g} tokens",
            "flops": f"{self.amount:.3g} training FLOPs",
            "minutes": f"{self.amount:g} minutes",
        }[self.kind] + " per model"


def tokens_per_step(cfg: RunConfig) -> int:
    return cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum


def measure_train_speed(cfg: RunConfig, steps: int = 3) -> float:
    """Training tokens per second of a config on random tokens (for a minutes budget)."""
    from moelab.device import resolve_device
    from moelab.model import Transformer
    from moelab.train.schedule import build_optimizer

    device = resolve_device(cfg.train.device)
    mcfg = copy.deepcopy(cfg.model)
    if mcfg.vocab_size == 0:
        mcfg.vocab_size = cfg.data.vocab_size if cfg.data.tokenizer == "bpe" else 260
    model = Transformer(mcfg).to(device)
    opt = build_optimizer(model, cfg.train)
    x = torch.randint(0, mcfg.vocab_size, (cfg.train.batch_size, cfg.data.seq_len), device=device)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        out = model(x)
        loss = (
            torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, mcfg.vocab_size), x.reshape(-1))
            + out.aux_loss
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return cfg.train.batch_size * cfg.data.seq_len / (sorted(times)[len(times) // 2])


def apply_budget(
    cfg: RunConfig,
    budget: Budget,
    evals: int = DEFAULT_EVALS,
    speed: Callable[[RunConfig], float] = measure_train_speed,
) -> RunConfig:
    """A copy of `cfg` whose max_steps spends the budget, with evenly spaced evaluations."""
    cfg = copy.deepcopy(cfg)
    vocab = cfg.model.vocab_size or (cfg.data.vocab_size if cfg.data.tokenizer == "bpe" else 260)
    per_step = tokens_per_step(cfg)
    if budget.kind == "tokens":
        tokens = budget.amount
    elif budget.kind == "flops":
        tokens = budget.amount / acc.train_flops_per_token(cfg.model, cfg.data.seq_len, vocab)
    else:
        # NOTE: evaluation takes time too; aim the schedule at 90% of the minutes and let
        # max_minutes stop the run if the machine is slower than measured.
        tokens = 0.9 * budget.amount * 60 * speed(cfg)
        cfg.train.max_minutes = budget.amount
    cfg.train.max_steps = max(1, int(tokens // per_step))
    cfg.train.max_tokens = 0
    cfg.train.eval_every = max(1, cfg.train.max_steps // evals)
    cfg.train.checkpoint_every = max(cfg.train.eval_every, cfg.train.max_steps // 4)
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, max(1, cfg.train.max_steps // 10))
    cfg.train.sample_tokens = 0
    return cfg.validate()


def planned_flops(cfg: RunConfig) -> float:
    """Training FLOPs of a run of `cfg` to its max_steps."""
    vocab = cfg.model.vocab_size or (cfg.data.vocab_size if cfg.data.tokenizer == "bpe" else 260)
    return cfg.train.max_steps * tokens_per_step(cfg) * acc.train_flops_per_token(cfg.model, cfg.data.seq_len, vocab)


def default_budget(cfg: RunConfig) -> Budget:
    """The config's own max_steps, as training FLOPs (so every model of a study spends the same)."""
    return Budget("flops", planned_flops(cfg))
