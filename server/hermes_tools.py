"""Calls in `<tool_call>` tags, the Hermes format (Qwen2.5, Qwen3, QwQ, Hermes 2/3 and their
fine-tunes; vLLM's `hermes` parser): an answer's `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>` blocks are its calls, and the text before the first one its content; an answer with
no block, or a block that is not a call of a listed tool, is all content. Streamed, content goes
out until a block begins (text that may be the start of the tag is held).
"""
from __future__ import annotations

import json

from engine.stop_strings import held_back
from server.tool_calls import MAX_PARALLEL_CALLS, _no_constant, call_bodies, names_a_tool

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def asks_for_it(template: str) -> bool:
    return OPEN in template


def parse(text: str, tools: list[dict], parallel: bool) -> tuple[str | None, list[dict]] | None:
    """(the content before the first block, None where it is blank; the calls), or None where the
    answer holds no call (no block; a block that is no call of a listed tool; more calls than
    allowed). The last block may lack its closing tag (the answer ended after the JSON)."""
    start = text.find(OPEN)
    if start < 0:
        return None
    names = {t["name"] for t in tools}
    calls, at = [], start
    while at >= 0:
        end = text.find(CLOSE, at)
        body = text[at + len(OPEN):end if end >= 0 else len(text)]
        try:
            call = json.loads(body, parse_constant=_no_constant)  # NaN and Infinity are no JSON
        except (ValueError, RecursionError):
            return None
        if not (names_a_tool(call, names) and isinstance(call.get("arguments", {}), dict)):
            return None
        calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
        at = -1 if end < 0 else text.find(OPEN, end)
    if len(calls) > (MAX_PARALLEL_CALLS if parallel else 1):
        return None
    return text[:start].rstrip() or None, call_bodies(calls)


def sendable(text: str) -> int:
    """How much of an answer so far may go out as content: up to a block's tag (or what may begin
    one at the end), trailing whitespace held (it goes before a call)."""
    start = text.find(OPEN)
    if start < 0:
        start = len(text) - held_back(text, OPEN)
    return len(text[:start].rstrip())
