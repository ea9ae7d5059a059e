"""GBNF grammars as regular expressions (engine/structured/gbnf.py): what each construct derives,
checked on the machine the answers run through, and the grammars refused by name."""
import pytest

from engine.structured.gbnf import GrammarError, gbnf_regex
from engine.structured.whole_text import compile_regex
from tests.helpers import grammar_accepts

CASES = [  # grammar, answers it derives, answers it does not
    ('root ::= "yes" | "no"', ["yes", "no"], ["", "yesno", "Yes"]),
    ('root ::= word "."  # a sentence\nword ::= [A-Z] [a-z]*', ["A.", "Hello."], ["hello.", "A", "Ab1."]),
    ('root ::= item ("," item){0,2}\nitem ::= [0-9]+ | "\\"x\\""', ['1,"x",22', '"x"'], ["1,2,3,4", "1,", "x"]),
    ('root ::= [^\\n\\]-]+ "\\n" . "\\u00e9" [\\x41-\\x43]', ["ab\n\néB", "a\nzéC"],
     ["a]\nzéA", "a-\nzéA", "\nzéA", "a\nzéD"]),
    ('root ::= "x"{,2} "y"{2,} "z"{3}', ["yyzzz", "xxyyyzzz"], ["xxxyyzzz", "yzzz", "yyzz"]),
    ('root ::= "$^.|?*+(){}/\\\\"', ["$^.|?*+(){}/\\"], ["$"]),
    ('root ::= ( "a" | "b" )+ "!"?', ["ab", "ba!", "a"], ["", "!", "ab!!"]),
    ('root ::= "(" . ")"', ["(\n)", "(x)", "(é)"], ["()", "(xy)"]),
    ('root ::= ""', [""], ["a"]),
    ('root ::= item "," root | item\nitem ::= [a-z]+', ["a", "ab,c,d"], ["", "a,", ",a"]),  # tail recursion
    ('root ::= "[" list "]"\nlist ::= "x" | "x" list | "y" list', ["[x]", "[yyx]", "[xyx]"], ["[]", "[y]"]),
]


@pytest.mark.parametrize("grammar, derived, underived", CASES)
def test_each_construct_derives_what_it_says(grammar, derived, underived):
    compiled = compile_regex(gbnf_regex(grammar), "grammar")
    for text in derived:
        assert grammar_accepts(compiled, text), (grammar, text)
    for text in underived:
        assert not grammar_accepts(compiled, text), (grammar, text)


@pytest.mark.parametrize("grammar, words", [
    ('root ::= "a" root "b" | "c"', "refers to itself (root -> root)"),
    ('root ::= "a" root', "never ends"),
    ('root ::= x\nx ::= y\ny ::= "(" x ")" | "z"', "refers to itself (x -> y -> x)"),
    ('answer ::= "a"', "no `root`"),
    ('root ::= missing', "named but not defined"),
    ('root ::= "a"\nroot ::= "b"', "defined twice"),
    ('root ::= "a" (\n', "closing parenthesis (line 2)"),
    ('root ::= "abc', "closing quote"),
    ('root ::= [z-a]', "down to"),
    ('root ::= []', "empty class"),
    ('root ::= "\\q"', "unknown escape"),
    ('root ::= "\\x4"', "hex digits"),
    ('root ::= "a"{x}', "{m}, {m,}"),
    ('root = "a"', "expected a rule"),
    ('root ::= @', "unexpected '@'"),
])
def test_grammars_that_cannot_be_held_are_refused_by_what_is_wrong(grammar, words):
    with pytest.raises(GrammarError, match=None) as caught:
        gbnf_regex(grammar)
    assert words in str(caught.value), caught.value


def test_a_grammar_too_large_written_out_is_refused():
    rules = "\n".join(f'r{i} ::= r{i + 1} r{i + 1}' for i in range(20)) + '\nr20 ::= "abcdefgh"'
    with pytest.raises(GrammarError, match="too large"):
        gbnf_regex("root ::= r0\n" + rules)


def test_a_grammar_of_many_references_is_refused_before_it_is_written_out():
    """Each reference to a large rule was written out in full, and the size checked after: a
    request body of a few MB could ask for tens of GB (and minutes on the event loop). The size is
    checked as the expression grows."""
    rules = 'b0 ::= "xxxxxxx"\n' + "".join(f"b{i} ::= b{i - 1} b{i - 1}\n" for i in range(1, 11))
    with pytest.raises(GrammarError, match="too large"):
        gbnf_regex(rules + "root ::= " + " ".join(["b10"] * 200_000))
