"""A scaling law for dense and sparse models, its fit with bootstrap uncertainty, and a forecast.

The law joins Chinchilla's separable form with the expert-count interaction of Clark et al. (2022)
("Unified scaling laws for routed language models", where the benefit of more experts shrinks as
the dense size grows) and the additive form of Krajewski et al. (2024):

    L(N, D, E) = c + a * N^-alpha * E^-(b + g * ln(N / N0) + h * ln(D / D0)) + B * D^-beta

N: active non-embedding parameters, D: training tokens, E: routed experts (1 for a dense model),
N0, D0: fixed reference points (the geometric means of the fitted N and D). b is the benefit
exponent of experts at (N0, D0); g how it changes with size (g < 0: experts help small models more,
and the benefit vanishes at N = N0 * exp(-b / g)); h how it changes with training length. The h term
is moelab's: small MoE runs lead their dense twins early and lose the lead as training goes on
(docs/recipe.md), and a law whose expert benefit cannot depend on D forecasts a growing advantage
that a longer run refutes. The dense model is E = 1, where the expert factor is 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

PARAM_NAMES = ("c", "a", "alpha", "b", "g", "B", "beta", "h")


@dataclass(frozen=True)
class Point:
    N: float  # active non-embedding parameters
    D: float  # training tokens
    E: float  # routed experts (1 = dense)
    loss: float
    label: str = ""


@dataclass
class Law:
    c: float
    a: float
    alpha: float
    b: float
    g: float
    B: float
    beta: float
    n0: float
    h: float = 0.0
    d0: float = 1.0

    def expert_exponent(self, N: float, D: float | None = None) -> float:
        """b_eff(N, D) = b + g ln(N / N0) + h ln(D / D0): how much each doubling of experts helps
        at size N after D tokens (D0 when not given)."""
        return self.b + self.g * math.log(N / self.n0) + (self.h * math.log(D / self.d0) if D else 0.0)

    def loss(self, N, D, E):
        N, D, E = np.asarray(N, float), np.asarray(D, float), np.asarray(E, float)
        exponent = self.b + self.g * np.log(N / self.n0) + self.h * np.log(D / self.d0)
        return self.c + self.a * N ** (-self.alpha) * E ** (-exponent) + self.B * D ** (-self.beta)

    def dense_equivalent(self, N: float, E: float, D: float | None = None) -> float:
        """The dense size whose model term equals the MoE's: N * E^(b_eff(N, D) / alpha)."""
        return N * E ** (self.expert_exponent(N, D) / self.alpha)

    def vector(self) -> np.ndarray:
        return np.array([getattr(self, n) for n in PARAM_NAMES])

    @staticmethod
    def from_vector(v: Sequence[float], n0: float, d0: float = 1.0) -> "Law":
        return Law(**dict(zip(PARAM_NAMES, (float(x) for x in v))), n0=n0, d0=d0)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Fit:
    law: Law
    r2: float  # of the loss values
    rmse_log: float  # root mean square residual of log(loss)
    points: int
    bootstrap: list[Law] = field(default_factory=list)

    def spread(self) -> dict[str, tuple[float, float]]:
        """(2.5th, 97.5th) percentile of every constant over the bootstrap fits."""
        if not self.bootstrap:
            return {}
        values = np.array([b.vector() for b in self.bootstrap])
        lo, hi = np.percentile(values, [2.5, 97.5], axis=0)
        return {n: (float(l), float(h)) for n, l, h in zip(PARAM_NAMES, lo, hi)}


def _residuals(v: np.ndarray, n0: float, d0: float, N, D, E, L) -> np.ndarray:
    law = Law.from_vector(v, n0, d0)
    pred = law.loss(N, D, E)
    return np.log(np.clip(pred, 1e-9, None)) - np.log(L)


