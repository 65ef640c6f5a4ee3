"""Reading a journal: :class:`JournalReader`, synchronous, one frame in memory at a time.

Theory of operation
-------------------
Opening reads and checks the header: a file that is not a journal, or one of a newer
format or schema, is refused with a :class:`~vfmig.journal.codec.JournalError` saying so.
:meth:`JournalReader.entries` then decodes frame after frame and yields their records. It
never acts on damaged bytes: every frame header carries a CRC and every frame body a zstd
content checksum. Reading stops at the first frame that is cut short (the writer stopped
mid-frame: a crash, ``kill -9``) or damaged, and :attr:`JournalReader.status` then says
where, why, and which was the last good record. Sequence numbers are checked to be
gap-free; a gap is recorded and reading goes on.

Seeking: :meth:`frames` walks the frame headers alone (no decompression), which is enough
to find the last frame that starts with a snapshot before a given time
(:meth:`snapshot_before`); :meth:`entries` can start there. :meth:`data` streams one
device's raw data records back, in order, without ever holding more than one frame.
:meth:`resync` looks past a damaged frame for later frames that are still good (``vfmig
journal verify`` reports them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Self

from vfmig.core.errors import JournalError
from vfmig.core.events import RecordError
from vfmig.journal import codec
from vfmig.journal.codec import (
    FRAME_HEADER_SIZE,
    FRAME_MAGIC,
    HEADER_PREFIX_SIZE,
    ClosedRecord,
    DataRecord,
    Entry,
    FrameDamage,
    FrameHeader,
    JournalHeader,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from types import TracebackType

    from vfmig.core.model import DeviceId


@dataclass(frozen=True, slots=True)
class Damage:
    offset: int  #: file offset of the frame where reading stopped
    reason: str
    truncated: bool  #: the file ends inside this frame (as a killed writer leaves it)


@dataclass(slots=True)
class ReadStatus:
    """What a pass over the journal found (updated while :meth:`JournalReader.entries` runs)."""

    frames: int = 0
    records: int = 0
    last_seq: int | None = None
    last_at_ns: int | None = None
    last_wall_ns: int | None = None
    closed: bool = False  #: the writer's closing record was read
    gaps: list[tuple[int, int]] = field(default_factory=list)  #: (expected seq, found seq)
    damage: Damage | None = None
    good_bytes: int = 0  #: header and every frame read completely

    @property
    def intact(self) -> bool:
        return self.damage is None and not self.gaps and self.closed


@dataclass(frozen=True, slots=True)
class FrameAt:
    offset: int
    header: FrameHeader


class JournalReader:
    """Reads one journal file. Use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = open(path, "rb")  # noqa: SIM115 -- closed by close()
        except OSError as exc:
            raise JournalError(f"cannot open journal {path}: {exc.strerror}") from None
        try:
            prefix = self._file.read(HEADER_PREFIX_SIZE)
            if len(prefix) < HEADER_PREFIX_SIZE:
                raise JournalError("not a vfmig journal (too short for a header)")
            size = codec.header_size(prefix)
            data = prefix + self._file.read(size - HEADER_PREFIX_SIZE)
            self.header: JournalHeader = codec.decode_header(data)
        except JournalError as exc:
            self._file.close()
            raise JournalError(f"{path}: {exc.message}", hint=exc.hint) from None
        except BaseException:
            self._file.close()
            raise
        self.first_frame = size
        self.size = os.fstat(self._file.fileno()).st_size
        self.status = ReadStatus(good_bytes=size)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- frames ------------------------------------------------------------------------------

    def _frame_at(self, offset: int) -> FrameHeader | Damage | None:
        """The frame header at ``offset``; None at the end of the file; Damage if bad."""
        self._file.seek(offset)
        raw = self._file.read(FRAME_HEADER_SIZE)
        if not raw:
            return None
        if len(raw) < FRAME_HEADER_SIZE:
            return Damage(offset, "the file ends inside a frame header", truncated=True)
        try:
            header = codec.decode_frame_header(raw)
        except FrameDamage as exc:
            return Damage(offset, str(exc), truncated=False)
        if offset + FRAME_HEADER_SIZE + header.length > self.size:
            return Damage(offset, "the file ends inside a frame", truncated=True)
        return header

    def frames(self, start: int | None = None) -> Iterator[FrameAt]:
        """Frame headers from ``start`` (default: the first frame), without decoding bodies."""
        offset = self.first_frame if start is None else start
        while True:
            header = self._frame_at(offset)
            if header is None:
                return
            if isinstance(header, Damage):
                self.status.damage = header
                return
            yield FrameAt(offset, header)
            offset += FRAME_HEADER_SIZE + header.length

    def snapshot_before(self, at_ns: int) -> int | None:
        """Offset of the last snapshot frame that starts at or before ``at_ns``, if any."""
        best = None
        for frame in self.frames():
            if frame.header.first_mono_ns > at_ns:
                break
            if frame.header.snapshot:
                best = frame.offset
        return best

    # --- records -----------------------------------------------------------------------------

    def entries(self, start: int | None = None) -> Iterator[Entry]:
        """Every record from the frame at ``start`` (default: the first), in order.

        Stops at the first damaged or cut-short frame; :attr:`status` tells what was found.
        """
        status = self.status = ReadStatus(good_bytes=self.first_frame)
        expected: int | None = None
        for frame in self.frames(start):
            h = frame.header
            self._file.seek(frame.offset + FRAME_HEADER_SIZE)
            body = self._file.read(h.length)
            try:
                raw = codec.decode_frame_body(h, body)
                for i, item in enumerate(raw):
                    if item[0] != h.first_seq + i:
                        raise FrameDamage(
                            f"record {i} of the frame has seq {item[0]!r}, "
                            f"expected {h.first_seq + i}"
                        )
            except FrameDamage as exc:
                status.damage = Damage(frame.offset, str(exc), truncated=False)
                return
            decoded: list[Entry] = []
            for result in codec.decode_records(raw, self.header.host):
                if isinstance(result, RecordError):
                    status.damage = Damage(frame.offset, result.message, truncated=False)
                    break
                decoded.append(result)
            if expected is not None and h.first_seq != expected:
                status.gaps.append((expected, h.first_seq))
            expected = h.first_seq + h.records
            for entry in decoded:
                status.records += 1
                status.last_seq = entry.seq
                status.last_at_ns = entry.at_ns
                status.last_wall_ns = entry.wall_ns
                status.closed = isinstance(entry, ClosedRecord)
                yield entry
            if status.damage is not None:
                return
            status.frames += 1
            status.good_bytes = frame.offset + FRAME_HEADER_SIZE + h.length

    def data(self, device: DeviceId) -> Iterator[DataRecord]:
        """``device``'s raw data records in journal order (one frame in memory at a time)."""
        for entry in self.entries():
            if isinstance(entry, DataRecord) and entry.device == device:
                yield entry

    def resync(self, offset: int) -> tuple[int, int, int | None, int | None]:
        """Look past damage at ``offset`` for good frames: (frames, records, first, last seq).

        Scans for the frame magic, accepts a frame whose header and body check, and follows
        good frames from there; reads in bounded blocks.
        """
        frames = records = 0
        first: int | None = None
        last: int | None = None
        position = offset + 1
        block = 1 << 20
        while position < self.size:
            self._file.seek(position)
            chunk = self._file.read(block + len(FRAME_MAGIC) - 1)
            hit = chunk.find(FRAME_MAGIC)
            if hit < 0:
                position += block
                continue
            candidate = position + hit
            header = self._frame_at(candidate)
            if isinstance(header, FrameHeader):
                self._file.seek(candidate + FRAME_HEADER_SIZE)
                try:
                    raw = codec.decode_frame_body(header, self._file.read(header.length))
                except FrameDamage:
                    raw = None
                if raw is not None:
                    frames += 1
                    records += len(raw)
                    first = header.first_seq if first is None else first
                    last = header.first_seq + header.records - 1
                    position = candidate + FRAME_HEADER_SIZE + header.length
                    continue
            position = candidate + 1
        return frames, records, first, last
