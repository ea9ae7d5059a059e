"""Request bodies of the OpenAI API (the subset we honour) and their mapping to engine params.

Every model forbids unknown fields, so a parameter we do not implement is a 400 naming it,
never silently ignored.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from functools import cached_property
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, StrictBool, StrictFloat,
                      StrictInt, ValidationInfo, field_validator, model_validator)

from engine.sampling_params import MAX_LOGPROBS, InvalidParamError, SamplingParams, SkipParams
from engine.structured.gbnf import GrammarError, gbnf_regex
from engine.tokenizer import ChatOptions
from server import template_tools
from server.tool_calls import call_body, calls_schema, cut_calls, parse_calls

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Seed = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]


def is_text(value: str) -> bool:
    """False for a string that is not valid Unicode text: a lone UTF-16 surrogate ("\\ud800") parses
    from JSON but can be neither tokenized nor written back as UTF-8."""
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


NUMBERS = {int, float, bool, type(None)}  # the JSON values that hold no text
MAX_DEPTH = 100  # of a request body's nesting (a JSON schema written out in full is far shallower)


class TooDeep(ValueError):
    pass


def find_non_text(value, path: str = "") -> str | None:
    """Dotted path of the first string in a parsed JSON value that is not text (for a key: the path of
    its object, "" at the top); None if all are text. Walked with a stack of its own, not Python's, and
    raises TooDeep for a value nested more than MAX_DEPTH deep (later checks recurse into it)."""
    stack = [(value, path, None, 0)]  # (value, its parent's path, its key there, depth): paths made as needed
    while stack:
        value, path, key, depth = stack.pop()
        if key is not None:
            path = f"{path}.{key}" if path else str(key)
        if isinstance(value, str):
            if not is_text(value):
                return path
            continue
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        if items and depth >= MAX_DEPTH:
            raise TooDeep(f"the request body is nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, list) and set(map(type, value)) <= NUMBERS:  # token ids, say (walked in C)
            continue
        children = []
        for key, item in items:
            if isinstance(key, str) and not is_text(key):
                return path
            if isinstance(item, (str, dict, list)):  # (numbers, booleans, nulls: no text)
                children.append((item, path, key, depth + 1))
        stack.extend(reversed(children))  # depth first, in document order
    return None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        """An explicit null for a field with a default means that default, as OpenAI's schema types
        those fields "... or null" (`"n": null`, `"stream": null`)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if v is not None or k not in fields or fields[k].is_required() or fields[k].default is None}


class RequestBody(Strict):
    """A whole request body: a JSON object whose strings are all valid Unicode text."""

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        if not isinstance(data, dict):
            raise InvalidParamError("the request body must be a JSON object")
        try:
            where = find_non_text(data)
        except TooDeep as exc:
            raise InvalidParamError(str(exc))
        if where is not None:
            raise InvalidParamError("strings must be valid Unicode text (found a lone UTF-16 surrogate)",
                                    where or None)
        return data


class LoraScale(Strict):
    """llama-server's {"id": i, "scale": s}: its i-th --lora adapter at scale s (server/llama_cpp_protocol.py
    `lora_scales`)."""
    id: StrictInt
    scale: StrictFloat = 0.0  # (llama-server's where it is left out)


class FFNSkip(Strict):
    budget: Optional[StrictFloat] = None
    threshold: Optional[StrictFloat] = None
    warmup_tokens: Optional[StrictInt] = None

    def to_params(self) -> SkipParams:
        return SkipParams(self.budget, self.threshold, self.warmup_tokens)


class StreamOptions(Strict):
    include_usage: StrictBool = False
    include_obfuscation: Optional[StrictBool] = None  # nothing is obfuscated: accepted, no effect
    continuous_usage_stats: Optional[StrictBool] = None  # vLLM's: with include_usage, the usage so far on every chunk


MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's limits


class ClientHints(Strict):
    """Fields of OpenAI's request bodies that SDKs and agent frameworks send and that change nothing
    here: tags, one service tier, and identifiers for abuse detection and cache routing."""
    metadata: Optional[dict[str, str]] = None
    service_tier: Optional[Literal["auto", "default"]] = None  # one tier here
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    # the prefix cache keeps what it can ("in-memory": the spelling of older SDKs and OpenAI's spec)
    prompt_cache_retention: Optional[Literal["in_memory", "in-memory", "24h"]] = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value):
        if value is not None and (len(value) > MAX_METADATA_KEYS or any(
                len(k) > MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE for k, v in value.items())):
            raise InvalidParamError(f"metadata holds at most {MAX_METADATA_KEYS} pairs, keys of at most "
                                    f"{MAX_METADATA_KEY} characters and values of at most {MAX_METADATA_VALUE}",
                                    "metadata")
        return value


def null_only(reason: str):
    """A field of OpenAI's that this model cannot honour: null (not set) is taken, anything else is a
    400 giving `reason` (pydantic's own words would be "Input should be None")."""
    def check(value):
        if value is not None:
            raise InvalidParamError(reason)
        return value

    return Annotated[Any, BeforeValidator(check)]


class TextPart(Strict):
    type: Literal["text"]
    text: str
    cache_control: Any = None  # Anthropic's prompt-caching mark, which LiteLLM and agents pass on: ignored


