"""Per-arm tuning for a comparison: the grid each arm is searched over, and the choice.

A comparison is only as good as its worse-tuned arm, so before the final runs every arm (the dense
baseline and each MoE) is trained at each grid point with a fraction of the budget, and its final
runs use its own best point. Each tuning run is a complete, shorter run of the arm's schedule (a
cosine or WSD run with fewer steps ends decayed, like the final run will), not a prefix of a long
one whose learning rate has not come down yet.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from moelab.config import RunConfig
from moelab.errors import MoelabError

# name in --tune -> (config field in [train], value type, what is allowed)
TUNABLE: dict[str, tuple[str, type, str]] = {
    "lr": ("lr", float, "a comma-separated list of learning rates > 0, e.g. lr=1e-3,2e-3,4e-3"),
    "batch": ("batch_size", int, "a comma-separated list of batch sizes (integers >= 1), e.g. batch=16,32"),
    "decay": (
        "decay_fraction",
        float,
        "a comma-separated list of WSD decay fractions in (0, 1], e.g. decay=0.1,0.2,0.4",
    ),
}
# The default learning-rate grid: five values a factor of 2 apart, centred on the preset's.
DEFAULT_LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
DEFAULT_FRACTION = 0.25


@dataclass(frozen=True)
class TuneSpec:
    """What to search. `grid` maps a TUNABLE name to its values; a missing lr means the default
    grid around each arm's own learning rate."""

    grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    fraction: float = DEFAULT_FRACTION

    @staticmethod
    def parse(specs: Sequence[str], fraction: float = DEFAULT_FRACTION) -> "TuneSpec":
        """From the values of --tune: '' (the default grid) or 'name=v1,v2,...' per flag."""
        if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 < fraction <= 1):
            raise MoelabError(
                f"--tune-fraction {fraction!r} is not allowed: the share of each model's budget a tuning run spends, in (0, 1]"
            )
        grid: dict[str, tuple[float, ...]] = {}
        for spec in specs:
            if not spec.strip():
                continue
            name, sep, values = spec.partition("=")
            name = name.strip()
            if not sep or name not in TUNABLE:
                raise MoelabError(
                    f"--tune {spec!r} is not allowed: name=v1,v2,... with name one of {', '.join(TUNABLE)} (e.g. --tune lr=1e-3,2e-3,4e-3)"
                )
            if name in grid:
                raise MoelabError(f"--tune {spec!r} is not allowed: {name} is given twice")
            _, kind, allowed = TUNABLE[name]
            grid[name] = _parse_values(spec, values, kind, allowed, upper=1.0 if name == "decay" else math.inf)
        return TuneSpec(grid, float(fraction))

    def grid_for(self, cfg: RunConfig) -> dict[str, tuple[float, ...]]:
        """The grid of one arm: the default lr grid is centred on the arm's own learning rate."""
        grid = dict(self.grid)
        if "lr" not in grid:
            grid["lr"] = tuple(cfg.train.lr * f for f in DEFAULT_LR_FACTORS)
        if "decay" in grid and cfg.train.schedule != "wsd":
            raise MoelabError(
                f"--tune decay=... tunes train.decay_fraction, which only a wsd schedule uses; this model's schedule is {cfg.train.schedule!r} (--set train.schedule=wsd)"
            )
        return {name: grid[name] for name in TUNABLE if name in grid}

    def to_dict(self) -> dict:
        return {"grid": {k: list(v) for k, v in self.grid.items()}, "fraction": self.fraction}


def _parse_values(spec: str, text: str, kind: type, allowed: str, upper: float) -> tuple[float, ...]:
    values = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and 0 < value <= upper) or (kind is int and value != int(value)):
            raise MoelabError(f"--tune {spec!r} is not allowed: {allowed}")
        values.append(kind(value))
    if not values:
        raise MoelabError(f"--tune {spec!r} is not allowed: {allowed}")
    return tuple(sorted(set(values)))


def grid_points(grid: dict[str, tuple[float, ...]]) -> list[dict[str, float]]:
    """Every combination of the grid's values, in a stable order."""
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def point_label(point: dict[str, float]) -> str:
    return "-".join(f"{name}{value:g}" for name, value in point.items())


def with_point(cfg: RunConfig, point: dict[str, float]) -> RunConfig:
    """`cfg` with a grid point's settings."""
    cfg = copy.deepcopy(cfg)
    for name, value in point.items():
        setattr(cfg.train, TUNABLE[name][0], value)
    return cfg.validate()


@dataclass(frozen=True)
class Choice:
    best: dict[str, float]
    best_loss: float
    warnings: tuple[str, ...]


def choose(arm: str, results: Sequence[tuple[dict[str, float], float]], grid: dict[str, tuple[float, ...]]) -> Choice:
    """The grid point with the lowest final validation loss (a diverged run counts as +inf), and a
    warning for every setting whose best value lies on the edge of its grid: the optimum may lie
    beyond it, so the arm may be under-tuned."""
    finite = [(p, loss) for p, loss in results if math.isfinite(loss)]
    if not finite:
        raise MoelabError(f"every tuning run of {arm} diverged; give a grid of smaller learning rates (--tune lr=...)")
    best, best_loss = min(finite, key=lambda pl: pl[1])
    warnings = []
    for name, values in grid.items():
        if len(values) < 2:
            continue
        if best[name] in (values[0], values[-1]):
            side = "smallest" if best[name] == values[0] else "largest"
            warnings.append(
                f"{arm}: the best {name} ({best[name]:g}) is the {side} value of its grid {[float(f'{v:g}') for v in values]}; "
                f"the optimum may lie beyond it, so extend the grid (--tune {name}=...)"
            )
    return Choice(best, best_loss, tuple(warnings))
