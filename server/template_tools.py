"""Tools shown by the model's own chat template, for templates that render `tools` and name a call
format of their own (vLLM's `--tool-call-parser`; llama.cpp's server reads the format from the
template, as `--tool-call-parser auto` does here):

- `hermes` (server/hermes_tools.py): calls in `<tool_call>` tags (Qwen2.5, Qwen3, QwQ, Hermes);
- `llama3_json` (server/llama3_tools.py): an answer that is a call's JSON with `parameters`
  (Llama 3.1, 3.2 and 3.3);
- `mistral` (server/mistral_tools.py): `[TOOL_CALLS]` and a list of calls (Mistral 7B v0.3, Nemo,
  Small);
- `openai` (server/harmony_tools.py): harmony's messages to `functions.NAME` (gpt-oss).

The template gets the tools (`{"type": "function", "function": ...}` each) and the history as it
is: assistant messages with their `tool_calls` (arguments as objects, as vLLM hands them to
templates) and `tool` messages. Each format module has `parse(text, tools, parallel)` -> (content
before the calls or None, calls) or None where the answer makes none, and `sendable(text)`: how
much of an unfinished answer may stream as content; a module with `call_id(id)` shows the
history's call ids to the template through it. A forced call (`required`, a named function)
and "auto" beside a response format keep the grammar of server/tool_calls.py: the answer is the
call's JSON in that module's shape, whatever the template asks.
"""
from __future__ import annotations

from server import harmony_tools, hermes_tools, llama3_tools, mistral_tools
from server.tool_calls import _arguments

FORMATS = {"hermes": hermes_tools, "llama3_json": llama3_tools, "mistral": mistral_tools, "openai": harmony_tools}
PARSERS = ("auto", "json", *FORMATS)


def detect(template: str | None) -> str:
    """The call format a chat template asks for: one of FORMATS, or "json" (ours, for templates
    that know no tools)."""
    for name, module in FORMATS.items():
        if template and "tools" in template and module.asks_for_it(template):
            return name
    return "json"


def template_tools(tools: list[dict]) -> list[dict]:
    return [{"type": "function", "function": tool} for tool in tools]


def template_messages(messages: list[dict], format_: str | None = None) -> list[dict]:
    """A chat's messages as such templates read them: calls' arguments as objects (text that is no
    JSON stays text), ids as the format shows them, an assistant's reasoning_content also as
    `thinking` (gpt-oss's name; not beside a call's content, which its template refuses),
    everything else as it came."""
    shown = getattr(FORMATS.get(format_), "call_id", lambda id_: id_)
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{**c, "id": shown(c["id"]),
                      "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
                     for c in m["tool_calls"]]
            m = {**m, "tool_calls": calls}
        if m.get("tool_call_id") is not None:
            m = {**m, "tool_call_id": shown(m["tool_call_id"])}
        if m.get("reasoning_content") and "thinking" not in m and not (m.get("tool_calls") and m.get("content")):
            m = {**m, "thinking": m["reasoning_content"]}  # gpt-oss's name (which refuses it beside a call's content)
        out.append(m if m.get("content") is not None or m["role"] != "assistant" else {**m, "content": ""})
    return out
