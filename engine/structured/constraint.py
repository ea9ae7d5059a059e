"""Structured outputs for an engine: compiled grammars and token masks, cached, and one
`Constraint` per constrained sequence.

Masks depend only on the grammar and the machine's state, and JSON documents revisit the same
states (inside a string at one place of the schema, before the next key, ...), so they are cached
across steps and requests, least recently used first out, within a byte budget. Grammars are cached
by their schema's text, so requests with one schema share their masks.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

import torch

from engine.sampling_params import InvalidParamError
from engine.structured import json_machine
from engine.structured.schema import Grammar, compile_schema, schema_key
from engine.structured.vocabulary import Vocabulary
from engine.structured.whole_text import compile_choices, compile_regex

GRAMMARS = 64
MASK_BYTES = 32 * 2**20


class StructuredOutputs:
    def __init__(self, token_bytes, width: int, eos_ids: set[int]):
        """`token_bytes`: a callable returning each token's bytes (read when the vocabulary's index
        is first asked for: the server builds it beside its step loop once loaded)."""
        self._token_bytes, self._width, self._eos_ids = token_bytes, width, eos_ids
        self._vocabulary: Vocabulary | None = None
        self._grammars: OrderedDict[str, Grammar] = OrderedDict()
        # (id(grammar), state) -> (grammar, mask): the entry holds its grammar, so the id stays its own
        self._masks: OrderedDict[tuple, tuple[Grammar, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()  # requests compile on the server's thread, masks come on the engine's
        self._building = threading.Lock()

    @property
    def vocabulary(self) -> Vocabulary:
        with self._building:
            if self._vocabulary is None:
                self._vocabulary = Vocabulary(self._token_bytes(), self._width, self._eos_ids)
            return self._vocabulary

    def for_params(self, params) -> Grammar | None:
        """The grammar a request's SamplingParams hold its answer to: a JSON schema's, a regex's or
        a list of choices' (None: free text)."""
        param = params.schema_param
        if params.response_schema is not None:
            return self.grammar(params.response_schema, param)
        if params.response_regex is not None:  # a schema's key is JSON text: never "regex:..."
            return self._cached("regex:" + params.response_regex, lambda: compile_regex(params.response_regex, param))
        if params.response_choices is not None:
            return self._cached("choices:" + json.dumps(params.response_choices),
                                lambda: compile_choices(params.response_choices, param))
        return None

    def grammar(self, schema, param: str) -> Grammar:
        """The grammar of a JSON schema from the request's field `param` (each of the request's
        sequences gets a `Constraint` on it); raises InvalidParamError naming the field."""
        try:
            key = schema_key(schema)
        except RecursionError:
            raise InvalidParamError(f"{param}: the schema is nested too deeply", param) from None
        return self._cached(key, lambda: compile_schema(schema, param))

    def _cached(self, key: str, compile) -> Grammar:
        with self._lock:
            grammar = self._grammars.pop(key, None)
        if grammar is None:
            grammar = compile()
        with self._lock:
            self._grammars[key] = grammar
            while len(self._grammars) > GRAMMARS:
                self._grammars.popitem(last=False)
        return grammar

    def clear_masks(self) -> None:
        """Forget every mask (and each pattern state's walk of the vocabulary)."""
        with self._lock:
            self._masks.clear()
        if self._vocabulary is not None:
            self._vocabulary.clear()

    def mask(self, grammar: Grammar, state: tuple) -> torch.Tensor:
        key = (id(grammar), state)
        with self._lock:
            if key in self._masks:
                self._masks.move_to_end(key)
                return self._masks[key][1]
        mask = self.vocabulary.mask(grammar, state)
        with self._lock:
            self._masks[key] = (grammar, mask)
            while len(self._masks) * self._width > MASK_BYTES and len(self._masks) > 1:
                self._masks.popitem(last=False)
        return mask


class Constraint:
    """One sequence's place in its grammar. `mask()` before a token is drawn, `advance(token)`
    after; `done` once the document is whole (nothing may follow it)."""

    def __init__(self, outputs: StructuredOutputs, grammar: Grammar):
        self._outputs = outputs
        self.grammar = grammar
        self.state = json_machine.start(grammar)
        self.ended = False

    def mask(self) -> torch.Tensor:
        return self._outputs.mask(self.grammar, self.state)

    def advance(self, token_id: int) -> None:
        """Raises ValueError for a token the mask did not allow."""
        vocabulary = self._outputs.vocabulary
        if token_id in vocabulary.eos_ids and json_machine.can_end(self.state, self.grammar):
            self.ended = True
            return
        state = vocabulary.advance(self.grammar, self.state, token_id)
        if state is None:
            raise ValueError(f"token {token_id} does not continue the answer's grammar")
        self.state = state

    def state_after(self, text: bytes) -> tuple | None:
        """The state `text` leads to from here, None where the grammar refuses it."""
        state = self.state
        for byte in text:
            state = json_machine.advance(self.grammar, state, byte)
            if state is None:
                return None
        return state

    def advance_text(self, text: bytes) -> None:
        """Text the grammar reads that came in no token of its own (a token's rest after a tag)."""
        state = self.state_after(text)
        if state is None:
            raise ValueError(f"{text!r} does not begin the answer's grammar")
        self.state = state

    @property
    def done(self) -> bool:
        return self.ended or self.state == ()
