"""llama.cpp's native server API, for the scripts and front ends written against llama-server:
POST /completion (JSON, or SSE chunks of {"content", "tokens", "stop"} with no
[DONE]) and POST /apply-template.

A /completion request is tokenized here (llama.cpp's prompt: a string, BOS as the model adds it, or
token ids) and served as the /v1/completions request it translates to (server/llama_cpp_protocol.py),
by that route's code (server/completions.py); its answer is written in llama.cpp's shape: `content`,
`tokens`, `stop_type` (eos, limit, word) and `stopping_word`, `tokens_evaluated` / `tokens_cached`,
`timings`, and with `n_probs` each token's `completion_probabilities`."""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.completions import CompletionCall
from server.errors import APIError, named_as_sent
from server.generation import (EventStream, check_token_ids, encode_chat, ready_tokenizer, scaled_adapters,
                               served_model)
from server.fill_in_middle import fim_ends, fim_prompt, fim_tokens, leading_specials
from server.llama_cpp_protocol import (CHAIN, RANDOM_SEED, InfillRequest, LlamaCompletionRequest, lora_scales,
                                       sampling_defaults)
from engine.sampling_params import InvalidParamError
from server import __version__
from server.protocol import CompletionRequest, LoraScale, TokenizeRequest

router = APIRouter()


# the /v1/completions fields a /completion field becomes, by the name the client sent
NATIVE_NAMES = {"max_tokens": "n_predict", "logprobs": "n_probs", "repetition_penalty": "repeat_penalty"}


def stop_type(finish_reason: str | None, stop_reason) -> tuple[str, str]:
    """llama.cpp's (stop_type, stopping_word) for a finish reason and vLLM-style stop reason."""
    if finish_reason == "length":
        return "limit", ""
    if isinstance(stop_reason, str):
        return "word", stop_reason
    return ("eos", "") if finish_reason else ("none", "")


class LlamaCall(CompletionCall):
    """A /completion request's life: a completions call whose logprobs are llama.cpp's
    `completion_probabilities` (each token's id, text, bytes and its `n_probs` likeliest)."""

    model_defaults = False  # llama-server's defaults, the model's in them (server/llama_cpp_protocol.py)

    def __init__(self, request: Request, body: LlamaCompletionRequest, completion: CompletionRequest, prompt: list[int]):
        super().__init__(request, completion, chat=False)
        self.native, self.prompt_ids = body, prompt
        self.prompt_text = ""  # the prompt's tokens as text, special tokens' too (llama.cpp's `prompt`)

    def _completion_logprobs(self, entries, offset: int) -> tuple[list, int]:
        def item(text, token_id, logprob):
            return {"id": token_id, "token": text, "bytes": list(self.tokenizer.piece_bytes(token_id)),
                    "logprob": logprob}

        return [dict(item(e.token, e.token_id, e.logprob), top_logprobs=[item(*t) for t in e.top])
                for e in entries], offset

    def settings(self) -> dict:
        b = self.native
        return {"n_predict": -1 if b.n_predict is None else b.n_predict, "n_ctx": self.state.engine.config.max_model_len,
                "temperature": self.body.temperature, "top_k": self.body.top_k, "top_p": self.body.top_p,
                "min_p": self.body.min_p, "typical_p": self.body.typical_p or 1.0, "seed": b.seed_taken,
                "stop": [b.stop] if isinstance(b.stop, str) else b.stop or [],
                "n_probs": b.n_probs or 0, "ignore_eos": b.ignore_eos, "stream": b.stream,
                "repeat_penalty": 1.0 if self.body.repetition_penalty is None else self.body.repetition_penalty,
                "presence_penalty": self.body.presence_penalty or 0.0,
                "frequency_penalty": self.body.frequency_penalty or 0.0,
                "samplers": b.applied(), "model": self.body.model}

    def final(self, content: str, tokens: list[int], finish, usage: dict, new_line: bool) -> dict:
        """The answer's whole object (non-streaming), or the stream's last chunk (`content` "");
        `new_line`: whether the answer's text held a newline (llama.cpp's `has_new_line`)."""
        now = time.monotonic()
        first = self.timer.first or now
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        computed, made = len(self.prompt_ids) - cached, usage["completion_tokens"]
        prompt_ms, predicted_ms = (first - self.timer.start) * 1000, (now - first) * 1000
        kind, word = stop_type(*finish)
        # llama.cpp's `truncated`: the answer reached the context's end (whatever else ended it there:
        # llama.cpp tests the context first, and an n_predict or an end of text at that token leaves it set)
        truncated = len(self.prompt_ids) + made >= self.state.engine.config.max_model_len
        return {"index": 0, "content": content, "tokens": tokens, "id_slot": 0, "stop": True, "model": self.body.model,
                "tokens_predicted": made, "tokens_evaluated": len(self.prompt_ids), "tokens_cached": cached,
                "generation_settings": self.settings(), "prompt": self.prompt_text, "has_new_line": new_line,
                "truncated": truncated, "stop_type": kind, "stopping_word": word,
                "timings": {"prompt_n": computed, "prompt_ms": prompt_ms,
                            "prompt_per_token_ms": prompt_ms / computed if computed else 0.0,
                            "prompt_per_second": computed * 1000 / prompt_ms if prompt_ms and computed else 0.0,
                            "predicted_n": made, "predicted_ms": predicted_ms,
                            "predicted_per_token_ms": predicted_ms / made if made else 0.0,
                            "predicted_per_second": made * 1000 / predicted_ms if predicted_ms and made else 0.0},
                "ffn_skip": usage.get("ffn_skip")}

    def native_answer(self, completion: dict) -> dict:
        choice = completion["choices"][0]
        content = "" if self.native.n_predict == 0 else choice["text"]  # (the prompt alone: nothing made)
        answer = self.final(content, choice["token_ids"] if self.native.return_tokens else [],
                            (choice["finish_reason"], choice["stop_reason"]), completion["usage"], "\n" in content)
        if self.native.n_probs and self.native.n_predict != 0:
            answer["completion_probabilities"] = choice["logprobs"]
        return answer

    async def native_events(self, stream):
        """The completions chunks as llama.cpp's: {"content", "tokens", "stop": false, ...} as text comes,
        then one {"stop": true, ...} with the whole answer's fields (when the usage has come)."""
        finish, new_line = (None, None), False
        async for chunk in self.events(stream):
            if chunk == "[DONE]":
                break
            data = json.loads(chunk)
            if "error" in data:  # in-band, then the stream ends
                yield chunk
                return
            if not data["choices"]:
                yield json.dumps(self.final("", [], finish, data["usage"], new_line))
                continue
            choice = data["choices"][0]
            if choice["finish_reason"] is not None:
                finish = (choice["finish_reason"], choice.get("stop_reason"))
            content = "" if self.native.n_predict == 0 else choice["text"]
            new_line = new_line or "\n" in content
            tokens = choice.get("token_ids") or []
            if content or tokens or choice["logprobs"]:
                piece = {"index": 0, "content": content, "tokens": tokens, "stop": False, "id_slot": 0}
                if self.native.n_probs:
                    piece["completion_probabilities"] = choice["logprobs"] or []
                yield json.dumps(piece)


