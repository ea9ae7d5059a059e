"""Large JSON answers encoded without holding the event loop (or Python's GIL) for long.

FastAPI answers a returned dict through its own encoder, which walks every value in Python on the
event loop (0.4 s for the 600k token ids of a 3.6 MB prompt's /tokenize), and `json.dumps` is one C
call that keeps the GIL however long it runs (0.4-0.7 s for 600k tokens as objects). Here a long
list is encoded a piece at a time on a worker thread, so the GIL passes between pieces.
"""
from __future__ import annotations

import asyncio
import json

from fastapi.responses import Response

PIECE = 1024  # list items encoded in one call (1024 token objects: well under a millisecond)


def json_bytes(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _in_pieces(value) -> bytes:
    if isinstance(value, list) and len(value) > PIECE:
        return b"[" + b",".join(json_bytes(value[i:i + PIECE])[1:-1] for i in range(0, len(value), PIECE)) + b"]"
    if isinstance(value, dict):
        return b"{" + b",".join(json_bytes(k) + b":" + _in_pieces(v) for k, v in value.items()) + b"}"  # (str keys)
    return json_bytes(value)


async def json_response(value) -> Response:
    """`value` (a dict or list of JSON values) as a JSON answer, encoded on a worker thread in pieces."""
    return Response(await asyncio.to_thread(_in_pieces, value), media_type="application/json")
