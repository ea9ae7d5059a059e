"""Stored responses of the Responses API (`store`, the default): what `GET /v1/responses/{id}` returns
and what `previous_response_id` continues.

Each entry keeps the response object and the conversation it ends: the messages of every earlier
turn (their instructions left out, as OpenAI leaves them out), this turn's input and its answer.
The message dicts are shared with the entry before, so a turn costs its own text and one list of
references. Memory is bounded: the least recently used entries go first, past `max_entries` or
once the entries' own text passes `max_chars`. A later turn keeps its whole history, so dropping
an earlier one breaks nothing but that id.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_MAX_ENTRIES = 1024
DEFAULT_MAX_CHARS = 64 << 20


@dataclass
class StoredResponse:
    body: dict  # the response object as returned
    messages: list[dict]  # the conversation through this response's answer (chat messages)
    chars: int  # the text this entry added


def _text_size(messages: list[dict]) -> int:
    size = 0
    for m in messages:
        size += len(m.get("content") or "")
        for call in m.get("tool_calls") or ():
            size += len(call["function"]["name"]) + len(call["function"]["arguments"])
    return size


class ResponseStore:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_chars: int = DEFAULT_MAX_CHARS):
        self.max_entries, self.max_chars = max_entries, max_chars
        self.entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self.chars = 0

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self.entries.get(response_id)
        if entry is not None:
            self.entries.move_to_end(response_id)
        return entry

    def put(self, body: dict, earlier: list[dict], added: list[dict]) -> None:
        """Stores a finished response: `earlier`, the messages of the turns before (shared, not
        copied); `added`, this turn's input and answer."""
        entry = StoredResponse(body, earlier + added, _text_size(added))
        self.delete(body["id"])
        self.entries[body["id"]] = entry
        self.chars += entry.chars
        while len(self.entries) > self.max_entries or self.chars > self.max_chars and len(self.entries) > 1:
            _, dropped = self.entries.popitem(last=False)
            self.chars -= dropped.chars

    def delete(self, response_id: str) -> bool:
        entry = self.entries.pop(response_id, None)
        if entry is None:
            return False
        self.chars -= entry.chars
        return True
