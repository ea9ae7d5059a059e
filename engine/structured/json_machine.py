"""A byte-at-a-time recognizer of the JSON documents a grammar (engine/structured/schema.py) allows.

A state is a tuple of frames, the innermost last, each frame a plain tuple: states are hashable (the
token masks are cached per state) and advancing builds a new top frame, never changes one. `()` is
a finished document, after which nothing may follow.

Each JSON value's kind is known from its first byte (`{`, `[`, `"`, a digit or `-`, or a literal's
first byte), so the machine is deterministic; the grammar merges a union's branches so that each
first byte leads to one of them. Whitespace is allowed wherever JSON allows it, in runs of what
JSON writers lay out: a space or tab, then at most one line break (`\n`, `\r\n` or `\r`) and an
indentation of at most `MAX_INDENT` spaces and tabs (llama.cpp's JSON grammars take about as much). A
small model that drifts into blank lines or tabs (they do, inside arrays) gets a short run and then
the value, instead of padding its answer until `max_tokens`. Nesting is bounded too (`MAX_DEPTH`),
and so is a number's length.

A string held to a pattern or a length (a TEXT frame) runs its characters, decoded from UTF-8 or
from an escape, through the pattern's automaton (engine/structured/regex.py); a byte is taken only
where the string can still be completed, so a part of a character is refused where no character it
can begin leads on. Such strings take the short escapes (`\\n`, `\\"`, ...), not `\\uXXXX`. A bounded
number keeps its text so far and takes a byte only where a number in its bounds can still follow
(engine/structured/number_range.py); it has no exponent.

A grammar of raw text (`Grammar.raw`: a whole answer held to a regular expression or to one of a
list of strings, vLLM's `structured_outputs` regex or choice) is one frame: a RAW frame, a TEXT
frame whose characters are the answer's own (no quotes, no escapes), ended by EOS where the pattern
accepts, or at once where no character can follow; or a LITERALS frame of the choices' bytes.
"""
from __future__ import annotations

from engine.structured.regex import MAX_CODE_POINT
from engine.structured.schema import NUMBER_BYTES, Grammar

MAX_INDENT = 20
# a whitespace run's field: its indentation's bytes after the line break, plus flags: a space or tab
# before the break, a CR, and the break done (an LF, or what follows a lone CR)
RUN_PAD, RUN_CR, RUN_BROKEN = 1 << 8, 1 << 9, 1 << 10
RUN_INDENT = RUN_PAD - 1
MAX_NUMBER = NUMBER_BYTES  # bytes of one number
MAX_DEPTH = 128  # frames: values nested about 64 deep (json.loads itself stops near 1,000)

VALUE, OBJECT, ARRAY, STRING, NUMBER, LITERALS, TEXT, RAW = range(8)
# object phases: after "{", after ",", after a key (":" next), after a value ("," or "}" next)
O_FIRST, O_KEY, O_COLON, O_NEXT = range(4)
# array phases: after "[", after ",", after an item
A_FIRST, A_ITEM, A_NEXT = range(3)
# string phases: characters, inside a multi-byte UTF-8 character, after a backslash, inside \uXXXX,
# and after a high surrogate's \uXXXX (its low surrogate's escape must follow); a string frame is
# (STRING, phase, bytes left, then the lowest and highest next byte (S_UTF8) or what the escape's
# digits so far say (S_HEX: U_ANY, U_D after a first digit d, U_HIGH a high surrogate), 0)
S_CHARS, S_UTF8, S_ESCAPE, S_HEX, S_LOW = range(5)
U_ANY, U_D, U_HIGH = range(3)
CHARS = (STRING, S_CHARS, 0, 0, 0)
# number phases, along JSON's number grammar: -? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?
N_START, N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(9)
N_ENDS = frozenset((N_ZERO, N_INT, N_FRAC, N_EXP))
# a TEXT frame: (TEXT, node, automaton state, characters so far, phase, then in T_UTF8 the bytes left,
# the code point's bits so far, and the lowest and highest next byte); phases: between characters,
# inside a multi-byte UTF-8 character, after a backslash
T_CHARS, T_UTF8, T_ESCAPE = range(3)
SHORT_ESCAPES = {0x22: 0x22, 0x5C: 0x5C, 0x2F: 0x2F, 0x62: 0x08, 0x66: 0x0C, 0x6E: 0x0A, 0x72: 0x0D, 0x74: 0x09}

WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
HIGH_SECOND, LOW_SECOND = frozenset(b"89abAB"), frozenset(b"cdefCDEF")  # \uD8.. - \uDB.., \uDC.. - \uDF..
# S_LOW's bytes by how many are left: \, u, d, the low surrogate's second digit, two hex digits
LOW_ESCAPE = {6: frozenset(b"\\"), 5: frozenset(b"u"), 4: frozenset(b"dD"), 3: LOW_SECOND, 2: HEX, 1: HEX}
ESCAPES = frozenset(b'"\\/bfnrt')
POP = None  # a handler's frames when its value is complete


def start(grammar: Grammar) -> tuple:
    if grammar.raw:  # a regex's pattern, or choices' literals
        root = grammar.nodes[grammar.root]
        if root.literals:
            return ((LITERALS, root.literals, 0, tuple(range(len(root.literals)))),)
        return ((RAW, grammar.root, root.text.start, 0, T_CHARS, 0, 0, 0, 0),)
    return ((VALUE, grammar.root, 0),)


def plain_room(grammar: Grammar, state: tuple) -> int | None:
    """Between a string's characters where any character may come: how many more it may take
    (tokens of whole UTF-8 characters other than `"`, `\\` and control characters then leave the
    state as it is, or, in a string with a length, only add to its count); None elsewhere."""
    if not state:
        return None
    frame = state[-1]
    if frame == CHARS:
        return MAX_ROOM
    if frame[0] not in (TEXT, RAW) or frame[4] != T_CHARS:
        return None
    pattern = grammar.nodes[frame[1]].text
    if not pattern.free:
        return None
    return MAX_ROOM if pattern.max_length is None else pattern.max_length - frame[3]


MAX_ROOM = 1 << 30


def held_text(grammar: Grammar, state: tuple) -> tuple | None:
    """Between the characters of a string held to a pattern: (the pattern, its automaton's state,
    the characters so far); None elsewhere."""
    frame = state[-1] if state else None
    if frame is None or frame[0] not in (TEXT, RAW) or frame[4] != T_CHARS or grammar.nodes[frame[1]].text.free:
        return None
    return grammar.nodes[frame[1]].text, frame[2], frame[3]


def can_end(state: tuple, grammar: Grammar | None = None) -> bool:
    """The bytes so far are a whole document (a number or literal at the top may still go on, and
    raw text where its pattern accepts: `grammar` is needed for raw text)."""
    if not state:
        return True
    if len(state) > 1:
        return False
    frame = state[0]
    if frame[0] == RAW:
        pattern = grammar.nodes[frame[1]].text
        return frame[4] == T_CHARS and frame[3] >= pattern.min_length and pattern.accepting(frame[2])
    if frame[0] == NUMBER:
        return frame[5]
    if frame[0] == LITERALS:
        return any(len(c) == frame[2] for c in frame[1])
    return False


def advance(grammar: Grammar, state: tuple, byte: int) -> tuple | None:
    """The state after `byte`, or None where the grammar allows no such byte."""
    nodes = grammar.nodes
    while state:
        frame = state[-1]
        kind = frame[0]
        out = _DEEP_HANDLERS[kind](grammar, frame, byte, len(state)) if kind in _DEEP_HANDLERS \
            else _HANDLERS[kind](nodes, frame, byte)
        if out is None:
            return None
        frames, consumed, result = out
        if frames is not POP:
            state = state[:-1] + frames
            if len(state) > MAX_DEPTH:
                return None
        else:  # the top value is complete: its parent takes its result, and the byte if it is left
            state = state[:-1]
            if state:
                state = state[:-1] + (_resume(nodes, state[-1], result),)
        if consumed:
            return state
    return None


def _resume(nodes, parent: tuple, result) -> tuple:
    """The parent frame once its child value is complete, given the child's `result` (which of its
    literals it matched): an object learns which property's key it read, and so which value comes
    next; a tagged union's object learns its tag, and so which branch its other properties follow."""
    if parent[0] != OBJECT or result is None:
        return parent
    _, n, phase, next_prop, _, ws = parent
    spec = nodes[n].object
    if phase == O_COLON:
        return (OBJECT, n, phase, result + 1, spec.properties[result].node, ws)
    if spec.variants:  # the tag's value
        return (OBJECT, spec.variants[result], phase, next_prop, -1, ws)
    return parent


