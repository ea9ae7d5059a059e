"""Structured outputs' strings and numbers held to more than their type: `pattern`s against Python's
`re`, `format`s against the parsers clients use (pydantic's `datetime`, `UUID`, ...), lengths
(`minLength`, `maxLength`) and numeric bounds, byte by byte through the JSON machine, each token
mask against a brute force over the vocabulary, and the real model's answers through the `openai`
SDK's `parse`."""
from __future__ import annotations

import datetime
import ipaddress
import json
import random
import re
import uuid
from decimal import Decimal

import pytest
from pydantic import BaseModel, Field, TypeAdapter

from engine.sampling_params import InvalidParamError
from engine.structured import json_machine
from engine.structured.regex import Pattern
from engine.structured.schema import compile_schema
from tests.helpers import brute_force_mask, grammar_accepts

MODEL = "smollm2-135m-instruct"


def _full(pattern: Pattern, text: str) -> bool:
    state = pattern.start
    for char in text:
        state = pattern.step(state, ord(char))
        if state < 0:
            return False
    return pattern.accepting(state)


@pytest.mark.parametrize("source, example", [
    ("^a+$", "aa"), ("b", "abc"), ("^(foo|bar)baz$", "barbaz"), ("^[a-c]{2,3}$", "cab"), ("a|^b$", "b"),
    (r"^\d{4}-\d{2}$", "2024-05"), ("[^ab]c", "xc"), ("^x?y*z+$", "yyz"), ("^(ab|a)(c|bcd)(d*)$", "abcdd"),
    ("^.{3}$", "a.b"), (r"^[\w.]+@[a-z]+\.(com|org)$", "a.b@x.org"), ("^(a{2}){1,2}$", "aaaa"), ("^$", ""),
    ("", "x"), ("^[-a]$", "-"), ("^[a-]$", "-"), (r"^\.$", "."), (r"^\s*\S+$", " \tab"), ("^(?:a|b)+?$", "ab"),
    ("^(?<x>ab)*$", "abab"), (r"^[\d-]{2}$", "1-"), (r"^\x41\u0042$", "AB"),
])
def test_patterns_match_what_a_regex_search_matches(source, example):
    """JSON Schema patterns search (unanchored unless `^`/`$`); ECMA's `$` is Python's `\\Z`.
    Random strings over an alphabet of the pattern's own characters and others, and an example."""
    pattern, expected = Pattern(source), re.compile(source.replace("$", r"\Z").replace("(?<x>", "(?P<x>"))
    assert _full(pattern, example) and expected.search(example)
    rng, alphabet = random.Random(0), "abcdfoxyzAB019.-@ \n\t" + example
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        assert _full(pattern, text) == bool(expected.search(text)), (source, text)


@pytest.mark.parametrize("source, words", [
    ("(?=a)", "lookaround"), (r"a\b", r"\b"), (r"(a)\1", r"\1"), (r"\p{L}", r"\p"), ("(a", "ends too early"),
    ("a)", "unexpected"), ("*a", "nothing to repeat"), ("^a^b", "^ and $"), ("[z-a]", "out of order"),
    ("a{3,2}", "out of order"), ("a{2000}", "above 1000"),
])
def test_patterns_the_automaton_cannot_hold_are_refused_by_name(source, words):
    with pytest.raises(InvalidParamError) as caught:
        compile_schema({"type": "string", "pattern": source})
    assert words in str(caught.value) and "pattern" in str(caught.value) and caught.value.param == "response_format"


def test_a_brace_that_begins_no_quantifier_is_a_literal():
    assert _full(Pattern("^a{,2}$"), "a{,2}") and not _full(Pattern("^a{,2}$"), "aa")


def _allowed_bytes(grammar, state) -> list[int]:
    return [b for b in range(256) if json_machine.advance(grammar, state, b) is not None]


def _random_documents(schema, count: int, seed: int = 0, prefer: bytes = b"") -> list[str]:
    """Documents made of random bytes the machine allows, from the start; every state on the way
    allows some byte or may end (a dead end would leave a row no token to take). `prefer`: bytes
    taken where allowed, half the time (else the walks would rarely reach some states)."""
    grammar, rng = compile_schema(schema), random.Random(seed)
    documents = []
    for _ in range(count):
        state, text = json_machine.start(grammar), b""
        while True:
            allowed = _allowed_bytes(grammar, state)
            ends = json_machine.can_end(state)
            assert allowed or ends, text
            if ends and (not allowed or rng.random() < 0.2):
                break
            liked = [b for b in allowed if b in prefer]
            byte = rng.choice(liked if liked and rng.random() < 0.5 else allowed)
            text += bytes([byte])
            state = json_machine.advance(grammar, state, byte)
            assert len(text) < 2000, text[:200]
        documents.append(json.loads(text.decode("utf-8")))
    return documents


