"""Decides what each engine step computes. Integers and lists only: never a tensor.

waiting -> running when a KV slot is free (FCFS, up to the slot count = max batch);
running sequences prefill in chunks (a token budget per step) and then decode one token
per step; finished or aborted sequences free their slot at once.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.sequence import Sequence, SequenceStatus
from engine.slot_manager import SlotManager


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        return self.end == len(self.seq.prompt_ids)


@dataclass
class ScheduledBatch:
    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(self, slots: SlotManager, max_prefill_tokens: int):
        self.slots = slots
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cached_tokens_total = 0  # prompt tokens admitted with their K/V already in a slot

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        while self.waiting and self.slots.can_allocate():
            seq = self.waiting.popleft()
            seq.slot, seq.num_computed = self.slots.allocate_for_prompt(seq.seq_id, seq.prompt_ids)
            seq.cached_tokens = seq.dense_kv = seq.num_computed
            self.cached_tokens_total += seq.cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        batch = ScheduledBatch()
        budget = self.max_prefill_tokens
        for seq in self.running:
            if seq.is_prefilling:
                if budget > 0:
                    end = min(len(seq.prompt_ids), seq.num_computed + budget)
                    batch.prefills.append(PrefillChunk(seq, seq.num_computed, end))
                    budget -= end - seq.num_computed
            else:
                batch.decodes.append(seq)
        return batch

    def on_computed(self, seq: Sequence, num_computed: int, dense: bool = True) -> None:
        """`dense`: every FFN ran for these tokens, so their K/V may be reused by a later prompt."""
        if dense and seq.dense_kv == seq.num_computed:
            seq.dense_kv = num_computed
        seq.num_computed = num_computed
        self.slots.set_tokens(seq.seq_id, num_computed)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.slots.free(seq.seq_id, seq.kv_tokens())

    def abort(self, request_id: str) -> list[Sequence]:
        victims = [s for s in [*self.waiting, *self.running] if s.request_id == request_id]
        for seq in victims:
            self.finish(seq, "abort")
        return victims
