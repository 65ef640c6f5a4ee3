"""Merging journals of several hosts into one, on one clock.

Theory of operation
-------------------
Each host journals on its own monotonic clock. The first input is the *reference*; every
other input's times are shifted by an offset so that all records sort on the reference's
clock. The offset comes from the data path, which both hosts observe: a chunk
``(pair, seq)`` is sent on one host (``ChunkSent``) and received on the other
(``ChunkReceived``), never before it was sent. With ``s`` a send time and ``r`` the
matching receive time, each pair bounds the offset ``off`` of the other input:

* sent on the reference, received on the other: ``r + off >= s``, so ``off >= s - r``;
* sent on the other, received on the reference: ``r >= s + off``, so ``off <= r - s``.

With bounds on both sides the offset is the middle of ``[max lower, min upper]`` (as NTP
does with a round trip); with one side only it is that bound -- the fastest chunk then
shows zero latency, and every chunk is received after it was sent. Without any pair the
offset comes from the headers' wall and monotonic start times (as good as the hosts' NTP).
The header of the merged journal lists every input with its offset, the method and the
number of pairs, and every record keeps the host it was observed on.

Pairing reads both inputs in step, in the order of their wall-clock estimate, and keeps
unmatched chunk times in bounded tables (:data:`MAX_PENDING` each, oldest forgotten
first), so memory does not grow with the stream; writing reads every input one frame at a
time (``heapq.merge``). Snapshots are not copied (they describe one host's fold); the
merged journal's writer makes its own.
"""

from __future__ import annotations

import collections
import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from vfmig import __version__
from vfmig.core.events import ChunkReceived, ChunkSent
from vfmig.core.model import Role
from vfmig.journal.codec import (
    DataRecord,
    EventRecord,
    JournalError,
    JournalHeader,
)
from vfmig.journal.reader import Damage, JournalReader
from vfmig.journal.writer import JournalWriter

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path

    from vfmig.journal.codec import DeviceInfo

#: Unmatched chunk times kept per table while pairing.
MAX_PENDING: Final = 1 << 16


@dataclass(frozen=True, slots=True)
class InputReport:
    path: Path
    host: str
    role: str
    offset_ns: int  #: added to this input's times to put them on the reference's clock
    method: str  #: ``reference``, ``chunk pairs`` or ``wall clock``
    pairs: int  #: chunk pairs that bounded the offset
    records: int
    damage: Damage | None
    closed: bool


@dataclass(frozen=True, slots=True)
class MergeReport:
    output: Path
    inputs: tuple[InputReport, ...]
    records: int


def _wall_offset(ref: JournalHeader, other: JournalHeader) -> int:
    return (other.start_wall_ns - other.start_mono_ns) - (ref.start_wall_ns - ref.start_mono_ns)


_Key = tuple[int, int]


def _chunks(
    reader: JournalReader, source: int, shift: int
) -> Iterator[tuple[int, int, bool, _Key, int]]:
    """(estimated reference time, input, sent?, (pair, seq), own time) of every chunk."""
    for entry in reader.entries():
        if isinstance(entry, EventRecord) and isinstance(entry.event, ChunkSent | ChunkReceived):
            e = entry.event
            sent = isinstance(e, ChunkSent)
            if sent != (e.device.role is Role.SOURCE):
                continue
            yield entry.at_ns + shift, source, sent, (e.device.index, e.seq), entry.at_ns


class _Pending:
    """Unmatched chunk times, bounded (the oldest are forgotten first)."""

    def __init__(self) -> None:
        self.times: collections.OrderedDict[_Key, int] = collections.OrderedDict()

    def add(self, key: _Key, at: int) -> None:
        self.times[key] = at
        if len(self.times) > MAX_PENDING:
            self.times.popitem(last=False)

    def take(self, key: _Key) -> int | None:
        return self.times.pop(key, None)


