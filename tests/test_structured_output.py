"""Structured outputs (`response_format` json_object / json_schema, engine/structured): the JSON
machine against Python's own JSON parser, the schema compiler's documents and refusals, each token
mask against every token's bytes run through the machine, and answers of the real model, in process
and through the server with the `openai` SDK, checked by pydantic models the SDK turns into schemas."""
from __future__ import annotations

import json
import random
import re
import threading
from typing import Annotated, Literal, Optional, Union

import httpx
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from conftest import cpu_path_only, cuda_available
from engine.sampling_params import InvalidParamError, SamplingParams
from engine.structured import json_machine
from engine.structured.constraint import Constraint
from engine.structured.schema import compile_schema
from tests.helpers import brute_force_mask, grammar_accepts

MODEL = "smollm2-135m-instruct"


class Closed(BaseModel):
    """A model that validates no keys beyond its own (what additionalProperties false promises)."""
    model_config = ConfigDict(extra="forbid")


def accepts(schema, text: str) -> bool:
    return grammar_accepts(compile_schema(schema), text)


def _laid_out(text: str) -> bool:
    """Each whitespace run outside strings is what json_machine takes: a space or tab, then at most
    one line break and an indentation."""
    outside = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    run = re.compile(r"[ \t]?(?:(?:\r\n|\n|\r)[ \t]{0,%d})?" % json_machine.MAX_INDENT)
    return all(run.fullmatch(ws) for ws in re.findall(r"[ \t\n\r]+", outside))


def test_the_machine_accepts_exactly_the_documents_json_loads_accepts():
    """Random strings over JSON's alphabet: any-value schema vs json.loads (no trailing whitespace:
    the machine ends a document at its last byte; whitespace runs as JSON writers lay them out)."""
    rng = random.Random(0)
    alphabet = list('{}[]":,0123456789-.eE+ \nturefalsn\\ué🎉\r\n')
    valid = broken = 0
    for _ in range(60000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))).rstrip()
        if not text:
            continue
        try:
            json.loads(text)
            ok = True
        except ValueError:
            ok = False
        valid += ok
        broken += ok and not _laid_out(text)
        assert accepts(True, text) == (ok and _laid_out(text)), text
    assert valid > 1000 and broken >= 5  # it saw many valid documents, some of them laid out otherwise


@pytest.mark.parametrize("data, whole", [
    (b'"\xc3\xa9"', True), (b'"\xe4\xb8\xad"', True), (b'"\xf0\x9f\x8e\x89"', True),
    (b'"\xff"', False), (b'"\x80"', False), (b'"\xc3"', False), (b'"\xc0\xaf"', False),  # stray, cut, overlong
    (b'"\xed\xa0\x80"', False), (b'"\xf4\x90\x80\x80"', False),  # a surrogate, past U+10FFFF
])
def test_strings_hold_whole_utf8_characters(data, whole):
    """As a strict decoder reads them: the answer's bytes are always text."""
    grammar = compile_schema({"type": "string"})
    state = json_machine.start(grammar)
    for byte in data:
        state = state and json_machine.advance(grammar, state, byte)
    assert (state is not None and json_machine.can_end(state)) == whole
    if whole:
        data.decode("utf-8")
    else:
        with pytest.raises(UnicodeDecodeError):
            data.decode("utf-8")


