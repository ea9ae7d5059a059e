"""`x-request-id` on every answer, as OpenAI sends it (the `openai` SDK shows it as a response's
`_request_id` and an error's `request_id`): the client's own where it sent a usable one (as vLLM's
`--enable-request-id-headers` echoes it), else a fresh `req_...`; on Anthropic's Messages routes
also as `request-id`, the header the `anthropic` SDK reads (its `_request_id`, an error's
`request_id`). A plain ASGI middleware."""
from __future__ import annotations

import re
import uuid

from server.errors import is_anthropic

HEADER = b"x-request-id"
ANTHROPIC_HEADER = b"request-id"
_USABLE = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")  # what goes back into a header and a log as it is


def client_request_id(headers) -> str | None:
    """The x-request-id the client sent, where it is usable (what the middleware echoes), else None."""
    given = (headers.getlist("x-request-id") or [None])[-1]  # the last of several, as the middleware takes it
    return given if given is not None and _USABLE.fullmatch(given.encode("latin-1")) else None


def request_id(headers) -> bytes:
    """The id an answer carries: the client's x-request-id where usable, else a fresh one (ASGI's
    header pairs)."""
    given = dict(headers).get(HEADER)
    return given if given is not None and _USABLE.fullmatch(given) else b"req_" + uuid.uuid4().hex.encode()


class RequestIdHeader:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        stamp = request_id(scope["headers"])
        added = [(HEADER, stamp)]
        if is_anthropic(scope):
            added.append((ANTHROPIC_HEADER, stamp))

        async def stamped(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            await send(message)

        await self.app(scope, receive, stamped)
