"""The /v1 surface through the official openai SDK against a real server process."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from engine.config import EngineConfig
from tests.conftest import cpu_path_only, cuda_available
from tests.helpers import wait_idle

MODEL = "smollm2-135m-instruct"
MSG = [{"role": "user", "content": "Name three colors of the rainbow."}]


def chat(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=kw.pop("messages", MSG), **kw)


def test_chat_completion_shape_and_usage(client):
    r = chat(client, max_tokens=20, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert r.system_fingerprint and r.created > 0
    assert r.choices[0].index == 0 and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 0 < u.completion_tokens <= 20
    skip = u.model_extra["ffn_skip"]
    assert skip["total"] == 30 * u.completion_tokens and skip["skipped"] == 0


def test_every_answer_carries_a_request_id_as_openais_do(client, server):
    """`x-request-id`: the SDK's `_request_id` and its errors' `request_id`; a client's own usable id
    comes back, an unusable one is replaced; the message's optional fields are there, as OpenAI's."""
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=2)
    r = raw.parse()
    assert r._request_id.startswith("req_") and len(r._request_id) == 36
    assert r.choices[0].message.refusal is None and r.choices[0].message.annotations == []
    other = chat(client, max_tokens=2)
    assert other._request_id.startswith("req_") and other._request_id != r._request_id
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=MSG, max_tokens=2)
    assert caught.value.request_id.startswith("req_")
    mine = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 1},
                      headers={"x-request-id": "trace-42:a.b"})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "trace-42:a.b"
    odd = httpx.get(server.url + "/v1/models", headers={"x-request-id": "x" * 200})
    assert odd.headers["x-request-id"].startswith("req_")
    first = next(iter(chat(client, max_tokens=2, stream=True)))
    assert first.choices[0].delta.refusal is None and "refusal" in first.choices[0].delta.model_fields_set


def test_vllms_request_id_names_the_answer_and_an_x_request_id_header_wins(server):
    """vLLM's `request_id` field: the answer's id is chatcmpl-<it> (cmpl-<it> on completions, in every
    streamed chunk too); a usable x-request-id header names it first, as vLLM reads it; two requests
    under one name are still two requests."""
    body = {"model": MODEL, "messages": MSG, "max_tokens": 2, "request_id": "rollout-7"}
    named = [httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60) for _ in range(2)]
    assert [r.json()["id"] for r in named] == ["chatcmpl-rollout-7"] * 2
    assert all(r.json()["usage"]["completion_tokens"] == 2 for r in named)
    header = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"x-request-id": "trace-9"}, timeout=60)
    assert header.json()["id"] == "chatcmpl-trace-9"
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True, "request_id": "c1"}) as r:
        ids = {json.loads(line[6:])["id"] for line in r.iter_lines() if line.startswith("data: {")}
    assert ids == {"cmpl-c1"}
    plain = httpx.post(server.url + "/v1/chat/completions", json=dict(body, request_id=None), timeout=60).json()
    assert plain["id"].startswith("chatcmpl-") and len(plain["id"]) == 41
    for bad in ("", "x" * 257, 5):
        r = httpx.post(server.url + "/v1/chat/completions", json=dict(body, request_id=bad), timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "request_id"


def test_sagemakers_ping_and_invocations_route_by_the_body(server):
    """Amazon SageMaker's routes, as vLLM serves them: /ping is /health; /invocations answers a body
    with `messages` as chat, with `prompt` as completions, with `input` as embeddings."""
    assert httpx.get(server.url + "/ping").json() == {"status": "ok"}
    assert httpx.post(server.url + "/ping").status_code == 200
    post = lambda body: httpx.post(server.url + "/invocations", json=dict(body, model=MODEL), timeout=60)  # noqa: E731
    chat_answer = post({"messages": MSG, "max_tokens": 2, "ignore_eos": True}).json()
    assert chat_answer["object"] == "chat.completion" and chat_answer["usage"]["completion_tokens"] == 2
    assert post({"prompt": "Hi", "max_tokens": 2}).json()["object"] == "text_completion"
    vectors = post({"input": ["a", "b"]}).json()
    assert vectors["object"] == "list" and len(vectors["data"]) == 2
    with httpx.stream("POST", server.url + "/invocations", timeout=60, json={
            "model": MODEL, "messages": MSG, "max_tokens": 2, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["object"] == "chat.completion.chunk"
    bad = post({"messages": MSG, "max_tokens": "2"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    neither = post({"text": "Hi"})
    assert neither.status_code == 400 and "messages" in neither.json()["error"]["message"]
    json_type = {"content-type": "application/json"}
    for body in (b"[1]", b"[" * 100000, b"{"):  # not an object, nested past the parser, not JSON
        r = httpx.post(server.url + "/invocations", content=body, headers=json_type, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    form = httpx.post(server.url + "/invocations", content=b'{"prompt": "Hi"}', timeout=30,
                      headers={"content-type": "text/plain"})  # (as a web page may post it cross-origin)
    assert form.status_code == 400 and "Content-Type" in form.json()["error"]["message"]
    both = post({"messages": MSG, "prompt": "Hi"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "prompt"
    unnamed = httpx.post(server.url + "/invocations", json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
    assert unnamed.status_code == 200 and unnamed.json()["model"] == MODEL  # SageMaker's bodies name no model


def test_beam_search_is_refused_by_name_and_its_off_switch_taken(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    on = httpx.post(server.url + "/v1/completions", json=dict(body, use_beam_search=True), timeout=60)
    assert on.status_code == 400 and on.json()["error"]["param"] == "use_beam_search"
    assert "beam search is not supported" in on.json()["error"]["message"]
    off = httpx.post(server.url + "/v1/completions", json=dict(body, use_beam_search=False, length_penalty=1.0),
                     timeout=60)
    assert off.status_code == 200, off.text


def test_a_request_naming_no_model_is_answered_by_the_served_model(server):
    """As vLLM and llama-server answer it (OpenAI's clients always send a model)."""
    for route, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
                        ("/v1/completions", {"prompt": "Hi", "max_tokens": 4}),
                        ("/v1/responses", {"input": "Hi", "max_output_tokens": 16}),
                        ("/v1/embeddings", {"input": "Hi"}),
                        ("/v1/score", {"text_1": "Hi", "text_2": "Hello"}),
                        ("/v1/rerank", {"query": "Hi", "documents": ["Hello"]})):
        for named in ({}, {"model": ""}):  # (left out, or empty)
            r = httpx.post(server.url + route, json=body | named, timeout=60)
            assert r.status_code == 200 and r.json()["model"] == MODEL, (route, named, r.text)
    for route, body in (("/completion", {"prompt": "Hi", "n_predict": 2}), ("/apply-template", {"messages": [{"role": "user", "content": "Hi"}]}),
                        ("/tokenize", {"content": "Hi"}), ("/detokenize", {"tokens": [28]}),
                        ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
                        ("/tokenize", {"inputs": "Hi"})):  # llama.cpp's and TGI's routes, which name no model
        r = httpx.post(server.url + route, json=body | {"model": ""}, timeout=60)
        assert r.status_code == 200, (route, r.text)


