"""Atomic, verifiable checkpoints.

<run>/checkpoints/step_000123/
    model.safetensors   weights (tied LM head stored once)
    trainer.pt          optimizer, RNG, loader and trainer counters; loaded with weights_only=True
    manifest.json       sha256 and size of each file; written last

A sharded checkpoint (FSDP, train.checkpoint_format = "sharded"; moelab.distributed.sharded) has
dcp/ (torch.distributed.checkpoint files) instead of model.safetensors, and "format": "sharded" in
its manifest, which hashes the DCP files too.

A checkpoint is written into a hidden temporary directory and renamed into place, so a crash leaves
either nothing or a complete checkpoint. Loading verifies every hash first and names the damaged
file, offering the newest checkpoint that is still intact.
"""

from __future__ import annotations

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
from moelab.files import sha256_file

MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
MANIFEST_FILE = "manifest.json"
PREFIX = "step_"
SHARDED_DIR = "dcp"  # a sharded checkpoint's torch.distributed.checkpoint files
DCP_METADATA = ".metadata"


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
    tmp = begin_checkpoint(run_dir, step)
    try:
        save_weights(model, tmp / MODEL_FILE, {"format": "moelab", "step": str(step)}, state=weights)
        torch.save(trainer_state, tmp / TRAINER_FILE)
        return finish_checkpoint(run_dir, step, tmp, keep, protected)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """The hidden temporary directory checkpoint `step` is written into (see finish_checkpoint)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{checkpoint_dir(run_dir, step).name}-", dir=root))


def _checkpoint_files(tmp: Path) -> list[str]:
    """The files of a checkpoint directory, relative names (a sharded checkpoint's DCP folder too)."""
    names = [p.name for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST_FILE]
    shards = tmp / SHARDED_DIR
    if shards.is_dir():
        names += [f"{SHARDED_DIR}/{p.name}" for p in sorted(shards.iterdir()) if p.is_file()]
    return names


def finish_checkpoint(
    run_dir: Path, step: int, tmp: Path, keep: int, protected: frozenset[int] = frozenset(), fmt: str = "single"
) -> Path:
    """Hash every file written into `tmp`, write the manifest last, rename `tmp` into place, then
    delete all but the newest `keep` checkpoints (those at `protected` steps are kept too)."""
    root = Path(run_dir) / "checkpoints"
    final = checkpoint_dir(run_dir, step)
    files = {}
    for name in _checkpoint_files(tmp):
        _fsync(tmp / name)
        files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
    manifest: dict[str, Any] = {"step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    if fmt != "single":
        manifest["format"] = fmt
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / MANIFEST_FILE)
    if final.exists():  # re-saving a step (after a rollback): replace it as one rename
        trash = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        if int(old.name[len(PREFIX) :]) not in protected:
            shutil.rmtree(old, ignore_errors=True)
    return final


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint directory is in the sharded format (torch.distributed.checkpoint files
    under dcp/, written by train.checkpoint_format = "sharded"; moelab.distributed.sharded)."""
    return (Path(path) / SHARDED_DIR / DCP_METADATA).is_file()


def refuse_sharded(path: Path) -> None:
    if is_sharded(path):
        raise CheckpointError(
            f"checkpoint {path} is in the sharded format (torch.distributed.checkpoint): write it in the "
            f"single-process format with: moelab consolidate {path} OUT_RUN"
        )


def manifest_problem(manifest: Any, directory_step: int | None) -> str | None:
    """What is wrong with a parsed manifest, or None: a JSON object whose integer `step` is the
    directory's and whose `files` name the weights and the trainer state, each with a sha256 (64 hex
    digits) and a byte count (an integer >= 0)."""
    if not isinstance(manifest, dict):
        return "is not a JSON object"
    step = manifest.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return f"has no integer step (got {step!r})"
    if directory_step is not None and step != directory_step:
        return f"says step {step} but its directory is step {directory_step}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "has no files table"
    sharded = manifest.get("format") == "sharded"
    for name in (f"{SHARDED_DIR}/{DCP_METADATA}", TRAINER_FILE) if sharded else (MODEL_FILE, TRAINER_FILE):
        if name not in files:
            return f"lists no {name}"
    for name, info in files.items():
        if not isinstance(name, str) or not _inside(name, sharded):
            return f"names a file outside the checkpoint ({name!r})"
        if not isinstance(info, dict):
            return f"has a malformed entry for {name}"
        digest, size = info.get("sha256"), info.get("bytes")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            return f"has no sha256 for {name}"
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return f"has no byte count for {name}"
    return None


def _inside(name: str, sharded: bool) -> bool:
    """A file name of the checkpoint directory (a sharded checkpoint: or of its dcp/ folder)."""
    if sharded and name.startswith(SHARDED_DIR + "/"):
        base = name[len(SHARDED_DIR) + 1 :]
        return (
            bool(base) and "/" not in base and "\\" not in base and (base == DCP_METADATA or not base.startswith("."))
        )
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check the manifest (its schema: `manifest_problem`) and every file's size and hash; return the
    manifest or raise CheckpointError naming the file."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError):
        raise CheckpointError(f"checkpoint {path} is damaged: {manifest_path} is not valid UTF-8 JSON") from None
    digits = path.name[len(PREFIX) :]
    problem = manifest_problem(manifest, int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {manifest_path} {problem}")
    for name, info in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {file} is missing")
        if file.stat().st_size != info["bytes"] or sha256_file(file) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {file} does not match its sha256 in the manifest")
    return manifest


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the hidden folders a checkpoint write killed midway left in <run>/checkpoints
    (`.tmp-step_*`, `.old-step_*`); returns what was removed. Call it only while no process writes
    checkpoints into this run (at the start of training)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith((".tmp-" + PREFIX, ".old-" + PREFIX))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


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
    """Verify, then load weights into `model` and return the trainer state. Any failure to read a
    verified part (a file written by another version, a state that is not a dict) is the same
    CheckpointError as a damaged file."""
    verify_checkpoint(path)
    refuse_sharded(path)
    return load_trainer_state(path, lambda: load_weights(model, Path(path) / MODEL_FILE), map_location)


def load_trainer_state(path: Path, load_model_weights, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Run `load_model_weights`, then read trainer.pt (weights_only); every failure of either is a
    CheckpointError naming the checkpoint (never a traceback suggesting weights_only=False)."""
    path = Path(path)
    try:
        load_model_weights()
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors, shape and key errors alike
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {path / MODEL_FILE}: {_first_line(exc)}") from None
    try:
        state = torch.load(path / TRAINER_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling refused or failed
        # NOTE: not torch's message, which suggests weights_only=False: that would run code from the file
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded: {path / TRAINER_FILE} is not a trainer state that loads "
            f"safely ({type(exc).__name__})"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {path / TRAINER_FILE} holds no trainer state")
    return state


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
