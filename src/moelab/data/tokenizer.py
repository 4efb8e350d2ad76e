"""Tokenizers: byte-level BPE trained with Hugging Face `tokenizers`, or raw bytes.

Both are `tokenizers.Tokenizer` objects saved as `tokenizer.json`, so exported models load with
`AutoTokenizer`. The raw-bytes tokenizer is a byte-level BPE with no merges: token id = byte value.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moelab.errors import MoelabError

EOS = "<|endoftext|>"  # ends every document; generation stops on it
PAD = "<|pad|>"
IM_START = "<|im_start|>"  # chat turns (ChatML), see moelab.infer.chat
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 map from each byte to a printable character, the alphabet of byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


class TextTokenizer:
    """A thin wrapper: encode/decode plus the special-token ids moelab needs."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise MoelabError(f"tokenizer lacks the special tokens {missing}")
        self.eos_id = tokenizer.token_to_id(EOS)
        self.pad_id = tokenizer.token_to_id(PAD)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise KeyError(token)
        return tid

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise MoelabError(f"tokenizer file {path} is missing")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a plain Exception on malformed JSON
            raise MoelabError(f"tokenizer file {path} cannot be read: {exc}") from None


def _byte_level(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def bytes_tokenizer() -> TextTokenizer:
    """Raw bytes: ids 0-255 are the bytes themselves, then the special tokens."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tok = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.add_special_tokens(SPECIAL_TOKENS)
    return TextTokenizer(tok)


def train_bpe(texts: Iterator[str], vocab_size: int, length: int | None = None) -> TextTokenizer:
    """Byte-level BPE with `vocab_size` entries (the special tokens included)."""
    tok = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return TextTokenizer(tok)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces as they become printable; holds back a
    piece that ends inside a multi-byte UTF-8 character."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece
