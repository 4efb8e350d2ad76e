"""`moelab tokenize`: a corpus into a tokenised directory; and the data summary `moelab info --data`
prints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moelab.cli.common import log_err
from moelab.errors import MoelabError


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Tokenise a corpus into memory-mapped token shards with a manifest, streaming it (memory
    does not grow with the corpus) through the tokenizer on every core.

    SRC is a text file, a directory (--glob), a JSON Lines file (--field), a Parquet file (--field
    names the column), a Hugging Face `datasets` directory written by save_to_disk (--field), or
    'stdlib'; in a directory, .jsonl and .parquet files are read as records, other files as text.
    OUT is a new directory: shards train-NNNNN.bin / val-NNNNN.bin (uint16 when the
    vocabulary fits, else uint32; documents separated by the end-of-text token), tokenizer.json and
    manifest.json. Train with `moelab train --data OUT`.

    The tokenizer is a byte-level BPE trained on a bounded sample of the training documents
    (--vocab-size), raw bytes (--tokenizer bytes), or a given tokenizer.json (--tokenizer PATH).
    Documents go to validation by a stable hash of their name (--val-fraction).

    Run the same command again after an interruption: it resumes from the last complete shard, and
    the result equals an uninterrupted run byte for byte. `moelab tokenize --verify OUT` checks
    every shard's sha256 and every token id (loading checks sizes, and hashes only shards whose
    modification time changed)."""
    from moelab.config import DataConfig
    from moelab.data.tokendir import verify_token_dir
    from moelab.data.tokenize import TokenizeOptions, tokenize

    if args.verify:
        if args.out is not None:
            raise MoelabError("--verify takes one directory: moelab tokenize --verify DIR")
        manifest = verify_token_dir(Path(args.src), log=log_err if not args.quiet else lambda s: None)
        print(f"{args.src}: verified ({_totals_line(manifest)})")
        return 0
    if args.out is None:
        raise MoelabError("give the source and the output directory: moelab tokenize SRC OUT")
    tokenizer, tokenizer_file = args.tokenizer, ""
    if tokenizer not in ("bpe", "bytes"):
        tokenizer, tokenizer_file = "file", args.tokenizer
    cfg = DataConfig(
        source=args.src,
        glob=args.glob,
        jsonl_field=args.field,
        tokenizer=tokenizer,
        tokenizer_file=tokenizer_file,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        max_bytes=args.max_bytes,
    )
    cfg.validate()
    options = TokenizeOptions(
        shard_tokens=args.shard_tokens,
        bpe_sample_bytes=int(args.bpe_sample_mb * 1e6),
        on_bad_record=args.on_bad_record,
    )
    result = tokenize(cfg, args.out, options, log=log_err, progress=not args.quiet)
    if result.already_complete:
        print(f"{args.out}: already complete ({_totals_line(result.manifest)})")
        return 0
    rate = result.input_bytes / max(result.seconds, 1e-9) / 1e6
    print(
        f"{args.out}: {_totals_line(result.manifest)}; {'resumed, ' if result.resumed else ''}"
        f"{result.seconds:.1f}s, {rate:.2f} MB/s, {result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s"
    )
    return 0


def _totals_line(m: dict) -> str:
    s = m["splits"]
    shards = len(s["train"]["shards"]) + len(s["val"]["shards"])
    docs = (
        ""
        if s["train"]["documents"] is None
        else f"{s['train']['documents']:,} / {s['val']['documents']:,} documents, "
    )
    line = (
        f"{docs}{s['train']['tokens']:,} train / {s['val']['tokens']:,} validation tokens, {shards} shard(s), "
        f"{m['dtype']}, vocabulary {m['vocab_size']}"
    )
    skipped = m.get("bad_records", {}).get("skipped", 0)
    return line + (f", {skipped} bad record(s) skipped" if skipped else "")


def print_data_info(path: Path, as_json: bool) -> int:
    """`moelab info --data DIR`: the totals of a tokenised directory."""
    from moelab.data.tokendir import open_token_dir, summary

    data = open_token_dir(path, log=log_err)
    info = summary(data)
    if as_json:
        print(json.dumps(info, indent=1))
        return 0
    docs = (
        "unknown (nanoGPT files)"
        if info["train_documents"] is None
        else f"{info['train_documents']:,} train / {info['val_documents']:,} validation"
    )
    print(f"data                    {info['path']} ({info['format']})")
    print(f"source                  {info['description']}")
    print(f"documents               {docs}")
    print(f"tokens                  {info['train_tokens']:,} train / {info['val_tokens']:,} validation")
    print(f"shards                  {info['train_shards']} train / {info['val_shards']} validation, {info['dtype']}")
    print(
        f"tokenizer               {info['tokenizer']}, vocabulary {info['vocab_size']}, sha256 {info['tokenizer_sha256'][:16]}"
    )
    if info["bad_records_skipped"]:
        print(f"bad records skipped     {info['bad_records_skipped']}")
    return 0


def register(sub, command) -> None:
    """Add these commands to the `moelab` parser."""
    p = command(sub, "tokenize", cmd_tokenize, "tokenise a corpus into memory-mapped token shards (resumable)")
    p.add_argument("src", metavar="SRC", help="text file, directory, .jsonl, .parquet, datasets directory or 'stdlib'")
    p.add_argument(
        "out", metavar="OUT", nargs="?", help="output directory (resumed if it holds the same unfinished job)"
    )
    p.add_argument(
        "--tokenizer", default="bpe", help="bpe (trained on a sample, default), bytes, or a tokenizer.json to use"
    )
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    p.add_argument("--bpe-sample-mb", type=float, default=64.0, help="train BPE on about this much text (default 64)")
    p.add_argument("--field", default="text", help="JSON Lines field / Parquet or datasets column (default text)")
    p.add_argument("--glob", default="*", help="files to read under a directory: comma-separated patterns")
    p.add_argument("--val-fraction", type=float, default=0.03, help="share of documents held out (default 0.03)")
    p.add_argument("--max-bytes", type=int, default=0, help="a stable sample of about this many input bytes (0 = all)")
    p.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard (default 67,108,864)")
    p.add_argument(
        "--on-bad-record",
        choices=["error", "skip"],
        default="error",
        help="a JSON Lines line that is not JSON or lacks the field, or a null value: stop (default) or skip and count",
    )
    p.add_argument("--verify", action="store_true", help="check a tokenised directory (SRC): sha256 and token ids")
    p.add_argument("--quiet", action="store_true", help="no progress line")
