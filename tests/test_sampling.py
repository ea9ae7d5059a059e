"""Sampling behaviour of the engine: seeds, stop strings, lengths, logprobs."""
from __future__ import annotations

from engine.sampling_params import SamplingParams


def sample_text(engine, prompt, **kw):
    (text, ids, last), = engine.generate([prompt], SamplingParams(**kw))
    return text, ids, last


def test_same_seed_same_text_different_seeds_differ(engine, chat_prompts):
    kw = dict(temperature=1.0, top_p=0.95, max_tokens=24)
    a = sample_text(engine, chat_prompts[1], seed=1234, **kw)[0]
    b = sample_text(engine, chat_prompts[1], seed=1234, **kw)[0]
    c = sample_text(engine, chat_prompts[1], seed=4321, **kw)[0]
    assert a == b
    assert a != c


def test_stop_string_spanning_tokens_is_honoured_and_not_emitted(engine, chat_prompts):
    prompt = chat_prompts[3]
    full, ids, _ = sample_text(engine, prompt, temperature=0.0, max_tokens=40)
    # build a stop string across the boundary of tokens 3 and 4 of the greedy output
    pieces = [engine.tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    cut = len(pieces[3])
    stop = full[cut - 2:cut + 3]
    assert len(stop) == 5 and full.find(stop) == cut - 2
    text, _, last = sample_text(engine, prompt, temperature=0.0, max_tokens=40, stop=[stop])
    assert text == full[:cut - 2]
    assert stop not in text
    assert last.finish_reason == "stop"


def test_max_tokens_ends_with_length(engine, chat_prompts):
    _, ids, last = sample_text(engine, chat_prompts[3], temperature=0.0, max_tokens=5)
    assert len(ids) == 5 and last.finish_reason == "length" and last.completion_tokens == 5


def test_logprobs_are_log_probabilities_with_alternatives(engine, chat_prompts):
    _, ids, last = sample_text(engine, chat_prompts[0], temperature=0.0, max_tokens=3, logprobs=3)
    entry = last.logprobs[0]
    assert entry.token_id == ids[-1]
    assert len(entry.top) == 3
    assert entry.top[0][1] == entry.token_id  # greedy: the chosen token is the most likely one
    assert entry.logprob <= 0.0 and abs(entry.logprob - entry.top[0][2]) < 1e-6
    assert entry.top[0][2] >= entry.top[1][2] >= entry.top[2][2]


def test_greedy_n2_choices_are_identical_and_seeded_n2_differ(engine, chat_prompts):
    engine.add_request("n2", chat_prompts[1], SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=16))
    texts = {0: "", 1: ""}
    while engine.has_work:
        for out in engine.step()[0]:
            texts[out.index] += out.text
    assert texts[0] and texts[1] and texts[0] != texts[1]