def _offset(ref: JournalReader, other: JournalReader) -> tuple[int, str, int]:
    """(offset, method, pairs) of ``other`` against ``ref``."""
    wall = _wall_offset(ref.header, other.header)
    # tables: [input][sent?] -> unmatched times
    pending = {(src, sent): _Pending() for src in (0, 1) for sent in (False, True)}
    low: int | None = None
    high: int | None = None
    pairs = 0
    for _, src, sent, key, at in heapq.merge(_chunks(ref, 0, 0), _chunks(other, 1, wall)):
        match_at = pending[(1 - src, not sent)].take(key)
        if match_at is None:
            pending[(src, sent)].add(key, at)
            continue
        pairs += 1
        send, receive = (at, match_at) if sent else (match_at, at)
        sender = src if sent else 1 - src
        if sender == 0:  # sent on the reference, received on the other: off >= s - r
            low = send - receive if low is None else max(low, send - receive)
        else:  # sent on the other, received on the reference: off <= r - s
            high = receive - send if high is None else min(high, receive - send)
    if low is not None and high is not None:
        return (low + high) // 2, "chunk pairs", pairs
    if low is not None:
        return low, "chunk pairs", pairs
    if high is not None:
        return high, "chunk pairs", pairs
    return wall, "wall clock", 0


def _devices(headers: Sequence[JournalHeader]) -> tuple[DeviceInfo, ...]:
    seen: dict[str, DeviceInfo] = {}
    for h in headers:
        for d in h.devices:
            seen.setdefault(str(d.id), d)
    return tuple(seen.values())


def merge(paths: Sequence[Path], output: Path, *, host: str, **writer_options: Any) -> MergeReport:
    """Merge ``paths`` (the first is the reference clock) into a new journal ``output``."""
    if len(paths) < 2:
        raise JournalError("merge needs at least two journals")
    readers = [JournalReader(p) for p in paths]
    try:
        offsets = [(0, "reference", 0)] + [_offset(readers[0], r) for r in readers[1:]]
        ref = readers[0].header
        header = JournalHeader(
            host=host,
            role="merged",
            run_id=ref.run_id,
            kernel=ref.kernel,
            start_wall_ns=ref.start_wall_ns,
            start_mono_ns=ref.start_mono_ns,
            devices=_devices([r.header for r in readers]),
            data=any(r.header.data for r in readers),
            vfmig=__version__,
            merged_from=tuple(
                {
                    "file": r.path.name,
                    "host": r.header.host,
                    "role": r.header.role,
                    "run_id": r.header.run_id,
                    "offset_ns": off,
                    "method": method,
                    "pairs": pairs,
                }
                for r, (off, method, pairs) in zip(readers, offsets, strict=True)
            ),
        )

        def shifted(i: int) -> Iterator[tuple[int, int, int, EventRecord | DataRecord]]:
            off = offsets[i][0]
            for entry in readers[i].entries():
                if isinstance(entry, EventRecord | DataRecord):
                    yield entry.at_ns + off, i, entry.seq, entry

        written = 0
        with JournalWriter.create(output, header, **writer_options) as writer:
            for at, _, _, entry in heapq.merge(*(shifted(i) for i in range(len(readers)))):
                if isinstance(entry, EventRecord):
                    writer.append(entry.event, at_ns=at, wall_ns=entry.wall_ns, origin=entry.origin)
                else:
                    writer.append_data(
                        entry.device, entry.offset, entry.data, at_ns=at, origin=entry.origin
                    )
                written += 1
        inputs = tuple(
            InputReport(
                path=r.path,
                host=r.header.host,
                role=r.header.role,
                offset_ns=off,
                method=method,
                pairs=pairs,
                records=r.status.records,
                damage=r.status.damage,
                closed=r.status.closed,
            )
            for r, (off, method, pairs) in zip(readers, offsets, strict=True)
        )
        return MergeReport(output=output, inputs=inputs, records=written)
    finally:
        for r in readers:
            r.close()
