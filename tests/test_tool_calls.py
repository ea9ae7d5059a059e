"""Tool calls (server/tool_calls.py) through the real server and the `openai` SDK: forced calls are
well-formed calls of a listed tool whose arguments follow its parameters (pydantic checks them),
streamed as the SDK accumulates them, and cut off by max_tokens still calls; "auto" answers that are not calls stream as content; earlier
calls and their results reach the prompt; bad tool requests are 400s naming their field."""
from __future__ import annotations

import enum
import json
import re

import httpx
import pytest
from pydantic import Field

from tests.conftest import cuda_available
from tests.helpers import Closed, WeatherArgs, grammar_accepts

MODEL = "smollm2-135m-instruct"


class TimeArgs(Closed):
    timezone: str


ARGS = {"get_weather": WeatherArgs, "get_time": TimeArgs}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WeatherArgs.model_json_schema()}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                      "parameters": TimeArgs.model_json_schema()}},
]
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


def _check_calls(calls, names=tuple(ARGS)):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        ARGS[call.function.name].model_validate_json(call.function.arguments, strict=True)


@pytest.mark.parametrize("tool_choice, names", [
    ("required", ("get_weather", "get_time")),
    ({"type": "function", "function": {"name": "get_time"}}, ("get_time",)),
])
def test_a_forced_call_is_a_listed_tool_with_arguments_that_follow_its_parameters(client, tool_choice, names):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                                       temperature=0, max_tokens=150)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_calls(choice.message.tool_calls, names)
    if isinstance(tool_choice, dict):
        assert len(choice.message.tool_calls) == 1  # a named function is called once


class Unit(str, enum.Enum):
    celsius = "celsius"
    fahrenheit = "fahrenheit"


class Forecast(Closed):
    """Its schema keeps Unit in `$defs`, which the calls' schema must still find."""
    city: str
    days: int
    unit: Unit


def test_tools_from_pydantic_models_with_definitions_are_called_with_valid_arguments(client):
    import openai

    tool = openai.pydantic_function_tool(Forecast, name="forecast")
    assert "$defs" in tool["function"]["parameters"]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Forecast for Oslo?"}],
                                       tools=[tool], tool_choice="required", temperature=0, max_tokens=150)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "forecast"
    Forecast.model_validate_json(call.function.arguments)


