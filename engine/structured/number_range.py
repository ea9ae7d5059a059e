"""JSON Schema's numeric bounds (`minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`) and
`multipleOf` as a range of exact decimals, and what a number's text written so far can still reach
within it.

A number here has no exponent: -?(0|[1-9][0-9]*)(\\.[0-9]+)?. The values a prefix can still become,
with `room` more bytes, are a few runs of evenly spaced decimals: for each count of integer digits
still to come, a run from the prefix's value upward, spaced by the smallest fraction digit the bytes
left over allow (1 where no fraction fits). Each run is checked against the range in whole units of
its spacing, so the check is exact and its cost grows with the room, not with the values reachable.
A `multipleOf` is a spacing too: in a run's units, the multiples are every s-th value (s from the
step and the run's fraction digits), so the first multiple at or above the run's first value is
checked against its last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache


def _number(schema: dict, key: str) -> Decimal | None:
    """The schema's `key` as an exact decimal (None when absent); floats keep the digits they were written with."""
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key} must be a number")
    return Decimal(value) if isinstance(value, int) else Decimal(repr(value))


def _exclusive(schema: dict, key: str) -> Decimal | bool | None:
    """An exclusive bound: a number (JSON Schema 2020-12) or a boolean (draft 4); None when absent."""
    value = schema.get(key)
    if isinstance(value, bool):
        return value
    return _number(schema, key)


@lru_cache(maxsize=4096)
def _units(bound: Decimal, digits: int) -> tuple[int, bool]:
    """`bound` in units of 10**-digits, rounded down, and whether that is exact."""
    sign, coefficient, exponent = bound.as_tuple()
    value = int("".join(map(str, coefficient)) or "0")
    if sign:
        value = -value
    shift = exponent + digits
    if shift >= 0:
        return value * 10 ** shift, True
    whole, rest = divmod(value, 10 ** -shift)
    return whole, rest == 0


@lru_cache(maxsize=4096)
def _step_units(step: Decimal, digits: int) -> int:
    """The spacing, in units of 10**-digits, of the multiples of `step` among those units' values:
    n * 10**-digits is a multiple of step = p * 10**-k when n is a multiple of this."""
    _, coefficient, exponent = step.normalize().as_tuple()
    p = int("".join(map(str, coefficient)))
    if exponent >= 0:
        p, k = p * 10 ** exponent, 0
    else:
        k = -exponent
    if digits >= k:
        return p * 10 ** (digits - k)
    return p // math.gcd(p, 10 ** (k - digits))


def _runs(body: bytes, integer: bool, room: int):
    """The values an unsigned number's text `body` (a valid prefix) can become with up to `room`
    more bytes, as runs (first, end, digits): the values n * 10**-digits for first <= n < end.
    Runs come in increasing order of value and do not overlap."""
    if b"." in body:
        whole, fraction = body.split(b".")
        digits = len(fraction) + room
        if digits:  # a fraction needs at least one digit
            first = int(whole + fraction) * 10 ** room
            yield first, first + 10 ** room, digits
        return
    if body:  # integer digits so far: more may follow, except after a leading "0"
        lead, span, most = int(body), 1, (0 if body == b"0" else room)
    else:  # a first digit: "0", or one of 1-9 and then up to room - 1 more
        if room < 1:
            return
        yield from _runs(b"0", integer, room - 1)
        lead, span, room = 1, 9, room - 1
        most = room
    for more in range(most + 1):  # integer digits still to come
        digits = 0 if integer or room - more < 2 else room - more - 1  # "." and a digit at least
        scale = 10 ** (more + digits)
        yield lead * scale, (lead + span) * scale, digits


@dataclass(frozen=True)
class Range:
    """The numbers from `low` to `high` (None: no bound), each end included unless it is open, that
    are multiples of `step` (None: any)."""

    low: Decimal | None = None
    low_open: bool = False  # exclusive bound
    high: Decimal | None = None
    high_open: bool = False
    step: Decimal | None = None  # multipleOf, above 0

    @classmethod
    def from_schema(cls, schema: dict) -> "Range | None":
        """The range a schema's minimum / maximum / exclusiveMinimum / exclusiveMaximum give; None when
        it has none. Numeric exclusive bounds (JSON Schema 2020-12) and draft 4's booleans, which make
        minimum / maximum exclusive, are both taken; where a bound is given both ways the tighter holds.
        Raises ValueError for a value of the wrong type."""
        low, high, step = _number(schema, "minimum"), _number(schema, "maximum"), _number(schema, "multipleOf")
        if step is not None and step <= 0:
            raise ValueError("multipleOf must be a number above 0")
        low_open = high_open = False
        above, below = _exclusive(schema, "exclusiveMinimum"), _exclusive(schema, "exclusiveMaximum")
        if isinstance(above, bool):
            if above and low is None:
                raise ValueError("exclusiveMinimum true needs a minimum")
            low_open = above
        elif above is not None and (low is None or above >= low):
            low, low_open = above, True
        if isinstance(below, bool):
            if below and high is None:
                raise ValueError("exclusiveMaximum true needs a maximum")
            high_open = below
        elif below is not None and (high is None or below <= high):
            high, high_open = below, True
        if low is None and high is None and step is None:
            return None
        return cls(low, low_open, high, high_open, step)

    def holds(self, text: bytes) -> bool:
        """Whether the JSON number `text` (no exponent) lies in the range, compared exactly."""
        value = Decimal(text.decode())
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        if self.step is None:
            return True
        digits = len(text.partition(b".")[2])
        return _units(value, digits)[0] % _step_units(self.step, digits) == 0

    def reachable(self, text: bytes, integer: bool, room: int) -> bool:
        """Whether `text`, a prefix of a number without an exponent (-?(0|[1-9][0-9]*)(\\.[0-9]+)?),
        followed by at most `room` more bytes, can be a whole number (an integer, with no ".", when
        `integer`) that lies in the range; False when `room` is negative (the text is already too long)."""
        if room < 0:
            return False
        if not text:
            return self._reaches(b"", False, integer, room) or \
                (room > 0 and self._reaches(b"", True, integer, room - 1))
        negative = text[:1] == b"-"
        return self._reaches(text[1:] if negative else text, negative, integer, room)

    def empty(self, integer: bool, length: int) -> bool:
        """Whether no number of at most `length` bytes (an integer one when `integer`) lies in the range."""
        return not self.reachable(b"", integer, length)

    def _reaches(self, body: bytes, negative: bool, integer: bool, room: int) -> bool:
        """Whether the unsigned prefix `body` reaches, with up to `room` more bytes, a magnitude whose
        value (negated when `negative`) lies in the range."""
        # the bounds on the magnitude: a negative number's mirror the range's other end (copy_negate
        # is exact, where unary minus rounds to the context's precision)
        if negative:
            low, low_open = (self.high.copy_negate(), self.high_open) if self.high is not None else (None, False)
            high, high_open = (self.low.copy_negate(), self.low_open) if self.low is not None else (None, False)
        else:
            low, low_open, high, high_open = self.low, self.low_open, self.high, self.high_open
        for first, end, digits in _runs(body, integer, room):
            last = end - 1
            if high is not None:
                top, exact = _units(high, digits)
                if exact and high_open:
                    top -= 1
                if top < first:
                    return False  # later runs lie higher still
                last = min(last, top)
            if low is not None:
                bottom, exact = _units(low, digits)
                if not exact or low_open:
                    bottom += 1
                first = max(first, bottom)
            if self.step is not None:  # the first multiple at or above it (magnitudes: multiples are symmetric)
                spacing = _step_units(self.step, digits)
                first = -(-first // spacing) * spacing
            if first <= last:
                return True
        return False