def test_streamed_text_equals_non_streamed_text(client):
    full = chat(client, max_tokens=40, temperature=0).choices[0].message.content
    chunks = list(chat(client, max_tokens=40, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in chunks)  # no usage unless asked for


def test_stream_include_usage_sends_a_final_usage_chunk(client):
    chunks = list(chat(client, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and 0 < last.usage.completion_tokens <= 8
    assert last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_continuous_usage_stats_put_each_choices_usage_so_far_on_its_chunks(client, route):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries its choice's usage so far
    (its prompt's tokens, the tokens that choice has made), as vLLM counts it; the final chunk the
    request's whole usage."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    if route == "chat":
        chunks = list(chat(client, max_tokens=8, temperature=0, stream=True, stream_options=options, n=2))
        sizes = [chunks[-1].usage.prompt_tokens]
    else:
        prompts = [[504, 3458, 282], [504, 3458, 282, 4649, 314, 2752]]  # two prompts of their own sizes
        chunks = list(client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0,
                                                stream=True, stream_options=options, n=2))
        sizes = [len(p) for p in prompts]
    final = chunks[-1].usage
    assert chunks[-1].choices == [] and final.prompt_tokens == sum(sizes)
    made = {}
    for c in chunks[:-1]:
        (choice,) = c.choices
        assert c.usage.prompt_tokens == sizes[choice.index // 2]
        assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
        assert c.usage.completion_tokens >= made.get(choice.index, 0)  # counting up, choice by choice
        made[choice.index] = c.usage.completion_tokens
    assert sorted(made) == list(range(2 * len(sizes))) and sum(made.values()) == final.completion_tokens
    without = list(client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=2, stream=True,
                                             stream_options={"include_usage": True, "continuous_usage_stats": False}))
    assert all(c.usage is None for c in without[:-1]) and without[-1].usage.completion_tokens == 2


def test_max_tokens_gives_finish_reason_length(client):
    r = chat(client, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = chat(client, max_completion_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_stop_string_is_not_emitted(client):
    full = chat(client, max_tokens=30, temperature=0).choices[0].message.content
    stop = full[6:10]
    r = chat(client, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_n2_returns_two_choices(client):
    r = chat(client, max_tokens=12, temperature=1.0, seed=3, n=2, logprobs=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)


def test_seed_reproducible_through_the_api(client):
    a = chat(client, max_tokens=16, temperature=1.0, seed=99).choices[0].message.content
    b = chat(client, max_tokens=16, temperature=1.0, seed=99).choices[0].message.content
    c = chat(client, max_tokens=16, temperature=1.0, seed=100).choices[0].message.content
    assert a == b and a != c


def test_chat_logprobs_and_top_logprobs(client):
    r = chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        # greedy picks a most likely token (on CUDA logits are bf16-rounded: two may tie, and topk
        # may list the other one first)
        assert entry.top_logprobs[0].logprob == entry.logprob


@cpu_path_only  # the greedy answer is a row of emoji on the CPU path
def test_logprobs_bytes_put_characters_split_over_tokens_back_together(client):
    """Each token's own bytes (an emoji is 4 tokens of one byte each here), as OpenAI documents them;
    the tokens' texts alone are each U+FFFD."""
    r = chat(client, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2,
             messages=[{"role": "user", "content": "Write three emoji."}])
    text, content = r.choices[0].message.content, r.choices[0].logprobs.content
    assert any(ord(ch) > 0x7F for ch in text)
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="ignore") == text
    for entry in content:
        assert all(bytes(t.bytes).decode("utf-8", errors="replace") == t.token or t.token == "\ufffd"
                   for t in entry.top_logprobs)


def test_completions_route_streaming_and_not(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    lp = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=3, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.tokens) == 3 and len(lp.choices[0].logprobs.top_logprobs[0]) == 2


def test_completions_top_logprobs_hold_the_chosen_token_besides_the_likeliest(client):
    """As OpenAI's completions: up to `logprobs` + 1 entries, the sampled token always among them."""
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=2.0, seed=7,
                                  logprobs=1)
    lp = r.choices[0].logprobs
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == logprob and len(top) in (1, 2)
    assert any(len(top) == 2 for top in lp.top_logprobs)  # at temperature 2 some token is not the likeliest


def test_return_tokens_as_token_ids_labels_logprobs_with_the_answers_token_ids(server, client):
    """vLLM's `return_tokens_as_token_ids`: each logprob entry's token is "token_id:<id>", streamed
    or not, on chat and completions; the ids are the answer's tokens (re-decoded to its text)."""
    ids = {"return_tokens_as_token_ids": True}
    r = chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, extra_body=ids)
    content = r.choices[0].logprobs.content
    tokens = [int(e.token.removeprefix("token_id:")) for e in content]
    assert all(e.token.startswith("token_id:") and bytes(e.bytes).decode() == e.token for e in content)
    assert all(t.token.startswith("token_id:") for e in content for t in e.top_logprobs)
    text = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": tokens}, timeout=30).json()
    assert text["prompt"] == r.choices[0].message.content
    streamed = [c.choices[0].logprobs for c in chat(client, max_tokens=6, temperature=0, logprobs=True, stream=True,
                                                    extra_body=ids) if c.choices and c.choices[0].logprobs]
    assert [e.token for lp in streamed for e in lp.content] == [e.token for e in content]
    c = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=3, temperature=0, logprobs=2,
                                  extra_body=ids)
    lp = c.choices[0].logprobs
    assert all(t.startswith("token_id:") for t in lp.tokens)
    assert all(top[t] == p for t, p, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    assert all(k.startswith("token_id:") for top in lp.top_logprobs for k in top)
    assert lp.text_offset[-1] < len(c.choices[0].text)  # offsets still count the text
    plain = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=3, temperature=0, logprobs=2)
    assert plain.choices[0].text == c.choices[0].text and not plain.choices[0].logprobs.tokens[0].startswith("token_id")


def test_chat_echo_gives_back_the_continued_messages_text_first(client):
    """vLLM's `echo` on chat: with continue_final_message the answer starts with the assistant text it
    continues, streamed or not; after a user message there is nothing to echo."""
    messages = [{"role": "user", "content": "Count to ten."}, {"role": "assistant", "content": "1, 2, 3,"}]
    kw = dict(messages=messages, max_tokens=6, temperature=0,
              extra_body={"continue_final_message": True, "add_generation_prompt": False})
    plain = chat(client, **kw).choices[0].message.content
    echoed = chat(client, **dict(kw, extra_body={**kw["extra_body"], "echo": True})).choices[0].message.content
    assert echoed.startswith("1, 2, 3,") and len(echoed) > len("1, 2, 3,")
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(
        client, stream=True, **dict(kw, extra_body={**kw["extra_body"], "echo": True})) if c.choices)
    assert streamed.startswith("1, 2, 3,")
    if not cuda_available():  # the same answer each time on the CPU path (cached prompt or not)
        assert echoed == "1, 2, 3," + plain == streamed
    after_user = chat(client, max_tokens=3, temperature=0, extra_body={"echo": True}).choices[0].message.content
    assert after_user == chat(client, max_tokens=3, temperature=0).choices[0].message.content or cuda_available()
    # no new assistant turn opened: the answer goes on in the final message's role, whose text it echoes
    user_turn = chat(client, max_tokens=3, temperature=0, extra_body={"echo": True, "add_generation_prompt": False})
    assert user_turn.choices[0].message.content.startswith(MSG[-1]["content"])


def test_async_client_concurrent_requests(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(*[client.chat.completions.create(
            model=MODEL, messages=MSG, max_tokens=10, temperature=0) for _ in range(3)])
        stream = await client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=10,
                                                      temperature=0, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return rs, text

    rs, text = asyncio.run(main())
    assert all(0 < r.usage.completion_tokens <= 10 and r.choices[0].message.content for r in rs) and text
    if not cuda_available():  # batched vs solo text bit for bit: what the CPU path promises (conftest.cpu_path_only)
        assert len({r.choices[0].message.content for r in rs}) == 1
        assert text == rs[0].choices[0].message.content


COUNTING = "1, 2, 3, 4,"  # greedy goes on " 5, 6, 7, ..."


def count_on(client, **extra):
    r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=12, temperature=0, extra_body=extra)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens


def test_special_tokens_text_is_left_out_unless_skip_special_tokens_is_false(server, client):
    """vLLM's `skip_special_tokens`: a special token the model writes (here forced by logit_bias:
    SmolLM2's <|im_start|>, special, not an end) adds no text by default, its own with false."""
    start = httpx.post(server.url + "/tokenize", json={"prompt": "<|im_start|>"}, timeout=30).json()["tokens"]
    assert len(start) == 1
    force = {"logit_bias": {str(start[0]): 100}}
    plain = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=3, temperature=0, extra_body=force)
    kept = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=3, temperature=0,
                                     extra_body={**force, "skip_special_tokens": False})
    assert plain.usage.completion_tokens == kept.usage.completion_tokens == 3
    assert plain.choices[0].text == "" and kept.choices[0].text == "<|im_start|>" * 3
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          temperature=0, extra_body={**force, "skip_special_tokens": False})
    assert chat.choices[0].message.content == "<|im_start|>" * 2


