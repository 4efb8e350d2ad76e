"""Generated token ids -> the text a client sees, piece by piece, cut at the first stop string.

Two things are held back until they are settled: bytes that end inside a multi-byte UTF-8
character, and a tail that could be the start of a stop string. So a streamed text never shows a
character that later changes or a stop string that is later removed, and the pieces always join to
the final text.
"""

from __future__ import annotations

from collections.abc import Sequence

from moelab.data.tokenizer import TextTokenizer

REPLACEMENT = "\ufffd"  # what decoding shows for bytes that do not (yet) form a character


class TextStream:
    """Incremental detokenisation with stop strings, for one generated sequence.

    Decoding the whole sequence after every token costs time quadratic in its length; instead only
    the ids since the last emitted piece are decoded (with the previous piece as left context, for
    tokenizers whose decoding depends on it)."""

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self._ids: list[int] = []
        self._prefix_offset = 0  # ids[prefix:read] decode to the last piece appended to text
        self._read_offset = 0
        self.text = ""  # settled text so far (ends at the stop string once one is found)
        self.sent = 0  # characters of text already returned
        self.stopped = False  # a stop string was found; the text ends before it

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that is now safe to show (often "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        context = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        decoded = self.tokenizer.decode(self._ids[self._prefix_offset :])
        if len(decoded) <= len(context) or decoded.endswith(REPLACEMENT):
            return ""  # nothing printable yet, or a character still incomplete
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._append(decoded[len(context) :], final=False)

    def flush(self) -> str:
        """The sequence ended: return everything still held back (an incomplete character is shown
        as U+FFFD, a partial stop string as the text it is)."""
        if self.stopped:
            return ""
        context = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        decoded = self.tokenizer.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return self._append(decoded[len(context) :], final=True)

    def _append(self, piece: str, final: bool) -> str:
        start = max(0, len(self.text) - self._longest_stop + 1)  # a stop may begin in older text
        self.text += piece
        cut = self._first_stop(start)
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            end = len(self.text)
        else:
            end = len(self.text) if final else len(self.text) - self._stop_prefix_len()
        out = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return out

    def _first_stop(self, start: int) -> int | None:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that some stop string starts with."""
        for length in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-length:]
            if any(s.startswith(tail) for s in self.stop):
                return length
        return 0
