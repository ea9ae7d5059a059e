"""Prefill chunks of `ModelRunner.short_chunk_rows` tokens or fewer (512 on the CPU: a default
step's whole prefill budget) are computed as decode rows of their sequence where the decode step
writes every row's K/V before any row attends (the native CPU step): a short prompt, the new
tokens after a cached prefix, a long prompt's chunks, however long their history. They make the tokens the prefill forward makes (and HF's), with the same logprobs bit for
bit (the forward's attention runs on the same kernel, each token a row); beside rows that skip FFNs
their rows never skip."""
from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams, SkipParams
from tests.helpers import hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, logprobs=1)


def _run(engine, prompt, params=GREEDY):
    (_, ids, out), = engine.generate([prompt], params)
    return ids, out


@pytest.fixture
def forwards(engine, monkeypatch):
    """Counts the prefill forwards the runner makes (one per step that has a chunk to prefill)."""
    calls = []
    prefill = engine.runner.prefill
    monkeypatch.setattr(engine.runner, "prefill",
                        lambda chunks, gate=None, **kw: calls.append(chunks) or prefill(chunks, gate, **kw))
    return calls


@pytest.fixture
def rows_limit(engine, monkeypatch):
    def set_limit(limit: int):
        monkeypatch.setattr(engine.runner, "short_chunk_rows", limit)
    assert engine.runner.short_chunk_rows == 512
    return set_limit


def _same(a, b):
    (ids_a, out_a), (ids_b, out_b) = a, b
    assert ids_a == ids_b
    assert [x.logprob for x in out_a.logprobs] == [y.logprob for y in out_b.logprobs]


def test_a_short_prompt_is_computed_as_rows_and_makes_the_forwards_tokens(engine, hf_model, forwards, rows_limit):
    assert engine.runner.checks_drafts  # the native CPU step: the rows see each other's K/V
    # a prompt no other test sends, and nothing of it cached when it runs either way
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Which ocean lies west of Portugal?"}])
    assert 16 < len(prompt) <= engine.runner.short_chunk_rows
    engine.blocks.prefix_caching, caching = False, engine.blocks.prefix_caching
    try:
        as_rows = _run(engine, prompt)
        assert not forwards and as_rows[1].cached_tokens == 0
        rows_limit(0)
        by_forward = _run(engine, prompt)
        assert forwards and by_forward[1].cached_tokens == 0
    finally:
        engine.blocks.prefix_caching = caching
    assert as_rows[0] == hf_greedy(hf_model, prompt, 24)
    _same(as_rows, by_forward)


def test_new_tokens_after_a_cached_prefix_and_a_long_prompts_last_chunk(engine, hf_model, forwards, rows_limit):
    text = engine.tokenizer.encode("The history of the bicycle begins in the early nineteenth century, when "
                                   "inventors built machines that riders pushed along with their feet. " * 8)
    head, tail = text[:128], text[128:140]
    _run(engine, head + [13])  # the prefix cache holds head's blocks
    forwards.clear()
    after_cache = _run(engine, head + tail)
    assert after_cache[1].cached_tokens == 128 and not forwards  # 12 new tokens, as rows
    assert after_cache[0] == hf_greedy(hf_model, head + tail, 24)
    rows_limit(0)
    _same(after_cache, _run(engine, head + tail))
    rows_limit(64)
    other = engine.tokenizer.encode("Rivers carry water from the hills down to the sea, shaping valleys. " * 50)
    long = other[:512 + 20]  # chunks of 512 (a forward) and 20 (rows), nothing of it cached
    forwards.clear()
    ids, out = _run(engine, long, SamplingParams(temperature=0.0, max_tokens=8))
    assert len(long) == 532 and len(forwards) == 1 and out.cached_tokens == 0
    assert ids == hf_greedy(hf_model, long, 8)
    # at the CPU's limit a chunk of a step's whole budget goes as rows, however long its history
    rows_limit(512)
    history, new = other[:496], (text * 3)[:300]  # the history cached by the prompt above
    forwards.clear()
    ids, out = _run(engine, history + new, SamplingParams(temperature=0.0, max_tokens=8))
    assert out.cached_tokens == 496 and not forwards
    assert ids == hf_greedy(hf_model, history + new, 8)


def test_short_prompts_beside_skipping_rows_never_skip_and_change_nothing(engine, chat_prompts, rows_limit):
    """Rows of prompts join steps whose decoding rows skip FFNs (budget 0.5): each answer and its
    skip count equal its own alone (the per-row rule: a row's skips are its own)."""
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    skip = SkipParams(budget=0.5, warmup_tokens=0)
    alone = [engine.generate([p], params, skip)[0] for p in chat_prompts[:3]]
    last, ids = {}, {}
    for i, prompt in enumerate(chat_prompts[:3]):  # each joins 5 steps after the one before
        engine.add_request(f"joins-{i}", prompt, params, skip)
        for _ in range(5 if i < 2 else 10**6):
            for out in engine.step()[0]:
                last[out.request_id] = out
                ids.setdefault(out.request_id, []).extend(out.token_ids)
            if i == 2 and not engine.has_work:
                break
    for i, (_, solo_ids, solo) in enumerate(alone):
        together = last[f"joins-{i}"]
        assert together.finished and ids[f"joins-{i}"] == solo_ids
        assert together.ffn_skipped == solo.ffn_skipped > 0 and together.ffn_total == solo.ffn_total
