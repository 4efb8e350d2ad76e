"""Tokenizers: byte-level BPE trained with Hugging Face `tokenizers`, or raw bytes.

Both are `tokenizers.Tokenizer` objects saved as `tokenizer.json`, so exported models load with
`AutoTokenizer`. The raw-bytes tokenizer is a byte-level BPE with no merges: token id = byte value.

A tokenizer imported from Hugging Face (moelab.interop) keeps its own vocabulary and special tokens:
its `tokenizer_config.json`, kept beside `tokenizer.json`, names the end-of-text and padding tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moelab.errors import MoelabError

EOS = "<|endoftext|>"  # ends every document; generation stops on it
PAD = "<|pad|>"
IM_START = "<|im_start|>"  # chat turns (ChatML), see moelab.infer.chat
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]
HF_TOKENIZER_CONFIG = "tokenizer_config.json"  # Hugging Face's file naming a tokenizer's special tokens


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 map from each byte to a printable character, the alphabet of byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


class TextTokenizer:
    """A thin wrapper: encode/decode plus the special-token ids moelab needs.

    moelab's own tokenizers carry all of SPECIAL_TOKENS. A tokenizer from elsewhere (an imported
    Hugging Face model) names its own end-of-text token and, optionally, its padding token (None:
    pad with the end-of-text token, as Hugging Face models without a pad token do)."""

    def __init__(self, tokenizer: Tokenizer, eos_token: str = EOS, pad_token: str | None = PAD):
        self.tokenizer = tokenizer
        own = eos_token == EOS and pad_token == PAD
        required = SPECIAL_TOKENS if own else [t for t in (eos_token, pad_token) if t is not None]
        missing = [t for t in required if tokenizer.token_to_id(t) is None]
        if missing:
            raise MoelabError(f"tokenizer lacks the special tokens {missing}")
        self.eos_token = eos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.eos_id = tokenizer.token_to_id(self.eos_token)
        self.pad_id = tokenizer.token_to_id(self.pad_token)

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
        """Write tokenizer.json; a tokenizer with its own special tokens also gets the
        tokenizer_config.json that names them, so that `load` restores it."""
        self.tokenizer.save(str(path))
        if (self.eos_token, self.pad_token) != (EOS, PAD):
            config = {"eos_token": self.eos_token, "pad_token": self.pad_token}
            Path(path).with_name(HF_TOKENIZER_CONFIG).write_text(json.dumps(config, indent=1))

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        """Load `tokenizer.json`; a Hugging Face `tokenizer_config.json` beside it (imported models)
        names the end-of-text and padding tokens, otherwise they are moelab's own."""
        path = Path(path)
        if not path.is_file():
            raise MoelabError(f"tokenizer file {path} is missing")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception on malformed JSON
            raise MoelabError(f"tokenizer file {path} cannot be read: {exc}") from None
        eos, pad = EOS, PAD
        config = path.with_name(HF_TOKENIZER_CONFIG)
        if config.is_file():
            eos, pad = special_tokens_from_config(config)
        return cls(tokenizer, eos, pad)


def special_tokens_from_config(path: Path) -> tuple[str, str | None]:
    """(eos_token, pad_token or None) named by a Hugging Face tokenizer_config.json."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoelabError(f"tokenizer config {path} is not valid JSON: {exc}") from None
    eos, pad = special_tokens_in(data, path)
    if not eos:
        raise MoelabError(f"tokenizer config {path} names no eos_token; moelab needs an end-of-text token")
    return eos, pad


def special_tokens_in(data: object, where: str | Path) -> tuple[str | None, str | None]:
    """(eos_token, pad_token) of a parsed tokenizer_config.json; None for those it does not name."""
    if not isinstance(data, dict):
        raise MoelabError(f"tokenizer config {where} is not a JSON object")

    def token(name: str) -> str | None:
        value = data.get(name)
        if isinstance(value, dict):  # older files store AddedToken objects: {"content": "</s>", ...}
            value = value.get("content")
        if value is not None and not isinstance(value, str):
            raise MoelabError(f"tokenizer config {where}: {name} = {value!r} is not a token string")
        return value or None

    return token("eos_token"), token("pad_token")


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
