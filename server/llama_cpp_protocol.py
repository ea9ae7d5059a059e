"""llama.cpp's native completion request (its server's POST /completion), and the /v1/completions
request it is served as (server/llama_cpp_api.py). llama.cpp's defaults hold where a field is not
sent (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05; n_predict -1: until the context is full).
Its samplers this engine does not have (mirostat, DRY, XTC, dynamic temperature, ...) are
taken at the values that turn them off, and any other value is a 400 naming the field."""
from __future__ import annotations

import math
from typing import Any, Optional, Union

from pydantic import StrictBool, StrictFloat, StrictInt, model_validator

from engine.lora.names import MAX_LORA_SCALE
from engine.sampling_params import InvalidParamError
from server.protocol import FFNSkip, LoraScale, RequestBody, Strict

# llama.cpp's fields whose only value here is the one that does nothing (its default), with that value
OFF_ONLY = {"mirostat": 0, "dynatemp_range": 0.0, "xtc_probability": 0.0, "dry_multiplier": 0.0,
            "top_n_sigma": -1.0, "n_indent": 0, "t_max_predict_ms": 0, "min_keep": 0, "n_cmpl": 1,
            "post_sampling_probs": False, "return_progress": False}
# taken, no effect: the prefix cache is always on, and no context is shifted (n_keep, n_discard); slots,
# pings and timings' detail are llama.cpp's own
TAKEN = ("cache_prompt", "id_slot", "n_cache_reuse", "timings_per_token", "repeat_last_n",
         "dynatemp_exponent", "mirostat_tau", "mirostat_eta", "xtc_threshold", "dry_base", "dry_allowed_length",
         "dry_penalty_last_n", "dry_sequence_breakers", "sse_ping_interval", "n_keep", "n_discard")
RANDOM_SEED = 2**32 - 1  # llama.cpp's LLAMA_DEFAULT_SEED (-1 as it reads it): a new seed each request
# llama-server's sampling where a request and the model's file say nothing
LLAMA_SERVER_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.0}


def sampling_defaults(model_defaults: dict | None) -> dict:
    """What a /completion request leaves out samples with: llama-server's defaults, where the model
    recommends its own (a GGUF's general.sampling keys, which llama-server takes; or the server's
    generation config, engine/generation_defaults.py) those instead; never its token cap
    (n_predict stays llama.cpp's)."""
    return LLAMA_SERVER_SAMPLING | {k: v for k, v in (model_defaults or {}).items() if k in LLAMA_SERVER_SAMPLING}


# `samplers`' names (llama.cpp's, and the other spellings its command line takes) and letters, as the
# names this engine's samplers go by; names of samplers this engine has not (dry, xtc, ...: taken
# switched off, OFF_ONLY) and unknown names are left out of the chain, as llama.cpp leaves them
SAMPLER_NAMES = {"penalties": "penalties", "top_k": "top_k", "top-k": "top_k", "topk": "top_k", "top_p": "top_p",
                 "top-p": "top_p", "topp": "top_p", "nucleus": "top_p", "min_p": "min_p", "min-p": "min_p",
                 "minp": "min_p", "typ_p": "typ_p", "typ-p": "typ_p", "typp": "typ_p", "typical_p": "typ_p",
                 "typical-p": "typ_p", "typical": "typ_p", "typ": "typ_p", "temperature": "temperature",
                 "temp": "temperature"}
SAMPLER_LETTERS = {"e": "penalties", "k": "top_k", "p": "top_p", "m": "min_p", "y": "typ_p", "t": "temperature"}
# the samplers whose cut a temperature before them changes (top-k keeps the same tokens at any temperature)
SCALE_DEPENDENT = {"top_p", "min_p", "typ_p"}


# the order this engine applies a /completion request's samplers in, as llama.cpp's `generation_settings`
# name them (typical sampling cuts last of the filters here; llama.cpp's chain has it after top-k)
CHAIN = {True: ["penalties", "top_k", "top_p", "min_p", "typ_p", "temperature"],  # temperature_last
         False: ["penalties", "temperature", "top_k", "min_p", "top_p", "typ_p"]}  # vLLM's order


# the fields of each sampler a `samplers` chain leaves out, at the values that switch it off (the
# temperature's at 1: the draw from the model's own distribution, as llama.cpp's chain ends)
OFF_WHERE_LEFT_OUT = {"penalties": {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0},
                      "top_k": {"top_k": 0}, "top_p": {"top_p": 1.0}, "min_p": {"min_p": 0.0},
                      "typ_p": {"typical_p": 1.0},
                      "temperature": {"temperature": 1.0}}