@router.post("/completion")  # (not /completions: an OpenAI client missing /v1 gets the 404 that says so)
async def completion(body: LlamaCompletionRequest, request: Request):
    state = request.app.state.skipserve
    served_model(state, body.model)
    tokenizer = ready_tokenizer(state)
    if isinstance(body.prompt, str):
        prompt = await asyncio.to_thread(tokenizer.encode, body.prompt, True)  # BOS where the model adds one
    else:
        prompt = list(body.prompt)
        check_token_ids(prompt, tokenizer, "prompt")
    return await _serve(request, body, prompt)


@router.post("/infill")
async def infill(body: InfillRequest, request: Request):
    """llama.cpp's code infill: [BOS] [input_extra] FIM_PRE input_prefix FIM_SUF input_suffix FIM_MID
    prompt, answered as /completion answers (server/fill_in_middle.py finds the model's FIM tokens)."""
    state = request.app.state.skipserve
    served_model(state, body.model)
    tokenizer = ready_tokenizer(state)
    tokens = fim_tokens(tokenizer)
    if tokens is None:
        raise APIError(400, "this model has no fill-in-the-middle tokens (<|fim_prefix|>, <fim_prefix>, ...)",
                       "input_prefix")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, False)

    def build() -> list[int]:
        extra = []
        repo, sep = tokenizer.token_id("<|repo_name|>"), tokenizer.token_id("<|file_sep|>")
        if body.input_extra and repo is not None and sep is not None:  # the repo-level layout (Qwen2.5-Coder's)
            extra = [repo, *encode("myproject\n")]
            for chunk in body.input_extra:
                extra += [sep, *encode(chunk.filename + "\n"), *encode(chunk.text)]
            extra += [sep, *encode("filename\n")]
        else:  # the extra context before the prefix, as it is
            for chunk in body.input_extra or []:
                extra += encode(chunk.text)
        middle = encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        return [*leading_specials(tokenizer), *extra,
                *fim_prompt([], tokens, encode(body.input_prefix), encode(body.input_suffix)), *middle]

    prompt = await asyncio.to_thread(build)
    check_token_ids(prompt, tokenizer, "prompt")
    return await _serve(request, body, prompt, fim_ends(tokenizer))


