"""Request bodies of the Responses API (`POST /v1/responses`, the subset we honour) and their mapping to
chat messages and engine params.

`input` is a string (one user message) or a list of items: messages (`role`, `content` as text or
text parts), `function_call` items (the model's earlier calls: an output item sent back as it came),
`function_call_output` items (their results) and `reasoning` items (an answer's thinking, sent
back: the next assistant message's reasoning_content). Items become the chat messages
server/tool_calls.py renders: a call joins the assistant message before it, a result is a `tool`
message. Images, files, audio and the hosted tools (web search, file search, ...) are 400s naming
their field, as every field this server does not implement is.
"""
from __future__ import annotations

import json
import uuid
from functools import cached_property
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BeforeValidator, Discriminator, Field, StrictBool, StrictInt, Tag, TypeAdapter, ValidationError,
                      field_validator)

from engine.sampling_params import InvalidParamError, SamplingParams
from engine.tokenizer import ChatOptions
from server.errors import validation_message
from server.protocol import ClientHints, SamplingRequest, Strict, ToolUse

LOGPROBS = "message.output_text.logprobs"  # the one `include` value this server produces


class InputText(Strict):
    type: Literal["input_text", "output_text"]  # output_text: an assistant output item sent back
    text: str
    annotations: Optional[list] = None  # an output item's, sent back: ignored
    logprobs: Optional[list] = None


class RefusalPart(Strict):
    """An assistant output message's refusal, sent back: its text is what the assistant said."""
    type: Literal["refusal"]
    refusal: str

    @property
    def text(self) -> str:
        return self.refusal


_PART, _REFUSAL = TypeAdapter(InputText), TypeAdapter(RefusalPart)


def text_parts(value):
    """A content list's parts checked one by one, so that a bad part is a 400 saying which and why
    (not a union's "should be a valid string"); parts other than text are refused by their type."""
    if not isinstance(value, list):
        return value
    parts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in (None, "input_text", "output_text", "refusal"):
            raise InvalidParamError(f"content parts of type '{kind}' are not supported: this model takes text only")
        try:
            parts.append((_REFUSAL if kind == "refusal" else _PART).validate_python(part))
        except ValidationError as exc:
            message, _ = validation_message(dict(exc.errors()[0], loc=("content", j, *exc.errors()[0]["loc"])))
            raise InvalidParamError(message) from None
    return parts


# a message's content or a call result's output: text, or text parts (each checked by text_parts)
TextContent = Annotated[Union[str, list[Union[InputText, RefusalPart]]], BeforeValidator(text_parts)]


def joined(value) -> str:
    """A content field's text: the string, or its parts' texts joined."""
    return value if isinstance(value, str) else "\n".join(p.text for p in value)  # one per line, as chat's


