"""Tokenised directories: the manifest, a memory-mapped view over many shards, nanoGPT's
`train.bin` / `val.bin`, and verification.

A tokenised directory holds `manifest.json`, `tokenizer.json` and shards `train-00000.bin`,
`val-00000.bin`, ...: token ids (uint16 when the vocabulary fits, else uint32), every document
followed by the end-of-text id. The manifest (format, version, status, the job that made it, the
tokenizer file and its sha256, dtype, vocabulary size, and per split its documents, tokens and
shards, each with documents, tokens, bytes and sha256) is deterministic: an interrupted and resumed
tokenisation writes the same bytes as an uninterrupted one.

Verification: every load checks the manifest is complete, the tokenizer file's sha256 (small) and
every shard's size. Shard sha256 are computed while writing; reading 2 GB again at each start is
what the cache avoids: `.verified.json` beside the manifest records each shard's size and mtime as
last verified, and a shard whose mtime changed (copied, touched, rewritten) is hashed again at load,
once. `moelab tokenize --verify DIR` hashes every shard and checks every token id against the
vocabulary. A nanoGPT pair has no manifest: its ids are checked against the tokenizer's vocabulary
at the first load of each version of its files (size, mtime and the tokenizer's sha256, in the same
cache).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from moelab.data.tokenizer import TextTokenizer
from moelab.errors import MoelabError
from moelab.files import sha256_file, write_atomic

MANIFEST = "manifest.json"
VERIFIED = ".verified.json"
TOKENIZER = "tokenizer.json"
FORMAT = "moelab-tokens"
VERSION = 1
SPLITS = ("train", "val")
NANOGPT = ("train.bin", "val.bin")
SCAN_TOKENS = 1 << 24  # tokens read at a time when checking ids (bounded memory)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class ShardedTokens:
    """Many memory-mapped token files read as one stream: `len` and contiguous slices, a slice
    across a shard boundary concatenated. What the loader and eval_batches need, nothing more."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts]).tolist()
        self.dtype = self.parts[0].dtype if self.parts else np.dtype(np.uint16)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key: slice | int) -> np.ndarray:
        if not isinstance(key, slice):
            index = int(key) + (len(self) if int(key) < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(key)
            i = bisect.bisect_right(self.starts, index) - 1
            return self.parts[i][index - self.starts[i]]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("ShardedTokens supports contiguous slices only")
        if start >= stop:
            return np.empty(0, dtype=self.dtype)
        i = bisect.bisect_right(self.starts, start) - 1
        pieces = []
        while start < stop:
            first, part = self.starts[i], self.parts[i]
            end = min(stop, first + len(part))
            pieces.append(part[start - first : end - first])
            start, i = end, i + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[0 : len(self)]
        return np.asarray(out, dtype=dtype)


@dataclass
class TokenDir:
    path: Path
    manifest: dict  # for nanoGPT pairs, a manifest-shaped summary made at load
    train: ShardedTokens
    val: ShardedTokens
    tokenizer: TextTokenizer


def is_token_dir(path: Path) -> bool:
    path = Path(path)
    return (path / MANIFEST).is_file() or all((path / n).is_file() for n in NANOGPT)


def write_json_durable(path: Path, data: dict) -> None:
    """A manifest or verification record, durably (moelab.files.write_atomic)."""
    write_atomic(path, json.dumps(data, indent=1) + "\n", durable=True)


def read_manifest(path: Path) -> dict:
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoelabError(f"{file} cannot be read as a manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MoelabError(f"{file} is not a moelab token manifest (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise MoelabError(f"{file} has format version {manifest.get('version')}; this moelab reads version {VERSION}")
    return manifest


def open_token_dir(path: Path, log: Callable[[str], None] = lambda s: None) -> TokenDir:
    """A tokenised directory (moelab manifest or nanoGPT pair), memory-mapped and checked (module
    docstring: sizes always, sha256 of shards whose mtime changed since they were verified)."""
    path = Path(path).expanduser()
    if not (path / MANIFEST).is_file():
        if all((path / n).is_file() for n in NANOGPT):
            return _open_nanogpt(path)
        raise MoelabError(f"{path} is not a tokenised directory: it has no {MANIFEST} (nor train.bin and val.bin)")
    manifest = read_manifest(path)
    if manifest.get("status") != "complete":
        raise MoelabError(
            f"{path} is an unfinished tokenisation (status {manifest.get('status')!r}); "
            "run the same `moelab tokenize` again to resume it"
        )
    tok_file = path / manifest["tokenizer"]["file"]
    if not tok_file.is_file():
        raise MoelabError(f"{path}: the tokenizer file {tok_file.name} is missing")
    if sha256_file(tok_file) != manifest["tokenizer"]["sha256"]:
        raise MoelabError(f"{tok_file}: sha256 does not match the manifest (the tokenizer was changed)")
    tokenizer = TextTokenizer.load(tok_file)
    dtype = np.dtype(manifest["dtype"])
    verified = _read_verified(path)
    rehashed = []
    arrays: dict[str, list[np.ndarray]] = {}
    for split in SPLITS:
        arrays[split] = []
        for shard in manifest["splits"][split]["shards"]:
            file = _check_shard(path, shard)
            st = file.stat()
            if verified.get(shard["file"]) != [st.st_size, st.st_mtime_ns, shard["sha256"]]:
                _check_sha(file, shard)
                verified[shard["file"]] = [st.st_size, st.st_mtime_ns, shard["sha256"]]
                rehashed.append(shard["file"])
            arrays[split].append(np.memmap(file, dtype=dtype, mode="r"))
    if rehashed:
        log(f"verified the sha256 of {len(rehashed)} shard(s) of {path} whose size or mtime changed")
        try:
            write_json_durable(path / VERIFIED, verified)
        except OSError:
            pass  # a read-only directory: verified again next time
    return TokenDir(path, manifest, ShardedTokens(arrays["train"]), ShardedTokens(arrays["val"]), tokenizer)


def _check_shard(path: Path, shard: dict) -> Path:
    file = path / shard["file"]
    if not file.is_file():
        raise MoelabError(f"shard {file} is missing (listed in {path / MANIFEST})")
    size = file.stat().st_size
    if size != shard["bytes"]:
        raise MoelabError(
            f"shard {file} is {size:,} bytes; the manifest says {shard['bytes']:,}: it was truncated or changed"
        )
    return file


def _check_sha(file: Path, shard: dict) -> None:
    if sha256_file(file) != shard["sha256"]:
        raise MoelabError(f"shard {file}: sha256 does not match the manifest (the file is damaged or was changed)")


def _read_verified(path: Path) -> dict:
    try:
        data = json.loads((path / VERIFIED).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record_verified(path: Path, manifest: dict) -> None:
    """Remember every shard's size and mtime as verified (called when they were just written or hashed)."""
    verified = {}
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            st = (path / shard["file"]).stat()
            verified[shard["file"]] = [st.st_size, st.st_mtime_ns, shard["sha256"]]
    write_json_durable(path / VERIFIED, verified)


def check_ids(arr: np.ndarray, vocab_size: int, where: Path | str) -> None:
    """Every token id below vocab_size, read in bounded pieces."""
    for start in range(0, len(arr), SCAN_TOKENS):
        piece = np.asarray(arr[start : start + SCAN_TOKENS])
        top = int(piece.max()) if len(piece) else 0
        if top >= vocab_size:
            at = start + int(np.argmax(piece >= vocab_size))
            raise MoelabError(
                f"{where}: token id {int(piece[at - start])} at position {at:,} is beyond the tokenizer's "
                f"vocabulary of {vocab_size} (a different tokenizer made these tokens?)"
            )


def verify_token_dir(path: Path, log: Callable[[str], None] = lambda s: None) -> dict:
    """The full check: every shard's sha256 and every token id against the vocabulary."""
    path = Path(path).expanduser()
    if not (path / MANIFEST).is_file():
        data = open_token_dir(path, log)  # nanoGPT: its ids are checked at every open
        return data.manifest
    manifest = read_manifest(path)
    data = open_token_dir(path, log)
    vocab = data.tokenizer.vocab_size
    for split in SPLITS:
        for shard, arr in zip(manifest["splits"][split]["shards"], getattr(data, split).parts):
            file = _check_shard(path, shard)
            _check_sha(file, shard)
            check_ids(arr, vocab, file)
            log(f"ok {shard['file']}: {shard['tokens']:,} tokens, sha256 {shard['sha256'][:16]}...")
    record_verified(path, manifest)
    return manifest


def _open_nanogpt(path: Path) -> TokenDir:
    """nanoGPT's layout: train.bin / val.bin of uint16 ids and a tokenizer.json beside them."""
    tok_file = path / TOKENIZER
    if not tok_file.is_file():
        raise MoelabError(
            f"{path} holds train.bin and val.bin but no {TOKENIZER}: put the tokenizer that made them beside them"
        )
    tokenizer = TextTokenizer.load(tok_file)
    tok_sha = sha256_file(tok_file)
    verified, checked = _read_verified(path), False
    splits = {}
    for split, name in zip(SPLITS, NANOGPT):
        file = path / name
        st = file.stat()
        if st.st_size % 2:
            raise MoelabError(f"{file} has an odd number of bytes: not a file of uint16 token ids")
        arr = np.memmap(file, dtype=np.uint16, mode="r") if st.st_size else np.empty(0, np.uint16)
        # The ids are checked against this tokenizer once per version of the file (size, mtime).
        stamp = [st.st_size, st.st_mtime_ns, tok_sha]
        if verified.get(name) != stamp:
            check_ids(arr, tokenizer.vocab_size, file)
            verified[name], checked = stamp, True
        splits[split] = arr
    if checked:
        try:
            write_json_durable(path / VERIFIED, verified)
        except OSError:
            pass  # a read-only directory: checked again next time
    manifest = {
        "format": "nanogpt",
        "status": "complete",
        "description": f"nanoGPT token files in {path}",
        "tokenizer": {"file": TOKENIZER, "sha256": tok_sha},
        "dtype": "uint16",
        "vocab_size": tokenizer.vocab_size,
        "splits": {
            split: {
                "documents": None,
                "tokens": len(arr),
                "shards": [{"file": name, "tokens": len(arr), "bytes": len(arr) * 2, "documents": None}],
            }
            for (split, arr), name in zip(splits.items(), NANOGPT)
        },
    }
    return TokenDir(path, manifest, ShardedTokens([splits["train"]]), ShardedTokens([splits["val"]]), tokenizer)


def summary(data: TokenDir) -> dict:
    """The totals `moelab info --data` prints and a run's data.json keeps."""
    m = data.manifest
    splits = m["splits"]
    return {
        "format": m["format"],
        "path": str(data.path),
        "description": m.get("description", ""),
        "tokenizer": m["tokenizer"].get("kind", "file"),
        "tokenizer_sha256": m["tokenizer"]["sha256"],
        "vocab_size": data.tokenizer.vocab_size,
        "dtype": m["dtype"],
        "train_documents": splits["train"]["documents"],
        "val_documents": splits["val"]["documents"],
        "train_tokens": len(data.train),
        "val_tokens": len(data.val),
        "train_shards": len(splits["train"]["shards"]),
        "val_shards": len(splits["val"]["shards"]),
        "bad_records_skipped": m.get("bad_records", {}).get("skipped", 0),
        "skipped_files": m.get("skipped_files", []),
    }
