"""Bad input gets a 4xx in the OpenAI error envelope with `param` set; never a 500."""
from __future__ import annotations

import json

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
    ("max_completion_tokens", 0, "max_completion_tokens"),
    ("top_p", 1.5, "top_p"),
    ("n", 0, "n"),
    ("temperature", "hot", "temperature"),
    ("messages", [], "messages"),
    ("functions", [{"name": "f"}], "functions"),  # the legacy field: tools replace it
    ("response_format", {"type": "xml"}, "response_format.type"),
    ("ffn_skip", {"budget": 0.99}, "ffn_skip.budget"),
    ("logit_bias", {"999999": 1}, "logit_bias"),
    ("logit_bias", {" 5": 1}, "logit_bias"),  # int() took these three as 5, 50 and 3
    ("logit_bias", {"5_0": 1}, "logit_bias"),
    ("logit_bias", {"\u0663": 1}, "logit_bias"),
    ("repetition_penalty", 1e-46, "repetition_penalty"),  # 0 in float32: logits divided by it were inf, a 500
    ("stream_options", {"include_usage": True}, "stream_options"),  # without stream: true (as OpenAI, vLLM)
    # a value that matched none of a union's shapes: named from inside the shape it was sent in
    ("messages", [{"role": "user", "content": [{"type": "text", "text": "a", "lang": "en"}]}], "messages.0.content.0.lang"),
    ("tool_choice", {"type": "function", "name": "f"}, "tool_choice.name"),  # the Responses API's shape
])
def test_bad_values_are_400_with_param(server, field, value, param):
    assert_error(post(server, {**OK, field: value}), 400, param)


