"""engine/structured/number_range.py against brute force: every number text of a few bytes is
written out, and what `holds`, `reachable` and `empty` say is checked against plain Decimal
comparisons of the whole texts."""
from __future__ import annotations

import itertools
import random
from decimal import Decimal
from functools import lru_cache

import pytest

from engine.structured.number_range import Range

D = Decimal

RANGES = {
    "closed": Range(D(0), False, D(100), False),
    "open": Range(D(0), True, D(100), True),
    "at least 5": Range(low=D(5)),
    "above 5": Range(low=D(5), low_open=True),
    "at most -7": Range(high=D(-7)),
    "below -7": Range(high=D(-7), high_open=True),
    "halves": Range(D("-2.25"), False, D("0.5"), False),
    "open halves": Range(D("-2.25"), True, D("0.5"), True),
    "just above 0": Range(D(0), True, D("0.001"), False),
    "around 0": Range(D("-0.05"), True, D("0.05"), True),
    "negative": Range(D(-1000), False, D("-999.5"), False),
    "equal": Range(D(3), False, D(3), False),
    "equal half": Range(D("0.5"), False, D("0.5"), False),
    "zero": Range(D(0), False, D(0), False),
    "between 1 and 2": Range(D(1), True, D(2), True),
    "crossed": Range(D(5), False, D(3), False),
    "equal open": Range(D(3), True, D(3), False),
    "large": Range(low=D("1e30")),
    "tiny": Range(D(0), True, D("1e-10"), False),
    "edge": Range(D("-9999"), False, D("99999"), True),
    # multipleOf
    "fives": Range(step=D(5)),
    "tenths to 1": Range(D(0), False, D(1), False, step=D("0.1")),
    "quarters": Range(D(-3), True, D(3), True, step=D("0.25")),
    "threes above -10": Range(low=D(-10), step=D(3)),
    "sevens": Range(step=D(7)),
    "0.3s below 2": Range(high=D(2), high_open=True, step=D("0.3")),
    "hundreds": Range(D(1), False, D(999), False, step=D("1E+2")),
    "thousandths": Range(D("0.01"), True, D("0.02"), False, step=D("0.001")),
    "no multiple": Range(D(1), False, D(4), False, step=D(5)),
}
SMALL = 4  # bytes of every text, for every range
LARGE = 5  # for the ranges (and kinds: integer or not) in WIDE
WIDE = (("halves", False), ("just above 0", False), ("edge", True), ("quarters", False), ("sevens", True),
        ("0.3s below 2", False))


@lru_cache(maxsize=None)
def universe(length: int, integer: bool):
    """Every prefix of -?(0|[1-9][0-9]*)(\\.[0-9]+)? (no fraction when `integer`) of at most `length`
    bytes, and the whole numbers among them with their values."""
    leads = [""] + ["0"] + ["".join(p) for n in range(1, length + 1)
                            for p in itertools.product("123456789", *["0123456789"] * (n - 1))]
    prefixes, whole = [], {}
    for sign in ("", "-"):
        for lead in leads:
            text = sign + lead
            if len(text) > length:
                continue
            prefixes.append(text)
            if lead:
                whole[text] = D(text)
            if integer or not lead:
                continue
            for n in range(length - len(text)):
                for fraction in itertools.product("0123456789", repeat=n):
                    prefixes.append(f"{text}.{''.join(fraction)}")
                    if n:
                        whole[prefixes[-1]] = D(prefixes[-1])
    return [p.encode() for p in prefixes], {t.encode(): v for t, v in whole.items()}


def inside(r: Range, value: Decimal) -> bool:
    if r.low is not None and (value <= r.low if r.low_open else value < r.low):
        return False
    if r.step is not None and value % r.step != 0:
        return False
    return r.high is None or (value < r.high if r.high_open else value <= r.high)


def cases():
    for name in RANGES:
        for integer in (True, False):
            yield name, integer, SMALL
            if (name, integer) in WIDE:
                yield name, integer, LARGE


