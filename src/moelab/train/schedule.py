"""Learning-rate schedules and the AdamW parameter groups."""

from __future__ import annotations

import math

import torch
from torch import nn

from moelab.config import TrainConfig


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to
    lr * min_lr_ratio, or warmup-stable-decay (constant, then linear decay over the last
    decay_fraction of the steps), or constant."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if (cfg.warmup_steps and step < cfg.warmup_steps) or cfg.schedule == "constant":
        return undecayed_learning_rate(step, cfg)
    total = max(cfg.max_steps, cfg.warmup_steps + 1)
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    start = decay_start(cfg)
    if step < start:
        return peak
    progress = min(1.0, (step - start + 1) / max(1, total - start))
    return peak + (floor - peak) * progress


def undecayed_learning_rate(step: int, cfg: TrainConfig) -> float:
    """The schedule without its decay: the warmup, then the peak. What the parameters outside
    train.decay_scope learn at (`set_learning_rate`)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def decay_start(cfg: TrainConfig) -> int | None:
    """The first step of the decay phase: WSD's decay, and for cosine the last decay_fraction of
    the steps (its learning rate falls throughout; this is where it has fallen the most); None for
    a constant schedule."""
    if cfg.schedule == "constant":
        return None
    total = max(cfg.max_steps, cfg.warmup_steps + 1)
    return total - max(1, round(cfg.decay_fraction * total))


def router_frozen(step: int, cfg: TrainConfig) -> bool:
    """Whether optimizer step `step` (0-based) leaves the router's weights and biases unchanged."""
    if cfg.router_freeze_step and step >= cfg.router_freeze_step:
        return True
    start = decay_start(cfg)
    return cfg.router_freeze_at_decay and start is not None and step >= start


def balance_scale(step: int, cfg: TrainConfig) -> float:
    """The factor on the Switch-loss coefficient and the bias update rate at optimizer step `step`:
    train.balance_warmup_steps ramps it up from 0; train.balance_coupling "lr" follows the learning
    rate (lr / peak lr), "stop_at_decay" is 0 from the decay phase on; a frozen router balances
    nothing (0), since it can no longer move the load."""
    if router_frozen(step, cfg):
        return 0.0
    scale = 1.0
    if cfg.balance_warmup_steps and step < cfg.balance_warmup_steps:
        scale = (step + 1) / cfg.balance_warmup_steps
    if cfg.balance_coupling == "lr":
        scale *= learning_rate(step, cfg) / cfg.lr
    elif cfg.balance_coupling == "stop_at_decay":
        start = decay_start(cfg)
        if start is not None and step >= start:
            scale = 0.0
    return scale


def in_ffn(name: str) -> bool:
    """Whether parameter `name` belongs to a block's feed-forward part: the dense SwiGLU, or the
    MoE layer's router, routed experts, shared experts and gate."""
    return ".ffn." in name


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and stacked expert tensors), none on norms.

    The router and routed experts learn at model.moe.lr_scale times the learning rate (each group
    keeps its multiplier in `lr_scale`; `set_learning_rate` applies it every step). With
    train.decay_scope "ffn" or "non_ffn" each group also records in `decays` whether the schedule's
    decay lowers its learning rate (only then are the feed-forward parameters a group of their own,
    so that the default's groups, and the optimizer state of its checkpoints, stay as they were)."""
    moe_cfg = getattr(getattr(model, "cfg", None), "moe", None)
    expert_lr_scale = moe_cfg.lr_scale if moe_cfg is not None else 1.0
    split_ffn = cfg.decay_scope != "all"
    groups: dict[tuple[bool, bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        routed = ".experts." in name or ".router." in name
        groups.setdefault((p.dim() >= 2, routed, split_ffn and in_ffn(name)), []).append(p)
    param_groups = [
        {
            "params": params,
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr_scale": expert_lr_scale if routed else 1.0,
            **({"decays": ffn == (cfg.decay_scope == "ffn")} if split_ffn else {}),
        }
        for (decay, routed, ffn), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, undecayed_lr: float | None = None) -> None:
    """Each group's learning rate: `lr` (the schedule's) times its lr_scale, or `undecayed_lr` for a
    group the decay does not lower (train.decay_scope; default: lr)."""
    for group in optimizer.param_groups:
        base = lr if undecayed_lr is None or group.get("decays", True) else undecayed_lr
        group["lr"] = base * group.get("lr_scale", 1.0)
