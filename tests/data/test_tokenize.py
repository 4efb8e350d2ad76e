"""Streamed tokenisation into shards (`moelab tokenize`), the multi-shard view, exact resume, the
token cache, and the errors bad input gets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moelab.cli import main
from moelab.config import DataConfig, build_config
from moelab.data.corpus import is_validation
from moelab.data.loader import BatchLoader, eval_batches
from moelab.data.shards import prepare_data
from moelab.data.tokendir import MANIFEST, ShardedTokens, open_token_dir
from moelab.data.tokenize import TokenizeOptions, tokenize
from moelab.data.tokenizer import TextTokenizer, bytes_tokenizer, train_bpe
from moelab.errors import MoelabError
from tests.test_cli import TINY, assert_usage_error, run_cli

REPO = Path(__file__).resolve().parents[2]
WORDS = "the of and a to in is for def return class self import if else value data token shard ✓ été".split()


def texts(n: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(5, 120)))
        out.append(f"doc {i}: " + " ".join(words) + ("\n" if i % 3 else "\n\nend."))
    return out


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(iter(texts(200, seed=9)), vocab_size=300).save(path)
    return path


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)))
    return path


def split_docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    ids = np.asarray(tokens).tolist()
    docs, cur = [], []
    for t in ids:
        if t == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert not cur, "the stream ends with the end-of-text token"
    return docs


def expected(named: list[tuple[str, str]], tok: TextTokenizer, val_fraction: float = 0.03):
    """The reference: each document encoded alone by the tokenizer itself, in stream order."""
    out = {"train": [], "val": []}
    for name, text in named:
        out["val" if is_validation(name, val_fraction) else "train"].append(tok.encode(text))
    return out


def assert_matches_reference(out: Path, named: list[tuple[str, str]]) -> dict:
    data = open_token_dir(out)
    manifest = json.loads((out / MANIFEST).read_text())
    want = expected(named, data.tokenizer, manifest["job"]["val_fraction"])
    for split in ("train", "val"):
        got = split_docs(getattr(data, split)[0 : len(getattr(data, split))], data.tokenizer.eos_id)
        assert got == want[split], split
        assert manifest["splits"][split]["documents"] == len(want[split])
        assert manifest["splits"][split]["tokens"] == sum(len(d) + 1 for d in want[split])
    return manifest


def bump_mtime(path: Path) -> None:
    """A later mtime, whatever the file system's timestamp granularity (a rewrite within the same
    clock tick can keep the old mtime; size + mtime is make's and rsync's rule too)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every file of a tokenised directory but the verification cache (it holds mtimes)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != ".verified.json"}


# ---------------------------------------------------------------------------------------------
# Round trip, formats, manifest


def test_jsonl_shards_round_trip_to_the_tokenizers_own_encoding(tmp_path, tokenizer_file) -> None:
    docs = texts()
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    cfg = DataConfig(source=str(src), tokenizer="file", tokenizer_file=str(tokenizer_file), val_fraction=0.1)
    result = tokenize(cfg, tmp_path / "out", TokenizeOptions(shard_tokens=2000))
    named = [(f"docs.jsonl:{i + 1}", t) for i, t in enumerate(docs)]
    data = open_token_dir(tmp_path / "out")
    want = expected(named, data.tokenizer, 0.1)
    for split in ("train", "val"):
        assert split_docs(getattr(data, split)[0 : len(getattr(data, split))], data.tokenizer.eos_id) == want[split]
    m = result.manifest
    assert m["status"] == "complete" and m["format"] == "moelab-tokens" and m["version"] == 1
    assert m["dtype"] == "uint16" and m["vocab_size"] == 300
    assert len(m["splits"]["train"]["shards"]) > 3  # small shards: many of them
    for split in ("train", "val"):
        for shard in m["splits"][split]["shards"]:
            raw = (tmp_path / "out" / shard["file"]).read_bytes()
            assert len(raw) == shard["bytes"] == 2 * shard["tokens"]
            import hashlib

            assert hashlib.sha256(raw).hexdigest() == shard["sha256"]
            assert np.frombuffer(raw, np.uint16)[-1] == data.tokenizer.eos_id  # documents are never cut
    assert m["tokenizer"]["file"] == "tokenizer.json" and len(m["tokenizer"]["sha256"]) == 64
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")]


