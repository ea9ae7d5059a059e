"""vLLM's `structured_outputs` (regex, choice, json, json_object) and its older `guided_*` fields:
the whole answer held to a regular expression or a list of strings (engine/structured/whole_text.py,
the machine's RAW frame) against Python's `re` by random walks, each token mask against a brute force
over the vocabulary, and the real model's answers through the `openai` SDK's `extra_body`."""
from __future__ import annotations

import json
import random
import re

import httpx
import pytest
import torch

from engine.sampling_params import InvalidParamError
from engine.structured import json_machine
from engine.structured.whole_text import compile_choices, compile_regex
from tests.conftest import cuda_available
from tests.helpers import brute_force_mask, grammar_accepts

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Is this review positive or negative? 'I loved every minute of it.'"}]


@pytest.mark.parametrize("regex, prefer", [
    (r"\d{3}-\d{4}", "-0"), (r"^(yes|no)$", "yesno"), (r"[A-Z][a-z]+( [A-Z][a-z]+)*", "Ab "), (r'"[^"]*"', '"'),
    (r"a\\b\$", "ab\\$"), (r"(\w+\n){1,3}", "a\n"), (r"-?\d+(\.\d+)?", "-.1"), (r"é+|[ab]?", "aé"),
    (r".{0,4}", "x"),
])
def test_random_answers_of_a_regex_match_it_whole_and_never_dead_end(regex, prefer):
    """Walks of random bytes the machine allows: each state allows a byte or may end (by EOS), and
    every answer it may end with matches the regex whole (Python's re.fullmatch)."""
    grammar, rng = compile_regex(regex, "regex"), random.Random(0)
    expected = re.compile(regex.removeprefix("^").removesuffix("$") if regex.endswith("$") and not regex.endswith(
        "\\$") else regex.removeprefix("^"))
    for _ in range(200):
        state, text = json_machine.start(grammar), b""
        while state != ():
            allowed = [b for b in range(256) if json_machine.advance(grammar, state, b) is not None]
            ends = json_machine.can_end(state, grammar)
            assert allowed or ends, text
            if ends and (not allowed or rng.random() < 0.3):
                break
            liked = [b for b in allowed if bytes([b]) in prefer.encode()]  # else an end would rarely come
            text += bytes([rng.choice(liked if liked and rng.random() < 0.5 else allowed)])
            state = json_machine.advance(grammar, state, text[-1])
            assert len(text) < 400
        assert expected.fullmatch(text.decode("utf-8")), (regex, text)


def test_a_regex_is_matched_whole_with_or_without_its_own_anchors():
    for regex, text, ok in ((r"\d+", "12", True), (r"\d+", "12a", False), (r"^\d+$", "12", True),
                            (r"a|b", "a", True), (r"^a|b$", "b", True), (r"a\$", "a$", True), (r"a\$", "a", False),
                            ("x*", "", True), ("^a|^b", "b", True), ("^a$|^b$", "ab", False), ("", "", True),
                            ("", "x", False)):
        assert grammar_accepts(compile_regex(regex, "regex"), text) == ok, (regex, text)


def test_choices_are_exactly_the_strings_given():
    choices = ["yes", "yes please", 'a "quoted" \\ one', "naïve", "(a|b)*", "", "line\nbreak\x01"]
    grammar = compile_choices(tuple(choices), "choice")
    for text in choices:
        assert grammar_accepts(grammar, text), text
    for text in ("ye", "yes pleas", "no", "a", "(a|b)", "yes please!"):
        assert not grammar_accepts(grammar, text), text
    # once a choice that no other one extends is written, the answer is whole: nothing may follow
    state = json_machine.start(grammar)
    for byte in "naïve".encode():
        state = json_machine.advance(grammar, state, byte)
    assert state == ()


@pytest.mark.parametrize("compile, param, words", [
    (lambda p: compile_regex("(?=a)b", p), "structured_outputs.regex", "lookaround"),
    (lambda p: compile_regex("a^b", p), "guided_regex", "^ and $"),
    (lambda p: compile_regex("ab(?P<x>c)", p), "guided_regex", "offset 5"),  # the client's own offsets
    (lambda p: compile_choices((), p), "guided_choice", "at least one"),
    (lambda p: compile_choices(("\ud800",), p), "guided_choice", "surrogate"),
])
def test_patterns_that_cannot_be_held_are_400s_naming_their_field(compile, param, words):
    with pytest.raises(InvalidParamError) as exc:
        compile(param)
    assert exc.value.param == param and words in str(exc.value), str(exc.value)


def test_a_thousand_choices_compile_and_read_as_an_enum_does():
    rng = random.Random(0)
    choices = tuple(dict.fromkeys("".join(rng.choice("abcdefgh") for _ in range(8)) for _ in range(1000)))
    grammar = compile_choices(choices, "choice")
    assert all(grammar_accepts(grammar, c) for c in choices[::50])
    assert not grammar_accepts(grammar, choices[0][:5]) and not grammar_accepts(grammar, choices[0] + "a")


def test_masks_of_raw_text_are_every_token_the_state_accepts(engine):
    """The class-sequence masks of plain tokens, and the walk of the others (quotes, backslashes,
    newlines are the answer's own characters here), against a brute force over the vocabulary."""
    vocabulary = engine.structured.vocabulary
    grammar = compile_regex(r'[A-Za-z ]{1,12}: "\d+"(\n[a-z]+\\)?', "regex")
    text = 'Total items: "42"\nend\\'
    state, states = json_machine.start(grammar), []
    for byte in text.encode():
        states.append(state)
        state = json_machine.advance(grammar, state, byte)
    for state in states[::2] + [state]:
        expected = brute_force_mask(engine, grammar, state)
        assert torch.equal(vocabulary.mask(grammar, state), expected), state
        assert expected.any()


