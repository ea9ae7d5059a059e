"""KV capacity bookkeeping for the scheduler: which slot each sequence holds, and token usage.

Integers only. Capacity is `num_slots * max_len` tokens; a sequence reserves one slot
(lowest free first, which keeps the decode view of the cache dense) until it finishes or
is aborted, when the slot returns at once.
"""
from __future__ import annotations

import heapq


class SlotManager:
    def __init__(self, num_slots: int, max_len: int):
        self.num_slots, self.max_len = num_slots, max_len
        self._free = list(range(num_slots))
        self._owner: dict[str, int] = {}  # seq_id -> slot
        self._tokens: dict[str, int] = {}  # seq_id -> tokens held in the cache
        self._used = 0  # sum of _tokens, kept as one int so other threads can read it safely

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
        slot = heapq.heappop(self._free)
        self._owner[seq_id] = slot
        self._tokens[seq_id] = 0
        return slot

    def set_tokens(self, seq_id: str, num_tokens: int) -> None:
        assert num_tokens <= self.max_len, (seq_id, num_tokens)
        self._used += num_tokens - self._tokens[seq_id]
        self._tokens[seq_id] = num_tokens

    def free(self, seq_id: str) -> None:
        slot = self._owner.pop(seq_id, None)
        self._used -= self._tokens.pop(seq_id, 0)
        if slot is not None:
            heapq.heappush(self._free, slot)
