"""Run directories made outside training (`moelab import`, `moelab upcycle`).

They hold what every command reads (config.toml, tokenizer.json, optional data.json) and one
checkpoint, step_0000000, whose trainer state says "fresh start" (moelab.train.checkpointer
.fresh_start_state): moelab.rundir.load_model reads it like any run, and `moelab train --out RUN
--resume` trains it with a new optimizer from step 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from moelab.checkpoint import save_checkpoint
from moelab.config import RunConfig
from moelab.errors import MoelabError
from moelab.files import write_atomic
from moelab.rundir import RunDir
from moelab.train.checkpointer import fresh_start_state


def check_new_run_dir(out: str | Path) -> None:
    """Refuse an output path that holds anything (the same rule as RunDir.create, checked early)."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise MoelabError(f"output directory {path} is not empty; choose a new or empty directory")


def write_fresh_run(
    out: str | Path,
    cfg: RunConfig,
    model: nn.Module,
    tokenizer_files: dict[str, Path],
    source: str,
    data_meta: dict | None = None,
) -> RunDir:
    """Create run directory `out` (refusing one in use) with `model` as its step-0 checkpoint.

    tokenizer_files maps a file name in the run (tokenizer.json, tokenizer_config.json, ...) to the
    file to copy there; `source` says where the weights came from (kept in trainer.pt and data.json)."""
    run = RunDir(out)
    run.create(cfg)
    for name, src in tokenizer_files.items():
        shutil.copyfile(src, run.path / name)
    meta = dict(data_meta or {})
    meta["origin"] = source
    write_atomic(run.data_path, json.dumps(meta, indent=1))
    save_checkpoint(run.path, 0, model, fresh_start_state(source), keep=1)
    return run
