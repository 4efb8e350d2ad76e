"""Router balancing coupled to the schedule: the factor on the Switch-loss coefficient and the bias
update rate, the router freeze, and their validation."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from moelab.config import MoEConfig, TrainConfig, load_config
from moelab.errors import ConfigError
from moelab.model.moe import MoE
from moelab.rundir import RunDir
from moelab.train.schedule import balance_scale, decay_start, learning_rate, router_frozen
from moelab.train.trainer import Trainer


def train_cfg(**kwargs) -> TrainConfig:
    base = dict(max_steps=200, warmup_steps=10, lr=2e-3, min_lr_ratio=0.1)
    return TrainConfig(**{**base, **kwargs})


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_lr_coupling_follows_the_learning_rate_at_every_step(schedule) -> None:
    cfg = train_cfg(schedule=schedule, balance_coupling="lr")
    for step in range(cfg.max_steps):
        assert balance_scale(step, cfg) == pytest.approx(learning_rate(step, cfg) / cfg.lr, rel=1e-12)
    final = balance_scale(cfg.max_steps - 1, cfg)
    assert final == 1.0 if schedule == "constant" else final < 0.2


def test_stop_at_decay_and_warmup() -> None:
    cfg = train_cfg(schedule="wsd", decay_fraction=0.25, balance_coupling="stop_at_decay", balance_warmup_steps=20)
    start = decay_start(cfg)
    assert start == 150  # the WSD decay: the last 25% of 200 steps
    assert learning_rate(start - 1, cfg) == cfg.lr and learning_rate(start, cfg) < cfg.lr
    scales = [balance_scale(s, cfg) for s in range(cfg.max_steps)]
    assert scales[:20] == pytest.approx([(s + 1) / 20 for s in range(20)])
    assert all(v == 1.0 for v in scales[20:start]) and all(v == 0.0 for v in scales[start:])
    assert all(balance_scale(s, train_cfg()) == 1.0 for s in range(200))  # the default changes nothing


def test_freeze_steps_and_a_frozen_router_balances_nothing() -> None:
    at_step = train_cfg(router_freeze_step=120)
    assert [router_frozen(s, at_step) for s in (0, 119, 120, 199)] == [False, False, True, True]
    at_decay = train_cfg(schedule="wsd", decay_fraction=0.2, router_freeze_at_decay=True)
    assert not router_frozen(159, at_decay) and router_frozen(160, at_decay)
    assert balance_scale(160, at_decay) == 0.0 and balance_scale(159, at_decay) == 1.0
    assert not any(router_frozen(s, train_cfg(schedule="constant", router_freeze_at_decay=True)) for s in range(200))


def test_the_scale_multiplies_the_switch_loss_and_the_bias_step() -> None:
    """Against the Switch formula computed here: E * sum_e f_e * P_e times coefficient and scale."""
    gen = torch.Generator().manual_seed(3)
    cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=8, aux_loss_coef=0.05, z_loss_coef=0.0, bias_update_rate=0.1)
    moe = MoE(16, cfg).train()
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(1, 40, 16, generator=gen)
    probs = torch.softmax(x[0] @ moe.router.weight.detach().T, -1)
    chosen = probs.topk(2, dim=-1).indices
    share = torch.bincount(chosen.reshape(-1), minlength=8).double() / chosen.numel()
    switch = 8 * float((share * probs.double().mean(0)).sum())
    for scale in (1.0, 0.25, 0.0):
        moe.balance_scale = scale
        _, aux = moe(x)
        assert float(aux.detach()) == pytest.approx(0.05 * scale * switch, rel=1e-5, abs=1e-12)
    load = moe.load_since_update.clone()
    for scale in (0.5, 0.0):
        layer = copy.deepcopy(moe)
        layer.load_since_update.copy_(load)
        layer.balance_scale = scale
        before = layer.router.expert_bias.clone()
        layer.update_bias()
        step = torch.sign(load.mean() - load) * 0.1 * scale
        torch.testing.assert_close(layer.router.expert_bias, before + step - step.mean())


def test_a_frozen_router_keeps_its_weights_and_bias_while_the_rest_trains(tmp_path) -> None:
    cfg = load_config(
        preset="tiny",
        overrides=[
            "train.max_steps=12",
            "train.router_freeze_step=6",
            "train.log_every=2",
            "train.sample_tokens=0",
            "model.moe.bias_update_rate=0.01",
        ],
    )
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(trainer: Trainer, step: int) -> None:  # before optimizer step `step` (0-based)
        seen[step] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    Trainer(cfg, tmp_path / "run", log=lambda s: None, progress=False, step_hook=snapshot).fit()
    routers = [k for k in seen[0] if ".router." in k]
    assert routers and any(k.endswith("expert_bias") for k in routers)
    for key in routers:  # moving until the freeze, fixed from step 6 on
        assert not torch.equal(seen[0][key], seen[6][key]), key
        for step in range(7, 12):
            assert torch.equal(seen[6][key], seen[step][key]), (key, step)
    others = [k for k in seen[0] if ".router." not in k and not k.startswith("rope")]
    assert all(not torch.equal(seen[6][k], seen[11][k]) for k in others if "norm" not in k)
    rows = [r for r in RunDir(tmp_path / "run").read_metrics() if "loss" in r]
    assert [r["router_frozen"] for r in rows] == [r["step"] - 1 >= 6 for r in rows]
    assert all(r["balance_scale"] == (0.0 if r["router_frozen"] else 1.0) for r in rows)


@pytest.mark.parametrize(
    "setting, field, allowed",
    [
        ("train.balance_coupling=cosine", "train.balance_coupling", "one of ('none', 'lr', 'stop_at_decay')"),
        ("train.router_freeze_step=500", "train.router_freeze_step", "an integer in [0, train.max_steps = 60]"),
        ("train.router_freeze_step=-1", "train.router_freeze_step", "an integer in [0, train.max_steps = 60]"),
        ("train.balance_warmup_steps=-3", "train.balance_warmup_steps", "an integer in [0, train.max_steps = 60]"),
        ("model.moe.bias_update_rate=-0.1", "model.moe.bias_update_rate", "a number >= 0"),
        ("model.moe.aux_loss_coef=-1", "model.moe.aux_loss_coef", "a number >= 0"),
    ],
)
def test_bad_balancing_settings_are_refused_at_load(setting, field, allowed) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny", overrides=[setting])
    assert field in str(err.value) and allowed in str(err.value)


def test_defaults_leave_the_config_unchanged() -> None:
    cfg = TrainConfig()
    assert (cfg.balance_coupling, cfg.balance_warmup_steps, cfg.router_freeze_step, cfg.router_freeze_at_decay) == (
        "none",
        0,
        0,
        False,
    )
    assert dataclasses.replace(cfg).balance_coupling == "none" and math.isfinite(balance_scale(0, cfg))


# ---------------------------------------------------------------------------------------------
# Global-batch balancing (train.balance_scope = "step")


def switch_reference(moe: MoE, x_TD: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(f_E, Switch loss) of one forward over all of x, computed here in float64: f from the
    top-k of the softmax, P the mean probability, loss = coef * E * sum f * P."""
    with torch.no_grad():
        probs = torch.softmax(x_TD.double() @ moe.router.weight.double().T, -1)
        chosen = (x_TD.double() @ moe.router.weight.double().T).topk(moe.cfg.top_k, dim=-1).indices
        f_E = torch.bincount(chosen.reshape(-1), minlength=moe.cfg.num_experts).double() / chosen.numel()
    E = moe.cfg.num_experts
    return f_E, moe.cfg.aux_loss_coef * E * float((f_E * probs.mean(0)).sum())


