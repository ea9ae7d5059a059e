"""POST /v1/chat/completions and /v1/completions: JSON or SSE over the engine's output deltas."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from engine.async_engine import EngineShutdownError, GenerationError
from server.errors import APIError, error_body
from server.fill_in_middle import fim_ends, fim_prompt, fim_tokens, leading_specials
from server.generation import (EventStream, Usage, check_reasoning_effort, consume, encode_chat, overall_finish,
                               pin_lora_scales, prompt_limit, ready_tokenizer, served_model, stopped, submit,
                               tokenize_batch, truncated)
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.reasoning import ReasoningSplit, request_reasoning, split_output
from server.request_id import client_request_id

router = APIRouter()

# the model names huggingface_hub's InferenceClient sends to a server it knows only by its URL (as TGI,
# which serves one model and reads no name): on chat and completions they name the model served here
HUB_PLACEHOLDERS = frozenset({"dummy", "tgi"})


@dataclass
class Choice:
    text: str = ""
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or stop token id that ended it
    streamed: int = 0  # characters of text sent as content so far (streaming)
    offset: int = 0  # text_offset of the next token with logprobs (streaming)
    split: ReasoningSplit | None = None  # --reasoning-parser: `text` is then the content
    reasoning: str = ""  # --reasoning-parser: the thinking, non-streaming
    prompt_logprobs: list | None = None  # vLLM's `prompt_logprobs`: the prompt's entries, non-streaming
    # vLLM's `return_token_ids`: the answer's tokens (streaming: those no chunk has carried yet)
    token_ids: list = field(default_factory=list)
    begun: bool = False  # streaming: a chunk of this choice went out (the first carries the prompt's ids)


def token_label(text: str, token_id: int, as_ids: bool) -> str:
    """A logprob entry's token as shown: its text, or with vLLM's `return_tokens_as_token_ids`
    "token_id:<id>" (tokens whose texts cannot be told apart, as byte pieces, stay apart)."""
    return f"token_id:{token_id}" if as_ids else text


def chat_logprobs(entries, tokenizer, as_ids: bool = False) -> dict:
    """Chat's logprobs; each token's `bytes` are its own (`tokenizer.piece_bytes`), so a character
    split over tokens can be put back together from them (its text alone shows U+FFFD); `as_ids`:
    tokens as their ids (their bytes then the label's, as vLLM gives them)."""
    def item(text, token_id, lp):
        label = token_label(text, token_id, as_ids)
        shown = label.encode() if as_ids else tokenizer.piece_bytes(token_id)
        return {"token": label, "logprob": lp, "bytes": list(shown)}

    return {"content": [dict(item(e.token, e.token_id, e.logprob), top_logprobs=[item(*t) for t in e.top])
                        for e in entries]}


def completion_logprobs(entries, offset: int, tokenizer, as_ids: bool = False) -> tuple[dict, int]:
    """Completions' logprobs, each token's `text_offset` counted from `offset` (where the text they
    follow ends) over the tokens' texts; a special token (an echoed prompt's BOS) adds nothing to
    the text, so nothing to the offset; `as_ids`: tokens as their ids (offsets still over the
    text). -> (logprobs, the offset after them)."""
    text_offset = []
    special = tokenizer.token_bytes()
    for e in entries:
        text_offset.append(offset)
        if e.token_id < len(special) and special[e.token_id] is not None:
            offset += len(e.token)
    return {"tokens": [token_label(e.token, e.token_id, as_ids) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            # a prompt's first token (echo) has no logprob, and no alternatives either
            "top_logprobs": [None if e.logprob is None else top_with_chosen(e, as_ids) for e in entries],
            "text_offset": text_offset}, offset


def vllm_prompt_logprobs(entries, alternatives: int) -> list:
    """vLLM's `prompt_logprobs`: for each prompt token, null for the first (nothing predicts it), else
    {token id: {logprob, rank, decoded_token}} for the token (its rank: how many tokens are at least
    as likely) and its `alternatives` likeliest tokens (ranked 1, 2, ...)."""
    def item(logprob, rank, text):
        return {"logprob": logprob, "rank": rank, "decoded_token": text}

    scores = []
    for e in entries:
        if e.logprob is None:
            scores.append(None)
            continue
        scored = {str(e.token_id): item(e.logprob, e.rank, e.token)}
        for rank, (text, token_id, logprob) in enumerate(e.top[:alternatives], 1):
            scored.setdefault(str(token_id), item(logprob, rank, text))
        scores.append(scored)
    return scores


def top_with_chosen(entry, as_ids: bool = False) -> dict[str, float]:
    """The likeliest tokens and the chosen one besides where it is not among them: up to
    `logprobs` + 1 entries, as OpenAI's completions give them (tokens of one text, as byte pieces
    of a character, keep the likeliest's logprob; the chosen token's own is its)."""
    top = {}
    for text, token_id, lp in entry.top:
        top.setdefault(token_label(text, token_id, as_ids), lp)
    top[token_label(entry.token, entry.token_id, as_ids)] = entry.logprob
    return top


class CompletionCall:
    """One request's life: validate, submit, then stream or collect the choices."""

    model_defaults = True  # settings left out take the model's generation config (OpenAI's routes, as vLLM)

    def __init__(self, request: Request, body, chat: bool):
        self.request, self.body, self.chat = request, body, chat
        self.state = request.app.state.skipserve
        kind = "chatcmpl-" if chat else "cmpl-"
        self.engine_id = kind + uuid.uuid4().hex  # the engine's: unique whatever the client names
        given = client_request_id(request.headers) or body.request_id  # as vLLM names an answer: the header first
        self.id = kind + given if given else self.engine_id
        self.arrival = time.monotonic()  # (its latency metrics count from here)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.tools = None  # a chat request's ToolUse (server/tool_calls.py)
        self.infill_ends: list[int] = []  # tokens that end a fill-in-the-middle answer (server/fill_in_middle.py)
        self.reasoning = None  # how --reasoning-parser splits this request's answers, if it does
        self.streaming: dict[int, Choice] = {}  # a streamed request's choices

    @property
    def tool_mode(self) -> str:
        return self.tools.mode if self.tools else "none"

    async def submit(self):
        state, body = self.state, self.body
        if body.model in HUB_PLACEHOLDERS and body.model not in state.model_names:
            body.model = None  # answered under the model's name
        body.model = served_model(state, body.model)
        if body.lora is None:
            # (before any wait: an adapter unloaded meanwhile is then refused by the engine, not dropped)
            return await self._submit(state.adapter_of(body.model))
        adapter = await pin_lora_scales(state, body)  # (llama-server's scales of this request: kept till it is added)
        try:
            return await self._submit(adapter)
        finally:
            state.engine.unpin_scaled_adapter(adapter)

    async def _submit(self, adapter: str | None):
        state, body = self.state, self.body
        self.tokenizer = ready_tokenizer(state)  # for logprobs' bytes
        if self.chat:
            self.tools = body.tool_use
            check_reasoning_effort(self.tokenizer, body.reasoning_effort, "reasoning_effort")
            prompts = [await encode_chat(state, [m.as_dict() for m in body.messages], self.tools, body.chat_options)]
            param = "messages"
        else:
            prompts = await self._completion_prompts()
            param = "prompt"
        self.num_choices = len(prompts) * body.n
        sampling = body.to_sampling_with(state.engine.sampling_defaults() if self.model_defaults else {})
        sampling.adapter = adapter
        prompts = await self._truncated(prompts, sampling.max_tokens or 1)
        self.prompts = prompts  # prompt i's choices are i * n .. i * n + n - 1
        self.prompt_sizes = [len(p) for p in prompts]
        sampling.stop_token_ids = list(dict.fromkeys(sampling.stop_token_ids + self.infill_ends))
        if self.chat:
            sampling.turn_stops = self.tokenizer.chat_stops
            sampling = self.tools.show_tags(sampling)
            self.reasoning, sampling = await request_reasoning(state.reasoning_parser, sampling, self.tokenizer, prompts[0])
        stream, self.timer = await submit(state, self.engine_id, prompts, sampling, body.skip(), param, self.arrival)
        return stream

    async def _completion_prompts(self) -> list[list[int]]:
        """The batch's prompts as token ids (and as text, for `echo`)."""
        state, given = self.state, self.body.prompts()
        if self.body.suffix is not None:
            return await self._infill_prompts(given)
        prompts = await tokenize_batch(state, given, "prompt", choices=self.body.n)
        if self.body.echo:
            tokenizer = ready_tokenizer(state)
            self.echoed = [p if isinstance(p, str) else await asyncio.to_thread(tokenizer.decode, p, False)
                           for p in given]  # raw, as the generated text goes on from it
        return prompts

    async def _truncated(self, prompts: list[list[int]], reserve: int) -> list[list[int]]:
        """`truncate_prompt_tokens` applied; an echoed prompt that was cut is echoed as it was given to
        the model (its logprobs are the kept tokens')."""
        cut = truncated(prompts, self.body.truncate_prompt_tokens, self.state.engine.config.max_model_len,
                        self.body.truncation_side, prompt_limit(self.state, reserve))
        if not self.chat and self.body.echo:
            tokenizer = ready_tokenizer(self.state)
            for i, (before, after) in enumerate(zip(prompts, cut)):
                if len(after) < len(before):
                    self.echoed[i] = await asyncio.to_thread(tokenizer.decode, after, False)
        return cut

    async def _infill_prompts(self, given: list) -> list[list[int]]:
        """Each prompt as the prefix of a fill-in-the-middle prompt with the request's suffix."""
        tokenizer = ready_tokenizer(self.state)
        tokens = fim_tokens(tokenizer)
        if tokens is None:
            raise APIError(400, "suffix: this model has no fill-in-the-middle tokens (<|fim_prefix|>, "
                                "<fim_prefix>, ...)", "suffix")
        prefixes = await tokenize_batch(self.state, given, "prompt", choices=self.body.n, special=False)
        suffix = await asyncio.to_thread(tokenizer.encode, self.body.suffix, False)
        self.infill_ends = fim_ends(tokenizer)
        lead = leading_specials(tokenizer)
        return [fim_prompt(lead, tokens, prefix, suffix) for prefix in prefixes]

    def echo(self, index: int) -> str:
        """The prompt text choice `index` starts with (`echo`), else ""."""
        return self.echoed[index // self.body.n] if not self.chat and self.body.echo else ""

    @property
    def wants_logprobs(self) -> bool:
        return self.body.logprobs if self.chat else self.body.logprobs is not None

    def _chat_logprobs(self, entries) -> dict:
        return chat_logprobs(entries, self.tokenizer, bool(self.body.return_tokens_as_token_ids))

    def _completion_logprobs(self, entries, offset: int) -> tuple[dict, int]:
        return completion_logprobs(entries, offset, self.tokenizer, bool(self.body.return_tokens_as_token_ids))

    def header(self) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.body.model,
                "system_fingerprint": self.state.fingerprint}

    def choices(self) -> dict[int, Choice]:
        return {i: Choice(self.echo(i), split=self.reasoning.split() if self.reasoning else None)
                for i in range(self.num_choices)}

    def usage(self) -> Usage:
        """Counting thinking tokens apart where the request's answers are split."""
        return Usage(reasoning={} if self.reasoning else None)

    # ---- non-streaming -----------------------------------------------------------------------
    async def collect(self, stream, render=JSONResponse) -> Response:
        """The whole answer, as `render(the answer's body)` makes it (on a worker thread): by default
        chat's or completions' JSON; a 499 where the client left first."""
        choices = self.choices()
        usage = self.usage()

        def on_output(out):
            c = choices[out.index]
            reasoning, content = split_output(c.split, out, usage)
            c.reasoning += reasoning
            c.text += content
            if out.prompt_logprobs is not None and self.body.prompt_logprobs is not None:
                c.prompt_logprobs = out.prompt_logprobs
            c.logprobs += self._echoed_logprobs(out) + (out.logprobs or [])
            c.token_ids += out.token_ids
            self.timer.on_tokens(out.index)
            usage.update(out)
            if out.finished:
                c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason

        left = await consume(self.request, stream, on_output, self.timer)
        if left is not None:
            return left
        usage.finish_metrics(self.timer, overall_finish(c.finish_reason for c in choices.values()))

        def answer() -> Response:  # on a worker thread: n choices of thousands of tokens with logprobs
            body = dict(self.header(), choices=[self._choice_body(i, c) for i, c in choices.items()],
                        usage=usage.body())  # take the event loop for seconds to build and encode
            if self.chat and self.body.prompt_logprobs is not None:  # one prompt: vLLM puts its scores beside the choices
                body["prompt_logprobs"] = vllm_prompt_logprobs(choices[0].prompt_logprobs, self.body.prompt_logprobs)
            if self.chat and self.body.return_token_ids:  # and its tokens, as rendered by the template
                body["prompt_token_ids"] = self.prompts[0]
            return render(body)

        return await asyncio.to_thread(answer)

    def _echoed_logprobs(self, out) -> list:
        """The echoed prompt's logprob entries (`echo` with `logprobs` on completions), each with the
        request's `logprobs` alternatives (`prompt_logprobs` may have asked the engine for more)."""
        if self.chat or not self.body.echo or not out.prompt_logprobs:
            return []
        return [dataclasses.replace(e, top=e.top[:self.body.logprobs]) for e in out.prompt_logprobs]

    def _tool_calls(self, c: Choice) -> tuple[str | None, list[dict] | None, str | None]:
        """A finished answer's content, its tool calls where the request allows calls and it makes some
        (a forced call cut off: the calls as far as they were written), and its finish reason:
        `tool_calls` for an answer that made its calls whole; one cut off keeps its own, as OpenAI's
        (`length`; `stop` where a stop string cut a forced call)."""
        if self.tool_mode == "none":
            return c.text, None, c.finish_reason
        content, calls, whole = self.tools.finished(c.text, c.finish_reason)
        return content, calls, "tool_calls" if whole and c.finish_reason == "stop" else c.finish_reason

    def _choice_body(self, index: int, c: Choice) -> dict:
        want = self.wants_logprobs
        if self.chat:
            content, calls, finish_reason = self._tool_calls(c)
            if self.body.continued_text:  # vLLM's echo: the continued message's text first
                content = self.body.continued_text + (content or "")
            message = {"role": "assistant", "content": content, "refusal": None, "annotations": []}  # (as OpenAI's)
            if calls:
                message["tool_calls"] = calls
            if c.split is not None:
                message["reasoning_content"] = c.reasoning if c.split.thought and self.body.include_reasoning else None
            body = {"index": index, "message": message,
                    "logprobs": self._chat_logprobs(c.logprobs) if want else None,
                    "finish_reason": finish_reason, "stop_reason": c.stop_reason}
            return body | self._token_ids(index, c)
        body = {"index": index, "text": c.text,
                "logprobs": self._completion_logprobs(c.logprobs, 0)[0] if want else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        if self.body.prompt_logprobs is not None:  # each choice's prompt, as vLLM answers completions
            body["prompt_logprobs"] = vllm_prompt_logprobs(c.prompt_logprobs, self.body.prompt_logprobs)
        return body | self._token_ids(index, c)

    def _token_ids(self, index: int, c: Choice) -> dict:
        """vLLM's `return_token_ids` fields of choice `index`: the tokens it made that no answer has
        carried yet (all of them unstreamed; then none are held), and on completions its prompt's
        (the first chunk's, streaming). Every token made is there, the answer's end too (EOS, a stop
        token, the tokens of a stop string cut from the text), as `usage` counts them."""
        if not self.body.return_token_ids:
            return {}
        fields = {}
        if not self.chat and not c.begun:
            fields["prompt_token_ids"] = self.prompts[index // self.body.n]
        fields["token_ids"], c.token_ids = c.token_ids, []
        return fields

    # ---- streaming ---------------------------------------------------------------------------
    async def events(self, stream):
        choices = self.streaming = self.choices()
        usage = self.usage()
        include_usage = self.body.include_usage
        if self.body.continuous_usage:  # vLLM's continuous_usage_stats: each chunk with its choice's usage so far
            def extra(index):
                return {"usage": self._usage_so_far(usage, index)}
        else:  # the usage chunk alone carries it (null elsewhere, as OpenAI's)
            def extra(index):
                return {"usage": None} if include_usage else {}
        try:
            if self.chat:  # an answer that must be a call has no content (as OpenAI streams calls); one that
                # may be (auto) has "", as OpenAI's text and vLLM's every answer: a client adding up the
                # deltas' content meets no null before the text
                content = None if self.tool_mode == "forced" else ""
                for i in choices:
                    yield self._chunk(i, {"role": "assistant", "content": content, "refusal": None}, None, None, extra)
                    if self.body.continued_text:  # vLLM's echo: the continued message's text, then the answer's
                        yield self._chunk(i, {"content": self.body.continued_text}, None, None, extra)
            elif self.body.echo and not self.wants_logprobs:  # with logprobs: once the prompt's have come
                for i, c in choices.items():
                    yield self._chunk(i, c.text, None, None, extra)
            async for out in stream:
                c = choices[out.index]
                self.timer.on_tokens(out.index)
                usage.update(out)
                if out.prompt_logprobs and self.wants_logprobs and not self.chat:  # echo's (prompt_logprobs: not streamed)
                    prompt_logprobs, c.offset = self._completion_logprobs(self._echoed_logprobs(out), 0)
                    yield self._chunk(out.index, self.echo(out.index), prompt_logprobs, None, extra)
                c.token_ids += out.token_ids  # to the next chunk of this choice that goes out
                if c.split is not None:  # thinking goes out as reasoning_content; the rest on, as content
                    c.logprobs += out.logprobs or []  # held until a piece of text goes out
                    reasoning, content = split_output(c.split, out, usage)
                    if reasoning and self.body.include_reasoning:  # (else its logprobs go with the content)
                        yield self._chunk(out.index, {"reasoning_content": reasoning}, self._held_logprobs(c), None,
                                          extra)
                    out = dataclasses.replace(out, text=content, logprobs=None)
                if self.tool_mode != "none":  # an answer that may be a call is held until it shows it is not
                    c.text += out.text
                    c.logprobs += out.logprobs or []
                    if out.finished:
                        c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
                    for chunk in self._tool_chunks(out.index, c, extra):
                        yield chunk
                    continue
                logprobs = self._held_logprobs(c) if out.text else None  # a reasoning split's
                if out.logprobs and self.wants_logprobs:
                    if self.chat:
                        logprobs = self._chat_logprobs(out.logprobs)
                    else:  # offsets over the tokens' texts: text held back for a stop string is counted
                        logprobs, c.offset = self._completion_logprobs(out.logprobs, c.offset)
                if out.text or logprobs:
                    yield self._chunk(out.index, {"content": out.text} if self.chat else out.text, logprobs, None, extra)
                c.text += out.text
                if out.finished:
                    c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
                    yield self._chunk(out.index, {} if self.chat else "", self._held_logprobs(c), out.finish_reason,
                                      extra)
            usage.finish_metrics(self.timer, overall_finish(c.finish_reason for c in choices.values()))
            if include_usage:
                yield json.dumps(dict(self.header(), object=self.object + (".chunk" if self.chat else ""),
                                      choices=[], usage=usage.body()))
            yield "[DONE]"
        except EngineShutdownError as exc:  # grace period over (or the engine died): a clean, in-band error event
            code, reason = stopped(exc)
            self.timer.end(reason)
            yield json.dumps(error_body(503, str(exc), code=code))
            yield "[DONE]"  # after the error, as vLLM ends a failed stream: clients that wait for it stop
        except GenerationError as exc:  # this request's generation failed: in-band, then end
            self.timer.fail(exc.status)
            yield json.dumps(error_body(exc.status, str(exc), code="generation_failed"))
            yield "[DONE]"
        except Exception as exc:  # any other mid-stream failure: in-band too
            self.timer.end("error")
            yield json.dumps(error_body(500, f"generation failed: {exc}", code="generation_failed"))
            yield "[DONE]"

    def _tool_chunks(self, index: int, c: Choice, extra):
        """Streaming with tools: content is sent as far as it cannot be a call (ToolUse.sendable:
        not at all while it may be a call's JSON, up to a `<tool_call>` tag in the template's
        format); the rest is held to the end, then sent as tool_calls or as content."""
        if c.finish_reason is None:
            content, calls, finish_reason = c.text[:self.tools.sendable(c.text)], None, None
        else:
            content, calls, finish_reason = self._tool_calls(c)
        if len(content or "") > c.streamed:
            yield self._chunk(index, {"content": content[c.streamed:]}, self._held_logprobs(c), None, extra)
            c.streamed = len(content)
        if calls:  # with the call's logprobs, as the unstreamed answer lists them
            yield self._chunk(index, {"tool_calls": [dict(call, index=i) for i, call in enumerate(calls)]},
                              self._held_logprobs(c), None, extra)
        if c.finish_reason is not None:  # with logprobs still held (tokens whose text went nowhere: </think>)
            yield self._chunk(index, {}, self._held_logprobs(c), finish_reason, extra)

    def _held_logprobs(self, c: Choice) -> dict | None:
        """The logprobs of the tokens held back so far, for the chunk that sends them (then none are held)."""
        logprobs = self._chat_logprobs(c.logprobs) if self.wants_logprobs and c.logprobs else None
        c.logprobs = []
        return logprobs

    def _usage_so_far(self, usage: Usage, index: int) -> dict:
        """The usage a chunk of choice `index` carries under continuous_usage_stats, as vLLM counts
        it: its prompt's tokens and the tokens that choice has made so far."""
        prompt, made = self.prompt_sizes[index // self.body.n], usage.completion.get(index, (0,))[0]
        return {"prompt_tokens": prompt, "completion_tokens": made, "total_tokens": prompt + made}

    def _chunk(self, index, delta, logprobs, finish_reason, extra) -> str:
        """One SSE chunk of choice `index`; `extra(index)`: the fields beside the choices (the usage);
        with `return_token_ids` the tokens made since its last chunk, and the prompt's on its first
        (chat: beside the choices, as vLLM streams them)."""
        c = self.streaming[index]
        if self.chat:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            obj = "text_completion"
        if finish_reason is not None:  # vLLM's, with the finish
            choice["stop_reason"] = c.stop_reason
        first = not c.begun
        choice |= self._token_ids(index, c)
        c.begun = True
        chunk = dict(self.header(), object=obj, choices=[choice], **extra(index))
        if self.chat and first and self.body.return_token_ids:
            chunk["prompt_token_ids"] = self.prompts[0]
        return json.dumps(chunk)


async def _serve(request: Request, body, chat: bool):
    call = CompletionCall(request, body, chat)
    stream = await call.submit()
    if body.stream:
        return EventStream(call.events(stream), stream, call.timer)
    return await call.collect(stream)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await _serve(request, body, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return await _serve(request, body, chat=False)
