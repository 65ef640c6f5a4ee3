"""Framing: the fixed 8-byte frame header and incremental, bounded frame reassembly.

Every frame is ``magic "VF" | version u8 | type u8 | length u32 (big-endian)`` followed by
``length`` body bytes (docs/protocol.md §2). The header layout is frozen across protocol
versions, so any version can read a peer's Hello and say what went wrong.

:class:`FrameReader` is bytes in, frames out, one frame at a time: the caller processes a
frame before asking for the next, so a size limit may depend on what the previous frame
changed (the handshake raises the limits). A body is copied at most once, and nothing of
it is kept before its length passed the limit.
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
    body: bytes | memoryview  #: read-only; a view into the caller's input when possible


#: Pieces of a body shorter than this are copied into one buffer rather than kept as
#: views, so a peer dribbling a frame byte by byte cannot make us hold a view per byte.
_MIN_VIEW = 4096


class FrameReader:
    """Reassembles frames from arbitrary slices of the byte stream.

    ``limit_for(tag)`` returns ``(max_body_length, config_field_name)`` for a frame type in
    the current state; a longer frame raises before any of its body is buffered.

    Copies: a body that arrives inside one ``bytes`` input is a view of it (no copy); one
    that spans inputs is joined once at the end. Inputs that are not ``bytes`` may be
    reused by the caller, so their pieces are copied when kept.
    """

    def __init__(self, limit_for: Callable[[int], tuple[int, str]]) -> None:
        self._limit_for = limit_for
        self._input = memoryview(b"")
        self._immutable = True
        self._pos = 0
        self._header = bytearray()
        self._current: tuple[bytes, int, int, int] | None = None  # header, version, tag, len
        self._parts: list[bytes | memoryview] = []
        self._small = bytearray()
        self._have = 0
        self.frames = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add input; must be called only once the previous input was consumed."""
        self._immutable = isinstance(data, bytes)
        self._input = memoryview(data).cast("B")
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes of a partial frame held (0 between frames)."""
        return len(self._header) + self._have

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None once the fed input is used up."""
        data, end = self._input, len(self._input)
        while self._pos < end:
            if self._current is None:
                take = min(HEADER_SIZE - len(self._header), end - self._pos)
                self._header += data[self._pos : self._pos + take]
                self._pos += take
                if len(self._header) < HEADER_SIZE:
                    break
                header = bytes(self._header)
                self._header.clear()
                self._start(header)
                assert self._current is not None
            length = self._current[3]
            take = min(length - self._have, end - self._pos)
            if take:
                self._keep(data[self._pos : self._pos + take])
                self._pos += take
                self._have += take
            if self._have == length:
                return self._complete()
        self._input = memoryview(b"")
        self._pos = 0
        return None

    def _keep(self, piece: memoryview) -> None:
        if len(piece) < _MIN_VIEW:
            self._small += piece
            return
        if self._small:
            self._parts.append(bytes(self._small))
            self._small.clear()
        self._parts.append(piece if self._immutable else bytes(piece))

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
        self._current = (header, version, tag, length)
        self._have = 0

    def _complete(self) -> Frame:
        assert self._current is not None
        header, version, tag, _ = self._current
        if self._small:
            self._parts.append(bytes(self._small))
            self._small.clear()
        parts = self._parts
        body: bytes | memoryview = parts[0] if len(parts) == 1 else b"".join(parts)
        self._parts = []
        self._current = None
        self._have = 0
        self.frames += 1
        return Frame(header, version, tag, body)
