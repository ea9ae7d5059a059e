"""The Responses API (server/responses.py) through the real server and the `openai` SDK: answers are the
chat route's answers to the same messages; streams follow OpenAI's event order (the SDK's stream
helper checks it) and carry what the JSON answer carries; `previous_response_id` continues the
stored conversation; tools, `text.format` and logprobs work as on chat; bad requests are 400s
naming their field."""
from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest

from server.response_store import ResponseStore
from tests.conftest import cuda_available
from tests.helpers import Closed, WeatherArgs

MODEL = "smollm2-135m-instruct"
ASK = "What is the capital of France?"


TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
          "parameters": WeatherArgs.model_json_schema()}]


def _count(server, messages, **extra) -> int:
    r = httpx.post(server.url + "/tokenize", json={"messages": messages, **extra}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["count"]


def _post(server, **body):
    return httpx.post(server.url + "/v1/responses", json={"model": MODEL, **body}, timeout=120)


def test_a_response_answers_what_chat_answers_to_the_same_messages(client, server):
    r = client.responses.create(model=MODEL, input=ASK, instructions="Answer in one sentence.",
                                max_output_tokens=40, temperature=0)
    messages = [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": ASK}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status == "completed" and r.incomplete_details is None and r.error is None
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.id.startswith("msg_") and item.content[0].type == "output_text"
    assert r.output_text == item.content[0].text and r.output_text.strip()
    assert r.usage.input_tokens == chat.usage.prompt_tokens == _count(server, messages)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Answer in one sentence." and r.max_output_tokens == 40 and r.temperature == 0
    if not cuda_available():  # the same prompt, greedy: the same text on the CPU path
        assert r.output_text == chat.choices[0].message.content
        assert r.usage.output_tokens == chat.usage.completion_tokens


def test_previous_response_id_continues_the_stored_conversation_without_its_instructions(client, server):
    first = client.responses.create(model=MODEL, input=ASK, instructions="Be brief.", max_output_tokens=30,
                                    temperature=0)
    second = client.responses.create(model=MODEL, input="And of Germany?", previous_response_id=first.id,
                                     max_output_tokens=30, temperature=0)
    history = [{"role": "user", "content": ASK}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "And of Germany?"}]
    assert second.previous_response_id == first.id and second.status == "completed"
    assert second.usage.input_tokens == _count(server, history)  # OpenAI drops earlier instructions too
    third = client.responses.create(model=MODEL, input="Thanks.", previous_response_id=second.id,
                                    instructions="Reply warmly.", max_output_tokens=10, temperature=0)
    history += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "Thanks."}]
    assert third.usage.input_tokens == _count(server, [{"role": "system", "content": "Reply warmly."}] + history)


