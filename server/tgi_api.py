"""Hugging Face text-generation-inference's native API, for the clients written against TGI
(huggingface_hub's `InferenceClient.text_generation` and what is built on it): POST /generate
(JSON), /generate_stream (SSE, one event per token, no [DONE]), POST / (either, by `stream`; its
JSON answer a one-item list, as TGI's compat route answers), GET /info, POST /chat_tokenize.

A request is tokenized here (BOS as the model adds it) and served as the /v1/completions request it
translates to (server/tgi_protocol.py), by that route's code (server/completions.py), always with each
token's logprob; its answer is written in TGI's shape: `generated_text` and, with `details`, each
token as {id, text, logprob, special}, the finish reason (length, eos_token, stop_sequence), the seed a
sampled request drew, the prompt's tokens scored (`decoder_input_details`), `top_n_tokens` likeliest
tokens, and `best_of` sequences. Errors keep this server's OpenAI envelope, with a 4xx status and
TGI's `error_type` beside it (server/errors.py)."""
from __future__ import annotations

import asyncio
import codecs
import json
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from engine.sampling_params import InvalidParamError
from server import __version__
from server.completions import HUB_PLACEHOLDERS, CompletionCall
from server.errors import error_body, named_as_sent, telling_error, validation_message
from server.generation import (EventStream, check_reasoning_effort, prompt_limit, ready_tokenizer, served_model,
                               templated_chat, truncated)
from server.protocol import CompletionRequest, TokenizeRequest
from server.tgi_protocol import (MAX_BEST_OF, MAX_STOP_SEQUENCES, SEEDS, TGI_NAMES, ChatTokenizeRequest,
                                GenerateRequest, Parameters, finish_reason)

router = APIRouter()


def tgi_param(param: str | None) -> str | None:
    """A /v1/completions field, named as the TGI request sent it."""
    if param is None or param.startswith("parameters.") or param.split(".")[0] in GenerateRequest.model_fields:
        return param
    if param == "prompt" or param.startswith("prompt."):
        return "inputs"
    return "parameters." + TGI_NAMES.get(param, param)


def stream_error_type(error: dict) -> str:
    """TGI's error_type of an in-band error: the server shutting down is `overloaded` (try again),
    a request's own settings `validation`, anything else `generation`."""
    if error.get("code") == "shutting_down":
        return "overloaded"
    return "validation" if error.get("type") == "invalid_request_error" else "generation"


class TokenTexts:
    """Each generated token's text as TGI streams it: the text it completes (a character split over
    tokens comes whole with its last token, "" before it), a special token's own text; so the texts
    of a stream's ordinary tokens add up to its generated text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.table = tokenizer, tokenizer.token_bytes()
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def special(self, token_id: int) -> bool:
        return token_id >= len(self.table) or self.table[token_id] is None

    def text(self, token_id: int) -> str:
        if self.special(token_id):
            return self.tokenizer.token_text(token_id)
        return self.decoder.decode(self.table[token_id])

    def token(self, entry: dict) -> dict:
        return {"id": entry["id"], "text": self.text(entry["id"]), "logprob": entry["logprob"],
                "special": self.special(entry["id"])}

    def alternatives(self, entry: dict) -> list[dict]:
        """A token's top_n_tokens likeliest, each decoded alone."""
        return [{"id": t, "text": text, "logprob": lp, "special": self.special(t)} for text, t, lp in entry["top"]]


