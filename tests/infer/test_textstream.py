"""Streaming text: pieces always join to the final text, never show a broken character or a
stop string, and stop at the first stop string."""

from __future__ import annotations

import random

import pytest

from moelab.data.tokenizer import bytes_tokenizer, train_bpe
from moelab.infer.textstream import TextStream

BYTES = bytes_tokenizer()


def pieces_of(text: str, stop=(), tokenizer=BYTES, flush: bool = True) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    pieces = []
    for token in tokenizer.encode(text):
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    if flush:
        pieces.append(stream.flush())
    return pieces, stream


def test_multibyte_characters_are_held_until_complete() -> None:
    text = "héllo wörld ✓ 😀 done"
    pieces, stream = pieces_of(text)
    assert "".join(pieces) == text == stream.text
    assert all("\ufffd" not in p for p in pieces)
    assert len(BYTES.encode("😀")) == 4  # so the emoji arrives over four tokens


def test_random_token_ids_join_to_the_full_decode() -> None:
    rng = random.Random(0)
    tokenizer = train_bpe(
        iter(["the quick brown fox jumps over the lazy dog " * 20, "def f(x):\n    return x * 2\n" * 20]), 300
    )
    for _ in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        stream = TextStream(tokenizer)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tokenizer.decode(ids)


def test_stop_string_across_tokens_is_never_shown() -> None:
    pieces, stream = pieces_of("hello STOP world", stop=("STOP",), flush=False)
    assert stream.stopped
    assert "".join(pieces) == "hello " == stream.text
    assert all("S" not in p for p in pieces)


def test_the_earliest_stop_string_wins() -> None:
    pieces, stream = pieces_of("a long tail, then the end", stop=("the end", "tail"))
    assert "".join(pieces) == "a long " and stream.stopped


def test_a_partial_stop_string_is_held_then_released() -> None:
    stream = TextStream(BYTES, ("</s>",))
    shown = [stream.push(t) for t in BYTES.encode("x</")]
    assert "".join(shown) == "x"  # "</" could begin the stop string
    assert stream.flush() == "</"  # the sequence ended without completing it
    assert stream.text == "x</" and not stream.stopped


@pytest.mark.parametrize("text", ["", "plain", "ab\nab\n"])
def test_no_stop_strings_means_everything_is_shown_at_once(text: str) -> None:
    stream = TextStream(BYTES)
    for token in BYTES.encode(text):
        assert stream.push(token) == BYTES.decode([token])
    assert stream.flush() == ""
