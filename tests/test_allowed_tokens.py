"""vLLM's `allowed_token_ids`: the only tokens an answer may take, sampled or greedy, streamed or
whole, alone or beside a grammar (the tokens both allow); logprobs are the model's own, as vLLM's
(computed before the list applies)."""
from __future__ import annotations

import json
import math
import re

import httpx
import pytest
import torch

from engine.sampling_params import SamplingParams

MODEL = "smollm2-135m-instruct"


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=120)


def token_ids(server, text: str) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30)
    return r.json()["tokens"]


def request_counts(server) -> dict[str, float]:
    """request_success_total by finished_reason, as /metrics says."""
    lines = httpx.get(server.url + "/metrics", timeout=10).text.splitlines()
    found = (re.fullmatch(r'skipserve:request_success_total\{finished_reason="(\w+)"\} (\S+)', line) for line in lines)
    return {m[1]: float(m[2]) for m in found if m}


@pytest.fixture(scope="module")
def yes_no(server):
    ids = token_ids(server, " yes") + token_ids(server, " no")
    assert len(ids) == 2  # one token each in SmolLM2's vocabulary
    return ids


def test_sampled_choices_take_only_the_allowed_tokens(server, yes_no):
    body = {"prompt": "Is the sky green?", "max_tokens": 12, "temperature": 1.5, "n": 3, "seed": 7,
            "allowed_token_ids": yes_no, "logprobs": 3}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    plain = post(server, "/v1/completions", {**body, "n": 1, "max_tokens": 1, "allowed_token_ids": None}).json()
    for choice in r.json()["choices"]:
        # no end-of-text token is allowed: each runs to max_tokens
        assert re.fullmatch(r"( yes| no){12}", choice["text"]) and choice["finish_reason"] == "length"
        # the model's own logprobs: the first token's alternatives are the unrestricted answer's
        # (each answer's entry also holds the token it drew, where that is not among them)
        first, model = (sorted(c["logprobs"]["top_logprobs"][0].items(), key=lambda kv: -kv[1])[:3]
                        for c in (choice, plain["choices"][0]))
        assert [t for t, _ in first] == [t for t, _ in model]
        assert all(math.isclose(a, b, abs_tol=0.02) for (_, a), (_, b) in zip(first, model))
        assert all(lp < 0 for lp in choice["logprobs"]["token_logprobs"])


def test_greedy_chat_streamed_and_whole_agree(server, yes_no):
    body = {"messages": [{"role": "user", "content": "Answer yes or no: is water wet?"}], "max_tokens": 3,
            "temperature": 0, "allowed_token_ids": yes_no[1:]}
    whole = post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    assert whole == " no no no"
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={"model": MODEL, **body, "stream": True},
                      timeout=120) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    streamed = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or "" for line in lines)
    assert streamed == whole


def test_beside_a_grammar_the_tokens_both_allow(server):
    words = [" yes", " no", " maybe"]
    body = {"prompt": "Is the sky green? Answer:", "max_tokens": 5, "temperature": 0,
            "structured_outputs": {"choice": words}}
    free = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    assert free in words
    rest = [w for w in words if w != free]  # the grammar's own greedy pick left out of the list
    listed = [i for w in rest for i in token_ids(server, w)]
    choice = post(server, "/v1/completions", {**body, "allowed_token_ids": listed}).json()["choices"][0]
    assert choice["text"] in rest


@pytest.mark.parametrize("value", [[], [10**9], [-1], ["5"]])
def test_bad_values_are_400s(server, value):
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "allowed_token_ids": value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("allowed_token_ids")


def test_the_mask_is_built_once_and_applied_after_the_logprobs():
    from engine.sampler import SampleRow, listed_tokens, sample

    params = SamplingParams(allowed_token_ids=[1, 3, 3], temperature=0, logprobs=2)
    params.validate(6)
    mask = listed_tokens(params, 6)
    assert mask.tolist() == [False, True, False, True, False, False]
    assert listed_tokens(params, 6) is mask and listed_tokens(SamplingParams(), 6) is None
    logits = torch.tensor([[5.0, 1.0, 4.0, 2.0, 0.0, 0.0]])
    grammar = torch.tensor([True, True, True, False, False, False])
    alone, = sample(logits.clone(), [SampleRow(params, [0], [], None, None, None, mask)])
    assert alone.token_id == 3 and [t for t, _ in alone.top_logprobs] == [0, 2]  # the model's own top two
    both, = sample(logits.clone(), [SampleRow(params, [0], [], None, grammar, None, mask)])
    assert both.token_id == 1  # the only token both allow
    none, = sample(logits.clone(), [SampleRow(params, [0], [], None, ~grammar & ~mask, None, mask)])
    assert isinstance(none, ValueError)  # nothing both allow: the row fails alone


def test_constraints_that_allow_nothing_fail_that_request_alone_with_a_400(server, yes_no):
    """A schema and allowed_token_ids with no token in common: the request's own contradiction, a
    400 (whole or in the stream), and the server answers the next request."""
    body = {"prompt": "Is the sky green? Answer:", "max_tokens": 4, "temperature": 0,
            "structured_outputs": {"choice": [" maybe"]}, "allowed_token_ids": yes_no}
    counted = request_counts(server)
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "allow none of the vocabulary" in error["message"]
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": MODEL, **body, "stream": True},
                      timeout=120) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[-1]["error"]["type"] == "invalid_request_error"
    # a 400, counted nowhere (as refusals are); not an "error", which is the server's failure
    assert request_counts(server) == counted
    fine = post(server, "/v1/completions", {"prompt": "Is the sky green? Answer:", "max_tokens": 4})
    assert fine.status_code == 200 and fine.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert request_counts(server) != counted  # (the counts are read: this one is in them)
