"""Text sources, streamed: the embedded standard-library corpus, a text file, a directory, JSON Lines,
Parquet, or a Hugging Face `datasets` directory written by `save_to_disk`.

A source is a stream of named documents in a fixed order, read a record (or a chunk of a text file)
at a time, so memory does not grow with the corpus. Documents go to validation when a stable hash of
their name falls below val_fraction, so the split never depends on file order or the machine.
`open_source` lists the input files (path, size, mtime) without reading them: that list is what the
token cache's key and a tokenised directory's manifest describe.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moelab.config import DataConfig
from moelab.errors import MoelabError

# Large single files are cut into documents of about this many characters at line boundaries, so
# that one file can still be split into train and validation parts.
DOC_CHARS = 16_384
READ_BLOCK = 1 << 20  # bytes read at a time from a text file
RECORD_BATCH = 1024  # Parquet / datasets rows read at a time
BAD_RECORD_POLICIES = ("error", "skip")
DATASETS_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


@dataclass(frozen=True)
class Document:
    name: str  # stable identifier: relative path, path#chunk, or path:line / path:row
    text: str
    end: int = 0  # input bytes read up to the end of this document (for progress and ETA)


@dataclass
class BadRecords:
    """What to do with a record that is not usable text: `error` stops with its location, `skip`
    counts it (the count goes into the manifest and the final report; never silently)."""

    policy: str = "error"
    count: int = 0
    first: str = ""

    def found(self, where: str, problem: str) -> None:
        message = f"{where}: {problem}"
        if self.policy == "error":
            hint = " (--on-bad-record skip counts and skips such records)"
            raise MoelabError(message + hint)
        self.count += 1
        self.first = self.first or message


@dataclass
class Source:
    """A configured text source: its kind, its input files and how to read them."""

    kind: str  # stdlib | text | directory | jsonl | parquet | datasets
    root: Path
    description: str
    files: list[Path]  # the inputs, in reading order (for datasets: every file of the directory)
    text_field: str = "text"  # the text field (jsonl), column (parquet, datasets)
    max_bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # stdlib files that are not UTF-8

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def inputs(self) -> list[dict]:
        """Each input file's path (relative to the source), size and modification time."""
        rows = []
        for f in self.files:
            st = f.stat()
            rel = str(f.relative_to(self.root)) if f != self.root else f.name
            rows.append({"path": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        return rows

    def documents(self, bad: BadRecords | None = None) -> Iterator[Document]:
        """Every non-blank document, in order (the max_bytes sample applied)."""
        bad = bad or BadRecords()
        docs = self._all_documents(bad)
        if self.max_bytes:
            total = self.total_bytes
            if total > self.max_bytes:
                fraction = self.max_bytes / total
                # A stable sample spread over the whole corpus: kept by a hash of the name.
                docs = (d for d in docs if is_validation("keep:" + d.name, fraction))
        for doc in docs:
            if doc.text.strip():
                yield doc

    def _all_documents(self, bad: BadRecords) -> Iterator[Document]:
        if self.kind == "stdlib":
            yield from _stdlib_documents(self.root, self.files, self.skipped)
        elif self.kind == "datasets":
            yield from _datasets_documents(self.root, self.text_field, bad, self.total_bytes)
        else:
            done = 0
            for path in self.files:
                name = str(path.relative_to(self.root)) if self.kind == "directory" else path.name
                yield from _file_documents(path, name, self.text_field, bad, done)
                done += path.stat().st_size


def is_validation(name: str, val_fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64
    return bucket < val_fraction


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def globs_of(patterns: str | list[str]) -> list[str]:
    """data.glob as a list: a TOML list, or one string of comma-separated patterns."""
    items = patterns if isinstance(patterns, list) else patterns.split(",")
    return [p.strip() for p in items if p.strip()]


def is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in DATASETS_MARKERS)


def open_source(cfg: DataConfig) -> Source:
    """The configured source with its input files listed (nothing read yet); bad paths, a directory
    with no matching file and a missing Parquet column are refused here, before any work."""
    if cfg.source == "stdlib":
        root = stdlib_root()
        files = sorted(
            p
            for p in root.rglob("*.py")
            if p.relative_to(root).parts[0] not in ("site-packages", "dist-packages") and p.is_file()
        )
        if not files:
            raise MoelabError(f"no standard-library source found under {root}; give --data PATH")
        description = f"Python {root.name} standard library source ({root})"
        return Source("stdlib", root, description, files, max_bytes=cfg.max_bytes)
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise MoelabError(
            f"data path {path} does not exist (give a text file, a directory, a .jsonl or .parquet file, "
            "a `datasets` directory, or 'stdlib')"
        )
    fld = cfg.jsonl_field
    if is_datasets_dir(path):
        files = sorted(p for p in path.rglob("*") if p.is_file())
        _datasets_columns(path, fld)  # a missing column is refused now
        return Source("datasets", path, f"datasets directory {path} (column {fld!r})", files, fld, cfg.max_bytes)
    if path.is_dir():
        globs = globs_of(cfg.glob)
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and any(fnmatch.fnmatch(str(p.relative_to(path)), g) or fnmatch.fnmatch(p.name, g) for g in globs)
        )
        if not files:
            raise MoelabError(f"no files under {path} match data.glob {cfg.glob!r}")
        for f in files:
            if f.suffix == ".parquet":
                _parquet_file(f, fld)
        description = f"files under {path} matching {cfg.glob!r}"
        return Source("directory", path, description, files, fld, cfg.max_bytes)
    if path.suffix == ".jsonl":
        return Source("jsonl", path.parent, f"JSON Lines {path} (field {fld!r})", [path], fld, cfg.max_bytes)
    if path.suffix == ".parquet":
        _parquet_file(path, fld)
        return Source("parquet", path.parent, f"Parquet {path} (column {fld!r})", [path], fld, cfg.max_bytes)
    return Source("text", path.parent, f"text file {path}", [path], fld, cfg.max_bytes)


# ---------------------------------------------------------------------------------------------
# The formats


def _file_documents(path: Path, name: str, fld: str, bad: BadRecords, done: int) -> Iterator[Document]:
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, name, fld, bad, done)
    if path.suffix == ".parquet":
        return _parquet_documents(path, name, fld, bad, done)
    return _text_documents(path, name, done)


