"""The run's logs as training writes them: metrics.jsonl rows and alerts.jsonl, on the main process.

metrics.jsonl is the source of truth every reader uses (diagnose, compare, the report); rows are
appended one JSON object per line, so a crash loses at most the line being written. Every row
passes through `MetricsLog.write`, which also hands it to the experiment trackers of
`train.report_to` (moelab.train.trackers) while a `tracking` block is open."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from moelab.config import RunConfig
from moelab.files import read_jsonl, write_atomic
from moelab.rundir import RunDir
from moelab.train.monitor import Alert
from moelab.train.trackers import Trackers


@dataclass
class IntervalTotals:
    """What the steps since the last logging interval add up to."""

    loss: float = 0.0
    aux: float = 0.0
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0

    def add(self, loss: float, aux: float, seconds: float, tokens: int) -> None:
        self.loss += loss
        self.aux += aux
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class MetricsLog:
    """Appends rows to a run's metrics.jsonl and alerts.jsonl; writes nothing where `enabled` is
    False (the other ranks of a distributed run)."""

    def __init__(self, run: RunDir, enabled: bool):
        self.run = run
        self.enabled = enabled
        self.trackers = Trackers([], log=print)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.run.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.trackers.log(record)

    @contextmanager
    def tracking(self, cfg: RunConfig, first_step: int, log: Callable[[str], None]) -> Iterator[None]:
        """Inside the block, rows also go to the trackers of cfg.train.report_to (main process
        only); they are closed when it ends, marked failed when it ends with an exception.
        `first_step`: 0 for a new run, else the step after the last row metrics.jsonl kept."""
        if not (self.enabled and cfg.train.report_to):
            yield
            return
        self.trackers = Trackers.open(cfg.train.report_to, self.run.path, cfg, first_step, log)
        failed = True
        try:
            yield
            failed = False
        finally:
            self.trackers.close(failed)

    def alert(self, alert: Alert, tokens: int) -> None:
        """The alert in alerts.jsonl, and as an event row in metrics.jsonl."""
        if self.enabled:
            with open(self.run.alerts_path, "a") as f:
                f.write(json.dumps(alert.to_dict()) + "\n")
        row = {
            "step": alert.step,
            "tokens": tokens,
            "event": "alert",
            "rule": alert.rule,
            "action": alert.action,
            "message": alert.message,
        }
        if alert.layer is not None:
            row["layer"] = alert.layer  # diagnose reads it; older runs had only the message text
        self.write(row)

    def truncate(self, step: int) -> None:
        """Drop rows newer than the checkpoint a resumed run restarts from."""
        if self.enabled:
            rows = [r for r in read_jsonl(self.run.metrics_path) if r.get("step", 0) <= step]
            write_atomic(self.run.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
