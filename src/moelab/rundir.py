"""The run directory every command reads and writes.

<run>/
    config.toml      the resolved RunConfig (reproduces the run)
    tokenizer.json   the run's tokenizer
    data.json        what was trained on (corpus, token counts, cache key)
    metrics.jsonl    one JSON object per logging interval or evaluation
    alerts.jsonl     router-health and guardrail alerts
    summary.json     final numbers, written when training ends
    checkpoints/     step_NNNNNNN/ (see moelab.checkpoint)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moelab.checkpoint import (
    MODEL_FILE,
    describe_fallback,
    list_checkpoints,
    load_weights,
    refuse_sharded,
    verify_checkpoint,
)
from moelab.config import RunConfig, build_config, read_toml
from moelab.data.tokenizer import TextTokenizer
from moelab.errors import CheckpointError, MoelabError
from moelab.files import read_jsonl, write_atomic
from moelab.model import Transformer


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.toml")
    tokenizer_path = property(lambda self: self.path / "tokenizer.json")
    data_path = property(lambda self: self.path / "data.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    alerts_path = property(lambda self: self.path / "alerts.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")

    def is_run(self) -> bool:
        return self.config_path.is_file()

    def check_free(self) -> None:
        """Refuse a path that is a file, lies below a file, holds another run, or holds other files
        (absent is free)."""
        if not self.path.exists():
            existing = next((p for p in self.path.parents if p.exists()), None)
            if existing is not None and not existing.is_dir():
                raise MoelabError(
                    f"output path {self.path} lies below {existing}, which is a file; give a directory for --out"
                )
            return
        if not self.path.is_dir():
            raise MoelabError(f"output path {self.path} is a file; give a directory for --out")
        if self.is_run():
            raise MoelabError(
                f"output directory {self.path} holds another run already; continue it with --resume (a run that "
                "stopped before its first checkpoint starts again from step 0) or choose another --out"
            )
        if any(self.path.iterdir()):
            raise MoelabError(f"output directory {self.path} is not empty; choose a new or empty directory for --out")

    def create(self, cfg: RunConfig, replace_unstarted: bool = False) -> None:
        """Make a new run directory; refuse one that holds another run or other files.

        replace_unstarted: the directory holds a run that stopped before its first checkpoint
        (`--resume` on it): its logs describe no kept step and go; config and files are rewritten."""
        if replace_unstarted and self.is_run() and not self.checkpoints():
            for path in (self.metrics_path, self.alerts_path, self.summary_path):
                path.unlink(missing_ok=True)
        else:
            self.check_free()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MoelabError(f"cannot create the run directory {self.path}: {exc.strerror}") from None
        write_atomic(self.config_path, cfg.to_toml())

    def load_config(self) -> RunConfig:
        if not self.is_run():
            raise MoelabError(f"{self.path} is not a moelab run directory (no config.toml)")
        return build_config(read_toml(self.config_path))

    def load_tokenizer(self) -> TextTokenizer:
        return TextTokenizer.load(self.tokenizer_path)

    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.path)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def read_summary(self) -> dict[str, Any] | None:
        if not self.summary_path.is_file():
            return None
        return json.loads(self.summary_path.read_text())


def resolve_checkpoint(path: str | Path) -> tuple[RunDir, Path]:
    """A run directory (its newest checkpoint) or a checkpoint directory -> (run, checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise MoelabError(f"{path} does not exist; give a run directory or one of its checkpoints")
    if (path / MODEL_FILE).is_file() or (path / "manifest.json").is_file():
        run = RunDir(path.parent.parent)
        if not run.is_run():
            raise MoelabError(f"{path} looks like a checkpoint but {run.path} is not its run directory")
        return run, path
    run = RunDir(path)
    if not run.is_run():
        raise MoelabError(f"{path} is not a moelab run directory (no config.toml) or checkpoint")
    checkpoints = run.checkpoints()
    if not checkpoints:
        raise MoelabError(f"run {path} has no checkpoint yet")
    return run, checkpoints[-1]


@dataclass
class LoadedModel:
    run: RunDir
    checkpoint: Path
    cfg: RunConfig
    model: Transformer
    tokenizer: TextTokenizer
    step: int


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a run's (or a checkpoint's) model for evaluation or inference, in eval mode."""
    run, checkpoint = resolve_checkpoint(path)
    try:
        manifest = verify_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise CheckpointError(str(exc) + describe_fallback(run.path, checkpoint)) from None
    refuse_sharded(checkpoint)
    cfg = run.load_config()
    tokenizer = run.load_tokenizer()
    model = Transformer(cfg.model)
    load_weights(model, checkpoint / MODEL_FILE)
    model.to(device).eval()
    return LoadedModel(run, checkpoint, cfg, model, tokenizer, int(manifest["step"]))
