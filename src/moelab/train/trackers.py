"""Experiment trackers (`train.report_to`): TensorBoard and Weights & Biases, fed the rows of
metrics.jsonl as `MetricsLog.write` appends them, on the main process only. metrics.jsonl stays the
source of truth; a tracker is a view of it.

One row becomes one `TrackerRow` (`tracker_row`), the same for every tracker, at the row's training step:

    train/<key>             every number of a training line (loss, aux_loss, lr, grad_norm,
                            tokens_per_s, tokens, flops, train_s, elapsed_s, balance_*, ...)
    val/loss, val/ppl       an evaluation line's val_loss and val_ppl
    router/<layer>/<name>   every number of a layer's router health (imbalance, cv, maxvio,
                            entropy, effective_experts, collapse_score, max_logit, z_loss, dead, ...):
                            metrics.jsonl's router.<layer>.<name>
    router/<layer>/expert_load   the layer's load share per expert, as a histogram over the expert
                            index (height = share of the interval's token-slots)
    router/expert_load      all layers' loads as one heatmap image (rows = MoE layers, columns =
                            experts; white = balanced, red = above, blue = below the mean load)
    events                  alert, rollback and stop lines, as text

Resuming: metrics.jsonl keeps the rows up to the checkpoint's step; TensorBoard drops its events
after that step (SummaryWriter's purge_step) and W&B continues the run whose id is stored in
<run>/wandb/run_id (a new offline segment with the same id; `wandb sync` joins them).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from moelab.config import RunConfig
from moelab.errors import MoelabError
from moelab.extras import require
from moelab.model.health import health_from_metrics

# the modules each tracker imports (all in the `track` extra; images need pillow)
TRACKER_MODULES = {"tensorboard": ("tensorboard", "PIL"), "wandb": ("wandb", "PIL")}
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # wandb.init(dir=<run>) writes <run>/wandb/
WANDB_ID_FILE = "run_id"


def require_trackers(names: Sequence[str]) -> None:
    """Refuse, in one line naming the package and the extra, a tracker whose package is missing;
    call it before any work starts."""
    for name in names:
        require(f"train.report_to {name!r}", "track", *TRACKER_MODULES[name])


# ---------------------------------------------------------------------------------------------
# One metrics row, as the trackers see it


@dataclass
class TrackerRow:
    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    expert_load: dict[int, list[float]] = field(default_factory=dict)  # layer -> share per expert
    event: str | None = None  # an alert, rollback or stop, as one line


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def tracker_row(record: dict[str, Any]) -> TrackerRow:
    """A metrics.jsonl row under the trackers' names (this module's docstring lists them)."""
    row = TrackerRow(step=int(record.get("step", 0)))
    if "event" in record:
        row.event = event_text(record)
        return row
    if "val_loss" in record:
        for key, value in record.items():
            if key.startswith("val_") and (number := _number(value)) is not None:
                row.scalars[f"val/{key[4:]}"] = number
        return row
    for key, value in record.items():
        if key != "step" and not key.startswith("router.") and (number := _number(value)) is not None:
            row.scalars[f"train/{key}"] = number
    for layer, health in health_from_metrics(record).items():
        for f in fields(health):
            if (number := _number(getattr(health, f.name))) is not None:
                row.scalars[f"router/{layer}/{f.name}"] = number
        row.expert_load[layer] = list(health.share)
    return row


def event_text(record: dict[str, Any]) -> str:
    kind = record["event"]
    if kind == "rollback":
        return f"step {record['step']}: rolled back to step {record.get('to_step')} ({record.get('rule')})"
    layer = f" layer {record['layer']}" if record.get("layer") is not None else ""
    action = f" -> {record['action']}" if record.get("action") else ""
    return f"step {record['step']}: {kind} [{record.get('rule')}{action}]{layer} {record.get('message', '')}"


def load_heatmap(expert_load: dict[int, list[float]], max_width: int = 512) -> np.ndarray:
    """[H, W, 3] uint8: one row of cells per MoE layer, one column per expert, coloured by the
    expert's load relative to the mean (share * E): white at 1, saturated red at 2 or more, blue
    towards 0."""
    layers = sorted(expert_load)
    relative = np.array([[s * len(expert_load[i]) for s in expert_load[i]] for i in layers], dtype=np.float64)
    relative = np.nan_to_num(relative, nan=0.0)
    E = relative.shape[1]
    cell_w = max(1, min(32, max_width // max(E, 1)))
    cell_h = max(4, min(32, 256 // max(len(layers), 1)))
    over = np.clip(relative - 1.0, 0.0, 1.0)[..., None]  # 0..1 above the mean
    under = np.clip(1.0 - relative, 0.0, 1.0)[..., None]  # 0..1 below it
    white, red, blue = np.array([255.0, 255, 255]), np.array([200.0, 30, 30]), np.array([30.0, 60, 200])
    rgb = white + over * (red - white) + under * (blue - white)
    return np.repeat(np.repeat(rgb, cell_h, axis=0), cell_w, axis=1).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The trackers


class Tracker(Protocol):
    name: str

    def log(self, row: TrackerRow) -> None: ...

    def close(self, failed: bool) -> None: ...


class TensorBoardTracker:
    """Event files in <run>/tensorboard/, written with torch.utils.tensorboard's SummaryWriter."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, cfg: RunConfig, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # NOTE: purge_step makes TensorBoard drop the events at and after first_step that an
        # earlier session wrote (the rows metrics.jsonl dropped when this run resumed), so a
        # resumed run shows each step once.
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=first_step, flush_secs=10)
        if first_step == 0:
            self.writer.add_text("config", "```\n" + cfg.to_toml() + "```", 0)

    def log(self, row: TrackerRow) -> None:
        for name, value in row.scalars.items():
            self.writer.add_scalar(name, value, row.step)
        for layer, share in row.expert_load.items():
            if share and math.isfinite(sum(share)):
                self._expert_histogram(f"router/{layer}/expert_load", share, row.step)
        if row.expert_load:
            self.writer.add_image("router/expert_load", load_heatmap(row.expert_load), row.step, dataformats="HWC")
        if row.event is not None:
            self.writer.add_text("events", row.event, row.step)

    def _expert_histogram(self, tag: str, share: list[float], step: int) -> None:
        """The share per expert as a histogram whose buckets are the expert indices."""
        index = np.arange(len(share), dtype=np.float64)
        weight = np.asarray(share, dtype=np.float64)
        self.writer.add_histogram_raw(
            tag,
            min=0.0,
            max=float(len(share) - 1),
            num=float(weight.sum()),
            sum=float((index * weight).sum()),
            sum_squares=float((index * index * weight).sum()),
            bucket_limits=(index + 0.5).tolist(),
            bucket_counts=weight.tolist(),
            global_step=step,
        )

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run in <run>/wandb/, offline unless WANDB_MODE says otherwise (upload
    it later with `wandb sync <run>/wandb/offline-run-*`). The run id is kept in <run>/wandb/run_id
    so that a resumed training run continues the same W&B run."""

    name = "wandb"

    def __init__(self, run_dir: Path, cfg: RunConfig, first_step: int):
        import wandb

        self._wandb = wandb
        directory = run_dir / WANDB_DIR
        directory.mkdir(parents=True, exist_ok=True)
        id_file = directory / WANDB_ID_FILE
        resuming = first_step > 0 and id_file.is_file()
        run_id = id_file.read_text().strip() if resuming else uuid.uuid4().hex[:12]
        if not resuming:
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            dir=str(run_dir),
            project=os.environ.get("WANDB_PROJECT", "moelab"),
            name=run_dir.name,
            id=run_id,
            resume="allow" if resuming else None,
            config=cfg.to_dict(),
            mode=os.environ.get("WANDB_MODE") or "offline",
            reinit="create_new",  # beside any run the caller has open
            settings=wandb.Settings(silent=True, console="off", save_code=False),
        )
        self.last_step = -1
        self.events: list[list[Any]] = []

    def log(self, row: TrackerRow) -> None:
        # NOTE: a W&B history only moves forward; after a rollback the retried steps are left out
        # here (metrics.jsonl and TensorBoard have them) until training passes the failed step.
        if row.step < self.last_step:
            return
        self.last_step = row.step
        payload: dict[str, Any] = dict(row.scalars)
        wandb = self._wandb
        for layer, share in row.expert_load.items():
            if share and math.isfinite(sum(share)):
                edges = np.arange(len(share) + 1, dtype=np.float64) - 0.5
                payload[f"router/{layer}/expert_load"] = wandb.Histogram(np_histogram=(share, edges.tolist()))
        if row.expert_load:
            payload["router/expert_load"] = wandb.Image(load_heatmap(row.expert_load), caption="MoE layer x expert")
        if row.event is not None:
            self.events.append([row.step, row.event])
            payload["events"] = wandb.Table(columns=["step", "event"], data=[list(e) for e in self.events])
        if payload:
            self.run.log(payload, step=row.step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


TRACKERS: dict[str, Callable[[Path, RunConfig, int], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
}


class Trackers:
    """The trackers of one training session: each row goes to all of them. A tracker that fails
    while logging is closed and dropped with one line (training goes on; metrics.jsonl has every
    row)."""

    def __init__(self, trackers: list[Tracker], log: Callable[[str], None]):
        self.trackers = trackers
        self.say = log

    @classmethod
    def open(
        cls, names: Sequence[str], run_dir: Path, cfg: RunConfig, first_step: int, log: Callable[[str], None]
    ) -> Trackers:
        """Start the trackers named; `first_step` is the first step this session may log (0 for a
        new run; after a resume, the checkpoint's step + 1: later events are dropped)."""
        opened = cls([], log)
        for name in names:
            try:
                opened.trackers.append(TRACKERS[name](run_dir, cfg, first_step))
            except Exception as exc:
                opened.close(failed=True)
                raise MoelabError(f"cannot start the {name} tracker (train.report_to): {exc}") from exc
        return opened

    def log(self, record: dict[str, Any]) -> None:
        if not self.trackers:
            return
        row = tracker_row(record)
        for tracker in list(self.trackers):
            try:
                tracker.log(row)
            except Exception as exc:
                self.say(f"the {tracker.name} tracker failed ({exc}); it is closed, metrics.jsonl keeps every row")
                self.trackers.remove(tracker)
                self._close(tracker, failed=True)

    def close(self, failed: bool) -> None:
        for tracker in self.trackers:
            self._close(tracker, failed)
        self.trackers = []

    def _close(self, tracker: Tracker, failed: bool) -> None:
        try:
            tracker.close(failed)
        except Exception as exc:  # closing must not hide the error that ended training
            self.say(f"the {tracker.name} tracker did not close cleanly: {exc}")
