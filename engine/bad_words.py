"""vLLM's `bad_words`: words an answer never writes, as token sequences the sampler refuses to finish.

Each word becomes the tokens of the word alone (leading spaces stripped) and, where it spells
otherwise, of the word after a space (" word": a word inside a sentence is usually that), as vLLM's
SamplingParams builds them. A one-token sequence is refused everywhere; a longer one's last token
is refused where the answer's last tokens are the rest of it. Only the answer's own tokens count
(the prompt's end does not start a word), as in vLLM.
"""
from __future__ import annotations

MAX_BAD_WORDS = 64
MAX_BAD_WORD_CHARS = 128


def bad_word_ids(encode, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """`words` as token sequences; `encode(text)` tokenizes without special tokens."""
    sequences: list[tuple[int, ...]] = []
    for word in words:
        plain = tuple(encode(word.lstrip()))
        spaced = tuple(encode(" " + word.lstrip()))
        if plain:
            sequences.append(plain)
        # vLLM keeps the spaced spelling where it starts otherwise and is as long (a tokenizer that
        # makes " word" one token more, a lone space, would refuse every space)
        if spaced and spaced[0] != (plain or (None,))[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    return tuple(dict.fromkeys(sequences))


def banned_next(sequences: tuple[tuple[int, ...], ...], output: list[int]) -> set[int]:
    """The tokens that would finish a bad word after `output` (the answer's tokens so far)."""
    banned = set()
    for seq in sequences:
        head = len(seq) - 1
        if head == 0 or (head <= len(output) and tuple(output[len(output) - head:]) == seq[:-1]):
            banned.add(seq[-1])
    return banned
