"""Which tokens a JSON machine state allows: each token's bytes run through the machine.

The tokens' byte strings are kept sorted, so tokens that share a prefix sit side by side: the walk
reuses the machine's state for the shared prefix, and when a byte is refused it jumps past every
token that starts with the refused prefix at once (one binary search). Between a string's
characters, the tokens of whole UTF-8 characters with no quote, backslash or control character
(most of a vocabulary) leave the state as it is; they are allowed there as one precomputed mask,
and only the others are walked. In a string with only a length, they are allowed by their number
of characters (one comparison), and again only the others are walked. In a string held to a
pattern, such tokens are read as the pattern's character classes (tokens of one sequence of
classes lead anywhere alike), each sequence is run through the pattern's automaton once per
automaton state (sorted, sharing prefixes), and a token is allowed where the state it ends in is
live with its characters counted.
"""
from __future__ import annotations

import bisect
import threading
from array import array
from collections import OrderedDict

import torch

from engine.structured import json_machine
from engine.structured.regex import Pattern
from engine.structured.schema import Grammar

ENDS_BYTES = 32 * 2**20  # kept of automaton states' class sequences' ends (4 bytes a sequence each)
PATTERNS_KEPT = 32  # cuts of the code points whose plain tokens' class sequences are kept (4 bytes a token each)


_STRING_BYTES = bytes(b for b in range(0x20, 0x100) if b not in (0x22, 0x5C))


def _plain(text: bytes) -> bool:
    """A token that string characters may hold whole: whole UTF-8 characters, none of them a quote,
    backslash or control character."""
    if text.translate(None, _STRING_BYTES):  # a byte left over is one a string may not hold
        return False
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _SortedTokens:
    def __init__(self, groups: dict[bytes, list[int]]):
        self.texts = sorted(groups)
        self.ids = [groups[t] for t in self.texts]

    def past(self, prefix: bytes | tuple, lo: int) -> int:
        """The first index from `lo` on whose token does not start with `prefix` (tokens as bytes,
        or as tuples of ints)."""
        if isinstance(prefix, tuple):
            return bisect.bisect_left(self.texts, prefix[:-1] + (prefix[-1] + 1,), lo)
        while prefix and prefix[-1] == 0xFF:
            prefix = prefix[:-1]
        if not prefix:
            return len(self.texts)
        return bisect.bisect_left(self.texts, prefix[:-1] + bytes([prefix[-1] + 1]), lo)


