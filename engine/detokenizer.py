"""Incremental detokenization with stop strings.

Text is released only when it is final: never half a UTF-8 character (the last tokens, where
they hold a character's start whose end is still to come, wait for the next token; a U+FFFD the
model wrote itself, or bytes that are no UTF-8, go out at once), and never a suffix that could
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

CONTEXT = 5  # tokens decoded before the new ones, so that a leading space comes out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str], include_stop: bool = False,
                 special: bool = False):
        """`special`: special tokens' text kept (vLLM's `skip_special_tokens: false`)."""
        self.tokenizer = tokenizer
        self.special = special
        self.stops = StopStringMatcher(stop)
        self.include_stop = include_stop
        self.ids = list(prompt_ids[-CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all final text of the output so far
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False

    def add_token(self, token_id: int, may_stop: bool = True) -> None:
        """`may_stop`: whether a stop string completed by this token's text ends the output."""
        self.ids.append(token_id)
        end = len(self.ids) - self._held_tokens()
        if end <= self.read_offset:
            return  # only the start of a character so far: wait for more tokens
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], clean=False, special=self.special)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:end], clean=False, special=self.special)
        if full == prefix:  # these tokens' text is whole and empty (special tokens left out): read past
            self.read_offset = end  # them, so that a run of them is not decoded again at every token
            self.prefix_offset = max(self.prefix_offset, end - CONTEXT)
            return
        if len(full) < len(prefix):
            return  # nothing new yet
        new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, end
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

    def _held_tokens(self) -> int:
        """How many of the last tokens wait: those holding the start of a UTF-8 character whose end
        has not come yet (at most 3 bytes; the tokens before them, bytes that are no UTF-8 included,
        go out). Special tokens' text is whole."""
        pieces = [self.tokenizer.piece_bytes(t) for t in self.ids[self.read_offset:]]
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(b"".join(pieces))
        pending = len(decoder.getstate()[0])  # the bytes it holds back: a character's start
        held = 0
        while pending > 0:
            pending -= len(pieces[-1 - held])
            held += 1
        return held

    def take(self, final: bool) -> str:
        """Text not yet handed out that can no longer turn into a stop string."""
        end = len(self.text) if final or self.stopped else len(self.text) - self.stops.held_back
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out