class CalledFunction(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    parsed_arguments: Any = None  # the SDK's stream helper adds it to a message sent back: ignored


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction
    index: Optional[StrictInt] = None  # a streamed call's, when the SDK's accumulated message is sent back


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None  # None only beside an assistant's tool_calls
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant's earlier calls
    tool_call_id: Optional[str] = None  # a tool result's call
    # an assistant's thinking, as --reasoning-parser answers carry it (vLLM reads both names): to the
    # template as `reasoning_content`, which thinking models' templates read (or leave out)
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None
    # what the SDK's response message carries when it is appended to the history as it is: ignored
    refusal: Any = None
    annotations: Any = None
    audio: Any = None
    function_call: Any = None
    parsed: Any = None
    cache_control: Any = None  # (as on a text part; prefixes are cached here whatever it says)

    @model_validator(mode="after")
    def _tool_fields_in_their_roles(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise InvalidParamError("only assistant messages carry tool_calls")
        if (self.reasoning_content or self.reasoning) and self.role != "assistant":
            raise InvalidParamError("only assistant messages carry reasoning_content")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise InvalidParamError("tool messages, and only they, carry a tool_call_id")
        if self.content is None and not self.tool_calls:
            wanted = "content or tool_calls" if self.role == "assistant" else "content"
            old = " (the deprecated function_call is not read)" if self.function_call is not None else ""
            raise InvalidParamError(f"{'an' if self.role == 'assistant' else 'a'} {self.role} message needs "
                                    f"{wanted}{old}")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value, info: ValidationInfo):
        if isinstance(value, list):
            if info.data.get("role") == "assistant":  # an earlier answer's refusal (OpenAI takes it there): its text
                value = [{"type": "text", "text": part["refusal"]} if isinstance(part, dict) and
                         part.get("type") == "refusal" and isinstance(part.get("refusal"), str) else part
                         for part in value]
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "refusal":
                    raise InvalidParamError("refusal parts belong to assistant messages")
                if kind is not None and kind != "text":
                    raise InvalidParamError(f"content parts of type '{kind}' are not supported: this model "
                                            "takes text only")
                if kind == "text" and not isinstance(part.get("text"), str):
                    raise InvalidParamError("a text content part needs its text, a string")
        return value

    def text(self) -> str | None:
        if self.content is None:
            return None
        # text parts one per line, as vLLM joins them
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)

    def as_dict(self) -> dict:
        """role and text, and the tool fields where given (what server/tool_calls.py renders)."""
        out = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.reasoning_content or self.reasoning:
            out["reasoning_content"] = self.reasoning_content or self.reasoning
        return out


class JSONSchemaFormat(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # as OpenAI names it
    description: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema")
    strict: Optional[StrictBool] = None


class ResponseFormat(Strict):
    """OpenAI's, and TGI's chat grammar: {"type": "json" | "json_object", "value": a schema (or its
    text)}, {"type": "regex", "value": an expression}, {"type": "json_schema", "value": {"name",
    "schema"}} (what huggingface_hub's chat_completion sends in place of OpenAI's json_schema)."""
    type: Literal["text", "json_object", "json_schema", "json", "regex"]
    json_schema: Optional[JSONSchemaFormat] = None
    value: Any = None  # TGI's

    def answer_schema(self) -> dict | None:
        """The JSON schema the answer must follow (None: free text, or a regex); json_object without
        a schema is any object."""
        if self.value is not None or self.type in ("json", "regex"):
            return self._tgi_schema()
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise InvalidParamError("response_format: json_schema is required with type json_schema, and only there",
                                    "response_format")
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "object"}
        if self.json_schema.schema_ is None:
            raise InvalidParamError("response_format: json_schema.schema is required", "response_format")
        return self.json_schema.schema_

    def answer_regex(self) -> str | None:
        """TGI's regex grammar: the expression the whole answer matches."""
        if self.type != "regex":
            return None
        if not isinstance(self.value, str):
            raise InvalidParamError("response_format: a regex's value is the expression, a string", "response_format")
        return self.value

    def _tgi_schema(self) -> dict | None:
        if self.json_schema is not None or self.type == "text" or self.value is None and self.type != "regex":
            raise InvalidParamError("response_format: TGI's form is {\"type\": \"json\", \"json_object\", \"regex\" "
                                    "or \"json_schema\", \"value\": ...}", "response_format")
        if self.type == "regex":
            return None
        schema = self.value
        if self.type == "json_schema":  # (its schema an object, as TGI's JsonSchemaConfig holds it)
            schema = schema.get("schema") if isinstance(schema, dict) and isinstance(schema.get("schema"), dict) \
                else None
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                schema = None
        if not isinstance(schema, dict):
            raise InvalidParamError("response_format: value is a JSON schema (json_schema's: {\"name\", \"schema\"})",
                                    "response_format")
        return schema


