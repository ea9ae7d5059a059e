"""OpenAI error envelope: {"error": {"message", "type", "param", "code"}} for every failure (on TGI's
routes with its `error_type` beside it)."""
from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from engine.sampling_params import InvalidParamError

log = logging.getLogger("skipserve.server")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_exceeded", 503: "server_error", 500: "server_error"}  # 5xx: OpenAI's own type


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def named_in(message: str, param: str | None, theirs: str | None) -> str:
    """An error's message with the field it names (`param`) written as the client sent it (`theirs`:
    a native API's spelling; TGI's `parameters.` prefix left out of the words)."""
    if param is None or theirs is None or theirs == param:
        return message
    name = theirs.removeprefix("parameters.")
    message = re.sub(rf"\bthe {re.escape(param)} (?:has|is)\b", f"`{name}` holds", message)  # ("the inputs has")
    return re.sub(rf"\b{re.escape(param)}\b", name, message)


@contextmanager
def named_as_sent(rename: Callable[[str | None], str | None]):
    """Errors raised inside (a request served as another route's, and that route's validation) with
    the field they name renamed as the client sent it, in `param` and in the message."""
    try:
        yield
    except ValidationError as exc:  # (a 400 naming the field, never a 500)
        message, param = validation_message(telling_error(exc.errors()))
        raise InvalidParamError(named_in(message, param, rename(param)), rename(param)) from None
    except InvalidParamError as exc:
        theirs = rename(exc.param)
        raise InvalidParamError(named_in(str(exc), exc.param, theirs), theirs, exc.code) from None
    except APIError as exc:
        theirs = rename(exc.param)
        exc.message, exc.param = named_in(exc.message, exc.param, theirs), theirs
        raise


def _printable(text: str | None) -> str | None:
    """Text that survives UTF-8 encoding: a message may quote client input, lone surrogates included."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _prefix_hint(request: Request) -> str:
    """For a path the API serves under /v1 (a client's base URL without it: the commonest setup
    mistake) or with its slashes doubled: the route meant."""
    path = request.url.path
    clean = re.sub("/+", "/", path)
    meant = clean if clean.startswith("/v1/") else "/v1" + clean
    scope = {**request.scope, "path": meant, "raw_path": meant.encode()}
    if meant != path and any(route.matches(scope)[0] is not Match.NONE for route in request.app.router.routes):
        return f"; did you mean {meant}? (an OpenAI client's base URL ends in /v1: http://HOST:PORT/v1)"
    return ""


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": _printable(message), "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": _printable(param), "code": code}}


def route_error_body(scope: dict, status: int, message: str, param: str | None = None,
                     code: str | None = None) -> dict:
    """The envelope as the request's route answers it (`scope`: the request's): TGI's routes with its
    `error_type` too, Anthropic's Messages routes with its top-level `"type": "error"` and its error types."""
    body = error_body(status, message, param, code)
    if is_tgi(scope) and tgi_error_type(status):
        body["error_type"] = tgi_error_type(status)
    if is_anthropic(scope):
        body = {"type": "error", "error": {**body["error"], "type": ANTHROPIC_ERROR_TYPES.get(status, "api_error")}}
    return body


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None, scope: dict | None = None) -> JSONResponse:
    """The envelope as a response; with the request's `scope`, as its route answers it (route_error_body)."""
    body = error_body(status, message, param, code) if scope is None else \
        route_error_body(scope, status, message, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


# the `anthropic` SDK's error types (an error's `.type`) by status
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                         413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                         503: "overloaded_error", 504: "timeout_error"}


# TGI's native routes (server/tgi_api.py; /invocations with TGI's body marks its scope): its clients
# (huggingface_hub) raise their typed errors (ValidationError, OverloadedError, ...) by a top-level
# `error_type` beside the error
TGI_PATHS = frozenset({"/generate", "/generate_stream", "/", "/chat_tokenize"})


# vLLM's run-time LoRA routes (server/lora_api.py), served only where switched on
RUNTIME_LORA_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


def is_tgi(scope: dict) -> bool:
    return scope.get("path") in TGI_PATHS or bool(scope.get("tgi"))


def is_anthropic(scope: dict) -> bool:
    """Anthropic's Messages routes (/v1/messages, /v1/messages/count_tokens), and the models routes
    as the `anthropic` SDK asks them (with its `anthropic-version` header)."""
    path = scope.get("path", "")
    return path.startswith("/v1/messages") or path.startswith("/v1/models") and any(
        name == b"anthropic-version" for name, _ in scope.get("headers", ()))


def tgi_error_type(status: int) -> str | None:
    """None for a refused key (the client's own HTTP error says it better than a validation error)."""
    if status in (401, 403):
        return None
    return "overloaded" if status in (429, 503) else "validation" if status < 500 else "generation"


def _answer(request: Request, status: int, message: str, param: str | None = None, code: str | None = None,
            headers: dict | None = None) -> JSONResponse:
    return error_response(status, message, param, code, headers, request.scope)


