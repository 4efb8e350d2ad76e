"""Everything a run resumes from, saved and restored in one place: the weights (through the
runtime), the optimizer, the data position, the random streams, the monitor and the run's counters.

A resume, a rollback and a weights-only start (`moelab import` / `upcycle`) all go through
`Checkpointer.restore`; what a rollback keeps from the failed attempt (time spent, the debug NaN
flag) is decided there too."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moelab.checkpoint import describe_fallback, list_checkpoints
from moelab.config import RunConfig
from moelab.data.loader import BatchLoader
from moelab.errors import CheckpointError
from moelab.model import Transformer
from moelab.rundir import RunDir
from moelab.train.metrics_log import IntervalTotals
from moelab.train.monitor import Monitor
from moelab.train.runtime import Runtime
from moelab.train.schedule import build_optimizer


def fresh_start_state(source: str) -> dict[str, Any]:
    """trainer.pt of a checkpoint written outside training (`moelab import`, `moelab upcycle`): weights
    only. `moelab train --resume` continues from it as a new run would start: step 0, a fresh
    optimizer, and the data order and RNG of train.seed (see Checkpointer.fresh_state)."""
    return {"fresh_start": True, "step": 0, "source": source}


def new_monitor(cfg: RunConfig) -> Monitor:
    moe = cfg.model.moe
    return Monitor(cfg.monitor, moe.num_experts if moe else 0, moe.top_k if moe else 1)


@dataclass
class Counters:
    """Where the run stands."""

    step: int = 0
    tokens: int = 0
    train_s: float = 0.0  # time in training steps (no evaluation or checkpointing)
    wall_s: float = 0.0  # all time spent in this run, over every session
    last_val: float | None = None
    last_val_step: int | None = None  # the step last_val was measured at (None: unknown, older checkpoints)
    nan_injected: bool = False  # the monitor.debug_nan_step hook has fired
    alerts_total: int = 0
    # The logging interval in progress: saved with the checkpoint, so that a resumed run's first
    # metrics line averages the same steps as an uninterrupted run's.
    interval: IntervalTotals = field(default_factory=IntervalTotals)

    def to_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "train_s": self.train_s,
            "wall_s": self.wall_s,
            "last_val": -1.0 if self.last_val is None else self.last_val,
            "last_val_step": -1 if self.last_val_step is None else self.last_val_step,
            "nan_injected": self.nan_injected,
            "alerts_total": self.alerts_total,
            "interval": asdict(self.interval),
        }


class Checkpointer:
    """Saves and restores a run's complete training state (module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        run: RunDir,
        runtime: Runtime,
        model: Transformer,
        optimizer: torch.optim.Optimizer,
        loader: BatchLoader,
        monitor: Monitor,
        protected_steps: frozenset[int],
    ):
        self.cfg = cfg
        self.run = run
        self.runtime = runtime
        self.model = model
        self.optimizer = optimizer
        self.loader = loader
        self.monitor = monitor
        self.protected_steps = protected_steps  # kept whatever keep_checkpoints says

    def list(self) -> list[Path]:
        """(distributed) rank 0's listing for every rank: what follows (evaluate, save, roll back)
        must be the same on all of them, whatever a shared filesystem's caches show each node."""
        return self.runtime.broadcast(list_checkpoints(self.run.path))

    def newest_step(self) -> int | None:
        found = self.list()
        return int(found[-1].name.split("_")[1]) if found else None

    def save(self, counters: Counters) -> None:
        self.runtime.save_checkpoint(
            self.run.path,
            counters.step,
            self.model,
            self.optimizer,
            self._state(counters),
            self.cfg.train.keep_checkpoints,
            self.protected_steps,
        )

    def _state(self, counters: Counters) -> dict[str, Any]:
        state = {
            **counters.to_state(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": json.dumps(random.getstate()),
            "monitor": self.monitor.state_dict(),
            # the logging interval's router statistics so far (this process's; see restore)
            "router_stats": [moe.stats_state() for moe in self.model.moe_layers()],
        }
        if self.runtime.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.runtime.device)
        return state

    def restore(self, checkpoint: Path, counters: Counters, rollback: bool = False) -> None:
        """Load `checkpoint` into the model, optimizer, loader, RNG, monitor and `counters`.

        rollback: the run goes back to an earlier checkpoint within this session. Time already spent
        stays spent, the monitor keeps its retry count and state, and the debug_nan_step flag stays
        as it is (the hook stands for one poisoned batch, which the rollback skips; the
        checkpoint's flag would poison the replayed step again at every retry)."""
        try:
            state = self.runtime.load_checkpoint(checkpoint, self.model)
        except CheckpointError as exc:
            raise CheckpointError(str(exc) + describe_fallback(self.run.path, checkpoint)) from None
        device = self.runtime.device
        self.model.to(device)
        if state.get("fresh_start"):
            state = self.fresh_state()  # a weights-only checkpoint (moelab import / upcycle)
        # (distributed) this rank's optimizer shard, data position and RNG
        state = self.runtime.local_trainer_state(
            state, self.optimizer, self.model, self.loader.batch_size, self.cfg.train.seed
        )
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["torch_rng"])
        python_state = json.loads(state["python_rng"])
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        if "cuda_rng" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        counters.step = int(state["step"])
        counters.tokens = int(state["tokens"])
        counters.last_val = None if state["last_val"] < 0 else float(state["last_val"])
        last_val_step = int(state.get("last_val_step", -1))
        counters.last_val_step = None if last_val_step < 0 else last_val_step
        counters.interval = IntervalTotals()  # a rollback restarts the interval
        if not rollback:
            counters.interval = IntervalTotals(**state.get("interval", {}))
            counters.alerts_total = int(state.get("alerts_total", 0))
            counters.nan_injected = bool(state.get("nan_injected", False))
            counters.train_s = float(state["train_s"])
            counters.wall_s = float(state["wall_s"])
            rollbacks = self.monitor.rollbacks
            self.monitor.load_state_dict(state["monitor"])
            self.monitor.rollbacks = max(rollbacks, self.monitor.rollbacks)
        saved_stats = state.get("router_stats")
        for i, moe in enumerate(self.model.moe_layers()):
            moe.reset_stats()
            moe.load_since_update.zero_()
            # NOTE (distributed): each rank's statistics are its own and only rank 0's are saved, so
            # a resume at another world size restarts them (the first line after it counts the
            # steps since the checkpoint); one process resumes the interval as it was.
            if not rollback and saved_stats is not None and self.runtime.world == 1 and i < len(saved_stats):
                moe.load_stats_state(saved_stats[i])

    def fresh_state(self) -> dict[str, Any]:
        """The trainer state of a new run at step 0 (fresh optimizer, data order and RNG from
        train.seed): what a checkpoint written by `fresh_start_state` resumes into."""
        return {
            **Counters().to_state(),
            "optimizer": build_optimizer(self.model, self.cfg.train).state_dict(),
            "loader": {**self.loader.state_dict(), "epoch": 0, "index": 0},
            "torch_rng": torch.Generator().manual_seed(self.cfg.train.seed).get_state(),
            "python_rng": json.dumps(random.Random(self.cfg.train.seed).getstate()),
            "monitor": new_monitor(self.cfg).state_dict(),
        }

    def roll_back(self, counters: Counters) -> Path | None:
        """Restore the newest checkpoint and continue after the batch that failed (the window since
        the checkpoint is skipped, plus monitor.skip_batches). None, and nothing changed, when the
        retry budget is spent or there is no checkpoint."""
        if self.monitor.rollbacks >= self.cfg.monitor.max_rollbacks:
            return None
        checkpoints = self.list()
        if not checkpoints:
            return None
        self.monitor.rollbacks += 1
        failed_position = self.loader.state_dict()
        self.optimizer.zero_grad(set_to_none=True)
        self.restore(checkpoints[-1], counters, rollback=True)
        self.loader.epoch, self.loader.index = failed_position["epoch"], failed_position["index"]
        self.loader.skip(self.cfg.monitor.skip_batches)
        return checkpoints[-1]
