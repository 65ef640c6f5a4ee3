"""Fixtures of the journal tests: headers, a fake clock, and journals of synthetic runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.core.fsm import MigrationFlags
from vfmig.core.model import destination, source
from vfmig.journal import synthetic
from vfmig.journal.codec import DeviceInfo, JournalHeader
from vfmig.journal.writer import JournalWriter

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

_FLAGS = MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY


def header(**changes: Any) -> JournalHeader:
    values: dict[str, Any] = {
        "host": "orchestrator",
        "role": "orchestrator",
        "run_id": "run-1",
        "kernel": "6.12.117",
        "start_wall_ns": 1_700_000_000 * 10**9,
        "start_mono_ns": 0,
        "vfmig": "0.1.0",
        "devices": (
            DeviceInfo(id=source(0), spec="sim:a0", identity="hostA:sim:a0", flags=_FLAGS),
            DeviceInfo(id=destination(0), spec="sim:b0", identity="hostB:sim:b0", flags=_FLAGS),
        ),
    }
    values.update(changes)
    return JournalHeader(**values)


@dataclass
class FakeClock:
    """Monotonic and wall clocks that move only when a test moves them."""

    now_ns: int = 0
    wall_base_ns: int = 1_700_000_000 * 10**9

    def mono(self) -> int:
        return self.now_ns

    def wall(self) -> int:
        return self.wall_base_ns + self.now_ns


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def write(
    path: Path,
    observations: Iterable[synthetic.Observation],
    clock: FakeClock,
    **options: Any,
) -> Path:
    """A closed journal of ``observations``, the writer's clock following their times."""
    with JournalWriter.create(
        path, header(), mono_clock=clock.mono, wall_clock=clock.wall, **options
    ) as writer:
        for o in observations:
            clock.now_ns = max(clock.now_ns, o.at_ns)
            writer.append(o.event, at_ns=o.at_ns, origin=o.host)
    return path


@pytest.fixture
def journal_header() -> Callable[..., JournalHeader]:
    """``journal_header(**changes)``: a two-device orchestrator header."""
    return header


@pytest.fixture
def write_journal(clock: FakeClock) -> Callable[..., Path]:
    """``write_journal(path, observations, **writer_options)``: a closed journal."""

    def make(path: Path, observations: Iterable[synthetic.Observation], **options: Any) -> Path:
        return write(path, observations, clock, **options)

    return make


@pytest.fixture(scope="session")
def default_run() -> list[synthetic.Observation]:
    """The observations of a completed 64 MiB precopy run (one pair)."""
    return list(synthetic.run(synthetic.Scenario()))
