"""Blocking calls that may never return, bounded from synchronous code.

A read of a migration debugfs file, or opening a device to probe it, takes the driver's
state mutex; behind a stuck driver it blocks forever, and no signal interrupts it. For the
synchronous commands (``inspect``, ``doctor``, ``list``) :func:`call_abandonable` runs such
a call in a daemon thread and stops waiting at a deadline: the thread is abandoned and
holds nothing of ours, and being a daemon it cannot keep the process alive at exit. Only
calls that change nothing may be abandoned; the engine has its own worker threads.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")


class Abandoned(Exception):
    """The call did not return within its timeout; its thread was abandoned."""


def call_abandonable(fn: Callable[[], T], timeout: float, name: str) -> T:
    """``fn()``'s result or exception, or :class:`Abandoned` after ``timeout`` seconds."""
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if failure:
        raise failure[0]
    if not result:
        raise Abandoned(f"{name}: no answer within {timeout:g} s")
    return result[0]