class Vocabulary:
    def __init__(self, token_bytes: list[bytes | None], width: int, eos_ids: set[int]):
        """`token_bytes[i]`: the bytes token i decodes to (None: a special token, never allowed);
        `width`: the logits' width (ids past the tokenizer's are never allowed)."""
        every: dict[bytes, list[int]] = {}
        other: dict[bytes, list[int]] = {}
        plain: list[int] = []
        for token_id, text in enumerate(token_bytes[:width]):
            if not text:
                continue
            every.setdefault(text, []).append(token_id)
            if _plain(text):
                plain.append(token_id)
            else:
                other.setdefault(text, []).append(token_id)
        # the tokens a string may hold whole; built from bytes, not torch ops: the server builds the
        # vocabulary beside its step loop, and a torch op there would start a second OpenMP team
        flags = bytearray(width)
        chars = array("i", bytes(4 * width))  # a plain token's characters (0 for the others)
        self._plain_texts = [(token_bytes[token_id].decode("utf-8"), token_id) for token_id in plain]
        for text, token_id in self._plain_texts:
            flags[token_id] = 1
            chars[token_id] = len(text)
        self.plain = torch.frombuffer(flags, dtype=torch.bool)
        self.plain_chars = torch.frombuffer(chars, dtype=torch.int32)
        self.longest_plain = max(chars, default=0)
        self._plain_characters = sorted({c for text, _ in self._plain_texts for c in text})
        # a pattern's cuts -> its plain tokens' class sequences, sorted, and each token's sequence
        self._sequences: OrderedDict[tuple, tuple] = OrderedDict()
        # (id(pattern), automaton state) -> (pattern, the (end state, characters) pairs, each sequence's pair)
        self._ends: OrderedDict[tuple, tuple] = OrderedDict()
        self._ends_bytes = 0
        self._ends_lock = threading.Lock()
        self.width = width
        self.token_bytes = token_bytes
        self.eos_ids = sorted(i for i in eos_ids if i < width)
        self._every = _SortedTokens(every)
        self._other = _SortedTokens(other)

    def mask(self, grammar: Grammar, state: tuple) -> torch.Tensor:
        """[width] bool: the tokens whose bytes the state accepts (EOS where the document may end)."""
        room = json_machine.plain_room(grammar, state)
        held = json_machine.held_text(grammar, state) if room is None else None
        allowed = _walk(grammar, state, self._every if room is None and held is None else self._other)
        if held is not None:
            mask = self._held_mask(*held)
        elif room is None:
            mask = torch.zeros(self.width, dtype=torch.bool)
        elif room >= self.longest_plain:
            mask = self.plain.clone()
        else:
            mask = self.plain & (self.plain_chars <= room)
        if allowed:
            mask[torch.tensor(allowed)] = True
        if json_machine.can_end(state, grammar) and self.eos_ids:
            mask[torch.tensor(self.eos_ids)] = True
        return mask

    def clear(self) -> None:
        with self._ends_lock:
            self._ends.clear()
            self._ends_bytes = 0
            self._sequences.clear()

    def _held_mask(self, pattern: Pattern, automaton: int, count: int) -> torch.Tensor:
        """The plain tokens a string held to `pattern` may take next: the state each ends in is live
        with its characters added to `count` (then every state on its way was too)."""
        pairs, pair_of, sequence_of = self._plain_ends(pattern, automaton)
        flags = bytearray(pattern.live(end, count + chars) for end, chars in pairs) + b"\0"  # the last: refused
        allowed = torch.index_select(torch.frombuffer(flags, dtype=torch.bool), 0, pair_of)
        return torch.index_select(allowed, 0, sequence_of)

    def _plain_ends(self, pattern: Pattern, automaton: int) -> tuple[list[tuple[int, int]], torch.Tensor,
                                                                       torch.Tensor]:
        """Where the plain tokens' class sequences lead from `automaton`: the distinct (end state,
        characters) pairs, per sequence the index of its pair (past them: refused; one more entry,
        refused, for the tokens that are not plain), and per token the index of its sequence."""
        sequences, sequence_of = self._class_sequences(pattern)
        key = (id(pattern), automaton)
        with self._ends_lock:
            if key in self._ends:
                self._ends.move_to_end(key)
                return (*self._ends[key][1:], sequence_of)
        pairs: dict[tuple[int, int], int] = {}
        ends = array("i", [-1]) * (len(sequences.texts) + 1)

        def step(current: int, character_class: int) -> int | None:
            target = pattern.step(current, pattern.representative(character_class))
            return target if target >= 0 else None

        for i, end in _accepted(sequences, automaton, step):
            ends[i] = pairs.setdefault((end, len(sequences.texts[i])), len(pairs))
        ends = torch.frombuffer(ends, dtype=torch.int32)
        entry = (pattern, list(pairs), torch.where(ends < 0, len(pairs), ends))
        with self._ends_lock:
            self._ends[key] = entry
            self._ends_bytes += 4 * len(ends)
            while self._ends_bytes > ENDS_BYTES and len(self._ends) > 1:
                self._ends_bytes -= 4 * len(self._ends.popitem(last=False)[1][2])
        return (*entry[1:], sequence_of)

    def _class_sequences(self, pattern: Pattern) -> tuple[_SortedTokens, torch.Tensor]:
        """The plain tokens as sequences of the pattern's character classes, sorted (each with its
        index), and per token the index of its sequence (past them: not plain). Patterns that cut
        the code points alike (one format in many fields, a pattern with other lengths) share them."""
        key = pattern.cuts
        with self._ends_lock:
            if key in self._sequences:
                self._sequences.move_to_end(key)
                return self._sequences[key]
        classes = {c: pattern.character_class(ord(c)) for c in self._plain_characters}
        groups: dict[tuple, list[int]] = {}
        for text, token_id in self._plain_texts:
            groups.setdefault(tuple(map(classes.__getitem__, text)), []).append(token_id)
        sequences = _SortedTokens(groups)
        sequence_of = array("i", [len(sequences.texts)]) * self.width
        for i, ids in enumerate(sequences.ids):
            for token_id in ids:
                sequence_of[token_id] = i
        entry = (sequences, torch.frombuffer(sequence_of, dtype=torch.int32))
        with self._ends_lock:
            self._sequences[key] = entry
            while len(self._sequences) > PATTERNS_KEPT:
                self._sequences.popitem(last=False)
        return entry

    def advance(self, grammar: Grammar, state: tuple, token_id: int) -> tuple | None:
        text = self.token_bytes[token_id] if token_id < len(self.token_bytes) else None
        if not text:
            return None
        for byte in text:
            state = json_machine.advance(grammar, state, byte)
            if state is None:
                return None
        return state


def _walk(grammar: Grammar, state: tuple, tokens: _SortedTokens) -> list[int]:
    allowed: list[int] = []
    for i, _ in _accepted(tokens, state, lambda current, byte: json_machine.advance(grammar, current, byte)):
        allowed += tokens.ids[i]
    return allowed


def _accepted(tokens: _SortedTokens, state, step):
    """(index, end state) of each sorted token that `step` (state, symbol -> state, or None where
    refused) takes whole from `state`. A prefix's states are reused by the
    tokens that share it, and every token that starts with a refused prefix is passed over at once."""
    texts = tokens.texts
    path, states = texts[0][:0] if texts else b"", [state]  # states[d]: the state after path[:d]
    i = 0
    while i < len(texts):
        text = texts[i]
        shared, most = 0, min(len(text), len(path))
        while shared < most and text[shared] == path[shared]:
            shared += 1
        del states[shared + 1:]
        current, depth = states[shared], shared
        while depth < len(text):
            current = step(current, text[depth])
            if current is None:
                break
            depth += 1
            states.append(current)
        path = text[:depth]
        if depth == len(text):
            yield i, current
            i += 1
        else:
            i = tokens.past(text[:depth + 1], i + 1)
