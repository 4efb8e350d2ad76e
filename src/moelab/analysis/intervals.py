"""How sure a comparison is: intervals over seeds and the verdict they allow.

Pure functions, free of I/O, so their coverage can be tested on synthetic data with known noise.

Seed i of the dense model and seed i of an MoE share their initialisation seed and data order, so
the comparison is paired: the interval is a Student-t interval on the per-seed differences
(n - 1 degrees of freedom), which is exact for normal noise and does not need the many seeds a
bootstrap does (with 3 seeds a percentile bootstrap has only 10 distinct resamples, and its nominal
95% interval covered a normal mean 75% of the time in simulation: docs/compare.md). The compute multiplier is a ratio, so its interval is taken on the log scale
and its point estimate is the geometric mean over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float | None  # None: not defined (one seed), or unbounded (a multiplier that was not reached)
    hi: float | None
    n: int
    level: float = LEVEL
    method: str = "paired Student t over seeds"

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self, fmt: str = "{:+.4f}") -> str:
        if self.lo is None and self.hi is None:
            return f"{fmt.format(self.mean)} (one seed, no interval)"
        lo = "-inf" if self.lo is None else fmt.format(self.lo)
        hi = "not reached" if self.hi is None else fmt.format(self.hi)
        return f"{fmt.format(self.mean)} ({self.level:.0%} interval [{lo}, {hi}], {self.n} seeds)"


def t_quantile(level: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """The mean of `values` with a Student-t interval (values are per-seed paired differences)."""
    n = len(values)
    if n == 0:
        raise ValueError("an interval needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, None, None, 1, level)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)


def multiplier_interval(multipliers: Sequence[float | None], level: float = LEVEL) -> Interval:
    """Geometric mean and a t-interval on the log scale of per-seed compute multipliers. A seed
    whose MoE never reached the dense loss (None) makes the upper end unbounded (None); if none
    reached it, the mean is infinite."""
    n = len(multipliers)
    reached = [m for m in multipliers if m is not None]
    method = "Student t over seeds, log scale"
    if not reached:
        return Interval(math.inf, None, None, n, level, method)
    if n == 1:
        return Interval(reached[0], None, None, 1, level, method)
    logs = mean_interval([math.log(m) for m in reached], level)
    mean = math.exp(logs.mean)
    if len(reached) < n:
        # The mean of the seeds that reached it; the interval's upper end is unbounded.
        lo = math.exp(logs.lo) if logs.lo is not None else reached[0]
        return Interval(mean, lo, None, n, level, method)
    return Interval(mean, math.exp(logs.lo), math.exp(logs.hi), n, level, method)


def judge_gap(gap: Interval) -> str:
    """The verdict a final-loss gap (MoE - dense, nats; negative: the MoE is better) allows:
    'wins', 'loses', 'tie' (the interval contains 0) or 'single' (one seed: no interval)."""
    if gap.lo is None or gap.hi is None:
        return "single"
    if gap.hi < 0:
        return "wins"
    if gap.lo > 0:
        return "loses"
    return "tie"
