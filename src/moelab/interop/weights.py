"""Hugging Face weight files: one model.safetensors, or shards with an index above a size limit.

    model.safetensors                                  (total size <= the shard limit)
    model-00001-of-00003.safetensors ... + model.safetensors.index.json
        {"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}

Reading accepts either layout and names the file in every error. Pickled PyTorch weights
(pytorch_model.bin) are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moelab.errors import MoelabError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' customary "5GB"

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20, '1000' -> 1000."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise MoelabError(
                f"shard size {text!r} is not allowed: a size such as 5GB, 500MB, 2GiB or a number of bytes"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise MoelabError(f"shard size {text!r} is not allowed: a size > 0")
    return value


def _natural_key(name: str) -> list:
    """Sort layer 2 before layer 10 (the order transformers writes tensors in)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def write_safetensors(
    tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[str]:
    """Write `tensors` into out_dir, sharded when their total size exceeds `max_shard_bytes`;
    returns the file names written. A tensor larger than the limit gets a shard of its own."""
    names = sorted(tensors, key=_natural_key)
    nbytes = {n: tensors[n].numel() * tensors[n].element_size() for n in names}
    total = sum(nbytes.values())
    metadata = {"format": "pt"}  # transformers expects this marker
    if total <= max_shard_bytes:
        save_file({n: tensors[n] for n in names}, str(out_dir / SINGLE_FILE), metadata=metadata)
        return [SINGLE_FILE]
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        if shards[-1] and size + nbytes[n] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes[n]
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, str(out_dir / file), metadata=metadata)
        files.append(file)
        weight_map.update({n: file for n in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files + [INDEX_FILE]


class WeightFiles:
    """The safetensors weights of a Hugging Face directory: which tensor lives in which file,
    read lazily. Use as a context manager (it keeps the files open)."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        self.weight_map = self._find()  # tensor name -> file path
        self._stack = ExitStack()
        self._open: dict[Path, tuple[object, set[str]]] = {}  # file -> (handle, its tensor names)

    def _find(self) -> dict[str, Path]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
                weight_map = data["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise TypeError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise MoelabError(
                    f"{index} is not a valid safetensors index (it needs a weight_map of tensor name -> file)"
                ) from None
            files = {f: self.dir / f for f in set(weight_map.values())}
            for name, path in files.items():
                if Path(name).name != name:
                    raise MoelabError(f"{index} names the file {name!r}, which is not in {self.dir}")
                if not path.is_file():
                    raise MoelabError(f"{index} names {path}, which is missing")
            return {tensor: files[f] for tensor, f in weight_map.items()}
        single = self.dir / SINGLE_FILE
        if single.is_file():
            return {name: single for name in self._keys(single)}
        if any((self.dir / f).is_file() for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise MoelabError(
                f"{self.dir} holds pickled PyTorch weights (pytorch_model.bin), which moelab does not load because "
                "unpickling can run code; convert them to safetensors first (transformers: save_pretrained(..., safe_serialization=True))"
            )
        raise MoelabError(f"{self.dir} has no weights: neither {SINGLE_FILE} nor {INDEX_FILE}")

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as exc:  # safetensors raises its own error types for malformed headers
            raise MoelabError(f"{path} is not a readable safetensors file: {exc}") from None

    def __enter__(self) -> "WeightFiles":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._open.clear()

    def names(self) -> Iterator[str]:
        return iter(self.weight_map)

    def file_of(self, name: str) -> Path:
        return self.weight_map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except MoelabError:
            raise
        except Exception as exc:
            raise MoelabError(f"{self.file_of(name)}: tensor {name} cannot be read: {exc}") from None

    def _handle(self, name: str):
        path = self.weight_map[name]
        if path not in self._open:
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as exc:
                raise MoelabError(f"{path} is not a readable safetensors file: {exc}") from None
            self._open[path] = (handle, set(handle.keys()))
        handle, keys = self._open[path]
        if name not in keys:
            raise MoelabError(f"{path} does not hold {name}, which the index places there")
        return handle
