"""The Responses API: POST /v1/responses (JSON, or SSE events as OpenAI streams them), and
GET / DELETE /v1/responses/{id} for stored responses (server/response_store.py).

A request is a chat under another shape: `instructions` and the input items (after the stored
conversation a `previous_response_id` names) become chat messages, rendered and sampled as
/v1/chat/completions does, with its tools (server/tool_calls.py) and structured outputs
(`text.format`). The answer is one `message` output item, or one `function_call` item per call;
with `--reasoning-parser` (server/reasoning.py) a `reasoning` item holding its thinking comes first,
streamed as `response.reasoning_text.delta` events.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Literal, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from engine.async_engine import EngineShutdownError, GenerationError
from server.completions import chat_logprobs
from server.errors import APIError
from server.generation import (EventStream, Usage, check_reasoning_effort, consume, encode_chat, prompt_limit,
                               ready_tokenizer, served_model, stopped, submit)
from server.reasoning import Reasoning, request_reasoning, split_output
from server.responses_protocol import ResponsesRequest, check_calls_answered, new_id
from server.tool_calls import whole_arguments

router = APIRouter()


class Answer:
    """What the engine produced for a response so far: its text, and that text as thinking and
    content where a reasoning parser splits it (else all content)."""

    def __init__(self, reasoning: Reasoning | None = None):
        self.text, self.logprobs, self.finish_reason = "", [], None
        self.usage = Usage(reasoning=None if reasoning is None else {})
        self.split = None if reasoning is None else reasoning.split()
        # the logprobs' token texts replayed a token at a time through a split of their own, so that
        # it counts where the content began (`content_from`, in tokens): `_replayed` fed so far
        self._replay, self._replayed = (None if reasoning is None else reasoning.split()), 0
        self.reasoning, self.content = "", ""

    def add(self, out) -> None:
        self.text += out.text
        reasoning, content = split_output(self.split, out, self.usage)
        self.reasoning += reasoning
        self.content += content
        self.logprobs += out.logprobs or []
        self.usage.update(out)
        if out.finished:
            self.finish_reason = out.finish_reason

    @property
    def content_logprobs(self) -> list:
        """The logprobs of the message's tokens: from the first whose token's text is content (past
        `</think>` and the blank tokens after it, or harmony's headers; text the split holds back
        included); none while thinking. Each logprob is replayed once."""
        if self.split is None:
            return self.logprobs
        replay = self._replay
        while replay.content_from is None and self._replayed < len(self.logprobs):
            replay.feed(self.logprobs[self._replayed].token, tokens=1)
            self._replayed += 1
        if replay.content_from is None and self.finish_reason is not None:
            replay.feed("", final=True)  # the answer has ended: what the split still holds is decided
        start = replay.content_from
        return [] if start is None else self.logprobs[start:]

    @property
    def thinking_status(self) -> str:
        """The reasoning item's status: incomplete where the answer was cut off while thinking."""
        split = self.split
        cut = split is not None and split.thought and split.closed_at is None and self.finish_reason not in (None, "stop")
        return "incomplete" if cut else "completed"


