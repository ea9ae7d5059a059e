"""POST /v1/embeddings: each input's vector, pooled from the model's final hidden states
(engine/pooling.py), computed as prefill in the running batch beside generation."""
from __future__ import annotations

import asyncio
import base64
import struct
import uuid

from fastapi import APIRouter, Request

from server.errors import APIError
from server.generation import check_model, check_token_ids, consume, ready_tokenizer, refusal
from server.metrics import RequestTimer
from server.protocol import EmbeddingRequest

router = APIRouter()

MAX_INPUTS = 2048  # a request's inputs, as OpenAI caps them


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    """As OpenAI sends an embedding: floats, or base64 of its little-endian float32 bytes (what the
    `openai` SDK asks for by default and decodes)."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


async def tokenized_inputs(state, body: EmbeddingRequest) -> list[list[int]]:
    given = body.inputs()
    if len(given) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs a request", "input")
    tokenizer = ready_tokenizer(state)
    inputs = []
    for i, text in enumerate(given):  # tokenizing long texts takes a while: off the event loop
        ids = list(text) if isinstance(text, list) else await asyncio.to_thread(tokenizer.encode, text)
        check_token_ids(ids, tokenizer, "input" if len(given) == 1 else f"input.{i}")
        inputs.append(ids)
    return inputs


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    state = request.app.state.skipserve
    check_model(state, body.model)
    inputs = await tokenized_inputs(state, body)
    timer = RequestTimer(state.metrics)
    try:
        size = state.engine.model_config().hidden_size
        if body.dimensions is not None and body.dimensions != size:
            raise APIError(400, f"this model's embeddings have {size} dimensions; they cannot be shortened (the "
                           "model was not trained for it)", "dimensions")
        stream = state.engine.add_embeddings("embd-" + uuid.uuid4().hex, inputs)
    except Exception as exc:  # a bad input (InvalidParamError) goes up as it is
        raise refusal(exc) or exc
    vectors = {}
    prompt_tokens = 0

    def on_output(out) -> None:
        nonlocal prompt_tokens
        vectors[out.index] = out.embedding
        prompt_tokens += out.prompt_tokens

    gone = await consume(request, stream, on_output)
    if gone is not None:
        return gone
    timer.finish_embeddings(len(inputs), prompt_tokens)
    return {"object": "list", "model": body.model,
            "data": [{"object": "embedding", "index": i, "embedding": encode_vector(vectors[i], body.encoding_format)}
                     for i in range(len(inputs))],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
