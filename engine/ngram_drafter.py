"""Draft tokens for speculative decoding, looked up in the sequence itself (n-gram "prompt lookup").

When the last n tokens of a sequence occurred before, the tokens that followed them then are a
guess at what follows now: answers that quote, copy or edit their prompt (code, extraction,
rewriting) repeat long runs of it. The engine checks the guess in one step (engine/llm_engine.py)
and keeps the tokens the model itself produces, so a draft changes speed, never the text.

Integers only, kept as the sequence grows: per n, the end of the latest earlier occurrence of
each n-gram, updated in O(1) per token. A draft costs a decode row per token whether the model
takes it or not, so the drafter follows how its drafts fare: the next one is one token longer than
what the model took of the last (up to the most it may draft), after a draft whose first
token missed it waits 1, 3, 7, 15 steps (consecutive misses) before drafting again, and it keeps
the share of its draft tokens the model took (`acceptance`, a running average) for the scheduler
to weigh against what a draft row costs in a step of that size.
"""
from __future__ import annotations

MIN_NGRAM, MAX_NGRAM = 2, 4  # a single repeated token is too weak a clue; longer ones are rare
MAX_WAIT = 15  # steps without drafts after consecutive misses: 1, 3, 7, 15
RECOVERY = 0.05  # acceptance regained per step passed over for too low a one: a later draft tries again


class NgramDrafter:
    def __init__(self, max_tokens: int):
        self._ends: list[dict[tuple[int, ...], int]] = [{} for _ in range(MAX_NGRAM + 1)]
        self._indexed = 0  # n-grams ending before this position are indexed
        self.max_tokens = max_tokens
        self.length = max_tokens  # the next draft's length
        self._misses = 0  # consecutive drafts whose first token missed
        self._wait = 0  # steps left without drafting
        self.acceptance = 1.0  # running share of draft tokens taken (hopeful at first)

    def draft(self, tokens: list[int], k: int, needed: float = 0.0) -> list[int]:
        """Up to `k` (and the drafter's current length) tokens that followed the latest earlier
        occurrence of the longest n-gram (MAX_NGRAM down to MIN_NGRAM) that ends `tokens`; [] when
        none occurred, while the drafter waits after misses, or while its acceptance is below
        `needed` (the share at which a draft pays for its rows)."""
        self._index(tokens)
        if self._wait:
            self._wait -= 1
            return []
        if self.acceptance < needed:
            self.acceptance = min(1.0, self.acceptance + RECOVERY)
            return []
        k = min(k, self.length)
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(tokens) > n:
                end = self._ends[n].get(tuple(tokens[-n:]))
                if end is not None:
                    return tokens[end:end + k]
        return []

    def taken(self, drafted: int, accepted: int) -> None:
        """How the last draft fared: `accepted` of its `drafted` tokens were the model's own."""
        self.length = min(self.max_tokens, accepted + 1)
        self.acceptance = (self.acceptance + accepted / drafted) / 2
        self._misses = 0 if accepted else self._misses + 1
        self._wait = min(MAX_WAIT, 2 ** self._misses - 1)

    def _index(self, tokens: list[int]) -> None:
        """Index the n-grams ending at positions up to len(tokens) - 1: not the one that ends the
        sequence, which would only find itself."""
        for end in range(max(self._indexed, 1), len(tokens)):
            for n in range(MIN_NGRAM, min(MAX_NGRAM, end) + 1):
                self._ends[n][tuple(tokens[end - n:end])] = end
        self._indexed = max(self._indexed, len(tokens))
