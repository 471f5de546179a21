"""Incremental detokenisation that stays correct across multi-byte characters.

Byte-level BPE tokens need not end on a UTF-8 character boundary: decoding a prefix can end in a
partial character, which decodes as U+FFFD. The rule used here: the text of new tokens is
decode(context + new) minus decode(context), where a trailing partial character is held back (it
is emitted by the chunk that completes it). `context` is a few tokens before `new`, enough to
hold any partial character (a character is at most 4 bytes, a token at least 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 8


def _settled(text: str) -> str:
    """`text` without a trailing partial character."""
    return text.rstrip(REPLACEMENT)


def text_delta(decode: Callable[[Sequence[int]], str], context: Sequence[int], new: Sequence[int]) -> str:
    """The settled text that `new` adds after `context` (stateless: one streamed chunk)."""
    before = _settled(decode(list(context)))
    after = _settled(decode(list(context) + list(new)))
    if after.startswith(before):
        return after[len(before):]
    # A tokenizer whose decode is not prefix-stable (rare normalisers): fall back to the new tokens alone.
    return _settled(decode(list(new)))


class IncrementalText:
    """The text of a growing token sequence, updated chunk by chunk (used to find stop strings)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode, self.tokens, self.text = decode, [], ""

    def add(self, new: Sequence[int]) -> str:
        delta = text_delta(self.decode, self.tokens[-CONTEXT_TOKENS:], new)
        self.tokens.extend(new)
        self.text += delta
        return delta
