"""train.activation_checkpointing and train.compile in the trainer: the settings are validated, a
toolchain that cannot compile is refused before any work, and the training curve is the eager one."""

from __future__ import annotations

import pytest

import moelab.train.trainer as trainer_module
from moelab.cli import main
from moelab.config import load_config
from moelab.errors import ConfigError, MoelabError
from moelab.rundir import RunDir
from moelab.train.trainer import Trainer

SHORT = [
    "train.max_steps=4",
    "train.log_every=1",
    "train.eval_every=4",
    "train.checkpoint_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "train.grad_accum=2",
    "train.balance_scope=step",
    "model.moe.bias_update_rate=0.01",
    "data.seq_len=32",
]


def losses(run) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["aux_loss"]) for r in RunDir(run).read_metrics() if "loss" in r}


def router_rows(run) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("router.")} for r in RunDir(run).read_metrics()}


def train(out, *overrides: str) -> None:
    cfg = load_config(preset="tiny", overrides=[*SHORT, *overrides])
    Trainer(cfg, out, log=lambda s: None, progress=False).fit()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.compile=maybe", "train.compile = 'maybe' is not allowed: true or false"),
        ("train.activation_checkpointing=1", "train.activation_checkpointing = 1 is not allowed: true or false"),
    ],
)
def test_bad_values_are_refused(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(preset="tiny", overrides=[override])


def test_compile_with_expert_parallelism_is_refused_in_one_line(capsys, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"train.compile = True is not allowed: false with expert parallelism"):
        load_config(preset="tiny", overrides=["train.compile=true", "parallel.expert=2"])
    code = main(["train", "--preset", "tiny", "--quiet", "--set", "train.compile=true", "--set", "parallel.expert=2",
                 "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if line.startswith("moelab: error:")] == [
        "moelab: error: train.compile = True is not allowed: false with expert parallelism (parallel.expert = 2); "
        "compile needs parallel.expert = 1"
    ]
    assert not (tmp_path / "r").exists()


def test_a_toolchain_that_cannot_compile_is_refused_before_any_work(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(
        trainer_module, "compile_problem", lambda device: "no C++ compiler for Inductor on the CPU (test)"
    )
    with pytest.raises(MoelabError, match=r"train.compile = true cannot run on cpu here: no C\+\+ compiler"):
        train(tmp_path / "r", "train.compile=true")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_activation_checkpointing_run_logs_the_plain_runs_numbers(tmp_path) -> None:
    """Losses, aux losses (step-level balancing over 2 micro-batches) and every router metric."""
    train(tmp_path / "plain")
    train(tmp_path / "ac", "train.activation_checkpointing=true")
    want, got = losses(tmp_path / "plain"), losses(tmp_path / "ac")
    assert want.keys() == got.keys() == {1, 2, 3, 4}
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    rows_want, rows_got = router_rows(tmp_path / "plain"), router_rows(tmp_path / "ac")
    for step, row in rows_want.items():
        assert rows_got[step].keys() == row.keys()
        for key, value in row.items():
            assert rows_got[step][key] == pytest.approx(value, abs=1e-6), (step, key)


@pytest.mark.slow
def test_compiled_run_follows_the_eager_curve(tmp_path) -> None:
    if (problem := trainer_module.compile_problem(trainer_module.torch.device("cpu"))) is not None:
        pytest.skip(f"torch.compile cannot run on this CPU: {problem}")
    train(tmp_path / "plain")
    train(tmp_path / "compiled", "train.compile=true", "train.activation_checkpointing=true")
    want, got = losses(tmp_path / "plain"), losses(tmp_path / "compiled")
    assert want.keys() == got.keys()
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-4), step
