"""The scheduler alone (integers and lists: no model): when it admits, what a step computes, and
what it sets aside."""
from __future__ import annotations

import pytest

from engine.kv.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence


def seq(name: str, prompt: list[int], priority: int = 0, max_tokens: int = 8, salt: str | None = None) -> Sequence:
    return Sequence(seq_id=name, request_id=name, index=0, prompt_ids=list(prompt),
                    params=SamplingParams(priority=priority, cache_salt=salt), skip_plan=None, max_tokens=max_tokens,
                    detokenizer=None, seed=0)


def run_prefills(scheduler: Scheduler, finish_on_first_token: bool = True, steps: int = 100) -> list[tuple]:
    """Steps until nothing is left, as the engine takes them: each chunk computed (its blocks
    published), the prompt's last one making a token; each sequence finished then, or decoding one
    token a step up to its max_tokens. -> (step, seq_id, start, end)."""
    chunks = []
    for step in range(steps):
        if not scheduler.has_work:
            return chunks
        batch = scheduler.schedule()
        for chunk in batch.prefills:
            chunks.append((step, chunk.seq.seq_id, chunk.start, chunk.end))
            scheduler.on_computed(chunk.seq, chunk.end)
            if chunk.produces_token:  # the prompt's last chunk samples the first token
                chunk.seq.output_ids.append(7)
                if finish_on_first_token:
                    scheduler.finish(chunk.seq, "stop")
        for s in batch.decodes:
            s.output_ids.append(7)
            scheduler.on_computed(s, s.num_tokens - 1)
            if len(s.output_ids) >= s.max_tokens:
                scheduler.finish(s, "length")
    raise AssertionError("the scheduler did not finish")


def test_requests_that_arrive_together_with_a_common_prefix_compute_it_once():
    """A long shared system prompt, four requests in one step, a prefill budget of 256: the first
    computes the prefix, the others are admitted once it is cached (all four were admitted at once
    and each computed the whole prompt: 4 x 620 tokens)."""
    shared = list(range(1000, 1600))
    blocks = BlockManager(num_blocks=400, block_size=16)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_prefill_tokens=256)
    seqs = [seq(f"r{i}", shared + [i] * 20) for i in range(4)]
    for s in seqs:
        scheduler.add(s)
    chunks = run_prefills(scheduler)
    cached = 600 // 16 * 16  # the shared prompt's whole blocks
    assert [s.cached_tokens for s in seqs] == [0, cached, cached, cached]
    assert sum(end - start for _, _, start, end in chunks) == 620 + 3 * (620 - cached)
    assert all(end - start <= 256 for _, _, start, end in chunks)


def test_short_prompts_still_share_a_step():
    """Admission stops when the budget is spent, not after one prompt."""
    blocks = BlockManager(num_blocks=64, block_size=16)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_prefill_tokens=100)
    for i in range(5):
        scheduler.add(seq(f"s{i}", [i * 100 + t for t in range(30)]))
    batch = scheduler.schedule()
    assert [(c.seq.seq_id, c.start, c.end) for c in batch.prefills] == \
        [("s0", 0, 30), ("s1", 0, 30), ("s2", 0, 30), ("s3", 0, 10)]
    assert len(scheduler.waiting) == 1


def test_a_prompts_first_decode_block_is_set_aside_from_later_admissions():
    """Three free blocks: a 32-token prompt takes two and needs a third for its first decoded
    token. A 10-token prompt behind it waits: admitted beside it (it once was, into that third
    block), it was preempted at the first decode step and its prefill thrown away."""
    blocks = BlockManager(num_blocks=3, block_size=16)
    scheduler = Scheduler(blocks, max_num_seqs=4, max_prefill_tokens=512)
    x, y = seq("x", list(range(100, 132))), seq("y", list(range(200, 210)))
    x.max_tokens = y.max_tokens = 2
    scheduler.add(x)
    scheduler.add(y)
    chunks = run_prefills(scheduler, finish_on_first_token=False, steps=20)
    assert chunks[0] == (0, "x", 0, 32) and chunks[1][:2] == (2, "y")  # y once x was done
    assert x.finish_reason == y.finish_reason == "length"
    assert scheduler.num_preemptions_total == 0 and blocks.num_free_blocks == 3