async def _serve(request: Request, body: LlamaCompletionRequest, prompt: list[int], ends: list[int] = ()):
    """A /completion (or /infill) request's prompt ids served as /v1/completions, answered in llama.cpp's
    shape; `ends`: tokens that end the answer besides EOS (an infill's)."""
    state = request.app.state.skipserve
    tokenizer = ready_tokenizer(state)
    with named_as_sent(lambda param: NATIVE_NAMES.get(param, param)):  # errors name the field as sent
        completion_request = CompletionRequest.model_validate(
            body.completion_body(prompt, state.engine.config.max_model_len, list(ends), state.engine.sampling_defaults()) |
            {"model": state.named(body.model)})
        completion_request._temperature_last = body.temperature_last()  # (llama.cpp's chain)
        call = LlamaCall(request, body, completion_request, prompt)
        call.prompt_text = await asyncio.to_thread(tokenizer.decode, prompt, True, True)
        stream = await call.submit()
    if body.stream:
        return EventStream(call.native_events(stream), stream, call.timer)
    return await call.collect(stream, lambda answer: JSONResponse(call.native_answer(answer)))


LLAMA_CPP_TOKENIZE = ("add_special", "parse_special", "with_pieces")  # /tokenize's fields in llama.cpp's spelling


async def llama_tokenize(state, body: TokenizeRequest) -> dict:
    """/tokenize as llama.cpp takes it: `content` (BOS only with `add_special`), `with_pieces`: each
    token as {id, piece}, the piece its text, or its bytes where they are not whole UTF-8."""
    if body.content is None or body.prompt is not None or body.messages is not None:
        raise InvalidParamError("give 'content' alone (llama.cpp's /tokenize), or vLLM's 'prompt' or 'messages'",
                                "content")
    if body.parse_special is False:
        raise InvalidParamError("parse_special false is not supported: special tokens' text is read as them",
                                "parse_special")
    served_model(state, body.model)
    tokenizer = ready_tokenizer(state)
    ids = await asyncio.to_thread(tokenizer.encode, body.content, bool(body.add_special))

    def piece(token_id: int):
        raw = tokenizer.piece_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return list(raw)

    tokens = await asyncio.to_thread(lambda: [{"id": t, "piece": piece(t)} for t in ids]) if body.with_pieces else ids
    return {"tokens": tokens, "count": len(ids), "max_model_len": state.engine.config.max_model_len}


@router.get("/props")
async def props(request: Request):
    """llama.cpp's server properties, as far as they hold here: the context, the defaults /completion
    applies, the batch's rows as its slots, the model and its chat template."""
    state = request.app.state.skipserve
    tokenizer = ready_tokenizer(state)
    config = state.engine.config
    sampling = sampling_defaults(state.engine.sampling_defaults())
    defaults = {"n_predict": -1, "temperature": sampling["temperature"], "top_k": sampling["top_k"],
                "top_p": sampling["top_p"], "min_p": sampling["min_p"], "seed": RANDOM_SEED,
                "repeat_penalty": sampling["repetition_penalty"], "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "stop": [], "n_probs": 0, "ignore_eos": False, "stream": False, "samplers": CHAIN[True]}
    return {"default_generation_settings": {"n_ctx": config.max_model_len, "params": defaults},
            "total_slots": config.max_num_seqs, "model_alias": state.served_names[0],
            "model_path": config.model or state.served_names[0], "chat_template": tokenizer.chat_template or "",
            "modalities": {"vision": False, "audio": False}, "build_info": f"skipserve {__version__}",
            "is_sleeping": False}


@router.get("/lora-adapters")
async def lora_adapters(request: Request):
    """llama-server's list of its --lora / --lora-scaled adapters, each with its scale (applied to
    every request that names the model itself)."""
    files = request.app.state.skipserve.engine.default_adapter_files
    return [{"id": i, "path": path, "scale": scale} for i, (path, scale) in enumerate(files)]


@router.post("/lora-adapters")
async def set_lora_adapters(body: list[LoraScale], request: Request):
    """llama-server's change of its adapters' scales: a list of {"id", "scale"} (an adapter left out:
    0, off), for every request that names the model from now on (those running keep theirs)."""
    engine = request.app.state.skipserve.engine
    files = engine.default_adapter_files
    scales = lora_scales(body, len(files), "body")
    if files:
        await scaled_adapters(engine.scale_default_adapters(scales), "body")
    return {"success": True}


@router.post("/apply-template")
async def apply_template(body: TokenizeRequest, request: Request):
    """llama.cpp's: `messages` through the chat template, as the prompt text a chat request gets."""
    state = request.app.state.skipserve
    if body.messages is None or body.prompt is not None:
        raise InvalidParamError("give 'messages'", "messages")
    served_model(state, body.model)
    ids = await encode_chat(state, [m.as_dict() for m in body.messages], body.tool_use, body.chat_options)
    tokenizer = ready_tokenizer(state)
    bos = await asyncio.to_thread(tokenizer.encode, "", True)  # what /completion adds to a text prompt itself
    if bos and ids[:len(bos)] == bos:  # (so the text sent back to /completion gets one BOS, as llama.cpp strips it)
        ids = ids[len(bos):]
    return {"prompt": await asyncio.to_thread(tokenizer.decode, ids, False, True)}