class SamplingRequest(RequestBody):
    """The sampling knobs every generating route takes (OpenAI's, and vLLM's extensions)."""
    model: Optional[str] = None  # required by OpenAI; vLLM and llama-server answer with the served model without it
    temperature: Optional[StrictFloat] = None
    top_p: Optional[StrictFloat] = None
    top_k: Optional[StrictInt] = None
    min_p: Optional[StrictFloat] = None
    typical_p: Optional[StrictFloat] = None  # typical sampling's mass (engine/typical.py), as TGI and llama.cpp take it
    stop: Union[str, list[str], None] = None
    seed: Optional[Seed] = None  # int64, as vLLM; the sampler's stream for it (choice i: seed + i)
    stream: StrictBool = False
    presence_penalty: Optional[StrictFloat] = None
    frequency_penalty: Optional[StrictFloat] = None
    repetition_penalty: Optional[StrictFloat] = None
    logit_bias: Optional[dict[str, StrictFloat]] = None
    user: Optional[str] = None
    ignore_eos: StrictBool = False
    # vLLM's: tokens made before the answer may end; token ids that end it; a stop string kept in the
    # text; special tokens' text left out of it
    min_tokens: Optional[StrictInt] = None
    stop_token_ids: Optional[list[StrictInt]] = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    # vLLM's: taken, no effect (special tokens' texts are joined as they are, as vLLM's fast tokenizers join them)
    spaces_between_special_tokens: StrictBool = True
    allowed_token_ids: Optional[list[StrictInt]] = None  # vLLM's: the only tokens the answer may take
    bad_words: Optional[list[str]] = None  # vLLM's: words the answer never writes (engine/bad_words.py)
    cache_salt: Optional[str] = None  # vLLM's: cached prefixes shared only with the same salt (engine/kv)
    priority: Optional[StrictInt] = None  # vLLM's: lower first, under --scheduling-policy priority
    ffn_skip: Optional[FFNSkip] = None

    def to_sampling_with(self, defaults: dict) -> SamplingParams:
        """`to_sampling()` under the server's defaults (engine/generation_defaults.py: the model's
        generation config), as vLLM applies them: each in the settings this request leaves out (or
        sends as null), and its token cap ("max_tokens") as the answer's cap, whatever is asked."""
        for name, value in defaults.items():
            if name != "max_tokens" and getattr(self, name) is None:
                setattr(self, name, value)
        params = self.to_sampling()
        params.max_tokens_cap = defaults.get("max_tokens")
        return params

    def sampling(self, logprobs: int | None, max_tokens: int | None, schema: dict | None, n: int = 1,
                 max_tokens_param: str = "max_tokens") -> SamplingParams:
        """`schema`: the JSON schema the answer must follow (None: free text); `max_tokens_param`: the
        field `max_tokens` came from, for its errors."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()):  # int() would take " 5", "5_0" and other scripts' digits
                raise InvalidParamError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
            bias[int(key)] = value
        return SamplingParams(
            n=n, max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, min_p=self.min_p or 0.0, typical_p=1.0 if self.typical_p is None else self.typical_p,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=bias, seed=self.seed, stop=stop, ignore_eos=self.ignore_eos, logprobs=logprobs,
            response_schema=schema, max_tokens_param=max_tokens_param, min_tokens=self.min_tokens or 0,
            stop_token_ids=list(self.stop_token_ids or []), include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            allowed_token_ids=None if self.allowed_token_ids is None else list(self.allowed_token_ids),
            bad_words=list(self.bad_words or []), cache_salt=self.cache_salt, priority=self.priority or 0,
        )

    def skip(self) -> SkipParams | None:
        return self.ffn_skip.to_params() if self.ffn_skip else None


def score_prompt(params: SamplingParams, alternatives: int) -> None:
    """The prompt's tokens scored with at least `alternatives` likeliest tokens each (echo's logprobs
    and `prompt_logprobs` may both ask: each answer takes its own count of them)."""
    params.prompt_logprobs = max(params.prompt_logprobs or 0, alternatives)


class GuidedOutput(Strict):
    """vLLM's `structured_outputs`: the one thing the whole answer is held to."""
    json_: Union[dict, StrictBool, str, None] = Field(None, alias="json")  # a JSON schema (or its text, as vLLM takes it)
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    json_object: Optional[StrictBool] = None
    grammar: Optional[str] = None  # GBNF (engine/structured/gbnf.py)
    structural_tag: null_only("structural tags are not supported here") = None


