"""call_abandonable: a result, an exception, or a deadline that abandons the thread."""

from __future__ import annotations

import threading

import pytest

from vfmig.device.abandon import Abandoned, call_abandonable


def test_returns_the_result() -> None:
    assert call_abandonable(lambda: 42, 5.0, "answer") == 42


def test_raises_the_calls_exception() -> None:
    def fail() -> int:
        raise PermissionError(13, "no")

    with pytest.raises(PermissionError):
        call_abandonable(fail, 5.0, "fail")


def test_a_call_that_never_returns_is_abandoned() -> None:
    release = threading.Event()
    try:
        with pytest.raises(Abandoned, match=r"stuck: no answer within 0\.05 s"):
            call_abandonable(release.wait, 0.05, "stuck")
    finally:
        release.set()