@pytest.mark.parametrize("form, check", [
    ("date", datetime.date.fromisoformat),
    ("time", TypeAdapter(datetime.time).validate_python),
    ("date-time", TypeAdapter(datetime.datetime).validate_python),
    ("duration", TypeAdapter(datetime.timedelta).validate_python),
    ("uuid", uuid.UUID),
    ("ipv4", ipaddress.IPv4Address),
    ("email", lambda s: re.fullmatch(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,63}", s) or pytest.fail(s)),
    ("hostname", lambda s: all(0 < len(p) <= 63 and not p.startswith("-") for p in s.split(".")) or pytest.fail(s)),
])
def test_formats_give_strings_their_parsers_take(form, check):
    values = _random_documents({"type": "string", "format": form}, 60, prefer=b'"')
    for value in values:
        check(value)
    assert len(set(values)) > 30


def test_dates_have_their_months_days():
    grammar = compile_schema({"type": "string", "format": "date"})
    for year in (1900, 2000, 2023, 2024):
        for month in range(1, 13):
            for day in range(1, 33):
                try:
                    datetime.date(year, month, day)
                    valid = True
                except ValueError:
                    valid = False
                assert grammar_accepts(grammar, f'"{year:04d}-{month:02d}-{day:02d}"') == valid


@pytest.mark.parametrize("text, valid", [
    ("P1Y2M3DT4H5M6S", True), ("P1Y", True), ("P2M3D", True), ("PT5M6S", True), ("PT6S", True), ("P3W", True),
    ("P1D", True), ("P1Y2D", False), ("PT1H2S", False), ("P1WT1H", False), ("P1W2D", False), ("P", False),
    ("PT", False), ("P1DT", False), ("P1H", False),
])
def test_durations_follow_rfc_3339s_grammar(text, valid):
    """Appendix A: each part is followed only by the next smaller one, and weeks stand alone; P1Y2D,
    PT1H2S and P1WT1H were taken (41 of 150 random durations broke a strict validator)."""
    assert grammar_accepts(compile_schema({"type": "string", "format": "duration"}), f'"{text}"') == valid


def test_an_unknown_format_is_an_annotation():
    assert grammar_accepts(compile_schema({"type": "string", "format": "color"}), '"anything"')
    assert grammar_accepts(compile_schema({"type": "integer", "format": "date"}), "12")


@pytest.mark.parametrize("schema", [
    {"type": "string", "minLength": 2, "maxLength": 5},
    {"type": "string", "minLength": 3},
    {"type": "string", "maxLength": 1},
    {"type": "string", "pattern": "^[a-zé🎉]+$", "maxLength": 4},
    {"type": "string", "pattern": "(ab|abcdef)", "minLength": 5, "maxLength": 7},
])
def test_lengths_count_characters_and_never_lead_to_a_dead_end(schema):
    """Characters, not bytes: é, 🎉 and an escape (\\n) count one each."""
    pattern = re.compile(schema.get("pattern", ""))
    values = _random_documents(schema, 150, prefer=b'"\\n\xc3\xa9\xf0\x9f\x8e\x89ab')
    for value in values:
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10**9), value
        assert pattern.search(value), value
    assert any(len(v.encode()) > len(v) for v in values) or "pattern" in schema


@pytest.mark.parametrize("schema, text, whole", [
    ({"type": "string", "maxLength": 2}, r'"\n\""', True),
    ({"type": "string", "maxLength": 2}, r'"\n\"x"', False),
    ({"type": "string", "minLength": 2}, '"🎉"', False),
    ({"type": "string", "pattern": "^[a-z]+$"}, '"é"', False),
    ({"type": "string", "pattern": '^"a"$'}, r'"\"a\""', True),
    ({"type": "string", "pattern": "^a$"}, r'"\u0061"', False),  # \u escapes are not taken in held strings
])
def test_held_strings_read_characters_whole(schema, text, whole):
    assert grammar_accepts(compile_schema(schema), text) == whole


def test_a_character_that_no_continuation_can_complete_is_refused_at_its_first_byte():
    """Else a token that ends inside it (byte fallback) would leave the row nothing to take."""
    grammar = compile_schema({"type": "string", "pattern": "^[a-z]+$"})
    state = json_machine.advance(grammar, json_machine.start(grammar), ord('"'))
    assert json_machine.advance(grammar, state, 0xC3) is None
    grammar = compile_schema({"type": "string", "pattern": "^é$"})
    state = json_machine.advance(grammar, json_machine.start(grammar), ord('"'))
    assert json_machine.advance(grammar, state, 0xC3) is not None and json_machine.advance(grammar, state, 0xC4) is None


