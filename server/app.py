"""The FastAPI application: lifespan (model load), middleware (server/access_gate.py,
server/body_limit.py, CORS for browser clients), small routes."""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.middleware.cors import CORSMiddleware

from engine.async_engine import AsyncEngine
from server import __version__, errors
from server.access_gate import AccessGate
from server.body_limit import DEFAULT_MAX_REQUEST_BYTES, BodySizeLimit
from server.completions import router as completions_router
from server.embeddings import router as embeddings_router
from server.errors import APIError, error_response, is_anthropic
from server.generation import check_model, check_token_ids, encode_chat, ready_tokenizer, served_model
from server.json_body import json_response
from server.llama_cpp_api import LLAMA_CPP_TOKENIZE, llama_tokenize
from server.metrics import Metrics
from server.protocol import TEMPLATING_FIELDS, DetokenizeRequest, TokenizeRequest, refuse_chat_fields
from server.request_id import RequestIdHeader
from server.response_store import ResponseStore
from server.invocations import router as invocations_router
from server.llama_cpp_api import router as llama_cpp_router
from server.lora_api import router as lora_router
from server.messages import router as messages_router
from server.responses import router as responses_router
from server.scoring import router as scoring_router
from server.tgi_api import router as tgi_router, tgi_tokenize

log = logging.getLogger("skipserve.server")

CORS_METHODS = ["GET", "POST", "DELETE"]
# /tokenize fields that shape a chat prompt: refused beside a plain `prompt`, never silently ignored
CHAT_ONLY_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", *TEMPLATING_FIELDS)


@dataclass
class ServerState:
    engine: AsyncEngine
    metrics: Metrics
    served_names: tuple[str, ...]  # the model's names in the API, the first its own
    api_keys: tuple[str, ...] | None = None  # any of them is taken
    responses: ResponseStore = field(default_factory=ResponseStore)  # the Responses API's stored responses
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # a body's limit, and that of what its references bring
    reasoning_parser: str | None = None  # server/reasoning.py: chat answers' thinking as reasoning_content
    tool_call_parser: str = "auto"  # hermes (server/hermes_tools.py), json (server/tool_calls.py) or auto
    max_input_tokens: int | None = None  # TGI's --max-input-tokens: a generating request's prompt at most
    draining: bool = False
    started: float = field(default_factory=time.time)

    @property
    def adapters(self) -> dict[str, str]:
        """The LoRA adapters served beside the model: name -> folder (--lora-modules, and those loaded since)."""
        return self.engine.adapters

    @property
    def model_names(self) -> set[str]:
        return set(self.served_names) | set(self.adapters)

    def named(self, model: str | None) -> str:
        """The model a request names, where it names none (left out or empty): the model served, under its
        first name (as vLLM and llama-server answer a request without `model`)."""
        return model or self.served_names[0]

    def adapter_of(self, model: str) -> str | None:
        """The LoRA adapter a request's `model` is computed through: the one it names, or for the
        model itself llama-server's --lora adapters (None: the model alone)."""
        if model in self.served_names:
            return self.engine.default_adapter
        return model if model in self.adapters else None

    @property
    def fingerprint(self) -> str:
        return f"skipserve-{__version__}-{self.engine.config.skip.policy}"