def test_a_choice_through_the_sdk(client):
    choices = ["positive", "negative"]
    for extra in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
        r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, temperature=0, extra_body=extra)
        assert r.choices[0].message.content in choices and r.choices[0].finish_reason == "stop", r


def test_a_regex_on_completions_streams_what_it_answers_whole(client):
    regex = r"\d{1,2}:\d{2} (am|pm)"
    kwargs = dict(model=MODEL, prompt="The meeting starts at", max_tokens=20, temperature=0,
                  extra_body={"guided_regex": regex})
    whole = client.completions.create(**kwargs).choices[0]
    assert re.fullmatch(regex, whole.text) and whole.finish_reason == "stop", whole
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    assert streamed == whole.text


def test_a_gbnf_grammar_holds_the_answer_in_each_field_that_takes_one(client):
    """llama.cpp's `grammar`, vLLM's `structured_outputs.grammar` and `guided_grammar`: the answer is
    one the grammar derives (rules inlined, a class, a bounded repetition), streamed as it is whole."""
    grammar = 'root ::= verdict " (" score "/10)"\nverdict ::= "good" | "bad" # two words\nscore ::= [1-9] | "10"'
    derived = re.compile(r"(good|bad) \(([1-9]|10)/10\)")
    for extra in ({"grammar": grammar}, {"structured_outputs": {"grammar": grammar}}, {"guided_grammar": grammar}):
        r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=20, temperature=0, extra_body=extra)
        assert derived.fullmatch(r.choices[0].message.content) and r.choices[0].finish_reason == "stop", r
    kwargs = dict(model=MODEL, prompt="The review says the film is", max_tokens=20, temperature=0,
                  extra_body={"grammar": grammar})
    whole = client.completions.create(**kwargs).choices[0].text
    assert derived.fullmatch(whole)
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices) == whole


def test_guided_json_holds_the_answer_as_response_format_does(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    for extra in ({"structured_outputs": {"json": schema}}, {"guided_json": json.dumps(schema)}, {"json_schema": schema}):
        r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=0, extra_body=extra)
        assert json.loads(r.choices[0].message.content) in ({"answer": "yes"}, {"answer": "no"}), r
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=0,
                                       extra_body={"structured_outputs": {"json_object": True}})
    choice = r.choices[0]  # any object, which this model may not close within 40 tokens
    assert choice.message.content.startswith("{") and (choice.finish_reason == "length" or
                                                       isinstance(json.loads(choice.message.content), dict))


def test_the_schema_true_is_taken_as_a_value_as_it_is_as_text(server):
    """`true` (any JSON value) as a schema: its text was taken and the value itself a 400 ("Input
    should be a valid dictionary") in each field."""
    answers = []
    for extra in ({"guided_json": "true"}, {"guided_json": True}, {"structured_outputs": {"json": True}},
                  {"json_schema": True}):
        body = {"model": MODEL, "messages": ASK, "max_tokens": 8, "temperature": 0, **extra}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, (extra, r.text)
        answers.append(r.json()["choices"][0]["message"]["content"])
    if not cuda_available():  # one text four times: a cached prompt's bf16 tail may pick another near-tie on CUDA
        assert len(set(answers)) == 1, answers


@pytest.mark.parametrize("extra, param, words", [
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}},
     "structured_outputs.choice", "give one"),
    ({"structured_outputs": {"regex": "a"}, "guided_choice": ["a"]}, "guided_choice", "give one"),
    ({"structured_outputs": {"grammar": "root ::= \"(\" root \")\" | \"b\""}}, "structured_outputs.grammar",
     "refers to itself"),
    ({"guided_grammar": "answer ::= \"a\""}, "guided_grammar", "no `root`"),
    ({"grammar": "root ::= \"a\" (", "guided_regex": "a"}, "grammar", "give one"),
    ({"grammar": "root ::= [a-z", "max_tokens": 2}, "grammar", "closing bracket"),
    ({"structured_outputs": {}}, "structured_outputs", "needs one of"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex", "ends too early"),
    ({"guided_json": "{not json"}, "guided_json", "JSON schema"),
    ({"guided_json": "null"}, "guided_json", "JSON schema"),  # it would have held nothing
    ({"guided_json": "[" * 100000 + "]" * 100000}, "guided_json", "JSON schema"),  # too deep for json.loads
    ({"guided_choice": ["a"], "tools": [{"type": "function", "function": {"name": "f"}}]}, "guided_choice",
     "tool call"),
])
def test_guided_fields_that_cannot_hold_are_400s_naming_their_field(server, extra, param, words):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_a_regex_nested_too_deeply_is_a_400():
    with pytest.raises(InvalidParamError) as exc:
        compile_regex("(" * 5000 + "a" + ")" * 5000, "guided_regex")
    assert exc.value.param == "guided_regex"


def test_choices_are_counted_once_and_capped_in_all():
    assert grammar_accepts(compile_choices(("a",) * 1001, "choice"), "a")  # one distinct choice
    with pytest.raises(InvalidParamError) as exc:
        compile_choices(tuple(f"{i:04d}" + "x" * 100 for i in range(700)), "choice")  # 73 KB
    assert "KiB in all" in str(exc.value)
