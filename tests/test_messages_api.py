"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) through the official
`anthropic` SDK against the real server: a message is the chat answer to the translated request
(same prompt tokens, same greedy text), streamed as Anthropic's events, with tool_use blocks,
tool results, prefills, stop sequences and Anthropic's usage."""
from __future__ import annotations

import json

import httpx
import pytest

anthropic = pytest.importorskip("anthropic")  # a test extra (pyproject.toml)

from tests.conftest import cuda_available  # noqa: E402

MODEL = "smollm2-135m-instruct"
GREEDY = {"temperature": 0}  # (today's SDK has no sampling arguments; the API still takes them)
QUESTION = [{"role": "user", "content": "Name three colours."}]
PAINT = {"name": "paint", "description": "Paint a wall in a colour.",
         "input_schema": {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}}


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def _chat(server, **body) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_message_is_the_chat_answer_to_the_same_prompt(server, claude):
    m = claude.messages.create(model=MODEL, max_tokens=24, system="Be brief.", messages=QUESTION, extra_body=GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_") and m.model == MODEL
    assert [b.type for b in m.content] == ["text"]
    chat = _chat(server, messages=[{"role": "system", "content": "Be brief."}] + QUESTION, max_tokens=24,
                 temperature=0)
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == chat["usage"]["prompt_tokens"]
    if not cuda_available():  # greedy answers equal across requests: the CPU path's promise
        assert m.content[0].text == chat["choices"][0]["message"]["content"]
        assert m.usage.output_tokens == chat["usage"]["completion_tokens"]
        assert m.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[chat["choices"][0]["finish_reason"]]
    counted = claude.messages.count_tokens(model=MODEL, system="Be brief.", messages=QUESTION)
    assert counted.input_tokens == chat["usage"]["prompt_tokens"]


def test_the_prefix_cache_shows_as_cache_read_tokens(claude):
    system = "You answer questions about colours. " * 20  # a long shared prefix: whole blocks cached
    first = claude.messages.create(model=MODEL, max_tokens=2, system=system, messages=QUESTION)
    again = claude.messages.create(model=MODEL, max_tokens=2, system=system,
                                   messages=[{"role": "user", "content": "Name two colours."}])
    total = again.usage.input_tokens + again.usage.cache_read_input_tokens
    assert again.usage.cache_read_input_tokens > 0 and again.usage.input_tokens < total
    assert first.usage.input_tokens + first.usage.cache_read_input_tokens > 100


def test_max_tokens_0_fills_the_prefix_cache_and_answers_nothing(claude):
    system = "You answer questions about warm caches and nothing else. " * 12  # (no other test's prefix)
    warm = claude.messages.create(model=MODEL, max_tokens=0, system=system, messages=QUESTION)
    assert warm.content == [] and warm.stop_reason == "max_tokens" and warm.usage.output_tokens == 0
    assert warm.usage.cache_read_input_tokens == 0 and warm.usage.input_tokens > 100
    forced = claude.messages.create(model=MODEL, max_tokens=0, system=system, messages=QUESTION, tools=[PAINT],
                                    tool_choice={"type": "any"})
    assert forced.content == [] and forced.stop_reason == "max_tokens"
    m = claude.messages.create(model=MODEL, max_tokens=2, system=system, messages=QUESTION)
    assert m.usage.cache_read_input_tokens >= warm.usage.input_tokens // 16 * 16 - 16  # its whole blocks
    assert m.usage.output_tokens > 0 and m.content


@pytest.mark.parametrize("tools", [{}, {"tools": [PAINT]}])  # (with tools the answer may be calls: held, then sent)
def test_streamed_events_build_the_same_message(claude, tools):
    with claude.messages.stream(model=MODEL, max_tokens=24, messages=QUESTION, extra_body=GREEDY, **tools) as stream:
        kinds = [e.type for e in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    assert "message_delta" in kinds and "text" in kinds
    whole = claude.messages.create(model=MODEL, max_tokens=24, messages=QUESTION, extra_body=GREEDY, **tools)
    assert streamed.content[0].text.strip() and streamed.stop_reason in ("end_turn", "max_tokens")
    if not cuda_available():
        assert streamed.content[0].text == whole.content[0].text
        assert streamed.usage.output_tokens == whole.usage.output_tokens and streamed.stop_reason == whole.stop_reason


def test_a_stop_sequence_is_named(claude):
    m = claude.messages.create(model=MODEL, max_tokens=100, messages=QUESTION, extra_body=GREEDY, stop_sequences=[" "])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == " " and " " not in m.content[0].text
    with claude.messages.stream(model=MODEL, max_tokens=100, messages=QUESTION, extra_body=GREEDY,
                                stop_sequences=[" "]) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "stop_sequence" and streamed.stop_sequence == " "


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_call_is_a_tool_use_block_and_its_result_goes_back(claude, stream):
    ask = [{"role": "user", "content": "Paint the kitchen wall blue."}]
    kwargs = dict(model=MODEL, max_tokens=60, tools=[PAINT], tool_choice={"type": "tool", "name": "paint"},
                  messages=ask, extra_body=GREEDY)
    if stream:
        with claude.messages.stream(**kwargs) as s:
            m = s.get_final_message()
    else:
        m = claude.messages.create(**kwargs)
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "paint" and isinstance(use.input.get("colour"), str) and use.id.startswith("toolu_")
    history = ask + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]}]
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "done"}]}
    follow = claude.messages.create(model=MODEL, max_tokens=20, tools=[PAINT], extra_body=GREEDY,
                                    messages=history + [result])
    assert follow.stop_reason in ("end_turn", "max_tokens", "tool_use")
    other = dict(result, content=[dict(result["content"][0], content="done, and the ceiling too")])
    counted = [claude.messages.count_tokens(model=MODEL, tools=[PAINT], messages=history + [r]).input_tokens
               for r in (result, other)]
    assert counted[1] > counted[0]  # the tool's result is in the prompt


