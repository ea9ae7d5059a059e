"""What every generating route does with the engine: check the model, tokenize a prompt off the
event loop, submit it (a full queue or an engine not ready is an OpenAI-style error), and read its
outputs while watching for the client to leave."""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from engine.async_engine import (EngineDeadError, EngineNotReadyError, EngineShutdownError, GenerationError,
                                 QueueFullError)
from engine.lora.errors import AdapterError
from engine.sampling_params import InvalidParamError
from engine.tokenizer import ChatOptions
from server import template_tools
from server.errors import APIError, error_body
from server.llama_cpp_protocol import lora_scales
from server.metrics import RequestTimer
from server.protocol import ToolUse
from server.tool_calls import render_messages


@dataclass
class Usage:
    prompts: dict = field(default_factory=dict)  # engine request id -> (prompt tokens, cached prompt tokens)
    completion: dict = field(default_factory=dict)  # choice index -> (tokens, skipped, total)
    reasoning: dict | None = None  # choice index -> thinking tokens, where a reasoning parser splits answers

    def update(self, out) -> None:
        # a prompt's later choices take it from the cache its first one filled (engine/scheduler.py):
        # what the prompt found cached is its first choice's
        earlier = self.prompts.get(out.request_id)
        cached = out.cached_tokens if earlier is None else min(earlier[1], out.cached_tokens)
        self.prompts[out.request_id] = (out.prompt_tokens, cached)
        self.completion[out.index] = (out.completion_tokens, out.ffn_skipped, out.ffn_total)

    @property
    def prompt_tokens(self) -> int:
        return sum(p[0] for p in self.prompts.values())

    @property
    def cached_tokens(self) -> int:
        return sum(p[1] for p in self.prompts.values())

    def totals(self) -> tuple[int, int, int]:
        """Generated tokens, skipped FFN blocks and FFN blocks, over all answers."""
        return tuple(sum(c[i] for c in self.completion.values()) for i in range(3))

    def ffn_skip(self) -> dict:
        _, skipped, total = self.totals()
        return {"skipped": skipped, "total": total, "ratio": skipped / total if total else 0.0}

    def body(self) -> dict:
        """As chat and completions report it."""
        tokens = self.totals()[0]
        details = {} if self.reasoning is None else \
            {"completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": tokens,
                "total_tokens": self.prompt_tokens + tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}, **details, "ffn_skip": self.ffn_skip()}

    @property
    def reasoning_tokens(self) -> int:
        return sum((self.reasoning or {}).values())

    def response_body(self) -> dict:
        """As the Responses API reports it."""
        tokens = self.totals()[0]
        return {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": tokens, "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": self.prompt_tokens + tokens, "ffn_skip": self.ffn_skip()}

    def finish_metrics(self, timer, reason: str) -> None:
        tokens, skipped, total = self.totals()
        timer.finish(reason, self.prompt_tokens, tokens, skipped, total)


def check_model(state, model: str) -> None:
    """404 `model_not_found` for a model this server does not serve, as OpenAI and vLLM answer."""
    if model not in state.model_names:
        raise APIError(404, f"the model '{model}' does not exist; this server serves {sorted(state.model_names)}",
                       "model", "model_not_found")


def served_model(state, model: str | None) -> str:
    """The model a request names, checked (`check_model`); left out or empty: the model served."""
    model = state.named(model)
    check_model(state, model)
    return model


async def pin_lora_scales(state, body) -> str | None:
    """llama-server's per-request `lora` ({"id", "scale"} of its --lora adapters; one left out: 0) ->
    the adapter the request goes through at those scales, pinned until `state.engine.unpin_scaled_adapter`
    (AsyncEngine.pin_scaled_adapter); a 400 naming `lora` for ids the server has not, or a model that
    is an adapter of its own."""
    if body.model not in state.served_names:
        raise APIError(400, f"'lora' scales llama-server's --lora adapters of the model itself; '{body.model}' is "
                            "a LoRA adapter of its own", "lora")
    scales = lora_scales(body.lora, len(state.engine.default_adapter_files), "lora")
    return await scaled_adapters(state.engine.pin_scaled_adapter(scales), "lora")


async def scaled_adapters(call, param: str):
    """Awaits `call`, an AsyncEngine call that combines llama-server's adapters at some scales: 503 while
    the model loads or after it stopped, 429 with too many combinations in use, 400 on `param` where a
    combination does not fit in the memory left."""
    try:
        return await call
    except (EngineNotReadyError, QueueFullError) as exc:
        raise refusal(exc)
    except AdapterError as exc:
        raise APIError(400, str(exc), param)


def served_base_model(state, model: str | None, route: str) -> str:
    """served_model, for a route that reads the model's own hidden states (embeddings, scores): a
    LoRA adapter's name is a 400 there (adapters serve the generating routes)."""
    model = served_model(state, model)
    if model not in state.served_names:  # (a LoRA adapter's name; llama-server's --lora ones are left out here)
        raise APIError(400, f"'{model}' is a LoRA adapter, which serves the generating routes; {route} is computed "
                            f"by the model itself: ask for '{state.served_names[0]}'", "model")
    return model


def check_token_ids(ids: list[int], tokenizer, param: str) -> None:
    """400 on `param` for a token id outside the model's vocabulary."""
    if any(not 0 <= t < tokenizer.vocab_size for t in ids):
        raise APIError(400, f"token ids must be in the vocabulary (0 to {tokenizer.vocab_size - 1})", param)


def check_reasoning_effort(tokenizer, effort: str | None, param: str) -> None:
    """A reasoning effort goes to a chat template that reads `reasoning_effort` (gpt-oss's); 400 on
    `param` for one that reads none."""
    if effort is not None and "reasoning_effort" not in (tokenizer.chat_template or ""):
        raise InvalidParamError(f"'{param}' is not supported: this model's chat template reads no reasoning effort",
                                param)


def ready_tokenizer(state):
    try:
        return state.engine.tokenizer()
    except EngineNotReadyError as exc:
        raise refusal(exc)


async def encode_chat(state, messages: list[dict], use: ToolUse, options: ChatOptions = ChatOptions()) -> list[int]:
    """A chat's prompt ids: its messages (role, content, tool fields) with the tools `use` shows, through
    the model's template as `options` ask. Templating and tokenizing a long prompt takes a while: off
    the event loop."""
    tokenizer, shown, tools = template_input(state, messages, use)
    return await asyncio.to_thread(tokenizer.encode_chat, shown, options, tools)


async def templated_chat(state, messages: list[dict], use: ToolUse,
                         options: ChatOptions = ChatOptions()) -> tuple[str, list[tuple[int, int, int]]]:
    """The text `encode_chat` tokenizes, and its tokens as (id, start, stop) over that text's
    characters (TGI's /chat_tokenize)."""
    tokenizer, shown, tools = template_input(state, messages, use)
    return await asyncio.to_thread(tokenizer.chat_spans, shown, options, tools)


def template_input(state, messages: list[dict], use: ToolUse) -> tuple:
    """(tokenizer, the messages the template is given, the tools it is given): a template that shows
    tools and the history's calls itself gets them as it reads them; any other gets them written
    into the messages (server/tool_calls.py)."""
    tokenizer = ready_tokenizer(state)
    use.format = template_tools.detect(tokenizer.chat_template) if state.tool_call_parser == "auto" \
        else state.tool_call_parser
    if use.native:
        tools = template_tools.template_tools(use.tools) if use.tools else None
        return tokenizer, template_tools.template_messages(messages, use.format), tools
    return tokenizer, render_messages(messages, use.tools, use.parallel, use.listed), None


async def tokenize_batch(state, given: list, param: str, limit: int | None = None, choices: int = 1,
                         special: bool = True) -> list[list[int]]:
    """A batch's texts (or token ids) as token ids, each checked against the vocabulary (item i named
    `param.i` where there are several). At most `limit` items; by default as many as the queue holds
    (`--max-num-seqs` + `--max-waiting` sequences), `choices` sequences each, since a batch taken
    whole takes a queue place per sequence. `special`: texts get the tokenizer's special tokens
    (BOS)."""
    tokenizer = ready_tokenizer(state)
    choices = queued_choices(state, choices)
    if limit is None and len(given) * choices > state.engine.capacity:
        each = f" with n = {choices}" if choices > 1 else ""
        raise APIError(400, f"at most {state.engine.capacity // choices} {param}s a request{each} on this server "
                       f"(--max-num-seqs + --max-waiting = {state.engine.capacity} sequences)", param)
    if limit is not None and len(given) > limit:
        raise APIError(400, f"at most {limit} {param}s a request", param)
    batch = []
    for i, item in enumerate(given):  # tokenizing long texts takes a while: off the event loop
        ids = list(item) if isinstance(item, list) else await asyncio.to_thread(tokenizer.encode, item, special)
        check_token_ids(ids, tokenizer, item_param(param, i, len(given)))
        batch.append(ids)
    return batch


def prompt_limit(state, reserve: int) -> int:
    """The most tokens a generating request's prompt may hold: what leaves room for `reserve` more in
    the context, and at most the server's --max-input-tokens."""
    room = state.engine.config.max_model_len - reserve
    return room if state.max_input_tokens is None else min(room, state.max_input_tokens)


def truncated(prompts: list[list[int]], keep: int | None, max_model_len: int, side: str | None = None,
              fill: int | None = None) -> list[list[int]]:
    """vLLM's `truncate_prompt_tokens`: each prompt's last `keep` tokens (its start is cut, as vLLM cuts
    it), or with `side` "right" (vLLM's `truncation_side`) its first `keep`; -1 keeps `fill` (a
    generating request's `prompt_limit`: room for its answer, within --max-input-tokens), else the
    whole context (embeddings, scores). None: the prompts as they are."""
    if keep is None:
        return prompts
    if keep == -1:
        keep = max(1, max_model_len if fill is None else fill)
    elif keep < 1:
        raise APIError(400, f"truncate_prompt_tokens must be at least 1, or -1 for the context's length; got {keep}",
                       "truncate_prompt_tokens")
    elif keep > max_model_len:
        raise APIError(400, f"truncate_prompt_tokens ({keep}) must be at most this model's maximum context length "
                       f"({max_model_len})", "truncate_prompt_tokens")
    return [p[:keep] for p in prompts] if side == "right" else [p[-keep:] for p in prompts]


def queued_choices(state, n: int) -> int:
    """The queue places a prompt with `n` choices takes: `n`, or 1 for a bad `n` (the engine names it)."""
    return n if 1 <= n <= state.engine.config.max_num_seqs else 1


def item_param(param: str, index: int, count: int) -> str:
    """How errors name item `index` of a batch of `count` sent as `param`."""
    return param if count == 1 else f"{param}.{index}"


def take_whole(request_id: str, count: int, add, choices: int = 1, window: int | None = None) -> "MergedStream":
    """`count` engine requests, `add(engine request id, i)` submitting the i-th, read as one stream
    (MergedStream). At most `window` of them (all by default) are in the engine at once: the first
    `window` are taken whole or not at all (a refusal closes the ones taken), and each later one takes
    the queue place of one that finished."""
    return MergedStream(request_id, count, add, choices, count if window is None else window)


async def submit(state, request_id: str, prompts: list[list[int]], sampling, skip, param: str, arrival: float):
    """One engine request per prompt, read as one stream, and the request's timer (for its metrics,
    from its `arrival`: time.monotonic at its route)."""
    cap = state.max_input_tokens
    for i, prompt in enumerate(prompts):
        if cap is not None and len(prompt) > cap:  # TGI's --max-input-tokens
            raise APIError(400, f"the prompt is {len(prompt)} tokens, more than this server takes "
                                f"(--max-input-tokens {cap})", item_param(param, i, len(prompts)),
                           "context_length_exceeded")
    timer = RequestTimer(state.metrics, arrival)
    try:  # a full server refuses before compiling for nothing, and a request that cannot fit before taking part
        state.engine.check_room(len(prompts) * queued_choices(state, sampling.n))
        await state.engine.compile_grammar(sampling)
    except (EngineNotReadyError, QueueFullError) as exc:
        raise refusal(exc)
    stream = take_whole(request_id, len(prompts), lambda rid, i: state.engine.add_request(
        rid, prompts[i], sampling, skip, item_param(param, i, len(prompts))), sampling.n)
    return stream, timer


def refusal(exc: BaseException) -> APIError | None:
    """The answer to an engine that could not take a request: loading or shutting down (503), or
    full (429, retry in a second); None for anything else."""
    if isinstance(exc, EngineNotReadyError):
        return APIError(503, str(exc), code=exc.code)
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": "1"})
    return None


class MergedStream:
    """The outputs of several engine requests (one a prompt, each with `n` choices) as one stream, in
    the order they come: prompt i's choice j is choice `i * n + j`. Closing it closes them all.

    Only `window` are submitted at once; when one finishes, the next is submitted in the same turn
    of the event loop, into the queue place it left, so no other request takes that place meanwhile
    and a later request queues behind at most `window` of these, not behind all of them."""

    def __init__(self, request_id: str, count: int, add, n: int, window: int):
        self.request_id, self.count, self.add, self.n = request_id, count, add, n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.live: dict[int, tuple] = {}  # item -> (its engine stream, the task relaying it)
        self.submitted = 0
        self.running = count
        try:
            for _ in range(min(window, count)):
                self._submit()
        except BaseException as exc:
            self.close()
            raise refusal(exc) or exc

    def _submit(self) -> None:
        i = self.submitted
        stream = self.add(self.request_id if self.count == 1 else f"{self.request_id}-{i}", i)
        self.submitted += 1
        self.live[i] = (stream, asyncio.ensure_future(self._pump(i, stream)))

    async def _pump(self, i: int, stream) -> None:
        try:
            async for out in stream:
                self.queue.put_nowait(dataclasses.replace(out, index=i * self.n + out.index))
            self.live.pop(i, None)
            if self.submitted < self.count:
                self._submit()
            self.queue.put_nowait(None)
        except BaseException as exc:  # an engine error ends the whole request, as it ends one prompt's
            self.queue.put_nowait(refusal(exc) or exc)

    def __aiter__(self):
        return self

    async def __anext__(self):
        while self.running:
            item = await self.queue.get()
            if item is None:
                self.running -= 1
            elif isinstance(item, BaseException):
                self.close()
                raise item
            else:
                return item
        raise StopAsyncIteration

    def close(self) -> None:
        self.running = 0
        self.submitted = self.count  # nothing more goes in
        for stream, pump in self.live.values():
            pump.cancel()
            stream.close()
        self.live.clear()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the request body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def consume(request: Request, stream, on_output: Callable[[object], None],
                  timer: RequestTimer) -> JSONResponse | None:
    """Feeds each of the stream's outputs to `on_output` until the request ends. Returns a 499 response
    if the client left first (generation stops for it at once), None when it ended; an engine that shut
    down or a generation that failed is an APIError. A request that ends unfinished is counted
    (`timer.end`)."""
    async def read():
        async for out in stream:
            on_output(out)

    task = asyncio.create_task(read())
    gone = asyncio.create_task(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            timer.end("abort")
            return JSONResponse(error_body(499, "client disconnected"), status_code=499)
        try:
            task.result()
        except EngineShutdownError as exc:
            code, reason = stopped(exc)
            timer.end(reason)
            raise APIError(503, str(exc), code=code)
        except GenerationError as exc:
            timer.fail(exc.status)
            raise APIError(exc.status, str(exc), code="generation_failed")
        except BaseException:
            timer.end("error")
            raise
    finally:
        for t in (task, gone):
            t.cancel()
        stream.close()
    return None


class EventStream(EventSourceResponse):
    """The SSE answer of `events`, which relay the engine's `stream`: the stream is closed (its request
    aborted, its queue place given back) and the request counted as aborted however the answer ends
    (nothing where the events' own `finally` did it). A client that leaves while the headers go out
    cancels the answer before its first event: a generator never started never runs its `finally`,
    and its request would have decoded on to max_tokens and held its queue place for good."""

    def __init__(self, events, stream, timer: RequestTimer):
        super().__init__(events, ping=15, sep="\n")
        self._stream, self._timer = stream, timer

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._timer.end("abort")
            self._stream.close()


def stopped(exc: EngineShutdownError) -> tuple[str, str]:
    """An engine that stopped under a request -> (its error code, how the request is counted): the
    server shutting down aborts it; an engine that died is an error."""
    return ("engine_dead", "error") if isinstance(exc, EngineDeadError) else ("shutting_down", "abort")


def overall_finish(reasons) -> str:
    """One finish reason for the metrics of a request with several answers: "stop" if all stopped, else
    the first other."""
    reasons = list(reasons)
    return "stop" if all(r == "stop" for r in reasons) else next((r for r in reasons if r != "stop"), "stop")
