"""Prompt logprobs (SamplingParams.prompt_logprobs; `echo` with `logprobs` on /v1/completions, as
lm-evaluation-harness scores a continuation): each prompt token's logprob given the tokens before
it equals HF transformers' on the same fp32 weights, whether the prompt is computed in one chunk
or several, alone or beside other rows, and when the prefix cache holds it (it is computed again:
a cached block keeps K/V, not the hidden states a score needs). vLLM's `prompt_logprobs` field on
completions and chat gives the same scores in vLLM's shape, with each token's rank."""
from __future__ import annotations

import math

import httpx
import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.conftest import cuda_available
from tests.helpers import engine_like

MODEL = "smollm2-135m-instruct"
TEXT = "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks " \
       "were striking thirteen. " * 2


def _first_outputs(engine, requests):
    """Run (request id, prompt, params) to completion -> {(request id, choice): first output}."""
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
    firsts = {}
    while engine.has_work:
        for out in engine.step()[0]:
            firsts.setdefault((out.request_id, out.index), out)
    return firsts


@pytest.fixture(scope="module")
def reference(engine, hf_model):
    prompt = engine.tokenizer.encode(TEXT)
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    return prompt, logprobs


def _check(entries, prompt, logprobs, k):
    assert [e.token_id for e in entries] == prompt
    assert entries[0].logprob is None and entries[0].top == []  # nothing predicts the first token
    for p, e in enumerate(entries[1:]):
        assert math.isclose(e.logprob, logprobs[p, prompt[p + 1]].item(), abs_tol=1e-4)
        # its rank: how many tokens HF finds at least as likely (within the tolerance either way)
        assert max(1, (logprobs[p] >= e.logprob + 1e-4).sum()) <= e.rank <= (logprobs[p] >= e.logprob - 1e-4).sum()
        top = logprobs[p].topk(k)
        assert [t for _, t, _ in e.top] == top.indices.tolist()
        assert all(math.isclose(lp, ref, abs_tol=1e-4) for (_, _, lp), ref in zip(e.top, top.values.tolist()))


def test_prompt_logprobs_equal_hf_in_one_chunk_or_many_and_when_cached(engine, reference):
    prompt, logprobs = reference
    chunked = engine_like(engine, max_prefill_tokens=16)  # the prompt in 4+ chunks, scored chunk by chunk
    for eng in (engine, chunked):
        params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3, n=2)
        other = SamplingParams(max_tokens=4, temperature=0)
        # twice: the second time the prefix cache holds the prompt's blocks, and it is computed again
        for round_ in range(2):
            firsts = _first_outputs(eng, [(f"scored{round_}", prompt, params),
                                          (f"plain{round_}", prompt[:40], other)])
            for choice in range(2):  # every choice gets them on its first output
                _check(firsts[(f"scored{round_}", choice)].prompt_logprobs, prompt, logprobs, 3)
            assert firsts[(f"plain{round_}", 0)].prompt_logprobs is None
            if round_ == 1:
                assert firsts[("plain1", 0)].cached_tokens > 0  # a plain prompt still takes the cache


def test_echo_with_logprobs_scores_the_prompt_and_the_answer_over_http(server, client, engine, reference):
    prompt, logprobs = reference
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert r.choices[0].text.startswith(httpx.post(server.url + "/detokenize", json={"tokens": prompt},
                                                   timeout=30).json()["prompt"])
    if not cuda_available():  # the served model's quantized weights: its own scores, close to fp32's
        scored = lp.token_logprobs[1:len(prompt)]
        reference_scores = [logprobs[p, prompt[p + 1]].item() for p in range(len(prompt) - 1)]
        assert sum(abs(a - b) for a, b in zip(scored, reference_scores)) / len(scored) < 0.05
    if not cuda_available():  # the answer's token is scored as without echo (on CUDA the plain request
        # finds the prompt cached and computes a bf16 tail: its last bits, even its greedy token, may differ)
        plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1)
        assert lp.tokens[-1] == plain.choices[0].logprobs.tokens[0]
        assert math.isclose(lp.token_logprobs[-1], plain.choices[0].logprobs.token_logprobs[0], abs_tol=1e-3)
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == logprob and len(top) in (1, 2)  # the likeliest and, where another, the prompt's
    assert any(len(top) == 2 for top in lp.top_logprobs[1:])
    offsets = lp.text_offset
    assert offsets == sorted(offsets) and offsets[0] == 0
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                              logprobs=1, stream=True))
    first = streamed[0].choices[0]
    assert first.logprobs.tokens == lp.tokens[:len(prompt)] and first.text == r.choices[0].text[:len(first.text)]