@pytest.mark.parametrize("text, whole", [
    (r'"\ud83d\ude00"', True), (r'"\uD83D\uDE00"', True), (r'"\udbff\udfff"', True), (r'"\u00e9"', True),
    (r'"\ud7ff\ue000"', True),
    (r'"\ud800"', False), (r'"\udc00"', False), (r'"\ud83d\u0041"', False), (r'"\ud83dx"', False),
    (r'"\ude00\ud83d"', False),  # a lone high or low surrogate, or a pair in the wrong order
])
def test_escaped_surrogates_come_in_pairs(text, whole):
    """A \\u escape of a lone surrogate is JSON to json.loads but no text: the client's parser
    (pydantic's, under the openai SDK's `parse`) refuses it, and re-encoding it as UTF-8 fails."""
    assert accepts({"type": "string"}, text) == whole
    if whole:
        json.loads(text).encode("utf-8")
    else:
        with pytest.raises((UnicodeEncodeError, ValueError)):
            json.loads(text).encode("utf-8")


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                   "pet": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}]},
                   "score": {"type": ["number", "boolean"]}},
    "required": ["name", "age"],
    "additionalProperties": False,
    "$defs": {"Pet": {"type": "object", "properties": {"kind": {"const": "cat"}}, "required": ["kind"]}},
}


@pytest.mark.parametrize("text, ok", [
    ('{"name": "x", "age": 3}', True),
    ('{ "name" : "x\\"y\\u00e9" ,\n  "age": -30 }', True),
    ('{"name": "x", "age": 3.5}', False),  # integer
    ('{"age": 3, "name": "x"}', False),  # the schema's order
    ('{"name": "x"}', False),  # a required property missing
    ('{"name": "x", "age": 3, "other": 1}', False),  # additionalProperties false
    ('{"name": "x", "age": 3, "tags": ["a", "b"]}', True),
    ('{"name": "x", "age": 3, "tags": ["a", "b", "a"]}', False),  # maxItems
    ('{"name": "x", "age": 3, "tags": ["c"]}', False),  # enum
    ('{"name": "x", "age": 3, "pet": {"kind": "cat"}}', True),
    ('{"name": "x", "age": 3, "pet": null, "score": true}', True),
    ('{"name": "x", "age": 3, "pet": {"kind": "dog"}}', False),  # const
    ('{"name": "x", "age": 3, "score": 1e-3}', True),
    ('{"name": "x", "age": 3, "score": "1"}', False),
    ('{"name": "x", "age": 3,}', False),
    ('{"name": "x", "age": 3}' + " " * 1, False),  # nothing after the document
    ('{"name": "x",\t' + "\n" + " " * 20 + '"age": 3}', True),
    ('{"name": "x",\n' + " " * 21 + '"age": 3}', False),  # an indentation past MAX_INDENT
    ('{"name": "x",  "age": 3}', False),  # two spaces without a line break
    ('{\n  "name": "x",\r\n  "age": 3\n}', True),  # a line break a run, then the indentation
    ('{\r\t"name":\r"x", "age": 3}', True),
    ('{"name": "x",\n\n"age": 3}', False),  # a blank line
    ('{"name": "x", \r \n"age": 3}', False),  # a CR, then an LF: two breaks
])
def test_schema_documents(text, ok):
    assert accepts(PERSON, text) == ok