@pytest.mark.parametrize("schema", [
    {"type": "integer", "minimum": 1, "maximum": 5},
    {"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 120},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "number", "exclusiveMinimum": 0.5, "maximum": 2.25},
    {"type": "number", "minimum": -1e-3},
    {"type": "integer", "multipleOf": 5, "minimum": -20, "maximum": 40},
    {"type": "number", "multipleOf": 0.25, "exclusiveMinimum": 0, "maximum": 3},
    {"type": "number", "multipleOf": 0.05},
    {"type": "integer", "multipleOf": 7},
])
def test_bounded_numbers_stay_within_their_bounds(schema):
    values = _random_documents(schema, 200, prefer=b"0123456789")
    low, high = schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum", schema.get("exclusiveMaximum"))
    for value in values:
        number = Decimal(str(value))
        assert low is None or (number > Decimal(str(low)) if "exclusiveMinimum" in schema else number >= Decimal(str(low)))
        assert high is None or (number < Decimal(str(high)) if "exclusiveMaximum" in schema else number <= Decimal(str(high)))
        assert schema["type"] == "number" or isinstance(value, int)
        assert "multipleOf" not in schema or number % Decimal(str(schema["multipleOf"])) == 0, value
    assert len(set(values)) >= 5


def test_a_bounded_number_has_no_exponent_and_an_unbounded_one_does():
    assert not grammar_accepts(compile_schema({"type": "number", "maximum": 10}), "1e1")
    assert grammar_accepts(compile_schema({"type": "number"}), "1e1")


@pytest.mark.parametrize("schema, words", [
    ({"type": "integer", "minimum": 5, "maximum": 3}, "minimum and maximum"),
    ({"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2}, "minimum and maximum"),
    ({"type": "integer", "minimum": "1"}, "minimum"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "minLength"),
    ({"type": "string", "pattern": "^abc$", "maxLength": 2}, "length bounds"),
    ({"type": "string", "pattern": "a", "format": "date"}, "pattern beside format"),
    ({"enum": ["a", "b"], "pattern": "^c$"}, "no enum or const value satisfies"),
    ({"anyOf": [{"type": "string", "maxLength": 2}, {"type": "string", "pattern": "a"}]}, "constrained string"),
    ({"anyOf": [{"type": "integer", "minimum": 2}, {"type": "number", "maximum": 1}]}, "bounded number"),
    ({"type": "integer", "minimum": 1, "maximum": 4, "multipleOf": 5}, "multiple of its multipleOf"),
    ({"type": "number", "multipleOf": 0}, "above 0"),
])
def test_string_and_number_keywords_that_cannot_hold_are_refused_by_name(schema, words):
    with pytest.raises(InvalidParamError) as caught:
        compile_schema(schema)
    assert words in str(caught.value) and caught.value.param == "response_format"


def test_enum_values_keep_to_the_string_and_number_keywords_beside_them():
    grammar = compile_schema({"enum": ["ab", "abc", 3, 30], "maxLength": 2, "maximum": 10})
    assert [grammar_accepts(grammar, t) for t in ('"ab"', '"abc"', "3", "30")] == [True, False, True, False]


def test_a_union_with_an_unconstrained_branch_takes_what_either_does():
    grammar = compile_schema({"anyOf": [{"type": "string", "maxLength": 1}, {"type": "string"}]})
    assert grammar_accepts(grammar, '"long"')
    grammar = compile_schema({"anyOf": [{"type": "integer", "maximum": 1}, {"type": "number"}]})
    assert grammar_accepts(grammar, "2.5")
    grammar = compile_schema({"anyOf": [{"type": "integer", "maximum": 1}, {"type": "null"}]})
    assert grammar_accepts(grammar, "null") and grammar_accepts(grammar, "1") and not grammar_accepts(grammar, "2")


def _states_along(grammar, text: str) -> list[tuple]:
    state, states = json_machine.start(grammar), []
    for byte in text.encode():
        states.append(state)
        state = json_machine.advance(grammar, state, byte)
        assert state is not None, text
    return states + [state]


def test_masks_in_held_strings_and_numbers_are_every_token_the_state_accepts(engine):
    """The walk and the length shortcut (plain tokens by their number of characters) against a
    brute force over the whole vocabulary, at states inside held strings and numbers."""
    import torch

    vocabulary = engine.structured.vocabulary
    schema = {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]+$"}, "name": {"type": "string", "maxLength": 6},
        "when": {"type": "string", "format": "date"}, "score": {"type": "integer", "minimum": 10, "maximum": 250},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}, "required": ["code", "name", "when"]}
    text = '{"code": "AB12", "name": "Jo \\n é", "when": "2024-02-29", "score": 125, "ratio": 0.25}'
    grammar = compile_schema(schema)
    states = _states_along(grammar, text)
    picked = [states[i] for i in range(len(states)) if text[max(0, i - 1):i + 1].strip('{}":, ')][::3]
    assert len(picked) > 8
    for state in picked:
        expected = brute_force_mask(engine, grammar, state)
        mask = vocabulary.mask(grammar, state)
        assert torch.equal(mask, expected), (state, [engine.tokenizer.token_text(t) for t in (mask ^ expected).nonzero()[:5, 0]])
        assert mask.any()


class Booking(BaseModel):
    code: str = Field(pattern=r"^[A-Z]{3}$")
    guest: str = Field(min_length=2, max_length=12)
    when: datetime.datetime
    reference: uuid.UUID
    nights: int = Field(ge=1, le=14)
    rating: float = Field(gt=0, le=5)


def _parsed(client, answer_type, request: str, max_tokens: int):
    """The SDK's `parse` of the greedy answer (pydantic validates it), which ended by itself."""
    r = client.chat.completions.parse(model=MODEL, response_format=answer_type, temperature=0, max_tokens=max_tokens,
                                      messages=[{"role": "user", "content": request}])
    assert isinstance(r.choices[0].message.parsed, answer_type) and r.choices[0].finish_reason == "stop"
    return r.choices[0].message.parsed


def test_the_openai_sdks_parse_takes_patterns_formats_lengths_and_bounds(client):
    """pydantic's own validation of the answer: every field's keyword held."""
    booking = _parsed(client, Booking, "Book a room for Ann for three nights from 5 May 2025. JSON.", 200)
    assert 1 <= booking.nights <= 14 and 2 <= len(booking.guest) <= 12


class Search(BaseModel):
    query: str = Field(max_length=40, pattern=r"^[a-z ]+$")
    limit: int = Field(ge=1, le=50)


def test_a_forced_call_holds_its_arguments_to_their_patterns_and_bounds(client):
    tool = {"type": "function", "function": {"name": "search", "parameters": Search.model_json_schema()}}
    r = client.chat.completions.create(model=MODEL, tools=[tool], tool_choice="required", temperature=0,
                                       max_tokens=80, messages=[{"role": "user", "content": "Find hotels in Paris."}])
    Search.model_validate_json(r.choices[0].message.tool_calls[0].function.arguments)


def test_a_non_strict_tool_reads_a_pattern_it_cannot_hold_as_an_annotation(client):
    parameters = {"type": "object", "properties": {"q": {"type": "string", "pattern": "^(?!x)"}}, "required": ["q"]}
    tool = {"type": "function", "function": {"name": "search", "parameters": parameters}}
    r = client.chat.completions.create(model=MODEL, tools=[tool], tool_choice="required", temperature=0,
                                       max_tokens=40, messages=[{"role": "user", "content": "Find hotels."}])
    assert r.choices[0].message.tool_calls[0].function.name == "search"
    with pytest.raises(Exception, match="lookaround"):
        client.chat.completions.create(model=MODEL, tools=[{"type": "function", "function": {
            "name": "search", "strict": True, "parameters": parameters}}], tool_choice="required",
            max_tokens=4, messages=[{"role": "user", "content": "Find hotels."}])


@pytest.mark.parametrize("source", [r"^\x01$", r"^\v$", r"^\0$", r"^a\x0bb$"])
def test_a_pattern_that_needs_a_character_no_held_string_writes_is_refused(source):
    """Control characters other than \\b \\t \\n \\f \\r have no short escape: no string could be
    written (the row would have had nothing to take)."""
    with pytest.raises(InvalidParamError, match="no string satisfies"):
        compile_schema({"type": "string", "pattern": source})


@pytest.mark.parametrize("source, text", [
    (r"^\D$", "١"), (r"^\W$", "é"), (r"^[^\d]$", "١"), (r"^[^\w]$", "é"), (r"^\S$", "\x85"), (r"^\s$", "\ufeff"),
])
def test_classes_take_only_what_every_client_dialect_takes(source, text):
    """ECMA-262 would take these; Python's `re` and pydantic's Rust regex do not."""
    assert not re.search(source.replace("$", r"\Z"), text)
    assert not _full(Pattern(source), text)


def test_negated_classes_of_negated_escapes_keep_to_ascii():
    assert _full(Pattern(r"^[^\D]$"), "7") and not _full(Pattern(r"^[^\D]$"), "١")


@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "pattern": "^[a-z]+$", "minLength": 5000}, "at most 1024"),
    ({"type": "string", "pattern": "^[ab]*a[ab]{14}$", "maxLength": 64}, "too large"),
    ({"type": "string", "pattern": r"^\x4"}, "malformed"),
    ({"type": "string", "pattern": r"^\u{41}$"}, "malformed"),
    ({"type": "integer", "minimum": 10**400}, "minimum and maximum"),
    ({"type": "string", "format": "date", "maxLength": 5}, "format 'date'"),
    ({"anyOf": [{"type": "string"}, {"type": "null"}], "format": "date"}, "beside no other constraints"),
    ({"anyOf": [{"type": "integer", "minimum": 0}, {"const": -1}]}, "number constant outside"),
    ({"anyOf": [{"type": "string", "maxLength": 3}, {"const": "unknown"}]}, "string constants"),
])
def test_more_schemas_refused_by_name(schema, words):
    with pytest.raises(InvalidParamError) as caught:
        compile_schema(schema)
    assert words in str(caught.value), caught.value


