"""One request's failure is that request's alone: the other rows of the batch go on and produce
exactly the text they produce without it."""
from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams


def run_to_completion(engine, requests: dict[str, tuple[list[int], SamplingParams]], poisoned: set[str] = frozenset(),
                      poison: str = "seed"):
    """Submit all at once -> (text, last output) by request. `poisoned` requests carry what no API
    request can carry any more, for a real failure inside the step: a seed torch's generators refuse
    (past uint64; fails in sampling), or a prompt token past the vocabulary (fails in the batched
    forward, which then runs its sequences one at a time)."""
    for rid, (prompt, params) in requests.items():
        seqs = engine.prepare_request(rid, prompt, params)
        for seq in seqs if rid in poisoned else ():
            if poison == "seed":
                seq.seed = 2**70
            else:
                seq.prompt_ids[-1] = engine.model_config.vocab_size + 5
        engine.add_sequences(seqs)
    text = {rid: "" for rid in requests}
    last = {}
    while engine.has_work:
        for out in engine.step()[0]:
            text[out.request_id] += out.text
            last[out.request_id] = out
    return text, last


@pytest.mark.parametrize("poison", ["seed", "token"])
def test_a_failing_request_fails_alone(engine, chat_prompts, poison):
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=24)
    healthy = {"greedy-0": (chat_prompts[0], greedy), "greedy-1": (chat_prompts[1], greedy),
               "seeded": (chat_prompts[2], seeded)}
    alone, alone_last = run_to_completion(engine, healthy)
    sick = {"sick-1": (chat_prompts[3], SamplingParams(temperature=1.0, max_tokens=24)),
            "sick-2": (chat_prompts[4], SamplingParams(temperature=1.0, n=2, max_tokens=24))}
    text, last = run_to_completion(engine, {**healthy, **sick}, poisoned=set(sick), poison=poison)
    for rid in healthy:
        assert text[rid] == alone[rid] and last[rid].finish_reason == alone_last[rid].finish_reason
    for rid in sick:
        assert last[rid].finish_reason == "error" and last[rid].error
    assert not engine.has_work and engine.slots.used_tokens == 0  # every failed row's KV was freed
    again, _ = run_to_completion(engine, healthy)
    assert again == alone  # and the engine serves on unchanged