def test_parquet_directory_and_datasets_inputs_match_the_reference(tmp_path, tokenizer_file) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    docs = texts(300, seed=1)
    common = dict(tokenizer="file", tokenizer_file=str(tokenizer_file), val_fraction=0.1)

    def run(source: Path, name: str, **kw) -> None:
        tokenize(DataConfig(source=str(source), **common, **kw), tmp_path / name, TokenizeOptions(shard_tokens=3000))

    pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), tmp_path / "d.parquet", row_group_size=64)
    run(tmp_path / "d.parquet", "pq", jsonl_field="body")
    assert_matches_reference(tmp_path / "pq", [(f"d.parquet:{i + 1}", t) for i, t in enumerate(docs)])

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    names = []
    for i, t in enumerate(docs[:60]):
        rel = f"sub/{i:03d}.txt" if i % 2 else f"{i:03d}.md"
        (folder / rel).write_text(t)
        names.append(rel)
    (folder / "skip.bin").write_bytes(b"\xff")
    run(folder, "dir", glob="*.txt,*.md")
    assert_matches_reference(tmp_path / "dir", sorted((n, (folder / n).read_text()) for n in names))

    ds = datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))})
    ds.save_to_disk(str(tmp_path / "hf"))
    run(tmp_path / "hf", "hf-out")
    assert_matches_reference(tmp_path / "hf-out", [(f"{i + 1}", t) for i, t in enumerate(docs)])
    datasets.DatasetDict({"train": ds, "extra": ds.select(range(5))}).save_to_disk(str(tmp_path / "hfd"))
    run(tmp_path / "hfd", "hfd-out")
    named = [(f"extra:{i + 1}", t) for i, t in enumerate(docs[:5])] + [
        (f"train:{i + 1}", t) for i, t in enumerate(docs)
    ]
    assert_matches_reference(tmp_path / "hfd-out", named)

    src = write_jsonl(tmp_path / "d.jsonl", docs)
    run(src, "jsonl")
    assert_matches_reference(tmp_path / "jsonl", [(f"d.jsonl:{i + 1}", t) for i, t in enumerate(docs)])


def test_bpe_trained_on_a_bounded_sample_and_uint32_for_large_vocabularies(tmp_path) -> None:
    docs = texts(300, seed=2)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    result = tokenize(
        DataConfig(source=str(src), vocab_size=400), tmp_path / "bpe", TokenizeOptions(bpe_sample_bytes=5000)
    )
    assert result.manifest["tokenizer"]["kind"] == "bpe" and result.manifest["vocab_size"] <= 400
    assert_matches_reference(tmp_path / "bpe", [(f"d.jsonl:{i + 1}", t) for i, t in enumerate(docs)])
    # A vocabulary beyond 65,536 ids is stored as uint32.
    big = bytes_tokenizer()
    big.tokenizer.add_tokens([f"<extra{i}>" for i in range(66_000)])
    big.save(tmp_path / "big.json")
    result = tokenize(
        DataConfig(source=str(src), tokenizer="file", tokenizer_file=str(tmp_path / "big.json")), tmp_path / "u32"
    )
    assert result.manifest["dtype"] == "uint32"
    assert_matches_reference(tmp_path / "u32", [(f"d.jsonl:{i + 1}", t) for i, t in enumerate(docs)])


def test_glob_accepts_a_toml_list_and_a_string() -> None:
    cfg = build_config({"data": {"glob": ["*.md", "*.txt"]}})
    assert cfg.data.glob == ["*.md", "*.txt"]
    assert build_config({"data": {"glob": "*.md,*.txt"}}).data.glob == "*.md,*.txt"
    with pytest.raises(MoelabError, match="data.glob"):
        build_config({"data": {"glob": [1]}})
    assert 'glob = [\n    "*.md",' in cfg.to_toml() or 'glob = ["*.md", "*.txt"]' in cfg.to_toml()


# ---------------------------------------------------------------------------------------------
# Resume


class Interrupt(Exception):
    pass