def test_a_free_string_takes_any_length_bound():
    """No pattern: the bounds are a count, not an automaton's table (1e9 once searched for minutes)."""
    grammar = compile_schema({"type": "string", "minLength": 10**9, "maxLength": 10**9 + 5})
    assert not grammar_accepts(grammar, '"ab"')


def test_exclusive_bounds_hold_as_clients_read_numbers():
    """Clients parse numbers as doubles: 0.99999999999999999999 reads as 1.0, which `< 1` refuses."""
    grammar = compile_schema({"type": "number", "exclusiveMaximum": 1, "exclusiveMinimum": 0.1})
    assert not grammar_accepts(grammar, "0.99999999999999999999")
    assert not grammar_accepts(grammar, "0.10000000000000000001")
    assert grammar_accepts(grammar, "0.5")
    for value in _random_documents({"type": "number", "exclusiveMaximum": 1, "exclusiveMinimum": 0.1}, 100,
                                   prefer=b"9"):
        assert 0.1 < float(value) < 1


def test_max_length_zero_is_a_length():
    with pytest.raises(InvalidParamError, match="no enum or const value"):
        compile_schema({"type": "string", "enum": ["abc"], "maxLength": 0})


def test_a_union_of_a_format_and_constants_takes_both():
    """pydantic's `Union[date, Literal["unknown"]]`."""
    grammar = compile_schema({"anyOf": [{"type": "string", "format": "date"}, {"enum": ["unknown", "n/a"]}]})
    assert [grammar_accepts(grammar, t) for t in ('"2024-01-31"', '"unknown"', '"n/a"', '"other"')] == \
        [True, True, True, False]


