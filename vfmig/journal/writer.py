"""Writing a journal: :class:`JournalWriter`, synchronous, lossless, crash-tolerant.

Theory of operation
-------------------
The writer numbers every record it writes (``seq`` gap-free from 0, its own records
included) and buffers packed records into the open frame. It closes the frame -- compresses
it and writes it with one ``write`` loop -- when

* the open frame is a second old (checked at every append and by :meth:`maybe_flush`, which
  a caller with nothing to append calls about once a second: the recorder task does);
* the record is a phase change, the commit point, an error or the run's end;
* the open frame reaches ``frame_bytes`` of packed records (1 MiB by default);
* :meth:`flush` or :meth:`close` is called.

So a crash or ``kill -9`` loses at most the open frame, at most a second of records. The
kernel keeps what was written when the process dies; ``fsync`` guards against a host crash
or power loss, and costs milliseconds, so it is done only where losing records would
mislead: after the header, at phase changes, the commit point, errors, the run's end and
:meth:`close` (docs/journal.md, "Durability").

Nothing is ever dropped: :meth:`append` returns once the record is buffered and, when a
frame closes, written; a slow disk slows the caller down (the recorder's lossless bus
subscription passes that back to the publisher). The writer is thread-safe: the engine's
device threads may add data records (:meth:`append_data`) while the recorder adds events.

The writer folds every event through :func:`vfmig.core.view.reduce` and starts a frame
with a snapshot of that view every ``snapshot_interval_ns`` of its clock, so readers can
seek. It folds late: events wait (at most :data:`MAX_UNFOLDED` of them) until a snapshot or
:attr:`JournalWriter.view` needs them, so a run shorter than the interval, most of them,
is never folded here (folding was most of the ~50 ms that merging a 512 MiB run's three
journals took). Files are created with ``O_EXCL`` and mode 0600: they may hold device
data.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Self

from vfmig.core.errors import JournalError
from vfmig.core.events import (
    CommitPointPassed,
    ErrorRaised,
    Event,
    PhaseChanged,
    RunFinished,
    to_record,
)
from vfmig.core.view import RunView, reduce, to_snapshot
from vfmig.journal import codec
from vfmig.journal.codec import FRAME_SNAPSHOT, MAX_DATA_RECORD, Kind

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import TracebackType

    from vfmig.core.model import DeviceId
    from vfmig.journal.codec import JournalHeader

NS_PER_S: Final = 1_000_000_000
DEFAULT_FRAME_BYTES: Final = 1 << 20
DEFAULT_FLUSH_INTERVAL_NS: Final = NS_PER_S
DEFAULT_SNAPSHOT_INTERVAL_NS: Final = 10 * NS_PER_S
#: Events kept unfolded at most (memory: a few hundred bytes each).
MAX_UNFOLDED: Final = 4096
#: zstd level 1: events compress as well as at 3, raw device data 1.45x faster (bench_journal).
DEFAULT_LEVEL: Final = 1

#: Events after which the frame is closed and the file synced.
DURABLE: Final = (PhaseChanged, CommitPointPassed, ErrorRaised, RunFinished)


@dataclass(frozen=True, slots=True)
class _Stamped:
    seq: int
    at_ns: int
    event: Event


@dataclass(frozen=True, slots=True)
class WriterStatistics:
    records: int
    frames: int
    packed_bytes: int  #: records before compression
    file_bytes: int  #: header and frames written so far


class JournalWriter:
    """Writes one journal file; create it with :meth:`create`. Use as a context manager."""

    def __init__(
        self,
        fd: int,
        path: Path,
        header: JournalHeader,
        *,
        frame_bytes: int = DEFAULT_FRAME_BYTES,
        flush_interval_ns: int = DEFAULT_FLUSH_INTERVAL_NS,
        snapshot_interval_ns: int = DEFAULT_SNAPSHOT_INTERVAL_NS,
        level: int = DEFAULT_LEVEL,
        mono_clock: Callable[[], int] = time.monotonic_ns,
        wall_clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.path = path
        self.header = header
        self._fd = fd
        self._frame_bytes = frame_bytes
        self._flush_interval_ns = flush_interval_ns
        self._snapshot_interval_ns = snapshot_interval_ns
        self._zstd = codec.compressor(level)
        self._mono = mono_clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._seq = 0
        self._parts: list[bytes] = []
        self._size = 0
        self._first_seq = 0
        self._first_mono = 0
        self._opened_ns = 0
        self._flags = 0
        self._origin = header.host
        self._view = RunView()
        self._unfolded: list[_Stamped] = []
        self._last_snapshot_ns: int | None = None
        self._frames = 0
        self._packed = 0
        self._file_bytes = 0
        self._failed: JournalError | None = None
        self._closed = False
        self._write(codec.encode_header(header))
        self._sync()

    @classmethod
    def create(cls, path: Path, header: JournalHeader, **options: Any) -> Self:
        """Create ``path`` (it must not exist) with mode 0600 and write ``header``."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise JournalError(
                f"{path} already exists", hint="journals are never overwritten: name a new file"
            ) from None
        except OSError as exc:
            raise JournalError(f"cannot create journal {path}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)
            return cls(fd, path, header, **options)
        except BaseException:
            os.close(fd)
            raise

    # --- appending -------------------------------------------------------------------------

    @property
    def view(self) -> RunView:
        """Everything appended so far, folded (what the next snapshot will hold)."""
        with self._lock:
            return self._folded()

    def append(
        self,
        event: Event,
        *,
        at_ns: int | None = None,
        wall_ns: int | None = None,
        origin: str | None = None,
    ) -> int:
        """Write ``event`` observed at ``at_ns`` (default: now) on ``origin`` (default: this
        host); returns its seq."""
        with self._lock:
            at = self._mono() if at_ns is None else at_ns
            wall = self._wall() if wall_ns is None else wall_ns
            self._open_frame(at, wall)
            self._origin_is(origin or self.header.host, at, wall)
            seq = self._put(at, wall, to_record(event))
            self._unfolded.append(_Stamped(seq, at, event))
            if len(self._unfolded) >= MAX_UNFOLDED:
                self._folded()
            if isinstance(event, DURABLE):
                self._flush(sync=True)
            else:
                self._flush_if_due()
            return seq

    def append_data(
        self,
        device: DeviceId,
        offset: int,
        data: bytes | bytearray | memoryview,
        *,
        at_ns: int | None = None,
        origin: str | None = None,
    ) -> None:
        """Write raw device stream bytes at stream ``offset``, in records of at most 1 MiB."""
        view = memoryview(data)
        with self._lock:
            at = self._mono() if at_ns is None else at_ns
            wall = self._wall()
            for start in range(0, len(view), MAX_DATA_RECORD):
                piece = bytes(view[start : start + MAX_DATA_RECORD])
                self._open_frame(at, wall)
                self._origin_is(origin or self.header.host, at, wall)
                self._put(at, wall, [int(Kind.DATA), str(device), offset + start, piece])
                self._flush_if_due()

    def maybe_flush(self) -> None:
        """Close the open frame if it is older than the flush interval (call ~every second)."""
        with self._lock:
            self._flush_if_due()

    def flush(self, *, sync: bool = False) -> None:
        """Close the open frame now; with ``sync``, fsync the file too."""
        with self._lock:
            self._flush(sync=sync)

    def close(self, *, at_ns: int | None = None) -> None:
        """Write the closing record (at ``at_ns``, default now), flush, fsync and close
        (idempotent)."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._failed is None:
                    at = self._mono() if at_ns is None else at_ns
                    wall = self._wall()
                    self._open_frame(at, wall)
                    self._origin_is(self.header.host, at, wall)
                    self._put(at, wall, [int(Kind.CLOSED), self._seq])
                    self._flush(sync=True)
            finally:
                self._closed = True
                os.close(self._fd)

    def statistics(self) -> WriterStatistics:
        with self._lock:
            return WriterStatistics(self._seq, self._frames, self._packed, self._file_bytes)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals (called with the lock held) -----------------------------------------------

    def _folded(self) -> RunView:
        view = self._view
        for stamped in self._unfolded:
            view = reduce(view, stamped)
        self._unfolded.clear()
        self._view = view
        return view

    def _open_frame(self, at: int, wall: int) -> None:
        if self._closed:
            raise JournalError(f"{self.path}: the journal is closed")
        if self._failed is not None:
            raise self._failed
        if self._parts:
            return
        self._origin = self.header.host
        self._flags = 0
        self._opened_ns = self._mono()
        due = self._last_snapshot_ns is None or at - self._last_snapshot_ns >= (
            self._snapshot_interval_ns
        )
        if (self._view.records or self._unfolded) and due:
            self._last_snapshot_ns = at
            self._flags = FRAME_SNAPSHOT
            self._put(at, wall, [int(Kind.SNAPSHOT), to_snapshot(self._folded())])
        elif self._last_snapshot_ns is None:
            self._last_snapshot_ns = at

    def _origin_is(self, origin: str, at: int, wall: int) -> None:
        if origin != self._origin:
            self._origin = origin
            self._put(at, wall, [int(Kind.ORIGIN), origin])

    def _put(self, at: int, wall: int, body: list[object]) -> int:
        if not self._parts:
            self._first_seq = self._seq
            self._first_mono = at
        packed = codec.pack(self._seq, at, wall, body)
        self._parts.append(packed)
        self._size += len(packed)
        self._seq += 1
        return self._seq - 1

    def _flush_if_due(self) -> None:
        if self._parts and (
            self._size >= self._frame_bytes
            or self._mono() - self._opened_ns >= self._flush_interval_ns
        ):
            self._flush(sync=False)

    def _flush(self, *, sync: bool) -> None:
        if self._failed is not None:
            raise self._failed
        if self._parts:
            body = b"".join(self._parts)
            frame = codec.encode_frame(
                body,
                records=len(self._parts),
                first_seq=self._first_seq,
                first_mono_ns=self._first_mono,
                flags=self._flags,
                zstd=self._zstd,
            )
            self._parts = []
            self._size = 0
            self._packed += len(body)
            self._frames += 1
            self._write(frame)
        if sync:
            self._sync()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            self._failed = JournalError(
                f"cannot write journal {self.path}: {exc.strerror}",
                hint="free space on its file system, or choose another journal path",
            )
            raise self._failed from None
        self._file_bytes += len(data)

    def _sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._failed = JournalError(f"cannot sync journal {self.path}: {exc.strerror}")
            raise self._failed from None
