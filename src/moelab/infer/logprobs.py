"""Token ids as the wire shows them in log-probabilities: each token's text and its UTF-8 bytes.

A byte-level BPE token (moelab's tokenizers, GPT-2, Qwen, Llama 3) stands for bytes, which may
end inside a character: its bytes are exact (mapped back through the byte alphabet) and its
text is those bytes decoded, or "bytes:\\xNN..." where they are not whole UTF-8 (OpenAI's way
of writing such tokens). Added tokens (<|endoftext|>, ...) are their own text. Other tokenizers
get the tokenizer's decoding of the token alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from tokenizers import decoders

from moelab.data.tokenizer import TextTokenizer, bytes_to_unicode
from moelab.infer.engine import TokenLogprob
from moelab.infer.protocol import LogprobEntry

_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}


class TokenStrings:
    """Text and bytes of token ids for one tokenizer (cached per id)."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        raw = tokenizer.tokenizer
        self._added = {i: t.content for i, t in raw.get_added_tokens_decoder().items()}
        self._byte_level = isinstance(raw.decoder, decoders.ByteLevel)
        self.piece = lru_cache(maxsize=1 << 16)(self._piece)

    def _piece(self, token: int) -> tuple[str, tuple[int, ...]]:
        if token in self._added:
            text = self._added[token]
            return text, tuple(text.encode("utf-8"))
        raw = self.tokenizer.tokenizer.id_to_token(token)
        if raw is None:  # an id of the model's padded vocabulary that the tokenizer lacks
            return "", ()
        if self._byte_level and all(c in _BYTE_OF_CHAR for c in raw):
            data = bytes(_BYTE_OF_CHAR[c] for c in raw)
            try:
                return data.decode("utf-8"), tuple(data)
            except UnicodeDecodeError:
                return "bytes:" + "".join(f"\\x{b:02x}" for b in data), tuple(data)
        text = self.tokenizer.decode([token], skip_special=False)
        return text, tuple(text.encode("utf-8"))

    def entry(self, scored: TokenLogprob | None, token: int | None = None) -> LogprobEntry:
        """The wire entry of a scored token; `scored` None (a prompt's first token) needs `token`."""
        if scored is None:
            text, data = self.piece(token)
            return LogprobEntry(text, data, None)
        text, data = self.piece(scored.token)
        top = tuple((*self.piece(t), lp) for t, lp in scored.top)
        return LogprobEntry(text, data, scored.logprob, top)

    def prompt_entries(self, prompt: Sequence[int], scored: Sequence[TokenLogprob | None]) -> list[LogprobEntry]:
        return [self.entry(s, t) for t, s in zip(prompt, scored)]