class CommonRequest(SamplingRequest):
    """What /v1/chat/completions and /v1/completions share beyond the sampling knobs."""
    max_tokens: Optional[StrictInt] = None
    lora: Optional[list[LoraScale]] = None  # llama-server's: its --lora adapters' scales for this request
    n: StrictInt = 1
    stream_options: Optional[StreamOptions] = None
    response_format: Optional[ResponseFormat] = None  # chat and, as vLLM and llama.cpp take it, completions
    # vLLM's: the answer held to a JSON schema, a regular expression or a list of strings
    structured_outputs: Optional[GuidedOutput] = None
    guided_json: Union[dict, StrictBool, str, None] = None  # vLLM's older names for the same
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None  # one backend here: accepted, no effect
    grammar: Optional[str] = None  # llama.cpp's: a GBNF grammar the answer follows
    json_schema: Union[dict, StrictBool, None] = None  # llama.cpp's: a JSON schema the answer follows
    # vLLM's: each prompt's last k tokens (-1: as many as fit beside the answer; server/generation.py),
    # or with truncation_side "right" its first k
    truncate_prompt_tokens: Optional[StrictInt] = None
    truncation_side: Optional[Literal["left", "right"]] = None
    # vLLM's: each prompt token's logprob, rank and k likeliest alternatives (server/completions.py)
    prompt_logprobs: Optional[StrictInt] = None
    # vLLM's: logprobs' tokens as "token_id:<id>" (server/completions.py)
    return_tokens_as_token_ids: Optional[StrictBool] = None
    # vLLM's: the prompt's token ids and each choice's (streamed: each chunk's new ones; server/completions.py)
    return_token_ids: Optional[StrictBool] = None
    # vLLM's: the answer's id is "chatcmpl-<request_id>" ("cmpl-" on completions); an x-request-id header wins
    request_id: Optional[str] = Field(None, min_length=1, max_length=256)
    # vLLM's beam search: not here (false taken); its length_penalty, which nothing else reads, taken
    use_beam_search: Optional[StrictBool] = None
    length_penalty: Optional[StrictFloat] = None

    @field_validator("use_beam_search")
    @classmethod
    def _no_beam_search(cls, value):
        if value:
            raise InvalidParamError("beam search is not supported here: use n for several sampled answers",
                                    "use_beam_search")
        return value

    def choices_sampling(self, logprobs: int | None, max_tokens: int | None,
                         max_tokens_param: str = "max_tokens") -> SamplingParams:
        if self.stream_options is not None and not self.stream:  # as OpenAI and vLLM answer it
            raise InvalidParamError("stream_options is only allowed when stream is true", "stream_options")
        schema = self.response_format.answer_schema() if self.response_format else None
        regex = self.response_format.answer_regex() if self.response_format else None
        guided = self.guided()
        if guided is not None and (schema is not None or regex is not None):
            raise InvalidParamError(f"response_format and {guided[2]} both hold the answer: give one of them", guided[2])
        params = self.sampling(logprobs, max_tokens, schema, self.n, max_tokens_param)
        if guided is not None:
            kind, value, params.schema_param = guided
            setattr(params, f"response_{kind}", value)
        if regex is not None:
            params.response_regex = regex
        if self.prompt_logprobs is not None:  # as vLLM's default max_logprobs allows them, and not streamed
            if not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
                raise InvalidParamError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]", "prompt_logprobs")
            if self.stream and self.prompt_logprobs > 0:  # (0 is taken and shows nothing, as vLLM streams it)
                raise InvalidParamError("prompt_logprobs are not available when stream is true", "prompt_logprobs")
            if not self.stream:
                score_prompt(params, self.prompt_logprobs)
        return params

    def guided(self) -> tuple[str, Any, str] | None:
        """What `structured_outputs` (or a `guided_*` field, or llama.cpp's `grammar`) holds the answer
        to: ("schema", a JSON schema, its field), ("regex", a regex the whole answer matches, its
        field: a GBNF grammar's too, engine/structured/gbnf.py) or ("choices", the strings, its
        field); None where nothing is."""
        outputs = self.structured_outputs
        given = {f"structured_outputs.{k}": v for k, v in (("json", outputs.json_), ("regex", outputs.regex),
                 ("choice", outputs.choice), ("json_object", outputs.json_object or None),
                 ("grammar", outputs.grammar))} if outputs else {}
        given |= {"guided_json": self.guided_json, "guided_regex": self.guided_regex, "guided_choice": self.guided_choice,
                  "guided_grammar": self.guided_grammar, "grammar": self.grammar, "json_schema": self.json_schema}
        given = {k: v for k, v in given.items() if v is not None}
        if len(given) > 1:
            raise InvalidParamError(f"{' and '.join(given)} both hold the answer: give one of them", list(given)[1])
        if not given:
            if self.structured_outputs is not None:
                raise InvalidParamError("structured_outputs needs one of json, regex, choice, json_object or "
                                        "grammar", "structured_outputs")
            return None
        (param, value), = given.items()
        kind = {"json_schema": "json"}.get(param) or param.rsplit(".", 1)[-1].removeprefix("guided_")
        if kind == "json_object":
            return "schema", {"type": "object"}, param
        if kind == "json":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except (ValueError, RecursionError):
                    value = None
            if not isinstance(value, (dict, bool)):
                raise InvalidParamError(f"{param} must be a JSON schema (an object, or its JSON text)", param)
            return "schema", value, param
        if kind == "regex":
            return "regex", value, param
        if kind == "grammar":
            try:
                return "regex", gbnf_regex(value), param
            except GrammarError as exc:
                raise InvalidParamError(f"{param}: {exc}", param) from None
            except RecursionError:
                raise InvalidParamError(f"{param}: the grammar is nested too deeply", param) from None
        return "choices", tuple(value), param

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


