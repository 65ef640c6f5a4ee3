"""Sender's read-ahead: a precopy back-off ends at the switch to stop-copy (virtual clock)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio

from vfmig.core.model import StreamPhase
from vfmig.engine.agent import MAX_POLL, MIN_POLL, Sender
from vfmig.engine.worker import ReadResult


class _Device:
    """A worker whose precopy reads find nothing; in stop-copy it gives one chunk, then EOF."""

    def __init__(self, sender: list[Sender]) -> None:
        self.sender = sender
        self.reads: list[tuple[float, StreamPhase]] = []

    async def read_chunk(self, buffer: bytearray, size: int, position: object) -> ReadResult | None:
        phase = self.sender[0].phase
        self.reads.append((trio.current_time(), phase))
        if phase is StreamPhase.PRECOPY:
            return None
        done = sum(p is StreamPhase.STOPCOPY for _, p in self.reads) > 1
        return ReadResult(0, 0) if done else ReadResult(0, 4, payload=memoryview(buffer)[:4])


async def test_a_backing_off_precopy_reader_reads_at_once_after_the_switch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    holder: list[Sender] = []
    device = _Device(holder)
    slot = SimpleNamespace(worker=device)
    sender = Sender(None, slot, 1, "peer", "ticket", StreamPhase.PRECOPY, None)  # type: ignore[arg-type]
    holder.append(sender)
    conn = SimpleNamespace(send_window=lambda stream: 1 << 30)
    send, receive = trio.open_memory_channel[object](0)

    async def consume() -> None:
        async for _ in receive:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        nursery.start_soon(sender._read_ahead, conn, [bytearray(8)] * 4, 8, [], send)
        await trio.sleep(1.0)  # long enough for the back-off to reach MAX_POLL
        assert device.reads[-1][0] - device.reads[-2][0] == pytest.approx(MAX_POLL)
        switched = trio.current_time()
        sender.switch(StreamPhase.STOPCOPY)
        await trio.sleep(MIN_POLL / 2)
        # The reader was woken by the switch, not by its back-off timer.
        stop_copy = [at for at, phase in device.reads if phase is StreamPhase.STOPCOPY]
        assert stop_copy[:1] == [switched]
