"""Prefix caching by block hash in the engine: a prompt reuses the cached K/V blocks of its prefix;
only K/V computed with every FFN (prefill, dense decode) is ever reused; shared blocks are never
written again; many different prefixes stay cached side by side."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.sampling_params import SamplingParams, SkipParams
from tests.helpers import assert_all_blocks_back, hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
TEXTS = Path(__file__).resolve().parent.parent / "engine" / "data" / "calibration.txt"


def full_blocks(engine, tokens: int) -> int:
    """Tokens in the whole blocks among `tokens`: what a prefix hit can cover."""
    return tokens // engine.config.block_size * engine.config.block_size


def test_repeated_prompt_reuses_its_kv_and_still_equals_hf(engine, hf_model, chat_prompts):
    prompt = chat_prompts[2]
    (_, first, out1), = engine.generate([prompt], GREEDY)
    (_, second, out2), = engine.generate([prompt], GREEDY)
    assert out2.cached_tokens == full_blocks(engine, len(prompt) - 1) > 0  # the last token is computed again
    assert second == first == hf_greedy(hf_model, prompt, GREEDY.max_tokens)
    assert_all_blocks_back(engine)


def test_next_turn_of_a_conversation_reuses_the_previous_turn(engine, hf_model):
    messages = [{"role": "user", "content": "Name a colour of the sky."}]
    first_prompt = engine.tokenizer.encode_chat(messages)
    (text, _, _), = engine.generate([first_prompt], GREEDY)
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "And at night?"}]
    prompt = engine.tokenizer.encode_chat(messages)
    before = engine.prompt_tokens_cached_total
    (_, ids, out), = engine.generate([prompt], GREEDY)
    assert out.cached_tokens >= full_blocks(engine, len(first_prompt))
    assert engine.prompt_tokens_cached_total - before == out.cached_tokens
    assert ids == hf_greedy(hf_model, prompt, GREEDY.max_tokens)


def test_kv_of_tokens_decoded_with_skipped_ffns_is_not_reused(engine, chat_prompts):
    prompt = chat_prompts[3]
    skip = SkipParams(budget=0.25, threshold=0.0, warmup_tokens=0)  # skips from the first decode step
    (_, generated, out), = engine.generate([prompt], GREEDY, skip)
    assert out.ffn_skipped > 0
    follow_up = prompt + generated + prompt[-3:]
    (_, _, out2), = engine.generate([follow_up], GREEDY)
    # prefill K/V (the prompt) and the first generated token's input position are dense; nothing after
    assert out2.cached_tokens == full_blocks(engine, len(prompt))


def test_a_shared_prefix_is_never_written_by_the_sequences_sharing_it(engine, chat_prompts):
    """Two prompts extending a cached one run together: both hold its full blocks (reference count
    2), each writes only blocks of its own, and the shared K/V stay bit for bit what they were."""
    tok = engine.tokenizer
    base = tok.encode_chat([{"role": "user", "content": "Describe a lighthouse at dusk in detail."}])
    engine.generate([base], SamplingParams(temperature=0.0, max_tokens=2))
    shared = engine.blocks.cached_prefix(base, len(base))
    assert len(shared) == len(base) // engine.config.block_size > 0
    k_before, v_before = engine.runner.kv.k[:, shared].clone(), engine.runner.kv.v[:, shared].clone()
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    engine.add_request("ext-a", base + tok.encode(" And the sea?"), params)
    engine.add_request("ext-b", base + tok.encode(" Then the night."), params)
    cached = {}
    while engine.has_work:
        running = engine.scheduler.running
        if len(running) == 2:
            a, b = (s.block_table for s in running)
            assert a[:len(shared)] == b[:len(shared)] == shared
            assert all(engine.blocks.ref_counts[blk] == 2 for blk in shared)
            assert not set(a[len(shared):]) & set(b[len(shared):])
        for out in engine.step()[0]:
            cached[out.request_id] = out.cached_tokens
    assert cached == {"ext-a": len(shared) * engine.config.block_size, "ext-b": len(shared) * engine.config.block_size}
    assert torch.equal(engine.runner.kv.k[:, shared], k_before) and torch.equal(engine.runner.kv.v[:, shared], v_before)
    assert_all_blocks_back(engine)


def test_eight_long_system_prompts_stay_cached_together(paged_engine):
    """Eight different ~650-token system prompts, twice round: on the second pass each finds its whole
    prompt cached but the last partial block (a slot per sequence kept only three)."""
    eng = paged_engine
    passages = [t for t in TEXTS.read_text().splitlines() if t.strip()]
    prompts = []
    for i in range(8):  # the passages in a different order each, until the prompt passes 640 tokens
        system, j, prompt = f"Policy {i}.", 0, []
        while len(prompt) <= 640:
            system += " " + passages[(i + j) % len(passages)]
            j += 1
            prompt = eng.tokenizer.encode_chat([{"role": "system", "content": system},
                                                {"role": "user", "content": "Summarize the policy."}])
        prompts.append(prompt)
    params = SamplingParams(temperature=0.0, max_tokens=4)
    first = eng.generate(prompts, params)
    second = eng.generate(prompts, params)
    assert [o.cached_tokens for _, _, o in second] == [full_blocks(eng, len(p) - 1) for p in prompts]
    assert [ids for _, ids, _ in second] == [ids for _, ids, _ in first]
    assert_all_blocks_back(eng)


def test_the_choices_of_a_request_compute_its_prompt_once(engine):
    """n = 4 on a prompt nothing has cached: the first choice computes it, the other three (in one
    step, the next) take its whole blocks from the cache and compute only the last, partial one;
    each choice samples what a request of its own with seed + i samples."""
    words = TEXTS.read_text().split()
    prompt = engine.tokenizer.encode(" ".join(words[40:400]))
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=6)
    before, cached_before = engine.prompt_tokens_total, engine.prompt_tokens_cached_total
    engine.add_request("n4", prompt, params)
    texts, cached, first_step = {}, {}, {}
    step = 0
    while engine.has_work:
        for out in engine.step()[0]:
            texts[out.index] = texts.get(out.index, "") + out.text
            cached[out.index] = out.cached_tokens
            first_step.setdefault(out.index, step)
        step += 1
    shared = full_blocks(engine, len(prompt) - 1)
    assert len(prompt) <= engine.config.max_prefill_tokens  # the first choice's prompt: one step
    assert first_step == {0: 0, 1: 1, 2: 1, 3: 1}
    assert cached == {0: 0, 1: shared, 2: shared, 3: shared}
    assert engine.prompt_tokens_total - before == len(prompt) + 3 * (len(prompt) - shared)
    assert engine.prompt_tokens_cached_total - cached_before == 3 * shared
    for i in range(4):  # choice i samples as a request of its own with seed 11 + i
        (alone, _, _), = engine.generate([prompt], SamplingParams(temperature=1.0, seed=11 + i, max_tokens=6))
        assert alone == texts[i]
    assert_all_blocks_back(engine)


def test_cache_salt_keeps_prefixes_apart_over_http(server):
    """vLLM's `cache_salt`: a prompt finds the cached blocks of an earlier one only under the same
    salt (and an unsalted prompt only unsalted ones); an empty salt is a 400 naming it."""
    import uuid

    import httpx

    # a prompt no other test sends (its first block holds the id), so only this test's requests cache it
    words = f"{uuid.uuid4().hex} salted prefix caching keeps each tenant's prompts to itself " * 4
    salt = uuid.uuid4().hex

    def cached(salt, path="/v1/completions"):
        body = {"model": "smollm2-135m-instruct", "max_tokens": 1, "temperature": 0}
        body |= {"messages": [{"role": "user", "content": words}]} if "chat" in path else {"prompt": words}
        if salt is not None:
            body["cache_salt"] = salt
        r = httpx.post(server.url + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        return (r.json()["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)

    assert cached(salt + "a") == 0  # first seen under this salt
    assert cached(salt + "b") == 0 and cached(None) == 0  # another salt, and none, find nothing of it
    assert cached(salt + "a") > 0 and cached(salt + "b") > 0 and cached(None) > 0  # each finds its own
    # on chat too; the chat template's opening, which other tests' unsalted chats have cached, is not
    # found under a new salt either
    assert cached(salt + "c", "/v1/chat/completions") == 0 and cached(salt + "c", "/v1/chat/completions") > 0
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "cache_salt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"