@pytest.mark.parametrize("name,integer,length", list(cases()))
def test_against_every_text(name, integer, length):
    r = RANGES[name]
    prefixes, whole = universe(length, integer)
    shortest = {}  # prefix -> the length of the shortest whole text in the range that it begins
    for text in sorted(whole, key=len):
        held = inside(r, whole[text])
        assert r.holds(text) == held, text
        if held:
            for end in range(len(text), -1, -1):
                if text[:end] in shortest:
                    break  # and so are its shorter prefixes, by a text no longer
                shortest[text[:end]] = len(text)
    for p in prefixes:
        need = shortest.get(p, length + 1) - len(p)
        for room in range(length - len(p) + 1):
            assert r.reachable(p, integer, room) == (need <= room), (p, room)
    for n in range(length + 1):
        assert r.empty(integer, n) == (shortest.get(b"", n + 1) > n), n


def test_empty_examples():
    assert RANGES["crossed"].empty(False, 24)
    assert RANGES["equal open"].empty(False, 24)
    assert RANGES["between 1 and 2"].empty(True, 24)
    assert not RANGES["between 1 and 2"].empty(False, 3)
    assert RANGES["between 1 and 2"].empty(False, 2)
    assert RANGES["large"].empty(True, 30) and not RANGES["large"].empty(True, 31)
    assert not RANGES["tiny"].empty(False, 12) and RANGES["tiny"].empty(False, 11)


def test_precision_examples():
    r = RANGES["just above 0"]
    assert not r.reachable(b"0.00", False, 0)
    assert r.reachable(b"0.00", False, 1)
    assert not r.reachable(b"0.001", False, 0) or r.holds(b"0.001")
    assert not r.reachable(b"0.0010", False, 5) or r.holds(b"0.0010")
    assert not r.reachable(b"0.0011", False, 5)
    assert not r.reachable(b"-", False, 23)
    assert not r.reachable(b"", True, 24)
    integers = Range(D(100), False, D(199), False)  # "1", room 2: 1, 10..19 and 100..199 reachable
    assert [integers.reachable(b"1", True, n) for n in range(4)] == [False, False, True, True]
    assert not integers.reachable(b"2", True, 5) and not integers.reachable(b"0", True, 5)
    assert integers.reachable(b"-", True, 5) is False
    assert Range(D(0), False, D(0), False).holds(b"-0")
    assert not Range(D(0), True).reachable(b"-0", False, 22)


def test_large_bounds_are_exact():
    r = Range(high=D(-(10**40) - 1))  # 41 digits: more than a default Decimal context keeps
    assert not r.reachable(b"-1" + b"0" * 40, True, 0) and not r.holds(b"-1" + b"0" * 40)
    assert r.reachable(b"-1" + b"0" * 39, True, 1) and r.holds(b"-1" + b"0" * 39 + b"1")
    assert r.empty(True, 41) and not r.empty(True, 42)
    r = Range(D(10**40 + 1), True)
    assert not r.reachable(b"1" + b"0" * 39 + b"1", False, 0)
    assert r.reachable(b"1" + b"0" * 39 + b"1", False, 2)  # .1
    assert r.reachable(b"1" + b"0" * 39 + b"1.", False, 1)
    assert not r.reachable(b"1" + b"0" * 39 + b"1.", False, 0)  # "." needs a digit after it


def walk(r: Range, integer: bool, room: int, rng: random.Random) -> bytes:
    """A number written byte by byte, each byte one that keeps a number in the range reachable;
    fails where no byte does and the text so far cannot end."""
    text = b""
    while True:
        ends = text not in (b"", b"-") and not text.endswith(b".") and r.holds(text)
        allowed = [b for b in b"-0123456789." if _valid(text + bytes((b,)), integer)
                   and r.reachable(text + bytes((b,)), integer, room - len(text) - 1)]
        assert allowed or ends, text
        if not allowed or (ends and rng.random() < 0.2):
            return text
        text += bytes((rng.choice(allowed),))


def _valid(text: bytes, integer: bool) -> bool:
    """Whether `text` is a prefix of the number grammar (the machine's own check before the range's)."""
    body = text[1:] if text.startswith(b"-") else text
    if b"-" in body or body.count(b".") > 1 or (integer and b"." in body) or body.startswith(b"."):
        return False
    lead = body.split(b".")[0]
    return not (len(lead) > 1 and lead.startswith(b"0"))