def test_a_body_nested_too_deeply_is_400(server):
    """Nesting Python's recursion could not walk (the body's text check once recursed: a 500)."""
    deep = "[" * 1500 + "]" * 1500
    raw = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "metadata": %s}' % (MODEL, deep)
    r = httpx.post(server.url + "/v1/chat/completions", content=raw.encode(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert_error(r, 400, None)


def test_a_temperature_too_small_to_divide_by_samples_greedily(server):
    greedy = post(server, {**OK, "temperature": 0, "max_tokens": 8})
    tiny = post(server, {**OK, "temperature": 1e-40, "max_tokens": 8})  # 0 in float32: NaN weights once
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


def test_a_batch_of_prompts_counts_each_choice_against_the_queue(server):
    """80 prompts x n = 16 would be 1,280 sequences in a queue of 80 (16 rows + 64 waiting)."""
    body = {"model": MODEL, "prompt": ["hi"] * 80, "n": 16, "max_tokens": 1}
    r = post(server, body, "/v1/completions")
    assert_error(r, 400, "prompt")
    assert "at most 5 prompts a request with n = 16" in r.json()["error"]["message"]


def assert_context_exceeded(r, param):
    """OpenAI's code and words, which clients (LiteLLM, agents that trim a conversation) key on."""
    assert_error(r, 400, param)
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded", err
    assert err["message"].startswith("This model's maximum context length is 2048 tokens. However, "), err


def test_prompt_longer_than_context_is_400(server):
    long = "word " * 5000
    assert_context_exceeded(post(server, {**OK, "messages": [{"role": "user", "content": long}]}), "messages")
    assert_context_exceeded(post(server, {"model": MODEL, "prompt": long, "max_tokens": 2}, "/v1/completions"), "prompt")


def test_max_tokens_past_the_context_window_is_400_naming_the_field_given(server):
    assert_context_exceeded(post(server, {**OK, "max_tokens": 10**6}), "max_tokens")
    r = post(server, {**OK, "max_completion_tokens": 10**6})
    assert_context_exceeded(r, "max_completion_tokens")
    assert "in max_completion_tokens)" in r.json()["error"]["message"]


def test_invalid_json_is_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert_error(r, 400, None)


def test_unknown_route_is_404_envelope(server):
    r = httpx.get(server.url + "/v1/nothing-here")
    assert_error(r, 404, None)
    assert "did you mean" not in r.json()["error"]["message"]


def test_a_method_the_route_does_not_take_is_405_with_allow(server):
    r = httpx.get(server.url + "/v1/chat/completions")
    assert_error(r, 405, None)
    assert r.headers["allow"] == "POST"  # (RFC 9110: a 405 lists the methods the route takes)


@pytest.mark.parametrize("path", ["/chat/completions", "/v1//chat/completions", "//v1/chat/completions"])
def test_a_route_asked_without_v1_or_with_slashes_doubled_names_the_one_meant(server, path):
    """A client's base URL without /v1 is the commonest setup mistake: a bare 404 did not say so."""
    r = post(server, OK, path)
    assert_error(r, 404, None)
    assert "did you mean /v1/chat/completions?" in r.json()["error"]["message"]


def test_health_answers_head_for_probes_that_read_only_the_status(server):
    assert httpx.head(server.url + "/health").status_code == 200


def test_unknown_model_is_404_model_not_found(server):
    """As OpenAI and vLLM answer; /tokenize too."""
    r = post(server, {**OK, "model": "no-such-model"})
    assert_error(r, 404, "model")
    assert r.json()["error"]["code"] == "model_not_found"
    assert_error(post(server, {"model": "no-such-model", "prompt": "hi"}, "/tokenize"), 404, "model")
    assert_error(post(server, {"model": "no-such-model", "tokens": [1]}, "/detokenize"), 404, "model")
    assert_error(httpx.get(server.url + "/v1/models/org/no-such-model"), 404, "model")


@pytest.mark.parametrize("tokens,param", [([1, -1], "tokens"), ([10 ** 9], "tokens"), ([1.5], "tokens.0"),
                                          (["1"], "tokens.0"), (None, "tokens")])
def test_detokenize_takes_only_token_ids_of_the_vocabulary(server, tokens, param):
    assert_error(post(server, {"tokens": tokens}, "/detokenize"), 400, param)


@pytest.mark.parametrize("body", [[1, 2], "text", 3, None])
def test_a_body_that_is_not_a_json_object_says_so(server, body):
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(body),
                   headers={"content-type": "application/json"}, timeout=30)
    assert_error(r, 400, None)
    assert "JSON object" in r.json()["error"]["message"]


def test_a_prompt_caching_mark_on_a_part_or_message_is_taken_and_ignored(server):
    """Anthropic's cache_control, which LiteLLM and coding agents pass on to OpenAI-compatible
    servers, was a 400 blaming the content ("Input should be a valid string")."""
    mark = {"type": "ephemeral"}
    message = {"role": "user", "content": [{"type": "text", "text": "Say hi", "cache_control": mark}],
               "cache_control": mark}
    r = post(server, {**OK, "messages": [message]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_non_text_content_parts_say_the_model_takes_text_only(server):
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    r = post(server, {**OK, "messages": [{"role": "user", "content": [part]}]})
    assert_error(r, 400, "messages.0.content")
    assert "text only" in r.json()["error"]["message"]


def test_an_earlier_answers_refusal_part_is_history_and_only_an_assistants(server):
    """The SDK's assistant content may hold a refusal part (OpenAI takes it back in the history):
    it was a 400 ("content parts of type 'refusal' are not supported"). It reads as that turn's text."""
    ask = {"role": "user", "content": "Say hi"}
    refused = {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]}
    said = {"role": "assistant", "content": "I can't."}
    tokens = [post(server, {"messages": [ask, said, ask]}, "/tokenize").json()["tokens"],
              post(server, {"messages": [ask, refused, ask]}, "/tokenize").json()["tokens"]]
    assert tokens[0] == tokens[1]
    assert post(server, {**OK, "messages": [ask, refused, ask]}).status_code == 200
    r = post(server, {**OK, "messages": [{"role": "user", "content": refused["content"]}]})
    assert_error(r, 400, "messages.0.content")


def test_a_developer_message_is_the_system_prompt_and_tokenize_takes_no_empty_chat(server):
    """SmolLM2's template has no developer role: such a message was printed as a turn of its own,
    after the template's default system prompt. /tokenize took `messages: []`, which chat refuses."""
    chat = lambda role: [{"role": role, "content": "Be brief."}, {"role": "user", "content": "hi"}]  # noqa: E731
    tokens = [post(server, {"messages": chat(role)}, "/tokenize").json()["tokens"] for role in ("developer", "system")]
    assert tokens[0] == tokens[1]
    assert_error(post(server, {"messages": []}, "/tokenize"), 400, "messages")


SURROGATE = "\\ud800"  # JSON text of a lone UTF-16 surrogate: valid JSON, not valid Unicode text


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "a%sb"}]}' % (MODEL, SURROGATE),
     "messages.0.content"),
    ("/v1/chat/completions", '{"model": "x%s", "messages": [{"role": "user", "content": "hi"}]}' % SURROGATE, "model"),
    ("/v1/completions", '{"model": "%s", "prompt": "%s"}' % (MODEL, SURROGATE), "prompt"),
    ("/v1/completions", '{"model": "%s", "prompt": "hi", "stop": ["%s"]}' % (MODEL, SURROGATE), "stop.0"),
    ("/tokenize", '{"prompt": "%s"}' % SURROGATE, "prompt"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "%s"}]}' % SURROGATE, "messages.0.content"),
])
def test_lone_surrogates_are_400(server, path, raw, param):
    r = httpx.post(server.url + path, content=raw.encode(), headers={"content-type": "application/json"}, timeout=30)
    assert_error(r, 400, param)
    assert "surrogate" in r.json()["error"]["message"]


