"""KV capacity bookkeeping for the scheduler: which slot each sequence holds, and token usage.

Integers only. Capacity is `num_slots * max_len` tokens; a sequence reserves one slot
(lowest free first, which keeps the decode view of the cache dense) until it finishes or
is aborted, when the slot returns at once.

Prefix caching: a freed slot keeps the token ids whose K/V it still holds (what the owner
computed densely; `Sequence.kv_tokens`). A new prompt takes the free slot sharing its longest
prefix and starts prefilling after it (llama.cpp's slot prompt cache; vLLM's prefix caching on
slots instead of blocks). Chat prompts share at least the template's system preamble, and a
conversation's next turn shares everything before it. Cached-but-free slots count as free.
"""
from __future__ import annotations

import heapq


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotManager:
    def __init__(self, num_slots: int, max_len: int, prefix_caching: bool = True):
        self.num_slots, self.max_len = num_slots, max_len
        self.prefix_caching = prefix_caching
        self._free = list(range(num_slots))
        self._owner: dict[str, int] = {}  # seq_id -> slot
        self._tokens: dict[str, int] = {}  # seq_id -> tokens held in the cache
        self._used = 0  # sum of _tokens, kept as one int so other threads can read it safely
        self._cached: dict[int, list[int]] = {}  # free slot -> token ids whose K/V it still holds

    @property
    def capacity_tokens(self) -> int:
        return self.num_slots * self.max_len

    @property
    def used_tokens(self) -> int:
        return self._used

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return self.used_tokens / self.capacity_tokens

    def can_allocate(self) -> bool:
        return bool(self._free)

    def allocate(self, seq_id: str) -> int:
        """The lowest free slot, empty (whatever it cached is dropped)."""
        slot = heapq.heappop(self._free)
        self._take(seq_id, slot, 0)
        return slot

    def allocate_for_prompt(self, seq_id: str, prompt_ids: list[int]) -> tuple[int, int]:
        """-> (slot, tokens of the prompt whose K/V that slot already holds). At least the prompt's
        last token is always left to compute: its forward pass produces the first logits."""
        best, best_len = None, 0
        if self.prefix_caching:
            for slot in sorted(self._free):  # ties go to the lowest slot
                n = common_prefix(self._cached.get(slot, ()), prompt_ids)
                if n > best_len:
                    best, best_len = slot, n
        if best is None:
            return self.allocate(seq_id), 0
        self._free.remove(best)
        heapq.heapify(self._free)
        reused = min(best_len, len(prompt_ids) - 1)
        self._take(seq_id, best, reused)
        return best, reused

    def _take(self, seq_id: str, slot: int, tokens: int) -> None:
        self._cached.pop(slot, None)
        self._owner[seq_id] = slot
        self._tokens[seq_id] = tokens
        self._used += tokens

    def set_tokens(self, seq_id: str, num_tokens: int) -> None:
        assert num_tokens <= self.max_len, (seq_id, num_tokens)
        self._used += num_tokens - self._tokens[seq_id]
        self._tokens[seq_id] = num_tokens

    def free(self, seq_id: str, kv_tokens: list[int] | None = None) -> None:
        """Return the slot; `kv_tokens`: the token ids whose K/V it holds, for a later prompt to reuse."""
        slot = self._owner.pop(seq_id, None)
        self._used -= self._tokens.pop(seq_id, 0)
        if slot is not None:
            if self.prefix_caching and kv_tokens:
                self._cached[slot] = kv_tokens
            heapq.heappush(self._free, slot)