def _stdlib_documents(root: Path, files: list[Path], skipped: list[str]) -> Iterator[Document]:
    done = 0
    for path in files:
        rel = path.relative_to(root)
        try:
            data = path.read_bytes()
            text = data.decode("utf-8")
        except (UnicodeDecodeError, OSError):
            skipped.append(str(rel))  # e.g. test/encoded_modules: deliberately not UTF-8
            continue
        done += len(data)
        yield Document(str(rel), text, done)


def _text_blocks(path: Path) -> Iterator[tuple[str, int]]:
    """(decoded text, bytes read so far) a block at a time; bytes that are not UTF-8 are an error
    naming the byte and its offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        f = open(path, "rb")
    except OSError as exc:  # permissions, I/O errors
        raise MoelabError(f"data file {path} cannot be read: {exc.strerror or exc}") from None
    with f:
        while True:
            block = f.read(READ_BLOCK)
            pending = decoder.getstate()[0]
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                start = offset - len(pending) + exc.start
                raise MoelabError(
                    f"{path} is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {start}; "
                    "convert it to UTF-8 (for example with iconv) or leave it out with data.glob"
                ) from None
            offset += len(block)
            if text or not block:
                yield text, offset
            if not block:
                return


def _text_documents(path: Path, name: str, done: int) -> Iterator[Document]:
    """A text file cut into documents of about `size` characters at line boundaries (small files
    finer, down to 1 KiB, so that even they can be split train/validation)."""
    size = max(1024, min(DOC_CHARS, path.stat().st_size // 32))
    buffer, index, read, whole = "", 0, 0, True
    for text, read in _text_blocks(path):
        buffer += text
        at_end = not text
        while len(buffer) > size or (at_end and buffer):
            if len(buffer) <= size:  # the last piece
                end = len(buffer)
            else:
                end = size
                newline = buffer.rfind("\n", 0, end)
                if newline > 0:
                    end = newline + 1
            piece, buffer = buffer[:end], buffer[end:]
            whole = whole and at_end and not buffer and index == 0
            yield Document(name if whole else f"{name}#{index}", piece, done + read)
            index += 1


def _jsonl_documents(path: Path, name: str, fld: str, bad: BadRecords, done: int) -> Iterator[Document]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise MoelabError(f"data file {path} cannot be read: {exc.strerror or exc}") from None
    read = 0
    with f:
        for number, line in enumerate(f, start=1):
            read += len(line)
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                bad.found(where, "is not UTF-8")
                continue
            except json.JSONDecodeError as exc:
                bad.found(where, f"is not valid JSON: {exc.msg}")
                continue
            if not isinstance(record, dict) or fld not in record:
                bad.found(where, f"has no {fld!r} field (set data.jsonl_field / --field to the text field)")
                continue
            text = record[fld]
            if not isinstance(text, str):
                bad.found(where, f"field {fld!r} is {type(text).__name__}, expected a string")
                continue
            yield Document(f"{name}:{number}", text, done + read)


def _parquet_file(path: Path, column: str):
    """The opened Parquet file, after checking that `column` exists and holds strings."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MoelabError("reading Parquet needs pyarrow: pip install 'moelab[data]'") from None
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise MoelabError(f"{path} is not a readable Parquet file: {exc}") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise MoelabError(
            f"{path} has no column {column!r}; its columns are {names} (choose one with --field / data.jsonl_field)"
        )
    kind = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise MoelabError(f"{path}: column {column!r} holds {kind}, not text")
    return pf


