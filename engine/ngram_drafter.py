"""Draft tokens for speculative decoding, looked up in the sequence itself (n-gram "prompt lookup").

When the last n tokens of a sequence occurred before, the tokens that followed them then are a
guess at what follows now: answers that quote, copy or edit their prompt (code, extraction,
rewriting) repeat long runs of it. The engine checks the guess in one step (engine/llm_engine.py)
and keeps the tokens the model itself produces, so a draft changes speed, never the text.

Integers only, kept as the sequence grows: per n, the end of the latest earlier occurrence of
each n-gram, updated in O(1) per token.
"""
from __future__ import annotations

MIN_NGRAM, MAX_NGRAM = 2, 4  # a single repeated token is too weak a clue; longer ones are rare


class NgramDrafter:
    def __init__(self):
        self._ends: list[dict[tuple[int, ...], int]] = [{} for _ in range(MAX_NGRAM + 1)]
        self._indexed = 0  # n-grams ending before this position are indexed

    def draft(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest n-gram
        (MAX_NGRAM down to MIN_NGRAM) that ends `tokens`; [] when none occurred."""
        self._index(tokens)
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(tokens) > n:
                end = self._ends[n].get(tuple(tokens[-n:]))
                if end is not None:
                    return tokens[end:end + k]
        return []

    def _index(self, tokens: list[int]) -> None:
        """Index the n-grams ending at positions up to len(tokens) - 1: not the one that ends the
        sequence, which would only find itself."""
        for end in range(max(self._indexed, 1), len(tokens)):
            for n in range(MIN_NGRAM, min(MAX_NGRAM, end) + 1):
                self._ends[n][tuple(tokens[end - n:end])] = end
        self._indexed = max(self._indexed, len(tokens))
