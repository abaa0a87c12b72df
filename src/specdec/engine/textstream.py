"""Turns committed token steps into streamed text chunks, honouring stop strings.

Text is released only when it is final: an incomplete UTF-8 character (decoded as U+FFFD)
is held back, and so are the last ``len(longest stop string) - 1`` characters, which might
still become the start of a stop string. With stop strings, token ids are released together
with their text, so the concatenated chunks always equal the final output.

Decoding the whole output after every step would cost O(n) per step, O(n^2) per request (a
512-token generation spent ~0.25 ms a step on it). The assembler keeps an *anchor*: a token
boundary behind which the text is known, checked once, to be the decoding of the tokens before
it (``decode(ids[:a]) + decode(ids[a:]) == decode(ids)``), and decodes only the tokens after it.
A tokenizer for which the check fails (one that drops a leading space, say) keeps decoding from
the start, so the text is always exactly what decoding all tokens gives.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from specdec.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class StreamChunk:
    """Newly final output: ``token_ids``, their ``text`` and per-token ``kinds``
    (``accepted`` draft, ``recovered``, ``bonus``, or ``target`` for plain decoding)."""

    token_ids: list[int]
    text: str
    kinds: list[str]


ANCHOR_EVERY = 32  # tokens between attempts to move the anchor (and left after it)


class TextAssembler:
    def __init__(self, tokenizer: Tokenizer | None, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.kinds: list[str] = []
        self.text = ""
        self.stopped = False
        self._offsets: list[int] = []  # stable text length after each token (stop strings only)
        self._sent_chars = 0
        self._sent_tokens = 0
        self._anchor = 0  # tokens before it decode to _anchor_text, on their own
        self._anchor_text = ""
        self._next_try = 2 * ANCHOR_EVERY  # length at which to try moving the anchor next

    def _decode(self, ids: list[int]) -> str:
        assert self.tokenizer is not None
        return self.tokenizer.decode(ids).rstrip("\ufffd")

    def _text_of(self, end: int) -> str:
        """``decode(ids[:end])`` without a trailing incomplete character (``end`` >= the anchor)."""
        return self._anchor_text + self._decode(self.ids[self._anchor : end])

    def _move_anchor(self) -> None:
        """Every ``ANCHOR_EVERY`` tokens, try to put the anchor ``ANCHOR_EVERY`` tokens back."""
        n = len(self.ids)
        if n < self._next_try:
            return
        self._next_try = n + ANCHOR_EVERY
        assert self.tokenizer is not None
        decode, a = self.tokenizer.decode, n - ANCHOR_EVERY
        head = decode(self.ids[:a])
        if not head.endswith("\ufffd") and head + decode(self.ids[a:]) == decode(self.ids):
            self._anchor, self._anchor_text = a, head

    def add(self, token_ids: list[int], kinds: list[str]) -> Iterator[StreamChunk]:
        """Take one step's tokens; yield what became final. Sets ``stopped`` on a stop string."""
        self.ids += token_ids
        self.kinds += kinds
        if self.tokenizer is None:
            yield from self._release(len(self.ids), 0)
            return
        if not self.stop:
            self.text = self._text_of(len(self.ids))
            self._move_anchor()
            yield from self._release(len(self.ids), len(self.text))
            return
        for i in range(len(self._offsets), len(self.ids)):
            self._offsets.append(len(self._text_of(i + 1)))
        full = self._text_of(len(self.ids))
        lo = max(0, self._sent_chars - max(map(len, self.stop)))
        hits = [i for i in (full.find(s, lo) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
            keep = next((i + 1 for i, off in enumerate(self._offsets) if off >= cut), len(self.ids))
            self.ids, self.kinds, self.text = self.ids[:keep], self.kinds[:keep], full[:cut]
            self.stopped = True
            yield from self._release(keep, cut)
            return
        self.text = full
        self._move_anchor()
        safe = max(self._sent_chars, len(full) - (max(map(len, self.stop)) - 1))
        tokens = sum(1 for off in self._offsets if off <= safe)
        yield from self._release(max(tokens, self._sent_tokens), safe)

    def flush(self) -> Iterator[StreamChunk]:
        yield from self._release(len(self.ids), len(self.text))

    def _release(self, tokens: int, chars: int) -> Iterator[StreamChunk]:
        if tokens > self._sent_tokens or chars > self._sent_chars:
            chunk = StreamChunk(
                self.ids[self._sent_tokens : tokens],
                self.text[self._sent_chars : chars],
                self.kinds[self._sent_tokens : tokens],
            )
            self._sent_tokens, self._sent_chars = tokens, max(chars, self._sent_chars)
            yield chunk