@pytest.mark.parametrize("name", [n for n in RANGES if n not in ("crossed", "equal open")])
def test_walks_never_dead_end(name):
    """At the machine's length of 24 bytes, numbers written one allowed byte at a time always end in
    the range."""
    r, rng = RANGES[name], random.Random(name)
    for integer in (True, False):
        if r.empty(integer, 24):
            assert not r.reachable(b"", integer, 24)
            continue
        for _ in range(30):
            text = walk(r, integer, 24, rng)
            assert len(text) <= 24 and r.holds(text) and inside(r, D(text.decode())), text


def test_in_range_values_are_reachable_at_every_byte():
    r, rng = Range(D("-123.456"), True, D("7.5"), False), random.Random(1)
    for _ in range(300):
        value = D(rng.randint(-123456, 7500)) / 1000
        text = format(value, "f").encode()
        if not inside(r, value):
            continue
        for end in range(len(text) + 1):
            assert r.reachable(text[:end], False, 24 - end), (text, end)


def test_from_schema():
    assert Range.from_schema({}) is None
    assert Range.from_schema({"type": "number", "exclusiveMinimum": False}) is None
    assert Range.from_schema({"minimum": 1, "maximum": 2.5}) == Range(D(1), False, D("2.5"), False)
    assert Range.from_schema({"exclusiveMinimum": 0, "exclusiveMaximum": 0.1}) == Range(D(0), True, D("0.1"), True)
    assert Range.from_schema({"maximum": 0.1}).high == D("0.1")  # the digits written, not the float's
    assert Range.from_schema({"minimum": 10**30}).low == D(10**30)
    # draft 4: booleans make minimum / maximum exclusive
    assert Range.from_schema({"minimum": 1, "exclusiveMinimum": True}) == Range(D(1), True)
    assert Range.from_schema({"maximum": 1, "exclusiveMaximum": True}) == Range(high=D(1), high_open=True)
    assert Range.from_schema({"maximum": 1, "exclusiveMaximum": False}) == Range(high=D(1))
    # both given: the tighter holds
    assert Range.from_schema({"minimum": 1, "exclusiveMinimum": 2}) == Range(D(2), True)
    assert Range.from_schema({"minimum": 3, "exclusiveMinimum": 2}) == Range(D(3), False)
    assert Range.from_schema({"minimum": 2, "exclusiveMinimum": 2}) == Range(D(2), True)
    assert Range.from_schema({"maximum": 1, "exclusiveMaximum": 2}) == Range(high=D(1))
    assert Range.from_schema({"maximum": 2, "exclusiveMaximum": 2}) == Range(high=D(2), high_open=True)
    assert Range.from_schema({"maximum": 3, "exclusiveMaximum": 2.5}) == Range(high=D("2.5"), high_open=True)


@pytest.mark.parametrize("schema,message", [
    ({"minimum": "1"}, "minimum must be a number"),
    ({"maximum": True}, "maximum must be a number"),
    ({"minimum": False}, "minimum must be a number"),
    ({"exclusiveMinimum": "0"}, "exclusiveMinimum must be a number"),
    ({"exclusiveMaximum": [1]}, "exclusiveMaximum must be a number"),
    ({"maximum": float("inf")}, "maximum must be a number"),
    ({"minimum": float("nan")}, "minimum must be a number"),
    ({"exclusiveMinimum": True}, "exclusiveMinimum true needs a minimum"),
    ({"exclusiveMaximum": True, "minimum": 0}, "exclusiveMaximum true needs a maximum"),
])
def test_from_schema_rejects(schema, message):
    with pytest.raises(ValueError, match=message):
        Range.from_schema(schema)


def test_multiple_of_from_a_schema():
    r = Range.from_schema({"multipleOf": 0.05, "minimum": 1})
    assert r.step == D("0.05") and r.holds(b"1.15") and not r.holds(b"1.16") and not r.holds(b"0.95")
    assert Range.from_schema({"multipleOf": 3}).holds(b"-9") and not Range.from_schema({"multipleOf": 3}).holds(b"10")
    for bad in (0, -2, "5", True):
        with pytest.raises(ValueError):
            Range.from_schema({"multipleOf": bad})
    assert Range(step=D("1e-30")).reachable(b"", False, 24)  # 0 is a multiple of anything
    tiny = Range(D(0), True, D("1e-23"), False, step=D("1e-30"))  # above 0: 23 fraction digits at least
    assert not tiny.reachable(b"", False, 24) and tiny.reachable(b"", False, 25)
