"""API-key check and draining refusal in front of the API routes, as a plain ASGI middleware.

Not Starlette's `@app.middleware("http")` (BaseHTTPMiddleware): that one relays every message of
a response through a memory stream and a task group, so each streamed token paid two extra task
switches on the event loop; with 16 streaming clients the event loop held the GIL long enough
that the engine thread waited for it ~17% of its time (py-spy). This one only looks at the
request and passes the app's own `send` through.
"""
from __future__ import annotations

import hmac

from server.errors import error_response

DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


class AccessGate:
    def __init__(self, app, state):
        self.app, self.state = app, state  # state: server.app.ServerState (api_keys, draining)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _gated(scope["path"]):
            refusal = self._refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, scope):
        state = self.state
        if state.api_keys is not None and not _authorized(scope, state.api_keys):
            return error_response(401, "missing or invalid API key (Authorization: Bearer <key>, or x-api-key: <key>)",
                                  code="invalid_api_key", scope=scope)
        if state.draining:
            return error_response(503, "the server is shutting down", code="shutting_down", scope=scope)
        return None


API_PATHS = ("/tokenize", "/detokenize", "/score", "/rerank", "/invocations", "/completion", "/infill",
             "/apply-template", "/props", "/", "/generate", "/generate_stream", "/info", "/chat_tokenize",
             "/lora-adapters")
OPEN_PATHS = ("/health", "/ping", "/metrics", "/version")  # probes, scrapes and the version: never behind the key


def _gated(path: str) -> bool:
    # with a key, the API's description is behind it too
    return path.startswith(("/v1", "/v2")) or path in API_PATHS or path in DOCS_PATHS


def _authorized(scope, api_keys: tuple[str, ...]) -> bool:
    """`Authorization: Bearer <key>` (OpenAI's clients), or `x-api-key: <key>` (Anthropic's, as
    llama.cpp's server takes it too), of any of the keys."""
    headers = dict(scope["headers"])
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    sent = [token.strip().encode()] if scheme.lower() == "bearer" else []
    sent.append(headers.get(b"x-api-key", b"").strip())
    # constant-time comparisons, each key against each credential sent; a key itself is never logged
    return any([hmac.compare_digest(given, key.encode()) for key in api_keys for given in sent if given])