def interrupt_after(n: int):
    def hook(committed: int) -> None:
        if committed >= n:
            raise Interrupt

    return hook


def test_interrupted_tokenise_resumes_to_the_same_bytes(tmp_path) -> None:
    docs = texts(600, seed=3)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    cfg = DataConfig(source=str(src), vocab_size=320, val_fraction=0.2)
    options = TokenizeOptions(shard_tokens=1500)
    whole = tokenize(cfg, tmp_path / "whole", options)
    assert sum(len(whole.manifest["splits"][s]["shards"]) for s in ("train", "val")) > 8
    for stop_at in (1, 4, 7):
        out = tmp_path / f"cut{stop_at}"
        with pytest.raises(Interrupt):
            tokenize(cfg, out, options, after_shard=interrupt_after(stop_at))
        partial = json.loads((out / MANIFEST).read_text())
        assert partial["status"] == "in-progress"
        assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]  # nothing half-written stays
        with pytest.raises(MoelabError, match="unfinished tokenisation"):
            open_token_dir(out)
        # what a kill inside a write leaves: the temporary of a manifest write and of a shard
        (out / f".{MANIFEST}-k1ll3d").write_text('{"status": "in-progress"')
        (out / ".tmp-train-99999.bin").write_bytes(b"\x00" * 10)
        again = tokenize(cfg, out, options)
        assert again.resumed and again.tokens < whole.tokens  # the complete shards were not redone
        assert tree_bytes(out) == tree_bytes(tmp_path / "whole")


@pytest.mark.slow
def test_a_killed_tokenise_process_resumes_to_the_same_bytes(tmp_path) -> None:
    """SIGKILL a real `moelab tokenize` after some shards, run it again, compare byte for byte."""
    src = write_jsonl(tmp_path / "d.jsonl", texts(4000, seed=4))
    args = [sys.executable, "-m", "moelab", "tokenize", str(src)]
    flags = ["--tokenizer", "bytes", "--shard-tokens", "3000", "--quiet"]
    subprocess.run([*args, str(tmp_path / "whole"), *flags], check=True, cwd=REPO, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, str(out), *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # NOTE: generous deadline: on a loaded CI machine the child's start (imports) alone can take
    # tens of seconds; the kill waits for 20 complete shards of about 500.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            m = json.loads((out / MANIFEST).read_text())
            if len(m["splits"]["train"]["shards"]) >= 20:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it was killed: make the corpus larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    m = json.loads((out / MANIFEST).read_text())
    assert m["status"] == "in-progress", "the run finished before it was killed: make the corpus larger"
    done = subprocess.run([*args, str(out), *flags], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stdout
    assert tree_bytes(out) == tree_bytes(tmp_path / "whole")


# ---------------------------------------------------------------------------------------------
# The multi-shard view and the loader


def test_sharded_tokens_slices_like_one_array() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 1000, n).astype(np.uint16) for n in (37, 1, 50, 13, 64)]
    whole = np.concatenate(parts)
    view = ShardedTokens(parts)
    assert len(view) == len(whole)
    for a in range(0, len(whole), 7):
        for b in (a, a + 1, a + 40, a + 100, len(whole)):
            assert np.array_equal(view[a:b], whole[a:b]), (a, b)
    assert view[-1] == whole[-1] and view[37] == whole[37]
    assert np.array_equal(np.asarray(view), whole)