def _whitespace(frame: tuple, byte: int):
    """The frame with one more whitespace byte (its last field says where the run is), or None:
    a run is `[ \t]? (\r\n | \n | \r) [ \t]{0,MAX_INDENT}` or a part of that."""
    run = frame[-1]
    if byte in (0x20, 0x09):
        if run & RUN_BROKEN:
            if run & RUN_INDENT >= MAX_INDENT:
                return None
            run += 1
        elif run & RUN_CR:  # after a lone CR: the break is done, this is indentation
            run |= RUN_BROKEN
            run += 1
        elif run & RUN_PAD:
            return None
        else:
            run |= RUN_PAD
    elif byte == 0x0A:
        if run & RUN_BROKEN:
            return None
        run |= RUN_BROKEN  # after a CR: its LF, the same break
    elif byte == 0x0D:
        if run & (RUN_CR | RUN_BROKEN):
            return None
        run |= RUN_CR
    else:
        return None
    return (frame[:-1] + (run,),), True, None


def _value(grammar, frame, byte, depth: int):
    """`depth`: frames with this one: an object or array is opened only where it can be closed
    within MAX_DEPTH (a recursive schema's required property would otherwise lead, 64 objects
    down, to a state that no byte continues)."""
    _, n, _ = frame
    node = grammar.nodes[n]
    if byte in WHITESPACE:
        return _whitespace(frame, byte)
    if byte == 0x7B and node.object is not None and depth - 1 + grammar.object_height[n] <= MAX_DEPTH:  # {
        return ((OBJECT, n, O_FIRST, 0, -1, 0),), True, None
    if byte == 0x5B and node.array is not None and depth - 1 + grammar.array_height[n] <= MAX_DEPTH:  # [
        return ((ARRAY, n, A_FIRST, 0, 0),), True, None
    if byte == 0x22 and node.string:  # "
        if node.text is None:
            return (CHARS,), True, None
        return ((TEXT, n, node.text.start, 0, T_CHARS, 0, 0, 0, 0),), True, None
    if node.number is not None and (byte == 0x2D or byte in DIGITS):
        return ((NUMBER, n, N_START, 0, b"", False),), False, None
    if node.literals:  # which literal it is reaches the parent (a tagged union's tag picks its branch)
        return ((LITERALS, node.literals, 0, tuple(range(len(node.literals)))),), False, None
    return None


def _keys(grammar, spec, index: int, depth: int) -> tuple[tuple[bytes, ...], tuple[int, ...]] | None:
    """The keys that may come next whose values can be completed from an object at `depth` (an
    optional property whose value cannot is passed over; a required one always can: its object was
    begun only where it could be completed)."""
    keys = spec.keys_from(index)
    if keys is None:
        return None
    kept = [(name, i) for name, i in zip(*keys) if depth + grammar.height[spec.properties[i].node] <= MAX_DEPTH]
    return (tuple(name for name, _ in kept), tuple(i for _, i in kept)) if kept else None


def _free_keys(grammar, spec, depth: int) -> bool:
    """Whether a free key may come next: its value can be completed from an object at `depth`."""
    return spec.additional is not None and depth + grammar.height[spec.additional] <= MAX_DEPTH


def _object(grammar, frame, byte, depth: int):
    _, n, phase, next_prop, value_node, _ = frame
    spec = grammar.nodes[n].object
    if byte in WHITESPACE:
        return _whitespace(frame, byte)
    if phase in (O_FIRST, O_KEY) and byte == 0x22:  # a key
        if spec.properties:
            keys = _keys(grammar, spec, next_prop, depth)
            if not keys:
                return None
            names, indexes = keys
            return ((OBJECT, n, O_COLON, next_prop, -1, 0), (LITERALS, names, 0, indexes)), False, None
        if not _free_keys(grammar, spec, depth):
            return None
        return ((OBJECT, n, O_COLON, 0, spec.additional, 0), CHARS), True, None
    if phase == O_COLON and byte == 0x3A:  # :
        return ((OBJECT, n, O_NEXT, next_prop, -1, 0), (VALUE, value_node, 0)), True, None
    if phase in (O_FIRST, O_NEXT) and byte == 0x7D:  # }
        return (POP, True, None) if not spec.required_from(next_prop) else None
    if phase == O_NEXT and byte == 0x2C:  # ,
        more = _keys(grammar, spec, next_prop, depth) if spec.properties else _free_keys(grammar, spec, depth)
        return (((OBJECT, n, O_KEY, next_prop, -1, 0),), True, None) if more else None
    return None