class InputMessage(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: TextContent
    id: Optional[str] = None  # an output message sent back carries its id and status
    status: Optional[str] = None
    phase: Optional[str] = None

    def text(self) -> str:
        return joined(self.content)


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text
    id: Optional[str] = None
    status: Optional[str] = None
    # the openai SDK's fields of a call, in an output item dumped with its nulls and sent back: no call
    # is made by a program or in a namespace here (`async` changes nothing for a call the client makes)
    async_: Optional[StrictBool] = Field(None, alias="async")
    caller: None = None
    namespace: None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: TextContent
    id: Optional[str] = None
    status: Optional[str] = None
    name: Optional[str] = None  # the function's (its call_id names the call)
    caller: None = None  # (as FunctionCallItem's)
    namespace: None = None

    def text(self) -> str:
        return joined(self.output)


class ReasoningText(Strict):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(Strict):
    """A reasoning output item sent back (`input += response.output`): its text goes to the template
    with the assistant message after it, as that message's reasoning_content."""
    type: Literal["reasoning"]
    content: Optional[list[ReasoningText]] = None
    summary: list[Any] = Field(default_factory=list)
    encrypted_content: Optional[str] = None
    id: Optional[str] = None
    status: Optional[str] = None

    def text(self) -> str:
        return "".join(part.text for part in self.content or [])


class ItemReference(Strict):
    """An earlier item named by id, as clients that store their responses send it (the Vercel AI SDK,
    Codex): replaced by the stored item (`ResponsesRequest.resolve_references`) before anything reads it."""
    type: Literal["item_reference"]
    id: str


ITEM_KINDS = ("message", "function_call", "function_call_output", "reasoning", "item_reference")


def _prompt_bytes(item: dict) -> int:
    """What a stored item brings to a prompt, in UTF-8 bytes of its JSON, its output text's
    logprobs left out (a prompt never reads them)."""
    if isinstance(item.get("content"), list):
        item = dict(item, content=[{k: v for k, v in part.items() if k != "logprobs"} if isinstance(part, dict)
                                   else part for part in item["content"]])
    return len(json.dumps(item, ensure_ascii=False).encode())


def _item_kind(value) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind or "message"  # absent or null: a message


InputItem = Annotated[Union[Annotated[InputMessage, Tag("message")],
                            Annotated[FunctionCallItem, Tag("function_call")],
                            Annotated[FunctionCallOutputItem, Tag("function_call_output")],
                            Annotated[ReasoningItem, Tag("reasoning")],
                            Annotated[ItemReference, Tag("item_reference")]],
                      Discriminator(_item_kind)]
_ITEM = TypeAdapter(InputItem)


def input_messages(items: list) -> list[dict]:
    """Input items as chat messages (role, content, and tool_calls / tool_call_id / reasoning_content
    where given)."""
    messages, reasoning = [], ""
    for item in items:
        if isinstance(item, ReasoningItem):  # for the assistant message that follows
            reasoning += item.text()
            continue
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": item.text()})
            if item.role != "assistant":
                reasoning = ""  # thinking belongs to the answer right after it
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and not reasoning:  # calls join their answer
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "content": item.text(), "tool_call_id": item.call_id})
            reasoning = ""
        if reasoning and messages[-1]["role"] == "assistant":
            messages[-1]["reasoning_content"], reasoning = reasoning, ""
    return messages


