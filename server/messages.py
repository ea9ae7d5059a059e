"""Anthropic's Messages API: POST /v1/messages (JSON, or SSE events as Anthropic streams them) and
POST /v1/messages/count_tokens, for the Anthropic SDK and the tools built on it.

A request is served as the chat request it translates to (server/messages_protocol.py), by the same
code as /v1/chat/completions (server/completions.py: tools, stop strings, --reasoning-parser); the
chat answer is then written as a message: thinking, text and tool_use blocks, Anthropic's stop
reasons, and usage with the prefix cache's tokens as `cache_read_input_tokens`. Streamed, the chat
chunks are read as they come and sent as message_start, content_block_start / _delta / _stop,
message_delta and message_stop events."""
from __future__ import annotations

import json
import re
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.completions import CompletionCall
from server.errors import named_as_sent
from server.generation import EventStream, check_model, encode_chat, ready_tokenizer
from server.messages_protocol import CountTokensRequest, MessagesRequest

router = APIRouter()

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def usage(chat_usage: dict) -> dict:
    """Chat's usage as Anthropic counts it: `input_tokens` the prompt's tokens not read from the
    prefix cache, `cache_read_input_tokens` those that were."""
    cached = chat_usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return {"input_tokens": chat_usage["prompt_tokens"] - cached, "output_tokens": chat_usage["completion_tokens"],
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0,
            "ffn_skip": chat_usage.get("ffn_skip")}


def tool_input(arguments: str) -> dict:
    """A call's arguments as the tool_use block's `input` (arguments that max_tokens cut off, which do
    not parse, as {})."""
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def tool_use_id(call: dict) -> str:
    """A chat tool call's id as Anthropic spells a tool_use block's (`toolu_...`; chat's are `call_...`)."""
    return "toolu_" + call["id"].removeprefix("call_")


