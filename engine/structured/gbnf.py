"""GBNF grammars (llama.cpp's `grammar` field; vLLM's `structured_outputs.grammar` and
`guided_grammar`, which its xgrammar backend reads in the same notation) that describe a regular
language, as one regular expression for the whole answer (engine/structured/whole_text.py).

The notation: rules `name ::= body`, `root` the answer's; in a body, "literals" and [classes]
(`[^...]` negated, ranges `a-z`) with the escapes \\n \\r \\t \\\\ \\" \\[ \\] \\xHH \\uHHHH
\\UHHHHHHHH, `.` (any character), rule names, ( groups ), alternatives `|`, and the repetitions
`* + ?`, `{m}`, `{m,}`, `{m,n}`, `{,n}`; `#` comments to the end of a line. Rules are inlined
where they are named. A rule whose alternatives end in the rule itself (`list ::= item "," list |
item`) is a repetition: those alternatives' heads any number of times, then one of the others.
Any other reference of a rule to itself, directly or through others (JSON's nesting, balanced
brackets), makes a language no regular expression holds: such grammars are refused, by the rule's
name. So are grammars too large for the automaton (whole_text.py's limits).
"""
from __future__ import annotations

MAX_REGEX = 64 * 1024  # characters of the expression a grammar becomes
SPECIAL = set("\\^$.|?*+()[]{}/-")  # written escaped in the expression (`-` for classes)
NAMED_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-", "/": "/"}


class GrammarError(ValueError):
    pass


