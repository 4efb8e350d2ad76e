"""Text sources: the embedded standard-library corpus, a text file, a directory, or JSON Lines.

A corpus is a sorted list of named documents. Documents go to validation when a stable hash of
their name falls below val_fraction, so the split never depends on file order or the machine.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from moelab.config import DataConfig
from moelab.errors import MoelabError

# Large single files are cut into documents of about this many characters at line boundaries, so
# that one file can still be split into train and validation parts.
DOC_CHARS = 16_384


@dataclass(frozen=True)
class Document:
    name: str  # stable identifier: relative path, path#chunk, or path:line
    text: str


@dataclass(frozen=True)
class Corpus:
    description: str
    train: list[Document]
    val: list[Document]
    skipped: list[str]  # stdlib files that are not UTF-8 (a handful of encoding test fixtures)

    @property
    def train_chars(self) -> int:
        return sum(len(d.text) for d in self.train)

    def fingerprint(self) -> str:
        """sha256 of every document's name and text, in order: the token-shard cache key."""
        h = hashlib.sha256()
        for split, docs in (("train", self.train), ("val", self.val)):
            for d in docs:
                h.update(f"{split}\0{d.name}\0{len(d.text)}\0".encode())
                h.update(d.text.encode("utf-8"))
        return h.hexdigest()


def is_validation(name: str, val_fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64
    return bucket < val_fraction


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the configured source into named documents and split them into train and validation."""
    skipped: list[str] = []
    if cfg.source == "stdlib":
        root = stdlib_root()
        docs = _stdlib_documents(root, skipped)
        description = f"Python {root.name} standard library source ({root})"
    else:
        path = Path(cfg.source).expanduser()
        if not path.exists():
            raise MoelabError(
                f"data path {path} does not exist (give a text file, a directory, a .jsonl file, or 'stdlib')"
            )
        if path.is_dir():
            docs = _directory_documents(path, cfg.glob)
            description = f"text files under {path} matching {cfg.glob}"
        elif path.suffix == ".jsonl":
            docs = _jsonl_documents(path, cfg.jsonl_field)
            description = f"JSON Lines {path} (field {cfg.jsonl_field!r})"
        else:
            docs = _chunk(path.name, _read_utf8(path))
            description = f"text file {path}"
    if cfg.max_bytes:
        docs = _limit_bytes(docs, cfg.max_bytes)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise MoelabError(f"data source {cfg.source} holds no text (every file is empty or whitespace)")
    train = [d for d in docs if not is_validation(d.name, cfg.val_fraction)]
    val = [d for d in docs if is_validation(d.name, cfg.val_fraction)]
    if not val:  # a tiny corpus: hold out the last document so that validation exists
        train, val = train[:-1], train[-1:]
    if not train:
        raise MoelabError(f"data source {cfg.source} is too small to split into train and validation")
    return Corpus(description, train, val, skipped)


def _stdlib_documents(root: Path, skipped: list[str]) -> list[Document]:
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts and rel.parts[0] in ("site-packages", "dist-packages"):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            skipped.append(str(rel))  # e.g. test/encoded_modules: deliberately not UTF-8
            continue
        docs.append(Document(str(rel), text))
    if not docs:
        raise MoelabError(f"no standard-library source found under {root}; give --data PATH")
    return docs


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:  # permissions, a directory, I/O errors
        raise MoelabError(f"data file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MoelabError(
            f"{path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}; "
            "convert it to UTF-8 (for example with iconv) or leave it out with data.glob"
        ) from None


def _chunk(name: str, text: str) -> list[Document]:
    # Small files are cut finer (down to 1 KiB) so that even they can be split train/validation.
    size = max(1024, min(DOC_CHARS, len(text) // 32))
    if len(text) <= size:
        return [Document(name, text)]
    docs, start, index = [], 0, 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            newline = text.rfind("\n", start, end)
            if newline > start:
                end = newline + 1
        docs.append(Document(f"{name}#{index}", text[start:end]))
        start, index = end, index + 1
    return docs


def _directory_documents(root: Path, patterns: str) -> list[Document]:
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and any(fnmatch.fnmatch(str(p.relative_to(root)), g) or fnmatch.fnmatch(p.name, g) for g in globs)
    )
    if not files:
        raise MoelabError(f"no files under {root} match data.glob {patterns!r}")
    docs = []
    for path in files:
        docs.extend(_chunk(str(path.relative_to(root)), _read_utf8(path)))
    return docs


def _jsonl_documents(path: Path, field: str) -> list[Document]:
    text = _read_utf8(path)
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MoelabError(f"{path} line {number} is not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict) or field not in record:
            raise MoelabError(f"{path} line {number} has no {field!r} field (set data.jsonl_field to the text field)")
        if not isinstance(record[field], str):
            raise MoelabError(
                f"{path} line {number}: field {field!r} is {type(record[field]).__name__}, expected a string"
            )
        docs.append(Document(f"{path.name}:{number}", record[field]))
    return docs


def _limit_bytes(docs: list[Document], max_bytes: int) -> list[Document]:
    """A stable sample of about max_bytes of text: documents kept by a hash of their name, so the
    sample spreads over the whole corpus and does not change between runs."""
    total = sum(len(d.text) for d in docs)
    if total <= max_bytes:
        return docs
    fraction = max_bytes / total
    kept = [d for d in docs if is_validation("keep:" + d.name, fraction)]
    return kept or docs[:1]