def test_bounds_without_a_type_hold_every_number():
    grammar = compile_schema({"minimum": 0, "maximum": 2})
    assert [grammar_accepts(grammar, t) for t in ("1.5", "2", "3", '"x"')] == [True, True, False, True]


@pytest.mark.parametrize("parameter", [
    {"anyOf": [{"type": "string"}, {"type": "null"}], "maxLength": 10},
    {"$ref": "#/$defs/S", "minLength": 1},
    {"type": "string", "format": 5},
    {"type": "string", "format": "date", "enum": ["today"]},
    {"type": "string", "pattern": "(?=x)"},
])
def test_a_non_strict_tools_keywords_that_do_not_compile_are_dropped(parameter):
    from server.tool_calls import calls_schema

    tool = {"name": "f", "parameters": {"type": "object", "properties": {"a": parameter}, "required": ["a"],
                                        "$defs": {"S": {"type": "string"}}}}
    compile_schema(calls_schema([tool], parallel=False))
    with pytest.raises(InvalidParamError):
        compile_schema(calls_schema([{**tool, "strict": True}], parallel=False))


@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "pattern": "^[]$", "minLength": 1}, "no string satisfies"),
    ({"type": "string", "pattern": "^\\x01$", "maxLength": 3}, "no string satisfies"),
    ({"type": "string", "pattern": "a{" + "9" * 5000 + "}"}, "above 1000"),
    ({"type": "string", "pattern": "a.{800}$"}, "too large"),
])
def test_patterns_too_large_or_unwritable_are_refused_by_name(schema, words):
    with pytest.raises(InvalidParamError, match=words):
        compile_schema(schema)


def test_a_union_of_formats_takes_each():
    """pydantic's `Union[datetime, date]`: the patterns' alternatives."""
    grammar = compile_schema({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "string", "format": "date"}]})
    assert [grammar_accepts(grammar, t) for t in ('"2024-01-31"', '"2024-01-31T10:00:00Z"', '"x"')] == [True, True, False]


@pytest.mark.parametrize("schema", [{"exclusiveMinimum": 0}, {"type": ["integer", "number"], "exclusiveMaximum": 10}])
def test_exclusive_bounds_without_one_type_compile(schema):
    grammar = compile_schema(schema)
    assert grammar_accepts(grammar, "5") and not grammar_accepts(grammar, "-1" if "exclusiveMinimum" in schema else "10")


