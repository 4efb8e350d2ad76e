"""Atomic, verifiable checkpoints.

<run>/checkpoints/step_000123/
    model.safetensors   weights (tied LM head stored once)
    trainer.pt          optimizer, RNG, loader and trainer counters; loaded with weights_only=True
    manifest.json       sha256 and size of each file; written last

A checkpoint is written into a hidden temporary directory and renamed into place, so a crash leaves
either nothing or a complete checkpoint. Loading verifies every hash first and names the damaged
file, offering the newest checkpoint that is still intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moelab.errors import CheckpointError

MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
MANIFEST_FILE = "manifest.json"
PREFIX = "step_"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (hidden temporary directories excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's persistent state with shared storage stored once (a tied LM head is dropped)."""
    state, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else None
        if key is not None and key in seen:
            continue  # e.g. lm_head.weight tied to embed.weight
        if key is not None:
            seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    return state


def save_weights(
    model: nn.Module, path: Path, metadata: dict[str, str] | None = None, state: dict[str, torch.Tensor] | None = None
) -> None:
    """`state`: weights already assembled (distributed training gathers the experts from their
    ranks, moelab.distributed.checkpoint); default: the model's own state."""
    save_file(model_state(model) if state is None else state, str(path), metadata=metadata or {})


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`; tied weights are restored by the module itself."""
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    expected = model_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    trainer_state: dict[str, Any],
    keep: int,
    protected: frozenset[int] = frozenset(),
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` checkpoints
    (checkpoints at `protected` steps are kept too). `weights`: see `save_weights`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_weights(model, tmp / MODEL_FILE, {"format": "moelab", "step": str(step)}, state=weights)
        torch.save(trainer_state, tmp / TRAINER_FILE)
        files = {}
        for name in (MODEL_FILE, TRAINER_FILE):
            _fsync(tmp / name)
            files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        manifest = {"step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST_FILE)
        if final.exists():  # re-saving a step (after a rollback): replace it as one rename
            trash = root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        if int(old.name[len(PREFIX) :]) not in protected:
            shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check the manifest and every file's hash; return the manifest or raise naming the file."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} is damaged: {manifest_path} is not a valid manifest") from None
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {file} is missing")
        if file.stat().st_size != info["bytes"] or sha256_file(file) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {file} does not match its sha256 in the manifest")
    return manifest


def describe_fallback(run_dir: Path, bad: Path) -> str:
    """A sentence offering the newest intact checkpoint older than `bad`, if any."""
    for candidate in reversed(list_checkpoints(run_dir)):
        if candidate == bad or int(candidate.name[len(PREFIX) :]) >= int(bad.name[len(PREFIX) :]):
            continue
        try:
            verify_checkpoint(candidate)
        except CheckpointError:
            continue
        return f"; the previous good checkpoint is {candidate}: resume from it with --resume {candidate}"
    return "; no earlier intact checkpoint exists"


def load_checkpoint(path: Path, model: nn.Module, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify, then load weights into `model` and return the trainer state."""
    verify_checkpoint(path)
    load_weights(model, Path(path) / MODEL_FILE)
    return torch.load(Path(path) / TRAINER_FILE, map_location=map_location, weights_only=True)
