"""Tool calls in the template's own format (server/template_tools.py), for the four formats:
hermes (tests/data/hermes_template.jinja, as Qwen2.5's: tools listed in the system turn, calls in
<tool_call> tags, results in <tool_response>), llama3_json (tests/data/llama3_template.jinja:
Llama 3.1's instruction, tools in the first user turn and calls as {"name", "parameters"} JSON)
mistral (tests/data/mistral_template.jinja: [AVAILABLE_TOOLS], [TOOL_CALLS] and a list, and
9-character call ids or an error) and openai (tests/data/openai_template.jinja: gpt-oss's harmony,
calls as messages to functions.NAME, which the harmony split reads), in ChatML turns, which the embedded model follows better than
the models' own header tokens, text to it.
Given with --chat-template, each is recognised (--tool-call-parser auto); the embedded model,
shown a history of such calls rendered by the template, answers a new question with a call of its
own, which comes back as tool_calls, streamed or not, through chat and the Responses API."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from server import hermes_tools, llama3_tools, mistral_tools, template_tools
from tests.conftest import MODEL, ServerProcess

DATA = Path(__file__).parent / "data"
TEMPLATE = DATA / "hermes_template.jinja"
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER}]
ANSWER = 64  # tokens a call may take (Mistral's writes an id of 9 characters too)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def test_blocks_are_calls_and_what_comes_before_them_content():
    calls = hermes_tools.parse("Let me look.\n" + CALL + "\n" + CALL.replace("Oslo", "Rome"), [WEATHER], True)
    assert calls[0] == "Let me look."
    assert [json.loads(c["function"]["arguments"]) for c in calls[1]] == [{"city": "Oslo"}, {"city": "Rome"}]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls[1])
    assert hermes_tools.parse(CALL, [WEATHER], True)[0] is None
    assert hermes_tools.parse(CALL.removesuffix("</tool_call>"), [WEATHER], True)[1]  # ended after the JSON
    assert hermes_tools.parse("No call here.", [WEATHER], True) is None
    assert hermes_tools.parse(CALL.replace("get_weather", "get_time"), [WEATHER], True) is None  # not a listed tool
    assert hermes_tools.parse(CALL.replace("}}", "}"), [WEATHER], True) is None  # no JSON
    assert hermes_tools.parse(CALL + CALL, [WEATHER], False) is None  # two calls, parallel_tool_calls false
    for odd in ('{"name": ["get_weather"], "arguments": {}}', '{"name": "get_weather", "arguments": {"t": NaN}}'):
        assert hermes_tools.parse(f"<tool_call>{odd}</tool_call>", [WEATHER], True) is None  # no call, no error
        assert llama3_tools.parse(odd, [WEATHER], True) is None
    assert hermes_tools.parse('<tool_call>{"name": "get_weather"}</tool_call>', [WEATHER], True)[1][0][
        "function"]["arguments"] == "{}"


def test_content_streams_up_to_a_tag():
    assert hermes_tools.sendable("Hello there") == len("Hello there")
    assert hermes_tools.sendable("Hello <tool") == len("Hello")  # may be the tag: held
    assert hermes_tools.sendable("Hello\n<tool_call>\n{") == len("Hello")
    assert hermes_tools.sendable("a < b") == len("a < b")
    assert hermes_tools.sendable("text \n") == len("text")  # whitespace before a call is held


@pytest.mark.parametrize("fmt, answer", [
    ("hermes", " Let me check the weather.\n" + CALL),
    ("mistral", " Let me check the weather.[TOOL_CALLS]" + json.dumps([{"name": "get_weather",
                                                                          "arguments": {"city": "Oslo"}}])),
    ("openai", " Let me check the weather.\n to=functions.get_weather<|message|>{\"city\": \"Oslo\"}"),
])
def test_what_streams_before_a_call_is_where_the_calls_content_begins(fmt, answer):
    """Streaming sends `sendable` characters of each unfinished answer, then the rest of the parsed
    content by that count: harmony's parse stripped the preamble's leading space that sendable
    counted, so a stream cut there lost a character (' Let me checkthe weather.')."""
    module = template_tools.FORMATS[fmt]
    content = module.parse(answer, [WEATHER], parallel=True)[0] or ""
    for cut in range(len(answer) + 1):
        sent = answer[:module.sendable(answer[:cut])]
        assert content.startswith(sent), (cut, sent, content)


def test_llama3_answers_that_are_a_calls_json_are_calls():
    call = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    content, calls = llama3_tools.parse(call, [WEATHER], True)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert len(llama3_tools.parse("<|python_tag|>" + call + "; " + call, [WEATHER], True)[1]) == 2
    assert llama3_tools.parse(call.replace("parameters", "arguments"), [WEATHER], True)
    assert llama3_tools.parse(call + " and more", [WEATHER], True) is None
    assert llama3_tools.parse("It is sunny.", [WEATHER], True) is None
    assert llama3_tools.parse(call + call, [WEATHER], False) is None
    assert llama3_tools.parse(call.replace("get_weather", "get_time"), [WEATHER], True) is None
    assert llama3_tools.sendable("It is") == 5 and llama3_tools.sendable(" {") == 0
    assert llama3_tools.sendable("<|py") == 0 and llama3_tools.sendable("") == 0


def test_mistral_answers_after_the_tag_or_that_are_a_list_of_calls_are_calls():
    """[TOOL_CALLS] is a control token the answer's text drops: a list of calls alone is calls; where
    the tag shows, the text before it is content; the later `name[ARGS]{...}` form is taken too."""
    listed = '[{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "a1b2c3d4e"}]'
    for text in (listed, " [TOOL_CALLS] " + listed, '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}',
                 '{"name": "get_weather", "arguments": {"city": "Oslo"}}'):
        content, calls = mistral_tools.parse(text, [WEATHER], True)
        assert content is None and [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Oslo"}]
    content, calls = mistral_tools.parse("Let me look. [TOOL_CALLS]" + listed[:-1] + ", " + listed[1:], [WEATHER], True)
    assert content == "Let me look." and len(calls) == 2
    two = '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}'
    assert len(mistral_tools.parse(two + "[TOOL_CALLS]", [WEATHER], True)[1]) == 2  # a stray tag
    texts = mistral_tools.parse('[{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}]', [WEATHER], True)
    assert json.loads(texts[1][0]["function"]["arguments"]) == {"city": "Oslo"}  # arguments as JSON text
    assert len(mistral_tools.parse(two, [WEATHER], True)[1]) == 2 and mistral_tools.parse(two, [WEATHER], False) is None
    for text in ("[1, 2]", "[see above]", listed.replace("get_weather", "get_time"), "It is sunny.", listed + " ok",
                 '[{"name": ["get_weather"], "arguments": {}}]', '[TOOL_CALLS]get_weather[ARGS]{"city": NaN}'):
        assert mistral_tools.parse(text, [WEATHER], True) is None, text
    assert mistral_tools.sendable("It is") == 5 and mistral_tools.sendable(" [") == 0
    assert mistral_tools.sendable("Sure. [TOOL") == 5 and mistral_tools.sendable("Sure.\n[TOOL_CALLS][") == 5
    assert mistral_tools.sendable("") == 0 and mistral_tools.sendable("{") == 0
    ids = {mistral_tools.call_id(i) for i in ("call_0", "call_1", "call_" + "f" * 24)}
    assert len(ids) == 3 and all(len(i) == 9 and i.isalnum() for i in ids)
    assert mistral_tools.call_id("call_0") == mistral_tools.call_id("call_0")
    # a real Mistral tokenizer's [TOOL_CALLS] is a special token: its text is kept where calls may come
    from engine.sampling_params import SamplingParams
    from server.protocol import ToolUse

    for format_, auto, skips in (("mistral", True, False), ("hermes", True, True), ("mistral", False, True)):
        use = ToolUse([WEATHER], "auto" if auto else "required", None, None)
        use.format = format_
        assert use.show_tags(SamplingParams()).skip_special_tokens is skips
    assert mistral_tools.call_id("a1b2c3d4e") == "a1b2c3d4e"


def test_the_template_gets_the_calls_arguments_as_objects():
    messages = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"}]
    shown = template_tools.template_messages(messages)
    assert shown[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1} and shown[0]["content"] == ""
    assert shown[1] == messages[1] and messages[0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'
    assert template_tools.detect(TEMPLATE.read_text()) == "hermes" and template_tools.detect("{{ messages }}") == "json"
    assert template_tools.detect((DATA / "llama3_template.jinja").read_text()) == "llama3_json"
    assert template_tools.detect((DATA / "mistral_template.jinja").read_text()) == "mistral"
    shown = template_tools.template_messages(messages, "mistral")  # ids as Mistral's templates take them
    assert shown[0]["tool_calls"][0]["id"] == shown[1]["tool_call_id"] == mistral_tools.call_id("call_1")


FORMATS = {  # template -> what the history's calls look like in the prompt, what the model's answer opens with
    "hermes": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Vienna"}}\n</tool_call>', "<tool_call>"),
    "llama3_json": ('{"name": "get_weather", "parameters": {"city": "Vienna"}}', '{"name": "get_weather"'),
    "mistral": ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Vienna"}, "id": "', '[TOOL_CALLS] ['),
    "openai": ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Vienna"}',
               "<|channel|>commentary to=functions.get_weather"),
}


@pytest.fixture(scope="module", params=list(FORMATS))
def template_server(request):
    srv = ServerProcess("--chat-template", str(DATA / f"{request.param.split('_')[0]}_template.jinja"),
                        "--max-num-seqs", "4", "--device", "cpu")
    srv.format = request.param
    yield srv
    srv.stop()


def history() -> list[dict]:
    """Three questions answered by a call, its result and a sentence, then a fourth question."""
    messages = []
    for i, city in enumerate(["Paris", "Rome", "Oslo", "Madrid", "Vienna"]):
        messages += [{"role": "user", "content": f"What is the weather in {city}?"},
                     {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{i}", "type": "function",
                      "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
                     {"role": "tool", "tool_call_id": f"call_{i}", "content": '{"temp": 20}'},
                     {"role": "assistant", "content": "20 degrees."}]
    return messages + [{"role": "user", "content": "What is the weather in Berlin?"}]


def test_a_call_in_the_templates_format_comes_back_as_tool_calls(template_server):
    import openai

    url = template_server.url
    shown, opening = FORMATS[template_server.format]
    prompt = httpx.post(url + "/tokenize", json={"messages": history(), "tools": TOOLS}, timeout=60).json()["tokens"]
    text = httpx.post(url + "/detokenize", json={"tokens": prompt}, timeout=60).json()["prompt"]
    # the template's own rendering: the tools, earlier calls and results as it shows them
    assert shown in text and '"description": "Current weather in a city"' in text
    assert "You can call these tools" not in text  # not server/tool_calls.py's listing
    raw = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": ANSWER,
                                                    "temperature": 0}, timeout=60).json()["choices"][0]["text"]
    assert raw.startswith(opening)  # the model answers in the template's format
    parser = template_tools.FORMATS[template_server.format]
    expected = json.loads(parser.parse(raw, [WEATHER], True)[1][0]["function"]["arguments"])

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=MODEL, messages=history(), tools=TOOLS, max_tokens=ANSWER,
                                           temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [json.loads(c.function.arguments) for c in choice.message.tool_calls] == [expected]

    chunks = list(client.chat.completions.create(model=MODEL, messages=history(), tools=TOOLS, max_tokens=ANSWER,
                                                 temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas)  # nothing of the block went out as content
    assert deltas[0].role == "assistant" and deltas[0].content == ""  # (sent before the answer shows it is calls)
    streamed = [call for d in deltas for call in d.tool_calls or []]
    assert [json.loads(c.function.arguments) for c in streamed] == [expected]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # cut by max_tokens once the call is whole, its closing tag unwritten: the call (as vLLM's parsers read it)
    tokens = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": ANSWER,
                                                       "temperature": 0, "logprobs": 0},
                        timeout=60).json()["choices"][0]["logprobs"]["tokens"]
    assert "".join(tokens).startswith(raw)  # (and the turn's end token, whose text the answer leaves out)
    whole_at = next(k for k in range(1, len(tokens) + 1) if parser.parse("".join(tokens[:k]), [WEATHER], True))
    assert whole_at < len(tokens) or template_server.format != "hermes"  # (hermes: </tool_call> follows)
    if whole_at < len(tokens):
        cut = client.chat.completions.create(model=MODEL, messages=history(), tools=TOOLS, max_tokens=whole_at,
                                             temperature=0).choices[0]
        assert cut.finish_reason == "length" and cut.message.content is None
        assert [json.loads(c.function.arguments) for c in cut.message.tool_calls] == [expected]

    # the SDK's way on: the reply's message and the tool's result appended, rendered by the template
    again = history() + [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": '{"temp": 9}'}]
    follow = client.chat.completions.create(model=MODEL, messages=again, tools=TOOLS, max_tokens=8, temperature=0)
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")

    forced = client.chat.completions.create(model=MODEL, messages=history(), tools=TOOLS, max_tokens=ANSWER,
                                            temperature=0, tool_choice="required")  # the grammar's JSON, no tags
    assert forced.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_the_responses_api_returns_the_templates_calls_as_function_call_items(template_server):
    import openai

    client = openai.OpenAI(base_url=template_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    tools = [{"type": "function", **WEATHER}]
    items = []  # the history as Responses input items
    for m in history():
        if m.get("tool_calls"):
            items += [{"type": "function_call", "call_id": c["id"], "name": c["function"]["name"],
                       "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
        elif m["role"] == "tool":
            items.append({"type": "function_call_output", "call_id": m["tool_call_id"], "output": m["content"]})
        else:
            items.append(m)
    response = client.responses.create(model=MODEL, input=items, tools=tools, max_output_tokens=ANSWER, temperature=0)
    assert [item.type for item in response.output] == ["function_call"]
    assert json.loads(response.output[0].arguments) == {"city": "Berlin"}
    with client.responses.stream(model=MODEL, input=items, tools=tools, max_output_tokens=ANSWER,
                                 temperature=0) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.output_text.delta" not in kinds and "response.function_call_arguments.done" in kinds
    assert [item.type for item in final.output] == ["function_call"] and final.output[0].name == "get_weather"


def test_reasoning_effort_reaches_a_template_that_reads_it(template_server):
    """gpt-oss's template reads `reasoning_effort` (as vLLM hands it over); templates that read none
    refuse it (tests/test_api_errors.py)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    r = httpx.post(template_server.url + "/v1/chat/completions", json={**body, "reasoning_effort": "high"}, timeout=60)
    if template_server.format != "openai":
        assert r.status_code == 400 and "reasoning_effort" in r.json()["error"]["message"]
        return
    plain = httpx.post(template_server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]  # "Reasoning: high" in the prompt
    # the Responses API's `reasoning.effort` goes the same way
    asked = {"model": MODEL, "input": "Hi", "max_output_tokens": 1}
    high = httpx.post(template_server.url + "/v1/responses", json={**asked, "reasoning": {"effort": "high"}}, timeout=60)
    assert high.status_code == 200 and high.json()["reasoning"] == {"effort": "high", "summary": None}
    low = httpx.post(template_server.url + "/v1/responses", json=asked, timeout=60).json()
    assert high.json()["usage"]["input_tokens"] > low["usage"]["input_tokens"] and low["reasoning"]["effort"] is None
