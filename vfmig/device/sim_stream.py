"""The simulated device's migration stream: what a saving fd yields and a resuming fd accepts.

Theory of operation
-------------------
Like a real driver's, the stream is opaque to vfmig; it exists so the simulated device can
behave like one: precopy sends the initial state and then dirtied pages, stop-copy the rest,
and the destination refuses a corrupt, truncated or foreign stream when asked to leave
RESUMING (RESUMING -> STOP fails with EINVAL), which is what recovery code must survive.
All integers are little-endian (docs/device-spec.md has the byte layout)::

    header   64 bytes  magic "VFMIGSIM", version, header size, page size, state size,
                       source name (32 bytes, informational), CRC-32 of those fields
    PAGES    16-byte record header {u32 type=1, u32 length, u64 offset} + length bytes:
                       state bytes [offset, offset+length), page aligned, at most 1 MiB
    END      16-byte record header {u32 type=2, u32 length=24, u64 0} +
                       {u64 PAGES records, u64 stream bytes before END, u32 CRC-32,
                        u32 flags: 1 = no CRC-32 was computed (``checksum=none``)}

The first PAGES records carry the whole state in order from offset 0 (the *initial* part,
whose remaining length is precopy's ``initial_bytes``); later ones re-send pages dirtied
after they were sent, with their content at the time of sending (``dirty_bytes``). END
closes the stream with a CRC-32 of every byte before it, which the destination keeps as a
running value as bytes arrive (CRC-32 runs at ~3.5 GB/s here; blake2b at ~0.9 GB/s would
cost more than compressing the data). A device with ``checksum=none`` skips the CRC on
both sides (its END says so, and such a stream is accepted on structure alone): the
engine benchmark uses it, so that vfmig is not charged ~0.13 CPU-s per 512 MiB and side
for a check the simulated driver makes, not vfmig.

A :class:`SavingStream` produces the stream lazily, one record at a time, from a page
reader, so its memory is one record (1 MiB) plus a dirty map of one byte per page. A
:class:`StreamLoader` parses any segmentation of the stream and hands page data to a sink
as it arrives (the destination's staging file); it keeps at most one record header.

The loader refuses, at the first write that proves it: a bad header (magic, version, CRC,
page size, or a state size other than the device's) with EFAULT, as mtty does for a bad
header; a record reaching past the end of the state, or bytes after END, with ENOMEM, as
mtty does for an oversize stream; a malformed record (unknown type, bad length or
alignment, a first-time page out of order) with EINVAL. :meth:`StreamLoader.finish`
refuses an incomplete stream or a CRC, length or record-count mismatch with EINVAL.
"""

from __future__ import annotations

import errno as _errno
import struct
import zlib
from collections import deque
from typing import TYPE_CHECKING, Final

from vfmig.device.sim_content import BLOCK_PAGES, PAGE_SIZE

if TYPE_CHECKING:
    from collections.abc import Callable

MAGIC: Final = b"VFMIGSIM"
VERSION: Final = 1

#: magic, version, header size, page size, state size, source name, CRC-32 of the fields before.
HEADER: Final = struct.Struct("<8sHHIQ32sI4x")
_HEADER_BODY: Final = struct.Struct("<8sHHIQ32s")
HEADER_SIZE: Final = HEADER.size
RECORD: Final = struct.Struct("<IIQ")
END_PAYLOAD: Final = struct.Struct("<QQII")

TYPE_PAGES: Final = 1
TYPE_END: Final = 2

#: Largest PAGES payload: one generated block (1 MiB), the engine's read size.
MAX_PAYLOAD: Final = BLOCK_PAGES * PAGE_SIZE

END_SIZE: Final = RECORD.size + END_PAYLOAD.size

#: END flag: the saving side computed no CRC-32 (its CRC field is 0).
END_NO_CRC: Final = 1


