"""Tokenise a corpus once into memory-mapped token files, cached by a hash of sources and tokenizer.

Cache layout: <cache>/<key>/{tokenizer.json, train.bin, val.bin, meta.json}, where key hashes the
corpus fingerprint (every document's name and text) and the tokenizer settings. Entries are written
to a temporary directory and renamed into place, so an interrupted run never leaves a half entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from moelab.config import DataConfig
from moelab.data.corpus import Corpus, Document, load_corpus
from moelab.data.tokenizer import (
    HF_TOKENIZER_CONFIG,
    TextTokenizer,
    bytes_tokenizer,
    train_bpe,
)
from moelab.errors import MoelabError

FORMAT_VERSION = 1
ENCODE_BATCH_DOCS = 256


@dataclass
class TokenData:
    train: np.ndarray  # memory-mapped token ids, documents separated by the EOS token
    val: np.ndarray
    tokenizer: TextTokenizer
    meta: dict


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("MOELAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moelab"


def _tokenizer_file(cfg: DataConfig) -> Path:
    path = Path(cfg.tokenizer_file).expanduser()
    if not path.is_file():
        raise MoelabError(f"data.tokenizer_file {path} does not exist (give the tokenizer.json to tokenise with)")
    return path


def _cache_key(corpus: Corpus, cfg: DataConfig) -> str:
    h = hashlib.sha256()
    h.update(f"v{FORMAT_VERSION}\0{cfg.tokenizer}\0{cfg.vocab_size if cfg.tokenizer == 'bpe' else 0}\0".encode())
    if cfg.tokenizer == "file":  # the tokenizer's own content decides the tokens
        path = _tokenizer_file(cfg)
        h.update(path.read_bytes())
        config = path.with_name(HF_TOKENIZER_CONFIG)
        h.update(config.read_bytes() if config.is_file() else b"")
    h.update(corpus.fingerprint().encode())
    return h.hexdigest()[:24]


def prepare_data(cfg: DataConfig, log: Callable[[str], None] = lambda s: None) -> TokenData:
    """Load the corpus, then reuse or build its tokenizer and token files."""
    started = time.perf_counter()
    corpus = load_corpus(cfg)
    key = _cache_key(corpus, cfg)
    entry = cache_root(cfg) / key
    if not (entry / "meta.json").is_file():
        log(f"tokenising {corpus.description}: {len(corpus.train)} train / {len(corpus.val)} validation documents")
        _build_entry(corpus, cfg, entry)
    data = load_entry(entry)
    log(
        f"data: {data.meta['train_tokens']:,} train / {data.meta['val_tokens']:,} validation tokens, "
        f"vocabulary {data.tokenizer.vocab_size} ({cfg.tokenizer}), ready in {time.perf_counter() - started:.1f}s"
    )
    return data


def load_entry(entry: Path) -> TokenData:
    meta = json.loads((entry / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(entry / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(entry / "val.bin", dtype=dtype, mode="r")
    return TokenData(train=train, val=val, tokenizer=TextTokenizer.load(entry / "tokenizer.json"), meta=meta)


def _build_entry(corpus: Corpus, cfg: DataConfig, entry: Path) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    if cfg.tokenizer == "bytes":
        tokenizer = bytes_tokenizer()
    elif cfg.tokenizer == "file":
        tokenizer = TextTokenizer.load(_tokenizer_file(cfg))
    else:
        tokenizer = train_bpe((d.text for d in corpus.train), cfg.vocab_size, length=len(corpus.train))
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        tokenizer.save(tmp / "tokenizer.json")
        train_tokens = _write_tokens(corpus.train, tokenizer, tmp / "train.bin", dtype)
        val_tokens = _write_tokens(corpus.val, tokenizer, tmp / "val.bin", dtype)
        meta = {
            "format": FORMAT_VERSION,
            "description": corpus.description,
            "tokenizer": cfg.tokenizer,
            "vocab_size": tokenizer.vocab_size,
            "dtype": np.dtype(dtype).name,
            "train_documents": len(corpus.train),
            "val_documents": len(corpus.val),
            "train_tokens": train_tokens,
            "val_tokens": val_tokens,
            "train_chars": corpus.train_chars,
            "skipped_files": corpus.skipped,
            "fingerprint": corpus.fingerprint(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # not a concurrent writer finishing first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_tokens(docs: list[Document], tokenizer: TextTokenizer, path: Path, dtype) -> int:
    total = 0
    with open(path, "wb") as f:
        for start in range(0, len(docs), ENCODE_BATCH_DOCS):
            batch = docs[start : start + ENCODE_BATCH_DOCS]
            for ids in tokenizer.encode_batch([d.text for d in batch]):
                ids.append(tokenizer.eos_id)
                np.asarray(ids, dtype=dtype).tofile(f)
                total += len(ids)
    return total
