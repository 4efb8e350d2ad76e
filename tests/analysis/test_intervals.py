"""Intervals over seeds reach their nominal coverage on synthetic data with known noise, and the
verdict follows the interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moelab.analysis.compare import verdicts
from moelab.analysis.curves import compute_multiplier
from moelab.analysis.intervals import (
    Interval,
    judge_gap,
    mean_interval,
    multiplier_interval,
)


def coverage(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_gap_interval_covers_the_true_gap_95_percent_of_the_time(n: int) -> None:
    rng = np.random.default_rng()
    true_gap, sd = rng.uniform(-0.2, 0.2), rng.uniform(0.005, 0.05)
    hits = []
    for _ in range(4000):
        iv = mean_interval(list(true_gap + sd * rng.standard_normal(n)))
        hits.append(iv.lo <= true_gap <= iv.hi)
    # 4000 repetitions: the standard error of the coverage is 0.0034
    assert coverage(hits) == pytest.approx(0.95, abs=0.015)


def test_the_interval_is_the_student_t_one() -> None:
    values = [1.0, 2.0, 4.0]
    iv = mean_interval(values)
    mean, sd = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2 dof)
    assert (iv.mean, iv.lo, iv.hi) == pytest.approx((mean, mean - half, mean + half))
    single = mean_interval([0.3])
    assert single.lo is None and single.hi is None and single.mean == 0.3


def loss_curve(flops: np.ndarray, scale: float) -> np.ndarray:
    """A power law in compute; `scale` < 1 makes a model that needs `scale` times the FLOPs."""
    return 2.0 + 30.0 * (flops / scale) ** -0.15


def test_multiplier_interval_covers_the_true_multiplier_on_noisy_seeded_curves() -> None:
    """Each seed shifts a model's whole curve by a normal offset (what seeds mostly do); the true
    multiplier comes from the noiseless curves."""
    rng = np.random.default_rng()
    flops = np.geomspace(1e12, 3e13, 24)
    true_scale = rng.uniform(0.4, 0.7)
    dense_clean, moe_clean = loss_curve(flops, 1.0), loss_curve(flops, true_scale)
    truth = compute_multiplier(list(flops), list(dense_clean), list(flops), list(moe_clean))
    assert truth == pytest.approx(true_scale, rel=0.02)
    for n in (3, 5):
        hits = []
        for _ in range(1500):
            mults = []
            for _ in range(n):
                dense = dense_clean + 0.003 * rng.standard_normal()
                moe = moe_clean + 0.003 * rng.standard_normal()
                mults.append(compute_multiplier(list(flops), list(dense), list(flops), list(moe)))
            iv = multiplier_interval(mults)
            hits.append(
                iv.lo <= truth <= (math.inf if iv.hi is None else iv.hi)
            )  # None: not reached by a seed, unbounded
        # standard error 0.0056; the multiplier is a smooth function of the offsets, nearly log-normal
        assert coverage(hits) == pytest.approx(0.95, abs=0.03), n


def test_multiplier_interval_edges() -> None:
    assert multiplier_interval([0.7]).mean == 0.7  # one seed: its own value, exactly
    iv = multiplier_interval([0.5, 0.8])
    assert iv.mean == pytest.approx(math.sqrt(0.4)) and iv.lo < 0.5 and iv.hi > 0.8
    unbounded = multiplier_interval([0.6, None, 0.7])
    assert unbounded.hi is None and unbounded.lo is not None
    never = multiplier_interval([None, None])
    assert never.mean == math.inf and never.hi is None


def test_judge_gap_follows_the_interval() -> None:
    assert judge_gap(Interval(-0.1, -0.15, -0.05, 3)) == "wins"
    assert judge_gap(Interval(0.1, 0.05, 0.15, 3)) == "loses"
    assert judge_gap(Interval(-0.01, -0.05, 0.03, 3)) == "tie"
    assert judge_gap(Interval(0.2, None, None, 1)) == "single"


def _results(gaps: list[float], mults: list[float | None]) -> dict:
    gap, mult = mean_interval(gaps), multiplier_interval(mults)
    return {
        "models": {
            "dense": {"val_loss": 3.0},
            "moe": {
                "val_loss": 3.0 + gap.mean,
                "loss_gap": gap.mean,
                "loss_gap_interval": gap.to_dict(),
                "compute_multiplier": mult.mean if math.isfinite(mult.mean) else None,
                "compute_multiplier_interval": mult.to_dict(),
            },
        }
    }


def test_verdict_text_follows_the_interval() -> None:
    win = verdicts(_results([-0.10, -0.12, -0.11], [0.70, 0.72, 0.71]))["moe"]
    assert (
        win["kind"] == "good" and "WINS" in win["text"] and "95% interval" in win["text"] and "3 seeds" in win["text"]
    )
    lose = verdicts(_results([0.18, 0.20, 0.19], [None, None, None]))["moe"]
    assert lose["kind"] == "bad" and "LOSES" in lose["text"]
    # the same mean gap as a win, but too noisy: no verdict
    tie = verdicts(_results([-0.30, 0.05, -0.08], [0.5, 1.1, 0.8]))["moe"]
    assert tie["kind"] == "warn" and "cannot tell" in tie["text"] and "contains 0" in tie["text"]
    single = verdicts(_results([-0.1], [0.7]))["moe"]
    assert "one seed" in single["text"]