def test_any_tool_cut_before_its_name_is_the_one_tools_use_block(claude):
    """`any` with one tool: an answer max_tokens cuts before the name is written is still a call of
    that tool (its input as far as written: none), not its JSON as text."""
    ask = [{"role": "user", "content": "Paint the kitchen wall blue."}]
    m = claude.messages.create(model=MODEL, max_tokens=3, tools=[PAINT], tool_choice={"type": "any"}, messages=ask,
                               extra_body=GREEDY)
    assert m.stop_reason == "max_tokens" and [(b.type, b.name) for b in m.content] == [("tool_use", "paint")]


def test_a_final_assistant_message_is_continued(server, claude):
    prefill = [*QUESTION, {"role": "assistant", "content": "1. Red\n2."}]
    m = claude.messages.create(model=MODEL, max_tokens=8, messages=prefill, extra_body=GREEDY)
    chat = _chat(server, messages=prefill, max_tokens=8, temperature=0, continue_final_message=True)
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == chat["usage"]["prompt_tokens"]
    if not cuda_available():
        assert m.content[0].text == chat["choices"][0]["message"]["content"]


def test_an_output_format_holds_the_text_to_its_schema_and_taken_hints_change_nothing(claude):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    m = claude.messages.create(model=MODEL, max_tokens=40, messages=QUESTION, extra_body=GREEDY,
                               output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"},
                               cache_control={"type": "ephemeral"}, speed="standard", metadata={"user_id": "u1"},
                               thinking={"type": "enabled", "budget_tokens": 1024}, service_tier="auto")
    assert json.loads(m.content[0].text)["colour"] in ("red", "blue")


