"""Which tokens a JSON machine state allows: each token's bytes run through the machine.

The tokens' byte strings are kept sorted, so tokens that share a prefix sit side by side: the walk
reuses the machine's state for the shared prefix, and when a byte is refused it jumps past every
token that starts with the refused prefix at once (one binary search). Between a string's
characters, the tokens of whole UTF-8 characters with no quote, backslash or control character
(most of a vocabulary) leave the state as it is; they are allowed there as one precomputed mask,
and only the others are walked.
"""
from __future__ import annotations

import bisect

import torch

from engine.structured import json_machine
from engine.structured.schema import Grammar


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

    def past(self, prefix: bytes, lo: int) -> int:
        """The first index from `lo` on whose token does not start with `prefix`."""
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
        for token_id in plain:
            flags[token_id] = 1
        self.plain = torch.frombuffer(flags, dtype=torch.bool)
        self.width = width
        self.token_bytes = token_bytes
        self.eos_ids = sorted(i for i in eos_ids if i < width)
        self._every = _SortedTokens(every)
        self._other = _SortedTokens(other)

    def mask(self, grammar: Grammar, state: tuple) -> torch.Tensor:
        """[width] bool: the tokens whose bytes the state accepts (EOS where the document may end)."""
        in_string = json_machine.in_string(state)
        allowed = _walk(grammar, state, self._other if in_string else self._every)
        mask = self.plain.clone() if in_string else torch.zeros(self.width, dtype=torch.bool)
        if allowed:
            mask[torch.tensor(allowed)] = True
        if json_machine.can_end(state) and self.eos_ids:
            mask[torch.tensor(self.eos_ids)] = True
        return mask

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
    texts, advance = tokens.texts, json_machine.advance
    path, states = b"", [state]  # states[d]: the state after path[:d]
    i = 0
    while i < len(texts):
        text = texts[i]
        shared, most = 0, min(len(text), len(path))
        while shared < most and text[shared] == path[shared]:
            shared += 1
        del states[shared + 1:]
        current, depth = states[shared], shared
        while depth < len(text):
            current = advance(grammar, current, text[depth])
            if current is None:
                break
            depth += 1
            states.append(current)
        path = text[:depth]
        if depth == len(text):
            allowed += tokens.ids[i]
            i += 1
        else:  # every token that starts with the refused prefix is refused with it
            i = tokens.past(text[:depth + 1], i + 1)
    return allowed
