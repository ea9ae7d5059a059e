"""Anthropic's Messages API request (POST /v1/messages, /v1/messages/count_tokens), and its
translation into the chat request it is served as (server/messages.py): the system prompt, text,
tool_use / tool_result and thinking blocks become chat messages, tools and tool_choice chat's, a
final assistant message a prefill the answer continues."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, StrictBool, StrictFloat, StrictInt, ValidationError, field_validator, model_validator

from engine.sampling_params import InvalidParamError
from server.errors import telling_error, validation_message
from server.protocol import ChatCompletionRequest, FFNSkip, RequestBody, Strict, null_only

READ_ONLY_TEXT = ("image", "document", "search_result", "container_upload")  # blocks a text model cannot read


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: Any = None  # prefixes are cached here whatever it says
    citations: Any = None  # (a response's text block sent back as it came)


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: Any = None
    caller: Any = None  # (a response's block sent back as it came)
    toolset_name: Optional[str] = None


def refuse_unread_blocks(value):
    """A list of content blocks with one this text model cannot read (an image, a document, ...): a
    400 saying so, naming the block (its index; the field's path is the caller's)."""
    for i, block in enumerate(value if isinstance(value, list) else []):
        if isinstance(block, dict) and block.get("type") in READ_ONLY_TEXT:
            raise InvalidParamError(f"content.{i}: {block['type']} blocks are not supported: this model reads text only")
    return value


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Union[str, list[TextBlock], None] = None
    is_error: Optional[StrictBool] = None

    _text_only = field_validator("content", mode="before")(refuse_unread_blocks)
    cache_control: Any = None
    toolset_name: Optional[str] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(block.text for block in self.content)


class ThinkingBlock(Strict):
    type: Literal["thinking"]
    thinking: str
    signature: Optional[str] = None


class RedactedThinkingBlock(Strict):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[Union[TextBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock],
                  Field(discriminator="type")]


class Message(Strict):
    role: Literal["user", "assistant"]
    content: Union[str, list[Block]]

    _text_only = field_validator("content", mode="before")(refuse_unread_blocks)

    def chat_messages(self) -> list[dict]:
        """This message as chat messages: a user turn's tool results first, each a tool message, then
        its text; an assistant turn's text, tool calls and thinking as one assistant message."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        texts = [b.text for b in self.content if isinstance(b, TextBlock)]
        if self.role == "user":
            results = [{"role": "tool", "tool_call_id": b.tool_use_id,
                        "content": ("Error: " if b.is_error else "") + b.text()}
                       for b in self.content if isinstance(b, ToolResultBlock)]
            return results + ([{"role": "user", "content": "\n".join(texts)}] if texts or not results else [])
        said: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts else None}
        calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                 for b in self.content if isinstance(b, ToolUseBlock)]
        if calls:
            said["tool_calls"] = calls
        thought = "".join(b.thinking for b in self.content if isinstance(b, ThinkingBlock))
        if thought:
            said["reasoning_content"] = thought
        if said["content"] is None and not calls:
            said["content"] = ""
        return [said]


class ToolDef(Strict):
    name: str
    description: Optional[str] = None
    input_schema: dict[str, Any]
    type: Optional[Literal["custom"]] = None
    cache_control: Any = None
    # taken, no effect: who may call it, loading hints, examples
    allowed_callers: Any = None
    defer_loading: Optional[StrictBool] = None
    eager_input_streaming: Optional[StrictBool] = None
    input_examples: Optional[list[dict[str, Any]]] = None
    strict: Optional[StrictBool] = None  # the chat tool's `strict`: a keyword its schema cannot hold is a 400

    @model_validator(mode="before")
    @classmethod
    def _custom_only(cls, value):
        if isinstance(value, dict) and value.get("type") not in (None, "custom"):
            raise InvalidParamError(f"{value.get('type')!r}: Anthropic's server tools (web search, code execution, "
                                    "...) are not served here; give tools with a name and an input_schema")
        return value


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: Optional[StrictBool] = None


MIN_THINKING_BUDGET = 1024  # Anthropic's least thinking budget


class Thinking(Strict):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: Optional[StrictInt] = None  # taken, not enforced
    display: Optional[Literal["summarized", "omitted"]] = None  # the thinking is shown whole (or not split)


class OutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Strict):
    """`format`: the answer's text held to a JSON schema, as chat's response_format holds it;
    `effort`: to a chat template that reads a reasoning effort (gpt-oss's), else no effect."""
    effort: Optional[Literal["low", "medium", "high", "xhigh", "max"]] = None
    format: Optional[OutputFormat] = None


class MessagesMetadata(Strict):
    user_id: Optional[str] = None


class CountTokensRequest(RequestBody):
    """POST /v1/messages/count_tokens: what a Messages request's prompt would hold."""
    model: str
    messages: list[Message] = Field(min_length=1)
    system: Union[str, list[TextBlock], None] = None
    tools: Optional[list[ToolDef]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[Thinking] = None
    cache_control: Any = None  # the prefix cache keeps what it can, marked or not
    output_config: Optional[OutputConfig] = None
    # taken, no effect: one speed, one place, no workspaces
    speed: Optional[Literal["standard", "fast"]] = None
    inference_geo: Optional[str] = None
    workspace_id: Optional[str] = None
    user_profile_id: Optional[str] = None

    @model_validator(mode="after")
    def _contents_given(self):
        """Every message says something but a final assistant one (an empty prefill), as Anthropic's
        API requires: an empty user turn or `content: []` is a 400 there, and one here."""
        for i, message in enumerate(self.messages):
            if not message.content and not (0 < i == len(self.messages) - 1 and message.role == "assistant"):
                raise InvalidParamError(f"messages.{i}: all messages must have non-empty content except for the "
                                        "optional final assistant message", f"messages.{i}.content")
        last = self.messages[-1]
        texts = [last.content] if isinstance(last.content, str) else \
            [b.text for b in last.content if isinstance(b, TextBlock)]
        if last.role == "assistant" and texts and texts[-1] != texts[-1].rstrip():  # (a prefill: as Anthropic's)
            raise InvalidParamError("messages: final assistant content cannot end with trailing whitespace",
                                    f"messages.{len(self.messages) - 1}.content")
        return self

    @model_validator(mode="after")
    def _results_answer_uses(self):
        """As Anthropic's API: each tool_use block is answered by a tool_result in the next message,
        and each tool_result answers a tool_use of the message before it (a 400 there, and here: the
        model would read a history in which a call got no result, or a result came from no call)."""
        def ids(message: Message, kind) -> list[str]:
            blocks = message.content if isinstance(message.content, list) else []
            return [b.id if kind is ToolUseBlock else b.tool_use_id for b in blocks if isinstance(b, kind)]

        for i, message in enumerate(self.messages):
            uses = ids(self.messages[i - 1], ToolUseBlock) if i else []
            missing = [u for u in uses if u not in ids(message, ToolResultBlock)]
            if missing:
                raise InvalidParamError(f"messages.{i}: `tool_use` ids were found without `tool_result` blocks "
                                        f"immediately after: {', '.join(missing)}. Each `tool_use` block must have a "
                                        "corresponding `tool_result` block in the next message.", f"messages.{i}")
            stray = [r for r in ids(message, ToolResultBlock) if r not in uses]
            if stray:
                raise InvalidParamError(f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` "
                                        f"blocks: {stray[0]}. Each `tool_result` block must have a corresponding "
                                        "`tool_use` block in the previous message.", f"messages.{i}.content")
        return self

    def chat_body(self, effort_read: bool = False) -> dict:
        """The chat request's fields this request makes (`effort_read`: the chat template reads a
        reasoning effort)."""
        messages = []
        if self.system:
            text = self.system if isinstance(self.system, str) else "\n".join(b.text for b in self.system)
            messages.append({"role": "system", "content": text})
        given = self.messages
        if given[-1].role == "assistant" and not given[-1].content:  # an empty prefill: a plain answer
            given = given[:-1]
        for message in given:
            messages += message.chat_messages()
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if given[-1].role == "assistant":  # a prefill: the answer continues it, as Claude's does
            body["continue_final_message"] = True
        if self.tools:
            body["tools"] = [{"type": "function", "function": {
                "name": t.name, "parameters": t.input_schema, **({"description": t.description} if t.description else {}),
                **({"strict": t.strict} if t.strict is not None else {})}}  # (strict: its schema held as chat's)
                for t in self.tools]
        choice = self.tool_choice
        if choice is not None:
            if choice.type == "tool":
                if not choice.name:
                    raise InvalidParamError("tool_choice of type tool needs the tool's name", "tool_choice.name")
                body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
            else:
                body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
            if choice.disable_parallel_tool_use:
                body["parallel_tool_calls"] = False
        config = self.output_config
        if config is not None and config.format is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output",
                                                                             "schema": config.format.schema_}}
        if self.thinking is not None and self.thinking.type == "disabled":  # no thinking blocks in the answer
            body["include_reasoning"] = False
        if config is not None and config.effort is not None and effort_read:
            body["reasoning_effort"] = {"xhigh": "high", "max": "high"}.get(config.effort, config.effort)
        return body

    def chat_request(self, effort_read: bool = False, **more) -> ChatCompletionRequest:
        """The chat request this is served as (its checks name the chat's fields only where a Messages
        field maps to several: messages are checked here first)."""
        try:
            return ChatCompletionRequest.model_validate(self.chat_body(effort_read) | more)
        except ValidationError as exc:  # (a 400 naming the chat field, never a 500)
            message, param = validation_message(telling_error(exc.errors()))
            raise InvalidParamError(message, param) from None


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""
    max_tokens: StrictInt
    stop_sequences: Optional[list[str]] = None
    temperature: Optional[StrictFloat] = None
    top_p: Optional[StrictFloat] = None
    top_k: Optional[StrictInt] = None
    stream: StrictBool = False
    metadata: Optional[MessagesMetadata] = None
    service_tier: Optional[Literal["auto", "standard_only"]] = None  # one tier here
    ffn_skip: Optional[FFNSkip] = None
    diagnostics: Optional[dict[str, Any]] = None  # taken: no cache diagnostics are reported
    container: null_only("'container' is not supported: this server runs no code execution") = None

    @field_validator("max_tokens")
    @classmethod
    def _not_negative(cls, value):
        if value < 0:
            raise InvalidParamError("max_tokens must be at least 0", "max_tokens")
        return value

    @model_validator(mode="after")
    def _thinking_budget(self):
        """As Anthropic's API: thinking `enabled` names a budget of at least 1,024 tokens (not held
        below `max_tokens`: with interleaved thinking, Anthropic's beta that agents send, it may be
        above; the budget itself is not enforced here: the thinking is what the model writes)."""
        thinking = self.thinking
        if thinking is None or thinking.type != "enabled" or self.max_tokens == 0:  # (0: refused by its own check)
            return self
        if thinking.budget_tokens is None or thinking.budget_tokens < MIN_THINKING_BUDGET:
            raise InvalidParamError(f"thinking.budget_tokens: thinking enabled needs a budget of at least "
                                    f"{MIN_THINKING_BUDGET} tokens", "thinking.budget_tokens")
        return self

    @field_validator("temperature")
    @classmethod
    def _anthropics_range(cls, value):
        """Anthropic's temperatures run from 0 to 1 (chat's to 2): an app tried here fails there otherwise."""
        if value is not None and not 0 <= value <= 1:
            raise InvalidParamError(f"temperature: range: 0 <= temperature <= 1, got {value}", "temperature")
        return value

    @model_validator(mode="after")
    def _warm_only_alone(self):
        """`max_tokens: 0` computes the prompt into the prefix cache and makes no token (Anthropic's
        cache pre-warming): as Anthropic's, not with streaming, thinking or a structured output."""
        if self.max_tokens == 0:
            for given, name in ((self.stream, "stream"),
                                (self.thinking is not None and self.thinking.type != "disabled", "thinking"),
                                (self.output_config is not None and self.output_config.format is not None,
                                 "output_config.format")):
                if given:
                    raise InvalidParamError(f"max_tokens: 0 (the prompt cached, no answer) cannot be used with "
                                            f"{name}", name)
        return self

    def chat(self, effort_read: bool = False) -> ChatCompletionRequest:
        more: dict[str, Any] = {"max_tokens": self.max_tokens or 1, "stream": self.stream}
        for field in ("temperature", "top_p", "top_k"):
            if getattr(self, field) is not None:
                more[field] = getattr(self, field)
        if self.stop_sequences:
            more["stop"] = self.stop_sequences
        if self.stream:  # the usage comes last, for message_delta
            more["stream_options"] = {"include_usage": True}
        if self.ffn_skip is not None:
            more["ffn_skip"] = self.ffn_skip.model_dump(exclude_none=True)
        chat = self.chat_request(effort_read, **more)
        chat._prompt_only = self.max_tokens == 0
        return chat
