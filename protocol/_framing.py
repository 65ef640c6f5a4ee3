"""Framing: the fixed 8-byte frame header and incremental, bounded frame reassembly.

Every frame is ``magic "VF" | version u8 | type u8 | length u32 (big-endian)`` followed by
``length`` body bytes (docs/protocol.md §2). The header layout is frozen across protocol
versions, so any version can read a peer's Hello and say what went wrong.

:class:`FrameReader` is bytes in, frames out, one frame at a time: the caller processes a
frame before asking for the next, so a size limit may depend on what the previous frame
changed (the handshake raises the limits). A body is copied once, from the input into a
buffer allocated only after its length passed the limit; nothing else is buffered beyond a
partial header.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, NamedTuple

from ._errors import ErrorCode, LocalProtocolError, limit_error

if TYPE_CHECKING:
    from collections.abc import Callable

MAGIC = b"VF"
HEADER = struct.Struct(">2sBBI")
HEADER_SIZE = HEADER.size  # 8

#: Data chunk header at the start of a DataChunk body: stream u32, seq u64, offset u64,
#: raw_len u32, encoding u8. The payload follows, unframed.
CHUNK_HEADER = struct.Struct(">IQQIB")
CHUNK_HEADER_SIZE = CHUNK_HEADER.size  # 25

#: Authenticated control frame body: seq u64 | msgpack map | 16-byte MAC.
SEQ = struct.Struct(">Q")
SEQ_SIZE = SEQ.size
MAC_SIZE = 16


def pack_header(version: int, tag: int, length: int) -> bytes:
    return HEADER.pack(MAGIC, version, tag, length)


class Frame(NamedTuple):
    header: bytes  #: the 8 header bytes as received (MACs cover them)
    version: int
    tag: int
    body: bytearray


class FrameReader:
    """Reassembles frames from arbitrary slices of the byte stream.

    ``limit_for(tag)`` returns ``(max_body_length, config_field_name)`` for a frame type in
    the current state; a longer frame raises before any of its body is buffered.
    """

    def __init__(self, limit_for: Callable[[int], tuple[int, str]]) -> None:
        self._limit_for = limit_for
        self._input = memoryview(b"")
        self._pos = 0
        self._header = bytearray()
        self._frame: Frame | None = None
        self._fill = 0
        self.frames = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add input; must be called only once the previous input was consumed."""
        self._input = memoryview(data).cast("B")
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes of a partial frame held (0 between frames)."""
        return len(self._header) + self._fill

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None once the fed input is used up."""
        data, end = self._input, len(self._input)
        while self._pos < end:
            if self._frame is None:
                take = min(HEADER_SIZE - len(self._header), end - self._pos)
                self._header += data[self._pos : self._pos + take]
                self._pos += take
                if len(self._header) < HEADER_SIZE:
                    break
                header = bytes(self._header)
                self._header.clear()
                self._start(header)
                assert self._frame is not None
            frame = self._frame
            take = min(len(frame.body) - self._fill, end - self._pos)
            frame.body[self._fill : self._fill + take] = data[self._pos : self._pos + take]
            self._pos += take
            self._fill += take
            if self._fill == len(frame.body):
                return self._complete()
        self._input = memoryview(b"")
        self._pos = 0
        return None

    def _start(self, header: bytes) -> None:
        magic, version, tag, length = HEADER.unpack(header)
        if magic != MAGIC:
            raise LocalProtocolError(
                f"not a vfmig peer: a frame starts with {header[:4]!r}, expected {MAGIC!r}",
                code=ErrorCode.BAD_MAGIC,
                hint="is the address that of a vfmig agent, and is TLS configured on both ends?",
            )
        bound, name = self._limit_for(tag)
        if length > bound:
            raise limit_error(
                f"frame length (type 0x{tag:02x})", length, name, bound, ErrorCode.FRAME_TOO_LARGE
            )
        self._frame = Frame(header, version, tag, bytearray(length))
        self._fill = 0

    def _complete(self) -> Frame:
        frame = self._frame
        assert frame is not None
        self._frame = None
        self._fill = 0
        self.frames += 1
        return frame