def test_loader_resumes_exactly_across_shard_boundaries_and_world_sizes() -> None:
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 300, n).astype(np.uint16) for n in (95, 130, 41, 200, 77, 150)]
    whole = np.concatenate(parts)
    view = ShardedTokens(parts)
    seq = 10  # windows of 11 tokens: many straddle a shard boundary
    reference = BatchLoader(whole, batch_size=4, seq_len=seq, seed=5)
    want = [reference.next_batch() for _ in range(40)]  # several epochs
    loader = BatchLoader(view, batch_size=4, seq_len=seq, seed=5)
    for i in range(13):
        x, y = loader.next_batch()
        assert torch.equal(x, want[i][0]) and torch.equal(y, want[i][1])
    state = loader.state_dict()
    resumed = BatchLoader(ShardedTokens(parts), batch_size=4, seq_len=seq, seed=5)
    resumed.load_state_dict(state)
    for i in range(13, 40):
        assert torch.equal(resumed.next_batch()[0], want[i][0])
    # world 2 resumed from the world-1 state: the two ranks together read the same global batches
    ranks = [BatchLoader(view, batch_size=2, seq_len=seq, seed=5, rank=r, world=2) for r in range(2)]
    for r in ranks:  # the per-rank share of the global batch, as the distributed resume gives it
        r.load_state_dict({**state, "batch_size": 2})
    for i in range(13, 20):
        r0, r1 = (r.next_batch()[0] for r in ranks)  # rank r reads every world-th window
        assert torch.equal(torch.stack([r0[0], r1[0], r0[1], r1[1]]), want[i][0])
    a = eval_batches(view, 4, seq, 3)
    b = eval_batches(whole, 4, seq, 3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))


# ---------------------------------------------------------------------------------------------
# The token cache


def test_text_sources_go_through_the_cache_keyed_by_file_stats(tmp_path) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", texts(300, seed=6))
    cfg = DataConfig(source=str(src), tokenizer="bytes", cache_dir=str(tmp_path / "cache"))
    lines: list[str] = []
    first = prepare_data(cfg, log=lines.append)
    assert sum("tokenising" in s for s in lines) == 1
    lines.clear()
    second = prepare_data(cfg, log=lines.append)
    assert not any("tokenising" in s for s in lines)
    assert np.array_equal(np.asarray(first.train), np.asarray(second.train))
    assert first.meta["train_tokens"] == len(first.train)
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))  # touched: a new entry
    prepare_data(cfg)
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2
    # a tokenised directory is a data source as it is (no cache entry)
    tokens_cfg = DataConfig(source=f"tokens:{entries[0]}", cache_dir=str(tmp_path / "cache"))
    direct = prepare_data(tokens_cfg)
    assert np.array_equal(np.asarray(direct.val), np.asarray(first.val))
    assert np.array_equal(np.asarray(prepare_data(DataConfig(source=str(entries[0]))).val), np.asarray(first.val))


def _prepare_in_worker(rank: int, world: int, src: str, cache: str) -> tuple[bool, int]:
    lines: list[str] = []
    data = prepare_data(DataConfig(source=src, tokenizer="bytes", cache_dir=cache), log=lines.append)
    return any(s.startswith("tokenising") for s in lines), len(data.train)


@pytest.mark.slow
def test_two_processes_tokenise_once(tmp_path) -> None:
    from tests.distributed.harness import run_workers

    src = write_jsonl(tmp_path / "d.jsonl", texts(3000, seed=7))
    results = run_workers(_prepare_in_worker, 2, str(src), str(tmp_path / "cache"))
    assert sum(built for built, _ in results) == 1, results
    assert results[0][1] == results[1][1] > 0
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


# ---------------------------------------------------------------------------------------------
# Training from tokens


def nanogpt_dir(path: Path, docs: list[str]) -> Path:
    tok = bytes_tokenizer()
    path.mkdir()
    ids = []
    for t in docs:
        ids += tok.encode(t) + [tok.eos_id]
    cut = int(len(ids) * 0.9)
    np.array(ids[:cut], np.uint16).tofile(path / "train.bin")
    np.array(ids[cut:], np.uint16).tofile(path / "val.bin")
    tok.save(path / "tokenizer.json")
    return path


@pytest.mark.slow
def test_nanogpt_pair_and_tokenised_directory_train(capsys, tmp_path) -> None:
    steps = ["--set", "train.max_steps=3", "--set", "train.eval_every=3", "--set", "train.sample_tokens=0"]
    nano = nanogpt_dir(tmp_path / "nano", texts(400, seed=8) * 3)
    code, out, err = run_cli(capsys, "train", *TINY, "--data", str(nano), "--out", str(tmp_path / "r1"), *steps)
    assert code == 0, err
    assert "finished at step 3" in out
    src = write_jsonl(tmp_path / "d.jsonl", texts(1200, seed=8))
    code, _, err = run_cli(capsys, "tokenize", str(src), str(tmp_path / "tok"), "--tokenizer", "bytes", "--quiet")
    assert code == 0, err
    code, out, err = run_cli(
        capsys, "train", *TINY, "--data", f"tokens:{tmp_path / 'tok'}", "--out", str(tmp_path / "r2"), *steps
    )
    assert code == 0, err
    data_json = json.loads((tmp_path / "r2" / "data.json").read_text())
    assert data_json["format"] == "moelab-tokens" and data_json["train_shards"] >= 1


