"""Hugging Face text-generation-inference's native request ({"inputs", "parameters", "stream"}, its
server's POST /generate, /generate_stream and /), and the /v1/completions request it is served as
(server/tgi_api.py). TGI's rules hold where they differ from OpenAI's: greedy unless `do_sample` or a
sampling setting asks otherwise, `max_new_tokens` as many as the context leaves, a stop sequence
kept in the text, `truncate` keeping the prompt's last tokens."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, StrictBool, StrictFloat, StrictInt

from engine.sampling_params import InvalidParamError
from server.protocol import ChatCompletionRequest, FFNSkip, RequestBody, Strict

MAX_BEST_OF = 2  # TGI's default --max-best-of
MAX_STOP_SEQUENCES = 4  # TGI's default --max-stop-sequences
SEEDS = 2**64  # TGI's seeds are unsigned 64-bit numbers (the engine's streams too: engine/seeded_uniform.py)
U64 = Annotated[StrictInt, Field(ge=0, lt=SEEDS)]
# the /v1/completions fields a TGI parameter becomes, by its own name (for errors)
TGI_NAMES = {"max_tokens": "max_new_tokens", "logprobs": "top_n_tokens", "truncate_prompt_tokens": "truncate",
             "prompt_logprobs": "decoder_input_details", "n": "best_of", "response_format": "grammar"}


class Grammar(Strict):
    """TGI's grammar: {"type": "json" (or "json_object"), "value": a JSON schema (or its text)},
    {"type": "regex", "value": a regular expression}, {"type": "json_schema", "value": {"name",
    "schema", "strict"}}: the forms chat's and completions' `response_format` take (server/protocol.py
    ResponseFormat reads them), here always with a value."""
    type: Literal["json", "json_object", "regex", "json_schema"]
    value: Any

    def response_format(self) -> dict:
        if self.value is None:  # (OpenAI's json_object has none: any object; TGI's grammar names one)
            raise InvalidParamError("grammar: a grammar's value is its schema or expression", "grammar")
        return {"type": self.type, "value": self.value}


class Parameters(Strict):
    best_of: Optional[StrictInt] = None
    decoder_input_details: StrictBool = False
    details: StrictBool = False
    do_sample: StrictBool = False
    frequency_penalty: Optional[StrictFloat] = None
    grammar: Optional[Grammar] = None
    max_new_tokens: Optional[StrictInt] = None
    repetition_penalty: Optional[StrictFloat] = None
    return_full_text: Optional[StrictBool] = None
    seed: Optional[U64] = None
    stop: list[str] = []
    temperature: Optional[StrictFloat] = None
    top_k: Optional[StrictInt] = None
    top_n_tokens: Optional[StrictInt] = None
    top_p: Optional[StrictFloat] = None
    truncate: Optional[StrictInt] = None
    typical_p: Optional[StrictFloat] = None
    watermark: StrictBool = False
    adapter_id: Optional[str] = None
    ffn_skip: Optional[FFNSkip] = None  # this server's: the request's FFN skip budget

    @property
    def sampling(self) -> bool:
        """TGI samples where `do_sample` asks, or where a setting changes the distribution (a
        temperature other than 1, top_k, top_p or typical_p below 1); else it is greedy."""
        return self.do_sample or (self.temperature is not None and self.temperature != 1.0) or \
            bool(self.top_k) or (self.top_p is not None and self.top_p < 1.0) or \
            (self.typical_p is not None and self.typical_p < 1.0)

    @property
    def best_of_n(self) -> int:
        return self.best_of or 1


class GenerateRequest(RequestBody):
    inputs: str
    # a request without parameters samples, as TGI fills them in (do_sample true); sent ones default to greedy
    parameters: Parameters = Field(default_factory=lambda: Parameters(do_sample=True))
    stream: StrictBool = False  # the compat route's (POST /): /generate and /generate_stream are one each
    add_special_tokens: StrictBool = True  # the tokenizer's BOS (where the model adds one) before the inputs
    model: Optional[str] = None  # (TGI serves one model and reads none: a name given must be this server's)
    options: Optional[dict[str, Any]] = None  # the HF Inference API's (wait_for_model, use_cache): taken, no effect

    def check(self, stream: bool) -> None:
        """TGI's rules for its parameters (its 422s, here 400s naming the parameter); `stream`: whether
        the answer is streamed (the route's, or the compat route's `stream`)."""
        p = self.parameters

        def refuse(message: str, param: str):
            raise InvalidParamError(message, f"parameters.{param}")

        if not self.inputs:
            raise InvalidParamError("inputs must not be empty", "inputs")
        if p.temperature is not None and p.temperature <= 0:
            refuse("temperature must be strictly positive (leave do_sample false for greedy)", "temperature")
        if p.repetition_penalty is not None and p.repetition_penalty <= 0:
            refuse("repetition_penalty must be strictly positive", "repetition_penalty")
        if p.top_p is not None and not 0 < p.top_p <= 1:
            refuse("top_p must be in (0, 1]", "top_p")
        if p.top_k is not None and p.top_k <= 0:
            refuse("top_k must be strictly positive", "top_k")
        if p.typical_p is not None and not 0 < p.typical_p <= 1:
            refuse("typical_p must be in (0, 1]", "typical_p")
        if p.watermark:
            refuse("watermark is not supported here", "watermark")
        if p.max_new_tokens is not None and p.max_new_tokens <= 0:
            refuse("max_new_tokens must be strictly positive", "max_new_tokens")
        if len(p.stop) > MAX_STOP_SEQUENCES:
            refuse(f"at most {MAX_STOP_SEQUENCES} stop sequences", "stop")
        if p.truncate is not None and p.truncate <= 0:
            refuse("truncate must be strictly positive", "truncate")
        if p.top_n_tokens is not None and p.top_n_tokens < 0:
            refuse("top_n_tokens must be at least 0", "top_n_tokens")
        if p.best_of is not None and p.best_of <= 0:
            refuse("best_of must be strictly positive", "best_of")
        if p.best_of_n > 1:
            if p.best_of_n > MAX_BEST_OF:
                refuse(f"best_of must be at most {MAX_BEST_OF}", "best_of")
            if not p.sampling:
                refuse("best_of > 1 needs sampling: set do_sample, or a temperature, top_k or top_p", "best_of")
            if p.seed is not None:
                refuse("best_of > 1 cannot take a seed: each sequence draws its own", "seed")
            if stream:
                refuse("best_of > 1 is not streamed", "best_of")
        if p.decoder_input_details and stream:
            refuse("decoder_input_details is not streamed", "decoder_input_details")

    def completion_body(self, model: str, prompt_ids: list[int], max_model_len: int, seed: int | None,
                        stream: bool) -> dict:
        """The /v1/completions request's fields: the prompt as its ids (with `truncate` applied),
        `seed` the request's, or the one drawn for a sampled request that gave none (reported back,
        as TGI does)."""
        p = self.parameters
        kept = len(prompt_ids) if p.truncate is None else min(p.truncate, len(prompt_ids))
        room = max(1, max_model_len - kept)
        body: dict[str, Any] = {
            "model": model, "prompt": prompt_ids, "stream": stream, "n": p.best_of_n,
            "max_tokens": room if p.max_new_tokens is None else p.max_new_tokens,
            "temperature": (1.0 if p.temperature is None else p.temperature) if p.sampling else 0.0,
            "logprobs": p.top_n_tokens or 0,  # each token's logprob (and its top_n_tokens likeliest)
            "include_stop_str_in_output": True}  # TGI's text ends with the stop sequence that ended it
        for ours, theirs in (("top_p", "top_p"), ("top_k", "top_k"), ("typical_p", "typical_p"),
                             ("repetition_penalty", "repetition_penalty"),
                             ("frequency_penalty", "frequency_penalty"), ("truncate_prompt_tokens", "truncate")):
            if getattr(p, theirs) is not None:
                body[ours] = getattr(p, theirs)
        if p.stop:
            body["stop"] = p.stop
        if seed is not None:  # (as the engine's signed 64-bit seed of the same stream)
            body["seed"] = seed - SEEDS if seed >= SEEDS // 2 else seed
        if p.decoder_input_details:
            body["prompt_logprobs"] = 0
        if p.grammar is not None:
            body["response_format"] = p.grammar.response_format()
        if p.ffn_skip is not None:
            body["ffn_skip"] = p.ffn_skip.model_dump(exclude_none=True)
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body


def finish_reason(finish: str | None, stop_reason: Union[int, str, None]) -> str:
    """TGI's finish reason for a completions choice's: length, stop_sequence (a stop string), or
    eos_token (the model's end, a stop token, a grammar's end)."""
    if finish == "length":
        return "length"
    return "stop_sequence" if isinstance(stop_reason, str) else "eos_token"


class ChatTokenizeRequest(ChatCompletionRequest):
    """TGI's /chat_tokenize body: a chat request, whose model may be left out (TGI reads none)."""
    model: Optional[str] = None

