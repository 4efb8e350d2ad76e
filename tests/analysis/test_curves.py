"""Compute multiplier and Pareto frontier on synthetic curves with known answers."""

from __future__ import annotations

import random

import pytest

from moelab.analysis.curves import compute_multiplier, first_crossing, pareto_front


def power_curve(flops, a, b, c):
    return [a * f ** (-b) + c for f in flops]


def test_multiplier_recovers_a_known_compute_ratio() -> None:
    """A candidate whose loss at FLOPs f equals the baseline's at 2f needs half the compute."""
    flops = [1e9 * 1.5**i for i in range(1, 25)]
    baseline = power_curve(flops, 50.0, 0.2, 1.0)
    candidate = power_curve([2 * f for f in flops], 50.0, 0.2, 1.0)
    mult = compute_multiplier(flops, baseline, flops, candidate)
    # interpolation between evaluation points is linear, so allow a small error
    assert mult == pytest.approx(0.5, rel=0.03)


def test_multiplier_exact_on_piecewise_linear_curves() -> None:
    baseline_flops = [0, 10, 20, 30, 40]
    baseline_loss = [5.0, 4.0, 3.5, 3.2, 3.0]
    candidate_flops = [0, 10, 20, 30, 40]
    candidate_loss = [5.0, 3.6, 3.2, 2.8, 2.5]
    # target 3.0 reached between 20 (3.2) and 30 (2.8): 20 + 0.2/0.4 * 10 = 25 -> 25/40
    assert compute_multiplier(baseline_flops, baseline_loss, candidate_flops, candidate_loss) == pytest.approx(25 / 40)


def test_multiplier_none_when_never_reached_and_first_crossing_edges() -> None:
    assert compute_multiplier([1, 2, 3], [3.0, 2.0, 1.0], [1, 2, 3], [3.0, 2.5, 1.5]) is None
    assert first_crossing([1, 2, 3], [0.5, 0.4, 0.3], 1.0) == 1.0  # already below at the first point
    with pytest.raises(ValueError):
        first_crossing([1, 2], [1.0], 0.5)


def brute_force_front(points):
    front = []
    for i, (c, l) in enumerate(points):
        dominated = any((c2 <= c and l2 <= l) and (c2 < c or l2 < l) for j, (c2, l2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def test_pareto_front_matches_brute_force_on_random_points() -> None:
    rng = random.Random(0)
    for _ in range(200):
        points = [(rng.randint(1, 20), rng.randint(1, 20)) for _ in range(rng.randint(1, 12))]
        front = pareto_front(points)
        expected = brute_force_front(points)
        # duplicates of a frontier point: keep one
        assert sorted({points[i] for i in front}) == sorted({points[i] for i in expected})


def test_pareto_front_known_answer() -> None:
    points = [(1.0, 5.0), (2.0, 4.0), (3.0, 4.5), (4.0, 3.0), (5.0, 3.0), (6.0, 2.0)]
    assert pareto_front(points) == [0, 1, 3, 5]
