"""Per-arm tuning: the grid, the choice on a synthetic objective with a known optimum, the edge
warning, and a tuned, seeded comparison's plumbing with a synthetic trainer."""

from __future__ import annotations

import json
import math
import random

import pytest

import moelab.analysis.compare as compare_mod
import moelab.analysis.runs as runs_mod
from moelab.analysis.budget import Budget
from moelab.analysis.compare import compare
from moelab.analysis.tuning import DEFAULT_LR_FACTORS, TuneSpec, choose, grid_points
from moelab.config import load_config
from moelab.errors import MoelabError


def test_parse_and_default_grid() -> None:
    spec = TuneSpec.parse(["lr=4e-3, 1e-3,2e-3", "batch=32,16"], 0.5)
    assert spec.grid == {"lr": (1e-3, 2e-3, 4e-3), "batch": (16, 32)} and spec.fraction == 0.5
    cfg = load_config(preset="tiny")
    default = TuneSpec.parse([""]).grid_for(cfg)
    assert default == {"lr": tuple(cfg.train.lr * f for f in DEFAULT_LR_FACTORS)}
    assert len(default["lr"]) == 5 and all(b / a == 2 for a, b in zip(default["lr"], default["lr"][1:]))
    assert len(grid_points(spec.grid_for(cfg))) == 6


@pytest.mark.parametrize(
    "spec, fraction, message",
    [
        (["lr=abc"], 0.25, "--tune 'lr=abc'"),
        (["lr="], 0.25, "--tune 'lr='"),
        (["lr=1e-3,-2e-3"], 0.25, "learning rates > 0"),
        (["lr=0"], 0.25, "learning rates > 0"),
        (["batch=1.5"], 0.25, "batch sizes"),
        (["decay=1.5"], 0.25, "decay fractions in (0, 1]"),
        (["momentum=0.9"], 0.25, "name one of lr, batch, decay"),
        (["lr=1e-3", "lr=2e-3"], 0.25, "given twice"),
        ([""], 0.0, "--tune-fraction"),
        ([""], 1.5, "--tune-fraction"),
        ([""], math.nan, "--tune-fraction"),
    ],
)
def test_bad_grids_are_refused(spec, fraction, message) -> None:
    with pytest.raises(MoelabError) as err:
        TuneSpec.parse(spec, fraction)
    assert message in str(err.value)


def test_decay_needs_a_wsd_schedule() -> None:
    with pytest.raises(MoelabError, match="wsd"):
        TuneSpec.parse(["decay=0.1,0.2"]).grid_for(load_config(preset="tiny"))


def objective(lr: float, optimum: float) -> float:
    """A loss that is quadratic in log2(lr), lowest at `optimum`."""
    return 3.0 + 0.05 * math.log2(lr / optimum) ** 2


def test_choose_finds_the_true_optimum_and_warns_only_on_an_edge() -> None:
    optimum = 2.0 ** random.randint(-10, -6)
    grid = {"lr": tuple(optimum * 2.0**i for i in (-2, -1, 0, 1, 2))}
    points = [({"lr": lr}, objective(lr, optimum)) for lr in grid["lr"]]
    random.shuffle(points)
    choice = choose("dense", points, grid)
    assert choice.best == {"lr": optimum} and not choice.warnings
    edge_grid = {"lr": tuple(optimum * 2.0**i for i in (-4, -3, -2))}
    choice = choose("moe", [({"lr": lr}, objective(lr, optimum)) for lr in edge_grid["lr"]], edge_grid)
    assert choice.best == {"lr": optimum / 4}
    assert len(choice.warnings) == 1 and "largest value" in choice.warnings[0] and "moe" in choice.warnings[0]
    # a diverged point never wins; all diverged is an error naming the arm
    assert choose("x", [({"lr": 1.0}, math.inf), ({"lr": 0.5}, 9.0)], {"lr": (0.5, 1.0)}).best == {"lr": 0.5}
    with pytest.raises(MoelabError, match="every tuning run of x diverged"):
        choose("x", [({"lr": 1.0}, math.inf)], {"lr": (1.0,)})