def test_the_sdks_accumulated_stream_message_can_be_sent_back(client):
    """The stream helper's final message carries fields a request never sends (parsed_arguments, a
    call's index, refusal, ...); appended to the history as the SDK's docs show, it is taken."""
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=150)
    with client.chat.completions.stream(**kw) as stream:
        message = stream.get_final_completion().choices[0].message
    assert message.content is None and message.tool_calls
    call = message.tool_calls[0]
    history = ASK + [message, {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0, max_tokens=10)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("answer", [
    '{"name": ["get_time"], "arguments": {}}', '{"name": "get_time", "arguments": {"t": NaN}}', "[" * 5000,
    '{"name": "nope", "arguments": {}}', '{"name": "get_time", "arguments": "x"}', "[]", "{not json",
])
def test_answers_that_are_not_calls_stay_content(answer):
    from server.tool_calls import parse_calls

    assert parse_calls(answer, [t["function"] for t in TOOLS]) is None


def test_a_list_of_calls_only_where_parallel_calls_are_allowed():
    from server.tool_calls import MAX_PARALLEL_CALLS, parse_calls

    one = {"name": "get_time", "arguments": {"timezone": "UTC"}}
    tools = [t["function"] for t in TOOLS]
    assert len(parse_calls(json.dumps([one, one]), tools)) == 2
    assert parse_calls(json.dumps([one, one]), tools, parallel=False) is None
    assert len(parse_calls(json.dumps(one), tools, parallel=False)) == 1
    assert parse_calls(json.dumps([one] * (MAX_PARALLEL_CALLS + 1)), tools) is None


def test_sampled_forced_calls_stay_well_formed(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", n=3, seed=4,
                                       temperature=1, max_tokens=200, parallel_tool_calls=False)
    for choice in r.choices:
        if choice.finish_reason != "length":
            assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
            _check_calls(choice.message.tool_calls)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_cut_off_by_max_tokens_comes_as_a_call_with_the_arguments_written(client, tool_choice):
    """As OpenAI answers it: `length`, no content, the call with its arguments as far as they were
    written (the same streamed); a named function's call even before its name was written; with
    "required", an answer cut before any name is finished stays content."""
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=0)
    whole = client.chat.completions.create(max_tokens=150, **kw).choices[0]
    assert whole.finish_reason == "tool_calls"
    name, arguments = whole.message.tool_calls[0].function.name, json.loads(whole.message.tool_calls[0].function.arguments)
    cut_calls = 0
    for max_tokens in (2, 8, 16, 20, 24):
        choice = client.chat.completions.create(max_tokens=max_tokens, **kw).choices[0]
        assert choice.finish_reason == "length"
        if choice.message.tool_calls is None:
            assert tool_choice == "required" and choice.message.content.lstrip()[:1] in ("{", "[")
            assert not re.search(r'"name"\s*:\s*"[^"]*"', choice.message.content)  # (no name finished)
            continue
        cut_calls += 1
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.id.startswith("call_") and call.function.name == name
        if not cuda_available():  # greedy, the prompt cached or not: a prefix of the whole call's arguments
            written = re.sub(r"\s", "", call.function.arguments)
            assert re.sub(r"\s", "", json.dumps(arguments)).startswith(written)
        streamed = [c.choices[0] for c in client.chat.completions.create(max_tokens=max_tokens, stream=True, **kw)
                    if c.choices]
        assert streamed[-1].finish_reason == "length" and not any(c.delta.content for c in streamed)
        deltas = [d for c in streamed for d in c.delta.tool_calls or []]
        assert [d.function.name for d in deltas] == [name]
        if not cuda_available():
            assert deltas[0].function.arguments == call.function.arguments
    assert cut_calls >= 3  # the calls cut inside their arguments at least
    if isinstance(tool_choice, dict):
        assert cut_calls == 5  # (at 2 tokens nothing of it was written)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_a_stop_string_cuts_comes_as_a_call_with_the_arguments_written(client, tool_choice):
    """A stop string inside the call's JSON ends the answer there: the call as far as it was written
    (as a cut by max_tokens), not its JSON as content; `stop`, not `tool_calls` (it is not whole)."""
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=0, max_tokens=150)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    city = json.loads(whole.function.arguments)["city"]
    choice = client.chat.completions.create(stop=[city], **kw).choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and city not in call.function.arguments
    if not cuda_available():  # greedy, the prompt cached or not: a prefix of the whole call's arguments
        assert re.sub(r"\s", "", whole.function.arguments).startswith(re.sub(r"\s", "", call.function.arguments))
    streamed = [c.choices[0] for c in client.chat.completions.create(stop=[city], stream=True, **kw) if c.choices]
    assert streamed[-1].finish_reason == "stop" and not any(c.delta.content for c in streamed)
    deltas = [d for c in streamed for d in c.delta.tool_calls or []]
    assert [d.function.name for d in deltas] == ["get_weather"]
    if not cuda_available():  # (the same bits across requests: the CPU path's promise)
        assert deltas[0].function.arguments == call.function.arguments


def test_a_cut_list_of_calls_keeps_the_whole_ones_and_the_cut_ones_written_arguments():
    from server.tool_calls import cut_calls

    tools = [t["function"] for t in TOOLS]
    text = ('[{"name": "get_weather", "arguments": {"city": "name", "note": {"name": "get_time", "arguments": 1}}},'
            ' {"name": "get_time", "arguments": {"timezone": "Europe/Par')
    calls = cut_calls(text, tools)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]  # not the one inside the arguments
    assert json.loads(calls[0]["function"]["arguments"])["note"] == {"name": "get_time", "arguments": 1}
    assert calls[1]["function"]["arguments"] == '{"timezone": "Europe/Par'
    assert cut_calls('[{"name": "get_weather", "arguments": {"city": "x"}}, {"name": "get_ti', tools)[0][
        "function"]["arguments"] == '{"city": "x"}'
    assert cut_calls('{"name": "no_such_tool", "arguments": {"a": ', tools) == []
    assert cut_calls('{"name": "get_wea', tools) == []
    # the name finished, the cut before the arguments began: the call with none written
    for text in ('{"name": "get_time"', '[{"name": "get_time",', '{"name":"get_time" , "argu', '{"name": "get_time", "arguments"',
                 '{"name": "get_time", "arguments": ', '[{"name": "get_weather", "arguments": {"city": "x"}}, {"name": "get_time"'):
        calls = cut_calls(text, tools)
        assert calls[-1]["function"] == {"name": "get_time", "arguments": ""}, text
    assert cut_calls('{"name": "get_time", "argue', tools) == []
    assert cut_calls('{"name": "get_time", "arguments": {"timezone": "x"}} {"name": "get', tools)[-1][
        "function"]["arguments"] == '{"timezone": "x"}'