def fit_law(points: Sequence[Point], restarts: int = 24, seed: int = 0) -> Fit:
    """Least squares on log loss (robust to the loss scale) from many starting points; the best
    fit wins. Needs at least 8 points, dense (E = 1) and sparse, at 2+ sizes and 2+ token counts."""
    from scipy.optimize import least_squares

    if len(points) < 8:
        raise ValueError(f"a scaling fit needs at least 8 runs; got {len(points)}")
    N = np.array([p.N for p in points], float)
    D = np.array([p.D for p in points], float)
    E = np.array([p.E for p in points], float)
    L = np.array([p.loss for p in points], float)
    if len(set(N)) < 2 or len(set(D)) < 2 or not (E == 1).any() or not (E > 1).any():
        raise ValueError("a scaling fit needs dense and MoE runs at two or more sizes and two or more token budgets")
    n0 = float(np.exp(np.log(N).mean()))
    d0 = float(np.exp(np.log(D).mean()))
    rng = np.random.default_rng(seed)
    lower = np.array([0.0, 1e-6, 0.01, -2.0, -2.0, 1e-6, 0.01, -2.0])
    upper = np.array([L.min(), 1e6, 1.5, 2.0, 2.0, 1e6, 1.5, 2.0])
    best = None
    for i in range(restarts):
        start = np.array(
            [
                L.min() * rng.uniform(0.2, 0.9),
                10 ** rng.uniform(0, 3),
                rng.uniform(0.1, 0.6),
                rng.uniform(0.0, 0.3),
                rng.uniform(-0.1, 0.05),
                10 ** rng.uniform(0, 3),
                rng.uniform(0.1, 0.6),
                rng.uniform(-0.05, 0.05),
            ]
        )
        start = np.clip(start, lower + 1e-9, upper - 1e-9)
        try:
            res = least_squares(_residuals, start, bounds=(lower, upper), args=(n0, d0, N, D, E, L), max_nfev=4000)
        except ValueError:
            continue
        if best is None or res.cost < best.cost:
            best = res
    law = Law.from_vector(best.x, n0, d0)
    pred = law.loss(N, D, E)
    ss_res = float(((pred - L) ** 2).sum())
    ss_tot = float(((L - L.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    rmse = float(np.sqrt((best.fun**2).mean()))
    return Fit(law=law, r2=r2, rmse_log=rmse, points=len(points))


def bootstrap(points: Sequence[Point], fit: Fit, samples: int = 100, seed: int = 0) -> Fit:
    """Refit on resampled runs (with replacement) to get the constants' uncertainty."""
    rng = np.random.default_rng(seed)
    laws = []
    for i in range(samples):
        idx = rng.integers(0, len(points), len(points))
        sample = [points[j] for j in idx]
        try:
            laws.append(fit_law(sample, restarts=6, seed=seed + i + 1).law)
        except ValueError:
            continue  # a resample without both architectures or sizes: not identifiable
    fit.bootstrap = laws
    return fit


LEVEL = 0.95  # of every forecast and backtest interval


@dataclass
class Forecast:
    N: float
    D: float
    E: float
    dense: float
    moe: float
    dense_ci: tuple[float, float]
    moe_ci: tuple[float, float]
    advantage: float  # dense - moe (positive: the MoE is better)
    advantage_ci: tuple[float, float]
    advantage_at_fit: float  # at the ladder's largest rung (largest size, most tokens there)
    worth_at_fit: float  # dense-equivalent size / active size of the MoE at that rung
    worth_at_target: float  # the same at the target size
    trend: str  # grows | shrinks | flips | holds (of the dense-equivalent size ratio)
    why: str
    warnings: list[str]
    level: float = LEVEL

    def to_dict(self) -> dict:
        return asdict(self)


def residual_scale(fit: Fit) -> float:
    """The residual standard error of log loss, corrected for the fitted constants (a law with
    8 constants fitted on 10 runs leaves residuals far smaller than a new run's scatter)."""
    dof = fit.points - len(PARAM_NAMES)
    return fit.rmse_log * math.sqrt(fit.points / max(1, dof))


def prediction_samples(
    fit: Fit, N: float, D: float, E: float, rng: np.random.Generator, count: int = 2000
) -> np.ndarray:
    """Losses a new run at (N, D, E) could measure: every bootstrap law's prediction times the
    residual scatter of log loss (a prediction interval, not only the uncertainty of the fitted
    constants, which alone misses what a held-out run measures)."""
    boots = fit.bootstrap or [fit.law]
    predictions = np.repeat([float(b.loss(N, D, E)) for b in boots], max(1, count // len(boots)))
    return predictions * np.exp(rng.normal(0.0, residual_scale(fit), predictions.shape))


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def token_axis_trend(points: Sequence[Point]) -> list[tuple[float, float, float, float, float]]:
    """The measured MoE advantage (dense - MoE loss) at the fewest and the most tokens of each
    size that has both: (N, D_min, advantage at D_min, D_max, advantage at D_max). Dense and MoE
    points pair by label ('dense-wW-tT' / 'moe-wW-tT', as the ladder names them) and D; points
    without such labels pair by N to three significant figures and D."""
    by_key: dict[tuple[str, float], dict[str, Point]] = {}
    for p in points:
        kind = "dense" if p.E == 1 else "moe"
        key = p.label.split("-", 1)[1].rsplit("-t", 1)[0] if "-" in p.label else f"{p.N:.3g}"
        by_key.setdefault((key, p.D), {})[kind] = p
    rungs: dict[str, list[tuple[float, float, float]]] = {}
    for (key, D), pair in by_key.items():
        if "dense" in pair and "moe" in pair:
            rungs.setdefault(key, []).append((D, pair["dense"].loss - pair["moe"].loss, pair["moe"].N))
    out = []
    for key, rows in rungs.items():
        if len(rows) >= 2:
            rows.sort()
            out.append((rows[0][2], rows[0][0], rows[0][1], rows[-1][0], rows[-1][1]))
    return sorted(out)


def forecast(
    fit: Fit, points: Sequence[Point], N: float, D: float, E: float, extrapolation_limit: float = 10.0
) -> Forecast:
    """Dense and MoE loss at (N, D) with E experts, the MoE advantage there against the largest
    fitted size, and warnings when the prediction leaves the fitted range, the fit is poor, or the
    ladder's own advantage shrinks with training tokens."""
    law = fit.law
    dense, moe = float(law.loss(N, D, 1.0)), float(law.loss(N, D, E))
    adv = dense - moe
    rng = np.random.default_rng(0)
    dense_s, moe_s = prediction_samples(fit, N, D, 1.0, rng), prediction_samples(fit, N, D, E, rng)
    n_max = max(p.N for p in points)
    # NOTE: the trend is judged from the ladder's largest rung (its widest model at the most tokens
    # it trained) to the target, so that both the size and the token axis of the law count.
    d_fit = max((p.D for p in points if p.N == n_max), default=max(p.D for p in points))
    adv_fit = float(law.loss(n_max, d_fit, 1.0) - law.loss(n_max, d_fit, E))
    warnings = []
    n_factor, d_factor = N / n_max, D / max(p.D for p in points)
    if n_factor > extrapolation_limit:
        warnings.append(
            f"extrapolation: {N:.3g} parameters is {n_factor:.0f}x the largest fitted model ({n_max:.3g}); treat the numbers as a trend, not a prediction"
        )
    if d_factor > extrapolation_limit:
        warnings.append(
            f"extrapolation: {D:.3g} tokens is {d_factor:.0f}x the most tokens fitted ({max(p.D for p in points):.3g})"
        )
    if fit.r2 < 0.9 or fit.rmse_log > 0.03:
        warnings.append(
            f"poor fit: R^2 = {fit.r2:.3f}, rms log residual {fit.rmse_log:.3f} over {fit.points} runs; add runs or sizes before trusting the forecast"
        )
    lo, hi = interval(dense_s - moe_s)
    if lo < 0 < hi:
        warnings.append(
            f"uncertain sign: the {LEVEL:.0%} interval of the MoE advantage ({lo:+.3f}, {hi:+.3f}) includes zero"
        )
    # NOTE: a shrink smaller than a tenth of the advantage (or 0.005 nats) is within run-to-run noise.
    by_size = token_axis_trend(points)
    shrinking = [t for t in by_size if t[2] - t[4] > max(0.1 * abs(t[2]), 0.005)]
    if shrinking:
        pairs = "; ".join(
            f"N={n:.3g}: {a0:+.3f} at {d0:.3g} tokens -> {a1:+.3f} at {d1:.3g}" for n, d0, a0, d1, a1 in shrinking
        )
        warnings.append(
            f"the measured MoE advantage shrinks with training tokens at {len(shrinking)} of {len(by_size)} sizes ({pairs}): "
            "small MoE runs lead early and lose ground late, so a longer run may end with less advantage than the ladder shows; "
            "add longer (or cooled-down) rungs and check the backtest"
        )
    b_fit, b_target = law.expert_exponent(n_max, d_fit), law.expert_exponent(N, D)
    # NOTE: the absolute loss gap shrinks with size for any law (the reducible loss shrinks), so the
    # trend is judged on a scale-free measure: the dense size the MoE is worth, N * E^(b_eff/alpha).
    worth_fit, worth_target = law.dense_equivalent(n_max, E, d_fit) / n_max, law.dense_equivalent(N, E, D) / N
    if worth_target < 1.0 <= worth_fit or (adv < 0 <= adv_fit):
        trend = "flips"
    elif worth_target < 1.0:
        trend = "holds" if worth_fit < 1.0 else "flips"
    elif worth_target > worth_fit * 1.02:
        trend = "grows"
    elif worth_target < worth_fit / 1.02:
        trend = "shrinks"
    else:
        trend = "holds"
    why = (
        f"the MoE is worth a dense model {worth_fit:.2f}x its active size at the ladder's largest rung and "
        f"{worth_target:.2f}x at the target, because the fitted expert exponent b_eff = b + g ln(N/N0) + h ln(D/D0) goes from "
        f"{b_fit:+.3f} to {b_target:+.3f} (g = {law.g:+.3f}: "
        + (
            "experts help less as models grow"
            if law.g < 0
            else "experts help more as models grow"
            if law.g > 0
            else "no size dependence"
        )
        + f"; h = {law.h:+.3f}: "
        + (
            "experts help less as training gets longer"
            if law.h < 0
            else "experts help more as training gets longer"
            if law.h > 0
            else "no token dependence"
        )
        + f"); in loss, the advantage goes from {adv_fit:+.4f} nats there to {adv:+.4f} at the target"
        + ("" if b_target > 0 else "; at the target more experts are predicted to hurt")
    )
    return Forecast(
        N,
        D,
        E,
        dense,
        moe,
        interval(dense_s),
        interval(moe_s),
        adv,
        (lo, hi),
        adv_fit,
        worth_fit,
        worth_target,
        trend,
        why,
        warnings,
    )


@dataclass
class Backtest:
    """The law fitted without one rung of the ladder, against what that rung measured."""

    rung: str
    N: float
    D: float
    E: float
    predicted: dict[str, float]  # dense, moe, advantage
    interval: dict[str, tuple[float, float]]
    measured: dict[str, float]
    error_percent: dict[str, float]  # (predicted - measured) / measured, dense and moe
    covered: dict[str, bool]
    fitted_runs: int
    level: float = LEVEL

    def to_dict(self) -> dict:
        return asdict(self)


def backtest(
    train: Sequence[Point], dense: Point, moe: Point, rung: str, samples: int = 100, seed: int = 0
) -> Backtest:
    """Fit on `train` (the ladder without the held-out rung), predict the rung's dense and MoE loss
    and their difference with prediction intervals, and compare with what the rung measured."""
    fit = bootstrap(train, fit_law(train), samples=samples, seed=seed)
    d_pred = float(fit.law.loss(dense.N, dense.D, 1.0))
    m_pred = float(fit.law.loss(moe.N, moe.D, moe.E))
    rng = np.random.default_rng(seed)
    d_s, m_s = prediction_samples(fit, dense.N, dense.D, 1.0, rng), prediction_samples(fit, moe.N, moe.D, moe.E, rng)
    predicted = {"dense": d_pred, "moe": m_pred, "advantage": d_pred - m_pred}
    measured = {"dense": dense.loss, "moe": moe.loss, "advantage": dense.loss - moe.loss}
    intervals = {"dense": interval(d_s), "moe": interval(m_s), "advantage": interval(d_s - m_s)}
    return Backtest(
        rung=rung,
        N=moe.N,
        D=moe.D,
        E=moe.E,
        predicted=predicted,
        interval=intervals,
        measured=measured,
        error_percent={k: 100.0 * (predicted[k] - measured[k]) / measured[k] for k in ("dense", "moe")},
        covered={k: intervals[k][0] <= measured[k] <= intervals[k][1] for k in predicted},
        fitted_runs=len(train),
    )