class SyntheticTrainer:
    """Stands in for training: the final loss is objective(lr, the arm's optimum) plus a per-seed
    offset, and the evaluation curve is a power law ending there."""

    def __init__(self, optima: dict[str, float], gap: float, noise: float):
        self.optima, self.gap, self.noise = optima, gap, noise
        self.trained: list[tuple[str, float, int, int]] = []
        self.curves: dict[str, tuple[list, list, list]] = {}
        self.offsets: dict[tuple[str, int], float] = {}

    def arm(self, cfg) -> str:
        return "dense" if cfg.model.moe is None else "moe"

    def train_or_reuse(self, name, cfg, run, log, progress, checkpoint_steps=frozenset()):
        arm = self.arm(cfg)
        seed = cfg.train.seed
        self.trained.append((arm, cfg.train.lr, seed, cfg.train.max_steps))
        offset = self.offsets.setdefault((arm, seed), self.noise * random.gauss(0, 1))
        final = objective(cfg.train.lr, self.optima[arm]) + (self.gap if arm == "moe" else 0.0) + offset
        steps = list(range(0, cfg.train.max_steps + 1, max(1, cfg.train.max_steps // 8)))
        flops = [1e9 * (s + 1) for s in steps]
        losses = [final + 2.0 * ((s + 1) ** -0.5 - (steps[-1] + 1) ** -0.5) for s in steps]
        self.curves[str(run)] = (flops, [float(s) for s in steps], losses)
        return {
            "val_loss": final,
            "step": cfg.train.max_steps,
            "stopped_by": "max_steps",
            "params": {"total": 1, "active": 1},
            "train_flops_per_token": 1.0,
            "flops": flops[-1],
            "tokens": 1,
            "tokens_per_s": 1.0,
            "train_s": 1.0,
            "wall_s": 1.0,
            "peak_memory_bytes": 1,
        }


@pytest.fixture
def synthetic(monkeypatch):
    def install(optima, gap, noise):
        trainer = SyntheticTrainer(optima, gap, noise)
        monkeypatch.setattr(runs_mod, "train_or_reuse", trainer.train_or_reuse)
        monkeypatch.setattr(runs_mod, "run_is_finished", lambda run, cfg: False)
        monkeypatch.setattr(compare_mod, "eval_curve", lambda run: trainer.curves[str(run)])
        monkeypatch.setattr(compare_mod, "inference_tokens_per_s", lambda run: 1.0)
        return trainer

    return install


def test_each_arm_runs_its_finals_at_its_own_optimum(tmp_path, synthetic) -> None:
    """The dense model's optimum is 4x the MoE's: a shared learning rate would handicap one arm."""
    cfg = load_config(preset="tiny")
    trainer = synthetic({"dense": 8e-3, "moe": 2e-3}, gap=-0.05, noise=0.002)
    spec = TuneSpec.parse(["lr=1e-3,2e-3,4e-3,8e-3,1.6e-2"], 0.25)
    results = compare(
        [("moe", cfg)],
        tmp_path / "c",
        Budget("tokens", 16384),
        tune=spec,
        seeds=3,
        log=lambda s: None,
        progress=False,
    )
    tuning_runs = [t for t in trainer.trained if t[3] == 8]  # 0.25 of 32 steps
    assert len(tuning_runs) == 10 and {t[2] for t in tuning_runs} == {0}
    finals = [t for t in trainer.trained if t[3] == 32]
    assert sorted((a, lr, s) for a, lr, s, _ in finals) == sorted(
        [("dense", 8e-3, s) for s in (0, 1, 2)] + [("moe", 2e-3, s) for s in (0, 1, 2)]
    )
    assert results["tuning"]["dense"]["best"] == {"lr": 8e-3} and results["tuning"]["moe"]["best"] == {"lr": 2e-3}
    assert not results["caveats"]
    moe = results["models"]["moe"]
    assert moe["settings"]["lr"] == 2e-3 and results["models"]["dense"]["settings"]["lr"] == 8e-3
    gaps = [m - d for m, d in zip(moe["val_loss_seeds"], results["models"]["dense"]["val_loss_seeds"])]
    assert moe["loss_gap_seeds"] == pytest.approx(gaps)
    iv = moe["loss_gap_interval"]
    assert iv["lo"] < -0.05 < iv["hi"] and iv["hi"] < 0 and moe["verdict"] == "wins"
    saved = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert saved["models"]["moe"]["verdict"] == "wins"
    plan = json.loads((tmp_path / "c" / "plan.json").read_text())
    assert len(plan["runs"]) == 16 and plan["seeds"] == [0, 1, 2]
    # once tuned, plan.json names each final run's directory by its arm's chosen settings
    finals = {(r["arm"], r["seed"]): r["path"] for r in plan["runs"] if r["stage"] == "final"}
    assert finals[("dense", 0)].endswith("runs/dense-lr0.008") and finals[("moe", 2)].endswith("runs/moe-lr0.002-seed2")
    html = (tmp_path / "c" / "report.html").read_text()
    assert "Tuning" in html and html.count("data:image/png;base64,") == 3


def test_a_shared_setting_is_reported_as_untuned_and_an_edge_optimum_warns(tmp_path, synthetic) -> None:
    cfg = load_config(preset="tiny")
    synthetic({"dense": 8e-3, "moe": 8e-3}, gap=0.0, noise=0.0)
    results = compare([("moe", cfg)], tmp_path / "u", Budget("tokens", 16384), log=lambda s: None, progress=False)
    assert any(c.startswith("Untuned") for c in results["caveats"]) and any("One seed" in c for c in results["caveats"])
    spec = TuneSpec.parse(["lr=1e-3,2e-3"], 0.5)
    results = compare(
        [("moe", cfg)],
        tmp_path / "e",
        Budget("tokens", 16384),
        tune=spec,
        log=lambda s: None,
        progress=False,
    )
    assert sum("largest value" in c for c in results["caveats"]) == 2
