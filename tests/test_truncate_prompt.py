"""vLLM's `truncate_prompt_tokens` on chat, completions and embeddings: a prompt longer than the
context is cut to its last k tokens (-1: as many as leave room for the answer) instead of refused;
with `truncation_side: "right"` to its first k."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import cuda_available

MODEL = "smollm2-135m-instruct"
CONTEXT = 2048  # the preset's max_model_len (the shared server's)
LONG = [100 + (i * 37) % 5000 for i in range(CONTEXT + 100)]  # token ids past the context


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=120)


def test_completions_keep_the_last_tokens(server, client):
    with pytest.raises(openai.BadRequestError) as err:  # as before: too long is refused
        client.completions.create(model=MODEL, prompt=LONG, max_tokens=4, temperature=0)
    assert err.value.code == "context_length_exceeded"
    cut = client.completions.create(model=MODEL, prompt=LONG, max_tokens=4, temperature=0,
                                    extra_body={"truncate_prompt_tokens": 100})
    assert cut.usage.prompt_tokens == 100 and cut.choices[0].finish_reason == "length"
    fit = client.completions.create(model=MODEL, prompt=LONG, max_tokens=5, temperature=0,
                                    extra_body={"truncate_prompt_tokens": -1})
    assert fit.usage.prompt_tokens == CONTEXT - 5 and fit.usage.completion_tokens == 5
    tail = client.completions.create(model=MODEL, prompt=LONG[-100:], max_tokens=4, temperature=0)
    assert tail.usage.prompt_tokens == 100
    if not cuda_available():  # the repeat comes from the prefix cache: bits equal on the CPU path only
        assert tail.choices[0].text == cut.choices[0].text


def test_echo_shows_the_prompt_the_model_was_given(server):
    body = {"prompt": LONG[:50], "max_tokens": 0, "echo": True, "logprobs": 0, "truncate_prompt_tokens": 7}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    shown = httpx.post(server.url + "/detokenize", json={"tokens": LONG[43:50]}, timeout=30).json()["prompt"]
    assert choice["text"] == shown and len(choice["logprobs"]["tokens"]) == 7
    assert r.json()["usage"]["prompt_tokens"] == 7


def test_chat_prompt_is_cut_from_its_start(server, client):
    words = " ".join(f"word{i}" for i in range(1500))  # ~3,000 tokens
    messages = [{"role": "user", "content": words}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3,
                                       extra_body={"truncate_prompt_tokens": 64})
    assert r.usage.prompt_tokens == 64 and r.usage.completion_tokens <= 3
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3,
                                       extra_body={"truncate_prompt_tokens": -1})
    assert r.usage.prompt_tokens == CONTEXT - 3


def test_embeddings_of_the_last_tokens(server, client):
    whole = client.embeddings.create(model=MODEL, input=[LONG], extra_body={"truncate_prompt_tokens": -1})
    assert whole.usage.prompt_tokens == CONTEXT
    cut = client.embeddings.create(model=MODEL, input=[LONG[:300]], extra_body={"truncate_prompt_tokens": 20})
    tail = client.embeddings.create(model=MODEL, input=[LONG[280:300]])
    assert cut.usage.prompt_tokens == 20
    assert max(abs(a - b) for a, b in zip(cut.data[0].embedding, tail.data[0].embedding)) < 1e-3


def test_truncation_side_right_keeps_the_first_tokens(server, client):
    body = {"prompt": LONG[:50], "max_tokens": 0, "echo": True, "truncate_prompt_tokens": 7,
            "truncation_side": "right", "return_token_ids": True}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["prompt_token_ids"] == LONG[:7]
    assert choice["text"] == httpx.post(server.url + "/detokenize", json={"tokens": LONG[:7]}, timeout=30).json()["prompt"]
    left = post(server, "/v1/completions", dict(body, truncation_side="left")).json()["choices"][0]
    assert left["prompt_token_ids"] == LONG[43:50]
    untouched = post(server, "/v1/completions", {"prompt": LONG[:50], "max_tokens": 1, "truncation_side": "right",
                                                 "return_token_ids": True}).json()["choices"][0]
    assert untouched["prompt_token_ids"] == LONG[:50]  # a side alone cuts nothing, as vLLM's
    cut = client.embeddings.create(model=MODEL, input=[LONG[:300]],
                                   extra_body={"truncate_prompt_tokens": 20, "truncation_side": "right"})
    head = client.embeddings.create(model=MODEL, input=[LONG[:20]])
    assert cut.usage.prompt_tokens == 20
    assert max(abs(a - b) for a, b in zip(cut.data[0].embedding, head.data[0].embedding)) < 1e-3
    words = " ".join(f"word{i}" for i in range(1500))
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": words}], max_tokens=2,
                                       extra_body={"truncate_prompt_tokens": 64, "truncation_side": "right"})
    assert r.usage.prompt_tokens == 64


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi", "truncate_prompt_tokens": 5, "truncation_side": "middle"}),
    ("/v1/embeddings", {"input": "hi", "truncate_prompt_tokens": 5, "truncation_side": 1}),
])
def test_a_bad_truncation_side_is_a_400_naming_it(server, path, body):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "truncation_side"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "truncate_prompt_tokens": 0}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "truncate_prompt_tokens": -2}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "truncate_prompt_tokens": CONTEXT + 1}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "truncate_prompt_tokens": 5, "suffix": "x"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "truncate_prompt_tokens": "5"}),
    ("/v1/embeddings", {"input": "hi", "truncate_prompt_tokens": 0}),
])
def test_bad_values_are_400s_naming_the_field(server, path, body):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "truncate_prompt_tokens"
