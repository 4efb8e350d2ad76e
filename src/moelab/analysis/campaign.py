"""Progress across the runs of a study: run i of n, and an ETA from the runs trained so far.

A tuned, seeded comparison makes dozens of runs; the per-run progress bar says nothing about the
whole. The ETA assumes time proportional to training FLOPs, measured on the runs this invocation
trained (reused runs cost nothing and say nothing about the machine's speed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from moelab.train.progress import format_duration


@dataclass(frozen=True)
class PlannedRun:
    name: str
    flops: float  # planned training FLOPs (for the ETA)


class Campaign:
    def __init__(self, runs: list[PlannedRun], log: Callable[[str], None], clock: Callable[[], float] = time.monotonic):
        self.runs = {r.name: r for r in runs}
        self.order = [r.name for r in runs]
        self.log = log
        self.clock = clock
        self.done: set[str] = set()
        self.trained_flops = 0.0
        self.trained_s = 0.0
        self._started: tuple[str, float] | None = None

    def remaining_flops(self) -> float:
        return sum(self.runs[n].flops for n in self.order if n not in self.done)

    def eta_s(self) -> float | None:
        """Seconds left at the speed measured so far; None before any run was trained here."""
        if self.trained_flops <= 0:
            return None
        return self.remaining_flops() * self.trained_s / self.trained_flops

    def start(self, name: str) -> None:
        index = self.order.index(name) + 1
        eta = self.eta_s()
        when = f"ETA {format_duration(eta)}" if eta is not None else "ETA after the first trained run"
        self.log(f"== run {index} of {len(self.order)}: {name} ({len(self.done)} done; {when})")
        self._started = (name, self.clock())

    def finish(self, name: str, trained: bool) -> None:
        """Mark a run done; `trained` says whether it was trained here (not reused)."""
        if trained and self._started is not None and self._started[0] == name:
            self.trained_s += self.clock() - self._started[1]
            self.trained_flops += self.runs[name].flops
        self.done.add(name)
        self._started = None