def test_stop_token_ids_stop_strings_kept_and_min_tokens_as_vllm_takes_them(server, client):
    text, _, _ = count_on(client)
    assert text.startswith(" 5, 6, 7")
    comma = httpx.post(server.url + "/tokenize", json={"prompt": ","}, timeout=30).json()["tokens"]
    assert len(comma) == 1
    assert count_on(client, stop_token_ids=comma)[:2] == (" 5", "stop")
    assert count_on(client, stop_token_ids=comma, include_stop_str_in_output=True)[:2] == (" 5,", "stop")
    assert client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=12, temperature=0, stop=[","],
                                     extra_body={"include_stop_str_in_output": True}).choices[0].text == " 5,"
    # min_tokens: a stop token may not be drawn before the answer's 4th token (vLLM masks it), and a
    # stop string completed before then is passed over
    text, _, tokens = count_on(client, stop_token_ids=comma, min_tokens=4)
    assert tokens >= 4 and not text.startswith(" 5,")
    r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=12, temperature=0, stop=[","],
                                  extra_body={"min_tokens": 4})
    assert r.choices[0].text == " 5, 6"  # " ", "5", "," (3 tokens: passed over), " ", "6", ","


def test_stop_reason_names_the_stop_string_or_token_that_ended_the_answer(server, client):
    """vLLM's `stop_reason` beside finish_reason: the stop string that matched (of several, the one that
    completed first), the stop token's id, null for an end of turn or a cut at max_tokens; streamed,
    on the chunk that finishes."""
    comma = httpx.post(server.url + "/tokenize", json={"prompt": ","}, timeout=30).json()["tokens"]
    r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=12, temperature=0, stop=["9", ", 6"])
    assert r.choices[0].text == " 5" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == ", 6"
    r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=12, temperature=0,
                                  extra_body={"stop_token_ids": comma})
    assert r.choices[0].model_extra["stop_reason"] == comma[0]
    r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].model_extra["stop_reason"] is None
    ended = chat(client, max_tokens=200, temperature=0)
    assert ended.choices[0].finish_reason == "stop" and ended.choices[0].model_extra["stop_reason"] is None
    chunks = list(client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=12, temperature=0,
                                            stop=[", 7"], stream=True))
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert last.choices[0].model_extra["stop_reason"] == ", 7"
    assert all("stop_reason" not in c.choices[0].model_extra for c in chunks if c.choices and not c.choices[0].finish_reason)


