"""Refuse request bodies over a size limit with 413, before anything parses them.

An ASGI middleware: a declared Content-Length over the limit is refused at once; a chunked body
is read up to the limit and refused as soon as it passes it. An accepted body is handed to the
app as one message, then `receive` goes back to the client's own (disconnects still arrive).
"""
from __future__ import annotations

from server.errors import error_response

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20  # a long prompt is well under 1 MB


class BodySizeLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(413, f"the request body is larger than this server's limit of "
                                       f"{self.max_bytes} bytes (--max-request-bytes)", code="request_too_large",
                                  headers={"connection": "close"}, scope=scope)
        await response(scope, receive, send)
