"""Incremental detokenisation: each step's new text without decoding the whole output again.

The scheme of vLLM and TGI: decode a short window of ids twice, the window up to the last
handed-out token and the window with the new tokens, and hand out the difference. Decoding a
window (not the whole output) keeps each step's cost constant; starting the window a few tokens
back (at the previous step's tokens) keeps the text right for tokenizers whose decoding of a
token depends on its neighbours (SentencePiece's leading spaces). A window that ends inside a multi-byte character decodes to
U+FFFD at its end: that text is held back until the character completes.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        """All text handed out so far (special tokens skipped)."""
        self._prefix = 0  # window start
        self._read = 0  # ids up to here are in `text`

    def push(self, ids: list[int]) -> str:
        """Add generated ids; returns the text they complete (may be empty)."""
        self.ids.extend(ids)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing printable yet, or a character still incomplete
        delta = after[len(before) :]
        self.text += delta
        self._prefix, self._read = self._read, len(self.ids)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