class TGICall(CompletionCall):
    """A TGI request's life: a completions call whose logprobs are kept as the tokens' ids,
    logprobs and alternatives, from which TGI's tokens are written."""

    model_defaults = False  # TGI's own defaults (server/tgi_protocol.py), not the generation config's

    def __init__(self, request: Request, body: GenerateRequest, completion: CompletionRequest, full_text: bool,
                 seed: int | None):
        super().__init__(request, completion, chat=False)
        self.native = body
        self.prefix = body.inputs if full_text else ""  # return_full_text: the prompt before the answer
        self.seed = seed  # the sampler's seed of a sampled request (sequence i's: seed + i), else None

    def _completion_logprobs(self, entries, offset: int) -> tuple[list, int]:
        return [{"id": e.token_id, "logprob": e.logprob, "top": e.top} for e in entries], offset

    @property
    def top_n(self) -> bool:
        return bool(self.native.parameters.top_n_tokens)

    def sequence(self, index: int, choice: dict) -> dict:
        """Choice `index` of the completions answer as TGI's details of one sequence."""
        texts = TokenTexts(self.tokenizer)
        entries = choice["logprobs"] or []
        tokens = [texts.token(e) for e in entries]
        sequence = {"generated_text": self.prefix + choice["text"],
                    "finish_reason": finish_reason(choice["finish_reason"], choice["stop_reason"]),
                    "generated_tokens": len(tokens), "seed": None if self.seed is None else (self.seed + index) % SEEDS,
                    "prefill": self.prefill(choice.get("prompt_logprobs")), "tokens": tokens}
        if self.top_n:
            sequence["top_tokens"] = [texts.alternatives(e) for e in entries]
        return sequence

    def prefill(self, scores: list | None) -> list[dict]:
        """`decoder_input_details`: each prompt token with its logprob (null for the first)."""
        if scores is None:
            return []
        prompt = self.prompts[0]
        return [{"id": t, "text": self.tokenizer.token_text(t),
                 "logprob": None if s is None else s[str(t)]["logprob"]} for t, s in zip(prompt, scores)]

    def answer(self, completion: dict) -> tuple[dict, int]:
        """The whole answer, and the tokens of the sequence it gives: the best of the sequences by
        mean token logprob (TGI's rule for best_of), the others beside it in its details."""
        sequences = [self.sequence(i, c) for i, c in enumerate(completion["choices"])]

        def mean_logprob(s):
            return sum(t["logprob"] for t in s["tokens"]) / max(1, len(s["tokens"]))

        best = max(range(len(sequences)), key=lambda i: mean_logprob(sequences[i]))
        chosen = sequences.pop(best)
        answer = {"generated_text": chosen.pop("generated_text")}
        if self.native.parameters.details or self.native.parameters.decoder_input_details:
            details = chosen
            if sequences:
                details["best_of_sequences"] = sequences
            details["ffn_skip"] = completion["usage"].get("ffn_skip")
            answer["details"] = details
        return answer, chosen["generated_tokens"]

    async def tgi_events(self, stream):
        """The engine's outputs as TGI's events: one per token ({index, token, generated_text: null,
        details: null}) as it is made, the answer's last with the whole generated text and, with
        `details`, the finish. Written from the completions chunks `events` makes of each output
        (its logprobs, then at the end its finish and usage); that the output is the last is read
        off the output itself, so no token waits for the next step to go out."""
        last = False

        async def outputs():
            nonlocal last
            async for out in stream:
                last = out.finished
                yield out

        texts = TokenTexts(self.tokenizer)
        held = None  # the answer's last token's event, sent with its end
        count, text, finish, usage = 0, "", (None, None), {}
        async for chunk in self.events(outputs()):
            if chunk == "[DONE]":
                break
            data = json.loads(chunk)
            if "error" in data:  # in-band, after the tokens made before it, then the stream ends
                if held is not None:
                    yield json.dumps(held)
                yield json.dumps(dict(data, error_type=stream_error_type(data["error"])))
                return
            if not data["choices"]:
                usage = data["usage"]
                continue
            choice = data["choices"][0]
            text += choice["text"]
            entries = choice["logprobs"] or []
            for i, entry in enumerate(entries):
                count += 1
                event = {"index": count, "token": texts.token(entry), "generated_text": None, "details": None}
                if self.top_n:
                    event["top_tokens"] = texts.alternatives(entry)
                if last and i == len(entries) - 1:
                    held = event
                else:
                    yield json.dumps(event)
            if choice["finish_reason"] is not None:
                finish = (choice["finish_reason"], choice.get("stop_reason"))
        if held is None:  # an answer that ended with no token of its own to carry its end
            yield json.dumps(error_body(500, "the generation ended without a final token", code="incomplete_generation")
                             | {"error_type": "incomplete_generation"})
            return
        held["generated_text"] = self.prefix + text
        if self.native.parameters.details:
            held["details"] = {"finish_reason": finish_reason(*finish), "generated_tokens": count,
                               "seed": self.seed, "input_length": self.prompt_sizes[0],
                               "ffn_skip": usage.get("ffn_skip")}
        yield json.dumps(held)


async def _serve(request: Request, body: GenerateRequest, stream: bool, compat: bool = False):
    """`compat`: POST /'s answer (the prompt before the text by default, the JSON a one-item list)."""
    state = request.app.state.skipserve
    tokenizer = ready_tokenizer(state)
    with named_as_sent(tgi_param):  # errors name the field as the client sent it
        body.check(stream)
        p = body.parameters
        most = max_input_tokens(state)
        if p.truncate is not None and p.truncate > most:  # (as TGI's validation refuses it)
            raise InvalidParamError(f"truncate must be at most {most}, the server's max_input_tokens; got "
                                    f"{p.truncate}", "parameters.truncate")
        if body.model not in HUB_PLACEHOLDERS:  # (huggingface_hub's "tgi": TGI reads no name)
            served_model(state, body.model)
        if p.adapter_id not in (None, "") and p.adapter_id not in state.model_names:
            raise InvalidParamError(f"adapter_id '{p.adapter_id}' is not served here (this server serves "
                                    f"{sorted(state.model_names)}; adapters: --lora-modules)", "parameters.adapter_id")
        # TGI's adapter_id (or a model naming an adapter): the LoRA adapter the answer is computed through
        model = next((m for m in (p.adapter_id, body.model) if m and state.adapter_of(m)), state.served_names[0])
        prompt = await asyncio.to_thread(tokenizer.encode, body.inputs, body.add_special_tokens)
        seed = (secrets.randbelow(SEEDS) if p.seed is None else p.seed) if p.sampling else None
        completion = CompletionRequest.model_validate(
            body.completion_body(model, prompt, state.engine.config.max_model_len, seed, stream))
        completion._as_tgi = True  # TGI's logprobs (after its processors and warpers) and frequency penalty
        full_text = compat if p.return_full_text is None else p.return_full_text
        call = TGICall(request, body, completion, full_text, seed)
        events = await call.submit()
    if stream:
        return EventStream(call.tgi_events(events), events, call.timer)

    def render(completion: dict) -> JSONResponse:
        answer, made = call.answer(completion)
        headers = {"x-prompt-tokens": str(call.prompt_sizes[0]), "x-generated-tokens": str(made)}
        return JSONResponse([answer] if compat else answer, headers=headers)

    return await call.collect(events, render)


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    return await _serve(request, body, stream=False)


