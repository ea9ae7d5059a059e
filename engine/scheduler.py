"""Decides what each engine step computes. Integers and lists only: never a tensor.

Each step, oldest first, every decoding sequence gets room for the token it writes (a new KV
block when its last one is full). When no block is free the newest running sequence is
preempted: its blocks go back and it returns to the head of the queue, keeping what it has
generated; readmitted, it prefills its prompt and generated tokens again (the prefix cache
usually still holds most of them) and continues with the same tokens. Then waiting sequences
are admitted in arrival order while the batch has rows (`max_num_seqs`), blocks for their
prefill plus their first decode step's (set aside for them until they decode), and prefill
budget left. Prefill runs in chunks under a token budget per step, running sequences first;
finished or aborted sequences give their blocks back at once. A request is admitted only when
the step can start its prompt, as vLLM admits: admitted earlier, requests that arrive together
with a common prefix (a long system prompt) would each compute it, none finding it cached yet.
With speculative decoding on, decoding sequences that take drafts get them (engine/ngram_drafter.py) while the step has decode rows to
spare, with KV blocks for the draft's positions (free ones only: a draft never preempts).
An embeddings request's inputs are sequences that prefill and end (no block for a next token),
admitted and chunked like any prompt.

With `scheduling_policy` "priority" (vLLM's `--scheduling-policy priority`) the queue is kept in
order of each request's `priority` (lower first), then arrival, and the sequence preempted for a
decode's block is the running one latest in that order, not the newest; with "fcfs" (the default)
priorities are all 0 and both orders are arrival.

With the prefix cache on, a prompt at least half of whose uncached part a running sequence is
computing waits for it (letting later requests by), then takes it from the cache: the choices of
one request (`n` > 1), which share their prompt, and requests with a long common prefix (a system
prompt) compute it once; the first computes it, the others only what follows, as vLLM forks a
request's sequences after its prefill. Without that, each would compute the prefix again.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.config import SCHEDULING_POLICIES
from engine.kv.block_manager import BlockManager, blocks_for
from engine.sequence import Sequence, SequenceStatus


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int
    end: int

    @property
    def produces_token(self) -> bool:
        """The chunk that ends a prompt samples the first token; a preempted sequence's replay
        does not (its next token comes from the decode step, as it would have)."""
        return self.end == self.seq.prefill_len and not self.seq.output_ids and self.seq.makes_tokens

    @property
    def ends_input(self) -> bool:
        """The chunk that completes an embeddings request's input (which is then done)."""
        return self.end == self.seq.prefill_len and not self.seq.makes_tokens


