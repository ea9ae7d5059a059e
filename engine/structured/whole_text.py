"""A whole answer held to a regular expression, or to one of a list of strings: vLLM's
`structured_outputs` `regex` and `choice` (and its older `guided_regex`, `guided_choice`).

The answer is raw text, not JSON: a grammar with `raw` set. A regex is one node whose pattern
(engine/structured/regex.py, built to match whole strings, as vLLM's backends match a regex) the
machine runs over the answer's characters (engine/structured/json_machine.py, its RAW frame): a
character is taken only where the pattern can still be completed, EOS where it is, and the answer
ends by itself where nothing may follow. Choices are one node of literals, read byte by byte as a
JSON enum's values are (any number of them, sharing no automaton), their bytes the answer's own."""
from __future__ import annotations

from engine.sampling_params import InvalidParamError
from engine.structured.regex import Pattern, PatternError
from engine.structured.schema import MAX_LITERALS, Grammar, Node

MAX_CHOICE_CHARS = 1024
MAX_CHOICES_BYTES = 64 * 1024  # in all: each byte position of a shared prefix is a state whose mask walks the vocabulary


def compile_regex(regex: str, param: str) -> Grammar:
    """The grammar of an answer that `regex` matches whole; raises InvalidParamError naming `param`
    for a regex the automaton cannot hold."""
    try:
        pattern = Pattern(regex, whole=True)
    except PatternError as exc:
        raise InvalidParamError(f"{param}: {exc}", param) from None
    except UnicodeEncodeError:
        raise InvalidParamError(f"{param}: the regex must be text (a lone surrogate is not)", param) from None
    except RecursionError:
        raise InvalidParamError(f"{param}: the regex is nested too deeply", param) from None
    return Grammar(nodes=[Node(string=True, text=pattern)], root=0, raw=True)


def compile_choices(choices: tuple[str, ...], param: str) -> Grammar:
    """The grammar of an answer that is exactly one of `choices`."""
    if not choices:
        raise InvalidParamError(f"{param} must hold at least one string", param)
    try:
        literals = tuple(dict.fromkeys(c.encode() for c in choices))
    except UnicodeEncodeError:
        raise InvalidParamError(f"{param}: choices must be text (a lone surrogate is not)", param) from None
    if len(literals) > MAX_LITERALS or any(len(c) > MAX_CHOICE_CHARS for c in choices) or \
            sum(map(len, literals)) > MAX_CHOICES_BYTES:
        raise InvalidParamError(f"{param} holds at most {MAX_LITERALS} distinct strings of at most {MAX_CHOICE_CHARS} "
                                f"characters, {MAX_CHOICES_BYTES // 1024} KiB in all", param)
    return Grammar(nodes=[Node(literals=literals)], root=0, raw=True)
