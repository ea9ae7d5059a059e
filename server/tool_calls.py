"""Tool calls (`tools`, `tool_choice`) for models whose chat template knows no tools.

Neither embedded model's template renders tools, so the server uses one generic format, as
llama.cpp's server does for such templates: a system message lists the tools and asks for a call as
a JSON object `{"name": ..., "arguments": {...}}` (or a list of them); earlier calls in the history
are shown to the model in that format, and tool results as user messages naming their call.

- `tool_choice` "required" or a named function: the answer is held to the calls' JSON schema
  (engine/structured), a union of the tools' objects told apart by their `name`, so it is always a
  well-formed call of a listed tool with arguments that follow its `parameters`: one call for a
  named function, and for "required" one or a list of up to `MAX_PARALLEL_CALLS` (one only with
  `parallel_tool_calls: false`).
- "auto" (the default with tools): the model answers freely; an answer that is a call in this
  format (and nothing else) comes back as `tool_calls`, any other as content. With a response
  format too (an object schema: what agent frameworks send for a typed final answer), the answer
  is held to "a list of calls, or the format": calls come as a JSON list (`[`), the format's object
  (`{`) as content.
- A tool without `strict: true` has the keywords the grammar cannot hold (`uniqueItems`,
  `patternProperties`, a `pattern` with lookahead, ...) read as annotations where its call is held to the
  schema, as OpenAI's non-strict tools take any schema; with `strict: true` they are refused by name.
- "none": no tools are shown and none is called.
"""
from __future__ import annotations

import json
import re
import uuid

from engine.structured.schema import KEYWORDS as SCHEMA_KEYWORDS
from engine.structured.schema import LOOSE, LOOSE_MARK, VALUE_KEYWORDS

CALL = ("You can call these tools. To call one, answer with a JSON object and nothing else: "
        '{"name": <the tool\'s name>, "arguments": <an object of its parameters>}.')
SEVERAL = " To call several, answer with a JSON list of such objects."
OTHERWISE = " To answer without a tool, write your answer as usual."
LISTED = ("You can call these tools. To call them, answer with a JSON list of calls and nothing else: "
          '[{"name": <the tool\'s name>, "arguments": <an object of its parameters>}]. '
          "To answer without a tool, answer in the JSON format asked.")


MAX_PARALLEL_CALLS = 8  # a small model asked for a list may repeat calls until max_tokens


def tools_message(tools: list[dict], parallel: bool, listed: bool = False) -> str:
    lines = [LISTED if listed else CALL + (SEVERAL if parallel else "") + OTHERWISE, "", "Tools:"]
    for tool in tools:
        line = f"- {tool['name']}"
        if tool.get("description"):
            line += f": {tool['description']}"
        lines.append(line)
        lines.append(f"  parameters (JSON schema): {json.dumps(tool.get('parameters') or {'type': 'object'})}")
    return "\n".join(lines)


def _with_reasoning(rendered: dict, message: dict) -> dict:
    if message.get("reasoning_content"):
        rendered["reasoning_content"] = message["reasoning_content"]
    return rendered


def render_messages(messages: list[dict], tools: list[dict] | None, parallel: bool = True,
                    listed: bool = False) -> list[dict]:
    """Chat messages with tool calls and results, as plain roles and text any template takes.
    `messages`: role, content (text or None), and tool_calls / tool_call_id / an assistant's
    reasoning_content (kept for the template: thinking models' templates read it) where given; `tools`:
    the functions shown to the model (`parallel`: whether it may call several at once; `listed`:
    calls come as a list, beside a response format). The results of one turn's calls make one user
    message (templates that insist on alternating roles refuse two user turns in a row)."""
    names = {}  # call id -> tool name, for the results
    out = []
    results_at, results = None, []  # where the user message holding the latest run of results is, its parts
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}
                     for c in m["tool_calls"]]
            names.update({c["id"]: c["function"]["name"] for c in m["tool_calls"]})
            text = json.dumps(calls[0] if len(calls) == 1 and not listed else calls, ensure_ascii=False)
            out.append(_with_reasoning({"role": "assistant", "content": ((m["content"] or "") + "\n" + text).strip()},
                                       m))
        elif m["role"] == "tool":
            name = names.get(m.get("tool_call_id"), "a tool")
            result = f"Result of {name} (call {m.get('tool_call_id')}):\n{m['content']}"
            if results_at != len(out) - 1:
                out.append({"role": "user", "content": None})  # joined below: linear in the results
                results_at, results = len(out) - 1, []
            results.append(result)
            out[results_at]["content"] = results
        else:
            out.append(_with_reasoning({"role": m["role"], "content": m["content"] or ""}, m))
    for m in out:
        if isinstance(m["content"], list):
            m["content"] = "\n\n".join(m["content"])
    if tools:
        listing = tools_message(tools, parallel, listed)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": out[0]["content"] + "\n\n" + listing}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # shown as it was sent
        return text


def calls_schema(tools: list[dict], parallel: bool, answer: dict | None = None) -> dict:
    """The JSON schema of an answer that calls the given tools: one call, or with `parallel` a list
    of one or more; with an `answer` schema (an object's: a response format beside tools in auto
    mode), a list of calls (one at most without `parallel`) or that answer. Each tool's parameters
    (and the answer) move under the root's `$defs` (their own references rewritten to follow
    them), so a pydantic schema's `#/$defs/...` still finds its definitions."""
    defs = {f"tool{i}": _moved(_parameters(t), f"#/$defs/tool{i}") for i, t in enumerate(tools)}
    branches = [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": {"$ref": f"#/$defs/tool{i}"}},
                 "required": ["name", "arguments"], "additionalProperties": False} for i, t in enumerate(tools)]
    call = branches[0] if len(branches) == 1 else {"anyOf": branches}
    many = {"type": "array", "items": call, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS if parallel else 1}
    if answer is not None:
        defs["answer"] = _moved(answer, "#/$defs/answer")
        return {"anyOf": [many, {"$ref": "#/$defs/answer"}], "$defs": defs}
    return {**({"anyOf": [call, many]} if parallel else call), "$defs": defs}


NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def _parameters(tool: dict) -> dict:
    """A tool's parameters schema; without `strict: true`, what the grammar cannot hold left out.
    A tool without one takes no arguments (OpenAI: "omitting parameters defines a function with an
    empty parameter list"): its call's arguments are `{}`."""
    schema = tool.get("parameters") or NO_PARAMETERS
    return schema if tool.get("strict") is True else _loosened(schema)


def _loosened(schema):
    """`schema` with the keywords engine/structured refuses (`uniqueItems`, `patternProperties`, ...)
    dropped, at every level, and marked loose (a string's or number's keywords that do not compile
    are dropped where it is compiled, off the event loop): a wider schema, whose every document
    still has the shape asked."""
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if k in SCHEMA_KEYWORDS}
    if not (VALUE_KEYWORDS | {"format"}).isdisjoint(out):
        out[LOOSE] = LOOSE_MARK
    if "patternProperties" in schema and out.get("additionalProperties") is False:
        del out["additionalProperties"]  # the keys the patterns allowed stay allowed
    for key in ("properties", "$defs", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {name: _loosened(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties"):
        if key in out:
            out[key] = _loosened(out[key])
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [_loosened(sub) for sub in out[key]]
    return out


def _moved(schema, root: str):
    """`schema` with each local reference (`#...`) made relative to `root`, where it now lives."""
    if isinstance(schema, dict):
        return {k: root + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else _moved(v, root)
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_moved(v, root) for v in schema]
    return schema


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def names_a_tool(call, names: set[str]) -> bool:
    """Whether a value the model wrote is an object naming one of the listed tools (a name that is
    no string, a list say, is none of them: no unhashable lookup)."""
    return isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"] in names


def parse_calls(text: str, tools: list[dict], parallel: bool = True, listed: bool = False) -> list[dict] | None:
    """The answer's tool calls in OpenAI's shape, or None when it is not a call in the format above
    (a list only with `parallel` or `listed`, of at most MAX_PARALLEL_CALLS, one without `parallel`;
    with `listed` only a list: an object is the response format's answer)."""
    try:
        value = json.loads(text, parse_constant=_no_constant)  # NaN and Infinity are no JSON
    except (ValueError, RecursionError):
        return None
    if listed and not isinstance(value, list) or isinstance(value, list) and not (parallel or listed):
        return None
    calls = value if isinstance(value, list) else [value]
    names = {t["name"] for t in tools}
    if not calls or len(calls) > (MAX_PARALLEL_CALLS if parallel else 1) or \
            not all(names_a_tool(c, names) and set(c) == {"name", "arguments"} and isinstance(c["arguments"], dict)
                    for c in calls):
        return None
    return call_bodies(calls)


# where a call's arguments begin in the JSON a forced call's grammar writes (`name` first, as the
# schema lists it; names are [a-zA-Z0-9_-]: no escapes)
CALL_OPENING = re.compile(r'"name"\s*:\s*"([a-zA-Z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*')
# a call whose name was finished and the cut came before its arguments began (`"name": "f", "argu`)
NAME_ONLY = re.compile(r'"name"\s*:\s*"([a-zA-Z0-9_-]{1,64})"\s*(?:,\s*(?:"(?:a(?:r(?:g(?:u(?:m(?:e(?:n(?:t(?:s(?:"\s*(?::\s*)?)?)?)?)?)?)?)?)?)?)?)?)?\Z')


def cut_calls(text: str, tools: list[dict]) -> list[dict]:
    """The calls of a forced answer that `max_tokens` cut off, as OpenAI returns such an answer:
    each call whose name the model finished, in OpenAI's shape, the last one with its arguments as
    far as they were written (a JSON prefix, maybe empty); none where no name was finished."""
    names, decoder = {t["name"] for t in tools}, json.JSONDecoder(parse_constant=_no_constant)
    calls, at = [], 0
    while (opening := CALL_OPENING.search(text, at)) is not None:
        try:
            arguments, at = decoder.raw_decode(text, opening.end())
            arguments = _arguments_text(arguments)
        except (ValueError, RecursionError):  # the call the cut went through
            arguments, at = text[opening.end():], len(text)
        if opening.group(1) in names:
            calls.append(call_body(opening.group(1), arguments))
    if at < len(text) and (named := NAME_ONLY.search(text, at)) is not None and named.group(1) in names:
        calls.append(call_body(named.group(1), ""))
    return calls


def whole_arguments(call: dict) -> bool:
    """Whether a call's arguments are whole JSON (those of a call `max_tokens` cut through are not)."""
    try:
        json.loads(call["function"]["arguments"], parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return False
    return True


def call_bodies(calls: list[dict]) -> list[dict]:
    """Calls ({"name", "arguments": an object}) in OpenAI's shape, each with a new id."""
    return [call_body(c["name"], _arguments_text(c["arguments"])) for c in calls]


def call_body(name: str, arguments: str) -> dict:
    """A call of `name` with `arguments` (JSON text) in OpenAI's shape, with a new id."""
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": {"name": name, "arguments": arguments}}


def _arguments_text(arguments: dict) -> str:
    """The arguments as JSON text, in UTF-8 where they are text; a lone surrogate (an escape a
    free-text answer may hold: JSON, but no text) stays escaped rather than fail the response."""
    text = json.dumps(arguments, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(arguments)
    return text
