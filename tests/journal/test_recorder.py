"""The recorder task on the engine's real event bus (trio, real clock: it uses worker threads)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from vfmig.core import events as ev
from vfmig.core.errors import JournalError
from vfmig.core.model import source
from vfmig.engine.bus import EventBus, Lossless, Ring
from vfmig.journal.codec import ClosedRecord, EventRecord
from vfmig.journal.reader import JournalReader
from vfmig.journal.recorder import record
from vfmig.journal.writer import JournalWriter

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from vfmig.journal.codec import JournalHeader


def read(path: Path) -> tuple[list[EventRecord], JournalReader]:
    with JournalReader(path) as reader:
        entries = list(reader.entries())
    assert isinstance(entries[-1], ClosedRecord)
    return [e for e in entries if isinstance(e, EventRecord)], reader


@pytest.mark.trio
async def test_every_published_record_is_journaled_in_order(
    tmp_path: Path, journal_header: Callable[..., JournalHeader], default_run: Any
) -> None:
    bus = EventBus()
    path = tmp_path / "run.vfj"
    header = journal_header(start_mono_ns=int(trio.current_time() * 1e9))
    async with trio.open_nursery() as nursery:
        await nursery.start(record, bus.subscribe(Lossless(4)), JournalWriter.create(path, header))
        published = [await bus.publish(o.event, origin=o.host) for o in default_run]
        bus.close()
    entries, reader = read(path)
    assert reader.status.intact
    assert [(e.at_ns, e.origin, e.event) for e in entries] == [
        (r.at_ns, r.origin, r.event) for r in published
    ]


@pytest.mark.trio
async def test_a_slow_disk_slows_the_publisher_and_loses_nothing(
    tmp_path: Path, journal_header: Callable[..., JournalHeader], monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = EventBus()
    path = tmp_path / "run.vfj"
    writer = JournalWriter.create(path, journal_header(), frame_bytes=512)
    real_write = writer._write

    def slow_write(data: bytes) -> None:
        import time

        time.sleep(0.002)  # every frame write is slow
        real_write(data)

    monkeypatch.setattr(writer, "_write", slow_write)
    sample = ev.DataSizeSampled(device=source(0), size=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(record, bus.subscribe(Lossless(2)), writer)
        for _ in range(3000):
            await bus.publish(sample)
        bus.close()
    entries, _ = read(path)
    assert len(entries) == 3000


@pytest.mark.trio
async def test_a_quiet_bus_still_gets_its_frame_written(
    tmp_path: Path, journal_header: Callable[..., JournalHeader]
) -> None:
    bus = EventBus()
    path = tmp_path / "run.vfj"
    writer = JournalWriter.create(path, journal_header(), flush_interval_ns=10_000_000)
    size = path.stat().st_size
    async with trio.open_nursery() as nursery:
        await nursery.start(record, bus.subscribe(Lossless()), writer)
        await bus.publish(ev.DataSizeSampled(device=source(0), size=1))
        with trio.fail_after(20):  # the property, not a speed: it arrives without more records
            while path.stat().st_size == size:  # noqa: ASYNC110 -- a file, nothing to wait on
                await trio.sleep(0.01)
        bus.close()
    entries, _ = read(path)
    assert len(entries) == 1


@pytest.mark.trio
async def test_cancelling_the_recorder_closes_the_journal(
    tmp_path: Path, journal_header: Callable[..., JournalHeader]
) -> None:
    bus = EventBus()
    path = tmp_path / "run.vfj"
    async with trio.open_nursery() as nursery:
        await nursery.start(
            record, bus.subscribe(Lossless()), JournalWriter.create(path, journal_header())
        )
        published = await bus.publish(ev.DataSizeSampled(device=source(0), size=1))
        nursery.cancel_scope.cancel()
    entries, reader = read(path)
    assert [e.event for e in entries] == [published.event]
    assert reader.status.intact


@pytest.mark.trio
async def test_a_lossy_subscription_is_refused(
    tmp_path: Path, journal_header: Callable[..., JournalHeader]
) -> None:
    bus = EventBus()
    path = tmp_path / "run.vfj"
    subscription = bus.subscribe(Ring(1))
    for _ in range(3):
        await bus.publish(ev.DataSizeSampled(device=source(0), size=1))
    with pytest.raises(JournalError, match="dropped records"):
        await record(subscription, JournalWriter.create(path, journal_header()))
    _, reader = read(path)
    assert reader.status.closed