@pytest.mark.parametrize("parameter", [
    {"anyOf": [{"type": "string", "pattern": "^a", "maxLength": 3}, {"type": "string", "format": "date"}]},
    {"anyOf": [{"type": "number", "minimum": 0}, {"type": "integer", "maximum": 10}]},
    {"anyOf": [{"type": "string", "minLength": 2}, {"enum": ["x"]}]},
    {"anyOf": [{"type": "number", "maximum": 5}, {"const": 7}]},
])
def test_a_non_strict_tools_unions_of_held_values_give_way(parameter):
    """Each branch compiles alone, but their union does not: a non-strict tool's union takes the
    values plainly (as before these keywords held)."""
    from server.tool_calls import calls_schema

    tool = {"name": "f", "parameters": {"type": "object", "properties": {"a": parameter}, "required": ["a"]}}
    compile_schema(calls_schema([tool], parallel=False))
    with pytest.raises(InvalidParamError):
        compile_schema(calls_schema([{**tool, "strict": True}], parallel=False))


@pytest.mark.parametrize("source", [r"\W{1000}", r"(\W\D){30}", r"^\W{998}$"])
def test_patterns_too_costly_to_build_are_refused_at_once(source):
    """States of large classes (\\W has about 800 ranges) are refused by the work budget (these
    took 10 s and more before it)."""
    with pytest.raises(InvalidParamError, match="too costly"):
        compile_schema({"type": "string", "pattern": source})


def test_a_schemas_patterns_share_one_work_budget():
    """Each of these compiles alone; a schema of all of them is refused as one costly pattern is
    (each pattern had a budget of its own: a schema could hold thousands of costly ones)."""
    sources = [rf"^\W{{{n}}}$" for n in range(100, 104)]
    for source in sources:
        compile_schema({"type": "string", "pattern": source})
    properties = {f"p{i}": {"type": "string", "pattern": source} for i, source in enumerate(sources)}
    with pytest.raises(InvalidParamError, match="too costly"):
        compile_schema({"type": "object", "properties": properties, "required": list(properties)})


def _lengths_one_by_one(pattern: Pattern) -> list[int]:
    """`_remaining_lengths` as it was written before it stopped at a repeating layer: every
    length's layer of states computed."""
    states = range(len(pattern._sets))
    before = {s: set() for s in states}
    for state in states:
        for _, _, target in pattern.successors(state):
            before[target].add(state)
    cap = pattern.max_length if pattern.max_length is not None else pattern.min_length
    bits = [0] * len(states)
    layer = {s for s in states if pattern.accepting(s)}
    for k in range(cap + (pattern.max_length is not None)):
        for state in layer:
            bits[state] |= 1 << k
        layer = {s for t in layer for s in before[t]}
    if pattern.max_length is None:
        layer = set(states)
        for _ in range(cap):
            layer = {s for t in layer for s in before[t]}
        for state in layer:
            bits[state] |= 1 << cap
    return bits


@pytest.mark.parametrize("source", ["^(ab|cde)*$", "^.*(x.x|yy)$", "(a{7}|b{11}|c{13})+", "^[0-9]{2,5}(-[a-z]{3})*$",
                                    "x", "^(?:a|bc){3,}$"])
@pytest.mark.parametrize("low, high", [(0, 40), (5, None), (37, None), (200, 1000), (1000, None), (9, 9)])
def test_length_bounds_read_from_repeating_layers_are_the_same(source, low, high):
    """The states that reach the end in k characters repeat once a layer repeats: the bits are
    taken from the period, not computed for every length up to 1,024 (one pattern with a
    minLength near that took seconds), and equal those computed one by one."""
    pattern = Pattern(source, low, high)
    assert pattern._lengths == _lengths_one_by_one(pattern)


def test_a_pattern_of_literal_braces_is_read_as_literals_and_a_long_one_is_refused():
    """A `{` that begins no quantifier is a literal (ECMA-262); finding out no longer looks for a
    `}` further on (quadratic in a pattern of braces: a 4 MB pattern took minutes)."""
    assert _full(Pattern("a{,3}{x}{", whole=True), "a{,3}{x}{")
    assert _full(Pattern("a{2}b{1,}c{0,2}", whole=True), "aabbb")
    with pytest.raises(InvalidParamError, match="too long"):
        compile_schema({"type": "string", "pattern": "{" * 70_000})


def test_a_long_counted_repetition_compiles():
    assert grammar_accepts(compile_schema({"type": "string", "pattern": "^.{1,1000}$"}), '"' + "a" * 1000 + '"')


def test_a_non_strict_tools_union_whose_pattern_does_not_compile_gives_way():
    from server.tool_calls import calls_schema

    parameter = {"anyOf": [{"type": "string", "pattern": "a.{12}"}, {"type": "string", "pattern": "b.{12}"}]}
    tool = {"name": "f", "parameters": {"type": "object", "properties": {"a": parameter}, "required": ["a"]}}
    compile_schema(calls_schema([tool], parallel=False))
    with pytest.raises(InvalidParamError, match="too large"):
        compile_schema(calls_schema([{**tool, "strict": True}], parallel=False))


