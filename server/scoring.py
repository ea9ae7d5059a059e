"""POST /v1/score and /v1/rerank (also /score, /rerank, /v2/rerank), as vLLM serves them for an
embedding model: texts scored by the cosine similarity of their embeddings (server/embeddings.py,
the pooling `--pooling` picks). /score pairs `text_1` with `text_2` (one with many, or item by
item); /rerank scores each of `documents` against `query` and lists them best first (`top_n` of
them), as vLLM's, Jina's and Cohere's rerank APIs answer. Each distinct text is embedded once."""
from __future__ import annotations

import asyncio
import operator
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.async_engine import EngineNotReadyError
from server.embeddings import MAX_INPUTS, embed_inputs
from server.errors import APIError
from server.generation import refusal, served_base_model, tokenize_batch, truncated
from server.protocol import RerankRequest, ScoreRequest

router = APIRouter()


def cosine(a: list[float], b: list[float]) -> float:
    """Of two embeddings, which are at unit length (a zero one scores 0); held to [-1, 1] (a text with
    itself may sum to a rounding over 1)."""
    return max(-1.0, min(1.0, sum(map(operator.mul, a, b))))


def pairs(firsts: int, seconds: int) -> list[tuple[int, int]]:
    """vLLM's pairing of `text_1` with `text_2`: one first text with each second, or the i-th with the
    i-th; else a 400."""
    if firsts == 1:
        return [(0, j) for j in range(seconds)]
    if firsts != seconds:
        raise APIError(400, f"text_1 holds {firsts} texts and text_2 {seconds}: give one text_1 for many text_2, "
                       "or as many of each", "text_2")
    return [(i, i) for i in range(firsts)]


async def _embed_texts(request: Request, body, sides: dict[str, list[str]], arrival: float):
    """Each side's texts embedded (each distinct text once; errors name `side.i`) -> ({side: its
    vectors}, prompt tokens) or the 499 response of a client that left."""
    state = request.app.state.skipserve
    body.model = served_base_model(state, body.model, "scoring")  # (vLLM's `model` is optional here)
    if sum(len(texts) for texts in sides.values()) > MAX_INPUTS:  # (named: the longer list)
        counts = " + ".join(f"{len(texts)} ({side})" for side, texts in sides.items())
        raise APIError(400, f"at most {MAX_INPUTS} texts a request, all of its texts together: {counts}",
                       max(sides, key=lambda side: len(sides[side])))
    keep, limit = body.truncate_prompt_tokens, state.engine.config.max_model_len
    inputs, seen, where = [], {}, {}  # the distinct inputs; their index by tokens; (side, i) -> index
    for side, texts in sides.items():
        tokens = truncated(await tokenize_batch(state, texts, side, MAX_INPUTS), keep, limit, body.truncation_side)
        try:
            state.engine.check_inputs(tokens, side)  # each side's lengths, its items named as given
        except EngineNotReadyError as exc:
            raise refusal(exc)
        for i, t in enumerate(tokens):
            where[side, i] = seen.setdefault(tuple(t), len(inputs))
            if where[side, i] == len(inputs):
                inputs.append(t)
    embedded = await embed_inputs(request, inputs, arrival, "input")
    if isinstance(embedded, Response):
        return embedded
    vectors, prompt_tokens = embedded
    return {side: [vectors[where[side, i]] for i in range(len(texts))] for side, texts in sides.items()}, prompt_tokens


@router.post("/score")
@router.post("/v1/score")
async def score(body: ScoreRequest, request: Request):
    arrival = time.monotonic()
    firsts, seconds = body.texts("text_1"), body.texts("text_2")
    paired = pairs(len(firsts), len(seconds))
    embedded = await _embed_texts(request, body, {"text_1": firsts, "text_2": seconds}, arrival)
    if isinstance(embedded, Response):
        return embedded
    vectors, tokens = embedded
    scores = await asyncio.to_thread(lambda: [cosine(vectors["text_1"][i], vectors["text_2"][j]) for i, j in paired])
    return {"id": "score-" + uuid.uuid4().hex, "object": "list", "created": int(time.time()), "model": body.model,
            "data": [{"index": k, "object": "score", "score": s} for k, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}


@router.post("/rerank")
@router.post("/v1/rerank")
@router.post("/v2/rerank")
async def rerank(body: RerankRequest, request: Request):
    arrival = time.monotonic()
    embedded = await _embed_texts(request, body, {"query": [body.query], "documents": body.documents}, arrival)
    if isinstance(embedded, Response):
        return embedded
    vectors, tokens = embedded
    query = vectors["query"][0]
    scores = await asyncio.to_thread(lambda: [cosine(query, d) for d in vectors["documents"]])
    best = sorted(range(len(scores)), key=lambda i: -scores[i])[:body.top_n or None]
    results = []
    for i in best:
        result = {"index": i, "relevance_score": scores[i]}
        if body.return_documents is not False:
            result["document"] = {"text": body.documents[i]}
        results.append(result)
    return {"id": "rerank-" + uuid.uuid4().hex, "model": body.model, "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