def test_info_prints_the_manifest_totals(capsys, tmp_path) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", texts(200))
    assert main(["tokenize", str(src), str(tmp_path / "tok"), "--tokenizer", "bytes", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "documents" in out and "shard(s)" in out and "uint16" in out
    code, out, _ = run_cli(capsys, "info", "--data", str(tmp_path / "tok"))
    assert code == 0 and "tokens" in out and "uint16" in out and "bytes, vocabulary 260" in out
    code, out, _ = run_cli(capsys, "info", "--data", str(tmp_path / "tok"), "--json")
    info = json.loads(out)
    assert info["train_documents"] + info["val_documents"] == 200 and info["dtype"] == "uint16"
    code, out, _ = run_cli(capsys, "info", "--preset", "tiny")  # configs keep their behaviour
    assert code == 0 and "total parameters" in out


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no shard that looks complete


def assert_nothing_complete(out: Path) -> None:
    if not out.exists():
        return
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    if (out / MANIFEST).is_file():
        assert json.loads((out / MANIFEST).read_text())["status"] != "complete"


def test_parquet_without_the_column_names_the_columns(capsys, tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["a b c"], "id": [1]}), tmp_path / "d.parquet")
    code, _, err = run_cli(capsys, "tokenize", str(tmp_path / "d.parquet"), str(tmp_path / "o"), "--quiet")
    assert_usage_error(code, err, "d.parquet", "no column 'text'", "['body', 'id']")
    assert_nothing_complete(tmp_path / "o")


def test_bad_jsonl_records_stop_with_the_line_or_are_counted(capsys, tmp_path) -> None:
    docs = texts(300)
    lines = [json.dumps({"text": t}) for t in docs]
    lines[150] = "{not json"
    lines[200] = json.dumps({"body": "no text field"})
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "tokenize", str(src), str(out), "--tokenizer", "bytes", "--shard-tokens", "500")
    assert_usage_error(code, err, "d.jsonl line 151", "not valid JSON", "--on-bad-record skip")
    assert_nothing_complete(out)
    code, stdout, err = run_cli(
        capsys, "tokenize", str(src), str(tmp_path / "o2"), "--tokenizer", "bytes", "--on-bad-record", "skip"
    )
    assert code == 0, err
    assert "2 bad record(s) skipped" in stdout and "line 151" in err
    manifest = json.loads((tmp_path / "o2" / MANIFEST).read_text())
    assert manifest["bad_records"]["skipped"] == 2 and "line 151" in manifest["bad_records"]["first"]
    # the skip run resumed after an interruption counts each bad record once
    cfg = DataConfig(source=str(src), tokenizer="bytes")
    options = TokenizeOptions(shard_tokens=800, on_bad_record="skip")
    with pytest.raises(Interrupt):
        tokenize(cfg, tmp_path / "o3", options, after_shard=interrupt_after(9))
    assert tokenize(cfg, tmp_path / "o3", options).manifest["bad_records"]["skipped"] == 2
    tokenize(cfg, tmp_path / "o4", options)
    assert tree_bytes(tmp_path / "o3") == tree_bytes(tmp_path / "o4")