@dataclass
class ScheduledBatch:
    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)
    drafts: dict[str, list[int]] = field(default_factory=dict)  # seq_id -> tokens guessed to follow its last

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    # decode rows a step may hold counting drafts: each draft token is one more row to compute, and
    # beyond a few rows a CPU step costs about a row's share more per row (README: speculation)
    MAX_ROWS_WITH_DRAFTS = 8
    # a CPU decode step's fixed cost a beside one more row's b: SmolLM2's Q4_1 engine step took 5.0 ms
    # at 1 row and 19.9 at 16 on AVX-512 (a ~4.0, b ~1.0), and the README's AVX2 serving TPOT reads
    # 6 and 30 ms (a ~4.4, b ~1.6): a / b from 4 to 2.75, taken as 3. With r sequences decoding,
    # drafts whose tokens are taken at a share p make (r + p d) tokens in a + b (r + d) instead of
    # r in a + b r: they pay when p > r / (r + a / b)
    STEP_TO_ROW_COST = 3.0

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_prefill_tokens: int,
                 speculative_tokens: int = 0, policy: str = "fcfs"):
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy must be one of {list(SCHEDULING_POLICIES)}, got {policy!r}")
        self.blocks = blocks
        self.by_priority = policy == "priority"
        self._arrivals = 0  # sequences added so far: each one's place in arrival order
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.speculative_tokens = speculative_tokens  # most draft tokens per sequence and step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cached_tokens_total = 0  # prompt tokens admitted with their K/V already cached
        self.num_preemptions_total = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.arrival = self._arrivals
        self._arrivals += 1
        self._enqueue(seq, at_head=False)

    @staticmethod
    def _rank(seq: Sequence) -> tuple[int, int]:
        """Its place under the priority policy: lower priority values first, then earlier arrivals."""
        return seq.params.priority, seq.arrival

    def _enqueue(self, seq: Sequence, at_head: bool) -> None:
        """Into the queue: by priority and arrival under the priority policy; else at the tail (a new
        sequence) or the head (a preempted one, first to come back)."""
        if not self.by_priority:
            self.waiting.appendleft(seq) if at_head else self.waiting.append(seq)
            return
        position = len(self.waiting)
        while position and self._rank(self.waiting[position - 1]) > self._rank(seq):
            position -= 1
        self.waiting.insert(position, seq)

    def schedule(self) -> ScheduledBatch:
        preempted = self._grow_decodes()
        prefilling = [s for s in self.running if s.is_prefilling]
        budget = self.max_prefill_tokens - sum(s.prefill_len - s.num_computed for s in prefilling)
        promised = sum(map(self._first_decode_blocks, prefilling))  # blocks their first decode takes
        position = 0
        while not preempted and budget > 0 and position < len(self.waiting) and len(self.running) < self.max_num_seqs:
            seq = self.waiting[position]
            if self._awaits_prefix(seq, prefilling):
                position += 1  # its prefix is being computed: it takes that from the cache
                continue
            if not self._fits(seq, promised):
                break  # first come, first served: no overtaking
            del self.waiting[position]
            self._admit(seq)
            budget -= seq.prefill_len - seq.num_computed
            promised += self._first_decode_blocks(seq)
            prefilling.append(seq)
        batch = ScheduledBatch()
        budget = self.max_prefill_tokens
        for seq in self.running:
            if seq.is_prefilling:
                if budget > 0:
                    end = min(seq.prefill_len, seq.num_computed + budget)
                    batch.prefills.append(PrefillChunk(seq, seq.num_computed, end))
                    budget -= end - seq.num_computed
            else:
                batch.decodes.append(seq)
        if self.speculative_tokens:
            batch.drafts = self._drafts(batch.decodes)
        return batch

    def unadmittable(self) -> Sequence | None:
        """The sequence at the head of the queue, when nothing runs and even so there is no room for
        it: it never will be admitted (and holds up everything behind it). None otherwise."""
        if self.running or not self.waiting:
            return None
        return None if self._fits(self.waiting[0]) else self.waiting[0]

    def _fits(self, seq: Sequence, promised: int = 0) -> bool:
        """Room now for a waiting sequence's prefill and its first decode step, beside the `promised`
        blocks of the first decode steps of those admitted before it and still prefilling."""
        return self.blocks.can_allocate(seq.token_ids(), seq.prefill_len,
                                        spare=self._first_decode_blocks(seq) + promised,
                                        reuse=not seq.computes_whole_prompt, salt=seq.prefix_salt)

    def _first_decode_blocks(self, seq: Sequence) -> int:
        """Blocks its first decode step adds after its prefill (its K/V at position `prefill_len`): one
        where the prefill ends a block, else none. Admitted with them, it is not preempted at once;
        asking one more than that, a prompt that fits the context but ends within the cache's last
        block could never be admitted, and would hold up every request behind it."""
        if not seq.makes_tokens or seq.params.prompt_only:  # (a prompt-only one ends with its prefill)
            return 0
        size = self.blocks.block_size
        return blocks_for(seq.prefill_len + 1, size) - blocks_for(seq.prefill_len, size)

    def _drafts(self, decodes: list[Sequence]) -> dict[str, list[int]]:
        """Draft tokens for decoding sequences that take them (oldest first, while the step has
        rows to spare), each with KV blocks for its draft's positions: empty ones only, so a draft
        neither preempts nor evicts a cached prefix (`trim` gives back what the step did not use)."""
        drafts, room = {}, self.MAX_ROWS_WITH_DRAFTS - len(decodes)
        needed = len(decodes) / (len(decodes) + self.STEP_TO_ROW_COST)
        for seq in decodes:
            k = min(self.speculative_tokens, room, seq.max_tokens - len(seq.output_ids) - 1)
            if seq.drafter is None or k <= 0:
                continue
            draft = seq.drafter.draft(seq.token_ids(), k, needed)
            while draft and blocks_for(seq.num_tokens + len(draft), self.blocks.block_size) - len(seq.block_table) \
                    > self.blocks.num_empty_blocks:
                draft.pop()
            if draft:
                self.blocks.append(seq.block_table, seq.num_tokens + len(draft))
                drafts[seq.seq_id] = draft
                room -= len(draft)
        return drafts

    def _awaits_prefix(self, seq: Sequence, prefilling: list[Sequence]) -> bool:
        """Whether one of the running sequences `prefilling` is computing whole blocks of `seq`'s
        prompt past its cached prefix, at least half of what is left of it, which `seq` could then
        take from the cache (a step's wait for a few shared blocks, a chat template's opening, would
        cost more than it saves; the prompt's last token is always computed again). Not a preempted
        sequence's replay, nor a prompt that must be computed whole."""
        if not prefilling or not self.blocks.prefix_caching or seq.output_ids or seq.computes_whole_prompt:
            return False
        size, prompt = self.blocks.block_size, seq.prompt_ids
        hits = len(self.blocks.cached_prefix(prompt, len(prompt) - 1, seq.prefix_salt)) * size
        limit = (len(prompt) - 1) // size * size  # the whole blocks it could take from the cache
        for other in prefilling:
            if other.prefix_salt != seq.prefix_salt or other.prompt_ids[hits:hits + size] != \
                    prompt[hits:hits + size] or other.prompt_ids[:hits] != prompt[:hits]:
                continue
            end = hits + size  # the blocks both prompts hold: compared a block at a time
            while end < limit and other.prompt_ids[end:end + size] == prompt[end:end + size]:
                end += size
            end = min(end, limit, other.prefill_len // size * size)
            if other.num_computed < end and 2 * (end - hits) >= len(prompt) - hits:
                return True
        return False

    def _grow_decodes(self) -> bool:
        """A block for each decoding sequence's next token, preempting the newest when none is
        free; -> whether anything was preempted."""
        preempted = False
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.is_prefilling:
                continue
            while not self.blocks.can_append(seq.block_table, seq.num_tokens):
                victim = max(self.running, key=self._rank) if self.by_priority else self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.blocks.append(seq.block_table, seq.num_tokens)
        return preempted

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past a running sequence's tokens (a draft's rejected positions)."""
        keep = blocks_for(seq.num_tokens, self.blocks.block_size)
        if seq.status is SequenceStatus.RUNNING and len(seq.block_table) > keep:
            self.blocks.free_blocks(seq.block_table[keep:])
            del seq.block_table[keep:]

    def _admit(self, seq: Sequence) -> None:
        seq.block_table, cached = self.blocks.allocate(seq.seq_id, seq.token_ids(), seq.prefill_len,
                                                       reuse=not seq.computes_whole_prompt, salt=seq.prefix_salt)
        seq.num_computed = seq.dense_kv = cached
        if not seq.output_ids and not seq.num_preemptions:  # a request's first admission
            seq.cached_tokens = seq.prompt_computed = cached
            self.cached_tokens_total += cached
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id, seq.block_table)
        seq.num_computed = seq.dense_kv = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions_total += 1
        self._enqueue(seq, at_head=True)

    def on_computed(self, seq: Sequence, num_computed: int, dense: bool = True) -> int:
        """`dense`: every FFN ran for these tokens, so their K/V may be reused by a later prompt.
        -> prompt tokens computed for the first time (a preempted sequence's replay is not new)."""
        if dense and seq.dense_kv == seq.num_computed:
            seq.dense_kv = num_computed
        seq.num_computed = num_computed
        if self.blocks.publishes(seq.seq_id, seq.dense_kv):  # once a block: the token list is a copy
            self.blocks.publish(seq.seq_id, seq.block_table, seq.token_ids(), seq.dense_kv)
        new = max(0, min(num_computed, len(seq.prompt_ids)) - seq.prompt_computed)
        seq.prompt_computed += new
        return new

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id, seq.block_table)

    def abort(self, request_id: str) -> list[Sequence]:
        victims = [s for s in [*self.waiting, *self.running] if s.request_id == request_id]
        for seq in victims:
            self.finish(seq, "abort")
        return victims