class Function(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # as OpenAI names them
    description: Optional[str] = None
    parameters: Optional[dict] = None  # a JSON schema of the arguments object
    strict: Optional[StrictBool] = None


class Tool(Strict):
    type: Literal["function"]
    function: Function


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class ToolUse:
    """The tools a request shows the model and how it may call them (server/tool_calls.py): `mode`
    "none" (no tools shown), "auto" (it may answer with a call) or "forced" (its answer is a call of
    one of `tools`); `parallel`: whether it may call several at once; `listed`: "auto" beside a
    response format, where calls come as a JSON list and the format's object as the answer.

    `functions`: the tools' functions as dicts (name, description, parameters); `choice`: "none",
    "auto", "required" or None; `named`: the function a request forces by name; `parallel`:
    `parallel_tool_calls`; `where`: the request's path to tool i's function (chat nests it, the
    Responses API does not); `answer`: the response format's schema, if any, from the request's
    field `format_param`; `empty_ok`: settings that need tools are taken without them (the
    Responses API: the Agents SDK sends `parallel_tool_calls` with no tools)."""

    def __init__(self, functions: list[dict], choice: str | None, named: str | None, parallel: bool | None,
                 where: str = "tools.{}.function", answer: dict | None = None, format_param: str = "response_format",
                 empty_ok: bool = False):
        self.tools, self.mode, self.parallel, self.listed = [], "none", parallel is not False, False
        self.named = None  # the function a named tool_choice calls
        self.format = "json"  # how calls are shown and written (server/template_tools.py); set where the prompt is made
        if not functions:
            for name, value in (("tool_choice", named or choice), ("parallel_tool_calls", parallel)):
                if value not in (None, "none") and not (empty_ok and value in ("auto", True, False)):
                    raise InvalidParamError(f"{name} needs tools", name)
            return
        names = [f["name"] for f in functions]
        if len(set(names)) < len(names):
            raise InvalidParamError("tool names must be distinct", "tools")
        for i, f in enumerate(functions):
            if f.get("parameters", {}).get("type", "object") != "object":
                raise InvalidParamError("a function's parameters must be an object schema (type object)",
                                        where.format(i) + ".parameters")
        if choice == "none":
            return
        self.tools, self.mode = functions, "forced" if choice == "required" else "auto"
        if named is not None:
            if named not in names:
                raise InvalidParamError(f"tool_choice names {named!r}, which is not among the tools", "tool_choice")
            # a named function is called once
            self.tools, self.mode, self.parallel = [f for f in functions if f["name"] == named], "forced", False
            self.named = named
        if self.mode == "auto" and answer is not None:
            if answer.get("type", "object" if "properties" in answer or "$ref" in answer else None) != "object":
                raise InvalidParamError(f"{format_param} beside tools the model may call must be an object schema "
                                        "(type object): calls come as a JSON list", format_param)
            self.listed = True

    def constrain(self, params: SamplingParams, format_param: str) -> SamplingParams:
        """A forced call holds the answer to the calls' JSON schema (a response format applies to an
        answer, and this one is a call: OpenAI too answers a forced call whatever the format); with
        a format in auto mode, to "a list of calls, or the format"."""
        if self.mode != "none" and params.constrained and params.schema_param != format_param:
            raise InvalidParamError(f"{params.schema_param} cannot hold an answer that may be a tool call: "
                                    "use response_format beside tools", params.schema_param)
        if self.mode == "none" or self.mode == "auto" and not self.listed:
            return params
        try:
            params.response_schema = calls_schema(self.tools, self.parallel,
                                                  params.response_schema if self.listed else None)
        except RecursionError:
            raise InvalidParamError("a function's parameters are nested too deeply", "tools") from None
        params.schema_param = format_param if self.listed else "tools"
        return params

    @property
    def native(self) -> bool:
        """The template shows the tools (server/template_tools.py)."""
        return self.format != "json"

    @property
    def template_format(self):
        """The module that reads calls in the template's format where the model writes them so (in
        "auto"), None where they are the JSON a grammar holds."""
        return template_tools.FORMATS.get(self.format) if self.mode == "auto" and not self.listed else None

    def show_tags(self, params: SamplingParams) -> SamplingParams:
        """Where the template's format opens calls with a control token (Mistral's [TOOL_CALLS]),
        the answer's text keeps special tokens, as vLLM's mistral parser asks: the call's tag shows,
        so text before it is content. Called once the prompt has set the format."""
        if getattr(self.template_format, "TAG_IS_SPECIAL", False):
            params.skip_special_tokens = False
        return params

    def parse(self, text: str) -> tuple[str | None, list[dict] | None]:
        """A finished answer -> (its content, its tool calls in OpenAI's shape): (text, None) where
        it is no call; with calls, the content is what the model wrote before them (or None)."""
        if self.template_format is not None:
            found = self.template_format.parse(text, self.tools, self.parallel)
            return (text, None) if found is None else found
        calls = parse_calls(text, self.tools, self.parallel, self.listed)
        return (text, None) if calls is None else (None, calls)

    def finished(self, text: str, finish_reason: str | None) -> tuple[str | None, list[dict] | None, bool]:
        """A finished answer -> (its content, its tool calls in OpenAI's shape, whether they are whole),
        as `parse` reads an answer that ended itself. A forced call cut off (by `max_tokens`, or by a stop string
        before its JSON closed) comes back as calls with their arguments as far as they were
        written, as OpenAI returns them (a named function's, or the one tool's, once its JSON has
        begun, before the model wrote the name; an answer cut before any name is content, as is one
        cut while thinking, with no JSON yet). An "auto" answer that `max_tokens` cut after its calls were
        whole (a template's closing tag left unwritten) comes back as them, as vLLM's parsers read
        it; any other is content, as are answers in other modes and those that failed."""
        if self.mode == "none" or finish_reason not in ("stop", "length"):
            return text, None, False
        content, calls = self.parse(text)
        if calls is not None or self.mode != "forced":
            return content, calls, calls is not None
        calls = cut_calls(text, self.tools)
        if not calls and len(self.tools) == 1 and text.strip():  # (named, or the one tool: its name is known)
            calls = [call_body(self.tools[0]["name"], "")]
        return (None, calls, False) if calls else (text, None, False)

    def sendable(self, text: str) -> int:
        """How much of an unfinished answer may be streamed as content: none while it may still be
        a call's JSON (a forced call; "auto" answers that open with `{` or `[`), or up to a
        `<tool_call>` tag, say, in the template's format)."""
        if self.mode == "forced":
            return 0
        if self.template_format is not None:
            return self.template_format.sendable(text)
        return 0 if self.mode == "auto" and text.lstrip()[:1] in ("", "{", "[") else len(text)


class ChatTools(Strict):
    """A chat request's tools (and /tokenize's, which renders a chat prompt as chat does)."""
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[StrictBool] = None

    @cached_property
    def tool_use(self) -> ToolUse:
        """Checked once, read by the prompt's rendering and by the sampling params."""
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        answer_format = getattr(self, "response_format", None)  # chat's (/tokenize has none)
        if self.tools and answer_format is not None and answer_format.answer_regex() is not None:
            raise InvalidParamError("a regex response_format cannot be combined with tools", "response_format")
        return ToolUse([t.function.model_dump(exclude_none=True) for t in self.tools or []],
                       None if named else self.tool_choice, named, self.parallel_tool_calls,
                       answer=answer_format.answer_schema() if answer_format else None)


# the fields that shape a chat's prompt from its messages (ChatTemplating's but add_special_tokens)
TEMPLATING_FIELDS = ("add_generation_prompt", "continue_final_message", "chat_template_kwargs", "documents")


def refuse_chat_fields(body, fields: tuple[str, ...], given: str) -> None:
    """A request that gives `given` (a prompt, an input) in place of messages: a 400 naming the
    first of `fields` (fields a chat's prompt is made with) that it sets."""
    for name in fields:
        if getattr(body, name) is not None:
            raise InvalidParamError(f"{name} applies to 'messages', not to '{given}'", name)


class ChatTemplating(Strict):
    """How a chat request's messages become its prompt, as vLLM takes it: `add_generation_prompt`
    (default true: a new assistant turn), `continue_final_message` (default false: true leaves the
    final message open and the model continues it; add_generation_prompt then defaults to false),
    `chat_template_kwargs` (more variables for the template), `documents` (for RAG templates) and
    `add_special_tokens` (BOS and the like on top of the template's)."""
    add_generation_prompt: Optional[StrictBool] = None
    continue_final_message: Optional[StrictBool] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    documents: Optional[list[dict[str, str]]] = None  # for RAG templates (vLLM's)
    # the tokenizer's special tokens (BOS) on top of the template's (vLLM's; null: only without a template)
    add_special_tokens: Optional[StrictBool] = None

    @cached_property
    def chat_options(self) -> ChatOptions:
        continue_final = bool(self.continue_final_message)
        add = not continue_final if self.add_generation_prompt is None else self.add_generation_prompt
        return ChatOptions(add, continue_final, self.chat_template_kwargs or {}, self.documents,
                           self.add_special_tokens)


class Prediction(Strict):
    """A predicted output: at OpenAI a hint that speeds up an answer without changing it."""
    type: Literal["content"]
    content: Union[str, list[TextPart]]


# in this order of bases, `model` is the first field checked
class ChatCompletionRequest(ChatTemplating, ChatTools, CommonRequest, ClientHints):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = None
    # accepted, no effect: completions are not kept for retrieval here; a prediction only hints
    store: Optional[StrictBool] = None
    prediction: Optional[Prediction] = None
    modalities: Optional[list[Literal["text"]]] = None  # text is what this model writes
    # OpenAI's reasoning models' knob: handed to the chat template as `reasoning_effort` (gpt-oss's
    # template reads it, as vLLM hands it); a 400 for a template that reads none (server/completions.py)
    reasoning_effort: Optional[Literal["minimal", "low", "medium", "high"]] = None
    # vLLM's: false leaves the thinking --reasoning-parser splits off out of the answer
    include_reasoning: StrictBool = True
    # vLLM's: the final message's text before the answer's where it is the assistant's (continue_final_message)
    echo: Optional[StrictBool] = None
    # refused unless null
    verbosity: null_only("'verbosity' is not supported by this model") = None
    audio: null_only("'audio' is not supported: this model writes text only") = None
    web_search_options: null_only("'web_search_options' is not supported: this server has no web search") = None
    # set by Anthropic's `max_tokens: 0` (server/messages_protocol.py): the prompt computed into the
    # prefix cache, no token made
    _prompt_only: bool = PrivateAttr(False)

    @cached_property
    def chat_options(self) -> ChatOptions:
        options = ChatTemplating.chat_options.func(self)
        if self.reasoning_effort is None or "reasoning_effort" in options.variables:  # (the kwargs' own wins)
            return options
        return dataclasses.replace(options, variables={**options.variables, "reasoning_effort": self.reasoning_effort})

    @field_validator("modalities", mode="before")
    @classmethod
    def _modalities_text(cls, value):
        if isinstance(value, list) and any(m != "text" for m in value):
            raise InvalidParamError("modalities may hold only 'text': this model writes text only", "modalities")
        return value

    @property
    def continued_text(self) -> str:
        """With `echo`, the final message's text where the answer goes on in its role (the
        assistant's, or any where no new assistant turn is opened), as vLLM's echo gives it back;
        else ""."""
        final = self.messages[-1]
        same_turn = final.role == "assistant" or not self.chat_options.add_generation_prompt
        return (final.text() or "") if self.echo and same_turn else ""

    def to_sampling(self) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidParamError("top_logprobs requires logprobs: true", "top_logprobs")
        if self.max_completion_tokens is not None:
            params = self.choices_sampling(logprobs, self.max_completion_tokens, "max_completion_tokens")
        else:
            params = self.choices_sampling(logprobs, self.max_tokens)
        params.prompt_only = self._prompt_only
        return self.tool_use.constrain(params, "response_format")


# one text (or token ids) or a batch of them: completions' `prompt`, embeddings' `input`
Texts = Union[str, list[StrictInt], list[str], list[list[StrictInt]]]


TEXTS_TAKEN = "{} must be a string, a list of token ids, a list of strings or a list of token id lists"


def check_texts_shape(value, param: str):
    """An empty or mixed batch, or a value of no shape taken (an object, a number), is a 400 saying
    what is taken (not a union's "should be a valid string")."""
    if not isinstance(value, (str, list)):
        raise InvalidParamError(TEXTS_TAKEN.format(param), param)
    if isinstance(value, list):  # (the types gathered in C: a prompt may be a million token ids)
        kinds = set(map(type, value))
        lists = [p for p in value if type(p) is list] if list in kinds else []
        if not value or not all(lists):
            raise InvalidParamError(f"{param} must not be empty", param)
        inner = set(itertools.chain.from_iterable(map(type, p) for p in lists))
        if len(kinds) > 1 or kinds - {int, str, list} or inner - {int}:
            raise InvalidParamError(TEXTS_TAKEN.format(param), param)
    return value


def as_batch(texts) -> list[str | list[int]]:
    """A `Texts` value as its batch: each item text or token ids."""
    if isinstance(texts, str) or isinstance(texts[0], int):
        return [texts]
    return list(texts)


class CompletionRequest(CommonRequest):
    # one prompt (text or token ids) or a batch of them, each answered with `n` choices
    prompt: Texts
    logprobs: Optional[StrictInt] = None
    echo: Optional[StrictBool] = None
    best_of: Optional[Literal[1]] = None
    suffix: Optional[str] = None  # fill in the middle (server/fill_in_middle.py): the text after the answer
    # set by TGI's routes (server/tgi_api.py): sampled as TGI samples, its logprobs of the distribution
    # drawn from and its frequency penalty over the whole text
    _as_tgi: bool = PrivateAttr(False)
    # set by llama.cpp's routes (server/llama_cpp_api.py): the temperature after the filters, as its chain
    _temperature_last: bool = PrivateAttr(False)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_shape(cls, value):
        return check_texts_shape(value, "prompt")

    def prompts(self) -> list[str | list[int]]:
        """The batch: each prompt as text or token ids."""
        if self.suffix is not None and self.echo:
            raise InvalidParamError("suffix cannot be combined with echo: the answer is the middle alone", "suffix")
        if self.suffix is not None and self.truncate_prompt_tokens is not None:  # it would cut the infill tokens
            raise InvalidParamError("suffix cannot be combined with truncate_prompt_tokens", "truncate_prompt_tokens")
        return as_batch(self.prompt)

    @property
    def prompt_only(self) -> bool:
        """`echo` with `max_tokens: 0`: the prompt (and its logprobs) alone, as scorers ask for it."""
        return bool(self.echo) and self.max_tokens == 0

    def to_sampling(self) -> SamplingParams:
        if self.best_of is not None and self.n > self.best_of:  # (as OpenAI and vLLM refuse it)
            raise InvalidParamError(f"best_of ({self.best_of}) must be at least n ({self.n})", "best_of")
        max_tokens = 16 if self.max_tokens is None else 1 if self.prompt_only else self.max_tokens
        params = self.choices_sampling(self.logprobs, max_tokens)
        params.prompt_only = self.prompt_only
        params.logprobs_processed = params.frequency_over_text = self._as_tgi
        params.temperature_last = self._temperature_last
        params.logprobs_param = "logprobs"
        if self.echo and self.logprobs is not None:  # the echoed prompt's tokens come with their logprobs too
            score_prompt(params, self.logprobs)
        return params


class EmbeddingRequest(RequestBody, ChatTemplating):
    """OpenAI's embeddings request, or vLLM's chat form of it: `messages` (rendered by the model's
    template as chat renders them, without the assistant's turn unless `add_generation_prompt`,
    one vector for the whole conversation) in place of `input`."""
    model: Optional[str] = None  # (as SamplingRequest's)
    input: Optional[Texts] = None  # one text (or token ids) or a batch of them, each embedded alone
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1)
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32s
    dimensions: Optional[StrictInt] = None  # only the model's own: its vectors are not made to be cut
    user: Optional[str] = None  # accepted and ignored, as in chat and completions
    truncate_prompt_tokens: Optional[StrictInt] = None  # vLLM's: each input's last k tokens (-1: the context's)
    truncation_side: Optional[Literal["left", "right"]] = None  # vLLM's: "right" keeps the first k instead

    @model_validator(mode="after")
    def _input_or_messages(self):
        if (self.input is None) == (self.messages is None):
            raise InvalidParamError("give exactly one of 'input' or 'messages'", "input")
        if self.input is not None:
            refuse_chat_fields(self, TEMPLATING_FIELDS, "input")
        return self

    @property
    def embedding_chat_options(self) -> ChatOptions:
        """As vLLM renders an embeddings conversation: no new assistant turn unless asked for."""
        return dataclasses.replace(self.chat_options, add_generation_prompt=bool(self.add_generation_prompt))

    @field_validator("input", mode="before")
    @classmethod
    def _one_shape(cls, value):
        """An empty text is refused before it is tokenized (a tokenizer that adds BOS would make it
        one token), as OpenAI refuses it."""
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if item == "":
                raise InvalidParamError("input must not be empty", "input" if len(items) == 1 else f"input.{i}")
        return check_texts_shape(value, "input")

    def inputs(self) -> list[str | list[int]]:
        return as_batch(self.input)