def test_stored_responses_are_retrieved_and_deleted_and_unstored_ones_are_not_kept(client):
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=5, temperature=0,
                                metadata={"ticket": "42"})
    got = client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump() and got.metadata == {"ticket": "42"}
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.retrieve(r.id)
    assert gone.value.body["code"] == "response_not_found"
    with pytest.raises(openai.BadRequestError) as missing:
        client.responses.create(model=MODEL, input="More", previous_response_id=r.id)
    assert missing.value.body["param"] == "previous_response_id"
    assert missing.value.body["code"] == "previous_response_not_found"
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=3, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_the_stream_follows_openais_events_and_ends_as_the_json_answer_does(client):
    with client.responses.stream(model=MODEL, input=ASK, max_output_tokens=40, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()  # the SDK checks the events' order and ids as it goes
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == final.output_text
    assert {e.item_id for e in events if e.type == "response.output_text.delta"} == {final.output[0].id}
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"
    plain = client.responses.create(model=MODEL, input=ASK, max_output_tokens=40, temperature=0)
    assert final.usage.input_tokens == plain.usage.input_tokens
    if not cuda_available():
        assert final.output_text == plain.output_text


def test_max_output_tokens_ends_a_response_incomplete_streamed_or_not(client, server):
    r = client.responses.create(model=MODEL, input="Tell me a long story.", max_output_tokens=5,
                                extra_body={"ignore_eos": True})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 5
    with httpx.stream("POST", server.url + "/v1/responses", timeout=60, json={
            "model": MODEL, "input": "Tell me a long story.", "max_output_tokens": 5, "stream": True,
            "ignore_eos": True}) as s:
        kinds = [line.removeprefix("event: ") for line in s.iter_lines() if line.startswith("event: ")]
    assert kinds[-2:] == ["response.output_item.done", "response.incomplete"]


class Capital(Closed):
    country: Literal["France", "Germany", "Italy"]
    city: str
    population_millions: int


def test_text_format_holds_the_answer_to_a_schema_streamed_or_not(client):
    r = client.responses.parse(model=MODEL, input="Describe the capital of France as JSON.", text_format=Capital,
                               max_output_tokens=80, temperature=0)
    assert r.status == "completed" and isinstance(r.output_parsed, Capital)
    with client.responses.stream(model=MODEL, input="Describe the capital of Italy as JSON.", text_format=Capital,
                                 max_output_tokens=80, temperature=0.7, extra_body={"seed": 3}) as stream:
        final = stream.get_final_response()
    Capital.model_validate_json(final.output_text, strict=True)
    obj = client.responses.create(model=MODEL, input="Give me a JSON object about cats.", max_output_tokens=80,
                                  text={"format": {"type": "json_object"}}, temperature=0)
    if obj.status == "completed":  # a free string may run to max_output_tokens; a finished one parses
        assert isinstance(json.loads(obj.output_text), dict)


def test_tool_settings_without_tools_are_taken_and_tool_choice_reads_auto(client):
    """The Agents SDK sends `parallel_tool_calls` (and `tool_choice` "auto") with an empty tool list."""
    r = client.responses.create(model=MODEL, input="Hi", tools=[], tool_choice="auto", parallel_tool_calls=False,
                                max_output_tokens=4, temperature=0)
    assert r.status in ("completed", "incomplete") and r.tool_choice == "auto" and r.parallel_tool_calls is False
    assert client.responses.create(model=MODEL, input="Hi", max_output_tokens=4).tool_choice == "auto"


def test_a_forced_call_cut_off_is_an_incomplete_function_call_item(client):
    """As chat answers it: the call with its arguments as far as they were written, the item and the
    response incomplete (streamed: the same item, then response.incomplete)."""
    kw = dict(model=MODEL, input="What's the weather in Paris?", tools=TOOLS, temperature=0,
              tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=20)
    r = client.responses.create(**kw)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (item,) = r.output
    assert item.type == "function_call" and item.name == "get_weather" and item.status == "incomplete"
    whole = client.responses.create(**dict(kw, max_output_tokens=150))
    assert whole.status == "completed" and whole.output[0].status == "completed"
    if not cuda_available():  # greedy, cached or not: a prefix of the whole call's arguments
        written = "".join(item.arguments.split())
        assert "".join(whole.output[0].arguments.split()).startswith(written) and len(written) > 1
    events = list(client.responses.create(stream=True, **kw))  # (the stream helper waits for response.completed)
    kinds = [e.type for e in events]
    assert kinds[-1] == "response.incomplete" and "response.function_call_arguments.done" in kinds
    streamed = events[-1].response
    assert [(o.type, o.status, o.name) for o in streamed.output] == [("function_call", "incomplete", "get_weather")]
    if not cuda_available():
        assert streamed.output[0].arguments == item.arguments


def test_forced_tool_calls_are_function_call_items_and_their_results_render_as_chat_does(client, server):
    r = client.responses.create(model=MODEL, input="What's the weather in Paris?", tools=TOOLS,
                                tool_choice="required", max_output_tokens=80, temperature=0)
    assert r.status == "completed" and r.output
    for item in r.output:
        assert item.type == "function_call" and item.name == "get_weather" and item.status == "completed"
        assert item.call_id.startswith("call_") and item.id.startswith("fc_")
        WeatherArgs.model_validate_json(item.arguments, strict=True)
    with client.responses.stream(model=MODEL, input="What's the weather in Paris?", tools=TOOLS,
                                 tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=80,
                                 temperature=0) as stream:
        events = list(stream)
        streamed = stream.get_final_response()
    kinds = [e.type for e in events]
    stream_items = [e.item for e in events if e.type == "response.output_item.done"]
    assert kinds.count("response.function_call_arguments.done") == len(streamed.output) == 1
    WeatherArgs.model_validate_json(streamed.output[0].arguments, strict=True)
    # the streamed item is the one stored: an agent may send its call_id back with previous_response_id
    fields = ("id", "call_id", "name", "arguments", "status")
    assert [getattr(stream_items[0], f) for f in fields] == [getattr(streamed.output[0], f) for f in fields] \
        == [getattr(client.responses.retrieve(streamed.id).output[0], f) for f in fields]
    if not cuda_available():
        assert streamed.output[0].arguments == r.output[0].arguments
    # the output items go back as input with the call's result: the prompt chat would render for it
    results = [{"type": "function_call_output", "call_id": c.call_id, "output": "22 C, sunny"} for c in r.output]
    given = [{"role": "user", "content": "What's the weather in Paris?"}, *r.output, *results]
    after = client.responses.create(model=MODEL, input=given, tools=TOOLS, max_output_tokens=20, temperature=0)
    chat = [{"role": "user", "content": "What's the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in r.output]},
            *[{"role": "tool", "tool_call_id": c.call_id, "content": "22 C, sunny"} for c in r.output]]
    chat_tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]
    assert after.usage.input_tokens == _count(server, chat, tools=chat_tools)
    # the same with the items dumped as JSON, the SDK's fields of a call held at null (async, caller,
    # namespace) and a result naming its function
    dumped = [given[0], *[c.model_dump(mode="json", by_alias=True) for c in r.output],
              *[dict(result, name="get_weather", caller=None, namespace=None) for result in results]]
    assert {"async", "caller", "namespace"} <= set(dumped[1])
    as_json = client.responses.create(model=MODEL, input=dumped, tools=TOOLS, max_output_tokens=20, temperature=0)
    assert as_json.usage.input_tokens == after.usage.input_tokens
    # the same through previous_response_id: only the result is new input
    chained = client.responses.create(model=MODEL, previous_response_id=r.id, tools=TOOLS, max_output_tokens=20,
                                      input=results, temperature=0)
    assert chained.usage.input_tokens == after.usage.input_tokens
    # a call left without its result is a 400, as OpenAI answers it (the model would read a history
    # in which the call got no answer)
    with pytest.raises(openai.BadRequestError) as unanswered:
        client.responses.create(model=MODEL, previous_response_id=r.id, input="Never mind.", max_output_tokens=4)
    assert unanswered.value.body["param"] == "input" and r.output[0].call_id in unanswered.value.body["message"]
    # the same with the stored call items named by id, as clients that store responses send them
    referenced = client.responses.create(model=MODEL, tools=TOOLS, max_output_tokens=20, temperature=0, input=[
        {"role": "user", "content": "What's the weather in Paris?"},
        *[{"type": "item_reference", "id": c.id} for c in r.output],
        *results])
    assert referenced.usage.input_tokens == after.usage.input_tokens
    listed = client.responses.input_items.list(referenced.id, order="asc").data
    assert [i.type for i in listed][1:1 + len(r.output)] == ["function_call"] * len(r.output)
    assert listed[1].id == r.output[0].id and listed[1].arguments == r.output[0].arguments


def test_logprobs_are_given_per_token_when_included(client):
    r = client.responses.create(model=MODEL, input="Hi", include=["message.output_text.logprobs"], top_logprobs=3,
                                max_output_tokens=6, temperature=0)
    part = r.output[0].content[0]
    assert len(part.logprobs) == r.usage.output_tokens
    assert "".join(lp.token for lp in part.logprobs) == part.text
    for lp in part.logprobs:
        assert len(lp.top_logprobs) == 3 and lp.logprob <= 0
        assert lp.top_logprobs[0].logprob >= lp.logprob - 1e-6  # greedy: the chosen token is the likeliest
    plain = client.responses.create(model=MODEL, input="Hi", max_output_tokens=6, temperature=0)
    assert plain.output[0].content[0].logprobs == []


def test_ffn_skip_budget_applies_and_is_reported(client):
    r = client.responses.create(model=MODEL, input="Tell me a short story about a fox.", max_output_tokens=24,
                                temperature=0, extra_body={"ignore_eos": True, "ffn_skip": {
                                    "budget": 0.3, "threshold": 0.9, "warmup_tokens": 0}})
    skip = r.usage.model_extra["ffn_skip"]
    assert 0 < skip["skipped"] <= 0.3 * skip["total"] and skip["ratio"] == skip["skipped"] / skip["total"]


@pytest.mark.parametrize("body, param", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input.0.content"),
    ({"input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}]}, "input.0"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
    ({"input": []}, "input"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]}, "input"),  # no output
    ({"input": [{"role": "user", "content": "x"}, {"type": "function_call_output", "call_id": "c9", "output": "1"}]},
     "input"),  # the output of no call
    ({"input": [{"role": "user", "content": "x"}, {"type": "function_call_output", "call_id": "c1", "output": "1"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]}, "input"),  # before it
    ({"input": [{"role": "user", "content": "a", "id": "msg_1"}, {"role": "user", "content": "b", "id": "msg_1"}]},
     "input.1"),
    ({"input": [{"type": "item_reference", "id": "fc_nothing"}]}, "input.0"),  # nothing stored under it
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]},
     "tools.0.parameters"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "include": ["reasoning.encrypted_content"]}, "include"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "array"}}},
      "tools": TOOLS}, "text.format"),  # beside tools in auto mode: calls are the list
    ({"input": "x", "n": 2}, "n"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "top_logprobs": 21}, "top_logprobs"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 10**6}, "max_output_tokens"),
    ({"input": "word " * 5000}, "input"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "nope"}}}},
     "text.format"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input.0.content"),
    ({"input": "x", "text": {"verbosity": "low"}}, "text.verbosity"),
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning.effort"),  # (the embedded model's template)
    ({"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"input": "x", "reasoning": {"summary": "auto"}}, "reasoning"),
    ({"input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
])
def test_requests_this_server_cannot_honour_are_400s_naming_their_field(server, body, param):
    r = _post(server, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_an_unknown_model_is_a_404(server):
    r = _post(server, model="gpt-9", input="x")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_the_store_drops_least_recently_used_entries_past_its_bounds_and_shares_history():
    store = ResponseStore(max_entries=3, max_size=150)
    turn = [{"role": "user", "content": "a" * 10}, {"role": "assistant", "content": "b" * 10}]
    store.put("r1", "{}", "[]", [], turn)  # size: 2 + 2 characters of JSON and 20 of text
    store.put("r2", "{}", "[]", store.get("r1").messages, turn)  # 4 + its whole conversation's 40
    assert store.get("r2").messages[0] is store.get("r1").messages[0]  # history shared, not copied
    assert store.size == 24 + 44
    store.get("r1")  # r1 is now the most recently used
    store.put("r3", "{}", "[]", [], turn)
    store.put("r4", "{}", "[]", [], turn)  # four entries: the least recently used one (r2) goes
    assert set(store.entries) == {"r1", "r3", "r4"} and store.size == 3 * 24
    store.put("r5", '{"id": "r5"}', "[]", [], [{"role": "user", "content": "c" * 70}])  # 84: r1 goes
    assert set(store.entries) == {"r3", "r4", "r5"} and store.size == 2 * 24 + 84
    assert store.delete("r4") and not store.delete("r4") and store.size == 24 + 84


def test_an_item_stays_found_while_any_stored_response_holds_it():
    """A referenced item is in the referencing response's input too: deleting that one leaves the
    first one's item found."""
    store = ResponseStore()
    store.put("a", '{"output": [{"id": "msg_a", "type": "message"}]}', "[]", [], [])
    store.put("b", '{"output": []}', '[{"id": "msg_a", "type": "message"}]', [], [])
    assert store.delete("b") and store.item("msg_a") == {"id": "msg_a", "type": "message"}
    assert store.delete("a") and store.item("msg_a") is None


def test_input_items_are_listed_with_ids_newest_first_and_paged(client):
    given = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
             {"role": "user", "content": "Bye"}]
    r = client.responses.create(model=MODEL, input=given, max_output_tokens=3)
    listed = client.responses.input_items.list(r.id)
    assert [(i.role, i.content[0].text) for i in listed.data] == [
        ("user", "Bye"), ("assistant", "Hello."), ("user", "Hi"), ("system", "Be terse.")]
    assert len({i.id for i in listed.data}) == 4 and not listed.has_more
    first = client.responses.input_items.list(r.id, order="asc", limit=3)
    assert [i.id for i in first.data] == [i.id for i in reversed(listed.data)][:3] and first.has_more
    rest = client.responses.input_items.list(r.id, order="asc", after=first.data[-1].id)
    assert [i.id for i in rest.data] == [listed.data[0].id] and not rest.has_more
    assert list(client.responses.input_items.list(r.id, limit=1)) == listed.data  # the SDK pages through


def test_a_stored_response_is_not_streamed_again_nor_cancelled(server, client):
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=3)
    again = httpx.get(f"{server.url}/v1/responses/{r.id}?stream=true", timeout=30)
    assert again.status_code == 400 and again.json()["error"]["param"] == "stream"
    cancel = httpx.post(f"{server.url}/v1/responses/{r.id}/cancel", timeout=30)
    assert cancel.status_code == 400


def test_truncation_auto_drops_the_oldest_turns_to_fit_the_context(client, server):
    turns = []
    for i in range(12):  # ~3,000 tokens: more than the 2,048 the test server's model takes
        turns += [{"role": "user", "content": f"Question {i}: " + "tell me about the sea " * 25},
                  {"role": "assistant", "content": "The sea is large and deep. " * 6}]
    turns.append({"role": "user", "content": "Thanks."})
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input=turns, max_output_tokens=8)
    assert refused.value.body["param"] == "input"
    r = client.responses.create(model=MODEL, input=turns, max_output_tokens=8, truncation="auto",
                                instructions="Be brief.")
    assert r.truncation == "auto" and r.usage.input_tokens <= 2048 - 8
    kept = next(k for k in range(2, len(turns), 2)
                if _count(server, [{"role": "system", "content": "Be brief."}] + turns[k:]) <= 2048 - 8)
    assert r.usage.input_tokens == _count(server, [{"role": "system", "content": "Be brief."}] + turns[kept:])
    # a system message that opens the turn kept is kept with it (the turn before it fits with nothing)
    latest = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi."}]
    history = [{"role": "user", "content": "word " * 2100}, {"role": "assistant", "content": "Yes."}]
    r = client.responses.create(model=MODEL, input=history + latest, max_output_tokens=3, truncation="auto")
    assert r.usage.input_tokens == _count(server, latest) != _count(server, latest[1:])