class _Parser:
    def __init__(self, text: str):
        self.text, self.at = text, 0

    def fail(self, message: str):
        line = self.text.count("\n", 0, self.at) + 1
        raise GrammarError(f"{message} (line {line})")

    def skip(self) -> None:
        """Past whitespace, newlines and comments."""
        text = self.text
        while self.at < len(text):
            if text[self.at] == "#":
                end = text.find("\n", self.at)
                self.at = len(text) if end < 0 else end
            elif text[self.at].isspace():
                self.at += 1
            else:
                return

    def name(self) -> str | None:
        start = self.at
        while self.at < len(self.text) and (self.text[self.at].isalnum() or self.text[self.at] in "-_"):
            self.at += 1
        return self.text[start:self.at] or None

    def rule_starts(self) -> bool:
        """Whether `name ::=` begins here (the end of the rule before it)."""
        at = self.at
        found = self.name() is not None
        self.skip()
        found = found and self.text.startswith("::=", self.at)
        self.at = at
        return found

    def rules(self) -> dict[str, list[str]]:
        """Each rule's alternatives as expressions, rule names left as `\\0name\\0` marks."""
        rules = {}
        self.skip()
        while self.at < len(self.text):
            name = self.name()
            self.skip()
            if name is None or not self.text.startswith("::=", self.at):
                self.fail("expected a rule, `name ::= ...`")
            if name in rules:
                self.fail(f"rule {name!r} is defined twice")
            self.at += 3
            rules[name] = self.options()
            self.skip()
        return rules

    def options(self) -> list[str]:
        options = [self.sequence()]
        while self.at < len(self.text) and self.text[self.at] == "|":
            self.at += 1
            options.append(self.sequence())
        return options

    def alternatives(self) -> str:
        return _either(self.options())

    def sequence(self) -> str:
        parts = []
        while True:
            self.skip()
            if self.at >= len(self.text) or self.text[self.at] in "|)" or self.rule_starts():
                return "".join(parts)
            parts.append(self.repeated(self.atom()))

    def atom(self) -> str:
        char = self.text[self.at]
        if char == '"':
            self.at += 1
            out = []
            while self.at < len(self.text) and self.text[self.at] != '"':
                out.append(_escaped(self.char()))
            if self.at >= len(self.text):
                self.fail("a literal without its closing quote")
            self.at += 1
            return "(?:" + "".join(out) + ")"
        if char == "[":
            return self.char_class()
        if char == ".":
            self.at += 1
            return "(?:.|[\\n\\r\\u2028\\u2029])"
        if char == "(":
            self.at += 1
            body = self.alternatives()
            self.skip()
            if self.at >= len(self.text) or self.text[self.at] != ")":
                self.fail("a group without its closing parenthesis")
            self.at += 1
            return "(?:" + body + ")"
        name = self.name()
        if name is None:
            self.fail(f"unexpected {char!r}")
        return "\0" + name + "\0"

    def char(self) -> str:
        """One character of a literal or class, its escape read."""
        char = self.text[self.at]
        self.at += 1
        if char != "\\":
            return char
        if self.at >= len(self.text):
            self.fail("a lone backslash")
        kind = self.text[self.at]
        self.at += 1
        width = {"x": 2, "u": 4, "U": 8}.get(kind)
        if width is None:
            if kind not in NAMED_ESCAPES:
                self.fail(f"unknown escape \\{kind}")
            return NAMED_ESCAPES[kind]
        digits = self.text[self.at:self.at + width]
        if len(digits) != width or any(c not in "0123456789abcdefABCDEF" for c in digits):
            self.fail(f"\\{kind} takes {width} hex digits")
        self.at += width
        code = int(digits, 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            self.fail(f"\\{kind}{digits} is no character")
        return chr(code)

    def char_class(self) -> str:
        self.at += 1
        negated = self.text.startswith("^", self.at)
        self.at += negated
        ranges = []
        while self.at < len(self.text) and self.text[self.at] != "]":
            low = self.char()
            high = low
            if self.text.startswith("-", self.at) and not self.text.startswith("-]", self.at):
                self.at += 1
                high = self.char()
                if ord(high) < ord(low):
                    self.fail(f"a range from {low!r} down to {high!r}")
            ranges.append(_escaped(low) if low == high else _escaped(low) + "-" + _escaped(high))
        if self.at >= len(self.text):
            self.fail("a class without its closing bracket")
        self.at += 1
        if not ranges:
            self.fail("an empty class")
        return "[" + "^" * negated + "".join(ranges) + "]"

    def repeated(self, atom: str) -> str:
        if self.at >= len(self.text):
            return atom
        char = self.text[self.at]
        if char in "*+?":
            self.at += 1
            return atom + char
        if char != "{":
            return atom
        end = self.text.find("}", self.at)
        if end < 0:
            self.fail("a repetition without its closing brace")
        low, comma, high = self.text[self.at + 1:end].replace(" ", "").partition(",")
        if not (low.isdigit() or (comma and not low)) or (high and not high.isdigit()):
            self.fail("a repetition is {m}, {m,}, {m,n} or {,n}")
        self.at = end + 1
        return atom + "{" + (low or "0") + comma + high + "}"


def _either(options: list[str]) -> str:
    return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"


def _escaped(char: str) -> str:
    """A character as the expression writes it (in or out of a class)."""
    if char in SPECIAL:
        return "\\" + char
    if char in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[char]
    if ord(char) < 0x20 or ord(char) == 0x7F:
        return f"\\x{ord(char):02x}"
    return char


def gbnf_regex(grammar: str) -> str:
    """The regular expression of a GBNF grammar's `root` (matched whole); raises GrammarError."""
    rules = _Parser(grammar).rules()
    if "root" not in rules:
        raise GrammarError("the grammar has no `root` rule")
    done: dict[str, str] = {}

    def expand(name: str, path: tuple[str, ...]) -> str:
        if name in done:
            return done[name]
        if name in path:
            cycle = " -> ".join(path[path.index(name):] + (name,))
            raise GrammarError(f"rule {name!r} refers to itself ({cycle}): a recursive grammar is no regular "
                               "language; hold JSON with response_format or structured_outputs.json")
        if name not in rules:
            raise GrammarError(f"rule {name!r} is named but not defined")
        mark = "\0" + name + "\0"
        heads = [option[:-len(mark)] for option in rules[name] if option.endswith(mark)]  # name ::= head name
        ends = [option for option in rules[name] if not option.endswith(mark)]
        if heads and not ends:
            raise GrammarError(f"rule {name!r} never ends: each of its alternatives ends in itself")

        def written(expression: str) -> str:  # odd pieces are rule names; the size checked as it grows
            out, size = [], 0
            for i, piece in enumerate(expression.split("\0")):
                out.append(piece if i % 2 == 0 else "(?:" + expand(piece, path + (name,)) + ")")
                size += len(out[-1])
                if size > MAX_REGEX:
                    raise GrammarError(f"the grammar is too large once its rules are written out (over "
                                       f"{MAX_REGEX} characters)")
            return "".join(out)

        out = written(_either(ends))
        if heads:
            out = "(?:" + written(_either(heads)) + ")*" + "(?:" + out + ")"
        if len(out) > MAX_REGEX:
            raise GrammarError(f"the grammar is too large once its rules are written out (over {MAX_REGEX} "
                               "characters)")
        done[name] = out
        return out

    return expand("root", ())