def test_directory_without_matching_files(capsys, tmp_path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hello")
    code, _, err = run_cli(capsys, "tokenize", str(tmp_path / "src"), str(tmp_path / "o"), "--glob", "*.md")
    assert_usage_error(code, err, str(tmp_path / "src"), "no files", "*.md")
    assert not (tmp_path / "o").exists()


def test_damaged_shard_is_named(capsys, tmp_path) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", texts(300))
    out = tmp_path / "o"
    assert main(["tokenize", str(src), str(out), "--tokenizer", "bytes", "--shard-tokens", "2000", "--quiet"]) == 0
    capsys.readouterr()
    shard = out / "train-00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 1  # same size, new mtime: the load hashes it again
    shard.write_bytes(bytes(raw))
    bump_mtime(shard)
    code, _, err = run_cli(capsys, "info", "--data", str(out))
    assert_usage_error(code, err, "train-00001.bin", "sha256 does not match")
    code, _, err = run_cli(capsys, "tokenize", "--verify", str(out))
    assert_usage_error(code, err, "train-00001.bin", "sha256")
    raw[10] ^= 1
    shard.write_bytes(bytes(raw))  # repaired (hashed again: it matches)
    (out / "train-00002.bin").write_bytes(b"\x00\x00")
    with pytest.raises(MoelabError, match="train-00002.bin is 2 bytes"):
        open_token_dir(out)


def test_copied_shards_are_verified_once(tmp_path) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", texts(100))
    tokenize(DataConfig(source=str(src), tokenizer="bytes"), tmp_path / "o")
    for p in (tmp_path / "o").glob("*.bin"):
        bump_mtime(p)  # e.g. copied without -p
    lines: list[str] = []
    open_token_dir(tmp_path / "o", log=lines.append)
    assert any("verified the sha256 of 2 shard(s)" in s for s in lines)
    lines.clear()
    open_token_dir(tmp_path / "o", log=lines.append)
    assert not lines


def test_nanogpt_ids_beyond_the_vocabulary(capsys, tmp_path) -> None:
    nano = nanogpt_dir(tmp_path / "nano", texts(50))
    assert open_token_dir(nano).tokenizer.vocab_size == 260  # checked once, then cached by size and mtime
    ids = np.fromfile(nano / "val.bin", np.uint16)
    ids[7] = 5000
    ids.tofile(nano / "val.bin")
    bump_mtime(nano / "val.bin")  # a new version of the file: checked again
    code, _, err = run_cli(capsys, "train", *TINY, "--data", str(nano), "--out", str(tmp_path / "r"))
    assert_usage_error(code, err, "val.bin", "token id 5000", "vocabulary of 260")
    assert not (tmp_path / "r").exists()
    (nano / "tokenizer.json").unlink()
    code, _, err = run_cli(capsys, "info", "--data", f"tokens:{nano}")
    assert_usage_error(code, err, "tokenizer.json")


def test_output_directory_holding_another_corpus(capsys, tmp_path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", texts(100, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", texts(100, seed=2))
    out = tmp_path / "o"
    assert main(["tokenize", str(a), str(out), "--tokenizer", "bytes", "--quiet"]) == 0
    before = tree_bytes(out)
    code, _, err = run_cli(capsys, "tokenize", str(b), str(out), "--tokenizer", "bytes")
    assert_usage_error(code, err, str(out), "holds another tokenisation", "source.path")
    code, _, err = run_cli(capsys, "tokenize", str(a), str(out), "--vocab-size", "300")
    assert_usage_error(code, err, "differs in tokenizer.kind")
    assert tree_bytes(out) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "other" / ".tmp-mine").write_text("also mine")  # named like a leftover, but not ours
    code, _, err = run_cli(capsys, "tokenize", str(a), str(tmp_path / "other"), "--tokenizer", "bytes")
    assert_usage_error(code, err, "not empty")
    assert (tmp_path / "other" / ".tmp-mine").read_text() == "also mine"  # nothing of the user's removed
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    code, out_text, _ = run_cli(capsys, "tokenize", str(a), str(out), "--tokenizer", "bytes", "--quiet")
    assert code == 0 and "already complete" in out_text


def test_one_writer_per_output_directory(tmp_path) -> None:
    import fcntl

    src = write_jsonl(tmp_path / "d.jsonl", texts(50))
    out = tmp_path / "o"
    out.mkdir()
    with open(out / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # another `moelab tokenize` is writing here
        with pytest.raises(MoelabError, match="another process is tokenising"):
            tokenize(DataConfig(source=str(src), tokenizer="bytes"), out)
    assert tokenize(DataConfig(source=str(src), tokenizer="bytes"), out).manifest["status"] == "complete"
