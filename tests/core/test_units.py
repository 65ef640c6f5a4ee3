"""Sizes, rates and durations as typed on a command line or in a device spec."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfmig.core.units import (
    GiB,
    KiB,
    MiB,
    TiB,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("64KiB", 64 * KiB),
        ("64k", 64 * KiB),
        ("64K", 64 * KiB),
        ("64kib", 64 * KiB),
        ("64MiB", 64 * MiB),
        ("64M", 64 * MiB),
        ("1GiB", GiB),
        ("1G", GiB),
        ("2TiB", 2 * TiB),
        ("1.5KiB", 1536),
        ("512B", 512),
        (" 8 MiB ", 8 * MiB),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("banana", "'banana' is not a size (e.g. 4096, 64KiB, 64MiB, 1GiB)"),
        ("", "'' is not a size"),
        ("-1", "'-1' is not a size"),
        ("64MB", "'64MB' is not a size: SI units are ambiguous, write 64MiB (binary)"),
        ("1kB", "SI units are ambiguous, write 1KiB"),
        ("0.1KiB", "'0.1KiB' is not a whole number of bytes"),
        ("1.5", "'1.5' is not a whole number of bytes"),
        ("3PiB", "'3PiB' is not a size"),
        ("1e3", "'1e3' is not a size"),
    ],
)
def test_parse_size_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("1MiB/s", MiB), ("512k", 512 * KiB), ("64MiB/s", 64 * MiB)],
)
def test_parse_rate(text: str, expected: int) -> None:
    assert parse_rate(text) == expected


def test_parse_rate_refuses() -> None:
    with pytest.raises(ValueError, match=r"'fast' is not a rate \(e.g. 0, 512KiB/s, 64MiB/s\)"):
        parse_rate("fast")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0.0), ("1ms", 0.001), ("500us", 0.0005), ("500µs", 0.0005), ("2s", 2.0)],
)
def test_parse_duration(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


def test_parse_duration_ns() -> None:
    assert parse_duration("250ns") == pytest.approx(250e-9)


@pytest.mark.parametrize("text", ["1", "soon", "1h", "-1ms", ""])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0"), (1, "1"), (4096, "4KiB"), (4097, "4097"), (64 * MiB, "64MiB"), (GiB, "1GiB")],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size