def initial_length(state_size: int) -> int:
    """Bytes of the initial part: the header plus the state in MAX_PAYLOAD records."""
    records = -(-state_size // MAX_PAYLOAD)
    return HEADER_SIZE + records * RECORD.size + state_size


def full_length(state_size: int) -> int:
    """Length of a stream without precopy (the MIG_DATA_SIZE of an idle device)."""
    return initial_length(state_size) + END_SIZE


def encode_header(state_size: int, source: str) -> bytes:
    body = _HEADER_BODY.pack(
        MAGIC, VERSION, HEADER_SIZE, PAGE_SIZE, state_size, source.encode()[:32]
    )
    return body + struct.pack("<I4x", zlib.crc32(body))


class SavingStream:
    """Produces one saving stream from ``read_pages(first, count) -> bytes``.

    ``mark_dirty(page)`` is called by the device for every page it dirties; pages not yet
    sent need nothing (they go out with their content of that moment).
    """

    def __init__(
        self,
        state_size: int,
        source: str,
        read_pages: Callable[[int, int], bytes],
        *,
        checksum: bool = True,
    ) -> None:
        self.state_size = state_size
        self._checksum = checksum
        self.pages = -(-state_size // PAGE_SIZE)
        self._read_pages = read_pages
        self._initial_length = initial_length(state_size)
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._front = 0  # bytes of _queue[0] already handed out
        self._cursor = 0  # next page of the initial part
        self._dirty: bytearray | None = None
        self._dirty_count = 0
        self._dirty_scan = 0
        self._queued_dirty = 0  # bytes of queued dirty records still to hand out
        self._records = 0
        self._crc = 0
        self._produced = 0  # stream bytes produced (queued or handed out)
        self.position = 0  # stream bytes handed out
        self.ended = False  # END produced
        self._push(encode_header(state_size, source), crc=True)

    def mark_dirty(self, page: int) -> None:
        if page >= self._cursor:
            return
        if self._dirty is None:
            self._dirty = bytearray(self.pages)
        if not self._dirty[page]:
            self._dirty[page] = 1
            self._dirty_count += 1

    @property
    def initial_bytes(self) -> int:
        return max(0, self._initial_length - self.position)

    @property
    def dirty_bytes(self) -> int:
        return self._dirty_count * PAGE_SIZE + self._queued_dirty

    def remaining(self) -> int:
        """Estimated bytes to the end of the stream if it were finished now (MIG_DATA_SIZE)."""
        if self.ended:
            return self._queued
        dirty_records = -(-self._dirty_count // BLOCK_PAGES)
        return self.initial_bytes + self.dirty_bytes + dirty_records * RECORD.size + END_SIZE

    def read(self, limit: int, *, final: bool) -> memoryview | None:
        """Up to ``limit`` bytes of stream; None when nothing is available now.

        ``final`` (STOP_COPY) also produces END once everything is sent; after END,
        returns an empty view (end of stream).
        """
        if not self._queue and not self._produce(final=final):
            return memoryview(b"") if self.ended else None
        head = self._queue[0]
        take = min(limit, len(head) - self._front)
        view = memoryview(head)[self._front : self._front + take]
        self._front += take
        self._queued -= take
        # Dirty records are produced only into an empty queue, so while any is queued
        # it is at the head.
        self._queued_dirty = max(0, self._queued_dirty - take)
        if self._front == len(head):
            self._queue.popleft()
            self._front = 0
        self.position += take
        return view

    def _produce(self, *, final: bool) -> bool:
        if self._cursor < self.pages:
            count = min(BLOCK_PAGES, self.pages - self._cursor)
            self._emit_pages(self._cursor, count, dirty=False)
            self._cursor += count
            return True
        if self._dirty_count:
            assert self._dirty is not None
            first = self._dirty.find(1, self._dirty_scan)
            if first < 0:
                first = self._dirty.find(1)
            end = self._dirty.find(0, first, first + BLOCK_PAGES)
            end = min(first + BLOCK_PAGES, self.pages) if end < 0 else end
            self._dirty[first:end] = bytes(end - first)
            self._dirty_count -= end - first
            self._dirty_scan = end if end < self.pages else 0
            self._emit_pages(first, end - first, dirty=True)
            return True
        if final and not self.ended:
            flags = 0 if self._checksum else END_NO_CRC
            payload = END_PAYLOAD.pack(self._records, self._produced, self._crc, flags)
            self._push(RECORD.pack(TYPE_END, END_PAYLOAD.size, 0) + payload, crc=False)
            self.ended = True
            return True
        return False

    def _emit_pages(self, first: int, count: int, *, dirty: bool) -> None:
        data = self._read_pages(first, count)
        header = RECORD.pack(TYPE_PAGES, len(data), first * PAGE_SIZE)
        self._push(header, crc=True)
        self._push(data, crc=True)
        self._records += 1
        if dirty:
            self._queued_dirty += len(header) + len(data)

    def _push(self, chunk: bytes, *, crc: bool) -> None:
        if not self._queue:
            self._front = 0
        self._queue.append(chunk)
        self._queued += len(chunk)
        if crc:
            self._produced += len(chunk)
            if self._checksum:
                self._crc = zlib.crc32(chunk, self._crc)


class StreamLoader:
    """Parses a resuming stream written in any segmentation; page data goes to ``sink``.

    ``sink(offset, data)`` stores state bytes at ``offset``. :meth:`feed` raises OSError
    with the errno the simulated driver answers the write with (see the module docstring);
    after a failure every later :meth:`feed` fails the same way. With ``checksum=False``
    (``checksum=none``) no CRC-32 is kept or checked.
    """

    def __init__(
        self, state_size: int, sink: Callable[[int, memoryview], None], *, checksum: bool = True
    ) -> None:
        self.state_size = state_size
        self._sink = sink
        self._checksum = checksum
        self._buffer = bytearray()  # a header or record header being assembled
        self._need = HEADER_SIZE
        self._stage = "header"
        self._payload_offset = 0  # state offset of the next payload byte
        self._payload_left = 0
        self._covered = 0  # state bytes [0, covered) received at least once
        self._records = 0
        self._crc = 0
        self._received = 0  # stream bytes before END
        self._end: tuple[int, int, int, int] | None = None
        self.failed: OSError | None = None
        self.source = ""

    def feed(self, data: memoryview) -> None:
        if self.failed is not None:
            raise self.failed
        try:
            while data:
                data = self._step(data)
        except OSError as exc:
            self.failed = exc
            raise

    def _step(self, data: memoryview) -> memoryview:
        if self._stage == "payload":
            take = min(self._payload_left, len(data))
            chunk = data[:take]
            self._sink(self._payload_offset, chunk)
            if self._checksum:
                self._crc = zlib.crc32(chunk, self._crc)
            self._received += take
            self._payload_offset += take
            self._payload_left -= take
            if not self._payload_left:
                self._expect("record", RECORD.size)
            return data[take:]
        if self._stage == "done":
            raise OSError(_errno.ENOMEM, "data after the end of the stream")
        take = min(self._need - len(self._buffer), len(data))
        self._buffer += data[:take]
        if len(self._buffer) == self._need:
            if self._stage == "header":
                self._header(bytes(self._buffer))
            elif self._stage == "record":
                self._record(bytes(self._buffer))
            else:
                self._end = END_PAYLOAD.unpack(self._buffer)
                self._stage = "done"
        return data[take:]

    def _expect(self, stage: str, size: int) -> None:
        self._stage = stage
        self._need = size
        self._buffer.clear()

    def _header(self, raw: bytes) -> None:
        magic, version, size, page, state, source, crc = HEADER.unpack(raw)
        if magic != MAGIC:
            raise OSError(_errno.EFAULT, f"bad stream magic {magic!r}")
        if zlib.crc32(raw[: _HEADER_BODY.size]) != crc:
            raise OSError(_errno.EFAULT, "stream header CRC mismatch")
        if (version, size, page) != (VERSION, HEADER_SIZE, PAGE_SIZE):
            raise OSError(_errno.EFAULT, f"unsupported stream version {version}")
        if state != self.state_size:
            raise OSError(
                _errno.EFAULT, f"stream of a {state}-byte state, this device has {self.state_size}"
            )
        self.source = source.rstrip(b"\0").decode(errors="replace")
        self._crc = zlib.crc32(raw)
        self._received = len(raw)
        self._expect("record", RECORD.size)

    def _record(self, raw: bytes) -> None:
        kind, length, offset = RECORD.unpack(raw)
        if kind == TYPE_END:
            if length != END_PAYLOAD.size or offset:
                raise OSError(_errno.EINVAL, "malformed END record")
            self._expect("end", END_PAYLOAD.size)
            return
        if kind != TYPE_PAGES:
            raise OSError(_errno.EINVAL, f"unknown record type {kind}")
        if not 0 < length <= MAX_PAYLOAD or offset % PAGE_SIZE:
            raise OSError(_errno.EINVAL, f"malformed record ({length} bytes at {offset})")
        if offset + length > self.state_size:
            raise OSError(_errno.ENOMEM, f"record reaches past the state ({offset + length})")
        if length % PAGE_SIZE and offset + length != self.state_size:
            raise OSError(_errno.EINVAL, f"record of {length} bytes is not whole pages")
        if offset > self._covered:
            raise OSError(_errno.EINVAL, f"record at {offset} skips state from {self._covered}")
        self._covered = max(self._covered, offset + length)
        self._crc = zlib.crc32(raw, self._crc)
        self._received += len(raw)
        self._records += 1
        self._payload_offset = offset
        self._payload_left = length
        self._stage = "payload"

    def finish(self) -> None:
        """Check the stream is whole and intact (RESUMING -> STOP); OSError(EINVAL) if not."""
        if self.failed is not None:
            raise OSError(_errno.EINVAL, f"an earlier write failed: {self.failed.strerror}")
        if self._end is None:
            raise OSError(_errno.EINVAL, f"stream incomplete ({self._stage} expected)")
        records, received, crc, flags = self._end
        if flags & ~END_NO_CRC:
            raise OSError(_errno.EINVAL, f"malformed END record (flags {flags:#x})")
        checked = self._checksum and not flags & END_NO_CRC
        if (records, received) != (self._records, self._received) or (checked and crc != self._crc):
            raise OSError(_errno.EINVAL, "stream corrupt (CRC, length or record count mismatch)")
        if self._covered != self.state_size:
            raise OSError(_errno.EINVAL, f"stream covers {self._covered} of {self.state_size}")
