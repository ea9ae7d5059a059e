"""Bad input gets a 4xx in the OpenAI error envelope with `param` set; never a 500."""
from __future__ import annotations

import httpx
import pytest

MODEL = "smollm2-135m-instruct"
OK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def post(server, body, path="/v1/chat/completions", **kw):
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def assert_error(r, status, param):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


@pytest.mark.parametrize("field, value, param", [
    ("max_tokens", -1, "max_tokens"),
    ("top_p", 1.5, "top_p"),
    ("n", 0, "n"),
    ("temperature", "hot", "temperature"),
    ("model", "no-such-model", "model"),
    ("messages", [], "messages"),
    ("tools", [{"type": "function", "function": {"name": "f"}}], "tools"),
    ("response_format", {"type": "json_object"}, "response_format.type"),
    ("ffn_skip", {"budget": 0.99}, "ffn_skip.budget"),
    ("logit_bias", {"999999": 1}, "logit_bias"),
])
def test_bad_values_are_400_with_param(server, field, value, param):
    assert_error(post(server, {**OK, field: value}), 400, param)


def test_prompt_longer_than_context_is_400(server):
    long = "word " * 5000
    assert_error(post(server, {**OK, "messages": [{"role": "user", "content": long}]}), 400, "messages")
    assert_error(post(server, {"model": MODEL, "prompt": long, "max_tokens": 2}, "/v1/completions"), 400, "prompt")


def test_max_tokens_past_the_context_window_is_400(server):
    assert_error(post(server, {**OK, "max_tokens": 10**6}), 400, "max_tokens")


def test_invalid_json_is_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert_error(r, 400, None)


def test_unknown_route_is_404_envelope(server):
    r = httpx.get(server.url + "/v1/nothing-here")
    assert_error(r, 404, None)