@pytest.mark.parametrize("seed, n", [(2**70, 1), (2**64 - 1, 2), (-(2**63) - 1, 1), (2**63, 1)])
def test_seeds_outside_int64_are_400(server, seed, n):
    assert_error(post(server, {**OK, "temperature": 1, "seed": seed, "n": n}), 400, "seed")


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
def test_int64_edge_seeds_sample(server, seed):
    """The extremes of int64 are valid seeds, also with n = 2 (choice i samples with seed + i). EOS is
    ignored: a seed draws the same numbers on every device, but the logits it draws from differ
    between the CPU and CUDA."""
    r = post(server, {**OK, "temperature": 1, "seed": seed, "n": 2, "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert [c["finish_reason"] for c in r.json()["choices"]] == ["length", "length"]


def test_stop_strings_are_bounded(server):
    from engine.sampling_params import MAX_STOP_CHARS

    assert_error(post(server, {**OK, "stop": ["x" * (MAX_STOP_CHARS + 1)]}), 400, "stop")
    assert post(server, {**OK, "stop": ["x" * MAX_STOP_CHARS]}).status_code == 200


def test_openai_fields_that_change_nothing_here_are_taken(server):
    """What SDKs and agent frameworks send beside a chat request (`store=False`, `metadata=...`,
    `service_tier="auto"`, ...) is taken, null or set, as /v1/responses takes it."""
    hints = {"metadata": {"user": "u1"}, "store": False, "service_tier": "auto", "prompt_cache_key": "k",
             "prompt_cache_retention": "24h", "safety_identifier": "s", "modalities": ["text"], "stream_options": {"include_obfuscation": False},
             "prediction": {"type": "content", "content": "hello"}, "stream": True,
             "spaces_between_special_tokens": False}
    for field, value in hints.items():
        body = {**OK, field: value, **({"stream": True} if field == "stream_options" else {})}
        for sent in (value, None):
            r = post(server, {**body, field: sent})
            assert r.status_code == 200, (field, sent, r.text)
    for field in ("reasoning_effort", "verbosity", "audio", "web_search_options"):
        assert post(server, {**OK, field: None}).status_code == 200, field


@pytest.mark.parametrize("field, value, words", [
    ("reasoning_effort", "low", "reads no reasoning effort"),  # (the embedded model's template)
    ("reasoning_effort", "extreme", "reasoning_effort"),
    ("audio", {"voice": "alloy", "format": "wav"}, "text only"),
    ("modalities", ["text", "audio"], "modalities"),
    ("service_tier", "flex", "service_tier"),
    ("metadata", {"k": "v" * 513}, "metadata"),
    ("web_search_options", {}, "web search"),
])
def test_openai_fields_this_model_cannot_honour_say_why(server, field, value, words):
    r = post(server, {**OK, field: value})
    assert_error(r, 400, field)
    assert words in r.json()["error"]["message"]


@pytest.mark.parametrize("field, value", [
    ("temperature", "0.5"), ("top_p", "1"), ("n", "2"), ("seed", "7"), ("max_tokens", 5.0),
    ("presence_penalty", True), ("logit_bias", {"1": "5"}),
])
def test_numbers_sent_as_strings_or_booleans_are_refused_alike(server, field, value):
    """One rule for every numeric field, OpenAI's: a string is no number (temperature took "0.5")."""
    assert_error(post(server, {**OK, field: value}), 400, field if field != "logit_bias" else "logit_bias.1")


@pytest.mark.parametrize("message, words", [
    ({"role": "assistant", "content": None}, "an assistant message needs content or tool_calls"),
    ({"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}, "function_call"),
    ({"role": "user", "content": [{"type": "text"}]}, "needs its text"),
    ({"role": "user", "content": None}, "a user message needs content"),
])
def test_messages_without_their_content_say_what_is_missing(server, message, words):
    r = post(server, {**OK, "messages": [{"role": "user", "content": "hi"}, message]})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_a_body_missing_or_sent_as_a_form_says_what_to_send(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30)
    assert_error(r, 400, None)
    assert "no body" in r.json()["error"]["message"]
    # curl -d without -H 'Content-Type: application/json' sends a form's type
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(OK).encode(), timeout=30,
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert_error(r, 400, None)
    assert "Content-Type: application/json" in r.json()["error"]["message"]


def test_an_unknown_stored_response_is_404_even_asked_as_a_stream(server):
    r = httpx.get(server.url + "/v1/responses/resp_unknown", params={"stream": "true"}, timeout=30)
    assert r.status_code == 404, r.text


def test_a_prompt_that_fills_the_context_says_room_is_needed_after_it(server):
    r = post(server, {"model": MODEL, "prompt": "hello " * 2047, "max_tokens": 1}, "/v1/completions")
    assert_error(r, 400, "prompt")
    assert "1 more must fit after it" in r.json()["error"]["message"]


def test_tokenize_takes_add_special_tokens_and_detokenize_keeps_special_tokens(server):
    tok = lambda body: post(server, body, "/tokenize")  # noqa: E731
    assert tok({"prompt": "hi", "add_special_tokens": False}).status_code == 200  # SmolLM2 adds no BOS either way
    # with messages as chat takes it (vLLM's: the tokenizer's special tokens on top of the template's;
    # SmolLM2's adds none: tests/test_gemma3.py sees Gemma's BOS twice)
    assert tok({"messages": [{"role": "user", "content": "hi"}], "add_special_tokens": True}).status_code == 200
    chat = tok({"messages": [{"role": "user", "content": "hi"}], "add_special_tokens": False}).json()["tokens"]
    text = post(server, {"tokens": chat}, "/detokenize").json()["prompt"]
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert tok({"prompt": text, "add_special_tokens": False}).json()["tokens"] == chat  # the round trip holds
    spelled = tok({"prompt": "hello world", "return_token_strs": True}).json()  # vLLM's: the vocabulary's spellings
    assert len(spelled["token_strs"]) == len(spelled["tokens"]) >= 2
    assert "".join(spelled["token_strs"]).replace("\u0120", " ") == "hello world"  # byte-level BPE's space
    assert "token_strs" not in tok({"prompt": "hello world"}).json()


def test_a_suffix_needs_a_model_with_fill_in_the_middle_tokens(server):
    """The embedded SmolLM2 has no FIM tokens: a suffix is refused by name (null is no suffix), and
    so is a suffix beside echo (the answer would be the middle alone)."""
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    assert post(server, {**body, "suffix": None}, "/v1/completions").status_code == 200
    r = post(server, {**body, "suffix": " world"}, "/v1/completions")
    assert_error(r, 400, "suffix")
    assert "fill-in-the-middle tokens" in r.json()["error"]["message"]
    assert_error(post(server, {**body, "suffix": " world", "echo": True}, "/v1/completions"), 400, "suffix")


def test_text_parts_are_joined_one_per_line_as_vllm_joins_them(server):
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    as_parts = post(server, {"messages": [{"role": "user", "content": parts}]}, "/tokenize").json()["tokens"]
    as_text = post(server, {"messages": [{"role": "user", "content": "Hi\nthere"}]}, "/tokenize").json()["tokens"]
    assert as_parts == as_text


def test_completions_best_of_below_n_is_a_400(server):
    """As OpenAI and vLLM refuse it: best_of is how many are made, n how many of them are answered."""
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "best_of": 1}
    r = httpx.post(server.url + "/v1/completions", json={**body, "n": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of", r.text
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
