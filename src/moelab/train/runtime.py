"""What the trainer asks of the processes it runs on, one interface for one process or many.

`Runtime` is the interface; `SingleProcess` is one process on one device, and
moelab.distributed.Distributed is torchrun's data and expert parallelism with the same methods. The
trainer calls the runtime and never asks which one it has: `runtime_for(cfg)` picks.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from moelab.checkpoint import is_sharded, load_checkpoint, save_checkpoint
from moelab.config import RunConfig
from moelab.device import resolve_device
from moelab.distributed import Distributed
from moelab.distributed import wanted as distributed_wanted
from moelab.distributed.sharded import load_sharded_single
from moelab.model.health import LayerHealth, router_health


class Runtime(Protocol):
    """The trainer's view of the processes: who writes, how gradients, statistics and
    checkpoints combine, and where the model lives."""

    device: torch.device

    @property
    def rank(self) -> int: ...
    @property
    def world(self) -> int: ...
    @property
    def is_main(self) -> bool: ...
    @property
    def full_model_here(self) -> bool: ...
    def describe(self) -> str: ...
    def summary(self, cfg: RunConfig) -> dict[str, Any]: ...

    # coordination
    def barrier(self) -> None: ...
    def main_first_begin(self) -> None: ...
    def main_first_end(self) -> None: ...
    def broadcast(self, obj: Any) -> Any: ...
    def any(self, flag: bool) -> bool: ...
    def mean(self, *values: float) -> list[float]: ...
    def sum(self, *values: float) -> list[float]: ...

    # the model
    def shard(self, model: nn.Module) -> None: ...
    def seed_rank(self, seed: int) -> None: ...
    def wrap(self, model: nn.Module) -> nn.Module: ...
    def no_sync(self, train_model: nn.Module, last_micro_batch: bool) -> AbstractContextManager: ...
    def finish_backward(self, model: nn.Module) -> None: ...
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float: ...
    def update_router_biases(self, model: nn.Module) -> None: ...
    def router_health(self, model: nn.Module, with_similarity: bool) -> dict[int, LayerHealth]: ...
    def eval_rows(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]: ...

    # checkpoints
    def save_checkpoint(
        self,
        run_dir: Path,
        step: int,
        model: nn.Module,
        optimizer,
        trainer_state: dict[str, Any],
        keep: int,
        protected: frozenset[int],
    ) -> None: ...
    def load_checkpoint(self, path: Path, model: nn.Module) -> dict[str, Any]: ...
    def local_trainer_state(
        self, state: dict[str, Any], optimizer, model: nn.Module, batch_per_rank: int, seed: int
    ) -> dict[str, Any]: ...


class SingleProcess:
    """One process, one device: every collective is the identity, every statistic is local."""

    rank = 0
    world = 1
    is_main = True
    full_model_here = True

    def __init__(self, device: torch.device):
        self.device = device

    def describe(self) -> str:
        return ""  # nothing worth a line: the model line names the device

    def summary(self, cfg: RunConfig) -> dict[str, Any]:
        return {}

    def barrier(self) -> None:
        pass

    def main_first_begin(self) -> None:
        pass

    def main_first_end(self) -> None:
        pass

    def broadcast(self, obj: Any) -> Any:
        return obj

    def any(self, flag: bool) -> bool:
        return flag

    def mean(self, *values: float) -> list[float]:
        return list(values)

    def sum(self, *values: float) -> list[float]:
        return list(values)

    def shard(self, model: nn.Module) -> None:
        pass

    def seed_rank(self, seed: int) -> None:
        pass

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def no_sync(self, train_model: nn.Module, last_micro_batch: bool) -> AbstractContextManager:
        return nullcontext()

    def finish_backward(self, model: nn.Module) -> None:
        pass

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def update_router_biases(self, model: nn.Module) -> None:
        model.update_router_biases()

    def router_health(self, model: nn.Module, with_similarity: bool) -> dict[int, LayerHealth]:
        return router_health(model, model.router_stats(), with_similarity)

    def eval_rows(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        return x, y, True

    def save_checkpoint(
        self,
        run_dir: Path,
        step: int,
        model: nn.Module,
        optimizer,
        trainer_state: dict[str, Any],
        keep: int,
        protected: frozenset[int],
    ) -> None:
        save_checkpoint(run_dir, step, model, trainer_state, keep, protected)  # the optimizer is in trainer_state

    def load_checkpoint(self, path: Path, model: nn.Module) -> dict[str, Any]:
        if is_sharded(path):  # written by FSDP ranks: read whole, without a process group
            return load_sharded_single(path, model)
        return load_checkpoint(path, model, map_location="cpu")  # RNG states must stay on the CPU

    def local_trainer_state(
        self, state: dict[str, Any], optimizer, model: nn.Module, batch_per_rank: int, seed: int
    ) -> dict[str, Any]:
        return state


def runtime_for(cfg: RunConfig) -> Runtime:
    """torchrun's data and expert parallelism when launched that way (moelab.distributed,
    docs/distributed.md), else one process on train.device."""
    if distributed_wanted(cfg):
        return Distributed.from_env(cfg)
    return SingleProcess(resolve_device(cfg.train.device))
