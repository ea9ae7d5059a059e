"""A grammar held after the thinking (engine/structured/thinking.py), on a small vocabulary whose
tags come whole or in pieces: the masks it gives at each phase, and where the grammar takes over."""
import json

import pytest
import torch

from engine.structured.constraint import StructuredOutputs
from engine.structured.schema import compile_schema
from engine.structured.thinking import ThinkingConstraint, ThinkingMasks

TOKENS = ["<think>", "</think>", "<", "think", ">", "</", "{", "}", '"', "a", ":", "1", " ", "\n", "plan",
          ">{", ">x", "<th", "ink>", "</think>{", "<|im_end|>"]
EOS = TOKENS.index("<|im_end|>")
ID = {t: i for i, t in enumerate(TOKENS)}
TABLE = [t.encode() for t in TOKENS[:-1]] + [None]  # grammar text; the end-of-turn is special: none


@pytest.fixture
def outputs():
    return StructuredOutputs(lambda: TABLE, len(TOKENS), {EOS})


@pytest.fixture
def masks():
    return ThinkingMasks(lambda: TABLE, lambda i: TOKENS[i].encode(), len(TOKENS), {EOS})


def allowed(mask) -> set[str]:
    return {TOKENS[i] for i in torch.nonzero(mask).flatten().tolist()}


def write(constraint, tokens: list[str]) -> str:
    for token in tokens:
        mask = constraint.mask()
        assert mask is None or mask[ID[token]], (token, constraint.phase)
        constraint.advance(ID[token])
    return constraint.phase


def grammar():
    return compile_schema({"type": "object"})


def test_an_opened_block_is_free_until_it_closes_then_the_grammar_holds(outputs, masks):
    c = ThinkingConstraint(outputs, masks, grammar(), opened=True)
    assert allowed(c.mask()) == set(TOKENS) - {"<|im_end|>"}  # anything goes while thinking, but the end
    assert write(c, ["plan", "<", "plan", "\n"]) == "thinking"
    assert write(c, ["</", "think"]) == "thinking"
    # right after "</think": a token that closes the tag with text the grammar refuses is out
    mask = c.mask()
    assert not mask[ID[">x"]] and mask[ID[">{"]] and mask[ID[">"]] and mask[ID["plan"]]
    assert write(c, [">{"]) == "held"  # the "{" after the tag is the document's first character
    assert allowed(c.mask()) >= {'"', "}"} and "plan" not in allowed(c.mask())
    write(c, ['"', "a", '"', ":", "1", "}"])
    assert c.done
    with pytest.raises(ValueError):
        ThinkingConstraint(outputs, masks, grammar(), opened=True).inner.advance_text(b"x")


def test_whitespace_after_the_tag_is_not_the_documents(outputs, masks):
    c = ThinkingConstraint(outputs, masks, grammar(), opened=True)
    assert write(c, ["plan", "</think>", "\n", "{", "}"]) == "held"
    assert c.done and not c.ended


def test_an_answer_that_may_open_the_block_chooses_with_its_first_token(outputs, masks):
    c = ThinkingConstraint(outputs, masks, grammar(), opened=False)
    first = allowed(c.mask())
    assert {"<think>", "<", "<th", "{"} <= first  # the tag (whole or begun) or the document
    assert not first & {"plan", "</think>", "think", ">"}
    assert write(c, ["<th"]) == "opening"
    assert allowed(c.mask()) == {"ink>"}  # only what goes on writing the tag
    assert write(c, ["ink>", "plan", "</think>{"]) == "held"
    write(c, ["}"])
    assert c.done

    plain = ThinkingConstraint(outputs, masks, grammar(), opened=False)
    assert write(plain, ["{"]) == "held"  # no thinking: the grammar from the first token
    assert "<think>" not in allowed(plain.mask())
    write(plain, ["}"])
    assert plain.done


def test_the_answer_may_not_end_before_its_document(outputs, masks):
    c = ThinkingConstraint(outputs, masks, grammar(), opened=True)
    write(c, ["plan"])
    assert not c.mask()[EOS] and not c.done and not c.ended
    held = ThinkingConstraint(outputs, masks, grammar(), opened=True)
    write(held, ["</think>"])
    assert not held.mask()[EOS]  # the document has not begun: the end of turn may not come yet
    with pytest.raises(ValueError):
        ThinkingConstraint(outputs, masks, grammar(), opened=False).advance(ID["plan"])
    opening = ThinkingConstraint(outputs, masks, grammar(), opened=False)
    write(opening, ["<"])
    with pytest.raises(ValueError):
        opening.advance(ID["{"])


def test_the_document_after_the_thinking_parses(outputs, masks):
    c = ThinkingConstraint(outputs, masks, grammar(), opened=True)
    text = "plan</think>"
    write(c, ["plan", "</think>"])
    for _ in range(12):  # the first allowed token each step: the grammar leads to a whole object
        mask = c.mask()
        token = next(i for i in range(len(TOKENS)) if mask[i] and TOKENS[i] not in ("\n", " "))
        if token == EOS:
            break
        c.advance(token)
        text += TOKENS[token]
        if c.done:
            break
    assert c.done
    json.loads(text.split("</think>", 1)[1])
