"""JSON Schema `format`s held as patterns (engine/structured/regex.py), so that answers parse where
clients check them (pydantic's `datetime`, `UUID`, ...).

Each pattern takes only strings the format's RFC allows, and some valid ones are never generated:
dates are checked against their month's length (29 February only in leap years), in years 0001 to
9999; times have an offset (RFC 3339's full-time), at most six fraction digits and no leap second;
durations have parts of at most four digits; e-mail addresses are a plain local part and a dotted
host name (the lengths RFC 5321 caps, and the special-use domains some validators refuse, are not
checked). Formats not listed stay annotations, as JSON Schema defines them by default.
"""
from __future__ import annotations

_DAY_OF = {
    "31": r"(0[1-9]|[12][0-9]|3[01])",
    "30": r"(0[1-9]|[12][0-9]|30)",
    "28": r"(0[1-9]|1[0-9]|2[0-8])",
}
_MONTH_DAY = (rf"((0[13578]|1[02])-{_DAY_OF['31']}|(0[469]|11)-{_DAY_OF['30']}|02-{_DAY_OF['28']})")
_LEAP_YEAR = r"([0-9]{2}(0[48]|[2468][048]|[13579][26])|([2468][048]|[13579][26]|0[48])00)"
_YEAR = r"(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})"  # 0001-9999: year 0 parses nowhere
_DATE = rf"({_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_HEX = "[0-9a-fA-F]"
_N = "[0-9]{1,4}"  # a duration's parts: within what parsers hold (pydantic's timedelta: 999,999,999 days)
# RFC 3339's appendix A: a part is followed only by the next smaller one (P1Y2D and PT1H2S skip one),
# and weeks stand alone (no P1WT1H)
_DURATION_DATE = rf"({_N}Y({_N}M({_N}D)?)?|{_N}M({_N}D)?|{_N}D)"
_DURATION_TIME = rf"T({_N}H({_N}M({_N}S)?)?|{_N}M({_N}S)?|{_N}S)"

PATTERNS = {
    "date": rf"^{_DATE}$",
    "time": rf"^{_TIME}$",
    "date-time": rf"^{_DATE}T{_TIME}$",
    "duration": rf"^P({_DURATION_DATE}({_DURATION_TIME})?|{_DURATION_TIME}|{_N}W)$",
    "uuid": rf"^{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}$",
    "ipv4": rf"^({_OCTET}\.){{3}}{_OCTET}$",
    "hostname": rf"^{_LABEL}(\.{_LABEL})*$",
    "email": rf"^{_ATOM}(\.{_ATOM})*@{_LABEL}(\.{_LABEL})*\.[A-Za-z]{{2,63}}$",
}