def _array(grammar, frame, byte, depth: int):
    """`depth`: frames with this one. A `,` is taken only where the next item (a tuple's positions
    each have their own schema) can be completed within MAX_DEPTH."""
    _, n, phase, count, _ = frame
    spec = grammar.nodes[n].array
    if byte in WHITESPACE:
        return _whitespace(frame, byte)
    if phase == A_NEXT:
        if byte == 0x2C and (spec.max_items is None or count < spec.max_items) and \
                depth + grammar.height[spec.item(count)] <= MAX_DEPTH:  # ,
            return ((ARRAY, n, A_ITEM, count, 0),), True, None
        if byte == 0x5D and count >= spec.min_items:  # ]
            return POP, True, None
        return None
    if phase == A_FIRST and byte == 0x5D:
        return (POP, True, None) if spec.min_items == 0 else None
    if spec.max_items == 0:
        return None
    # an item begins with this byte: the item's value takes it
    return ((ARRAY, n, A_NEXT, min(count + 1, spec.count_cap), 0), (VALUE, spec.item(count), 0)), False, None


def _utf8_lead(byte: int) -> tuple | None:
    """The frame after the first byte of a multi-byte UTF-8 character: the bytes still to come and
    the range of the next one (which rules out overlong forms, surrogates and code points past
    U+10FFFF, as a strict decoder does)."""
    if 0xC2 <= byte <= 0xDF:
        return STRING, S_UTF8, 1, 0x80, 0xBF
    if 0xE0 <= byte <= 0xEF:
        return STRING, S_UTF8, 2, 0xA0 if byte == 0xE0 else 0x80, 0x9F if byte == 0xED else 0xBF
    if 0xF0 <= byte <= 0xF4:
        return STRING, S_UTF8, 3, 0x90 if byte == 0xF0 else 0x80, 0x8F if byte == 0xF4 else 0xBF
    return None


def _string(nodes, frame, byte):
    _, phase, left, low, high = frame
    if phase == S_CHARS:
        if byte == 0x22:
            return POP, True, None
        if byte == 0x5C:
            return ((STRING, S_ESCAPE, 0, 0, 0),), True, None
        if byte < 0x80:
            return None if byte < 0x20 else ((frame,), True, None)
        lead = _utf8_lead(byte)
        return None if lead is None else ((lead,), True, None)
    if phase == S_UTF8:
        if not low <= byte <= high:
            return None
        return (((STRING, S_UTF8, left - 1, 0x80, 0xBF) if left > 1 else CHARS,), True, None)
    if phase == S_ESCAPE:
        if byte in ESCAPES:
            return (CHARS,), True, None
        return (((STRING, S_HEX, 4, U_ANY, 0),), True, None) if byte == 0x75 else None  # u
    if phase == S_LOW:  # the low surrogate a high one needs, escaped: \uDC00 - \uDFFF
        if byte not in LOW_ESCAPE[left]:
            return None
        return (((STRING, S_LOW, left - 1, 0, 0) if left > 1 else CHARS,), True, None)
    # S_HEX: a surrogate is a pair (a high one, then a low one's escape) or it is no text (a
    # decoder, and the client's JSON parser, refuse a lone one)
    if byte not in HEX:
        return None
    mode = low
    if left == 4:
        mode = U_D if byte in b"dD" else U_ANY
    elif left == 3 and mode == U_D:
        if byte in LOW_SECOND:
            return None
        mode = U_HIGH if byte in HIGH_SECOND else U_ANY
    if left > 1:
        return ((STRING, S_HEX, left - 1, mode, 0),), True, None
    return (((STRING, S_LOW, 6, 0, 0) if mode == U_HIGH else CHARS),), True, None


