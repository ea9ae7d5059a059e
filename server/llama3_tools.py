"""Calls as Llama 3.1, 3.2 and 3.3 write them (vLLM's `llama3_json` parser): the whole answer is a
call's JSON, `{"name": ..., "parameters": {...}}` (`arguments` taken too), several separated by
`;`, after an optional `<|python_tag|>`. An answer that is anything else is all content; one that
may still become a call (it opens with `{` or the tag) is held while it streams.
"""
from __future__ import annotations

import json

from server.tool_calls import MAX_PARALLEL_CALLS, _no_constant, call_bodies, names_a_tool

TAG = "<|python_tag|>"
ASKS = '"parameters": dictionary of argument name'  # the official templates' instruction


def asks_for_it(template: str) -> bool:
    return ASKS in template or TAG in template


def parse(text: str, tools: list[dict], parallel: bool) -> tuple[None, list[dict]] | None:
    """(None, the calls), or None where the answer is not calls of listed tools (at most one
    without `parallel`)."""
    body = text.strip().removeprefix(TAG).strip()
    names, calls, at = {t["name"] for t in tools}, [], 0
    decoder = json.JSONDecoder(parse_constant=_no_constant)  # NaN and Infinity are no JSON
    while at < len(body):
        try:
            call, at = decoder.raw_decode(body, at)
        except (ValueError, RecursionError):
            return None
        arguments = call.get("parameters", call.get("arguments", {})) if isinstance(call, dict) else None
        if not (names_a_tool(call, names) and isinstance(arguments, dict)
                and set(call) <= {"name", "parameters", "arguments"}):
            return None
        calls.append({"name": call["name"], "arguments": arguments})
        while at < len(body) and body[at] in " \t\r\n;":
            at += 1
    if not calls or len(calls) > (MAX_PARALLEL_CALLS if parallel else 1):
        return None
    return None, call_bodies(calls)


def sendable(text: str) -> int:
    """All of it, unless it may be a call: blank so far, or opening with `{` or the tag."""
    lead = text.lstrip()
    if not lead or lead.startswith("{") or lead.startswith(TAG) or TAG.startswith(lead):
        return 0
    return len(text)