@pytest.mark.parametrize("body, param", [
    ({"messages": QUESTION}, "max_tokens"),
    ({"max_tokens": -1, "messages": QUESTION}, "max_tokens"),
    ({"max_tokens": 0, "messages": QUESTION, "stream": True}, "stream"),
    ({"max_tokens": 0, "messages": QUESTION, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"max_tokens": 0, "messages": QUESTION, "output_config": {"format": {"type": "json_schema", "schema": {
        "type": "object"}}}}, "output_config.format"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]},
     "messages.0.content"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"max_tokens": 5, "messages": [*QUESTION, {"role": "assistant", "content": [  # OpenAI's arguments, a string
        {"type": "tool_use", "id": "t1", "name": "paint", "input": '{"colour": "red"}'}]}]}, "messages.1.content.0.input"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "txt", "text": "a"}]}]}, "messages.0.content.0"),
    ({"max_tokens": 5, "system": [{"type": "text"}], "messages": QUESTION}, "system.0.text"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content.0.text"),  # (the block's tag is "text", as is the field)
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}]},
     "messages.0.content.0.content"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": []}]}, "messages.0.content"),
    ({"max_tokens": 5, "messages": [*QUESTION, {"role": "assistant", "content": "Red, "}]},
     "messages.1.content"),  # a prefill ending in whitespace, as Anthropic refuses it
    ({"max_tokens": 5, "messages": [*QUESTION, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "paint", "input": {}}]},
        {"role": "user", "content": "Go on."}], "tools": [PAINT]}, "messages.2"),  # the use got no result
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_9", "content": "done"}]}]}, "messages.0.content"),  # of no use
    ({"max_tokens": 5, "messages": [{"role": "assistant", "content": ""}]}, "messages.0.content"),
    ({"max_tokens": 5, "messages": [*QUESTION, {"role": "assistant", "content": ""},
                                    {"role": "user", "content": "And?"}]}, "messages.1.content"),
    ({"max_tokens": 5, "messages": QUESTION, "tool_choice": {"type": "tool"}, "tools": [PAINT]}, "tool_choice.name"),
    ({"max_tokens": 5, "messages": QUESTION, "tools": [{"name": "web_search", "type": "web_search_20250305"}]},
     "tools.0"),
    ({"max_tokens": 5, "messages": QUESTION, "temperature": "hot"}, "temperature"),
    ({"max_tokens": 5, "messages": QUESTION, "temperature": 1.5}, "temperature"),  # (Anthropic's run to 1)
    ({"max_tokens": 2000, "messages": QUESTION, "thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
    ({"max_tokens": 2000, "messages": QUESTION, "thinking": {"type": "enabled", "budget_tokens": 100}},
     "thinking.budget_tokens"),  # (at least 1,024, as Anthropic's)
    ({"max_tokens": 5, "messages": QUESTION, "tools": [dict(PAINT, name="a b")]}, "tools.0.name"),  # (as sent)
    ({"max_tokens": 5, "messages": QUESTION, "tools": [dict(PAINT, input_schema={"type": "array"})]},
     "tools.0.input_schema"),
    ({"max_tokens": 5, "messages": QUESTION, "tool_choice": {"type": "any"}, "tools": [  # strict: held as chat holds it
        {"name": "w", "strict": True, "input_schema": {"type": "object", "properties": {"a": {
            "type": "array", "items": {"enum": ["x", "y"]}, "uniqueItems": True}}, "required": ["a"]}}]}, "tools"),
    ({"max_tokens": 5, "messages": QUESTION, "output_config": {"format": {"type": "json_schema", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "["}}}}}}, "output_config.format"),
    ({"max_tokens": 5, "messages": QUESTION, "container": "c1"}, "container"),
    ({"max_tokens": 5, "messages": QUESTION, "top_logprobs": 2}, "top_logprobs"),
    ({"max_tokens": 5, "messages": QUESTION, "stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
    ({"max_tokens": 5, "messages": QUESTION, "stop_sequences": ["x" * 600]}, "stop_sequences"),
])
def test_bad_requests_are_400s_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/messages", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_only_a_final_assistant_message_may_be_empty(server):
    """As Anthropic's API: an empty prefill is taken (on count_tokens too), an empty turn elsewhere is not."""
    for path, more in (("/v1/messages", {"max_tokens": 2}), ("/v1/messages/count_tokens", {})):
        empty_prefill = {"model": MODEL, **more, "messages": [*QUESTION, {"role": "assistant", "content": []}]}
        r = httpx.post(server.url + path, json=empty_prefill, timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.post(server.url + path, json={"model": MODEL, **more, "messages": [
            {"role": "user", "content": ""}, {"role": "assistant", "content": "Hi"}]}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["message"] == \
            "messages.0: all messages must have non-empty content except for the optional final assistant message"


def test_stop_sequences_errors_name_the_field_as_sent(server):
    for stops, words in ((["a", "b", "c", "d", "e"], "stop_sequences must hold at most 4 strings"),
                         (["x" * 600], "stop_sequences must hold strings of at most 512 characters")):
        r = httpx.post(server.url + "/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": QUESTION,
                                                          "stop_sequences": stops}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["message"] == words


def test_an_unknown_model_is_a_404_the_sdk_raises(claude):
    with pytest.raises(anthropic.NotFoundError) as raised:
        claude.messages.create(model="no-such-model", max_tokens=5, messages=QUESTION)
    assert raised.value.type == "not_found_error"  # Anthropic's error type (OpenAI's would be invalid_request_error)
    assert raised.value.request_id and raised.value.request_id == raised.value.response.headers["x-request-id"]
    assert raised.value.body["type"] == "error" and raised.value.body["error"]["param"] == "model"


def test_the_sdk_reads_each_answers_request_id(claude):
    """Anthropic's `request-id` header (the SDK's `_request_id`), beside OpenAI's `x-request-id`."""
    raw = claude.messages.with_raw_response.create(model=MODEL, max_tokens=2, messages=QUESTION, extra_body=GREEDY)
    assert raw.request_id and raw.request_id == raw.headers["x-request-id"] and raw.parse()._request_id == raw.request_id
    other = claude.messages.with_raw_response.count_tokens(model=MODEL, messages=QUESTION)
    assert other.request_id and other.request_id != raw.request_id


def test_the_sdk_lists_and_retrieves_the_models_in_anthropics_shape(server, claude):
    """`models.list()` / `models.retrieve()` (GET /v1/models with the SDK's `anthropic-version`
    header): Anthropic's fields beside OpenAI's, its page fields, its 404; an OpenAI client's list
    stays OpenAI's."""
    page = claude.models.list()
    assert [m.id for m in page.data] == [MODEL] and page.has_more is False and page.first_id == page.last_id == MODEL
    (card,) = page.data
    assert card.type == "model" and card.display_name == MODEL and card.created_at.tzinfo is not None
    assert claude.models.retrieve(MODEL).display_name == MODEL
    with pytest.raises(anthropic.NotFoundError) as raised:
        claude.models.retrieve("no-such-model")
    assert raised.value.type == "not_found_error" and raised.value.request_id
    plain = httpx.get(server.url + "/v1/models", timeout=30).json()
    assert "has_more" not in plain and "display_name" not in plain["data"][0]
