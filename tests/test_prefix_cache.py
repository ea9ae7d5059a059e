"""Prefix caching: a prompt reuses the K/V a freed slot still holds for its prefix, and only K/V that
was computed with every FFN (prefill, dense decode) is ever reused."""
from __future__ import annotations

from engine.sampling_params import SamplingParams, SkipParams
from engine.slot_manager import SlotManager
from tests.helpers import hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def test_slot_choice_takes_the_longest_shared_prefix():
    slots = SlotManager(num_slots=3, max_len=64)
    for name, tokens in (("a", [1, 2, 3, 4]), ("b", [1, 2, 9]), ("c", [])):
        slots.allocate(name)
    for name, tokens in (("a", [1, 2, 3, 4]), ("b", [1, 2, 9]), ("c", [])):
        slots.free(name, tokens)
    assert slots.allocate_for_prompt("x", [1, 2, 3, 7, 8]) == (0, 3)  # slot 0 shares [1, 2, 3]
    assert slots.used_tokens == 3
    assert slots.allocate_for_prompt("y", [1, 2, 9]) == (1, 2)  # whole prompt cached: last token recomputed
    assert slots.allocate_for_prompt("z", [5]) == (2, 0)
    slots.free("x", [1, 2, 3, 7, 8])
    assert slots.allocate("raw") == 0  # a raw allocation drops what the slot cached
    slots.free("raw")
    assert slots.allocate_for_prompt("w", [1, 2, 3]) == (0, 0)
    off = SlotManager(num_slots=1, max_len=64, prefix_caching=False)
    off.allocate("a")
    off.free("a", [1, 2, 3])
    assert off.allocate_for_prompt("b", [1, 2, 3, 4]) == (0, 0)


def test_repeated_prompt_reuses_its_kv_and_still_equals_hf(engine, hf_model, chat_prompts):
    prompt = chat_prompts[2]
    (_, first, out1), = engine.generate([prompt], GREEDY)
    (_, second, out2), = engine.generate([prompt], GREEDY)
    assert out2.cached_tokens == len(prompt) - 1
    assert second == first == hf_greedy(hf_model, prompt, GREEDY.max_tokens)
    assert engine.slots.used_tokens == 0


def test_next_turn_of_a_conversation_reuses_the_previous_turn(engine, hf_model):
    messages = [{"role": "user", "content": "Name a colour of the sky."}]
    first_prompt = engine.tokenizer.encode_chat(messages)
    (text, _, _), = engine.generate([first_prompt], GREEDY)
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "And at night?"}]
    prompt = engine.tokenizer.encode_chat(messages)
    before = engine.prompt_tokens_cached_total
    (_, ids, out), = engine.generate([prompt], GREEDY)
    assert out.cached_tokens >= len(first_prompt)
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
    assert out2.cached_tokens == len(prompt)
