"""train.decay_scope: which parameters the schedule's decay lowers, the others following the
schedule without it (the recipe study's diagnostic of which part of the model the decay helps)."""

from __future__ import annotations

import pytest
import torch

from moelab.config import TrainConfig, load_config
from moelab.errors import ConfigError
from moelab.model.transformer import Transformer
from moelab.rundir import RunDir
from moelab.train.schedule import build_optimizer, decay_start, learning_rate, undecayed_learning_rate
from moelab.train.trainer import Trainer


def tiny_model(seed: int = 0) -> Transformer:
    cfg = load_config(preset="tiny")
    cfg.model.vocab_size = 64
    torch.manual_seed(seed)
    return Transformer(cfg.model)


def names_by_group(model, optimizer) -> list[set[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [{by_id[id(p)] for p in g["params"]} for g in optimizer.param_groups]


@pytest.mark.parametrize("schedule", ["wsd", "cosine", "constant"])
def test_undecayed_rate_is_the_warmup_then_the_peak(schedule) -> None:
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=2e-3, schedule=schedule, decay_fraction=0.3)
    for step in range(cfg.max_steps):
        expected = cfg.lr * (step + 1) / 10 if step < 10 else cfg.lr
        assert undecayed_learning_rate(step, cfg) == pytest.approx(expected, rel=1e-12)
        assert undecayed_learning_rate(step, cfg) >= learning_rate(step, cfg) - 1e-15


def test_the_default_keeps_the_optimizer_groups_of_earlier_checkpoints() -> None:
    """Split by (matrix, routed) only, no `decays` key: optimizer states saved before the option load."""
    model = tiny_model()
    opt = build_optimizer(model, TrainConfig())
    expected: dict[tuple[bool, bool], set[str]] = {}
    for name, p in model.named_parameters():
        expected.setdefault((p.dim() >= 2, ".experts." in name or ".router." in name), set()).add(name)
    assert names_by_group(model, opt) == [expected[k] for k in sorted(expected)]
    assert all("decays" not in g for g in opt.param_groups)


@pytest.mark.parametrize("scope", ["ffn", "non_ffn"])
def test_each_parameter_learns_at_its_scopes_rate_through_a_training_run(tmp_path, scope) -> None:
    """Run the trainer, read every group's learning rate before each optimizer step, and check it
    against the schedule by parameter name: decayed inside the scope, undecayed outside it."""
    cfg = load_config(
        preset="tiny",
        overrides=[
            "train.max_steps=12",
            "train.warmup_steps=2",
            "train.schedule=wsd",
            "train.decay_fraction=0.5",
            "train.log_every=4",
            "train.sample_tokens=0",
            f"train.decay_scope={scope}",
            "model.moe.lr_scale=2.0",
        ],
    )
    rates: dict[int, list[tuple[set[str], float]]] = {}

    def record(trainer: Trainer, step: int) -> None:  # before optimizer step `step`: what step - 1 used
        if step > 0:
            groups = names_by_group(trainer.model, trainer.optimizer)
            rates[step - 1] = [(names, g["lr"]) for names, g in zip(groups, trainer.optimizer.param_groups)]

    Trainer(cfg, tmp_path / "run", log=lambda s: None, progress=False, step_hook=record).fit()
    tc = cfg.train
    assert decay_start(tc) == 6 and set(rates) == set(range(11))
    seen_ffn = seen_other = False
    for step, groups in rates.items():
        for names, lr in groups:
            for name in names:
                ffn = ".ffn." in name
                seen_ffn, seen_other = seen_ffn or ffn, seen_other or not ffn
                decays = ffn if scope == "ffn" else not ffn
                base = learning_rate(step, tc) if decays else undecayed_learning_rate(step, tc)
                scale = 2.0 if (".experts." in name or ".router." in name) else 1.0
                assert lr == pytest.approx(base * scale, rel=1e-12), (step, name)
    assert seen_ffn and seen_other
    assert learning_rate(10, tc) < 0.5 * tc.lr  # the decay did lower the scope's rate
    assert RunDir(tmp_path / "run").read_summary() is not None


def test_an_unknown_scope_is_refused_at_load() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny", overrides=["train.decay_scope=experts"])
    assert "train.decay_scope" in str(err.value) and "one of ('all', 'ffn', 'non_ffn')" in str(err.value)
    assert "'experts'" in str(err.value)