class Scoring(RequestBody):
    """What /v1/score and /v1/rerank share (server/scoring.py): vLLM's optional model, each text's
    last k tokens kept (`truncate_prompt_tokens`, -1: the context's; `truncation_side` "right": the first k)."""
    model: Optional[str] = None
    truncate_prompt_tokens: Optional[StrictInt] = None
    truncation_side: Optional[Literal["left", "right"]] = None

    @staticmethod
    def _texts(value, param: str, many: bool = True):
        """A text, or (`many`) a non-empty list of them; none empty."""
        items = value if many and isinstance(value, list) else [value]
        if not items:
            raise InvalidParamError(f"{param} must not be empty", param)
        for i, item in enumerate(items):
            where = f"{param}.{i}" if isinstance(value, list) and len(items) > 1 else param
            if not isinstance(item, str):
                raise InvalidParamError(f"{param} must be a string{' or a list of strings' if many else ''}", where)
            if item == "":
                raise InvalidParamError("a text to score must not be empty", where)
        return value


class ScoreRequest(Scoring):
    """vLLM's /score: `text_1` against `text_2`, one with many or item by item."""
    text_1: Union[str, list[str]]
    text_2: Union[str, list[str]]

    @field_validator("text_1", "text_2", mode="before")
    @classmethod
    def _text_or_texts(cls, value, info: ValidationInfo):
        return cls._texts(value, info.field_name)

    def texts(self, field: str) -> list[str]:
        value = getattr(self, field)
        return [value] if isinstance(value, str) else list(value)