def _text(nodes, frame, byte):
    """A TEXT frame, or a RAW one: raw text takes quotes, backslashes and control characters as
    the characters they are (its pattern says which), and is ended by EOS, not by a quote."""
    kind, n, automaton, count, phase, left, bits, low, high = frame
    pattern = nodes[n].text
    if phase == T_CHARS:
        if kind == RAW and byte < 0x80:
            return _character(pattern, frame, byte)
        if byte == 0x22:
            return (POP, True, None) if count >= pattern.min_length and pattern.accepting(automaton) else None
        if byte == 0x5C:
            if not any(pattern.any_live(automaton, count, c, c) for c in SHORT_ESCAPES.values()):
                return None
            return ((TEXT, n, automaton, count, T_ESCAPE, 0, 0, 0, 0),), True, None
        if byte < 0x80:
            return None if byte < 0x20 else _character(pattern, frame, byte)
        lead = _utf8_lead(byte)
        if lead is None:
            return None
        left, low, high = lead[2:]
        bits = byte & (0x7F >> (left + 1))
    elif phase == T_UTF8:
        if not low <= byte <= high:
            return None
        bits, left, low, high = bits << 6 | byte & 0x3F, left - 1, 0x80, 0xBF
        if not left:
            return _character(pattern, frame, bits)
    else:  # T_ESCAPE
        return _character(pattern, frame, SHORT_ESCAPES[byte]) if byte in SHORT_ESCAPES else None
    # inside a character: taken where some character it can still become leads on
    shift = 6 * (left - 1)
    first = bits << 6 * left | (low & 0x3F) << shift
    last = bits << 6 * left | (high & 0x3F) << shift | (1 << shift) - 1
    if not pattern.any_live(automaton, count, first, last):
        return None
    return ((kind, n, automaton, count, T_UTF8, left, bits, low, high),), True, None


def _character(pattern, frame, code_point: int):
    kind, n, automaton, count = frame[:4]
    automaton = pattern.step(automaton, code_point)
    if automaton < 0 or not pattern.live(automaton, count + 1):
        return None
    count = pattern.after(count + 1)
    if kind == RAW and not pattern.any_live(automaton, count, 0, MAX_CODE_POINT):  # the answer is whole
        return POP, True, None
    return ((kind, n, automaton, count, T_CHARS, 0, 0, 0, 0),), True, None


def _number_phase(phase: int, byte: int, integer: bool, exponent: bool = True) -> int | None:
    digit = byte in DIGITS
    if phase in (N_START, N_MINUS):
        if byte == 0x30:
            return N_ZERO
        if digit:
            return N_INT
        return N_MINUS if phase == N_START and byte == 0x2D else None
    if phase in (N_INT, N_FRAC, N_EXP) and digit:
        return phase
    if phase in (N_ZERO, N_INT) and byte == 0x2E and not integer:  # .
        return N_DOT
    if phase in (N_ZERO, N_INT, N_FRAC) and byte in (0x65, 0x45) and not integer and exponent:  # e E
        return N_E
    if phase == N_DOT and digit:
        return N_FRAC
    if phase == N_E and byte in (0x2B, 0x2D):  # + -
        return N_ESIGN
    if phase in (N_E, N_ESIGN) and digit:
        return N_EXP
    return None


def _number(nodes, frame, byte):
    """A frame (NUMBER, node, phase, length, then a bounded number's text so far, and whether the
    number may end here)."""
    _, n, phase, length, text, whole = frame
    node = nodes[n]
    integer, bounds = node.number == "integer", node.bounds
    after = _number_phase(phase, byte, integer, exponent=bounds is None)
    if after is not None:
        if bounds is None:  # within the length, with room left for a digit where it cannot end yet
            if length + (1 if after in N_ENDS else 2) <= MAX_NUMBER:
                return ((NUMBER, n, after, length + 1, b"", after in N_ENDS),), True, None
        else:
            text += bytes((byte,))
            if bounds.reachable(text, integer, MAX_NUMBER - len(text)):
                return ((NUMBER, n, after, length + 1, text, after in N_ENDS and bounds.holds(text)),), True, None
    if whole:  # the number ended before this byte, which its parent takes
        return POP, False, None
    return None


def _literals(nodes, frame, byte):
    _, candidates, pos, results = frame
    keep = [i for i, c in enumerate(candidates) if len(c) > pos and c[pos] == byte]
    if len(keep) == 1 and len(candidates[keep[0]]) == pos + 1:
        return POP, True, results[keep[0]]
    if keep:
        return ((LITERALS, tuple(candidates[i] for i in keep), pos + 1, tuple(results[i] for i in keep)),), True, None
    whole = [r for c, r in zip(candidates, results) if len(c) == pos]  # e.g. 1 of the literals 1 and 10
    return (POP, False, whole[0]) if whole else None


_DEEP_HANDLERS = {VALUE: _value, OBJECT: _object, ARRAY: _array}  # these take the grammar and the state's depth
_HANDLERS = {STRING: _string, NUMBER: _number, LITERALS: _literals, TEXT: _text, RAW: _text}
