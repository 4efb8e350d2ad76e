"""The scaling-law fit recovers known constants from noisy synthetic runs; the forecast warns."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moelab.analysis.scaling import Law, Point, bootstrap, fit_law, forecast

TRUE = Law(c=1.7, a=30.0, alpha=0.3, b=0.12, g=-0.02, B=60.0, beta=0.28, n0=1.0)


def synthetic(law: Law, noise: float, seed: int) -> list[Point]:
    rng = np.random.default_rng(seed)
    points = []
    for N, D, E in itertools.product([2e5, 5e5, 1.2e6, 3e6, 8e6], [1e6, 4e6, 1.6e7], [1, 8, 32]):
        loss = float(law.loss(N, D, E)) * float(np.exp(rng.normal(0, noise)))
        points.append(Point(N, D, E, loss))
    return points


def test_fit_recovers_known_constants_from_noisy_synthetic_data() -> None:
    n0 = float(np.exp(np.mean(np.log([2e5, 5e5, 1.2e6, 3e6, 8e6]))))
    law = Law(**{**TRUE.to_dict(), "n0": n0})
    points = synthetic(law, noise=0.003, seed=1)
    fit = fit_law(points)
    got = fit.law
    assert fit.r2 > 0.99
    assert got.alpha == pytest.approx(law.alpha, abs=0.05)
    assert got.beta == pytest.approx(law.beta, abs=0.05)
    assert got.b == pytest.approx(law.b, abs=0.02)
    assert got.g == pytest.approx(law.g, abs=0.01)
    assert got.c == pytest.approx(law.c, abs=0.1)
    # predictions inside the range match the true law closely
    for N, D, E in [(1e6, 5e6, 8), (4e6, 1e7, 32), (3e5, 2e6, 1)]:
        assert float(got.loss(N, D, E)) == pytest.approx(float(law.loss(N, D, E)), rel=0.01)


def test_bootstrap_intervals_cover_the_truth() -> None:
    n0 = float(np.exp(np.mean(np.log([2e5, 5e5, 1.2e6, 3e6, 8e6]))))
    law = Law(**{**TRUE.to_dict(), "n0": n0})
    points = synthetic(law, noise=0.005, seed=2)
    fit = bootstrap(points, fit_law(points), samples=30, seed=3)
    spread = fit.spread()
    assert len(fit.bootstrap) >= 25
    for name in ("alpha", "b", "beta"):
        lo, hi = spread[name]
        assert lo <= getattr(law, name) <= hi, name


def test_forecast_says_flip_and_warns_on_extrapolation() -> None:
    n0 = float(np.exp(np.mean(np.log([2e5, 5e5, 1.2e6, 3e6, 8e6]))))
    law = Law(**{**TRUE.to_dict(), "n0": n0})
    points = synthetic(law, noise=0.002, seed=4)
    fit = bootstrap(points, fit_law(points), samples=10, seed=5)
    # b_eff(N) = 0.12 - 0.02 ln(N/n0) crosses 0 at N = n0 * e^6 ~ 1e9: beyond, experts hurt
    far = forecast(fit, points, N=1e11, D=2e12, E=8)
    assert far.trend == "flips"
    assert far.moe > far.dense
    assert any("extrapolation" in w and "parameters" in w for w in far.warnings)
    near = forecast(fit, points, N=3e6, D=1.2e7, E=8)
    assert near.trend in ("holds", "shrinks", "grows")
    assert near.advantage > 0
    assert not any("extrapolation" in w for w in near.warnings)


def test_forecast_grows_when_experts_help_more_at_scale() -> None:
    law = Law(c=1.5, a=30.0, alpha=0.3, b=0.05, g=0.02, B=60.0, beta=0.3, n0=1.2e6)
    points = synthetic(law, noise=0.001, seed=6)
    fit = fit_law(points)
    result = forecast(fit, points, N=3e7, D=1.2e8, E=8)
    assert result.trend == "grows"


def test_fit_refuses_unidentifiable_ladders() -> None:
    with pytest.raises(ValueError, match="at least 8"):
        fit_law([Point(1e6, 1e6, 1, 3.0)] * 3)
    with pytest.raises(ValueError, match="dense and MoE"):
        fit_law([Point(1e6 * (i + 1), 1e6 * (i % 2 + 1), 1, 3.0 - i * 0.01) for i in range(10)])