def test_streamed_calls_are_the_unstreamed_ones(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=150,
              logprobs=True)
    answer = client.chat.completions.create(**kw).choices[0]
    whole = answer.message.tool_calls
    deltas, reasons, logprobs = [], [], []
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices:
            assert not chunk.choices[0].delta.content  # a forced call never streams content
            deltas += chunk.choices[0].delta.tool_calls or []
            reasons.append(chunk.choices[0].finish_reason)
            logprobs += chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else []
    assert reasons[-1] == "tool_calls"
    _check_calls(deltas)
    assert logprobs  # the call's tokens' logprobs come with it
    if not cuda_available():  # the second request finds the prompt cached: the same bits only on the CPU path
        assert [(d.function.name, d.function.arguments) for d in deltas] == \
            [(c.function.name, c.function.arguments) for c in whole]
        assert [e.token for e in logprobs] == [e.token for e in answer.logprobs.content]


def test_an_auto_answer_that_is_no_call_streams_as_content(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=40)  # tool_choice auto
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.message.tool_calls is None and whole.message.content
    chunks = [c.choices[0] for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert sum(bool(c.delta.content) for c in chunks) > 2  # streamed as it came, not held to the end
    assert chunks[0].delta.role == "assistant" and chunks[0].delta.content == ""  # (no null before the text)
    if not cuda_available():  # the second request finds the prompt cached: the same bits only on the CPU path
        assert "".join(c.delta.content or "" for c in chunks) == whole.message.content
        assert chunks[-1].finish_reason == whole.finish_reason


def test_tool_none_shows_no_tools_and_tokenize_renders_what_chat_does(server):
    def prompt_tokens(**extra):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": ASK, "max_tokens": 1, **extra})
        assert r.status_code == 200, r.text
        tokenized = httpx.post(server.url + "/tokenize", timeout=30, json={"messages": ASK, **extra}).json()
        assert tokenized["count"] == r.json()["usage"]["prompt_tokens"]
        return tokenized["count"]

    plain = prompt_tokens()
    assert prompt_tokens(tools=TOOLS, tool_choice="none") == plain
    assert prompt_tokens(tools=TOOLS) > plain + 50  # the tools' descriptions
    assert prompt_tokens(tools=TOOLS, parallel_tool_calls=False) < prompt_tokens(tools=TOOLS)  # no word of lists


def test_earlier_calls_and_their_results_reach_the_prompt(server, client):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_7", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_7", "content": "18 degrees and sunny"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": history}, timeout=30)
    text = httpx.post(server.url + "/detokenize", json={"tokens": r.json()["tokens"]}, timeout=30).json()["prompt"]
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert "Result of get_weather (call call_7):\n18 degrees and sunny" in text
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0, max_tokens=30)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),  # a name twice
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}}}}], "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "response_format": {"type": "json_schema", "json_schema": {"name": "l", "schema": {
        "type": "array"}}}}, "response_format"),  # beside tools in auto mode: calls are the list
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),  # no tool_call_id
    ({"messages": [{"role": "assistant", "content": None}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0"),
    ({"tools": [{"type": "function", "function": {"name": "s", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),  # arguments are an object
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),  # no tools
])
def test_bad_tool_requests_are_400_naming_their_field(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": ASK, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


class Bounded(Closed):
    """Keywords the grammar cannot hold (`uniqueItems`, what pydantic writes for a set): a non-strict
    tool reads them as annotations, as OpenAI's non-strict tools take any schema; the others still hold."""
    query: str = Field(max_length=40, pattern=r"^[a-z ]+$")
    limit: int = Field(ge=1, le=50, multiple_of=5)
    tags: set[str] = Field(default=set(), max_length=2)  # maxItems holds, uniqueItems is read as an annotation


def test_a_forced_call_of_a_non_strict_tool_with_keywords_it_cannot_hold_is_made(client):
    tool = {"type": "function", "function": {"name": "search", "parameters": Bounded.model_json_schema()}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[tool], tool_choice="required",
                                       temperature=0, max_tokens=80)
    call = r.choices[0].message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "search" and {"query", "limit"} <= set(arguments) <= {"query", "limit", "tags"}
    assert isinstance(arguments["query"], str) and isinstance(arguments["limit"], int)
    assert len(arguments["query"]) <= 40 and re.fullmatch("[a-z ]+", arguments["query"]) and 1 <= arguments["limit"] <= 50
    assert arguments["limit"] % 5 == 0


def test_a_forced_call_is_made_whatever_the_response_format(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"}, temperature=0, max_tokens=150)
    assert r.choices[0].finish_reason == "tool_calls"
    _check_calls(r.choices[0].message.tool_calls)


def test_tools_in_auto_mode_beside_a_response_format_answer_in_calls_or_in_the_format():
    """The grammar takes a list of calls or the format's object, and nothing else; a single call
    object is the format's answer only where the format takes it."""
    from engine.structured.schema import compile_schema
    from server.protocol import ToolUse
    from engine.sampling_params import SamplingParams

    answer = {"type": "object", "properties": {"city": {"type": "string"}, "temp": {"type": "number"}},
              "required": ["city", "temp"], "additionalProperties": False}
    use = ToolUse([t["function"] for t in TOOLS], None, None, None, answer=answer)
    assert use.mode == "auto" and use.listed
    grammar = compile_schema(use.constrain(SamplingParams(response_schema=answer), "response_format").response_schema)

    def accepts(text: str) -> bool:
        return grammar_accepts(grammar, text)

    call = '{"name": "get_time", "arguments": {"timezone": "UTC"}}'
    assert accepts("[" + call + "]") and accepts('{"city": "Paris", "temp": 18.5}')
    assert not accepts(call) and not accepts('"text"')
    assert use.parse("[" + call + "]")[1][0]["function"]["name"] == "get_time"
    answer = '{"city": "Paris", "temp": 18.5}'
    assert use.parse(answer) == (answer, None) and use.parse(call) == (call, None)


def test_the_results_of_one_turns_calls_make_one_user_message():
    """Templates that insist on alternating roles refuse two user turns in a row."""
    from server.tool_calls import render_messages

    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
             for i in range(2)]
    rendered = render_messages([ASK[0], {"role": "assistant", "content": None, "tool_calls": calls},
                                {"role": "tool", "tool_call_id": "call_0", "content": "12:00"},
                                {"role": "tool", "tool_call_id": "call_1", "content": "13:00"}], None)
    assert [m["role"] for m in rendered] == ["user", "assistant", "user"]
    assert "call_0" in rendered[2]["content"] and "13:00" in rendered[2]["content"]


def test_with_a_format_beside_tools_past_calls_show_as_a_list_and_a_typeless_object_format_is_taken():
    """Calls are a list in that mode (an object is the format's answer), in the history too; a
    format written as `properties` (or a root `$ref`) with no `type` is an object schema all the same."""
    from server.protocol import ToolUse
    from server.tool_calls import _loosened, render_messages

    call = [{"id": "call_0", "type": "function", "function": {"name": "get_time", "arguments": '{"timezone": "UTC"}'}}]
    history = [ASK[0], {"role": "assistant", "content": None, "tool_calls": call}]
    assert render_messages(history, None, listed=True)[1]["content"].startswith("[{")
    assert render_messages(history, None)[1]["content"].startswith("{")
    answer = {"properties": {"city": {"type": "string"}}, "required": ["city"]}
    assert ToolUse([t["function"] for t in TOOLS], None, None, None, answer=answer).listed
    # a non-strict tool's patternProperties go, and with them a closing additionalProperties
    loose = _loosened({"type": "object", "patternProperties": {"^x": {}}, "additionalProperties": False})
    assert loose == {"type": "object"}


def test_a_call_whose_arguments_hold_a_lone_surrogate_keeps_it_escaped():
    """Free text may escape a lone surrogate (JSON, but no text): the call's arguments keep it as an
    escape, so the response still encodes as UTF-8 (it raised there: a 500)."""
    from server.tool_calls import parse_calls

    calls = parse_calls('{"name": "f", "arguments": {"a": "\\ud800", "b": "é"}}', [{"name": "f"}], False)
    arguments = calls[0]["function"]["arguments"]
    arguments.encode("utf-8")
    assert json.loads(arguments) == {"a": "\ud800", "b": "é"}
    plain = parse_calls('{"name": "f", "arguments": {"b": "é"}}', [{"name": "f"}], False)
    assert plain[0]["function"]["arguments"] == '{"b": "é"}'  # text stays UTF-8 where it can


@pytest.mark.parametrize("function", [
    {"name": "ping"},  # OpenAI: omitting parameters defines a function with an empty parameter list
    {"name": "ping", "parameters": {"type": "object", "properties": {}}},
])
def test_a_forced_call_of_a_tool_without_parameters_has_empty_arguments(client, function):
    """Its arguments were any object, and the model wrote one until max_tokens."""
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Ping the server"}],
                                       tools=[{"type": "function", "function": function}], tool_choice="required",
                                       temperature=0, max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls][0] == ("ping", {})
