"""POST /invocations (and GET/POST /ping in server/app.py): the routes Amazon SageMaker calls, as
vLLM serves them. A body is routed by its shape: `messages` to /v1/chat/completions, `prompt` to
/v1/completions, `input` to /v1/embeddings, and TGI's `inputs` (as TGI's SageMaker container takes it)
to its POST / (server/tgi_api.py); each then answers as that route does."""
from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from server.completions import chat_completions, completions
from server.embeddings import embeddings
from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from server.tgi_api import compat_generate
from server.tgi_protocol import GenerateRequest

router = APIRouter()

ROUTES = (("messages", ChatCompletionRequest, chat_completions), ("prompt", CompletionRequest, completions),
          ("input", EmbeddingRequest, embeddings), ("inputs", GenerateRequest, compat_generate))


@router.post("/invocations")
async def invocations(request: Request):
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):  # as every route refuses it (server/errors.py)
        raise APIError(400, f"the request body must be JSON, sent with Content-Type: application/json (got "
                            f"{kind or 'none'})")
    try:
        data = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise APIError(400, "the request body must be a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    given = [key for key, _, _ in ROUTES if key in data]
    if len(given) > 1:
        raise APIError(400, f"give one of 'messages', 'prompt', 'input' or 'inputs', not {' and '.join(given)}",
                       given[1])
    if "inputs" in data:  # TGI's body: its errors carry TGI's error_type (server/errors.py)
        request.scope["tgi"] = True
    else:  # (TGI's request names no model)
        data.setdefault("model", request.app.state.skipserve.served_names[0])  # (SageMaker serves one model)
    for key, model, route in ROUTES:
        if key in data:
            try:
                body = model.model_validate(data)
            except ValidationError as exc:  # answered as the route's own checks answer
                raise RequestValidationError(exc.errors()) from None
            return await route(body, request)
    raise APIError(400, "an invocation needs 'messages' (chat), 'prompt' (completions), 'input' (embeddings) or "
                        "'inputs' (TGI's generate)")
