"""A grammar that holds an answer after its thinking: `--reasoning-parser` with `response_format`,
structured outputs or a forced tool call, as vLLM's structured outputs wait for the reasoning
parser's end of thinking. The thinking (`<think> ... </think>`) is free text; the grammar takes
over from the text after `</think>` (whitespace there is not the document's).

Where the prompt opened the block (deepseek_r1's template, Qwen3's thinking-only ones) the answer
thinks from its first token. Where the answer may open it itself (qwen3), its first tokens may
write `<think>` or begin the document: the mask is the grammar's and the tokens that write the tag
(which win where a grammar would take `<` too), and the first token decides which.

The tags are matched on the tokens' bytes, so a tokenizer that spells them over several tokens
works as one with a token for each. While thinking, the model may not end the answer with its
end-of-turn (the document is owed: it ends at max_tokens if it never closes the block; stop
tokens and strings the request names still end it), and a token that completes `</think>` and
goes on with text the grammar refuses is masked out. Same interface as `Constraint`. The
tags' masks come from the engine's `ThinkingMasks`, built from the vocabulary the first time each
is asked for and kept.
"""
from __future__ import annotations

import threading

import torch

from engine.stop_strings import held_back
from engine.structured.constraint import Constraint, StructuredOutputs
from engine.structured.schema import Grammar

OPEN, CLOSE = b"<think>", b"</think>"


class ThinkingMasks:
    """An engine's masks of a thinking block's tags over its vocabulary, cached (each built once,
    where a constrained sequence first asks for it; a lock keeps the cache whole). `token_bytes`: a
    callable returning each token's grammar bytes (None for special tokens); `piece_bytes`: token
    id -> the text it adds, special tokens' included."""

    def __init__(self, token_bytes, piece_bytes, width: int, eos_ids: set[int]):
        self._token_bytes, self._piece_bytes, self._width, self._eos_ids = token_bytes, piece_bytes, width, eos_ids
        self._pieces: list[bytes] | None = None
        self._cache: dict = {}
        self._lock = threading.Lock()

    def pieces(self) -> list[bytes]:
        """Each token id's text as bytes, special tokens' included (b"" past the tokenizer's ids)."""
        with self._lock:
            if self._pieces is None:
                table = self._token_bytes()
                self._pieces = [(table[i] if table[i] is not None else self._piece_bytes(i)) if i < len(table)
                                else b"" for i in range(self._width)]
            return self._pieces

    def _cached(self, key, build):
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        value = build()
        with self._lock:
            return self._cache.setdefault(key, value)

    def opening(self, written: bytes, tag: bytes) -> torch.Tensor:
        """[width] bool: the tokens that go on writing `tag` after `written` (a prefix of it): their
        text continues it, or completes it and goes on."""
        def build():
            mask = torch.zeros(self._width, dtype=torch.bool)
            allowed = [i for i, text in enumerate(self.pieces())
                       if text and ((piece := written + text).startswith(tag) or tag.startswith(piece))]
            if allowed:
                mask[torch.tensor(allowed)] = True
            return mask
        return self._cached(("opening", written, tag), build)

    def thinking(self) -> torch.Tensor:
        """[width] bool: every token but the end-of-answer ones (a thinking block under a grammar)."""
        def build():
            mask = torch.ones(self._width, dtype=torch.bool)
            mask[torch.tensor(sorted(i for i in self._eos_ids if i < self._width), dtype=torch.long)] = False
            return mask
        return self._cached("thinking", build)

    def closing_rests(self, written: bytes, tag: bytes) -> list[tuple[int, bytes]]:
        """(token id, its text after `tag`) for the tokens that complete `tag` after `written` (a
        prefix of it) with more than whitespace after it: what a grammar that starts after the tag
        must accept (as a rule none: tags are tokens of their own, or end one)."""
        def build():
            rests = []
            for i, text in enumerate(self.pieces()):
                at = (written + text).find(tag) if text else -1
                if at >= 0 and (rest := (written + text)[at + len(tag):].lstrip()):
                    rests.append((i, rest))
            return rests
        return self._cached(("closing", written, tag), build)


class ThinkingConstraint:
    def __init__(self, outputs: StructuredOutputs, masks: ThinkingMasks, grammar: Grammar, opened: bool):
        self._masks = masks
        self.inner = Constraint(outputs, grammar)
        # undecided -> opening (part of <think> written) -> thinking -> held; or undecided -> held
        self.phase = "thinking" if opened else "undecided"
        self.written = b""  # opening: the tag so far; thinking: the text's end that may begin </think>

    def mask(self) -> torch.Tensor | None:
        if self.phase == "held":
            return self.inner.mask()
        if self.phase == "thinking":  # free, but for the end of the answer (the document is owed)
            refused = [i for i, rest in self._masks.closing_rests(self.written, CLOSE)
                       if self.inner.state_after(rest) is None]
            mask = self._masks.thinking()
            if refused:
                mask = mask.clone()
                mask[torch.tensor(refused)] = False
            return mask
        opening = self._masks.opening(self.written, OPEN)
        return opening if self.phase == "opening" else opening | self.inner.mask()

    def advance(self, token_id: int) -> None:
        """Raises ValueError for a token the mask did not allow."""
        if self.phase == "held":
            return self.inner.advance(token_id)
        pieces = self._masks.pieces()
        piece = pieces[token_id] if token_id < len(pieces) else b""
        if self.phase != "thinking":
            text = self.written + piece
            if piece and OPEN.startswith(text) and text != OPEN:
                self.phase, self.written = "opening", text
                return
            if not (piece and text.startswith(OPEN)):
                if self.phase == "opening":
                    raise ValueError(f"token {token_id} does not go on writing {OPEN.decode()}")
                self.phase = "held"  # the answer opened no thinking block: the grammar's from here
                return self.inner.advance(token_id)
            self.phase, self.written, piece = "thinking", b"", text[len(OPEN):]
        text = self.written + piece
        end = text.find(CLOSE)
        if end < 0:
            self.written = text[len(text) - held_back(text, CLOSE):]
            return
        self.phase, self.written = "held", b""
        self.inner.advance_text(text[end + len(CLOSE):].lstrip())

    @property
    def ended(self) -> bool:
        return self.phase == "held" and self.inner.ended

    @property
    def done(self) -> bool:
        return self.phase == "held" and self.inner.done
