"""Streaming text is UTF-8 safe: a multi-byte character split over tokens is never cut."""
from __future__ import annotations

import copy

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


def test_lone_character_starts_go_out_as_replacement_characters(engine):
    """Tokens that each start a two-byte character and never end it (C3 C3 C3 ...): each start is
    no UTF-8 once the next one comes, and goes out as U+FFFD then; only the last one waits, and
    an end for it makes a character. (Every
    start once waited, for the whole output, and the output ended empty.)"""
    lead = engine.tokenizer.token_bytes().index(b"\xc3")
    detok = IncrementalDetokenizer(engine.tokenizer, [], stop=[])
    pieces = []
    for _ in range(50):
        detok.add_token(lead)
        pieces.append(detok.take(final=False))
    assert pieces[0] == "" and all(p == "\ufffd" for p in pieces[1:])
    assert detok.read_offset == len(detok.ids) - 1  # one token waits, not the whole output
    detok.add_token(engine.tokenizer.token_bytes().index(b"\xa9"))  # the last start's end: C3 A9 is é
    assert detok.take(final=True) == "\u00e9"


def test_a_run_of_special_tokens_is_read_past_not_decoded_again_at_every_token(engine):
    """Special tokens left out of the text (`skip_special_tokens`, the default) decode to nothing:
    they were kept unread, so every token after them decoded the whole run again (a request that
    biased EOS up with `ignore_eos` made each step's detokenizing grow with its output, on the
    engine thread). The text is the same; each token decodes a few ids."""
    tokenizer = copy.copy(engine.tokenizer)
    decoded = []
    plain = tokenizer.decode
    tokenizer.decode = lambda ids, **kw: decoded.append(len(ids)) or plain(ids, **kw)
    eos = sorted(engine.eos_ids)[0]
    words = engine.tokenizer.encode(" one two", add_special_tokens=False)
    ids = [*words[:1], *[eos] * 300, *words[1:]]
    detok = IncrementalDetokenizer(tokenizer, [], stop=[])
    out = ""
    for t in ids:
        detok.add_token(t)
        out += detok.take(final=False)
    assert out + detok.take(final=True) == plain(ids, clean=False) == " one two"
    assert max(decoded) <= 8  # at most the context and the token (300 and more before)


def test_streamed_text_is_the_raw_decode_where_the_config_cleans_up_spaces(engine):
    """With `clean_up_tokenization_spaces` (GPT-2-style configs) the clean-up joins text across
    tokens (" 's" -> "'s"): streamed text is the raw decode, as vLLM streams it. It was the cleaned
    decode, diffed token by token, and lost characters ("it 's good" streamed as "it ' good")."""
    tokenizer = copy.copy(engine.tokenizer)
    tokenizer._clean_up_spaces = True
    ids = tokenizer.encode("it 's good . And x ! Or y , they 're here", add_special_tokens=False)
    assert tokenizer.decode(ids) != tokenizer.decode(ids, clean=False)  # the clean-up applies here
    detok = IncrementalDetokenizer(tokenizer, [], stop=[])
    out = ""
    for t in ids:
        detok.add_token(t)
        out += detok.take(final=False)
    assert out + detok.take(final=True) == tokenizer.decode(ids, clean=False)


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