def test_min_tokens_holds_off_the_end_of_turn(client):
    question = [{"role": "user", "content": "Answer with one word: is the sky blue?"}]
    short = chat(client, messages=question, max_tokens=64, temperature=0)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 48
    at_least = short.usage.completion_tokens + 16
    longer = chat(client, messages=question, max_tokens=64, temperature=0, extra_body={"min_tokens": at_least})
    assert longer.usage.completion_tokens >= at_least


@pytest.mark.parametrize("extra, param", [({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
                                          ({"min_tokens": -1}, "min_tokens"),
                                          ({"stop_token_ids": [10 ** 9]}, "stop_token_ids"),
                                          ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
                                          ({"stop_token_ids": ["1"]}, "stop_token_ids.0")])
def test_vllm_stop_fields_out_of_range_are_400s(server, extra, param):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", **extra}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def tokenize_chat(server, messages, **options):
    return httpx.post(server.url + "/tokenize", json={"messages": messages, **options}, timeout=30).json()["tokens"]


def test_continue_final_message_leaves_the_assistants_turn_open_for_the_model(server, client):
    """vLLM's chat extras: the prompt ends with the final message's own text (no end of turn, no
    new turn) and the answer continues it; the same prompt as token ids on /v1/completions gives the
    same greedy continuation."""
    started = [*MSG, {"role": "assistant", "content": "The first color is "}]
    tokens = tokenize_chat(server, started, continue_final_message=True)
    text = httpx.post(server.url + "/detokenize", json={"tokens": tokens}, timeout=30).json()["prompt"]
    # its trailing space cut; /detokenize keeps the template's special tokens
    assert text.endswith("Name three colors of the rainbow.<|im_end|>\n<|im_start|>assistant\nThe first color is")
    r = client.chat.completions.create(model=MODEL, messages=started, max_tokens=6, temperature=0,
                                       extra_body={"continue_final_message": True})
    assert r.usage.prompt_tokens == len(tokens) and r.choices[0].message.content
    if not cuda_available():  # a cached prompt's bf16 tail may pick another near-tie token on CUDA
        plain = client.completions.create(model=MODEL, prompt=tokens, max_tokens=6, temperature=0)
        assert r.choices[0].message.content == plain.choices[0].text


def test_add_generation_prompt_false_ends_the_prompt_after_the_messages(server):
    opened, closed = tokenize_chat(server, MSG), tokenize_chat(server, MSG, add_generation_prompt=False)
    assert len(closed) < len(opened) and opened[:len(closed)] == closed
    r = httpx.post(server.url + "/tokenize", json={"prompt": "hi", "add_generation_prompt": False}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "add_generation_prompt"  # a chat field


@pytest.mark.parametrize("options, messages, param", [
    ({"continue_final_message": True, "add_generation_prompt": True}, MSG, "continue_final_message"),
    ({"continue_final_message": True}, [*MSG, {"role": "assistant", "content": "  "}], "messages"),
    ({"chat_template_kwargs": {"messages": [], "eos_token": "x"}}, MSG, "chat_template_kwargs"),
    ({"chat_template_kwargs": ["not", "an", "object"]}, MSG, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"range": 3, "namespace": 1}}, MSG, "chat_template_kwargs"),  # jinja's own globals
])
def test_chat_templating_options_that_cannot_hold_are_400s(server, options, messages, param):
    for path, body in (("/v1/chat/completions", {"model": MODEL, "max_tokens": 2}), ("/tokenize", {})):
        r = httpx.post(server.url + path, json={**body, "messages": messages, **options}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_null_for_a_field_with_a_default_takes_the_default(server):
    """OpenAI's schema types these fields "... or null", and clients send null for "unset"."""
    chat = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": None, "stream": None,
        "logprobs": None, "ignore_eos": None, "stream_options": None})
    assert chat.status_code == 200, chat.text
    assert len(chat.json()["choices"]) == 1 and chat.json()["choices"][0].get("logprobs") is None
    response = httpx.post(server.url + "/v1/responses", timeout=60, json={
        "model": MODEL, "input": "hi", "max_output_tokens": 3, "store": None, "truncation": None})
    assert response.status_code == 200, response.text
    assert response.json()["truncation"] == "disabled"
    missing = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={"model": MODEL, "messages": None})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"  # a required field stays so


