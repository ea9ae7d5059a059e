"""Incremental detokenization with stop strings.

Text is released only when it is final: never half a UTF-8 character (while the tokens not yet
released end partway through one, their text's trailing U+FFFD waits for the next token; a U+FFFD
the model wrote itself, or bytes that are no UTF-8, go out at once), and never a suffix that could
still grow into a stop string. Half a character left at the end (`max_tokens` cut it) is dropped,
as vLLM drops it.
A stop string is cut out of the output with everything after it (or kept, and only what follows
it cut, with `include_stop`); one that ends before the sequence may stop (min_tokens) is passed
over. Matching is linear in the output (`engine/stop_strings.py`): each character is looked at
once, on the engine thread.
"""
from __future__ import annotations

import codecs

from engine.stop_strings import StopStringMatcher
from engine.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str], include_stop: bool = False):
        self.tokenizer = tokenizer
        self.stops = StopStringMatcher(stop)
        self.include_stop = include_stop
        # Decode with a few prompt tokens of context so leading spaces come out right.
        self.ids = list(prompt_ids[-5:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all final text of the output so far
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False

    def add_token(self, token_id: int, may_stop: bool = True) -> None:
        """`may_stop`: whether a stop string completed by this token's text ends the output."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") and self._ends_partway() or len(full) <= len(prefix):
            return  # an incomplete character (or nothing new yet): wait for more tokens
        new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += new
        fed = 0
        while fed < len(new):
            before = self.stops.consumed
            hit = self.stops.feed(new[fed:])  # stops at the character completing a stop string
            fed += self.stops.consumed - before
            if hit is not None and may_stop:
                self.text = self.text[:self.stops.consumed if self.include_stop else hit]
                self.stopped = True
                return

    def _ends_partway(self) -> bool:
        """Whether the bytes of the tokens not yet released end partway through a UTF-8 character."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(b"".join(self.tokenizer.piece_bytes(t) for t in self.ids[self.read_offset:]))
        return bool(decoder.getstate()[0])  # the bytes it holds back: a character's start, its end to come

    def take(self, final: bool) -> str:
        """Text not yet handed out that can no longer turn into a stop string."""
        end = len(self.text) if final or self.stopped else len(self.text) - self.stops.held_back
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out
