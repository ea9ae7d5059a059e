"""POST /v1/embeddings: each input's vector, pooled from the model's final hidden states
(engine/pooling.py), computed as prefill in the running batch beside generation. An input is an
engine request of its own, as a completions prompt is. A batch may hold as many inputs as OpenAI
takes (2,048), more than the queue does: every input is checked first, then the batch is fed to
the engine a window at a time (two batches' worth, `--max-num-seqs` x 2, and at most half the
queue), each finished input's queue place going to the next, so requests that come meanwhile wait
behind one window, not the whole batch. The first window is taken whole or refused whole (429)."""
from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from engine.async_engine import EngineNotReadyError, QueueFullError
from server.errors import APIError
from server.generation import (consume, encode_chat, item_param, refusal, served_base_model, take_whole,
                               tokenize_batch, truncated)
from server.json_body import json_bytes
from server.metrics import RequestTimer
from server.protocol import EmbeddingRequest, ToolUse

router = APIRouter()

MAX_INPUTS = 2048  # OpenAI's limit on an embeddings request's inputs
PIECE = 16  # vectors a piece of the response's JSON (16 x 576 floats: ~4 ms to encode)


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    """As OpenAI sends an embedding: floats, or base64 of its little-endian float32 bytes (what the
    `openai` SDK asks for by default and decodes)."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    state = request.app.state.skipserve
    arrival = time.monotonic()  # (its latency metrics count from here)
    body.model = served_base_model(state, body.model, "/v1/embeddings")
    if body.messages is not None:  # vLLM's chat form: the rendered conversation, one input
        param = "messages"
        messages = [m.as_dict() for m in body.messages]
        given = [await encode_chat(state, messages, ToolUse([], None, None, None), body.embedding_chat_options)]
    else:
        param = "input"
        given = await tokenize_batch(state, body.inputs(), "input", MAX_INPUTS,
                                     special=body.add_special_tokens is not False)
    inputs = truncated(given, body.truncate_prompt_tokens, state.engine.config.max_model_len, body.truncation_side)
    size = state.engine.engine.model_config.hidden_size  # loaded: tokenizing found its tokenizer
    if body.dimensions is not None and body.dimensions != size:
        raise APIError(400, f"this model's embeddings have {size} dimensions; they cannot be shortened (the "
                       "model was not trained for it)", "dimensions")
    embedded = await embed_inputs(request, inputs, arrival, param)
    if isinstance(embedded, Response):
        return embedded
    vectors, prompt_tokens = embedded
    state.metrics.embedding_inputs.inc(len(inputs))  # (scoring's texts, embedded the same way, are not counted)
    return StreamingResponse(json_pieces(body.model, vectors, body.encoding_format,
                                         {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}),
                             media_type="application/json")


async def embed_inputs(request: Request, inputs: list[list[int]], arrival: float,
                       param: str) -> tuple[list[list[float]], int] | Response:
    """Each input's vector, computed in the running batch a window at a time (above), and the inputs'
    tokens -> (vectors in order, prompt tokens); a 499 response where the client left first. Errors
    name input i as `param.i` (`param` alone for one input)."""
    state = request.app.state.skipserve
    timer = RequestTimer(state.metrics, arrival)
    # two batches' worth, so the engine always holds a next batch while finished inputs' places refill;
    # at most half the queue, so that other requests find room while a long batch runs
    window = max(1, min(2 * state.engine.config.max_num_seqs, state.engine.capacity // 2))
    try:
        state.engine.check_inputs(inputs, param)
        state.engine.check_room(min(window, len(inputs)))  # (its first window, whole: the 429 says so)
    except (EngineNotReadyError, QueueFullError) as exc:
        raise refusal(exc)
    stream = take_whole("embd-" + uuid.uuid4().hex, len(inputs), lambda rid, i: state.engine.add_embeddings(
        rid, [inputs[i]], item_param(param, i, len(inputs))), window=window)
    vectors, prompt_tokens = {}, 0

    def on_output(out) -> None:
        nonlocal prompt_tokens
        vectors[out.index] = out.embedding
        prompt_tokens += out.prompt_tokens

    gone = await consume(request, stream, on_output, timer)
    if gone is not None:
        return gone
    timer.finish_embeddings(prompt_tokens)
    return [vectors[i] for i in range(len(inputs))], prompt_tokens


async def json_pieces(model: str, vectors: list[list[float]], encoding_format: str, usage: dict):
    """The response's JSON, PIECE vectors at a time, the event loop free between pieces: a batch of
    2,048 vectors as floats is 24 MB of JSON, and encoding it whole held every other stream up for
    1.7 s (FastAPI's encoder walks each float, then `json.dumps`)."""
    head = {"id": "embd-" + uuid.uuid4().hex, "object": "list", "created": int(time.time()), "model": model}
    yield json_bytes(head)[:-1] + b',"data":['  # (vLLM's id and created beside OpenAI's fields)
    for start in range(0, len(vectors), PIECE):
        items = [json_bytes({"object": "embedding", "index": i, "embedding": encode_vector(vectors[i], encoding_format)})
                 for i in range(start, min(start + PIECE, len(vectors)))]
        yield (b"," if start else b"") + b",".join(items)
        await asyncio.sleep(0)  # a send that does not wait would not let the others run
    yield b'],"usage":' + json_bytes(usage) + b"}"
