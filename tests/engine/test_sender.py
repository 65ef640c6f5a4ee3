"""Sender's read-ahead: a precopy back-off ends at the switch to stop-copy (virtual clock);
an incompressible stream stops being compressed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio

from vfmig.core.compression import MAX_SKIP
from vfmig.core.model import StreamPhase
from vfmig.engine.agent import MAX_POLL, MIN_POLL, Sender
from vfmig.engine.worker import ReadResult
from vfmig.protocol import Encoding


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


class _Chunks:
    """A worker with ``count`` chunks to read, whose encoder compresses them or not."""

    def __init__(self, count: int, *, compressible: bool) -> None:
        self.left = count
        self.compressible = compressible
        self.encoded = 0

    async def read_chunk(self, buffer: bytearray, size: int, position: object) -> ReadResult | None:
        if not self.left:
            return ReadResult(0, 0)
        self.left -= 1
        return ReadResult(0, 4, Encoding.RAW, memoryview(buffer)[:4])  # as DeviceWorker does

    async def encode(self, compressor: object, raw: memoryview) -> tuple[Encoding, object]:
        self.encoded += 1
        return (Encoding.ZSTD, b"z") if self.compressible else (Encoding.RAW, raw)


@pytest.mark.parametrize("compressible", [True, False])
async def test_the_sender_stops_trying_to_compress_a_stream_that_does_not(
    compressible: bool,
) -> None:
    device = _Chunks(60, compressible=compressible)
    sender = Sender(None, SimpleNamespace(worker=device), 1, "peer", "t", StreamPhase.STOPCOPY, 1)  # type: ignore[arg-type]
    conn = SimpleNamespace(send_window=lambda stream: 1 << 30)
    send, receive = trio.open_memory_channel[object](0)
    encodings = []

    async def consume() -> None:
        async for item in receive:
            await item.encoded.wait()  # type: ignore[attr-defined]
            encodings.append(item.result.encoding)  # type: ignore[attr-defined]

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await sender._read_ahead(conn, [bytearray(8)] * 4, 8, [object(), object()], send)
    sent = encodings[:-1]  # the last item is the end of stream
    assert len(sent) == 60
    if compressible:
        assert device.encoded == 60
        assert set(sent) == {Encoding.ZSTD}
    else:  # those read before a result came back, then one in up to MAX_SKIP + 1 chunks
        assert device.encoded < 60 / 4
        assert device.encoded >= 60 / (MAX_SKIP + 1)
        assert set(sent) == {Encoding.RAW}