def balancing_moe(seed: int) -> MoE:
    gen = torch.Generator().manual_seed(seed)
    moe = MoE(16, MoEConfig(num_experts=8, top_k=2, expert_hidden=8, aux_loss_coef=0.05, z_loss_coef=0.0)).train()
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return moe


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_step_scope_value_equals_one_forward_over_the_whole_step(micro_batches) -> None:
    gen = torch.Generator().manual_seed(4)
    moe = balancing_moe(5)
    x = torch.randn(micro_batches * 24, 16, generator=gen)
    f_full, reference = switch_reference(moe, x)
    moe.balance_over_step = True
    moe.start_step()
    for chunk in x.chunk(micro_batches):
        _, aux = moe(chunk[None])
    assert moe.step_balance_loss() == pytest.approx(reference, rel=1e-5)
    # the last micro-batch is balanced against the whole step's load
    last = x.chunk(micro_batches)[-1]
    with torch.no_grad():
        last_probs = torch.softmax(last.double() @ moe.router.weight.double().T, -1).mean(0)
    expected_last = 0.05 * 8 * float((f_full * last_probs).sum())
    assert float(aux.detach()) == pytest.approx(expected_last, rel=1e-5)
    moe.start_step()  # a new step forgets the old load
    assert moe.step_balance_loss() == 0.0
    if micro_batches > 1:  # per micro-batch, the value differs: each chunk's own load
        moe.balance_over_step = False
        per_chunk = [float(moe(c[None])[1].detach()) for c in x.chunk(micro_batches)]
        assert per_chunk[-1] != pytest.approx(expected_last, rel=1e-6)


def test_step_scope_without_accumulation_trains_exactly_as_micro_batch_scope() -> None:
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(6))
    grads = []
    for over_step in (False, True):
        moe = balancing_moe(7)
        moe.balance_over_step = over_step
        moe.start_step()
        y, aux = moe(x[None])
        (y.square().mean() + aux).backward()
        grads.append([p.grad.clone() for p in moe.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_run_with_step_scope_logs_the_step_balance_loss(tmp_path) -> None:
    cfg = load_config(
        preset="tiny",
        overrides=["train.max_steps=6", "train.grad_accum=2", "train.balance_scope=step", "train.sample_tokens=0"],
    )
    Trainer(cfg, tmp_path / "run", log=lambda s: None, progress=False).fit()
    rows = [r for r in RunDir(tmp_path / "run").read_metrics() if "loss" in r]
    assert rows and all(0 < r["balance_loss"] < 0.1 for r in rows)  # 2 layers x 0.01 x about 1 when balanced