def test_a_few_shared_blocks_do_not_hold_a_prompt_back():
    """Prompts that share only a chat template's opening (one block of 60 tokens) are admitted
    together: a step's wait would cost more than the block saves. The choices of one request
    (the whole prompt shared) wait a step and take it from the cache."""
    opening = list(range(500, 516))
    blocks = BlockManager(num_blocks=64, block_size=16)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_prefill_tokens=512)
    a, b = seq("a", opening + [1] * 44), seq("b", opening + [2] * 44)
    c = seq("c", opening + [1] * 44)  # a's prompt again, as a second choice's
    for s in (a, b, c):
        scheduler.add(s)
    chunks = run_prefills(scheduler)
    assert [(step, name) for step, name, _, _ in chunks] == [(0, "a"), (0, "b"), (1, "c")]
    assert (a.cached_tokens, b.cached_tokens, c.cached_tokens) == (0, 0, 48)


def test_the_priority_policy_admits_by_priority_then_arrival_and_preempts_the_last_of_that_order():
    blocks = BlockManager(num_blocks=64, block_size=16)
    scheduler = Scheduler(blocks, max_num_seqs=1, max_prefill_tokens=512, policy="priority")
    order = [("low", 5), ("high", -1), ("mid", 0), ("high2", -1)]
    for name, priority in order:
        scheduler.add(seq(name, [1, 2, 3], priority))
    assert [s.seq_id for s in scheduler.waiting] == ["high", "high2", "mid", "low"]
    admitted = [chunk[1] for chunk in run_prefills(scheduler)]
    assert admitted == ["high", "high2", "mid", "low"]
    fcfs = Scheduler(BlockManager(num_blocks=64, block_size=16), max_num_seqs=1, max_prefill_tokens=512)
    for name, _ in order:
        fcfs.add(seq(name, [1, 2, 3]))
    assert [chunk[1] for chunk in run_prefills(fcfs)] == [name for name, _ in order]

    # 3 blocks of 4 tokens: "relaxed" runs first, "urgent" is admitted beside it; at their fifth and
    # sixth tokens each needs a second block and there is one: "relaxed" takes it first, then
    # "urgent" needs one and the victim is the running sequence latest in priority order, "relaxed"
    # (under fcfs the newest, "urgent" itself)
    for policy, victim in (("priority", "relaxed"), ("fcfs", "urgent")):
        ranked = policy == "priority"
        scheduler = Scheduler(BlockManager(num_blocks=3, block_size=4), max_num_seqs=4, max_prefill_tokens=512,
                              policy=policy)
        arrivals = [seq("relaxed", [9, 9, 9], 3 if ranked else 0, max_tokens=8),
                    seq("urgent", [8, 8, 8], -3 if ranked else 0, max_tokens=8)]
        for step in range(6):
            if arrivals:
                scheduler.add(arrivals.pop(0))
            batch = scheduler.schedule()
            if scheduler.num_preemptions_total:
                break
            for chunk in batch.prefills:
                scheduler.on_computed(chunk.seq, chunk.end)
                chunk.seq.output_ids.append(7)
            for s in batch.decodes:
                s.output_ids.append(7)
                scheduler.on_computed(s, s.num_tokens - 1)
        assert scheduler.num_preemptions_total == 1 and [s.seq_id for s in scheduler.waiting] == [victim]
        assert [s.seq_id for s in scheduler.running] == [n for n in ("relaxed", "urgent") if n != victim]


def test_a_salted_prompt_neither_takes_nor_waits_for_another_salts_prefix():
    """The choices of a prompt computed once (the later ones wait for the first's prefix, then take
    it from the cache) only among prompts with the same cache_salt: another salt computes its own."""
    shared = list(range(1000, 1600))
    scheduler = Scheduler(BlockManager(num_blocks=400, block_size=16), max_num_seqs=8, max_prefill_tokens=256)
    seqs = [seq("a0", shared + [1] * 20, salt="a"), seq("b0", shared + [2] * 20, salt="b"),
            seq("a1", shared + [3] * 20, salt="a"), seq("none", shared + [4] * 20)]
    for s in seqs:
        scheduler.add(s)
    steps = {}
    for step, name, _, _ in run_prefills(scheduler):
        steps.setdefault(name, []).append(step)
    cached = 600 // 16 * 16
    assert [s.cached_tokens for s in seqs] == [0, 0, cached, 0]
    assert set(steps["b0"]) & set(steps["a0"])  # it did not wait for "a0"'s prefix: computed beside it
    assert min(steps["a1"]) > max(steps["a0"])  # it did, and took it from the cache


def test_a_priority_needs_the_priority_policy(engine):
    params = SamplingParams(max_tokens=2, priority=1)
    with pytest.raises(Exception, match="scheduling-policy priority"):
        engine.prepare_request("p", [1, 2, 3], params)
