"""The data a run trains on: a tokenised directory given directly, or text tokenised once into the
token cache.

`data.source` naming a tokenised directory (`tokens:DIR`, or a directory holding `manifest.json`, or
nanoGPT's `train.bin` / `val.bin` with a `tokenizer.json`) is memory-mapped as it is. Any text
source is tokenised by the same streamed writer as `moelab tokenize` into
`<cache>/<key>/`, where key hashes the job: every input file's path, size and mtime, the split,
tokenizer and shard settings (never the text, so a start costs a directory listing, not a read of
the corpus). An unfinished entry resumes. One process builds an entry: the others (torchrun ranks,
other jobs) wait on a file lock and then read the finished entry.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moelab.config import DataConfig
from moelab.data.corpus import open_source
from moelab.data.tokendir import MANIFEST, ShardedTokens, is_token_dir, open_token_dir, read_manifest, summary
from moelab.data.tokenize import TokenizeOptions, job_key, job_of, tokenize
from moelab.data.tokenizer import TextTokenizer
from moelab.errors import MoelabError

TOKENS_PREFIX = "tokens:"


@dataclass
class TokenData:
    train: ShardedTokens  # memory-mapped token ids, documents separated by the EOS token
    val: ShardedTokens
    tokenizer: TextTokenizer
    meta: dict


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("MOELAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moelab"


def token_dir_of(source: str) -> Path | None:
    """The tokenised directory `data.source` names, or None for a text source."""
    if source.startswith(TOKENS_PREFIX):
        path = Path(source[len(TOKENS_PREFIX) :]).expanduser()
        if not is_token_dir(path):
            raise MoelabError(
                f"{path} is not a tokenised directory: it has no {MANIFEST} (nor train.bin and val.bin); "
                "make one with `moelab tokenize SRC DIR`"
            )
        return path
    if source != "stdlib" and is_token_dir(Path(source).expanduser()):
        return Path(source).expanduser()
    return None


def prepare_data(
    cfg: DataConfig, log: Callable[[str], None] = lambda s: None, progress: bool | None = None
) -> TokenData:
    """The run's tokens: a tokenised directory as it is, or the token cache's entry for a text
    source (built, or resumed, here if it is not complete; a progress line on a terminal)."""
    if progress is None:
        progress = sys.stderr.isatty()
    started = time.perf_counter()
    path = token_dir_of(cfg.source)
    if path is None:
        source = open_source(cfg)
        options = TokenizeOptions()
        entry = cache_root(cfg) / job_key(job_of(cfg, source, options))
        if not _complete(entry):
            with _locked(entry, log):
                if not _complete(entry):  # another process may have built it while we waited
                    log(f"tokenising {source.description} into the token cache ({entry})")
                    tokenize(cfg, entry, options, log=log, progress=progress)
        path = entry
    data = open_token_dir(path, log)
    meta = summary(data)
    log(
        f"data: {len(data.train):,} train / {len(data.val):,} validation tokens in "
        f"{meta['train_shards'] + meta['val_shards']} shard(s), vocabulary {data.tokenizer.vocab_size}, "
        f"ready in {time.perf_counter() - started:.1f}s"
    )
    return TokenData(train=data.train, val=data.val, tokenizer=data.tokenizer, meta=meta)


def _complete(entry: Path) -> bool:
    if not (entry / MANIFEST).is_file():
        return False
    try:
        return read_manifest(entry).get("status") == "complete"
    except MoelabError:
        return False


@contextmanager
def _locked(entry: Path, log: Callable[[str], None]):
    """An exclusive lock on `<entry>.lock` (released by the kernel if the holder dies)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".lock"), "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process to finish tokenising into {entry}")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