def test_models_health_version_tokenize(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == MODEL
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/version").json()["version"]
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) == 2
    back = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"], "model": MODEL})
    assert back.status_code == 200 and back.json() == {"prompt": "hello world", "content": "hello world"}


def test_the_sdk_retrieves_the_served_model_and_not_another(client):
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    try:
        client.models.retrieve("no-such-model")
        raise AssertionError("an unknown model was found")
    except openai.NotFoundError as exc:
        assert exc.body["code"] == "model_not_found" and exc.body["param"] == "model"


def test_a_request_with_choices_reports_the_cache_its_prompt_found(client):
    """n = 3 on a new prompt: the choices after the first take the prompt from the cache the first
    one filled, which is not a prefix the request found cached. It finds what a single choice on a
    new prompt of the same template finds (the chat template's opening, cached by the first request)."""
    chat(client, messages=[{"role": "user", "content": "Ochre kettle moss: a haiku."}], max_tokens=1, temperature=0)
    solo = chat(client, messages=[{"role": "user", "content": "Quasar zebra toast: invent a proverb with them."}],
                max_tokens=4, temperature=1.0, seed=3)
    messages = [{"role": "user", "content": "Paperclip walrus lantern: list three uses, one per line, with reasons."}]
    reply = chat(client, messages=messages, max_tokens=4, temperature=1.0, seed=3, n=3)
    assert len(reply.choices) == 3
    block = EngineConfig().block_size
    assert reply.usage.prompt_tokens > 2 * block  # the siblings found at least two blocks more than this
    assert reply.usage.prompt_tokens_details.cached_tokens == solo.usage.prompt_tokens_details.cached_tokens