def check_calls_answered(messages: list[dict]) -> None:
    """As OpenAI's Responses API: each function call in the conversation (this input's and the stored
    turns' it continues) has its output in it, and each output answers a call; a 400 naming the first
    that does not (the model would answer from a history in which a call got no result, or a result
    came from no call)."""
    calls, answered = [], set()
    for m in messages:  # (in order: an output answers a call made before it)
        calls += [call["id"] for call in m.get("tool_calls") or ()]
        if m["role"] == "tool":
            if m["tool_call_id"] not in calls:
                raise InvalidParamError(f"No tool call found for function call output with call_id "
                                        f"{m['tool_call_id']}.", "input")
            answered.add(m["tool_call_id"])
    for call_id in calls:
        if call_id not in answered:
            raise InvalidParamError(f"No tool output found for function call {call_id}.", "input")


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = Field(None, pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema")
    strict: Optional[StrictBool] = None

    def answer_schema(self) -> dict | None:
        """The JSON schema the answer must follow (None: free text); json_object is any object."""
        if self.type == "json_schema":
            if self.name is None or self.schema_ is None:
                raise InvalidParamError("text.format: name and schema are required with type json_schema",
                                        "text.format")
            return self.schema_
        if any(v is not None for v in (self.name, self.description, self.schema_, self.strict)):
            raise InvalidParamError("text.format: name, description, schema and strict go with type json_schema only",
                                    "text.format")
        return {"type": "object"} if self.type == "json_object" else None


class TextConfig(Strict):
    format: Optional[TextFormat] = None
    verbosity: Optional[Literal["medium"]] = None  # the default, as some clients send it; no other


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[StrictBool] = None


class FunctionChoice(Strict):
    type: Literal["function"]
    name: str


def new_id(prefix: str) -> str:
    """An item's or a response's id: `prefix` and 32 hex digits, as OpenAI's look."""
    return prefix + uuid.uuid4().hex


def _message_item(item_id: str | None, role: str, parts: list[dict]) -> dict:
    return {"id": item_id or new_id("msg_"), "type": "message", "role": role, "status": "completed", "content": parts}


class StreamOptions(Strict):
    include_obfuscation: Optional[StrictBool] = None  # nothing is obfuscated: accepted, no effect


class Reasoning(Strict):
    # to the chat template as `reasoning_effort`, as chat completions' field goes (server/responses.py)
    effort: Optional[Literal["minimal", "low", "medium", "high"]] = None
    summary: None = None
    generate_summary: None = None


def _no_summaries(value):
    if isinstance(value, dict) and all(v is None for k, v in value.items() if k != "effort"):
        return value
    if value is not None:
        raise InvalidParamError("'reasoning' takes only 'effort' here: no reasoning summaries are written", "reasoning")
    return value


class ResponsesRequest(SamplingRequest, ClientHints):
    input: Union[str, list[InputItem]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[StrictInt] = None
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    include: Optional[list[str]] = None
    text: Optional[TextConfig] = None
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], FunctionChoice, None] = None
    parallel_tool_calls: Optional[StrictBool] = None
    previous_response_id: Optional[str] = None
    store: StrictBool = True
    truncation: Literal["disabled", "auto"] = "disabled"  # auto: the oldest turns dropped to fit the context
    background: Optional[Literal[False]] = None
    # sent as null, or as a response's own `{"effort": ..., "summary": null}`, by some clients
    reasoning: Annotated[Optional[Reasoning], BeforeValidator(_no_summaries)] = None
    stream_options: Optional[StreamOptions] = None

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, value):
        """Each item checked on its own, so that a bad one is a 400 naming it and its field (not a
        union's list of misses); an item of a kind this server does not take is one too."""
        if not isinstance(value, list):
            return value
        if not value:
            raise InvalidParamError("input must hold at least one item", "input")
        items = []
        for i, item in enumerate(value):
            kind = _item_kind(item)
            if kind not in ITEM_KINDS:
                raise InvalidParamError(f"input items of type '{kind}' are not supported", f"input.{i}")
            try:
                items.append(_ITEM.validate_python(item))
            except ValidationError as exc:
                error = exc.errors()[0]
                raise InvalidParamError(*validation_message(dict(error, loc=("input", i, *error["loc"][1:])))) from None
        seen = set()  # the client's own item ids, each once (as OpenAI: stored and listed by them)
        for i, item in enumerate(items):
            if item.id is not None and not isinstance(item, ItemReference):
                if item.id in seen:
                    raise InvalidParamError(f"Duplicate item found with id {item.id}. Remove the duplicate item "
                                            "from your input and try again.", f"input.{i}")
                seen.add(item.id)
        return items

    @field_validator("include")
    @classmethod
    def _known_includes(cls, value):
        for name in value or []:
            if name != LOGPROBS:
                raise InvalidParamError(f"include: '{name}' is not supported (only '{LOGPROBS}')", "include")
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, value):
        if isinstance(value, list):
            for i, tool in enumerate(value):
                kind = tool.get("type") if isinstance(tool, dict) else None
                if kind is not None and kind != "function":
                    raise InvalidParamError(f"tools of type '{kind}' are not supported: only function tools",
                                            f"tools.{i}")
        return value

    def resolve_references(self, lookup, max_bytes: int) -> None:
        """Each `item_reference` replaced by the item `lookup(id)` finds (a stored response's), or a
        400 naming it where none is stored. Each id is looked up once; what the references bring
        counts against `max_bytes` (the body's own limit): a short body cannot repeat a large item
        into a prompt of gigabytes."""
        if isinstance(self.input, str):
            return
        found: dict[str, tuple] = {}  # id -> (item, its JSON's size)
        brought = 0
        for i, item in enumerate(self.input):
            if not isinstance(item, ItemReference):
                continue
            if item.id not in found:
                stored = lookup(item.id)
                if stored is None:
                    raise InvalidParamError(f"no stored item has the id '{item.id}' (it was not stored, or was "
                                            "deleted or dropped for room)", f"input.{i}")
                found[item.id] = (_ITEM.validate_python(stored), _prompt_bytes(stored))
            resolved, size = found[item.id]
            brought += size
            if brought > max_bytes:
                raise InvalidParamError(f"the items the input references come to more than {max_bytes} bytes, the "
                                        "limit of a request body", f"input.{i}")
            self.input[i] = resolved

    def messages(self) -> list[dict]:
        """This request's own messages: its input, without the instructions (they are not carried
        over to a response that follows this one, as OpenAI does)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return input_messages(self.input)

    def input_items(self) -> list[dict]:
        """The input as OpenAI lists a response's input items: each with an id (its own, or a new one)."""
        if isinstance(self.input, str):
            return [_message_item(None, "user", [{"type": "input_text", "text": self.input}])]
        items = []
        for item in self.input:
            if isinstance(item, InputMessage):
                kind = "output_text" if item.role == "assistant" else "input_text"
                parts = [{"type": kind, "text": item.content}] if isinstance(item.content, str) else \
                    [p.model_dump(exclude_none=True) for p in item.content]
                items.append(_message_item(item.id, item.role, parts))
            elif isinstance(item, ReasoningItem):
                items.append(dict(item.model_dump(exclude_none=True), id=item.id or new_id("rs_")))
            else:
                prefix = "fc_" if isinstance(item, FunctionCallItem) else "fco_"
                dumped = item.model_dump(by_alias=True, exclude_none=True)
                items.append(dict(dumped, id=item.id or new_id(prefix), status="completed"))
        return items

    @cached_property
    def tool_use(self) -> ToolUse:
        named = self.tool_choice.name if isinstance(self.tool_choice, FunctionChoice) else None
        functions = [t.model_dump(exclude_none=True, exclude={"type"}) for t in self.tools or []]
        answer = self.text.format.answer_schema() if self.text and self.text.format else None
        return ToolUse(functions, None if named else self.tool_choice, named, self.parallel_tool_calls, "tools.{}",
                       answer, "text.format", empty_ok=True)

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS in (self.include or [])

    @property
    def effort(self) -> str | None:
        return self.reasoning.effort if self.reasoning is not None else None

    @property
    def chat_options(self) -> ChatOptions:
        """The template's options: `reasoning.effort` as `reasoning_effort` (as vLLM hands it over)."""
        return ChatOptions(variables={"reasoning_effort": self.effort}) if self.effort else ChatOptions()

    def to_sampling(self) -> SamplingParams:
        schema = self.text.format.answer_schema() if self.text and self.text.format else None
        logprobs = (self.top_logprobs or 0) if self.wants_logprobs else None
        params = self.sampling(logprobs, self.max_output_tokens, schema, max_tokens_param="max_output_tokens")
        params.schema_param = "text.format"
        return self.tool_use.constrain(params, "text.format")

    def echo(self) -> dict[str, Any]:
        """The request's settings a response object repeats."""
        return {
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {}, "parallel_tool_calls": self.parallel_tool_calls is not False,
            "previous_response_id": self.previous_response_id, "store": self.store,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p, "top_logprobs": self.top_logprobs or 0,
            "text": {"format": self.text.format.model_dump(by_alias=True, exclude_none=True)
                     if self.text and self.text.format else {"type": "text"}},
            "tool_choice": self.tool_choice.model_dump() if isinstance(self.tool_choice, FunctionChoice)
            else self.tool_choice or "auto",  # OpenAI's default, tools or not
            "tools": [t.model_dump(exclude_none=True) for t in self.tools or []],
            "truncation": self.truncation, "user": self.user, "background": False,
            "reasoning": {"effort": self.effort, "summary": None}, "safety_identifier": self.safety_identifier,
            "prompt_cache_key": self.prompt_cache_key, "prompt_cache_retention": self.prompt_cache_retention,
            "service_tier": "default",
        }