def _parquet_documents(path: Path, name: str, column: str, bad: BadRecords, done: int) -> Iterator[Document]:
    pf = _parquet_file(path, column)
    rows, size, row = max(1, pf.metadata.num_rows), path.stat().st_size, 0
    for batch in pf.iter_batches(batch_size=RECORD_BATCH, columns=[column]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                bad.found(f"{path} row {row}", f"column {column!r} is null")
                continue
            yield Document(f"{name}:{row}", text, done + size * row // rows)


def _load_datasets(path: Path):
    try:
        import datasets
    except ImportError:
        raise MoelabError("reading a `datasets` directory needs datasets: pip install 'moelab[data]'") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a damaged or foreign directory
        raise MoelabError(f"{path} is not a readable `datasets` directory: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        return [(split, loaded[split]) for split in sorted(loaded)]
    return [("", loaded)]


def _datasets_columns(path: Path, column: str) -> None:
    for split, ds in _load_datasets(path):
        if column not in ds.column_names:
            where = f"{path} split {split!r}" if split else str(path)
            raise MoelabError(
                f"{where} has no column {column!r}; its columns are {ds.column_names} "
                "(choose one with --field / data.jsonl_field)"
            )


def _datasets_documents(path: Path, column: str, bad: BadRecords, total: int) -> Iterator[Document]:
    """Rows of a `save_to_disk` directory (Arrow files, memory-mapped), read in batches; a
    DatasetDict's splits in sorted order, each row named `split:row`."""
    parts = _load_datasets(path)
    rows = max(1, sum(len(ds) for _, ds in parts))
    seen = 0
    for split, ds in parts:
        prefix = f"{split}:" if split else ""
        table = ds.select_columns([column]).with_format("arrow")
        row = 0
        for batch in table.iter(batch_size=RECORD_BATCH):
            for text in batch.column(0).to_pylist():
                row += 1
                seen += 1
                if not isinstance(text, str):
                    bad.found(f"{path} {prefix}row {row}", f"column {column!r} is {type(text).__name__}, not text")
                    continue
                yield Document(f"{prefix}{row}", text, total * seen // rows)


# ---------------------------------------------------------------------------------------------
# Small corpora in memory (tests, tools)


@dataclass(frozen=True)
class Corpus:
    description: str
    train: list[Document]
    val: list[Document]
    skipped: list[str]


def load_corpus(cfg: DataConfig) -> Corpus:
    """Every document of the source in memory, split into train and validation. For small corpora
    only; training streams (moelab.data.tokenize)."""
    source = open_source(cfg)
    docs = list(source.documents())
    if not docs:
        raise MoelabError(f"data source {cfg.source} holds no text (every file is empty or whitespace)")
    train = [d for d in docs if not is_validation(d.name, cfg.val_fraction)]
    val = [d for d in docs if is_validation(d.name, cfg.val_fraction)]
    return Corpus(source.description, train, val, source.skipped)