def test_a_clients_own_loose_marker_is_an_annotation():
    with pytest.raises(InvalidParamError, match="lookaround"):
        compile_schema({"type": "string", "pattern": "(?=a)", "x-skipserve-loose": True})


@pytest.mark.parametrize("schema", [{"anyOf": [{"const": "\ud800"}, {"type": "null"}]},
                                    {"type": "object", "properties": {"\ud800": {}}}])
def test_a_lone_surrogate_in_a_schema_is_a_400(schema):
    with pytest.raises(InvalidParamError, match="lone surrogate"):
        compile_schema(schema)


def test_a_loose_schema_and_a_clients_look_alike_have_their_own_grammars():
    from engine.structured.schema import LOOSE, LOOSE_MARK, schema_key

    loose = {"type": "string", "pattern": "(?=x)", LOOSE: LOOSE_MARK}
    client = {**loose, LOOSE: ["non-strict tool"]}  # what the mark's JSON once was
    assert schema_key(client) != schema_key(loose)
    compile_schema(loose)
    with pytest.raises(InvalidParamError, match="lookaround"):
        compile_schema(client)


class Route(BaseModel):
    start: tuple[float, float]
    stops: tuple[str, ...]
    leg: tuple[int, str, bool]


def _tuple_reference(schema: dict, doc) -> bool:
    """Whether `doc` (a list) is what a `prefixItems` array schema of scalar kinds takes."""
    kinds = {"integer": lambda v: type(v) is int, "number": lambda v: type(v) in (int, float),
             "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool)}
    prefix, items = schema.get("prefixItems", []), schema.get("items", True)
    if not schema.get("minItems", 0) <= len(doc) <= schema.get("maxItems", len(doc)):
        return False
    for i, value in enumerate(doc):
        sub = prefix[i] if i < len(prefix) else items
        if sub is False or (sub is not True and not kinds[sub["type"]](value)):
            return False
    return True


@pytest.mark.parametrize("schema", [
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 2, "maxItems": 2},
    {"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "number"}]},  # shorter ones, any items after
    {"type": "array", "prefixItems": [{"type": "string"}], "items": {"type": "integer"}, "minItems": 3},
    {"prefixItems": [{"type": "integer"}, {"type": "integer"}, {"type": "string"}], "items": False, "minItems": 1},
    {"type": "array", "prefixItems": [], "items": False},
])
def test_tuples_hold_each_position_to_its_schema(schema):
    """prefixItems: random walks through the machine give only arrays the schema takes (never a
    dead end), and lists built position by position are taken exactly when the schema takes them."""
    for doc in _random_documents(schema, 150, prefer=b"[],1\"tf"):
        assert _tuple_reference(schema, doc), doc
    grammar, rng = compile_schema(schema), random.Random(1)
    values = [0, -3, 2.5, "a", True, False]
    for _ in range(400):
        doc = [rng.choice(values) for _ in range(rng.randint(0, 5))]
        assert grammar_accepts(grammar, json.dumps(doc)) == _tuple_reference(schema, doc), doc


def test_a_tuple_inside_a_union_and_as_a_recursive_item():
    schema = {"$defs": {"Pair": {"type": "array", "prefixItems": [{"type": "string"}, {"$ref": "#/$defs/Tree"}],
                                 "items": False},
                        "Tree": {"anyOf": [{"type": "integer"}, {"$ref": "#/$defs/Pair"}]}},
              "$ref": "#/$defs/Tree"}
    grammar = compile_schema(schema)
    for text, ok in (('["a", ["b", 2]]', True), ("7", True), ('["a", 1, 2]', False), ('[1, "a"]', False),
                     ('["a"]', True)):  # no minItems: a shorter tuple is valid JSON Schema
        assert grammar_accepts(grammar, text) == ok, text


def test_a_tuple_position_that_cannot_be_completed_is_never_begun():
    """A `,` toward a position whose value has no finite end (or none within the depth) would leave
    a row no byte to write: it is refused, and the array may close instead."""
    endless = {"type": "object", "properties": {"x": {"$ref": "#/$defs/Endless"}}, "required": ["x"]}
    grammar = compile_schema({"$defs": {"Endless": endless}, "type": "array",
                              "prefixItems": [{"type": "integer"}, {"$ref": "#/$defs/Endless"}]})
    state = _states_along(grammar, "[1")[-1]
    assert json_machine.advance(grammar, state, ord(",")) is None
    assert json_machine.advance(grammar, state, ord("]")) == ()  # the whole document
    # a tuple whose second position is the tuple itself: "[1,[1,..." until the depth is spent, where a
    # "," would begin an item that could not close; there it is refused and "]" is taken
    nested = compile_schema({"type": "array", "prefixItems": [{"type": "integer"}, {"$ref": "#"}], "items": False,
                             "minItems": 1})
    state, depth = json_machine.start(nested), 0
    while True:
        for byte in b"[1":
            state = json_machine.advance(nested, state, byte)
        after = json_machine.advance(nested, state, ord(","))
        if after is None:
            break
        state, depth = after, depth + 1
    assert depth > 60 and json_machine.advance(nested, state, ord("]")) is not None


def test_the_openai_sdks_parse_takes_tuples(client):
    route = _parsed(client, Route, "Route: start at 1.0, 2.0; stops Lyon, Nice; leg 3, 'car', true. JSON.", 150)
    assert len(route.start) == 2 and len(route.leg) == 3


def _nested(levels: int, kind: str) -> tuple[dict, str]:
    schema, document = {"type": "integer"}, "1"
    for _ in range(levels):
        if kind == "object":
            schema, document = {"type": "object", "properties": {"a": schema}, "required": ["a"]}, f'{{"a":{document}}}'
        else:
            schema, document = {"type": "array", "items": schema, "minItems": 1}, f"[{document}]"
    return schema, document


@pytest.mark.parametrize("kind", ["object", "array"])
def test_a_schema_nested_deeper_than_answers_may_is_refused_at_once(kind):
    """128 required levels compiled, but the machine opens no value it cannot close within its depth:
    no answer could begin (after 20 spaces of indent the row failed, blaming the model's logits)."""
    schema, document = _nested(json_machine.MAX_DEPTH - 1, kind)
    assert grammar_accepts(compile_schema(schema), document)
    with pytest.raises(InvalidParamError, match="nests objects and arrays deeper than answers may"):
        compile_schema(_nested(json_machine.MAX_DEPTH, kind)[0])


def test_a_reference_inside_a_subschema_with_its_own_id_is_refused():
    """A bundled resource's $ref resolves against its $id: `#/$defs/x` inside it named the root's x
    (a string) where the resource's own x (an integer) was meant: {"v": "s"} passed, {"v": 1} did not."""
    inner = {"$id": "https://example.com/inner", "$defs": {"x": {"type": "integer"}}, "type": "object",
             "properties": {"v": {"$ref": "#/$defs/x"}}, "required": ["v"]}
    with pytest.raises(InvalidParamError, match=r"inside a subschema with its own \$id"):
        compile_schema({"$defs": {"inner": inner, "x": {"type": "string"}}, "$ref": "#/$defs/inner"})
    plain = {"$id": "https://example.com/point", "type": "object", "properties": {"v": {"type": "integer"}}}
    assert grammar_accepts(compile_schema({"type": "object", "properties": {"p": plain}}), '{"p":{"v":1}}')


def test_a_number_with_no_fraction_is_an_integer_in_an_enum_or_const():
    """JSON Schema's `integer` is any number whose fraction is zero: `2.0` and `1e2` beside
    `type: integer` are values it takes (they were left out, or the schema refused as empty)."""
    grammar = compile_schema({"type": "integer", "enum": [7.0, 9, 1.5, "3", 1e2]})
    assert [t for t in ("7.0", "9", "100.0", "1.5", '"3"') if grammar_accepts(grammar, t)] == ["7.0", "9", "100.0"]
    assert grammar_accepts(compile_schema({"type": "integer", "const": 2.0}), "2.0")


def test_a_reference_is_a_uri_fragment_of_json_pointer_steps():
    """Percent-escapes decoded (RFC 6901's URI form: `#/$defs/e%20f`, `#/%24defs/x`), and an array's
    item as a step (`#/prefixItems/0`)."""
    defs = {"e f": {"const": "spaced"}, "x": {"const": "escaped"}}
    assert grammar_accepts(compile_schema({"$defs": defs, "$ref": "#/$defs/e%20f"}), '"spaced"')
    assert grammar_accepts(compile_schema({"$defs": defs, "$ref": "#/%24defs/x"}), '"escaped"')
    pair = {"type": "array", "prefixItems": [{"const": 1}, {"$ref": "#/prefixItems/0"}], "items": False}
    assert grammar_accepts(compile_schema(pair), "[1,1]") and not grammar_accepts(compile_schema(pair), "[1,2]")
    for missing in ("#/prefixItems/2", "#/prefixItems/01", "#/$defs/e%2"):
        with pytest.raises(InvalidParamError, match="points to nothing"):
            compile_schema({**pair, "prefixItems": [{"const": 1}, {"$ref": missing}]} if "prefix" in missing else
                           {"$defs": defs, "$ref": missing})
