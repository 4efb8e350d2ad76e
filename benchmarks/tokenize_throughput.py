"""Streamed tokenisation (`moelab tokenize`) against the `tokenizers` library's own batch encoding,
and its peak memory at two corpus sizes.

A synthetic JSON Lines corpus of plausible text (words drawn with their frequencies from the
standard library's source, in lines and paragraphs of varied length) is written at each size
(default 0.5 and 2 GB; the smaller ones are prefixes of the largest) into --workdir (default: a
temporary directory, removed at the end). A BPE tokenizer is trained once on a slice of the
standard library (timed on its own) and given to every run as a file, so BPE training is not part
of the tokenisation time.

Each size is tokenised in a child process of its own by `moelab.data.tokenize.tokenize` (the
function behind `moelab tokenize`): its wall and CPU time, and its peak resident memory (VmHWM).

Throughput against the raw tokenizer is measured in one more child, on the first --ratio-mb MB of
the corpus, in --rounds interleaved rounds (so a machine shared with other jobs loads every arm
alike): each round runs the raw baselines, which read the same JSON Lines texts in the same
batches and encode them with `Tokenizer.encode_batch` and `Tokenizer.encode_batch_fast` (ids read,
nothing written), and moelab's tokenize of the same slice (shards, hashes and manifest written).
The ratio is moelab's MB/s over the baseline's, the median over rounds; also per CPU-second of the
process (all threads), which other jobs change less. Last, a fresh child times `prepare_data` from
the largest tokenised directory (what a training start costs) and reads its peak RSS.

    python benchmarks/tokenize_throughput.py [--sizes 0.5,2] [--ratio-mb 64] [--rounds 3] [--workdir DIR]
                                  [--vocab-size 4096] [--out docs/results/tokenize-bench.json]

Targets (issue #18): peak RSS under 1.5 GB and flat from 0.5 to 2 GB; throughput >= 0.9x the raw
tokenizer's; a start from the tokenised directory in seconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moelab.config import DataConfig  # noqa: E402
from moelab.data.corpus import stdlib_root  # noqa: E402
from moelab.data.tokenize import BATCH_CHARS, BATCH_DOCS, TokenizeOptions, tokenize  # noqa: E402
from moelab.data.tokenizer import TextTokenizer, train_bpe  # noqa: E402


def peak_rss_mb() -> float:
    """This process's peak resident memory. NOTE: VmHWM, not ru_maxrss: a child's ru_maxrss starts
    from its parent's peak (kept across fork and exec), which would report the parent's memory."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def stdlib_texts(limit_bytes: int) -> list[str]:
    out, total = [], 0
    for path in sorted(stdlib_root().rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return out


def write_corpus(path: Path, size: int, seed: int = 0) -> None:
    """JSON Lines of plausible text: stdlib words with their frequencies, lines and paragraphs.
    A pool of about 40 MB of documents is drawn, then written in a new random order (each record
    with its own number) until the size is reached: drawing words in Python is the slow part."""
    counts = collections.Counter()
    for text in stdlib_texts(8_000_000):
        counts.update(re.findall(r"[A-Za-z_]+|\d+|[^\sA-Za-z\d]", text))
    words = np.array([w for w, _ in counts.most_common(20_000)])
    p = np.array([c for _, c in counts.most_common(20_000)], dtype=np.float64)
    p /= p.sum()
    rng = np.random.default_rng(seed)
    pool, pooled = [], 0
    while pooled < min(size, 40_000_000):
        draws = words[rng.choice(len(words), size=200_000, p=p)]
        pos = 0
        while pos < len(draws) - 3000:
            n = int(rng.integers(40, 3000))  # words per document
            doc = draws[pos : pos + n].tolist()
            pos += n
            for i in range(12, len(doc), int(rng.integers(8, 16))):
                doc[i] += "\n" if rng.random() < 0.85 else "\n\n"
            pool.append(json.dumps(" ".join(doc)))
            pooled += len(pool[-1])
    written, number = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            lines = []
            for i in rng.permutation(len(pool)):
                lines.append(f'{{"text": {pool[i]}, "n": {number}}}\n')
                number += 1
            chunk = "".join(lines)
            f.write(chunk)
            written += len(chunk.encode("utf-8"))


def prefix_copy(src: Path, dst: Path, size: int) -> None:
    """The first `size` bytes of src, cut at a line end."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        remaining = size
        while remaining > 0:
            block = fi.read(min(1 << 24, remaining))
            if not block:
                return
            fo.write(block)
            remaining -= len(block)
        fo.write(fi.readline())


def raw_encode(path: Path, tokenizer_path: Path, limit: int, fast: bool) -> dict:
    """The baseline: the same texts in the same batches, `encode_batch(_fast)`, ids read."""
    tok = TextTokenizer.load(tokenizer_path).tokenizer
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    started, cpu = time.perf_counter(), time.process_time()
    done = tokens = 0

    def run(batch: list[str]) -> int:
        return sum(len(e.ids) for e in encode(batch, add_special_tokens=False))

    with open(path, "rb") as f:
        batch, chars = [], 0
        for line in f:
            done += len(line)
            text = json.loads(line)["text"]
            batch.append(text)
            chars += len(text)
            if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
                tokens += run(batch)
                batch, chars = [], 0
            if done >= limit:
                break
        if batch:
            tokens += run(batch)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "bytes": done,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "mb_s": done / seconds / 1e6,
        "mb_per_cpu_s": done / cpu / 1e6,
        "tokens_s": tokens / seconds,
    }


def child_tokenize(path: Path, out: Path, tokenizer_path: Path) -> dict:
    cfg = DataConfig(source=str(path), tokenizer="file", tokenizer_file=str(tokenizer_path))
    before, cpu = peak_rss_mb(), time.process_time()
    result = tokenize(cfg, out, TokenizeOptions())
    peak, cpu = peak_rss_mb(), time.process_time() - cpu
    size = path.stat().st_size
    row = {
        "input_bytes": size,
        "tokens": sum(result.manifest["splits"][s]["tokens"] for s in ("train", "val")),
        "shards": sum(len(result.manifest["splits"][s]["shards"]) for s in ("train", "val")),
        "seconds": result.seconds,
        "cpu_seconds": cpu,
        "mb_s": size / result.seconds / 1e6,
        "mb_per_cpu_s": size / cpu / 1e6,
        "tokens_s": result.tokens / result.seconds,
        "peak_rss_mb": peak,
        "rss_before_mb": before,
    }
    return row


def child_ratio(path: Path, tokenizer_path: Path, rounds: int) -> dict:
    """Interleaved rounds over one slice: raw encode_batch, raw encode_batch_fast, moelab."""
    size = path.stat().st_size
    cfg = DataConfig(source=str(path), tokenizer="file", tokenizer_file=str(tokenizer_path))
    per_round = []
    for _ in range(rounds):
        row = {
            "encode_batch": raw_encode(path, tokenizer_path, size, fast=False),
            "encode_batch_fast": raw_encode(path, tokenizer_path, size, fast=True),
        }
        out = Path(tempfile.mkdtemp(prefix="tokens-", dir=path.parent))
        wall, cpu = time.perf_counter(), time.process_time()
        tokenize(cfg, out / "t", TokenizeOptions())
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        shutil.rmtree(out)
        row["moelab"] = {
            "seconds": wall,
            "cpu_seconds": cpu,
            "mb_s": size / wall / 1e6,
            "mb_per_cpu_s": size / cpu / 1e6,
        }
        per_round.append(row)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    ratios = {}
    for base in ("encode_batch", "encode_batch_fast"):
        for unit in ("mb_s", "mb_per_cpu_s"):
            ratios[f"vs_{base}_{unit}"] = median([r["moelab"][unit] / r[base][unit] for r in per_round])
    return {"slice_bytes": size, "rounds": per_round, "ratios": ratios}


def child_prepare(out: Path) -> dict:
    from moelab.data.shards import prepare_data

    started = time.perf_counter()
    data = prepare_data(DataConfig(source=f"tokens:{out}"))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "train_tokens": len(data.train), "peak_rss_mb": peak_rss_mb()}


def in_child(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, env={**os.environ}
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5,2", help="corpus sizes in GB, comma-separated (default 0.5,2)")
    ap.add_argument("--ratio-mb", type=float, default=64, help="MB of the corpus the throughput ratio is measured on")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the throughput ratio (median)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--workdir", help="where corpora and shards go (default: a temporary directory, removed)")
    ap.add_argument("--out", help="write the results as JSON here (e.g. docs/results/tokenize-bench.json)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "tokenize":
            row = child_tokenize(Path(rest[0]), Path(rest[1]), Path(rest[2]))
        elif kind == "ratio":
            row = child_ratio(Path(rest[0]), Path(rest[1]), int(rest[2]))
        else:
            row = child_prepare(Path(rest[0]))
        print(json.dumps(row))
        return

    sizes = sorted(float(s) for s in args.sizes.split(","))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="moelab-tokenize-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    need = sum(sizes) * 2.2e9
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work} has {free / 1e9:.1f} GB free; this run needs about {need / 1e9:.1f} GB")
    try:
        started = time.perf_counter()
        tok = train_bpe(iter(stdlib_texts(20_000_000)), args.vocab_size)
        bpe_seconds = time.perf_counter() - started
        tok_path = work / "tokenizer.json"
        tok.save(tok_path)
        print(f"BPE tokenizer ({args.vocab_size} tokens) trained on 20 MB of stdlib source in {bpe_seconds:.1f}s")
        largest = work / f"corpus-{sizes[-1]:g}GB.jsonl"
        started = time.perf_counter()
        if not largest.is_file():
            write_corpus(largest, int(sizes[-1] * 1e9))
        print(
            f"synthetic corpus {largest} ({largest.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.0f}s"
        )
        rows = []
        for size in sizes:
            path = work / f"corpus-{size:g}GB.jsonl"
            if not path.is_file():
                prefix_copy(largest, path, int(size * 1e9))
            out = work / f"tokens-{size:g}GB"
            shutil.rmtree(out, ignore_errors=True)
            row = in_child("tokenize", str(path), str(out), str(tok_path))
            row["size_gb"] = size
            rows.append(row)
            print(f"{size:g} GB done: {row['mb_s']:.2f} MB/s, peak RSS {row['peak_rss_mb']:.0f} MB")
        start = in_child("prepare", str(work / f"tokens-{sizes[-1]:g}GB"))
        ratio_slice = work / f"slice-{args.ratio_mb:g}MB.jsonl"
        prefix_copy(largest, ratio_slice, int(args.ratio_mb * 1e6))
        ratio = in_child("ratio", str(ratio_slice), str(tok_path), str(args.rounds))
        print(f"throughput ratio over {args.rounds} interleaved rounds of {args.ratio_mb:g} MB done")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print("| corpus | tokens | shards | seconds | MB/s | MB per CPU-s | tokens/s | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['size_gb']:g} GB | {r['tokens']:,} | {r['shards']} | {r['seconds']:.0f} | {r['mb_s']:.2f} | "
            f"{r['mb_per_cpu_s']:.2f} | {r['tokens_s'] / 1e6:.2f}M | {r['peak_rss_mb']:.0f} |"
        )
    q = ratio["ratios"]
    print(
        f"\nthroughput, moelab / raw tokenizer, median of {args.rounds} interleaved rounds on {args.ratio_mb:g} MB "
        f"(wall; per CPU-second): vs encode_batch {q['vs_encode_batch_mb_s']:.2f}x; "
        f"{q['vs_encode_batch_mb_per_cpu_s']:.2f}x, vs encode_batch_fast {q['vs_encode_batch_fast_mb_s']:.2f}x; "
        f"{q['vs_encode_batch_fast_mb_per_cpu_s']:.2f}x"
    )
    print(
        f"\nprepare_data from the {sizes[-1]:g} GB tokenised directory: {start['seconds']:.2f}s, "
        f"{start['train_tokens']:,} train tokens, peak RSS {start['peak_rss_mb']:.0f} MB"
    )
    if args.out:
        result = {
            "benchmark": "tokenize",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "bpe_training_seconds": bpe_seconds,
            "vocab_size": args.vocab_size,
            "rows": rows,
            "throughput_ratio": ratio,
            "prepare_data": start,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
