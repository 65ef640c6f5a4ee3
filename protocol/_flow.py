"""Data streams: credit-based flow control, chunk order, switchover marks, the digest.

Theory of operation
-------------------
Streams flow one way, data-sender to data-receiver, and the receiver opens them: its first
:class:`Credit` for a new stream id opens the stream on both sides. Stream ids only grow
(a new id must exceed every id opened before on the connection), so a closed stream needs
no memory: a late Credit or SwitchoverAck for an id at or below the highest one seen is
for a closed stream and is dropped, while data for it is an error.

Each side keeps its own view of a stream's window (raw bytes the sender may still send):
``Credit`` adds, every chunk's ``raw_len`` subtracts. The sender's view never exceeds the
receiver's (credit is in flight), so "chunk larger than the window" is the sender's
mistake: a LocalProtocolError when sending, a RemoteProtocolError when received. A window
above ``max_window`` is an accounting bug on the granting side.

Chunks carry ``seq`` (0, 1, 2, ... per stream) and ``offset`` (raw bytes before it); both
must be exactly the next values. The stream digest is fed in that order on both sides.

Switchover: the sender marks where the device's initial precopy data ended
(InitialDataSent, offsets never decreasing, never past the data sent); the receiver acks
the latest mark once it has loaded that data (SwitchoverAck). Without the ``reinit_ack``
feature a stream has at most one mark and one ack.

The same methods serve both directions: each check raises LocalProtocolError, and the
connection's receive path re-raises it as RemoteProtocolError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._errors import ErrorCode, LocalProtocolError

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._auth import StreamDigest


class Stream:
    """One open stream, as seen by either side."""

    __slots__ = ("acks", "chunks", "digest", "id", "last_ack", "mark", "marks", "offset",
                 "window")  # fmt: skip

    def __init__(self, stream: int, digest: StreamDigest) -> None:
        self.id = stream
        self.digest = digest
        self.window = 0
        self.offset = 0  #: raw bytes sent or received so far
        self.chunks = 0  #: chunks so far (the next chunk's seq)
        self.mark: int | None = None  #: latest InitialDataSent offset
        self.marks = 0
        self.last_ack: int | None = None
        self.acks = 0


class Streams:
    """The open streams of one connection, from one side's point of view."""

    def __init__(
        self,
        *,
        max_streams: int,
        max_window: int,
        reinit_ack: bool,
        digest_for: Callable[[int], StreamDigest],
    ) -> None:
        self.open: dict[int, Stream] = {}
        self.highest = -1
        self._max_streams = max_streams
        self._max_window = max_window
        self._reinit_ack = reinit_ack
        self._digest_for = digest_for

    # --- credit ------------------------------------------------------------------------

    def credit(self, stream: int, increment: int, *, local: bool) -> bool:
        """Apply a grant: sent by the receiver (``local``), or received by the sender.

        Returns False if a received grant is for a closed stream (credit crosses the
        sender's EndOfStream in flight); granting credit on a closed stream is an error.
        """
        if increment < 1:
            raise _err(ErrorCode.FLOW_CONTROL, f"stream {stream}: credit must be positive")
        s = self.open.get(stream)
        if s is None:
            if stream <= self.highest:
                if local:
                    raise _err(
                        ErrorCode.UNKNOWN_STREAM,
                        f"credit for stream {stream}: ids only grow, and {stream} is at or "
                        f"below the highest stream id opened ({self.highest})",
                    )
                return False
            if len(self.open) >= self._max_streams:
                raise LocalProtocolError(
                    f"opening stream {stream} exceeds max_streams={self._max_streams}",
                    code=ErrorCode.LIMIT,
                    limit="max_streams",
                )
            s = self.open[stream] = Stream(stream, self._digest_for(stream))
            self.highest = stream
        if s.window + increment > self._max_window:
            raise LocalProtocolError(
                f"stream {stream}: credit would raise the window to {s.window + increment}, "
                f"above max_window={self._max_window}",
                code=ErrorCode.FLOW_CONTROL,
                limit="max_window",
            )
        s.window += increment
        return True

    def window(self, stream: int) -> int:
        s = self.open.get(stream)
        return 0 if s is None else s.window

    # --- chunks and end of stream -------------------------------------------------------

    def chunk(
        self,
        stream: int,
        seq: int,
        offset: int,
        raw_len: int,
        header: bytes | memoryview,
        payload: bytes | memoryview,
    ) -> None:
        s = self._get(stream, "a data chunk")
        if seq != s.chunks or offset != s.offset:
            raise _err(
                ErrorCode.STREAM_ORDER,
                f"stream {stream}: chunk seq {seq} at offset {offset}, "
                f"expected seq {s.chunks} at offset {s.offset}",
            )
        if raw_len > s.window:
            raise _err(
                ErrorCode.FLOW_CONTROL,
                f"stream {stream}: chunk of {raw_len} bytes exceeds the window of {s.window}",
            )
        s.digest.add(header, payload)
        s.window -= raw_len
        s.offset += raw_len
        s.chunks += 1

    def end(self, stream: int) -> Stream:
        """Close a stream at EndOfStream or AbortStream; returns it for the digest."""
        s = self._get(stream, "the end of a stream")
        del self.open[stream]
        return s

    # --- switchover ---------------------------------------------------------------------

    def mark(self, stream: int, offset: int) -> None:
        s = self._get(stream, "InitialDataSent")
        if offset > s.offset:
            raise _err(
                ErrorCode.STREAM_ORDER,
                f"stream {stream}: initial data marked at {offset}, past the {s.offset} bytes sent",
            )
        if s.mark is not None:
            if not self._reinit_ack:
                raise _err(
                    ErrorCode.UNEXPECTED_MESSAGE,
                    f"stream {stream}: a second InitialDataSent needs the reinit_ack feature",
                )
            if offset < s.mark:
                raise _err(
                    ErrorCode.STREAM_ORDER,
                    f"stream {stream}: initial data mark {offset} is before the previous "
                    f"mark {s.mark}",
                )
        s.mark = offset
        s.marks += 1

    def ack(self, stream: int, offset: int, *, local: bool) -> bool:
        """Apply a SwitchoverAck; False if one received is for a closed stream.

        Sending (``local``), the ack must name the latest mark received; received, it may
        name an older one, since a newer mark can be in flight.
        """
        s = self.open.get(stream)
        if s is None and stream <= self.highest and not local:
            return False
        s = self._get(stream, "SwitchoverAck")
        if s.mark is None or s.acks >= s.marks:
            raise _err(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"stream {stream}: SwitchoverAck without an unacknowledged InitialDataSent",
            )
        if (local and offset != s.mark) or offset > s.mark or offset < (s.last_ack or 0):
            raise _err(
                ErrorCode.STREAM_ORDER,
                f"stream {stream}: SwitchoverAck at {offset}, but the latest initial data "
                f"mark is {s.mark}" + ("" if s.last_ack is None else f" (last ack {s.last_ack})"),
            )
        s.last_ack = offset
        s.acks += 1
        return True

    def _get(self, stream: int, what: str) -> Stream:
        s = self.open.get(stream)
        if s is None:
            state = "closed" if stream <= self.highest else "not open (no credit granted yet)"
            raise _err(ErrorCode.UNKNOWN_STREAM, f"{what} for stream {stream}, which is {state}")
        return s


def _err(code: ErrorCode, message: str) -> LocalProtocolError:
    return LocalProtocolError(message, code=code)