def test_recursive_schemas_and_free_objects_compile():
    tree = {"$ref": "#/$defs/Node", "$defs": {"Node": {"type": "object", "properties": {
        "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}, "required": ["children"]}}}
    assert accepts(tree, '{"children": [{"children": []}, {"children": [{"children": []}]}]}')
    assert not accepts(tree, '{"children": [{}]}')
    assert accepts({"type": "object"}, '{"a": [1, {"b": null}], "c": "d"}')
    assert not accepts({"type": "object"}, '[1]')
    assert accepts({"type": "object", "additionalProperties": {"type": "integer"}}, '{"a": 1, "b": 2}')
    assert not accepts({"type": "object", "additionalProperties": {"type": "integer"}}, '{"a": "1"}')


def test_a_property_whose_schema_is_false_is_never_written():
    """`"b": false` forbids the key (JSON Schema's boolean schema): the documents made leave it out."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": False}, "required": ["a"]}
    assert accepts(schema, '{"a": 1}') and not accepts(schema, '{"a": 1, "b": 2}')
    assert accepts({"type": "object", "properties": {"b": False}}, "{}")


def test_recursion_through_an_optional_reference_compiles():
    """What pydantic writes for a linked list (`next: Optional[Node]`): the union refers to the schema
    it is part of, which is still being compiled when the union is met."""
    linked = {"$ref": "#/$defs/Node", "$defs": {"Node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}},
        "required": ["v", "next"]}}}
    assert accepts(linked, '{"v": 1, "next": {"v": 2, "next": null}}')
    assert not accepts(linked, '{"v": 1, "next": 3}')


def test_a_recursive_schema_never_opens_a_value_it_cannot_close_within_the_depth():
    """The linked list nests until the machine's depth allows no further object; from there its
    `next` can only be null, and every state on the way leaves some byte (a required property that
    led 64 objects down had left none: an all-False mask, and a failed request)."""
    linked = {"$ref": "#/$defs/Node", "$defs": {"Node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}},
        "required": ["v", "next"]}}}
    grammar = compile_schema(linked)
    state, levels = json_machine.start(grammar), 0
    while (deeper := _fed(grammar, state, '{"v":1,"next":')) is not None:
        state, levels = deeper, levels + 1
        assert any(json_machine.advance(grammar, state, b) is not None for b in range(256))
    assert levels == json_machine.MAX_DEPTH - 1
    closed = _fed(grammar, state, "null" + "}" * levels)
    assert closed is not None and json_machine.can_end(closed)


DEEP_OPTIONAL = {"$defs": {"N": {"type": "object", "properties": {"v": {"type": "integer"}, "child": {
    "$ref": "#/$defs/N"}}, "required": ["v"], "additionalProperties": False}}, "$ref": "#/$defs/N"}
DEEP_FREE_KEYS = {"$defs": {"N": {"type": "object", "additionalProperties": {"$ref": "#/$defs/M"}},
                            "M": {"type": "object", "properties": {"k": {"$ref": "#/$defs/N"}}, "required": ["k"],
                                  "additionalProperties": False}}, "$ref": "#/$defs/N"}
NEVER_ENDING_OPTION = {"type": "object", "properties": {"x": {"$ref": "#/$defs/I"}, "y": {"type": "integer"}},
                       "$defs": {"I": {"type": "object", "properties": {"i": {"$ref": "#/$defs/I"}}, "required": ["i"]}}}
DEEP_VARIANT = {"$defs": {
    "A": {"type": "object", "properties": {"k": {"const": "a"}, "r": {"$ref": "#/$defs/C"}}, "required": ["k", "r"],
          "additionalProperties": False},
    "B": {"type": "object", "properties": {"k": {"const": "b"}, "n": {"anyOf": [
        {"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}, {"type": "null"}]}}, "required": ["k", "n"],
        "additionalProperties": False},
    "C": {"type": "object", "properties": {"c": {"type": "object", "properties": {"d": {
        "type": "object", "properties": {"e": {"type": "integer"}}, "required": ["e"]}}, "required": ["d"]}},
        "required": ["c"]}}, "$ref": "#/$defs/B"}


@pytest.mark.parametrize("schema, step, last, close, closer", [
    (DEEP_OPTIONAL, '{"v":1,"child":', None, '{"v":1}', "}"),  # an optional property's object, level by level
    (DEEP_FREE_KEYS, '{"k":{"k":', None, "{}", "}}"),  # free keys whose values must hold a key
    (DEEP_VARIANT, '{"k":"b","n":', '{"k":"a","r":', "null", "}"),  # a tag picking the costlier variant
    (NEVER_ENDING_OPTION, None, '{"x":', '{"y":1}', ""),  # an optional property no finite value satisfies
])
def test_no_key_or_tag_leads_to_a_state_no_byte_continues(schema, step, last, close, closer):
    """A key is offered, and a union's object begun, only where the value it leads to can be
    completed within the machine's depth: nested as deep as it goes, every state on the way leaves
    some byte, and the document closes from there."""
    grammar = compile_schema(schema)
    state, levels = json_machine.start(grammar), 0
    while step is not None and (deeper := _fed(grammar, state, step)) is not None:
        state, levels = deeper, levels + 1
        assert _continues(grammar, state)
    assert step is None or levels > 30
    if last is not None:
        tried = state
        for byte in last.encode():  # as far as it goes: no state along it is left without a byte
            tried = json_machine.advance(grammar, tried, byte)
            if tried is None:
                break
            assert _continues(grammar, tried)
    ends = _fed(grammar, state, close + closer * levels)
    assert ends is not None and json_machine.can_end(ends)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
])
def test_a_schema_with_no_finite_document_is_refused(schema):
    with pytest.raises(InvalidParamError, match="no finite JSON document"):
        compile_schema(schema)


def _continues(grammar, state) -> bool:
    """Some byte other than whitespace continues the state (whitespace runs are bounded)."""
    return any(json_machine.advance(grammar, state, b) is not None for b in range(256) if b not in b" \t\n\r")


def _fed(grammar, state, text: str):
    for byte in text.encode():
        state = json_machine.advance(grammar, state, byte)
        if state is None:
            return None
    return state


class Cat(Closed):
    kind: Literal["cat"]
    meows: int


class Dog(Closed):
    kind: Literal["dog", "puppy"]
    barks: bool


class Household(Closed):
    pets: list[Union[Cat, Dog]]
    favourite: Union[Cat, Dog] = Field(discriminator="kind")


class Fish(Closed):
    kind: Literal["fish"]
    fins: int


class Aquarium(Closed):
    """A tagged union inside another union (pydantic writes anyOf [anyOf [Cat, Dog], Fish])."""
    pet: Union[Annotated[Union[Cat, Dog], Field(discriminator="kind")], Fish]


def test_a_union_of_models_is_told_apart_by_their_tag():
    """anyOf / oneOf of object schemas whose first property is a constant tag: the tag picks the
    branch the rest of the object follows."""
    schema = _strict_schema(Household)
    assert accepts(schema, '{"pets": [{"kind": "cat", "meows": 3}, {"kind": "puppy", "barks": true}], '
                           '"favourite": {"kind": "dog", "barks": false}}')
    assert not accepts(schema, '{"pets": [{"kind": "cat", "barks": true}], "favourite": {"kind": "cat", "meows": 1}}')
    assert not accepts(schema, '{"pets": [], "favourite": {"kind": "cow", "meows": 1}}')
    nested = _strict_schema(Aquarium)
    assert accepts(nested, '{"pet": {"kind": "cat", "meows": 9}}')
    assert not accepts(nested, '{"pet": {"kind": "cat"}}')  # the inner union's branch still holds
    assert accepts(nested, '{"pet": {"kind": "fish", "fins": 2}}')


class Parrot(Closed):
    words: int
    kind: Literal["parrot"]


class Snake(Closed):
    length: int
    kind: Literal["snake"]
    venomous: bool


class Terrarium(Closed):
    pet: Union[Parrot, Snake] = Field(discriminator="kind")


def test_a_union_of_models_whose_tag_comes_last_writes_the_tag_first():
    """pydantic writes a model's fields in their order, so a tag declared last came last, and the
    union was refused ("the tag ... must be a constant"): the tag is found where it is and written
    first (clients read keys in any order)."""
    schema = _strict_schema(Terrarium)
    for doc in ('{"pet": {"kind": "parrot", "words": 3}}', '{"pet": {"kind": "snake", "length": 2, "venomous": true}}'):
        assert accepts(schema, doc)
        Terrarium.model_validate_json(doc)
    assert not accepts(schema, '{"pet": {"kind": "parrot", "length": 2, "venomous": true}}')
    assert not accepts(schema, '{"pet": {"words": 3, "kind": "parrot"}}')  # the tag goes first


def test_enum_values_keep_to_the_type_beside_them():
    assert accepts({"type": "string", "enum": ["a", 1]}, '"a"')
    assert not accepts({"type": "string", "enum": ["a", 1]}, "1")
    assert accepts({"type": "number", "enum": [1, 2.5, "x"]}, "2.5")


def _allowed_bytes(grammar, state) -> list[int]:
    return [b for b in range(256) if json_machine.advance(grammar, state, b) is not None]


@pytest.mark.parametrize("schema", [
    True, {"type": "object"}, PERSON, {"type": "number"}, {"enum": [1, 10, 100, "a", "ab", None]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
    {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}}},  # all optional
    "household",  # a tagged union of models
    "aquarium",  # a tagged union in a union
])
def test_random_walks_never_reach_a_dead_end_and_end_in_json(schema):
    """Random bytes the machine allows, from the start: every state allows some byte or may end (a
    dead end would leave a row no token to take), and every document that ends parses."""
    model = {"household": Household, "aquarium": Aquarium}.get(schema) if isinstance(schema, str) else None
    grammar, rng = compile_schema(_strict_schema(model) if model else schema), random.Random(1)
    for _ in range(150):
        state, text = json_machine.start(grammar), b""
        while True:
            allowed = _allowed_bytes(grammar, state)
            ends = json_machine.can_end(state)
            assert allowed or ends, text
            if ends and (not allowed or rng.random() < 0.3 or len(text) > 200):
                break
            # bias towards closing: past 200 bytes prefer bytes that end values
            closing = [b for b in allowed if b in b'}]"0123456789el'] if len(text) > 200 else []
            byte = rng.choice(closing or allowed)
            text += bytes([byte])
            state = json_machine.advance(grammar, state, byte)
            assert len(text) < 5000, text[:200]
        json.loads(text.decode("utf-8"))  # strictly: strings hold whole UTF-8 characters
        if model:
            model.model_validate_json(text, strict=True)


def test_a_number_never_grows_past_its_length_without_a_way_to_end():
    grammar = compile_schema({"type": "number"})
    state = json_machine.start(grammar)
    for byte in b"-" + b"1" * 22:  # 23 bytes: a "." or "e" here would need a 25th
        state = json_machine.advance(grammar, state, byte)
    assert json_machine.advance(grammar, state, ord(".")) is None
    assert json_machine.can_end(json_machine.advance(grammar, state, ord("1")))


def test_nesting_stops_at_max_depth_and_the_document_can_still_close():
    grammar = compile_schema({"type": "object"})
    state = json_machine.start(grammar)
    for byte in b'{"a":':
        state = json_machine.advance(grammar, state, byte)
    depth = 0
    while (deeper := json_machine.advance(grammar, state, ord("["))) is not None:
        state, depth = deeper, depth + 1
    assert len(state) == json_machine.MAX_DEPTH and depth > 60
    assert json_machine.advance(grammar, state, ord("]")) is not None


def test_schemas_differing_only_in_property_order_keep_their_own_order(engine):
    first = {"type": "object", "properties": {"reasoning": {"type": "string"}, "answer": {"type": "integer"}},
             "required": ["reasoning", "answer"]}
    second = {"type": "object", "properties": {"answer": {"type": "integer"}, "reasoning": {"type": "string"}},
              "required": ["reasoning", "answer"]}
    for schema, doc in ((first, '{"reasoning": "r", "answer": 1}'), (second, '{"answer": 1, "reasoning": "r"}')):
        constraint = Constraint(engine.structured, engine.structured.grammar(schema, "response_format"))
        state = constraint.state
        for byte in doc.encode():
            state = json_machine.advance(constraint.grammar, state, byte)
            assert state is not None, (schema, doc)


@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "pattern": "^(?=a)"}, "pattern"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
    ({"type": "array", "prefixItems": {"type": "string"}}, "prefixItems"),
    ({"type": "array", "prefixItems": [{"type": "string"}], "items": False, "minItems": 2}, "minItems 2"),
    ({"$ref": "#/$defs/Missing"}, "points to nothing"),
    ({"$ref": "https://example.com/schema.json"}, "local references"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required"),
    ({"type": "strings"}, "type must be"),
    ({"enum": [{"a": 1}]}, "enum and const"),
    ({"type": "object", "properties": {"a": 5}}, "must be an object"),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "schema is false"),
    ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, "oneOf"),
    ({"oneOf": [{"type": "string"}, {"enum": ["a"]}]}, "oneOf"),
    ({"const": 5, "type": "string"}, "of the schema's type"),
    ({"const": float("inf")}, "finite"),
    ({"properties": {"a": {}}, "required": [["a"]]}, "list of names"),
    ({"type": "array", "minItems": True}, "minItems"),
    ({"enum": list(range(1001))}, "at most 1000"),
    ({"$ref": "#/$defs/A", "$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}}}, "itself"),
    ({"anyOf": [{"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"const": 1}}, "required": ["b"]}]}, "same required property"),
    ({"anyOf": [{"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]},
                {"type": "object", "properties": {"a": {"enum": [2, 1]}}, "required": ["a"]}]}, "share the tag"),
    ({"anyOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"type": "object", "properties": {"a": {"const": "x"}}, "required": ["a"]}]}, "constant or enum"),
    ({"oneOf": [{"type": "object"}, {"type": "object"}]}, "oneOf"),
    ({"anyOf": [{"type": "object", "properties": {"t": {"const": 1}}, "required": ["t"]},
                {"type": "object", "properties": {"t": {"const": 1.0}}, "required": ["t"]}]}, "share the tag"),
    ({"oneOf": [{"const": 1}, {"const": 1.0}]}, "oneOf"),
    ({"$ref": []}, "$ref must be a string"),  # each once a TypeError (unhashable), a 500
    ({"type": [["object"]]}, "type must be a string"),
    ({"enum": [1], "type": [{}]}, "type must be a string"),
    # a union's $ref branches add no node, but each is a branch (each merges the enum's 1,000 values)
    ({"$defs": {"E": {"enum": list(range(1000))}}, "anyOf": [{"$ref": "#/$defs/E"}] * 2001}, "too large"),
])
def test_what_the_grammar_cannot_hold_is_refused_by_name(schema, words):
    with pytest.raises(InvalidParamError) as caught:
        compile_schema(schema)
    assert words in str(caught.value) and caught.value.param == "response_format"


def test_a_one_of_many_constants_compiles():
    """oneOf's overlap check keeps the values it has seen (it once rebuilt them at each branch:
    quadratic, 0.6 s for these 999)."""
    grammar = compile_schema({"oneOf": [{"const": i} for i in range(999)] + [{"type": "string"}]})
    root = grammar.nodes[grammar.root]
    assert len(root.literals) == 999 and root.string


def _states_along(grammar, text: str) -> list[tuple]:
    state, states = json_machine.start(grammar), []
    for byte in text.encode():
        states.append(state)
        state = json_machine.advance(grammar, state, byte)
        assert state is not None
    return states + [state]


@pytest.mark.parametrize("schema, text", [
    ({"type": "object"}, '{"a": [1, -2.5e3, {"b": null}], "c d": "e \\"f\\" \\u00e9 ü 🎉 中文"}'),
    (PERSON, '{"name": "Jo", "age": 42, "tags": ["a"], "pet": {"kind": "cat"}, "score": false}'),
])
def test_each_mask_is_every_token_whose_bytes_the_state_accepts(engine, schema, text):
    """The sorted-vocabulary walk (and the in-string shortcut) against a brute force over the whole
    vocabulary, at every fourth state along a document; EOS only where the document may end."""
    structured = engine.structured
    vocabulary = structured.vocabulary
    grammar = compile_schema(schema)
    for state in _states_along(grammar, text)[::4] + [_states_along(grammar, text)[-1]]:
        expected = brute_force_mask(engine, grammar, state)
        mask = vocabulary.mask(grammar, state)
        assert torch.equal(mask, expected), [engine.tokenizer.token_text(t) for t in (mask ^ expected).nonzero()[:5, 0]]
    assert 0 < int(vocabulary.mask(grammar, _states_along(grammar, text)[-3]).sum()) < vocabulary.width


@pytest.mark.parametrize("model", [MODEL, "gemma3-270m"])
def test_token_bytes_are_what_decoding_each_token_gives(model):
    """Byte-level BPE (SmolLM2) and SentencePiece with byte fallback (Gemma 3): every 37th token whose
    text decodes whole, and text encoded and read back through token_bytes."""
    from engine.loader import ensure_hf_dir
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(ensure_hf_dir(model, dense=False))
    token_bytes = tokenizer.token_bytes()
    checked = 0
    for token_id in range(0, len(token_bytes), 37):
        text = tokenizer._tok.decode([token_id], skip_special_tokens=False)  # the token decoded alone
        if token_bytes[token_id] is not None and "\ufffd" not in text:
            assert token_bytes[token_id] == text.encode(), token_id
            checked += 1
    assert checked > len(token_bytes) // 37 * 0.9
    text = '{"name": "Ünïcode 🎉 中文",\n  "n": [1, 2.5e3]}\t x'
    assert b"".join(token_bytes[i] for i in tokenizer.encode(text, add_special_tokens=False)) == text.encode()


class Pet(Closed):
    kind: Literal["cat", "dog", "fish"]
    name: str


class Person(Closed):
    name: str
    age: int
    hobbies: list[str] = Field(max_length=3)
    pet: Optional[Pet]


class Capital(Closed):
    city: Literal["Paris", "London", "Berlin", "Madrid"]
    population_millions: int


def _strict_schema(model: type[BaseModel]) -> dict:
    """The schema the openai SDK sends for a pydantic model (strict: every property required)."""
    from openai.lib._pydantic import to_strict_json_schema

    return to_strict_json_schema(model)


PERSON_PROMPT = "Describe a fictional person as JSON: name, age, hobbies and pet."
CAPITAL_PROMPT = "What is the capital of France, and about how many million people live there? Answer in JSON."


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_models_answers_follow_the_schema(engine, temperature):
    schema = _strict_schema(Person)
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": PERSON_PROMPT}])
    params = SamplingParams(n=3, max_tokens=300, temperature=temperature, seed=5, response_schema=schema)
    engine.add_request(f"structured-{temperature}", prompt, params)
    texts, reasons = ["", "", ""], [None] * 3
    while engine.has_work:
        for out in engine.step()[0]:
            texts[out.index] += out.text
            reasons[out.index] = out.finish_reason
    for text, reason in zip(texts, reasons):
        assert reason == "stop", text
        Person.model_validate_json(text, strict=True)  # raises on anything the schema does not allow


def test_the_models_answers_to_a_tagged_union_follow_it(engine):
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "List the pets of a household in JSON."}])
    params = SamplingParams(n=4, max_tokens=200, temperature=1.0, seed=11, response_schema=_strict_schema(Household))
    engine.add_request("household", prompt, params)
    texts, reasons = [""] * 4, [None] * 4
    while engine.has_work:
        for out in engine.step()[0]:
            texts[out.index] += out.text
            reasons[out.index] = out.finish_reason
    finished = [t for t, r in zip(texts, reasons) if r == "stop"]
    assert finished, texts
    for text in finished:
        Household.model_validate_json(text, strict=True)


def test_preempted_constrained_rows_resume_where_their_json_was(engine, chat_prompts):
    """Under block pressure the newest rows give their KV back and recompute it later; their place in
    the grammar goes with their tokens, so they end with the answers a roomy engine gives."""
    from tests.helpers import engine_like

    params = SamplingParams(temperature=0.0, max_tokens=100, response_schema=_strict_schema(Person))
    roomy = engine.generate(chat_prompts, params)
    tight = engine_like(engine, kv_capacity_tokens=16 * engine.config.block_size, max_model_len=256)
    pressed = tight.generate(chat_prompts, params)
    assert tight.num_preemptions_total > 0
    assert [ids for _, ids, _ in pressed] == [ids for _, ids, _ in roomy]
    for text, _, last in pressed:
        if last.finish_reason == "stop":
            Person.model_validate_json(text, strict=True)
    assert any(last.finish_reason == "stop" for _, _, last in pressed)


def _chat(server, **body):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_openai_sdks_parse_returns_the_pydantic_model(client):
    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": CAPITAL_PROMPT}], response_format=Capital,
        temperature=0, max_tokens=200)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Capital)


def test_json_object_answers_are_one_object_streamed_as_unstreamed(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": CAPITAL_PROMPT}], temperature=0,
              max_tokens=300, response_format={"type": "json_object"})
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "stop"
    assert isinstance(json.loads(whole.message.content), dict)
    chunks = [chunk.choices[0] for chunk in client.chat.completions.create(stream=True, **kw) if chunk.choices]
    streamed = "".join(c.delta.content or "" for c in chunks)
    if chunks[-1].finish_reason == "stop":
        assert isinstance(json.loads(streamed), dict)
    if not cuda_available():  # the second request finds the prompt cached: the same bits only on the CPU path
        assert streamed == whole.message.content  # (conftest.cpu_path_only)


def test_completions_take_a_response_format_too(client):
    """As vLLM's and llama.cpp's /v1/completions do (OpenAI's legacy route has no such field)."""
    done = client.completions.create(
        model=MODEL, prompt="The capital of France, as JSON:", temperature=0, max_tokens=200,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {
            "name": "capital", "schema": _strict_schema(Capital)}}}).choices[0]
    assert done.finish_reason == "stop"
    Capital.model_validate_json(done.text, strict=True)


@cpu_path_only
def test_a_constrained_request_leaves_the_requests_beside_it_alone(server):
    """Plain greedy answers are the same alone and beside constrained ones in the same batches."""
    plain = dict(messages=[{"role": "user", "content": "Write a haiku about the sea."}], temperature=0, max_tokens=40)
    alone = _chat(server, **plain)["choices"][0]["message"]["content"]
    results = {}

    def run(name, body):
        results[name] = _chat(server, **body)

    constrained = dict(messages=[{"role": "user", "content": PERSON_PROMPT}], temperature=1, seed=3, max_tokens=200,
                       n=2, response_format={"type": "json_schema", "json_schema": {
                           "name": "person", "schema": _strict_schema(Person), "strict": True}})
    threads = [threading.Thread(target=run, args=(f"c{i}", constrained)) for i in range(2)]
    threads.append(threading.Thread(target=run, args=("plain", plain)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["plain"]["choices"][0]["message"]["content"] == alone
    for name in ("c0", "c1"):
        for choice in results[name]["choices"]:
            if choice["finish_reason"] == "stop":
                Person.model_validate_json(choice["message"]["content"], strict=True)


@pytest.mark.parametrize("response_format, words", [
    ({"type": "json_schema"}, "json_schema is required"),
    ({"type": "json_object", "json_schema": {"name": "x", "schema": {}}}, "json_schema is required"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema is required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?!a)"}}}, "pattern"),
])
def test_bad_response_formats_are_400_naming_response_format(server, response_format, words):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "response_format": response_format})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and words in error["message"]


def test_const_beside_enum_holds_both():
    """A const the enum allows is that one value; one it does not is a schema no value satisfies
    (the const alone was taken, and the enum set aside)."""
    assert accepts({"const": "a", "enum": ["a", "b"]}, '"a"')
    assert not accepts({"const": "a", "enum": ["a", "b"]}, '"b"')
    with pytest.raises(InvalidParamError, match="no value satisfies both"):
        compile_schema({"const": "a", "enum": ["b"]})