def test_repeated_prompt_reports_cached_prompt_tokens(server, client):
    messages = [{"role": "user", "content": "Spell the word 'prefix' backwards."}]
    first = chat(client, messages=messages, max_tokens=5, temperature=0)
    second = chat(client, messages=messages, max_tokens=5, temperature=0)
    block = EngineConfig().block_size  # the server runs with the default block size
    cached = (second.usage.prompt_tokens - 1) // block * block  # whole blocks, the last token left to compute
    assert second.usage.prompt_tokens_details.cached_tokens == cached > 0
    if not cuda_available():  # the CPU path computes the uncached tail to the bit; bf16 GEMMs of its
        # shape may round otherwise than the first request's longer prefill (conftest.cpu_path_only)
        assert second.choices[0].message.content == first.choices[0].message.content
    metrics = httpx.get(server.url + "/metrics").text
    hits = [line for line in metrics.splitlines() if line.startswith("skipserve:prefix_cache_hit_tokens_total ")]
    assert hits and float(hits[0].split()[1]) >= cached


PROMPTS = ["The capital of France is", "One, two, three,", "def fibonacci(n):"]


def test_a_batch_of_prompts_answers_each_with_n_choices_as_alone(client):
    batch = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=8, temperature=0, n=2,
                                      extra_body={"ignore_eos": True})
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True}) for p in PROMPTS]
    assert sorted(c.index for c in batch.choices) == list(range(6))  # prompt i's choice j is i * n + j
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == 6 * 8
    streamed = {}
    for chunk in client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=8, temperature=0, n=2,
                                           stream=True, extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert sorted(streamed) == list(range(6))
    if not cuda_available():  # greedy: each prompt's text is its text alone (what the CPU path promises)
        by_index = {c.index: c.text for c in batch.choices}
        assert by_index == streamed
        assert [by_index[2 * i] for i in range(3)] == [by_index[2 * i + 1] for i in range(3)] \
            == [a.choices[0].text for a in alone]