@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: Request):
    return await _serve(request, body, stream=True)


@router.post("/")
async def compat_generate(body: GenerateRequest, request: Request):
    """TGI's compat route (what huggingface_hub posts to a TGI base URL): /generate_stream with
    `stream`, else /generate's answer in a one-item list; the prompt before the answer unless
    `return_full_text` is false (TGI's default for a text-generation model)."""
    return await _serve(request, body, stream=body.stream, compat=True)


def max_input_tokens(state) -> int:
    """The longest prompt a generating request may have, as TGI's /info reports it."""
    return state.max_input_tokens or state.engine.config.max_model_len - 1


@router.get("/info")
async def info(request: Request):
    """TGI's served-model info, as far as it holds here."""
    state = request.app.state.skipserve
    config = state.engine.config
    return {"model_id": state.served_names[0], "model_sha": None, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": state.engine.capacity, "max_best_of": MAX_BEST_OF,
            "max_stop_sequences": MAX_STOP_SEQUENCES,
            "max_input_tokens": max_input_tokens(state),
            "max_total_tokens": config.max_model_len, "validation_workers": 1, "max_client_batch_size": 1,
            "router": "skipserve", "version": __version__, "sha": None, "docker_label": None}


async def tgi_tokenize(state, body: TokenizeRequest) -> list[dict]:
    """/tokenize as TGI takes it: `inputs` (BOS where the model adds one, unless add_special_tokens
    is false), each token as {id, text, start, stop}, its span of the input in bytes (an added BOS:
    an empty one), as TGI's Rust tokenizer counts them; `parameters.truncate`: the last tokens only."""
    if body.prompt is not None or body.messages is not None:
        raise InvalidParamError("give 'inputs' alone (TGI's /tokenize), or vLLM's 'prompt' or 'messages'", "inputs")
    served_model(state, body.model)
    try:
        truncate = Parameters.model_validate(body.parameters or {}).truncate
    except ValidationError as exc:
        message, param = validation_message(telling_error(exc.errors()))
        raise InvalidParamError(message, f"parameters.{param}" if param else "parameters") from None
    if truncate is not None and truncate <= 0:
        raise InvalidParamError("truncate must be strictly positive", "parameters.truncate")
    tokenizer = ready_tokenizer(state)

    def tokens() -> list[dict]:
        spans = tokenizer.encode_spans(body.inputs, body.add_special_tokens is not False)
        return tgi_tokens(body.inputs, spans[-truncate:] if truncate else spans)

    return await asyncio.to_thread(tokens)


@router.post("/chat_tokenize")
async def chat_tokenize(body: ChatTokenizeRequest, request: Request):
    """TGI's: a chat request's prompt as its template renders it (`templated_text`) and its tokens as
    /tokenize gives them (`tokenize_response`), the prompt the same request to /v1/chat/completions
    would be given."""
    state = request.app.state.skipserve
    if body.model not in HUB_PLACEHOLDERS:
        served_model(state, body.model)
    check_reasoning_effort(ready_tokenizer(state), body.reasoning_effort, "reasoning_effort")
    text, spans = await templated_chat(state, [m.as_dict() for m in body.messages], body.tool_use,
                                       body.chat_options)
    reserve = body.max_completion_tokens or body.max_tokens or 1  # (as the chat route cuts its prompt)
    (spans,) = truncated([spans], body.truncate_prompt_tokens, state.engine.config.max_model_len,
                         body.truncation_side, prompt_limit(state, reserve))  # the tokens kept, spans in the whole text
    return {"tokenize_response": await asyncio.to_thread(tgi_tokens, text, spans), "templated_text": text}


def tgi_tokens(text: str, spans: list[tuple[int, int, int]]) -> list[dict]:
    """Tokens (id, start, stop over `text`'s characters) as TGI gives them: {id, text, start, stop},
    their spans in bytes, as TGI's Rust tokenizer counts them (an added BOS: an empty span)."""
    raw = text.encode()
    at = [0]  # each character's byte offset, and the end's
    for char in text:
        at.append(at[-1] + len(char.encode()))
    return [{"id": token_id, "text": raw[at[start]:at[stop]].decode("utf-8", "replace"), "start": at[start],
             "stop": at[stop]} for token_id, start, stop in spans]
