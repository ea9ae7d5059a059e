"""Streaming text is UTF-8 safe: a multi-byte character split over tokens is never cut."""
from __future__ import annotations

from engine.detokenizer import IncrementalDetokenizer


def test_multibyte_characters_are_never_split(engine):
    text = "Café 🙂 naïve — 東京"
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # byte-level BPE splits some characters over tokens
    detok = IncrementalDetokenizer(engine.tokenizer, [], stop=[])
    pieces = []
    for t in ids:
        detok.add_token(t)
        pieces.append(detok.take(final=False))
    pieces.append(detok.take(final=True))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_text_that_may_become_a_stop_string_is_held_back(engine):
    ids = engine.tokenizer.encode("one two three", add_special_tokens=False)
    detok = IncrementalDetokenizer(engine.tokenizer, [], stop=["two thr"])
    out = ""
    for t in ids:
        detok.add_token(t)
        out += detok.take(final=False)
        assert "two" not in out  # "two" could start the stop string, so it waits
    out += detok.take(final=True)
    assert out == "one " and detok.stopped