def test_token_id_prompts_batch_too_and_echo_gives_the_prompt_first(client, server):
    ids = [httpx.post(server.url + "/tokenize", json={"prompt": p}, timeout=30).json()["tokens"] for p in PROMPTS[:2]]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, echo=True)
    decoded = [httpx.post(server.url + "/detokenize", json={"tokens": t}, timeout=30).json()["prompt"] for t in ids]
    for c in r.choices:
        assert c.text.startswith(decoded[c.index]) and len(c.text) > len(decoded[c.index])
    text = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0, echo=True)
    assert text.choices[0].text.startswith("Hello there")
    first = next(iter(client.completions.create(model=MODEL, prompt="Hello there", max_tokens=4, echo=True,
                                                stream=True)))
    assert first.choices[0].text == "Hello there"  # the echo is the stream's first chunk


@pytest.mark.parametrize("prompt, extra, param", [
    ([], {}, "prompt"),
    ([[1, 2], []], {}, "prompt"),
    (["a", [1, 2]], {}, "prompt"),
    ([[[1]]], {}, "prompt"),
    (["a"] * 1000, {}, "prompt"),
    ([[1, 2], [10**9]], {}, "prompt.1"),
    (["hi", "word " * 5000], {}, "prompt.1"),
    ("hi", {"echo": True, "logprobs": 21}, "logprobs"),
])
def test_bad_batches_are_400s_naming_the_prompt_and_leave_nothing_running(server, prompt, extra, param):
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 1900, "ignore_eos": True, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    # a batch is taken whole or not at all: a first prompt's request is aborted (not left to make its
    # 1,900 tokens, which takes far longer than this wait)
    wait_idle(server, within_s=5)


def test_a_client_leaving_a_streamed_batch_aborts_every_prompt(server, client):
    stream = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=1900, stream=True,
                                       extra_body={"ignore_eos": True})
    seen = set()
    for chunk in stream:
        seen |= {c.index for c in chunk.choices}
        if len(seen) == len(PROMPTS):
            break
    stream.close()
    wait_idle(server, within_s=5)


def test_a_batch_reports_the_cache_each_of_its_prompts_found(client, server):
    prompts = [f"Story {i}: " + "the river runs past the old mill and under the stone bridge. " * 6 for i in range(2)]
    lengths = [httpx.post(server.url + "/tokenize", json={"prompt": p}, timeout=30).json()["count"] for p in prompts]
    first = client.completions.create(model=MODEL, prompt=prompts, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompts, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens == sum(lengths)
    # each prompt's whole blocks come from the cache, all but the block holding its last token
    block = EngineConfig().block_size
    assert again.usage.prompt_tokens_details.cached_tokens == sum((n - 1) // block * block for n in lengths) > 0