NO_BODY = object()  # (a location read without the request's JSON: its union markers dropped by their look)


def _union_marker(part, last: bool) -> bool:
    """A part of a location that names a union's branch, not a field: 'str', 'list[int]', a validator's
    'function-...', or (not last) a model's class name ('NamedToolChoice')."""
    text = str(part)
    return (text in {"str", "int", "float", "bool"} or "[" in text or text.startswith("function-")
            or (not last and isinstance(part, str) and text[:1].isupper() and text.isidentifier()))


def field_path(err: dict, body=NO_BODY) -> list[str]:
    """The fields and indices an error's location names, as the client sent them: read against the
    request's JSON `body` where given (a union's branch names and a tagged union's tags, which are no
    keys of what was sent, left out; a missing field's name kept), else by their look."""
    loc = list(err.get("loc", ()))
    if loc[:1] in (["query"], ["path"]):
        body = NO_BODY
    loc = loc[1:] if loc[:1] in (["body"], ["query"], ["path"]) else loc
    if body is NO_BODY:
        return [str(p) for i, p in enumerate(loc) if not _union_marker(p, i == len(loc) - 1)]
    node, path = body, []
    for i, part in enumerate(loc):
        if isinstance(node, dict) and node.get("type") == part and i < len(loc) - 1 and (
                part not in node or loc[i + 1] in node):
            continue  # a tagged union's tag (a block's "type"), even where a key has its name ({"type": "text", "text": 5})
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and -len(node) <= part < len(node):
            node = node[part]
        elif not (i == len(loc) - 1 and err.get("type") == "missing"):
            continue  # a branch or a tag
        path.append(str(part))
    return path


def telling_error(errors: list[dict], body=NO_BODY) -> dict:
    """The validation error to answer with: the first, except that
    - where a value matched none of a union's shapes, the error from inside the shape that went
      deepest into it ("messages.1.content.0.input should be a valid dictionary", not "content should
      be a valid string" of the string shape, when a list of blocks was sent);
    - a field this server does not take comes before a required one missing (a field sent under
      another API's name: that name is the news)."""
    paths = [field_path(e, body) for e in errors]
    within = [(len(p), i) for i, p in enumerate(paths) if p[:len(paths[0])] == paths[0]]
    deepest = max(within)[0]
    if deepest > len(paths[0]):
        errors = [errors[i] for depth, i in within if depth == deepest]
    if errors[0].get("type") == "missing" or deepest > len(paths[0]):
        return next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
    return errors[0]


def validation_message(err: dict, body=NO_BODY) -> tuple[str, str | None]:
    path = field_path(err, body)
    param = ".".join(path) or None
    kind = err.get("type", "")
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, InvalidParamError):  # raised by our own validators: its words and param
        return str(cause), cause.param if cause.param is not None else param
    if kind in ("model_attributes_type", "dict_type") and not path:
        return "the request body must be a JSON object", None
    if kind == "extra_forbidden":
        return f"'{param}' is not supported by this server", param
    if kind == "json_invalid":
        return f"request body is not valid JSON: {err.get('msg')}", None
    if kind == "missing":
        return (f"'{param}' is required", param) if path else ("the request has no body: send a JSON object", None)
    if not path:  # the body as a whole (a route that takes a list)
        return f"invalid request body: {err.get('msg')}", None
    return f"invalid value for '{param}': {err.get('msg')}", param


class UnexpectedErrors:
    """An ASGI middleware that answers an exception no handler took with the envelope's 500 from
    inside the middleware stack, so that the middlewares around it (CORS, when on) still dress the
    answer; Starlette's own catch-all (below) answers from outside all of them."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            if started:  # too late for an answer of its own: the connection ends, as it would have
                raise
            log.exception("unhandled error on %s", scope.get("path"))
            await error_response(500, "internal server error", scope=scope)(scope, receive, send)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _answer(request, exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(InvalidParamError)
    async def _invalid_param(request: Request, exc: InvalidParamError):
        return _answer(request, 400, str(exc), exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        body = exc.body if isinstance(exc.body, (dict, list)) else NO_BODY
        message, param = validation_message(telling_error(errors, body), body) if errors else ("invalid request", None)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if param is None and kind and kind != "application/json" and not kind.endswith("+json"):
            # FastAPI reads only JSON content types as JSON (curl's -d alone sends a form's type); not
            # taking others keeps a web page from posting here cross-origin without a CORS preflight
            message = f"the request body must be JSON, sent with Content-Type: application/json (got {kind})"
        return _answer(request, 400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"route {request.method} {request.url.path} not found" + _prefix_hint(request)
            if request.url.path in RUNTIME_LORA_PATHS:
                message += ("; loading adapters while serving is off: start the server with "
                            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true (as vLLM's)")
        return _answer(request, exc.status_code, message, headers=exc.headers)  # (a 405's Allow)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _answer(request, 500, "internal server error")