def test_fields_clients_send_with_their_defaults_are_taken(client):
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=3, reasoning=None, service_tier="auto",
                                text={"verbosity": "medium"}, truncation="disabled")
    assert r.status in ("completed", "incomplete")
    # a response's own reasoning object, sent back as it came
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=3, reasoning={"effort": None, "summary": None},
                                metadata={"run": "1"}, prompt_cache_key="k",
                                extra_body={"prompt_cache_retention": "in_memory"})  # (older SDKs lack the argument)
    assert r.status in ("completed", "incomplete") and r.to_dict()["prompt_cache_retention"] == "in_memory"
    # an output message's refusal part, sent back: what the assistant said, as its text
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
        {"type": "refusal", "refusal": "I cannot help with that."}]}, {"role": "user", "content": "Why?"}]
    refused = client.responses.create(model=MODEL, input=history, max_output_tokens=1)
    said = client.responses.create(model=MODEL, max_output_tokens=1, input=[
        history[0], {"role": "assistant", "content": "I cannot help with that."}, history[2]])
    assert refused.usage.input_tokens == said.usage.input_tokens
    assert client.responses.input_items.list(refused.id, order="asc").data[1].content[0].type == "refusal"


def test_references_that_repeat_a_stored_item_past_the_body_limit_are_a_400(client, server):
    """A short body cannot repeat a stored item into a prompt of gigabytes: what its references
    bring counts against the request body's limit (4 MiB by default)."""
    r = client.responses.create(model=MODEL, input="Say something long.", max_output_tokens=40, temperature=0)
    message = r.output[0]
    assert message.type == "message" and len(message.content[0].text) >= 60  # the references' body stays < 4 MiB
    times = 4 * 2**20 // len(message.content[0].text.encode()) + 1  # past the limit by the text alone
    refs = [{"type": "item_reference", "id": message.id}] * times
    answer = httpx.post(server.url + "/v1/responses", timeout=120, json={
        "model": MODEL, "input": [{"type": None, "role": "user", "content": "hi"}, *refs], "max_output_tokens": 2})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"].startswith("input.") and "limit of a request body" in error["message"]
    few = httpx.post(server.url + "/v1/responses", timeout=120, json={  # a null type is a message, as absent
        "model": MODEL, "input": [{"type": None, "role": "user", "content": "hi"}, *refs[:3]], "max_output_tokens": 2})
    assert few.status_code == 200, few.text
