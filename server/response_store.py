"""Stored responses of the Responses API (`store`, the default): what `GET /v1/responses/{id}` and
`/input_items` return and what `previous_response_id` continues.

Each entry keeps the response object and its input items as JSON text (a fraction of the memory of
the same objects in Python), and the conversation it ends as chat messages: every earlier turn's
(their instructions left out, as OpenAI leaves them out), this turn's input and its answer. The
message dicts are shared with the entry before, so a turn adds its own text and one list of
references. Memory is bounded: the least recently used entries go first, past `max_entries` or
once the entries' sizes pass `max_size` characters. An entry's size counts its JSON and its whole
conversation (shared or not), so the bound holds whatever was dropped before it. A later turn keeps
its whole history, so dropping an earlier one breaks nothing but that id.

Each stored response's output and input items can be named by id (`item_reference` input items,
which clients that store their responses send instead of the items themselves): `item(id)`.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_MAX_ENTRIES = 1024
DEFAULT_MAX_SIZE = 64 << 20


@dataclass
class StoredResponse:
    body: str  # the response object as returned (JSON)
    input_items: str  # its input items, each with an id (a JSON list)
    messages: list[dict]  # the conversation through this response's answer (chat messages)
    size: int

    def items(self) -> list[dict]:
        """Its output items, then its input items."""
        return json.loads(self.body).get("output", []) + json.loads(self.input_items)


def _text_size(messages: list[dict]) -> int:
    size = 0
    for m in messages:
        size += len(m.get("content") or "") + len(m.get("reasoning_content") or "")
        for call in m.get("tool_calls") or ():
            size += len(call["function"]["name"]) + len(call["function"]["arguments"])
    return size


class ResponseStore:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_size: int = DEFAULT_MAX_SIZE):
        self.max_entries, self.max_size = max_entries, max_size
        self.entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self.size = 0
        self.item_owners: dict[str, set[str]] = {}  # item id -> the stored responses that hold it (a
        # referenced item is in the referencing response's input too)

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self.entries.get(response_id)
        if entry is not None:
            self.entries.move_to_end(response_id)
        return entry

    def put(self, response_id: str, body: str, input_items: str, earlier: list[dict], added: list[dict]) -> None:
        """Stores a finished response: `earlier`, the messages of the turns before (shared, not
        copied); `added`, this turn's input and answer."""
        messages = earlier + added
        entry = StoredResponse(body, input_items, messages, len(body) + len(input_items) + _text_size(messages))
        self.delete(response_id)
        self.entries[response_id] = entry
        self.size += entry.size
        for item in entry.items():
            if item.get("id"):
                self.item_owners.setdefault(item["id"], set()).add(response_id)
        while len(self.entries) > self.max_entries or self.size > self.max_size and len(self.entries) > 1:
            self.delete(next(iter(self.entries)))

    def item(self, item_id: str) -> dict | None:
        """A stored response's output or input item, by its id (None where none is stored)."""
        return self.finder()(item_id)

    def finder(self):
        """item(id) for many ids (one request's references): each stored response they name is
        parsed once, however many of its items are asked for."""
        parsed: dict[str, dict] = {}  # response id -> its items by id

        def find(item_id: str) -> dict | None:
            owners = self.item_owners.get(item_id)
            if not owners:
                return None
            owner = next(iter(owners))
            if owner not in parsed:
                by_id = parsed[owner] = {}
                for item in self.entries[owner].items():
                    by_id.setdefault(item.get("id"), item)
            return parsed[owner].get(item_id)

        return find

    def delete(self, response_id: str) -> bool:
        entry = self.entries.pop(response_id, None)
        if entry is None:
            return False
        self.size -= entry.size
        for item in entry.items():
            owners = self.item_owners.get(item.get("id"))
            if owners is not None:
                owners.discard(response_id)
                if not owners:
                    del self.item_owners[item["id"]]
        return True
