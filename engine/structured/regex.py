"""JSON Schema `pattern`s (ECMA-262 regular expressions) as automata over a string's characters.

A pattern is parsed into a Thompson NFA over code points, and run as a DFA built whole when the
pattern is compiled (at most MAX_DFA_STATES states): a DFA state is the set of NFA states a prefix
can reach, interned as an int, with its runs of code points and the state each leads to. NFA
states from which the end cannot be reached are dropped from every set, so a set that is not
empty can always still be completed.

JSON Schema patterns search: `"b"` matches "abc". A pattern is matched whole where it begins with
`^` and ends with `$` (per top-level alternative); elsewhere any text may come before or after.
What is supported: literals, `.`, classes (`[a-z]`, `[^"]`, `\\d \\w \\s` and their negations),
groups (`(...)`, `(?:...)`, `(?<name>...)`), alternation, and the quantifiers `* + ? {n} {n,}
{n,m}` (lazy forms too: they match the same strings). Anchors elsewhere than at a top-level
alternative's start or end, backreferences, lookaround and `\\b` are refused, as are Unicode
property classes.

Characters a JSON string cannot hold as written here (control characters other than `\\b \\t
\\n \\f \\r`, which are written as their short escapes) are in no class, nor are lone surrogates.
Classes keep to what ECMA-262, Python's `re` and pydantic's Rust regex all take: `\\d` and `\\w`
are ASCII, `\\D \\W \\S` and negated classes leave out every character any of them counts as a
digit, word character or space (so "١" matches no `\\D`), `\\s` leaves out U+FEFF, and `.` is
ECMA-262's (no line terminators).

Lengths: `live(state, count)` answers whether the string can still be completed with a total
of at least `min_length` and at most `max_length` characters, `count` of them written so far.
With a pattern, that is read from the automaton: for each state, the remaining lengths that reach
its end (up to the bounds).
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
MAX_STATES = 5000  # of the NFA: counted repetitions are unrolled
MAX_REPEAT = 1000
MAX_SOURCE = 64 * 1024  # characters of a pattern (parsed before its states are counted)
MAX_DFA_STATES = 2048  # explored when the pattern is compiled
# runs of code points looked at while the automaton is built (2-20 us each): a state's cost grows
# with its classes' ranges (\W has about 800), so `\W{1000}` is refused early, not built. One
# budget for a compile (`Work`): a schema's patterns share it, so many costly patterns are refused
# as one is (each took up to seconds alone; a schema could hold thousands of them)
MAX_WORK = 300_000
LENGTH_STEPS = 64  # steps back through the automaton for the length bounds: one unit of work
MAX_LENGTH = 1024  # minLength and maxLength beside a pattern
_COUNTED = re.compile(r"\{([0-9]+)(?:(,)([0-9]*))?\}")  # a counted repetition's braces (ECMA-262: else literal)
# what a held string can write: no lone surrogates, and of the control characters only those with
# a short escape (\b \t \n \f \r)
WRITABLE = ((0x08, 0x0A), (0x0C, 0x0D), (0x20, SURROGATES[0] - 1), (SURROGATES[1] + 1, MAX_CODE_POINT))

Ranges = tuple  # of (low, high) code point pairs, inclusive, sorted, disjoint, surrogates left out


class Work:
    """What one compile may spend building automata: MAX_WORK units, shared by all its patterns."""

    def __init__(self, limit: int = MAX_WORK):
        self.left = limit

    def spend(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise PatternError("the pattern is too costly to build (too many states of large classes, or long "
                               "length bounds; a schema's patterns share one budget)")


def _merged(ranges) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], high)
        else:
            out.append([low, high])
    return [(low, high) for low, high in out]


def _normalise(ranges) -> Ranges:
    """Sorted, merged, and only what a held string can write (WRITABLE)."""
    kept = []
    for low, high in _merged(ranges):
        for w_low, w_high in WRITABLE:
            if low <= w_high and w_low <= high:
                kept.append((max(low, w_low), min(high, w_high)))
    return tuple(kept)


def _negate(ranges) -> Ranges:
    out, start = [], 0
    for low, high in _merged(ranges):
        if low > start:
            out.append((start, low - 1))
        start = high + 1
    if start <= MAX_CODE_POINT:
        out.append((start, MAX_CODE_POINT))
    return _normalise(out)


def _runs_of(test) -> list[tuple[int, int]]:
    """The code points `test` takes, as runs."""
    runs: list[tuple[int, int]] = []
    start = None
    for code_point in range(MAX_CODE_POINT + 2):
        inside = code_point <= MAX_CODE_POINT and not SURROGATES[0] <= code_point <= SURROGATES[1] and \
            test(chr(code_point))
        if inside and start is None:
            start = code_point
        elif not inside and start is not None:
            runs.append((start, code_point - 1))
            start = None
    return runs


_WIDE: dict[str, list[tuple[int, int]]] = {}


def _wide(name: str) -> list[tuple[int, int]]:
    """Every character some regex dialect a client may check with (ECMA-262, Python's `re`, Rust's
    regex) counts as a digit, word character or space: what `\\D \\W \\S` and negated classes leave
    out. Built when first asked for (a scan over the code points, about a second)."""
    if name not in _WIDE:
        import unicodedata

        tests = {
            "d": lambda c: c.isdecimal() or c.isdigit(),
            "w": lambda c: c.isalnum() or c == "_" or unicodedata.category(c)[0] == "M" or
            unicodedata.category(c) == "Pc" or c in "\u200c\u200d",
            "s": lambda c: c.isspace() or c in "\ufeff\x85",
        }
        _WIDE[name] = _runs_of(tests[name])
    return _WIDE[name]


ANY = _normalise([(0, MAX_CODE_POINT)])
DOT = _negate([(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)])  # all but line terminators
DIGIT = ((0x30, 0x39),)
WORD = _normalise([(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)])
# ECMA-262's spaces less U+FEFF (which Python's and Rust's \s do not take)
SPACE = _normalise([(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                    (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)])
# a class escape: what it takes in a class, and what it contributes to a negated class before the
# negation (\d: every digit, so that [^\d] leaves them all out; \D: every non-ASCII-digit, so
# that [^\D] is the ASCII digits)
CLASS_ESCAPES = {
    "d": (lambda: DIGIT, lambda: _wide("d")), "D": (lambda: _negate(_wide("d")), lambda: _negate(DIGIT)),
    "w": (lambda: WORD, lambda: _wide("w")), "W": (lambda: _negate(_wide("w")), lambda: _negate(WORD)),
    "s": (lambda: SPACE, lambda: _wide("s")), "S": (lambda: _negate(_wide("s")), lambda: _negate(SPACE)),
}
CHAR_ESCAPES = {"t": 0x09, "n": 0x0A, "v": 0x0B, "f": 0x0C, "r": 0x0D, "0": 0x00}


class PatternError(ValueError):
    """What a pattern asks that is not supported, or is not a regular expression."""


# the parsed pattern: ("chars", ranges) | ("seq", [nodes]) | ("alt", [nodes]) |
# ("repeat", node, low, high or None) | ("start",) | ("end",)


class _Parser:
    def __init__(self, pattern: str):
        self.text, self.pos = pattern, 0

    def fail(self, message: str):
        raise PatternError(f"{message} (at offset {self.pos} of the pattern)")

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def take(self) -> str:
        char = self.peek()
        if char is None:
            self.fail("the pattern ends too early")
        self.pos += 1
        return char

    def parse(self):
        node = self.alternation()
        if self.peek() is not None:
            self.fail(f"unexpected {self.peek()!r}")
        return node

    def alternation(self):
        branches = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            atom = self.atom()
            items.append(self.quantified(atom))
        return ("seq", items)

    def quantified(self, atom):
        char = self.peek()
        bounds = None
        if char in ("*", "+", "?"):
            self.pos += 1
            bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
        elif char == "{":
            bounds = self.counted()
        if bounds is None:
            return atom
        if atom[0] in ("start", "end"):
            self.fail("a quantifier after an anchor")
        if self.peek() == "?":  # lazy: the same strings match
            self.pos += 1
        if self.peek() in ("*", "+", "?", "{") and (self.peek() != "{" or self.counted(look=True)):
            self.fail("a quantifier after a quantifier")
        return ("repeat", atom, *bounds)

    def counted(self, look: bool = False):
        """`{n}`, `{n,}` or `{n,m}` at the position (None where the brace is a literal, as ECMA-262
        reads a `{` that begins no quantifier)."""
        found = _COUNTED.match(self.text, self.pos)  # (the digits only: a `}` looked for further was
        if found is None:                               # quadratic in a pattern of literal braces)
            return None
        low, comma, high = found.group(1), found.group(2) or "", found.group(3) or ""
        end = found.end() - 1
        if look:
            return True
        if max(len(low), len(high)) > len(str(MAX_REPEAT)):
            self.fail(f"a repetition count above {MAX_REPEAT}")
        low_n, high_n = int(low), (int(high) if high else None) if comma else int(low)
        if max(low_n, high_n or 0) > MAX_REPEAT:
            self.fail(f"a repetition count above {MAX_REPEAT}")
        if high_n is not None and high_n < low_n:
            self.fail("a repetition's bounds are out of order")
        self.pos = end + 1
        return low_n, high_n

    def atom(self):
        char = self.take()
        if char == "(":
            if self.peek() == "?":
                self.pos += 1
                kind = self.take()
                if kind == "<" and self.peek() not in ("=", "!"):  # a named group
                    while self.take() != ">":
                        pass
                elif kind != ":":
                    self.fail("lookaround and other (?...) groups are not supported")
            node = self.alternation()
            if self.take() != ")":
                self.fail("an unclosed group")
            return node
        if char == ")":
            self.fail("an unmatched ')'")
        if char == "[":
            return ("chars", self.char_class())
        if char == ".":
            return ("chars", DOT)
        if char == "^":
            return ("start",)
        if char == "$":
            return ("end",)
        if char in "*+?":
            self.fail(f"nothing to repeat before {char!r}")
        if char == "\\":
            escaped = self.escape(in_class=False)
            return ("chars", escaped if isinstance(escaped, tuple) else _normalise([(escaped, escaped)]))
        return ("chars", _normalise([(ord(char), ord(char))]))

    def escape(self, in_class: bool, negated: bool = False):
        """After a backslash: a class (ranges) or one code point. `negated`: in a negated class."""
        char = self.take()
        if char in CLASS_ESCAPES:
            return tuple(CLASS_ESCAPES[char][1 if negated else 0]())
        if char in CHAR_ESCAPES and not (char == "0" and self.peek() is not None and self.peek().isdigit()):
            return CHAR_ESCAPES[char]
        if char == "b" and in_class:
            return 0x08
        if char in ("x", "u"):
            width = 2 if char == "x" else 4  # \u{...} is the u flag's, which patterns do not set
            digits = self.text[self.pos:self.pos + width]
            if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
                self.fail(f"a malformed \\{char} escape (\\x takes two hex digits, \\u four)")
            self.pos += width
            return int(digits, 16)
        if char.isalnum():  # \b, \B, \1, \p{...}, \k<...>, \cX: not supported
            self.fail(f"the escape \\{char} is not supported")
        return ord(char)  # an escaped punctuation character stands for itself

    def char_class(self) -> Ranges:
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        ranges = []
        while True:
            char = self.take()
            if char == "]":
                break
            low = self.escape(in_class=True, negated=negated) if char == "\\" else ord(char)
            if isinstance(low, tuple):
                ranges.extend(low)
                continue
            if self.peek() == "-" and self.pos + 1 < len(self.text) and self.text[self.pos + 1] != "]":
                self.pos += 1
                char = self.take()
                high = self.escape(in_class=True) if char == "\\" else ord(char)
                if isinstance(high, tuple):
                    self.fail("a class escape cannot end a range")
                if high < low:
                    self.fail("a class range out of order")
                ranges.append((low, high))
            else:
                ranges.append((low, low))
        return _negate(ranges) if negated else _normalise(ranges)


@dataclass
class _Nfa:
    epsilon: list[list[int]] = field(default_factory=list)
    edges: list[list[tuple[Ranges, int]]] = field(default_factory=list)

    def state(self) -> int:
        if len(self.epsilon) >= MAX_STATES:
            raise PatternError(f"the pattern is too large (more than {MAX_STATES} states)")
        self.epsilon.append([])
        self.edges.append([])
        return len(self.epsilon) - 1

    def build(self, node) -> tuple[int, int]:
        """A fragment for `node`: its entry and exit states."""
        kind = node[0]
        entry = self.state()
        if kind == "chars":
            exit_ = self.state()
            if node[1]:
                self.edges[entry].append((node[1], exit_))
            return entry, exit_
        if kind == "seq":
            current = entry
            for item in node[1]:
                if item[0] in ("start", "end"):
                    raise PatternError("^ and $ are supported only at the start and end of the pattern "
                                       "(or of its top-level alternatives)")
                first, last = self.build(item)
                self.epsilon[current].append(first)
                current = last
            return entry, current
        if kind == "alt":
            exit_ = self.state()
            for branch in node[1]:
                first, last = self.build(branch)
                self.epsilon[entry].append(first)
                self.epsilon[last].append(exit_)
            return entry, exit_
        _, inner, low, high = node  # repeat
        current = entry
        for _ in range(low):
            first, last = self.build(inner)
            self.epsilon[current].append(first)
            current = last
        if high is None:  # a loop: the inner fragment again and again
            first, last = self.build(inner)
            self.epsilon[current].append(first)
            self.epsilon[last].append(current)
            return entry, current
        exit_ = self.state()
        self.epsilon[current].append(exit_)
        for _ in range(high - low):
            first, last = self.build(inner)
            self.epsilon[current].append(first)
            self.epsilon[last].append(exit_)
            current = last
        return entry, exit_


def _anchored(branch) -> tuple[bool, bool, tuple]:
    """A top-level alternative without its leading `^` and trailing `$`, and whether it had them."""
    items = list(branch[1])
    start = bool(items) and items[0] == ("start",)
    items = items[1:] if start else items
    end = bool(items) and items[-1] == ("end",)
    items = items[:-1] if end else items
    return start, end, ("seq", items)


def _repeat(bits: list[int], start: int, period: int, end: int) -> None:
    """Each bit set's bits start .. start + period - 1 repeated up to bit end - 1."""
    for i, value in enumerate(bits):
        block = value >> start & (1 << period) - 1
        if block:
            width = period
            while width < end - start:
                block |= block << width
                width *= 2
            bits[i] = value & (1 << start) - 1 | (block & (1 << end - start) - 1) << start