class RerankRequest(Scoring):
    """vLLM's (and Jina's, Cohere's) /rerank: `documents` ranked against `query`."""
    query: str
    documents: list[str]
    top_n: Optional[StrictInt] = None  # the best n (0 or none: all)
    return_documents: Optional[StrictBool] = None  # each result's text beside its index (default: yes)

    @field_validator("query", mode="before")
    @classmethod
    def _one_text(cls, value):
        return cls._texts(value, "query", many=False)

    @field_validator("documents", mode="before")
    @classmethod
    def _documents(cls, value):
        if not isinstance(value, list):
            raise InvalidParamError("documents must be a list of strings", "documents")
        return cls._texts(value, "documents")

    @field_validator("top_n")
    @classmethod
    def _top_n(cls, value):
        if value is not None and value < 0:
            raise InvalidParamError("top_n must be at least 0 (0: every document)", "top_n")
        return value


class TokenizeRequest(ChatTemplating, ChatTools, RequestBody):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1)  # as chat asks
    # add_special_tokens (ChatTemplating's): a prompt's BOS (and the like) unless false, as completions add
    # them; with messages, as chat takes it
    return_token_strs: Optional[StrictBool] = None  # vLLM's: the tokens' vocabulary spellings beside their ids
    # llama.cpp's spelling (server/llama_cpp_api.py): `content` the text, BOS only with `add_special`,
    # special tokens' text read as them (`parse_special` true only), `with_pieces` each token's text
    content: Optional[str] = None
    add_special: Optional[StrictBool] = None
    parse_special: Optional[StrictBool] = None
    with_pieces: Optional[StrictBool] = None
    # TGI's spelling (server/tgi_api.py): `inputs` the text, each token with its span of it; TGI's
    # generate `parameters` beside it (their `truncate` read)
    inputs: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class DetokenizeRequest(RequestBody):
    model: Optional[str] = None
    tokens: list[StrictInt]