def test_echo_with_max_tokens_0_gives_the_prompt_and_its_scores_alone(client, server):
    prompt = [504, 3458, 282, 4649, 314]
    made = server.metric("generation_tokens_total")
    r = client.completions.create(model=MODEL, prompt=[prompt, prompt[:3]], max_tokens=0, echo=True, logprobs=1)
    for c in r.choices:
        ids = [prompt, prompt[:3]][c.index]
        assert len(c.logprobs.tokens) == len(ids) and c.logprobs.token_logprobs[0] is None
        assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == 8
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert server.metric("generation_tokens_total") == made  # (no token made, none counted)


def test_a_sequence_preempted_while_scoring_its_prompt_scores_each_token_once(engine, reference):
    prompt, logprobs = reference
    # 8 blocks of 16 tokens, 2 prefill tokens a step: an older request decoding past its 3 blocks takes
    # the last free one, then needs another while the scoring prompt (4 blocks) is still being
    # computed, and the newest sequence (the scoring one) is preempted and computed again
    small = engine_like(engine, kv_capacity_tokens=128, max_model_len=128, max_prefill_tokens=2, prefix_caching=False)
    other = (small.tokenizer.encode("Count the stars in the sky tonight, one by one, slowly. " * 8))[:47]
    assert 33 < len(prompt) <= 64
    firsts = _first_outputs(small, [("other", other, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)),
                                    ("scored", prompt, SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=2,
                                                                     ignore_eos=True))])
    assert small.num_preemptions_total > 0
    _check(firsts[("scored", 0)].prompt_logprobs, prompt, logprobs, 2)


def test_completions_top_logprobs_keep_the_likeliest_of_tokens_with_one_text_and_the_chosen_ones_own():
    """Byte pieces of characters (Gemma's byte fallback) share a text, U+FFFD: the dict keeps the
    likeliest's logprob, and the chosen token's own (it kept the lowest-ranked one's)."""
    from engine.outputs import TokenLogprob
    from server.completions import top_with_chosen

    chosen = TokenLogprob("\ufffd", 7, -0.1, [("\ufffd", 7, -0.1), ("a", 8, -1.0), ("\ufffd", 9, -3.0)])
    assert top_with_chosen(chosen) == {"\ufffd": -0.1, "a": -1.0}
    unlisted = TokenLogprob("\ufffd", 9, -3.0, [("\ufffd", 7, -0.1), ("a", 8, -1.0)])
    assert top_with_chosen(unlisted)["\ufffd"] == -3.0  # the chosen token's own, as token_logprobs says


