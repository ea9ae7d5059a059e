"""Limits at the context's edge: a prompt-only request (`echo` with `max_tokens` 0, Anthropic's
`max_tokens: 0`) may fill the context, as it makes no token; `min_tokens` above the tokens that fit
is a 400, not a shorter answer; `truncate_prompt_tokens: -1` and the Responses API's `truncation:
"auto"` fit a prompt within --max-input-tokens as well as within the context."""
from __future__ import annotations

import httpx
import pytest

from tests.conftest import ServerProcess

MODEL = "smollm2-135m-instruct"
CONTEXT, MAX_INPUT = 256, 200


@pytest.fixture(scope="module")
def small():
    srv = ServerProcess("--max-model-len", str(CONTEXT), "--max-input-tokens", str(MAX_INPUT))
    yield srv
    srv.stop()


def post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, json={"model": MODEL, **body}, timeout=120)


def tokens(srv, text: str) -> list[int]:
    return httpx.post(srv.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30).json()["tokens"]


def test_a_prompt_only_request_may_fill_the_context(server):
    """The session server's 2,048-token context, filled: scored (each token but the first); one
    token more is refused, as a generating prompt of the full context is."""
    context = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["max_model_len"]
    ids = (tokens(server, " The cat sat on the mat.") * context)[:context]
    r = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    scores = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert len(scores) == context and scores[0] is None and all(s is not None for s in scores[1:])
    for refused in ({"prompt": ids + ids[:1], "max_tokens": 0, "echo": True},
                    {"prompt": ids, "max_tokens": 1, "echo": True}):
        r = post(server, "/v1/completions", refused)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/responses", {"input": "Hi"}),
])
def test_min_tokens_above_what_fits_is_a_400_with_the_numbers(small, path, body):
    r = post(small, path, {**body, "min_tokens": CONTEXT + 44})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "min_tokens" and error["code"] == "context_length_exceeded"
    assert error["message"].startswith(f"min_tokens ({CONTEXT + 44}) must be at most ") and f"{CONTEXT}-token" in \
        error["message"]
    r = post(small, "/v1/completions", {"prompt": "Hi", "max_tokens": 4, "min_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["message"] == "min_tokens (5) must be at most max_tokens (4)"


def test_truncate_minus_1_keeps_what_max_input_tokens_takes(small):
    long = tokens(small, " one two three four five six seven eight nine ten" * 30)
    assert len(long) > CONTEXT
    r = post(small, "/v1/completions", {"prompt": long, "max_tokens": 1, "truncate_prompt_tokens": -1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == MAX_INPUT  # (the context would take 255)
    r = post(small, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 400}], "max_tokens": 1,
                                             "truncate_prompt_tokens": -1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == MAX_INPUT, r.text
    r = post(small, "/v1/completions", {"prompt": long, "max_tokens": 1})
    assert r.status_code == 400 and "--max-input-tokens 200" in r.json()["error"]["message"]


def test_responses_auto_truncation_drops_turns_until_max_input_tokens_takes_the_rest(small):
    turns = []
    for i in range(8):
        turns += [{"role": "user", "content": f"Tell me fact number {i} about the sea, in a few words."},
                  {"role": "assistant", "content": f"Fact {i}: the sea is deep, wide and salty in many places."}]
    turns.append({"role": "user", "content": "Summarise."})
    body = {"input": turns, "max_output_tokens": 5, "temperature": 0}
    r = post(small, "/v1/responses", body)
    assert r.status_code == 400 and "--max-input-tokens" in r.json()["error"]["message"]
    r = post(small, "/v1/responses", {**body, "truncation": "auto"})
    assert r.status_code == 200, r.text
    assert CONTEXT - 5 - 100 < r.json()["usage"]["input_tokens"] <= MAX_INPUT
