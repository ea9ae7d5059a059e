"""Stop strings found in streamed text in time linear in the text, whatever the stop lengths.

One Knuth-Morris-Pratt automaton per stop string: its state is the length of the longest prefix
of the stop string that ends the text so far, updated in amortized O(1) per new character. A
state equal to the stop's length is a hit; the largest other state is how much of the text's tail
could still grow into a stop string and must be held back from the client.
"""
from __future__ import annotations


def held_back(text, tag) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag` (str or bytes alike):
    what must wait to be known not to begin it."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _failure(pattern: str) -> list[int]:
    """failure[i]: length of the longest proper prefix of pattern[:i + 1] that is also its suffix."""
    failure = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = failure[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        failure[i] = k
    return failure


class StopStringMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._failures = [_failure(s) for s in self.stops]
        self._states = [0] * len(self.stops)
        self.consumed = 0  # characters fed so far
        self.matched: str | None = None  # the stop string of the last hit

    def feed(self, text: str) -> int | None:
        """Feed new text; -> index (in all text fed) where the first completed stop string starts,
        or None. After a hit the matcher stops: nothing after a stop string is output."""
        for ch in text:
            self.consumed += 1
            longest_hit = 0  # stops completing at the same character: the one starting first wins
            for i, stop in enumerate(self.stops):
                k, failure = self._states[i], self._failures[i]
                while k and stop[k] != ch:
                    k = failure[k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):
                    if k > longest_hit:
                        longest_hit, self.matched = k, stop
                    k = failure[k - 1]
                self._states[i] = k
            if longest_hit:
                return self.consumed - longest_hit
        return None

    @property
    def held_back(self) -> int:
        """Length of the longest tail of the text fed that is a proper prefix of a stop string."""
        return max(self._states, default=0)
