"""Incremental detokenization with stop strings.

Text is released only when it is final: never half a UTF-8 character (a trailing U+FFFD
waits for the next token), and never a suffix that could still grow into a stop string.
A stop string is cut out of the output with everything after it.
"""
from __future__ import annotations

from engine.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        # Decode with a few prompt tokens of context so leading spaces come out right.
        self.ids = list(prompt_ids[-5:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all final text of the output so far
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False

    def add_token(self, token_id: int) -> None:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return  # an incomplete character (or nothing new yet): wait for more tokens
        new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += new
        hits = [at for s in self.stop if (at := self.text.find(s, search_from)) != -1]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def take(self, final: bool) -> str:
        """Text not yet handed out that can no longer turn into a stop string."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
