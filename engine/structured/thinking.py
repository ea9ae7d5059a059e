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
goes on with text the grammar refuses is masked out. Same interface as `Constraint`.
"""
from __future__ import annotations

import torch

from engine.stop_strings import held_back
from engine.structured.constraint import Constraint, StructuredOutputs
from engine.structured.schema import Grammar

OPEN, CLOSE = b"<think>", b"</think>"


class ThinkingConstraint:
    def __init__(self, outputs: StructuredOutputs, grammar: Grammar, opened: bool):
        self._outputs = outputs
        self.inner = Constraint(outputs, grammar)
        # undecided -> opening (part of <think> written) -> thinking -> held; or undecided -> held
        self.phase = "thinking" if opened else "undecided"
        self.written = b""  # opening: the tag so far; thinking: the text's end that may begin </think>

    def mask(self) -> torch.Tensor | None:
        if self.phase == "held":
            return self.inner.mask()
        if self.phase == "thinking":  # free, but for the end of the answer (the document is owed)
            refused = [i for i, rest in self._outputs.closing_rests(self.written, CLOSE)
                       if self.inner.state_after(rest) is None]
            mask = self._outputs.thinking_mask()
            if refused:
                mask = mask.clone()
                mask[torch.tensor(refused)] = False
            return mask
        opening = self._outputs.opening_mask(self.written, OPEN)
        return opening if self.phase == "opening" else opening | self.inner.mask()

    def advance(self, token_id: int) -> None:
        """Raises ValueError for a token the mask did not allow."""
        if self.phase == "held":
            return self.inner.advance(token_id)
        pieces = self._outputs.pieces()
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
