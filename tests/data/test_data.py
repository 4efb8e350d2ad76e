"""Corpus sources, the stable split, tokenizers and the resumable loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelab.config import DataConfig
from moelab.data.corpus import is_validation, load_corpus
from moelab.data.loader import BatchLoader, eval_batches
from moelab.data.shards import prepare_data
from moelab.data.tokenizer import StreamDecoder, bytes_tokenizer, train_bpe
from moelab.errors import MoelabError


def test_stdlib_corpus_split_is_stable_and_excludes_site_packages() -> None:
    corpus = load_corpus(DataConfig(source="stdlib", val_fraction=0.05, max_bytes=2_000_000))
    names = [d.name for d in corpus.train + corpus.val]
    assert not any(n.startswith("site-packages") for n in names)
    assert all(n.endswith(".py") for n in names)
    assert {d.name for d in corpus.val} == {n for n in names if is_validation(n, 0.05)}
    again = load_corpus(DataConfig(source="stdlib", val_fraction=0.05, max_bytes=2_000_000))
    assert [(d.name, d.text) for d in again.train + again.val] == [(d.name, d.text) for d in corpus.train + corpus.val]


def test_directory_glob_and_text_file_chunks(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("alpha\n" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta\n" * 10)
    (tmp_path / "c.bin").write_bytes(b"\xff\xfe")
    corpus = load_corpus(DataConfig(source=str(tmp_path), glob="*.txt,*.md"))
    assert sorted(d.name for d in corpus.train + corpus.val) == ["a.txt", "sub/b.md"]
    big = tmp_path / "big.txt"
    big.write_text("".join(f"line {i}\n" for i in range(20000)))
    corpus = load_corpus(DataConfig(source=str(big)))
    docs = corpus.train + corpus.val
    assert len(docs) > 5 and len(corpus.val) >= 1
    assert "".join(d.text for d in sorted(docs, key=lambda d: int(d.name.split("#")[1]))) == big.read_text()


def test_bytes_tokenizer_round_trips_and_ids_are_bytes() -> None:
    tok = bytes_tokenizer()
    text = "héllo wörld ✓\n\tdef f(): return 1"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 260


def test_bpe_round_trips_and_streams() -> None:
    texts = ["def add(a, b):\n    return a + b\n"] * 50 + ["émoji ✓ ünïcode"] * 20
    tok = train_bpe(iter(texts), vocab_size=300)
    for text in texts[:1] + texts[-1:]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        stream = StreamDecoder(tok)
        pieces = "".join(stream.push(i) for i in ids) + stream.flush()
        assert pieces == text


def test_token_cache_is_reused(tmp_path) -> None:
    cfg = DataConfig(source="stdlib", tokenizer="bytes", max_bytes=200_000, cache_dir=str(tmp_path))
    first = prepare_data(cfg)
    entries = sorted(tmp_path.iterdir())
    second = prepare_data(cfg)
    assert sorted(tmp_path.iterdir()) == entries and len([p for p in entries if p.is_dir()]) == 1
    assert np.array_equal(np.asarray(first.train), np.asarray(second.train))
    assert first.meta["train_tokens"] == len(first.train)


def test_loader_batches_state_and_resume() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    loader = BatchLoader(tokens, batch_size=4, seq_len=10, seed=3)
    x, y = loader.next_batch()
    assert x.shape == (4, 10) and torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y - x, torch.ones_like(x))  # targets are the next tokens
    batches = [loader.next_batch() for _ in range(30)]  # crosses an epoch boundary (24 batches/epoch)
    state = None
    loader2 = BatchLoader(tokens, batch_size=4, seq_len=10, seed=3)
    loader2.next_batch()
    for i in range(10):
        loader2.next_batch()
    state = loader2.state_dict()
    loader3 = BatchLoader(tokens, batch_size=4, seq_len=10, seed=3)
    loader3.load_state_dict(state)
    for i in range(10, 30):
        assert torch.equal(loader3.next_batch()[0], batches[i][0])
    with pytest.raises(MoelabError, match="fewer than one batch"):
        BatchLoader(np.arange(30, dtype=np.uint16), batch_size=4, seq_len=10, seed=0)


def test_data_parallel_ranks_split_the_epoch() -> None:
    tokens = np.arange(2001, dtype=np.uint16)
    single = BatchLoader(tokens, batch_size=2, seq_len=10, seed=1)
    rank0 = BatchLoader(tokens, batch_size=1, seq_len=10, seed=1, rank=0, world=2)
    rank1 = BatchLoader(tokens, batch_size=1, seq_len=10, seed=1, rank=1, world=2)
    for _ in range(5):
        both = torch.cat([rank0.next_batch()[0], rank1.next_batch()[0]])
        assert torch.equal(both, single.next_batch()[0])


def test_eval_batches_are_fixed_and_cover_the_split() -> None:
    tokens = np.arange(5001, dtype=np.uint16)
    a = eval_batches(tokens, 4, 50, 3)
    b = eval_batches(tokens, 4, 50, 3)
    assert len(a) == 3 and all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    starts = [int(x[0, 0]) for x, _ in a]
    assert starts[0] == 0 and max(int(x.max()) for x, _ in a) > 4000
