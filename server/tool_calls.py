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
  format (and nothing else) comes back as `tool_calls`, any other as content.
- "none": no tools are shown and none is called.
"""
from __future__ import annotations

import json
import uuid

CALL = ("You can call these tools. To call one, answer with a JSON object and nothing else: "
        '{"name": <the tool\'s name>, "arguments": <an object of its parameters>}.')
SEVERAL = " To call several, answer with a JSON list of such objects."
OTHERWISE = " To answer without a tool, write your answer as usual."


MAX_PARALLEL_CALLS = 8  # a small model asked for a list may repeat calls until max_tokens


def tools_message(tools: list[dict], parallel: bool) -> str:
    lines = [CALL + (SEVERAL if parallel else "") + OTHERWISE, "", "Tools:"]
    for tool in tools:
        line = f"- {tool['name']}"
        if tool.get("description"):
            line += f": {tool['description']}"
        lines.append(line)
        lines.append(f"  parameters (JSON schema): {json.dumps(tool.get('parameters') or {'type': 'object'})}")
    return "\n".join(lines)


def render_messages(messages: list[dict], tools: list[dict] | None, parallel: bool = True) -> list[dict]:
    """Chat messages with tool calls and results, as plain roles and text any template takes.
    `messages`: role, content (text or None), and tool_calls / tool_call_id where given; `tools`:
    the functions shown to the model (`parallel`: whether it may call several at once)."""
    names = {}  # call id -> tool name, for the results
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}
                     for c in m["tool_calls"]]
            names.update({c["id"]: c["function"]["name"] for c in m["tool_calls"]})
            text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            out.append({"role": "assistant", "content": ((m["content"] or "") + "\n" + text).strip()})
        elif m["role"] == "tool":
            name = names.get(m.get("tool_call_id"), "a tool")
            out.append({"role": "user", "content": f"Result of {name} (call {m.get('tool_call_id')}):\n{m['content']}"})
        else:
            out.append({"role": m["role"], "content": m["content"] or ""})
    if tools:
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": out[0]["content"] + "\n\n" + tools_message(tools, parallel)}
        else:
            out.insert(0, {"role": "system", "content": tools_message(tools, parallel)})
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # shown as it was sent
        return text


def calls_schema(tools: list[dict], parallel: bool) -> dict:
    """The JSON schema of an answer that calls the given tools: one call, or with `parallel` a list
    of one or more. Each tool's parameters move under the root's `$defs` (their own references
    rewritten to follow them), so a pydantic schema's `#/$defs/...` still finds its definitions."""
    defs = {f"tool{i}": _moved(t.get("parameters") or {"type": "object"}, f"#/$defs/tool{i}")
            for i, t in enumerate(tools)}
    branches = [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": {"$ref": f"#/$defs/tool{i}"}},
                 "required": ["name", "arguments"], "additionalProperties": False} for i, t in enumerate(tools)]
    call = branches[0] if len(branches) == 1 else {"anyOf": branches}
    many = {"type": "array", "items": call, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}
    return {**({"anyOf": [call, many]} if parallel else call), "$defs": defs}


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


def parse_calls(text: str, tools: list[dict], parallel: bool = True) -> list[dict] | None:
    """The answer's tool calls in OpenAI's shape, or None when it is not a call in the format above
    (a list only with `parallel`, and of at most MAX_PARALLEL_CALLS)."""
    try:
        value = json.loads(text, parse_constant=_no_constant)  # NaN and Infinity are no JSON
    except (ValueError, RecursionError):
        return None
    calls = value if isinstance(value, list) else [value]
    names = {t["name"] for t in tools}
    if not calls or len(calls) > (MAX_PARALLEL_CALLS if parallel else 1) or \
            not all(isinstance(c, dict) and set(c) == {"name", "arguments"} and isinstance(c["name"], str)
                    and c["name"] in names and isinstance(c["arguments"], dict) for c in calls):
        return None
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]