class ResponseCall:
    """One response's life: check, submit, then collect or stream its answer; stored at the end."""

    def __init__(self, request: Request, body: ResponsesRequest):
        self.request, self.body = request, body
        self.state = request.app.state.skipserve
        self.id = new_id("resp_")
        self.arrival = time.monotonic()  # (its latency metrics count from here)
        self.message_id = new_id("msg_")
        self.reasoning_id = new_id("rs_")
        self.reasoning = None  # how --reasoning-parser splits this answer, if it does
        self.created_at = int(time.time())
        self.earlier: list[dict] = []  # the stored conversation `previous_response_id` continues
        self.given: list[dict] = []  # this request's input, as chat messages

    async def submit(self):
        state, body = self.state, self.body
        body.model = served_model(state, body.model)
        self.tokenizer = ready_tokenizer(state)  # for logprobs' bytes
        check_reasoning_effort(self.tokenizer, body.effort, "reasoning.effort")
        if body.previous_response_id is not None:
            entry = state.responses.get(body.previous_response_id)
            if entry is None:
                raise APIError(400, f"previous response with id '{body.previous_response_id}' not found",
                               "previous_response_id", "previous_response_not_found")
            self.earlier = entry.messages
        sampling = body.to_sampling_with(state.engine.sampling_defaults())
        sampling.adapter = state.adapter_of(body.model)
        sampling.turn_stops = self.tokenizer.chat_stops
        body.resolve_references(state.responses.finder(), state.max_request_bytes)
        instructions = [{"role": "system", "content": body.instructions}] if body.instructions else []
        self.given = body.messages()
        messages = self.earlier + self.given
        check_calls_answered(messages)
        prompt_ids = await encode_chat(state, instructions + messages, body.tool_use, body.chat_options)
        sampling = body.tool_use.show_tags(sampling)
        limit = prompt_limit(state, body.max_output_tokens or 1)
        if body.truncation == "auto" and len(prompt_ids) > limit:
            prompt_ids = await self.latest_turns(instructions, messages, limit)
        self.reasoning, sampling = await request_reasoning(state.reasoning_parser, sampling, self.tokenizer, prompt_ids)
        stream, self.timer = await submit(state, self.id, [prompt_ids], sampling, body.skip(), "input", self.arrival)
        return stream

    def answer(self) -> Answer:
        return Answer(self.reasoning)

    async def latest_turns(self, instructions: list[dict], messages: list[dict], limit: int) -> list[int]:
        """truncation "auto": the prompt of the most turns, latest first, that fits in `limit` tokens
        (the oldest turns dropped; each turn starts at a user message, or at the system and developer
        messages right before it), found by bisection over the turns' starts; the last turn alone
        where none fits (too long: refused as such)."""
        starts = []
        for i, m in enumerate(messages):
            if m["role"] == "user":
                while i > 0 and messages[i - 1]["role"] in ("system", "developer"):
                    i -= 1
                if i > 0:
                    starts.append(i)
        low, high, fitting = 0, len(starts) - 1, None
        while low <= high:
            mid = (low + high) // 2
            ids = await encode_chat(self.state, instructions + messages[starts[mid]:], self.body.tool_use,
                                    self.body.chat_options)
            if len(ids) <= limit:
                fitting, high = ids, mid - 1
            else:
                low = mid + 1
        if fitting is None:  # the last turn alone (the whole, with one turn): refused as too long
            fitting = await encode_chat(self.state, instructions + messages[starts[-1] if starts else 0:],
                                        self.body.tool_use, self.body.chat_options)
        return fitting

    # ---- the response object -----------------------------------------------------------------
    def calls(self, answer: Answer) -> tuple[str | None, list[dict] | None]:
        """A finished answer's content and tool calls (chat-shaped), where the request allows calls
        and it makes some (a forced call cut off: as far as it was written)."""
        return self.body.tool_use.finished(answer.content, answer.finish_reason)[:2]

    def status(self, answer: Answer) -> str:
        return "completed" if answer.finish_reason == "stop" else "incomplete"

    def text_part(self, text: str, logprobs: list) -> dict:
        return {"type": "output_text", "text": text, "annotations": [],
                "logprobs": chat_logprobs(logprobs, self.tokenizer)["content"] if self.body.wants_logprobs else []}

    def reasoning_item(self, status: str, text: str) -> dict:
        return {"id": self.reasoning_id, "type": "reasoning", "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": text}]}

    def message_item(self, status: str, content: list[dict]) -> dict:
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant", "content": content}

    @staticmethod
    def call_item(call: dict, status: str) -> dict:
        """A chat-shaped tool call as a function_call output item."""
        return {"id": "fc_" + call["id"].removeprefix("call_"), "type": "function_call", "status": status,
                "call_id": call["id"], "name": call["function"]["name"], "arguments": call["function"]["arguments"]}

    def output(self, answer: Answer, content: str | None, calls: list[dict] | None) -> list[dict]:
        thought = [self.reasoning_item(answer.thinking_status, answer.reasoning)] if answer.reasoning else []
        if calls:  # what the model wrote before its calls (the template's format) as a message first
            said = [self.message_item("completed", [self.text_part(content, [])])] if content else []
            return thought + said + [self.call_item(c, "completed" if i < len(calls) - 1 or whole_arguments(c)
                                                    else "incomplete") for i, c in enumerate(calls)]
        if answer.thinking_status == "incomplete" and not answer.content:
            return thought  # cut off while thinking: no message, as OpenAI's reasoning models end then
        return thought + [self.message_item(self.status(answer), [self.text_part(answer.content, answer.content_logprobs)])]

    def response(self, status: str, output: list[dict], usage: dict | None = None, error: dict | None = None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
                "error": error, "incomplete_details": incomplete, "model": self.body.model, "output": output,
                "usage": usage, **self.body.echo()}

    def render(self, answer: Answer) -> tuple[str | None, list[dict] | None, dict, str]:
        """The answer's content and tool calls, the final response object and its JSON."""
        content, calls = self.calls(answer)
        body = self.response(self.status(answer), self.output(answer, content, calls), answer.usage.response_body())
        return content, calls, body, json.dumps(body)

    async def finish(self, answer: Answer) -> tuple[dict, str]:
        """The request's metrics (its generation ended); the final response object and its JSON, made
        on a worker thread (thousands of tokens with logprobs take the event loop for a good part
        of a second), and stored where the request asks, even if the client leaves meanwhile."""
        answer.usage.finish_metrics(self.timer, answer.finish_reason)
        return await asyncio.shield(asyncio.ensure_future(self._render_and_store(answer)))

    async def _render_and_store(self, answer: Answer) -> tuple[dict, str]:
        content, calls, body, text = await asyncio.to_thread(self.render, answer)
        if self.body.store:
            said = {"role": "assistant", "content": content, "tool_calls": calls} if calls else \
                {"role": "assistant", "content": answer.content}
            if answer.reasoning:
                said["reasoning_content"] = answer.reasoning
            self.state.responses.put(self.id, text, json.dumps(self.body.input_items()), self.earlier,
                                     self.given + [said])
        return body, text

    # ---- non-streaming -----------------------------------------------------------------------
    async def collect(self, stream) -> Response:
        answer = self.answer()

        def on_output(out):
            self.timer.on_tokens(out.index)
            answer.add(out)

        left = await consume(self.request, stream, on_output, self.timer)
        return left if left is not None else Response((await self.finish(answer))[1], media_type="application/json")

    # ---- streaming ---------------------------------------------------------------------------
    def sendable(self, answer: Answer) -> int:
        """How much of an unfinished answer's content may be streamed: none while its thinking goes
        on (the reasoning item, at output index 0, comes whole first), and none of what may still
        turn out to be a tool call (ToolUse.sendable)."""
        if answer.split is not None and not answer.content:
            return 0
        use = self.body.tool_use
        return len(answer.content) if use.mode == "none" else use.sendable(answer.content)

    async def events(self, stream):
        sequence = itertools.count()

        def event(kind: str, **fields) -> dict:
            return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": next(sequence), **fields})}

        answer, opened, sent_text, sent_logprobs = self.answer(), False, 0, 0
        thought = {"open": False, "sent": 0, "done": False}  # the reasoning item, at output index 0
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}  # the message's
        thinking = {"item_id": self.reasoning_id, "output_index": 0, "content_index": 0}

        def think():
            if len(answer.reasoning) > thought["sent"]:
                if not thought["open"]:
                    thought["open"] = True
                    yield event("response.output_item.added", output_index=0,
                                item=self.reasoning_item("in_progress", ""))
                yield event("response.reasoning_text.delta", **thinking, delta=answer.reasoning[thought["sent"]:])
                thought["sent"] = len(answer.reasoning)

        def end_thinking():
            if thought["open"] and not thought["done"]:
                thought["done"] = True
                yield event("response.reasoning_text.done", **thinking, text=answer.reasoning)
                yield event("response.output_item.done", output_index=0,
                            item=self.reasoning_item(answer.thinking_status, answer.reasoning))

        def open_message():
            for e in end_thinking():
                yield e
            where["output_index"] = 1 if thought["open"] else 0
            yield event("response.output_item.added", output_index=where["output_index"],
                        item=self.message_item("in_progress", []))
            yield event("response.content_part.added", **where, part=self.text_part("", []))

        def delta(content: str):
            nonlocal sent_text, sent_logprobs
            text, logprobs = content[sent_text:], answer.content_logprobs[sent_logprobs:]
            sent_text, sent_logprobs = len(content), len(answer.content_logprobs)
            if text or logprobs and self.body.wants_logprobs:
                yield event("response.output_text.delta", **where, delta=text,
                            logprobs=self.text_part("", logprobs)["logprobs"])

        try:
            yield event("response.created", response=self.response("in_progress", []))
            yield event("response.in_progress", response=self.response("in_progress", []))
            async for out in stream:
                self.timer.on_tokens(out.index)
                answer.add(out)
                for e in think():
                    yield e
                ready = self.sendable(answer) if answer.finish_reason is None else 0
                if ready:
                    if not opened:
                        opened = True
                        for e in open_message():
                            yield e
                    for e in delta(answer.content[:ready]):
                        yield e
            final, _ = await self.finish(answer)
            for e in end_thinking():
                yield e
            first = 1 if answer.reasoning else 0  # after the reasoning item, streamed above
            # then the message (none where the answer was cut off while thinking), then the calls
            for i, item in enumerate(final["output"][first:], start=first):
                if item["type"] == "message":
                    part = item["content"][0]
                    if not opened:
                        for e in open_message():
                            yield e
                    for e in delta(part["text"]):
                        yield e
                    yield event("response.output_text.done", **where, text=part["text"], logprobs=part["logprobs"])
                    yield event("response.content_part.done", **where, part=part)
                    yield event("response.output_item.done", output_index=where["output_index"], item=item)
                    continue
                yield event("response.output_item.added", output_index=i,  # a call, with its id stored
                            item=dict(item, status="in_progress", arguments=""))
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                            delta=item["arguments"])
                yield event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                            name=item["name"], arguments=item["arguments"])
                yield event("response.output_item.done", output_index=i, item=item)
            yield event("response.completed" if final["status"] == "completed" else "response.incomplete",
                        response=final)
        except (EngineShutdownError, GenerationError) as exc:  # in-band, as OpenAI ends a failed stream
            if isinstance(exc, EngineShutdownError):
                self.timer.end(stopped(exc)[1])
            else:
                self.timer.fail(exc.status)
            yield event("response.failed", response=self.response("failed", [], error={
                "code": "server_error", "message": str(exc)}))
        except Exception as exc:
            self.timer.end("error")
            yield event("response.failed", response=self.response("failed", [], error={
                "code": "server_error", "message": f"generation failed: {exc}"}))


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    call = ResponseCall(request, body)
    stream = await call.submit()
    if body.stream:
        return EventStream(call.events(stream), stream, call.timer)
    return await call.collect(stream)


def _stored(request: Request, response_id: str):
    entry = request.app.state.skipserve.responses.get(response_id)
    if entry is None:
        raise APIError(404, f"no response with id '{response_id}' is stored (it was not stored, or was deleted "
                            "or dropped for room)", "response_id", "response_not_found")
    return entry


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request, stream: bool = False):
    entry = _stored(request, response_id)  # an unknown id is a 404 first
    if stream:
        raise APIError(400, "a stored response is returned whole: streaming it again is not supported", "stream")
    return Response(entry.body, media_type="application/json")


@router.get("/v1/responses/{response_id}/input_items")
async def get_input_items(response_id: str, request: Request, limit: int = Query(20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc", after: Optional[str] = None):
    """The response's own input items (not those of the responses before it), newest first by default."""
    items = json.loads(_stored(request, response_id).input_items)
    if order == "desc":
        items.reverse()
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise APIError(400, f"no input item with id '{after}' in this response", "after")
        start = ids.index(after) + 1
    page = items[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)}


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    _stored(request, response_id)
    request.app.state.skipserve.responses.delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request):
    _stored(request, response_id)
    raise APIError(400, "only background responses can be cancelled, and this server runs none in the background",
                   "response_id")