def _scores(server, path, body) -> dict:
    r = httpx.post(server.url + path, json=dict(body, model=MODEL), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _check_vllm_scores(scores, prompt, k):
    """vLLM's `prompt_logprobs`: null for the first token, then the prompt token (first) and its k
    likeliest alternatives (ranked 1..k) by id."""
    assert len(scores) == len(prompt) and scores[0] is None
    for token, scored in zip(prompt[1:], scores[1:]):
        ids = list(scored)
        assert ids[0] == str(token)
        own = scored[str(token)]
        assert own["logprob"] <= 0 and own["rank"] >= 1 and isinstance(own["decoded_token"], str)
        alternatives = [v for i, v in scored.items() if i != str(token)]
        assert len(scored) in (k, k + 1) and len(alternatives) >= k - 1
        ranks = [v["rank"] for v in alternatives]
        assert ranks == sorted(set(ranks)) and set(ranks) <= set(range(1, k + 1))
        if len(scored) == k + 1:  # not among the k likeliest: all k are listed beside it, at least as likely
            assert ranks == list(range(1, k + 1)) and own["rank"] > k
            assert all(v["logprob"] >= own["logprob"] for v in alternatives)
        values = [v["logprob"] for v in alternatives]
        assert values == sorted(values, reverse=True)


def test_vllm_prompt_logprobs_on_completions_score_each_choices_prompt(server, engine, reference):
    prompt, logprobs = reference
    short = prompt[:7]
    body = _scores(server, "/v1/completions", {"prompt": [prompt, short], "n": 2, "max_tokens": 2,
                                               "temperature": 0, "prompt_logprobs": 3})
    assert len(body["choices"]) == 4
    for c in body["choices"]:  # each choice scores its own prompt (choice i: prompt i // n)
        assert c["logprobs"] is None  # not asked for
        _check_vllm_scores(c["prompt_logprobs"], [prompt, short][c["index"] // 2], 3)
    scored = body["choices"][0]["prompt_logprobs"]
    if not cuda_available():  # the served model's quantized weights: its own scores, close to fp32's
        own = [scored[p + 1][str(prompt[p + 1])]["logprob"] for p in range(len(prompt) - 1)]
        reference_scores = [logprobs[p, prompt[p + 1]].item() for p in range(len(prompt) - 1)]
        assert sum(abs(a - b) for a, b in zip(own, reference_scores)) / len(own) < 0.05
        # the top alternative is HF's likeliest token wherever HF's lead over the second is clear
        for p in range(len(prompt) - 1):
            top2 = logprobs[p].topk(2)
            if top2.values[0] - top2.values[1] > 0.5:
                best = [i for i, v in scored[p + 1].items() if v["rank"] == 1]
                assert best == [str(top2.indices[0].item())]
    plain = _scores(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0})
    assert "prompt_logprobs" not in plain["choices"][0]


def test_vllm_prompt_logprobs_beside_echo_each_keep_their_own_count(server):
    prompt = [504, 3458, 282, 4649, 314, 2752, 28]
    body = _scores(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True,
                                               "logprobs": 1, "prompt_logprobs": 4})
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt) + 1
    assert all(top is None or len(top) in (1, 2) for top in lp["top_logprobs"])  # echo's 1 (and the token)
    _check_vllm_scores(choice["prompt_logprobs"], prompt, 4)
    for p in range(1, len(prompt)):  # the same scores either way
        assert lp["token_logprobs"][p] == choice["prompt_logprobs"][p][str(prompt[p])]["logprob"]


def test_vllm_prompt_logprobs_on_chat_score_the_rendered_prompt(server):
    messages = [{"role": "user", "content": "Name a colour."}]
    rendered = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": messages},
                          timeout=30).json()["tokens"]
    body = _scores(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 3, "temperature": 0,
                                                    "n": 2, "prompt_logprobs": 0})
    assert body["usage"]["prompt_tokens"] == len(rendered)
    _check_vllm_scores(body["prompt_logprobs"], rendered, 0)  # the prompt token alone
    assert all(c["logprobs"] is None for c in body["choices"])  # chat's answer logprobs were not asked for
    # 0 beside stream is taken and shows nothing, as vLLM streams it
    streamed = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": messages, "max_tokens": 3, "stream": True, "prompt_logprobs": 0})
    assert streamed.status_code == 200 and "prompt_logprobs" not in streamed.text and "[DONE]" in streamed.text


@pytest.mark.parametrize("path, body, message", [
    ("/v1/completions", {"prompt": "Hi", "prompt_logprobs": 1, "stream": True}, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "prompt_logprobs": 1,
                              "stream": True}, "stream"),
    ("/v1/completions", {"prompt": "Hi", "prompt_logprobs": -1}, "[0, 20]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "prompt_logprobs": 21}, "[0, 20]"),
])
def test_vllm_prompt_logprobs_bad_values_are_400s_naming_the_field(server, path, body, message):
    r = httpx.post(server.url + path, json=dict(body, model=MODEL), timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt_logprobs" and message in r.json()["error"]["message"]
