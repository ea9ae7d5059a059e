"""`--reasoning-parser`: a chat answer's thinking (`<think> ... </think>`) apart from its content,
as vLLM's reasoning parsers and llama.cpp's `--reasoning-format deepseek` give it: the message's
`reasoning_content`, and in a stream `delta.reasoning_content` before `delta.content`.

- `qwen3`: an answer that opens with `<think>`, or whose prompt ends inside an open `<think>` block
  (the templates of Qwen3's thinking-only models open it), thinks until `</think>`; one that does
  not (thinking turned off, `chat_template_kwargs: {"enable_thinking": false}`) is all content.
- `deepseek_r1`: the template opens the thinking in the prompt, so an answer thinks from its first
  token (an opening `<think>` of its own is dropped) until `</think>`.
- `gpt_oss` (or vLLM's name, `openai_gptoss`): harmony's channels (server/harmony.py), the analysis
  channel as the reasoning; chosen by itself where the chat template writes harmony.

Whitespace between `</think>` and the content is dropped. An answer cut off while thinking
(`max_tokens`) has reasoning and no content, streamed or not. The split works on the text, so
tokenizers that spell the tags over several tokens split the same way; text that may be the start
of a tag is held back until it is known not to be. A grammar (response_format, structured
outputs, a forced tool call) holds the content, after the thinking (engine/structured/thinking.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

from engine.stop_strings import held_back
from server.harmony import HarmonySplit, writes_harmony

OPEN, CLOSE = "<think>", "</think>"
HARMONY = ("gpt_oss", "openai_gptoss")
PARSERS = ("qwen3", "deepseek_r1", *HARMONY)


class ReasoningSplit:
    """One answer's text, fed in order -> (reasoning, content) pieces as they become certain."""

    def __init__(self, parser: str, opened: bool = False):
        """`opened`: the prompt ends inside a `<think>` block (`prompt_opens_thinking`)."""
        if parser not in PARSERS:
            raise ValueError(f"reasoning parser {parser!r}: one of {', '.join(PARSERS)}")
        self.parser, self.opened = parser, opened
        self.state = "start"  # start -> thinking -> after (whitespace dropped) -> content; or start -> content
        self.pending = ""
        self.thought = False  # the answer has a thinking block (possibly empty, possibly cut off)
        self.fed_tokens = 0
        self.closed_at: int | None = None  # tokens fed when `</think>` was complete
        self.content_from: int | None = None  # tokens before the content's first (exact when fed one at a time)

    @property
    def reasoning_tokens(self) -> int:
        """Tokens of the thinking, its tags included (usage's `reasoning_tokens`): every token fed
        up to the one that completed `</think>`, all of them if it never came."""
        if not self.thought:
            return 0
        return self.fed_tokens if self.closed_at is None else self.closed_at

    def feed(self, text: str, final: bool = False, tokens: int = 0) -> tuple[str, str]:
        """The next piece of the answer (`tokens`: how many tokens it is, for `reasoning_tokens`)."""
        reasoning = content = ""
        self.pending += text
        self.fed_tokens += tokens
        if self.state == "start":
            lead = self.pending.lstrip()
            if lead.startswith(OPEN):
                self.state, self.pending = "thinking", lead[len(OPEN):]
            elif OPEN.startswith(lead) and not final:
                return "", ""  # may still open a tag
            else:
                self.state = "thinking" if self.parser == "deepseek_r1" or self.opened else "content"
            self.thought = self.state == "thinking"
            if not self.thought:
                self.content_from = 0
        if self.state == "thinking":
            end = self.pending.find(CLOSE)
            if end < 0:
                keep = 0 if final else held_back(self.pending, CLOSE)
                reasoning, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
                return reasoning, ""
            reasoning, self.pending, self.state = self.pending[:end], self.pending[end + len(CLOSE):], "after"
            self.closed_at = self.fed_tokens
        if self.state == "after":
            self.pending = self.pending.lstrip()
            if not self.pending:
                return reasoning, ""
            self.state, self.content_from = "content", self.fed_tokens - tokens  # this piece begins it
        content, self.pending = self.pending, ""
        return reasoning, content

    @classmethod
    def whole(cls, parser: str, text: str, opened: bool = False) -> tuple[str | None, str]:
        """A finished answer -> (its reasoning, None where it has none; its content)."""
        split = cls(parser, opened)
        reasoning, content = split.feed(text, final=True)
        return reasoning if split.thought else None, content


def prompt_opens_thinking(prompt_tail: str) -> bool:
    """Whether a prompt (its last characters) ends inside a `<think>` block."""
    return prompt_tail.rfind(OPEN) > prompt_tail.rfind(CLOSE)


@dataclass(frozen=True)
class Reasoning:
    """How one request's answers are split: the parser, and whether its prompt opened the block."""
    parser: str
    opened: bool

    @property
    def thinks_first(self) -> bool:
        """The answer thinks from its first token (else it may open a block first, or not)."""
        return self.parser == "deepseek_r1" or self.opened

    def split(self) -> ReasoningSplit | HarmonySplit:
        return HarmonySplit() if self.parser in HARMONY else ReasoningSplit(self.parser, self.opened)


async def request_reasoning(parser: str | None, sampling, tokenizer, prompt: list[int]):
    """-> (the split of a chat request's answers where the server has a parser, else None; its
    SamplingParams, whose grammar, if any, then holds the answer after the thinking). The prompt's
    last 32 tokens are decoded off the event loop."""
    if parser is None and writes_harmony(getattr(tokenizer, "chat_template", None)):
        parser = "gpt_oss"  # harmony's headers are no text to show: split whether asked or not, as vLLM does
    if parser is None:
        return None, sampling
    if parser in HARMONY:  # its headers are special tokens; a grammar holds the whole answer (no header)
        return Reasoning(parser, False), dataclasses.replace(sampling, skip_special_tokens=False)
    tail = await asyncio.to_thread(tokenizer.decode, prompt[-32:], False, True)
    reasoning = Reasoning(parser, prompt_opens_thinking(tail))
    if sampling.constrained:
        sampling = dataclasses.replace(sampling, thinking="open" if reasoning.thinks_first else "may_open")
    return reasoning, sampling


def split_output(split: ReasoningSplit | None, out, usage) -> tuple[str, str]:
    """An engine output's text -> (its thinking, its content) as far as they are certain, the
    answer's thinking tokens counted in `usage` (all content where no parser splits it)."""
    if split is None:
        return "", out.text
    pieces = split.feed(out.text, out.finished, len(out.token_ids))
    usage.reasoning[out.index] = split.reasoning_tokens
    return pieces