class Pattern:
    """A pattern's automaton: `start`, `step(state, code_point)` (-1: no string with this prefix
    matches), `accepting(state)`, and `live(state, count)` under the string's length bounds."""

    def __init__(self, source: str, min_length: int = 0, max_length: int | None = None, whole: bool = False,
                 work: Work | None = None):
        """`whole`: match whole strings only (each top-level alternative anchored, with or without
        its own `^` and `$`), as a regex held over a whole answer is matched; else JSON Schema's
        search, anchored only where `^` / `$` say so. `work`: the compile's budget (a schema's
        patterns share one); a pattern alone has its own."""
        self.source, self.min_length, self.max_length, self.whole = source, min_length, max_length, whole
        if len(source) > MAX_SOURCE:
            raise PatternError(f"the pattern is too long (over {MAX_SOURCE} characters)")
        tree = _Parser(source).parse() if source else ("seq", [])
        nfa = _Nfa()
        entry, self._accept = nfa.state(), nfa.state()
        for branch in tree[1] if tree[0] == "alt" else [tree]:
            if branch[0] != "seq":
                branch = ("seq", [branch])
            start, end, body = _anchored(branch)
            start, end = start or whole, end or whole
            first, last = nfa.build(body)
            head = entry
            if not start:  # any text before
                head = nfa.state()
                nfa.epsilon[entry].append(head)
                nfa.edges[head].append((ANY, head))
            nfa.epsilon[head].append(first)
            if not end:  # any text after
                tail = nfa.state()
                nfa.epsilon[last].append(tail)
                nfa.edges[tail].append((ANY, tail))
                last = tail
            nfa.epsilon[last].append(self._accept)
        self._nfa = nfa
        # each distinct set of ranges on an edge, by number (hashed once: \W{20} repeats one of 800)
        self._classes: list[Ranges] = []
        numbers: dict[int, int] = {}
        by_value: dict[Ranges, int] = {}
        self._edges: list[list[tuple[int, int]]] = []
        for edges in nfa.edges:
            numbered = []
            for ranges, target in edges:
                if id(ranges) not in numbers:
                    numbers[id(ranges)] = by_value.setdefault(ranges, len(by_value))
                    if numbers[id(ranges)] == len(self._classes):
                        self._classes.append(ranges)
                numbered.append((numbers[id(ranges)], target))
            self._edges.append(numbered)
        self._partitions: dict[frozenset[int], list[tuple[int, int, frozenset[int]]]] = {}
        self._work = work if work is not None else Work()
        # code points between two of these are one class: every NFA state treats them alike
        self.cuts = tuple(sorted({b for ranges in self._classes for low, high in ranges for b in (low, high + 1)}))
        self._useful = self._coreachable()
        self._sets: list[frozenset[int]] = []
        self._ids: dict[frozenset[int], int] = {}
        self._successors: list[list[tuple[int, int, int]]] = []  # per state, its runs (low, high, target)
        self._run_starts: list[list[int]] = []
        self.start = self._intern(self._closure([entry]))
        if self.start < 0:
            raise PatternError("no string satisfies the pattern (of the characters a held string can write)")
        self._explore()
        self._partitions = self._edges = None  # the build's tables: a cached grammar keeps only its runs
        # with a pattern and a length: per state, the remaining lengths that reach the end
        self._lengths: list[int] | None = None
        if source and (min_length or max_length is not None):
            if max(min_length, max_length or 0) > MAX_LENGTH:
                raise PatternError(f"minLength and maxLength beside a pattern are at most {MAX_LENGTH}")
            self._lengths = self._remaining_lengths()
        if not self.live(self.start, 0):
            raise PatternError("no string satisfies the pattern within the length bounds")

    def _coreachable(self) -> set[int]:
        """NFA states from which the accepting state can be reached."""
        back: list[list[int]] = [[] for _ in self._nfa.epsilon]
        for source, targets in enumerate(self._nfa.epsilon):
            for target in targets:
                back[target].append(source)
        for source, edges in enumerate(self._nfa.edges):
            for _, target in edges:
                back[target].append(source)
        seen, todo = {self._accept}, [self._accept]
        while todo:
            for source in back[todo.pop()]:
                if source not in seen:
                    seen.add(source)
                    todo.append(source)
        return seen

    def _closure(self, states) -> frozenset[int]:
        seen, todo = set(states), list(states)
        while todo:
            for target in self._nfa.epsilon[todo.pop()]:
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return frozenset(s for s in seen if s in self._useful)

    def _intern(self, states: frozenset[int]) -> int:
        if not states:
            return -1
        state = self._ids.get(states)
        if state is None:
            if len(self._sets) >= MAX_DFA_STATES:
                raise PatternError(f"the pattern's automaton is too large (more than {MAX_DFA_STATES} states)")
            state = self._ids[states] = len(self._sets)
            self._sets.append(states)
        return state

    def _explore(self) -> None:
        """Every state from the start, with its runs: built whole here, so that nothing is added
        while masks are made (on other threads) and a pattern's size is known when it compiles."""
        while len(self._successors) < len(self._sets):
            runs = self._runs(self._sets[len(self._successors)])
            self._successors.append(runs)
            self._run_starts.append([low for low, _, _ in runs])

    def _runs(self, members: frozenset[int]) -> list[tuple[int, int, int]]:
        """(low, high, next state) for each run of code points that leads anywhere from the NFA
        states `members`: the runs where the same edge classes hold (a sweep, shared by states
        with the same classes), each run's targets closed over."""
        targets: dict[int, set[int]] = {}
        for member in members:
            for number, target in self._edges[member]:
                targets.setdefault(number, set()).add(target)
        segments = self._partition(frozenset(targets))
        self._work.spend(len(segments))
        reached: dict[frozenset[int], int] = {}
        runs: list[tuple[int, int, int]] = []
        for low, high, active in segments:
            if active not in reached:
                reached[active] = self._intern(self._closure({t for n in active for t in targets[n]}))
            target = reached[active]
            if target < 0:
                continue
            if runs and runs[-1][2] == target and runs[-1][1] == low - 1:
                runs[-1] = (runs[-1][0], high, target)
            else:
                runs.append((low, high, target))
        return runs

    def _partition(self, numbers: frozenset[int]) -> list[tuple[int, int, frozenset[int]]]:
        """(low, high, the classes that hold) for each run of code points some of these classes hold."""
        if numbers not in self._partitions:
            events: dict[int, list[tuple[int, int]]] = {}
            for number in numbers:
                for low, high in self._classes[number]:
                    events.setdefault(low, []).append((number, 1))
                    events.setdefault(high + 1, []).append((number, -1))
            active: set[int] = set()
            segments = []
            points = sorted(events)
            for point, following in zip(points, points[1:] + [MAX_CODE_POINT + 1]):
                for number, change in events[point]:
                    if change > 0:
                        active.add(number)
                    else:
                        active.discard(number)
                if active and point <= MAX_CODE_POINT:
                    segments.append((point, following - 1, frozenset(active)))
            self._partitions[numbers] = segments
        return self._partitions[numbers]

    def character_class(self, code_point: int) -> int:
        """Code points of one class lead every state to the same state."""
        return bisect.bisect_right(self.cuts, code_point)

    def representative(self, character_class: int) -> int:
        """A code point of the class."""
        return self.cuts[character_class - 1] if character_class else 0

    def accepting(self, state: int) -> bool:
        return self._accept in self._sets[state]

    def step(self, state: int, code_point: int) -> int:
        """The state after `code_point` (-1: no match can follow)."""
        i = bisect.bisect_right(self._run_starts[state], code_point) - 1
        if i < 0:
            return -1
        low, high, target = self._successors[state][i]
        return target if code_point <= high else -1

    def successors(self, state: int) -> list[tuple[int, int, int]]:
        """(low, high, next state) for each run of code points that leads anywhere from `state`."""
        return self._successors[state]

    @property
    def free(self) -> bool:
        """Any characters, only their number bounded."""
        return not self.source and not self.whole

    def after(self, count: int) -> int:
        """The count to keep after `count` characters: counts past every bound behave alike."""
        return min(count, self.max_length if self.max_length is not None else self.min_length)

    def _remaining_lengths(self) -> list[int]:
        """Per state, a bit set of the lengths k (up to the bounds) of the strings that lead it to
        the end; with no maxLength, bit minLength stands for every k >= minLength."""
        states = range(len(self._sets))
        before: dict[int, set[int]] = {s: set() for s in states}
        for state in states:
            for _, _, target in self.successors(state):
                before[target].add(state)

        def back(layer: set[int]) -> set[int]:  # the states one character before `layer`
            self._work.spend(1 + sum(len(before[t]) for t in layer) // LENGTH_STEPS)
            return {s for t in layer for s in before[t]}

        cap = self.max_length if self.max_length is not None else self.min_length
        lengths = cap + (self.max_length is not None)  # bits 0 .. lengths - 1 from the layers
        bits = [0] * len(self._sets)
        layer = {s for s in states if self.accepting(s)}  # the states k characters from the end
        seen: dict[int, list[int]] = {}  # a layer's hash -> the k it was seen at
        for k in range(lengths):
            key = hash(frozenset(layer))
            # each layer follows from the one before: once one repeats, the rest repeat with it
            again = next((j for j in seen.get(key, ()) if all((bits[s] >> j & 1) == (s in layer) for s in states)),
                         None)
            if again is not None:
                _repeat(bits, again, k - again, lengths)
                break
            seen.setdefault(key, []).append(k)
            for state in layer:
                bits[state] |= 1 << k
            layer = back(layer)
        if self.max_length is None:  # bit cap: some string of cap characters or more leads to the end
            layer = set(states)
            for _ in range(cap):  # each layer within the one before: done when one is the same
                before_layer, layer = layer, back(layer)
                if len(layer) == len(before_layer):
                    break
            for state in layer:
                bits[state] |= 1 << cap
        return bits

    def live(self, state: int, count: int) -> bool:
        """Some completion of a string now in `state` with `count` characters matches, within the
        length bounds."""
        if self.max_length is not None and count > self.max_length:
            return False
        if self._lengths is None:  # no length, or no pattern: every state left in a set can reach the end
            return True
        count = self.after(count)
        low = max(0, self.min_length - count)  # the fewest characters still to come
        if self.max_length is None:
            return self._lengths[state] >> low != 0
        return self._lengths[state] >> low & (1 << self.max_length - count - low + 1) - 1 != 0

    def matches(self, text: str) -> bool:
        """The whole string `text` satisfies the pattern and the length bounds."""
        state = self.start
        for char in text:
            state = self.step(state, ord(char))
            if state < 0:
                return False
        return self.accepting(state) and self.min_length <= len(text) and \
            (self.max_length is None or len(text) <= self.max_length)

    def any_live(self, state: int, count: int, low: int, high: int) -> bool:
        """Some code point in [low, high] leads, as the next character, to a live state."""
        return any(run_low <= high and low <= run_high and self.live(target, count + 1)
                   for run_low, run_high, target in self.successors(state))
