"""gpt-oss's answers, in OpenAI's harmony format (`--reasoning-parser gpt_oss`, vLLM's `openai_gptoss`;
chosen by itself for a chat template that writes harmony, as vLLM and llama.cpp do). An answer is a
run of messages, each a header and a body; the prompt ends with `<|start|>assistant`:

    <|channel|>analysis<|message|>...the thinking...<|end|>
    <|start|>assistant<|channel|>final<|message|>...the answer...              (then <|return|>)
    <|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}  (<|call|>)

(a call's recipient may also stand before its channel: ` to=functions.NAME<|channel|>commentary json`).
The analysis channel is the reasoning, the final channel and commentary to no one (a preamble) the
content (several messages of either joined by a newline). A message to a function is a call: it
goes on in the content as `CALL` + recipient + `<|message|>` + its body, for server/harmony_tools.py
to read; a message to another recipient (the built-in browser or python tools, which this server
does not run) is content, its header dropped. Text that opens with no header (an answer held to a
grammar) is all content; whitespace before a first header is dropped. The headers
are special tokens, so the answer's text keeps them (`skip_special_tokens` off); `<|return|>` and
`<|call|>` end a generation, `<|end|>` does not (engine/loader.py).
"""
from __future__ import annotations

import re

from engine.stop_strings import held_back

START, CHANNEL, MESSAGE, END = "<|start|>", "<|channel|>", "<|message|>", "<|end|>"
CALL = " to="  # a call, as the content carries it: CALL + recipient + MESSAGE + arguments
FUNCTIONS = "functions."  # a client's tools' recipients
OPENERS = (START, CHANNEL, CALL.lstrip())  # (a recipient first: the template's form of a call)
RECIPIENT = re.compile(r"\bto=([^\s<]+)")
CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*([A-Za-z_]+)")


class HarmonySplit:
    """One answer's text, fed in order -> (reasoning, content) pieces as they become certain; the
    interface of server/reasoning.py's ReasoningSplit."""

    def __init__(self):
        self.state = "start"  # start -> header <-> body; or start -> plain (no header: all content)
        self.pending = ""
        self.kind = ""  # the current body's: "reasoning", "content" or "call"
        self.thought = False  # an analysis message came
        self.said = False  # a content message came (the next one starts on a new line)
        self.fed_tokens = 0
        self.closed_at: int | None = None  # tokens fed when the latest analysis message ended
        self.content_from: int | None = None  # tokens before the content's first (exact when fed one at a time)

    @property
    def reasoning_tokens(self) -> int:
        """Tokens up to the end of the last analysis message (all of them while one is open)."""
        if not self.thought:
            return 0
        return self.fed_tokens if self.kind == "reasoning" or self.closed_at is None else self.closed_at

    def feed(self, text: str, final: bool = False, tokens: int = 0) -> tuple[str, str]:
        self.pending += text
        self.fed_tokens += tokens
        reasoning, content = [], []
        while True:
            if self.state == "start":
                lead = self.pending.lstrip()
                if lead.startswith(OPENERS):
                    self.state, self.pending = "header", lead
                elif any(opener.startswith(lead) for opener in OPENERS) and not final:
                    break  # may still open a header
                else:
                    self.state, self.content_from = "plain", 0
            if self.state == "plain":
                content.append(self.pending)
                self.pending = ""
                break
            if self.state == "header":
                at = self.pending.find(MESSAGE)
                if at < 0:
                    if final:  # cut off within a header: nothing of it is either (text with no tag: content)
                        if "<|" not in self.pending and not self.thought and self.pending:
                            content.append(self.pending)
                            if self.content_from is None:
                                self.content_from = 0
                        self.pending = ""
                    break
                self._open(self.pending[:at], reasoning, content)
                self.pending, self.state = self.pending[at + len(MESSAGE):], "body"
            at = self.pending.find(END)
            if at < 0:
                keep = 0 if final else held_back(self.pending, END)
                self._body(self.pending[:len(self.pending) - keep], reasoning, content)
                self.pending = self.pending[len(self.pending) - keep:]
                break
            self._body(self.pending[:at], reasoning, content)
            if self.kind == "reasoning":
                self.closed_at = self.fed_tokens
            self.pending, self.state, self.kind = self.pending[at + len(END):], "header", ""
        return "".join(reasoning), "".join(content)

    def _open(self, header: str, reasoning: list, content: list) -> None:
        recipient, channel = RECIPIENT.search(header), CHANNEL_NAME.search(header)
        if channel and channel.group(1) == "analysis" and not recipient:
            if self.thought:
                reasoning.append("\n")  # between two analysis messages
            self.kind, self.thought = "reasoning", True
            return
        if self.said:
            content.append("\n")  # between two messages of the content
        self.said = True
        if self.content_from is None:  # its body starts after the header's last token
            self.content_from = self.fed_tokens
        if recipient and recipient.group(1).startswith(FUNCTIONS):
            self.kind = "call"
            content.append(CALL + recipient.group(1) + MESSAGE)
        else:
            self.kind = "content"

    def _body(self, text: str, reasoning: list, content: list) -> None:
        (reasoning if self.kind == "reasoning" else content).append(text)

    @classmethod
    def whole(cls, text: str) -> tuple[str | None, str]:
        """A finished answer -> (its reasoning, None where it has none; its content)."""
        split = cls()
        reasoning, content = split.feed(text, final=True)
        return reasoning if split.thought else None, content


def writes_harmony(template: str | None) -> bool:
    """Whether a chat template renders its messages in harmony (gpt-oss's)."""
    return bool(template) and CHANNEL in template and MESSAGE in template and START in template