class MessageCall:
    """One Messages request: its chat request's life (CompletionCall), written as a message."""

    def __init__(self, request: Request, body: MessagesRequest):
        self.body = body
        template = ready_tokenizer(request.app.state.skipserve).chat_template or ""
        self.chat = CompletionCall(request, body.chat(effort_read="reasoning_effort" in template), chat=True)
        self.id = "msg_" + uuid.uuid4().hex

    def stop(self, finish_reason: str | None, stop_reason) -> tuple[str | None, str | None]:
        """Anthropic's (stop_reason, stop_sequence) for chat's finish_reason and vLLM-style stop_reason."""
        if finish_reason == "stop" and isinstance(stop_reason, str) and stop_reason in (self.body.stop_sequences or ()):
            return "stop_sequence", stop_reason
        return STOP_REASONS.get(finish_reason, "end_turn") if finish_reason else None, None

    def envelope(self, content: list, stop: tuple, used: dict) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.body.model, "content": content,
                "stop_reason": stop[0], "stop_sequence": stop[1], "usage": used}

    def message(self, chat: dict) -> dict:
        """The chat answer as a message."""
        choice = chat["choices"][0]
        said, content = choice["message"], []
        if said.get("reasoning_content"):
            content.append({"type": "thinking", "thinking": said["reasoning_content"], "signature": ""})
        if said.get("content"):
            content.append({"type": "text", "text": said["content"]})
        for call in said.get("tool_calls") or []:
            content.append({"type": "tool_use", "id": tool_use_id(call), "name": call["function"]["name"],
                            "input": tool_input(call["function"]["arguments"])})
        return self.envelope(content, self.stop(choice["finish_reason"], choice.get("stop_reason")),
                             usage(chat["usage"]))

    async def collect(self, stream):
        return await self.chat.collect(stream, lambda chat: JSONResponse(self.message(chat)))

    async def events(self, stream):
        """The chat chunks as Anthropic's events."""
        index, open_block = -1, None  # the content block being written, and its type

        def event(kind: str, **fields) -> dict:
            return {"event": kind, "data": json.dumps({"type": kind, **fields})}

        def start(block: dict):
            nonlocal index, open_block
            for e in close():
                yield e
            index, open_block = index + 1, block["type"]
            yield event("content_block_start", index=index, content_block=block)

        def close():
            nonlocal open_block
            if open_block is not None:
                if open_block == "thinking":  # (no signature is made here: an empty one, as it is sent back)
                    yield event("content_block_delta", index=index, delta={"type": "signature_delta", "signature": ""})
                yield event("content_block_stop", index=index)
                open_block = None

        finish = None
        async for chunk in self.chat.events(stream):
            if chunk == "[DONE]":
                break
            data = json.loads(chunk)
            if "error" in data:  # in-band, then the stream ends (as Anthropic ends a failed one)
                error = data["error"]
                kind = {"server_error": "api_error", "rate_limit_exceeded": "rate_limit_error"}.get(error["type"],
                                                                                                   error["type"])
                yield event("error", error={"type": kind, "message": error["message"]})
                return
            if not data["choices"]:  # the usage, last
                for e in close():
                    yield e
                stop_reason, stop_sequence = self.stop(*finish) if finish else (None, None)
                yield event("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                            usage=usage(data["usage"]))
                continue
            choice = data["choices"][0]
            delta = choice["delta"]
            if "role" in delta:  # the first chunk
                prompt = self.chat.prompt_sizes[0]
                yield event("message_start", message=self.envelope([], (None, None), {
                    "input_tokens": prompt, "output_tokens": 0, "cache_read_input_tokens": 0,
                    "cache_creation_input_tokens": 0}))
                continue
            if delta.get("reasoning_content"):
                if open_block != "thinking":
                    for e in start({"type": "thinking", "thinking": "", "signature": ""}):
                        yield e
                yield event("content_block_delta", index=index,
                            delta={"type": "thinking_delta", "thinking": delta["reasoning_content"]})
            if delta.get("content"):
                if open_block != "text":
                    for e in start({"type": "text", "text": ""}):
                        yield e
                yield event("content_block_delta", index=index, delta={"type": "text_delta", "text": delta["content"]})
            for call in delta.get("tool_calls") or []:  # each whole: one block, its input in one delta
                for e in start({"type": "tool_use", "id": tool_use_id(call), "name": call["function"]["name"],
                                "input": {}}):
                    yield e
                yield event("content_block_delta", index=index,
                            delta={"type": "input_json_delta", "partial_json": call["function"]["arguments"]})
                for e in close():
                    yield e
            if choice["finish_reason"] is not None:
                finish = (choice["finish_reason"], choice.get("stop_reason"))
        yield event("message_stop")


# the Messages fields sent under another name in the chat request it is served as: its errors name them as sent
SENT_AS = {"stop": "stop_sequences", "response_format": "output_config.format"}
TOOL_FIELD = re.compile(r"tools\.(\d+)\.function\.(\w+)")  # chat's tool i's fields


def sent_as(param: str | None) -> str | None:
    """A chat field an error names, as the Messages request sent it (`tools.0.function.parameters`:
    `tools.0.input_schema`)."""
    if param is None:
        return None
    param = SENT_AS.get(param, param)
    return TOOL_FIELD.sub(lambda m: f"tools.{m[1]}." + {"parameters": "input_schema"}.get(m[2], m[2]), param)


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request):
    with named_as_sent(sent_as):
        call = MessageCall(request, body)
        stream = await call.chat.submit()
    if body.stream:
        return EventStream(call.events(stream), stream, call.chat.timer)
    return await call.collect(stream)


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request):
    state = request.app.state.skipserve
    check_model(state, body.model)
    with named_as_sent(sent_as):
        chat = body.chat_request(effort_read="reasoning_effort" in (ready_tokenizer(state).chat_template or ""))
        ids = await encode_chat(state, [m.as_dict() for m in chat.messages], chat.tool_use, chat.chat_options)
    return {"input_tokens": len(ids)}
