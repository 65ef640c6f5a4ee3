"""Sizes, rates and durations as people type them: ``64MiB``, ``1GiB``, ``10MiB/s``, ``1ms``.

Theory of operation
-------------------
Sizes are always binary and always whole bytes: a bare number is bytes, ``k``/``KiB`` is
1024, ``M``/``MiB`` is 1024², ``G``/``GiB`` 1024³, ``T``/``TiB`` 1024⁴ (suffixes are
case-insensitive, a trailing ``B`` is optional). SI spellings (``MB``, ``GB``) are refused
rather than guessed, because a device state size off by 5 % is a silent bug. A decimal
mantissa is accepted when the result is a whole number of bytes (``1.5KiB`` is 1536,
``0.1KiB`` is refused). Rates are sizes per second, with an optional ``/s``. Durations
need a unit (``ns``, ``us``, ``ms``, ``s``) unless they are ``0``.

Parsers raise :class:`ValueError` with a message that starts with the offending text in
``repr`` form, so callers prefix the name of the field (``size='banana' is not a size``).

Pure: stdlib only.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Final

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30
TiB: Final = 1 << 40

#: Suffix (lower case, without the optional trailing "b") -> multiplier.
_SIZE_UNITS: Final[dict[str, int]] = {
    "": 1,
    "k": KiB,
    "ki": KiB,
    "m": MiB,
    "mi": MiB,
    "g": GiB,
    "gi": GiB,
    "t": TiB,
    "ti": TiB,
}

#: Largest first: how :func:`format_size` names an exact multiple.
_SIZE_NAMES: Final = ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB"))

_DURATION_UNITS: Final[dict[str, Decimal]] = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    "µs": Decimal("1e-6"),
    "ms": Decimal("1e-3"),
    "s": Decimal(1),
}

_NUMBER: Final = r"(?P<num>[0-9]+(?:\.[0-9]+)?)"
_SIZE_RE: Final = re.compile(_NUMBER + r"\s*(?P<unit>[a-zA-Z]*)")
_DURATION_RE: Final = re.compile(_NUMBER + r"\s*(?P<unit>ns|us|µs|ms|s)?")

SIZE_EXAMPLES: Final = "e.g. 4096, 64KiB, 64MiB, 1GiB"
DURATION_EXAMPLES: Final = "e.g. 0, 500us, 1ms, 2s"


def parse_size(text: str) -> int:
    """Bytes in ``text`` (``4096``, ``64k``, ``64KiB``, ``1.5MiB``, ``1GiB``); ValueError if not."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size ({SIZE_EXAMPLES})")
    unit = match["unit"].lower()
    if unit.endswith("b"):
        if unit in ("kb", "mb", "gb", "tb"):
            raise ValueError(
                f"{text!r} is not a size: SI units are ambiguous, "
                f"write {match['num']}{unit[0].upper()}iB (binary)"
            )
        unit = unit[:-1]
    multiplier = _SIZE_UNITS.get(unit)
    if multiplier is None:
        raise ValueError(f"{text!r} is not a size ({SIZE_EXAMPLES})")
    value = Decimal(match["num"]) * multiplier
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def parse_rate(text: str) -> int:
    """Bytes per second in ``text`` (a size with an optional ``/s``); ValueError if not."""
    body = text.strip()
    if body.endswith("/s"):
        body = body[:-2]
    try:
        return parse_size(body)
    except ValueError:
        raise ValueError(f"{text!r} is not a rate (e.g. 0, 512KiB/s, 64MiB/s)") from None


def parse_duration(text: str) -> float:
    """Seconds in ``text`` (``0``, ``500us``, ``1ms``, ``2.5s``); ValueError if not."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None or (match["unit"] is None and Decimal(match["num"]) != 0):
        raise ValueError(f"{text!r} is not a duration ({DURATION_EXAMPLES})")
    return float(Decimal(match["num"]) * _DURATION_UNITS[match["unit"] or "s"])


def format_size(size: int) -> str:
    """``64MiB`` for exact binary multiples, else the byte count (``4097``): re-parses exactly."""
    for multiplier, name in _SIZE_NAMES:
        if size and size % multiplier == 0:
            return f"{size // multiplier}{name}"
    return str(size)
