"""Pure functions on learning curves and trade-off tables: compute multiplier, Pareto frontier.

Kept free of I/O so they can be tested on synthetic curves with known answers.
"""

from __future__ import annotations

from collections.abc import Sequence


def first_crossing(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """The smallest x at which the piecewise-linear curve (xs, ys) first reaches y <= target,
    interpolated between evaluation points; None if it never does. xs must be increasing."""
    if len(xs) != len(ys):
        raise ValueError("xs and ys must have the same length")
    for i, y in enumerate(ys):
        if y <= target:
            if i == 0:
                return float(xs[0])
            x0, y0, x1, y1 = xs[i - 1], ys[i - 1], xs[i], y
            if y0 == y1:
                return float(x1)
            return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0))
    return None


def compute_multiplier(
    baseline_flops: Sequence[float],
    baseline_loss: Sequence[float],
    candidate_flops: Sequence[float],
    candidate_loss: Sequence[float],
) -> float | None:
    """Fraction of the baseline's training FLOPs at which the candidate first reached the baseline's
    final loss (interpolated on the candidate's evaluation curve). < 1 means the candidate needs
    less compute for the same quality; None means it never reached it within its budget."""
    target = baseline_loss[-1]
    total = baseline_flops[-1]
    if total <= 0:
        raise ValueError("the baseline curve must end at a positive FLOP count")
    crossing = first_crossing(candidate_flops, candidate_loss, target)
    return None if crossing is None else crossing / total


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when both coordinates are to be minimised
    (cost, loss): no other point is at least as good in both and better in one. Sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front
