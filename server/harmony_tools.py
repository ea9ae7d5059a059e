"""Calls as gpt-oss writes them (harmony: a message to `functions.NAME` whose body is the arguments'
JSON), in the content as server/harmony.py passes them on: `CALL` + recipient + `<|message|>` +
arguments. The text before the call is content (a preamble); the template shows the tools in its
own developer message. Harmony ends a generation at a call's `<|call|>`, so an answer makes one
call at most. Streamed, content goes out until the call.
"""
from __future__ import annotations

import json
import re

from engine.stop_strings import held_back
from server.harmony import CALL, FUNCTIONS, MESSAGE, writes_harmony
from server.tool_calls import _no_constant, call_bodies

TAG_IS_SPECIAL = True  # the answer's text keeps special tokens (harmony's headers are made of them)
OPENS = CALL + FUNCTIONS  # where a call to a client's tool starts in the content
NAME = re.compile(re.escape(FUNCTIONS) + r"([^\s<]+)")  # (in a raw header a content type may follow the name)


def asks_for_it(template: str) -> bool:
    return writes_harmony(template)


def parse(text: str, tools: list[dict], parallel: bool) -> tuple[str | None, list[dict]] | None:
    """(the content before the call, None where blank; the call), or None where the answer calls no
    listed tool with an object of arguments."""
    start = text.find(OPENS)
    if start < 0:
        return None
    header, sep, arguments = text[start + len(CALL):].partition(MESSAGE)
    name = NAME.match(header)
    if not sep or not name or name.group(1) not in {t["name"] for t in tools}:
        return None
    name = name.group(1)
    try:
        value = json.loads(arguments, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    return text[:start].rstrip() or None, call_bodies([{"name": name, "arguments": value}])  # as sendable holds it


def sendable(text: str) -> int:
    """Up to the call (less a tail that may begin one), trailing whitespace held."""
    start = text.find(OPENS)
    return len(text[:start if start >= 0 else len(text) - held_back(text, OPENS)].rstrip())
