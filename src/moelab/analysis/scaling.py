"""A scaling law for dense and sparse models, its fit with bootstrap uncertainty, and a forecast.

The law joins Chinchilla's separable form with the expert-count interaction of Clark et al. (2022)
("Unified scaling laws for routed language models", where the benefit of more experts shrinks as
the dense size grows) and the additive form of Krajewski et al. (2024):

    L(N, D, E) = c + a * N^-alpha * E^-(b + g * ln(N / N0)) + B * D^-beta

N: active non-embedding parameters, D: training tokens, E: routed experts (1 for a dense model),
N0: a fixed reference size (the geometric mean of the fitted N). b is the benefit exponent of
experts at N0 and g how it changes with size: g < 0 means experts help small models more, and the
benefit vanishes at N = N0 * exp(-b / g). The dense model is E = 1, where the expert factor is 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

PARAM_NAMES = ("c", "a", "alpha", "b", "g", "B", "beta")


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

    def expert_exponent(self, N: float) -> float:
        """b_eff(N) = b + g ln(N / N0): how much each doubling of experts helps at size N."""
        return self.b + self.g * math.log(N / self.n0)

    def loss(self, N, D, E):
        N, D, E = np.asarray(N, float), np.asarray(D, float), np.asarray(E, float)
        exponent = self.b + self.g * np.log(N / self.n0)
        return self.c + self.a * N ** (-self.alpha) * E ** (-exponent) + self.B * D ** (-self.beta)

    def dense_equivalent(self, N: float, E: float) -> float:
        """The dense size whose model term equals the MoE's: N * E^(b_eff(N) / alpha)."""
        return N * E ** (self.expert_exponent(N) / self.alpha)

    def vector(self) -> np.ndarray:
        return np.array([getattr(self, n) for n in PARAM_NAMES])

    @staticmethod
    def from_vector(v: Sequence[float], n0: float) -> "Law":
        return Law(*[float(x) for x in v], n0=n0)

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


def _residuals(v: np.ndarray, n0: float, N, D, E, L) -> np.ndarray:
    law = Law.from_vector(v, n0)
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
    rng = np.random.default_rng(seed)
    lower = np.array([0.0, 1e-6, 0.01, -2.0, -2.0, 1e-6, 0.01])
    upper = np.array([L.min(), 1e6, 1.5, 2.0, 2.0, 1e6, 1.5])
    best = None
    for i in range(restarts):
        start = np.array([
            L.min() * rng.uniform(0.2, 0.9),
            10 ** rng.uniform(0, 3),
            rng.uniform(0.1, 0.6),
            rng.uniform(0.0, 0.3),
            rng.uniform(-0.1, 0.05),
            10 ** rng.uniform(0, 3),
            rng.uniform(0.1, 0.6),
        ])
        start = np.clip(start, lower + 1e-9, upper - 1e-9)
        try:
            res = least_squares(_residuals, start, bounds=(lower, upper), args=(n0, N, D, E, L), max_nfev=4000)
        except ValueError:
            continue
        if best is None or res.cost < best.cost:
            best = res
    law = Law.from_vector(best.x, n0)
    pred = law.loss(N, D, E)
    ss_res = float(((pred - L) ** 2).sum())
    ss_tot = float(((L - L.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    rmse = float(np.sqrt((best.fun ** 2).mean()))
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
    advantage_at_fit: float  # at the largest fitted dense size, same tokens per parameter
    worth_at_fit: float  # dense-equivalent size / active size of the MoE, largest fitted size
    worth_at_target: float  # the same at the target size
    trend: str  # grows | shrinks | flips | holds (of the dense-equivalent size ratio)
    why: str
    warnings: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def forecast(fit: Fit, points: Sequence[Point], N: float, D: float, E: float, extrapolation_limit: float = 10.0) -> Forecast:
    """Dense and MoE loss at (N, D) with E experts, the MoE advantage there against the largest
    fitted size, and warnings when the prediction leaves the fitted range or the fit is poor."""
    law = fit.law
    dense, moe = float(law.loss(N, D, 1.0)), float(law.loss(N, D, E))
    boots = fit.bootstrap or [law]
    dense_b = np.array([float(b.loss(N, D, 1.0)) for b in boots])
    moe_b = np.array([float(b.loss(N, D, E)) for b in boots])
    ci = lambda v: (float(np.percentile(v, 5)), float(np.percentile(v, 95)))
    n_max = max(p.N for p in points)
    d_at_max = max((p.D for p in points if p.N == n_max), default=max(p.D for p in points))
    ratio = D / N  # compare at the same tokens per parameter
    d_fit = n_max * ratio if ratio > 0 else d_at_max
    adv_fit = float(law.loss(n_max, d_fit, 1.0) - law.loss(n_max, d_fit, E))
    adv = dense - moe
    adv_b = dense_b - moe_b
    warnings = []
    n_factor, d_factor = N / n_max, D / max(p.D for p in points)
    if n_factor > extrapolation_limit:
        warnings.append(f"extrapolation: {N:.3g} parameters is {n_factor:.0f}x the largest fitted model ({n_max:.3g}); treat the numbers as a trend, not a prediction")
    if d_factor > extrapolation_limit:
        warnings.append(f"extrapolation: {D:.3g} tokens is {d_factor:.0f}x the most tokens fitted ({max(p.D for p in points):.3g})")
    if fit.r2 < 0.9 or fit.rmse_log > 0.03:
        warnings.append(f"poor fit: R^2 = {fit.r2:.3f}, rms log residual {fit.rmse_log:.3f} over {fit.points} runs; add runs or sizes before trusting the forecast")
    lo, hi = ci(adv_b)
    if lo < 0 < hi:
        warnings.append(f"uncertain sign: the 90% interval of the MoE advantage ({lo:+.3f}, {hi:+.3f}) includes zero")
    b_fit, b_target = law.expert_exponent(n_max), law.expert_exponent(N)
    # NOTE: the absolute loss gap shrinks with size for any law (the reducible loss shrinks), so the
    # trend is judged on a scale-free measure: the dense size the MoE is worth, N * E^(b_eff/alpha).
    worth_fit, worth_target = law.dense_equivalent(n_max, E) / n_max, law.dense_equivalent(N, E) / N
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
        f"the MoE is worth a dense model {worth_fit:.2f}x its active size at the largest fitted size and "
        f"{worth_target:.2f}x at the target, because the fitted expert exponent b_eff(N) = b + g ln(N/N0) goes from "
        f"{b_fit:+.3f} to {b_target:+.3f} (g = {law.g:+.3f}: "
        + ("experts help less as models grow" if law.g < 0 else "experts help more as models grow" if law.g > 0 else "no size dependence")
        + f"); in loss, the advantage goes from {adv_fit:+.4f} to {adv:+.4f} nats at the same tokens per parameter"
        + ("" if b_target > 0 else "; at the target size more experts are predicted to hurt")
    )
    extra = {"worth_at_fit": worth_fit, "worth_at_target": worth_target}
    return Forecast(N, D, E, dense, moe, ci(dense_b), ci(moe_b), adv, (lo, hi), adv_fit, extra["worth_at_fit"], extra["worth_at_target"], trend, why, warnings)