# llama.cpp's other names for its fields
ALIASES = {"max_tokens": "n_predict", "max_completion_tokens": "n_predict", "logprobs": "n_probs", "n": "n_cmpl"}


class LlamaCompletionRequest(RequestBody):
    prompt: Union[str, list[StrictInt]]
    model: Optional[str] = None
    n_predict: Optional[StrictInt] = None
    temperature: Optional[StrictFloat] = None
    top_k: Optional[StrictInt] = None
    top_p: Optional[StrictFloat] = None
    min_p: Optional[StrictFloat] = None
    typical_p: Optional[StrictFloat] = None
    stop: Union[str, list[str], None] = None
    stream: StrictBool = False
    seed: Optional[StrictInt] = None
    ignore_eos: StrictBool = False
    n_probs: Optional[StrictInt] = None
    repeat_penalty: Optional[StrictFloat] = None
    presence_penalty: Optional[StrictFloat] = None
    frequency_penalty: Optional[StrictFloat] = None
    grammar: Optional[str] = None
    json_schema: Union[dict, StrictBool, None] = None
    logit_bias: Union[list[list[Any]], dict[str, Union[StrictFloat, StrictBool]], None] = None
    return_tokens: StrictBool = False
    samplers: Union[list[str], str, None] = None  # the chain: which samplers apply, and the temperature's place
    ffn_skip: Optional[FFNSkip] = None
    lora: Optional[list[LoraScale]] = None  # its --lora adapters' scales (`lora_scales`)

    @model_validator(mode="before")
    @classmethod
    def _llama_cpp_fields(cls, data):
        """llama.cpp's fields with no counterpart here: taken where they change nothing, else a 400."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for alias, name in ALIASES.items():
            if alias in data:
                value = data.pop(alias)
                if name not in data:
                    data[name] = value
        for name, off in OFF_ONLY.items():
            if name in data and data.pop(name) not in (None, off):
                raise InvalidParamError(f"'{name}' is not supported here: only {off!r} (off) is taken", name)
        for name in TAKEN:
            data.pop(name, None)
        if data.get("grammar") == "":  # llama.cpp's "no grammar"
            data.pop("grammar")
        if data.get("grammar") is not None:  # where both are sent, the grammar holds the answer, as in llama.cpp
            data.pop("json_schema", None)
        return data

    def bias(self) -> dict[str, float] | None:
        """llama.cpp's logit_bias ([[token id, bias or false], ...] or {id: bias}) as OpenAI's
        {"id": bias}; false bans the token (-100). Tokens given as strings are not taken."""
        if self.logit_bias is None:
            return None
        pairs = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        bias = {}
        for pair in pairs:
            pair = list(pair)
            if len(pair) != 2 or isinstance(pair[0], bool) or not isinstance(pair[0], (int, str)) or \
                    not isinstance(pair[1], (int, float, bool)) or pair[1] is True:
                raise InvalidParamError("logit_bias holds [token id, bias or false] pairs", "logit_bias")
            key = str(pair[0])  # (the object form's keys are ids; the array form's strings are texts)
            in_pairs = not isinstance(self.logit_bias, dict)
            if in_pairs and isinstance(pair[0], str) or not key.isascii() or not key.isdigit():
                raise InvalidParamError("logit_bias: tokens as strings are not supported here; give token ids",
                                        "logit_bias")
            bias[key] = -100.0 if pair[1] is False else float(pair[1])
        return bias

    def chain(self) -> list[str] | None:
        """The samplers `samplers` names (a list of names, or a string of llama.cpp's letters), in
        its order, by this engine's names; None where it is not sent (llama.cpp's default chain:
        all of them)."""
        if self.samplers is None:
            return None
        if isinstance(self.samplers, str):
            return [SAMPLER_LETTERS[c] for c in self.samplers if c in SAMPLER_LETTERS]
        return [SAMPLER_NAMES[n.lower()] for n in self.samplers if n.lower() in SAMPLER_NAMES]

    def temperature_last(self) -> bool:
        """Whether the temperature scales the distribution after top-p, min-p and typical sampling cut
        it: llama.cpp's default chain (top-k, typical, top-p, min-p, then the temperature), and a
        `samplers` order that puts it after them or leaves it out; one that puts it before any of
        them, first (vLLM's order, this engine's elsewhere)."""
        names = self.chain() or []
        at = names.index("temperature") if "temperature" in names else len(names)
        return not any(name in SCALE_DEPENDENT for name in names[at + 1:])

    def applied(self) -> list[str]:
        """The samplers applied, in the order this engine applies them, as llama.cpp names them
        (its `generation_settings.samplers`)."""
        given = self.chain()
        return [name for name in CHAIN[self.temperature_last()] if given is None or name in given]

    @property
    def seed_taken(self) -> int:
        """The seed as llama.cpp reads it, a 32-bit unsigned value (-2: 4294967294); RANDOM_SEED (-1,
        or none given): a new one each request."""
        return RANDOM_SEED if self.seed is None else self.seed % 2**32

    def completion_body(self, prompt_ids: list[int], max_model_len: int, ends: list[int] = (),
                        model_defaults: dict | None = None) -> dict:
        """The /v1/completions request's fields: the prompt as the ids given (tokenized here), the
        answer up to `n_predict` tokens (-1 or none: as many as the context leaves; 0: none, the
        prompt only computed, as llama.cpp warms its cache); sampling left out as llama-server
        samples (`sampling_defaults`)."""
        room = max(1, max_model_len - len(prompt_ids))
        wanted = room if self.n_predict is None or self.n_predict < 0 else min(self.n_predict, room)
        defaults = sampling_defaults(model_defaults)
        body: dict[str, Any] = {
            "model": self.model, "prompt": prompt_ids, "stream": self.stream, "return_token_ids": True,
            "temperature": defaults["temperature"] if self.temperature is None else max(self.temperature, 0.0),
            "top_k": defaults["top_k"] if self.top_k is None else max(self.top_k, 0),
            "top_p": defaults["top_p"] if self.top_p is None else self.top_p,
            "min_p": defaults["min_p"] if self.min_p is None else self.min_p,
            "repetition_penalty": defaults["repetition_penalty"], "ignore_eos": self.ignore_eos}
        if wanted == 0:
            body |= {"max_tokens": 0, "echo": True}  # the prompt alone (its text left out of the answer)
        else:
            body["max_tokens"] = wanted
        if self.typical_p is not None:  # (llama.cpp's typical sampler is off from 1 up)
            body["typical_p"] = min(self.typical_p, 1.0)
        for ours, theirs in (("stop", "stop"), ("grammar", "grammar"), ("json_schema", "json_schema"),
                             ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"),
                             ("repetition_penalty", "repeat_penalty")):
            if getattr(self, theirs) is not None:
                body[ours] = getattr(self, theirs)
        given = self.chain()
        for name, off in OFF_WHERE_LEFT_OUT.items():  # a sampler `samplers` leaves out does not apply
            if given is not None and name not in given:
                body.update(off)
        if self.seed_taken != RANDOM_SEED:
            body["seed"] = self.seed_taken
        if self.n_probs and wanted > 0:
            body["logprobs"] = self.n_probs
        if self.bias():
            body["logit_bias"] = self.bias()
        if self.ffn_skip is not None:
            body["ffn_skip"] = self.ffn_skip.model_dump(exclude_none=True)
        if self.lora is not None:
            body["lora"] = [item.model_dump() for item in self.lora]
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if ends:
            body["stop_token_ids"] = list(ends)
        return body


def lora_scales(items: list[LoraScale], files: int, param: str) -> list[float]:
    """llama-server's list of {"id", "scale"} as the scale of each of its `files` --lora adapters (as
    llama-server takes it: one left out at 0, one given twice at its last scale); InvalidParamError
    naming `param` for an id it has not, or a scale that is not a number within MAX_LORA_SCALE."""
    scales = [0.0] * files
    for i, item in enumerate(items):
        if not 0 <= item.id < files:
            served = f"ids 0 to {files - 1}: GET /lora-adapters" if files else "none: the server has no --lora adapter"
            raise InvalidParamError(f"{param}[{i}].id: no LoRA adapter {item.id} ({served})", param)
        if not math.isfinite(item.scale) or abs(item.scale) > MAX_LORA_SCALE:
            raise InvalidParamError(f"{param}[{i}].scale must be a number from -{MAX_LORA_SCALE:g} to "
                                    f"{MAX_LORA_SCALE:g}, got {item.scale}", param)
        scales[item.id] = item.scale
    return scales


class ExtraChunk(Strict):
    filename: str = ""
    text: str


class InfillRequest(LlamaCompletionRequest):
    """llama.cpp's /infill: the code before and after the gap, files for context, and `prompt` the
    start of the middle."""
    prompt: Union[str, list[StrictInt]] = ""
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: Optional[list[ExtraChunk]] = None
