"""Calls as Mistral's instruct models write them (vLLM's `mistral` parser): `[TOOL_CALLS]` then a
JSON list of `{"name": ..., "arguments": {...}}` (Mistral 7B v0.3, Nemo, Small; a lone object is
taken too), or `[TOOL_CALLS]name[ARGS]{...}` per call (the later tokenizers). `[TOOL_CALLS]` and
`[ARGS]` are control tokens, which such answers' text keeps (`TAG_IS_SPECIAL`: vLLM's mistral parser
asks the same); where the tag shows, the text before it is content, and an answer that is the list
alone is calls too. Anything else is all content.
Streamed, content goes out until the tag, or nothing while the answer may still be a list.

Mistral's templates refuse a history whose call ids are not 9 letters or digits: `call_id` gives
each id such a stand-in (the same for a call and its result), as the template sees them.
"""
from __future__ import annotations

import hashlib
import json
import re

from engine.stop_strings import held_back
from server.tool_calls import MAX_PARALLEL_CALLS, _no_constant, call_bodies, names_a_tool

TAG, ARGS = "[TOOL_CALLS]", "[ARGS]"
TAG_IS_SPECIAL = True  # the answer's text keeps special tokens where calls may come (ToolUse.show_tags)
NAMED = re.compile(r"\s*([A-Za-z0-9_.\-]+)\s*(?:" + re.escape(ARGS) + r")?\s*")  # the later form's `name[ARGS]`
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def asks_for_it(template: str) -> bool:
    return TAG in template or "[AVAILABLE_TOOLS]" in template


def parse(text: str, tools: list[dict], parallel: bool) -> tuple[str | None, list[dict]] | None:
    """(the content before the tag, None where blank or hidden; the calls), or None where the answer
    is no calls of listed tools (at most one without `parallel`)."""
    start = text.find(TAG)
    content, body = (text[:start].rstrip() or None, text[start + len(TAG):]) if start >= 0 else (None, text)
    names = {t["name"] for t in tools}
    calls = _listed(body.strip(), names) if body.strip().startswith(("[", "{")) else None
    if calls is None and start >= 0:
        calls = _named(body, names)
    if not calls or len(calls) > (MAX_PARALLEL_CALLS if parallel else 1):
        return None
    return content, call_bodies(calls)


def _listed(body: str, names: set[str]) -> list[dict] | None:
    """Calls from a JSON list of them (or one object) that is the whole body."""
    try:
        value, end = json.JSONDecoder(parse_constant=_no_constant).raw_decode(body)
    except (ValueError, RecursionError):
        return None
    if body[end:].strip():
        return None
    calls = []
    for call in value if isinstance(value, list) else [value]:
        if not (names_a_tool(call, names) and set(call) <= {"name", "arguments", "id"}):
            return None
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # arguments as JSON text, as some fine-tunes write them
            try:
                arguments = json.loads(arguments, parse_constant=_no_constant)
            except (ValueError, RecursionError):
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append({"name": call["name"], "arguments": arguments})
    return calls


def _named(body: str, names: set[str]) -> list[dict] | None:
    """Calls of the form `name[ARGS]{...}`, each after its own tag."""
    decoder, calls = json.JSONDecoder(parse_constant=_no_constant), []
    for part in body.split(TAG):
        if not part.strip():  # a stray tag
            continue
        head = NAMED.match(part)
        if not head or head.group(1) not in names:
            return None
        try:
            arguments, end = decoder.raw_decode(part, head.end())
        except (ValueError, RecursionError):
            return None
        if not isinstance(arguments, dict) or part[end:].strip():
            return None
        calls.append({"name": head.group(1), "arguments": arguments})
    return calls


def sendable(text: str) -> int:
    """Up to the tag (less a tail that may begin it; trailing whitespace held, it goes before a call),
    or nothing while the answer may be a list: blank so far, or opening with `[` or `{`."""
    lead = text.lstrip()
    if not lead or lead.startswith(("[", "{")):
        return 0
    start = text.find(TAG)
    return len(text[:start if start >= 0 else len(text) - held_back(text, TAG)].rstrip())


def call_id(id_: str) -> str:
    """A call id as Mistral's templates take one: 9 letters or digits (itself where it is one)."""
    if len(id_) == 9 and id_.isascii() and id_.isalnum():
        return id_
    number = int.from_bytes(hashlib.sha256(id_.encode()).digest()[:8], "big")
    return "".join(ALPHABET[number // len(ALPHABET) ** i % len(ALPHABET)] for i in range(9))
