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


def test_a_replacement_character_the_model_writes_is_released_at_once(engine):
    """U+FFFD is a character like others: its tokens (its three bytes, EF BF BD) release it, whole,
    however the text goes on; it once waited for a token after it, and at the end was dropped."""
    ids = engine.tokenizer.encode("a\ufffd", add_special_tokens=False)
    detok = IncrementalDetokenizer(engine.tokenizer, [], stop=[])
    pieces = []
    for t in ids:
        detok.add_token(t)
        pieces.append(detok.take(final=False))
    assert "".join(pieces) == "a\ufffd"
    assert detok.take(final=True) == ""


def test_half_a_character_at_the_end_is_dropped(engine):
    ids = engine.tokenizer.encode("ok 🙂", add_special_tokens=False)
    detok = IncrementalDetokenizer(engine.tokenizer, [], stop=[])
    text = ""
    for t in ids[:-1]:  # the emoji's last byte never comes
        detok.add_token(t)
        text += detok.take(final=False)
    assert text + detok.take(final=True) == engine.tokenizer.decode(ids[:-1]).rstrip("\ufffd")


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


def feed(detok, ids, may_stop=lambda i: True) -> str:
    out = ""
    for i, t in enumerate(ids):
        detok.add_token(t, may_stop=may_stop(i))
        out += detok.take(final=False)
        if detok.stopped:
            break
    return out + detok.take(final=True)


def test_a_kept_stop_string_ends_the_text_and_nothing_after_it_comes_out(engine):
    ids = engine.tokenizer.encode("one, two, three", add_special_tokens=False)
    assert feed(IncrementalDetokenizer(engine.tokenizer, [], stop=[", t"], include_stop=True), ids) == "one, t"
    assert feed(IncrementalDetokenizer(engine.tokenizer, [], stop=[", t"]), ids) == "one"


def test_a_stop_string_before_the_sequence_may_stop_is_passed_over(engine):
    ids = engine.tokenizer.encode("one, two, three, four", add_special_tokens=False)
    first_comma = next(i for i in range(len(ids)) if "," in engine.tokenizer.decode(ids[:i + 1]))
    detok = IncrementalDetokenizer(engine.tokenizer, [], stop=[","])
    assert feed(detok, ids, may_stop=lambda i: i > first_comma) == "one, two" and detok.stopped
