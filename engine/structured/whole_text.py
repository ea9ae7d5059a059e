"""A whole answer held to a regular expression, or to one of a list of strings: vLLM's
`structured_outputs` `regex` and `choice` (and its older `guided_regex`, `guided_choice`).

The answer is raw text, not JSON: a grammar with `raw` set whose one node's pattern
(engine/structured/regex.py) must match the answer whole, as vLLM's backends match it. The
machine (engine/structured/json_machine.py, its RAW frame) takes a character only where the
pattern can still be completed, allows EOS where it is, and ends the answer where nothing may
follow."""
from __future__ import annotations

from engine.sampling_params import InvalidParamError
from engine.structured.regex import Pattern, PatternError
from engine.structured.schema import Grammar, Node, literal_pattern

MAX_CHOICES = 1000  # as OpenAI's strict mode caps enum values
MAX_CHOICE_CHARS = 256


def full_match(regex: str) -> str:
    """`regex` anchored at both ends. A leading `^` and a trailing `$` of the client's own are
    taken off first (they say the same; the automaton takes anchors only at a pattern's ends)."""
    body = regex[1:] if regex.startswith("^") else regex
    if body.endswith("$"):
        before = body[:-1]
        if (len(before) - len(before.rstrip("\\"))) % 2 == 0:  # not an escaped `\$`
            body = before
    return f"^(?:{body})$"


def choices_pattern(choices: list[str], param: str) -> str:
    """A pattern that matches each choice exactly, and nothing else."""
    if not choices:
        raise InvalidParamError(f"{param} must hold at least one string", param)
    if len(choices) > MAX_CHOICES or any(len(c) > MAX_CHOICE_CHARS for c in choices):
        raise InvalidParamError(f"{param} holds at most {MAX_CHOICES} strings of at most {MAX_CHOICE_CHARS} "
                                "characters", param)
    return "^(?:" + "|".join(literal_pattern(c) for c in dict.fromkeys(choices)) + ")$"


def compile_text(source: str, param: str) -> Grammar:
    """The grammar of an answer that `source` (a full-match pattern) holds whole; raises
    InvalidParamError naming `param` for a pattern the automaton cannot hold."""
    try:
        pattern = Pattern(source)
    except PatternError as exc:
        raise InvalidParamError(f"{param}: {exc}", param) from None
    except UnicodeEncodeError:
        raise InvalidParamError(f"{param}: the pattern must be text (a lone surrogate is not)", param) from None
    return Grammar(nodes=[Node(string=True, text=pattern)], root=0, raw=True)