def create_app(engine: AsyncEngine, served_names: tuple[str, ...], api_keys: tuple[str, ...] | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               on_engine_failed: Callable[[BaseException], None] | None = None,
               allowed_origins: tuple[str, ...] = (), reasoning_parser: str | None = None,
               tool_call_parser: str = "auto", max_input_tokens: int | None = None, docs: bool = True,
               runtime_lora: bool = False) -> FastAPI:
    """`on_engine_failed`: called when the model cannot load, or when the engine thread stops on an
    error (the CLI exits non-zero then).
    `allowed_origins`: web origins whose pages may call the API from a browser ("*": any); none by
    default, so a page on another origin can send nothing the browser would not send anyway.
    `docs`: the API's description at /docs, /redoc and /openapi.json (vLLM's --disable-fastapi-docs: off).
    `runtime_lora`: vLLM's routes that load and unload LoRA adapters while serving (server/lora_api.py)."""
    metrics = Metrics(engine)
    engine.on_step = metrics.on_step
    engine.on_dead = on_engine_failed
    state = ServerState(engine, metrics, tuple(dict.fromkeys(served_names)), api_keys,
                        max_request_bytes=max_request_bytes, reasoning_parser=reasoning_parser,
                        tool_call_parser=tool_call_parser, max_input_tokens=max_input_tokens)

    def load_done(task: asyncio.Task) -> None:
        if task.cancelled():
            return
        if task.exception() is None:
            log.info("model loaded; ready")
            return
        log.error("model failed to load: %s", task.exception())
        if on_engine_failed is not None:
            on_engine_failed(task.exception())

    async def load_model() -> None:
        await engine.start()
        most, context = state.max_input_tokens, engine.config.max_model_len  # (the model's length caps the latter)
        if most is not None and most >= context:
            engine.load_error = ValueError(f"--max-input-tokens {most} must be below the context, {context} tokens "
                                           "(--max-model-len, as the model's own length caps it): an answer needs a token")
            raise engine.load_error

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        load = asyncio.create_task(load_model())
        load.add_done_callback(load_done)
        try:
            yield
        finally:
            state.draining = True
            if not load.done():
                load.cancel()
            await asyncio.to_thread(engine.stop)

    hidden = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="skipserve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible inference with adaptive FFN skipping (FFN-SkipLLM).", **hidden)
    app.state.skipserve = state
    errors.install(app)
    app.include_router(completions_router)
    app.include_router(responses_router)
    app.include_router(messages_router)
    app.include_router(invocations_router)
    app.include_router(llama_cpp_router)
    app.include_router(embeddings_router)
    app.include_router(scoring_router)
    app.include_router(tgi_router)
    if runtime_lora:
        app.include_router(lora_router)

    @app.api_route("/health", methods=["GET", "HEAD"])  # (HEAD: probes that read only the status)
    @app.api_route("/ping", methods=["GET", "POST"])  # Amazon SageMaker's (as vLLM serves it)
    async def health():
        if state.draining:
            return error_response(503, "shutting down", code="shutting_down")
        if engine.load_error is not None:
            return error_response(503, f"model failed to load: {engine.load_error}", code="load_failed")
        if engine.dead is not None:
            return error_response(503, f"the engine stopped: {engine.dead}", code="engine_dead")
        if not engine.ready:
            return error_response(503, "the model is loading", code="loading")
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    def model_card(name: str) -> dict:
        # as vLLM lists them: the model's root its path (no parent); an adapter's its folder, and the model under it
        card = {"id": name, "object": "model", "created": int(state.started), "owned_by": "skipserve",
                "root": engine.config.model or state.served_names[0], "parent": None,
                "max_model_len": engine.config.max_model_len}
        if name not in state.served_names:
            card |= {"root": state.adapters[name], "parent": state.served_names[0]}
        return card

    def anthropic_card(name: str) -> dict:
        """A model card with the fields Anthropic's models API gives beside OpenAI's."""
        created = datetime.fromtimestamp(int(state.started), timezone.utc).isoformat().replace("+00:00", "Z")
        return model_card(name) | {"type": "model", "display_name": name, "created_at": created}

    @app.get("/v1/models")
    async def models(request: Request):  # as /health while loading: a client that waits may then send requests
        if not engine.ready and engine.load_error is None and not state.draining:
            return error_response(503, "the model is loading", code="loading", scope=request.scope)
        names = [*state.served_names, *(name for name in state.adapters if name not in state.served_names)]
        if is_anthropic(request.scope):  # (the `anthropic` SDK's models.list(): one page)
            return {"object": "list", "data": [anthropic_card(name) for name in names], "has_more": False,
                    "first_id": names[0], "last_id": names[-1]}
        return {"object": "list", "data": [model_card(name) for name in names]}

    @app.get("/v1/models/{model:path}")  # a served name may hold a slash (org/model)
    async def model(model: str, request: Request):
        check_model(state, model)
        return anthropic_card(model) if is_anthropic(request.scope) else model_card(model)

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request):
        # (a long prompt's tokens: encoded in pieces off the event loop, server/json_body.py)
        tokenizer = ready_tokenizer(state)
        if body.parameters is not None and body.inputs is None:
            raise APIError(400, "parameters go with TGI's spelling: give 'inputs'", "parameters")
        if body.content is not None or any(getattr(body, f) is not None for f in LLAMA_CPP_TOKENIZE):
            return await json_response(await llama_tokenize(state, body))
        if body.inputs is not None:
            request.scope["tgi"] = True  # (its errors carry TGI's error_type, as on TGI's routes)
            return await json_response(await tgi_tokenize(state, body))
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", "prompt")
        if body.prompt is not None:
            refuse_chat_fields(body, CHAT_ONLY_FIELDS, "prompt")
        served_model(state, body.model)
        if body.messages is not None:
            ids = await encode_chat(state, [m.as_dict() for m in body.messages], body.tool_use, body.chat_options)
        else:
            ids = await asyncio.to_thread(tokenizer.encode, body.prompt, body.add_special_tokens is not False)
        answer = {"tokens": ids, "count": len(ids), "max_model_len": engine.config.max_model_len}
        if body.return_token_strs:  # vLLM's: the vocabulary's spellings (a long prompt's: off the event loop)
            answer["token_strs"] = await asyncio.to_thread(lambda: [tokenizer.token_string(t) for t in ids])
        return await json_response(answer)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        """Token ids -> text, as vLLM's /detokenize: special tokens' text kept (`<|im_start|>`), so a
        chat prompt from /tokenize reads back with its template's markup."""
        tokenizer = ready_tokenizer(state)
        served_model(state, body.model)
        check_token_ids(body.tokens, tokenizer, "tokens")
        text = await asyncio.to_thread(tokenizer.decode, body.tokens, True, True)
        return {"prompt": text, "content": text}  # (`content`: llama.cpp's name for it)

    app.add_middleware(errors.UnexpectedErrors)  # innermost of ours: its 500s pass through the others
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    app.add_middleware(AccessGate, state=state)  # before the body is read: no key (or draining), no body taken
    app.add_middleware(RequestIdHeader)  # on every answer, refusals too
    if allowed_origins:  # outermost: preflights need no key, and refusals (401, 413, 429, 500) carry the headers too
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=CORS_METHODS,
                           allow_headers=["*"], expose_headers=["Retry-After", "x-request-id"], max_age=600)
    return app

