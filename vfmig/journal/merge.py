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

A run with remote agents (:func:`merge_run`, what ``vfmig migrate`` does after the run)
has a third kind of pair: the orchestrator's journal holds a copy of each agent event,
stamped when its notice arrived, and the agent's own journal holds the original, stamped
before the notice left. Each such pair bounds the agent's offset from above (the fastest
notice counts as instantaneous); the orchestrator's ``StreamStarted`` of a pair, published
before the source is asked to send, bounds it from below by the agent's first chunk of
that pair. Together with the chunk pairs between agents these are difference constraints
``x[v] - x[u] <= w`` between the inputs' offsets, solved by shortest paths; an offset is the
middle of its interval, which the header gives as ``uncertainty_ns``. Pairing matches
equal events in order, with bounded tables as above. The agents' originals replace the
orchestrator's copies; an agent whose journal could not be fetched keeps its copies.
"""

from __future__ import annotations

import collections
import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from vfmig import __version__
from vfmig.core.errors import JournalError
from vfmig.core.events import ChunkReceived, ChunkSent, StreamStarted
from vfmig.core.model import Role
from vfmig.journal.codec import (
    DataRecord,
    EventRecord,
    JournalHeader,
)
from vfmig.journal.reader import Damage, JournalReader
from vfmig.journal.writer import JournalWriter

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
    from pathlib import Path

    from vfmig.core.events import Event
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
    #: :func:`merge_run`: records of each agent left out, as the orchestrator received them
    copies: Mapping[str, int] = field(default_factory=dict)


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
            if sent != (e.device.role is Role.SOURCE) or e.chunks != 1:
                continue  # a coalesced copy (wire.coalesce) is no one chunk's time
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


def _chunk_bounds(ref: JournalReader, other: JournalReader) -> tuple[int | None, int | None, int]:
    """(low, high, pairs): chunk pairs bound ``other``'s offset against ``ref`` to
    ``[low, high]`` (None: unbounded on that side)."""
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
    return low, high, pairs


def _offset(ref: JournalReader, other: JournalReader) -> tuple[int, str, int]:
    """(offset, method, pairs) of ``other`` against ``ref``."""
    low, high, pairs = _chunk_bounds(ref, other)
    if low is not None and high is not None:
        return (low + high) // 2, "chunk pairs", pairs
    if low is not None:
        return low, "chunk pairs", pairs
    if high is not None:
        return high, "chunk pairs", pairs
    return _wall_offset(ref.header, other.header), "wall clock", 0


def _devices(headers: Sequence[JournalHeader]) -> tuple[DeviceInfo, ...]:
    seen: dict[str, DeviceInfo] = {}
    for h in headers:
        for d in h.devices:
            seen.setdefault(str(d.id), d)
    return tuple(seen.values())


#: A record on the reference clock: (time, input, seq, record); sorts by time, then input.
_Entry = tuple[int, int, int, EventRecord | DataRecord]


def _merged_header(
    readers: Sequence[JournalReader], host: str, sources: Sequence[dict[str, Any]]
) -> JournalHeader:
    ref = readers[0].header
    return JournalHeader(
        host=host,
        role="merged",
        run_id=ref.run_id,
        kernel=ref.kernel,
        start_wall_ns=ref.start_wall_ns,
        start_mono_ns=ref.start_mono_ns,
        devices=_devices([r.header for r in readers]),
        data=any(r.header.data for r in readers),
        vfmig=__version__,
        merged_from=tuple(sources),
    )


def _write(
    output: Path,
    header: JournalHeader,
    streams: Sequence[Iterator[_Entry]],
    origin: Callable[[int, EventRecord | DataRecord], str],
    writer_options: dict[str, Any],
) -> int:
    """Write the records of ``streams`` in time order, each with ``origin(input, record)``."""
    written = 0
    with JournalWriter.create(output, header, **writer_options) as writer:
        for at, i, _, entry in heapq.merge(*streams):
            where = origin(i, entry)
            if isinstance(entry, EventRecord):
                writer.append(entry.event, at_ns=at, wall_ns=entry.wall_ns, origin=where)
            else:
                writer.append_data(entry.device, entry.offset, entry.data, at_ns=at, origin=where)
            written += 1
    return written


def _reports(
    readers: Sequence[JournalReader], offsets: Sequence[tuple[int, str, int]]
) -> tuple[InputReport, ...]:
    return tuple(
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


def _source(r: JournalReader, off: int, method: str, pairs: int, **more: Any) -> dict[str, Any]:
    """The merged header's ``merged_from`` entry of input ``r`` (``more`` adds or replaces)."""
    return {
        "file": r.path.name,
        "host": r.header.host,
        "role": r.header.role,
        "run_id": r.header.run_id,
        "offset_ns": off,
        "method": method,
        "pairs": pairs,
        **more,
    }


def merge(paths: Sequence[Path], output: Path, *, host: str, **writer_options: Any) -> MergeReport:
    """Merge ``paths`` (the first is the reference clock) into a new journal ``output``."""
    if len(paths) < 2:
        raise JournalError("merge needs at least two journals")
    readers = [JournalReader(p) for p in paths]
    try:
        offsets = [(0, "reference", 0)] + [_offset(readers[0], r) for r in readers[1:]]
        sources = [
            _source(r, off, method, pairs)
            for r, (off, method, pairs) in zip(readers, offsets, strict=True)
        ]

        def shifted(i: int) -> Iterator[_Entry]:
            off = offsets[i][0]
            for entry in readers[i].entries():
                if isinstance(entry, EventRecord | DataRecord):
                    yield entry.at_ns + off, i, entry.seq, entry

        header = _merged_header(readers, host, sources)
        streams = [shifted(i) for i in range(len(readers))]
        written = _write(output, header, streams, lambda i, entry: entry.origin, writer_options)
        return MergeReport(output=output, inputs=_reports(readers, offsets), records=written)
    finally:
        for r in readers:
            r.close()


# --- a run's journal with its agents' ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentSide:
    """One remote agent of a run: the address the orchestrator reached it at (the origin of
    its events in the orchestrator's journal) and its own journal of the run, or None with
    ``error`` saying why it could not be had."""

    address: str
    path: Path | None
    error: str | None = None
    name: str | None = None  #: the journal's file name on the agent's host


class _Constraints:
    """Difference constraints ``x[v] - x[u] <= w`` on the inputs' offsets, ``x[0] = 0``."""

    def __init__(self, n: int) -> None:
        self.w: list[list[int | None]] = [
            [0 if u == v else None for v in range(n)] for u in range(n)
        ]
        self.pairs = [0] * n

    def at_most(self, u: int, v: int, w: int) -> None:
        """``x[v] - x[u] <= w``."""
        now = self.w[u][v]
        if now is None or w < now:
            self.w[u][v] = w

    def bounds(self) -> list[tuple[int | None, int | None]]:
        """``(low, high)`` of every offset (None: unbounded), by shortest paths (a run has a
        handful of hosts: Floyd-Warshall)."""
        d = [row[:] for row in self.w]
        n = len(d)
        for k in range(n):
            for i in range(n):
                ik = d[i][k]
                if ik is None:
                    continue
                for j in range(n):
                    kj = d[k][j]
                    ij = d[i][j]
                    if kj is not None and (ij is None or ik + kj < ij):
                        d[i][j] = ik + kj
        return [(None if (up := d[i][0]) is None else -up, d[0][i]) for i in range(n)]


class _Waiting:
    """Times of events not yet paired, by event, oldest first (bounded like :class:`_Pending`)."""

    def __init__(self) -> None:
        self.times: collections.OrderedDict[Hashable, collections.deque[int]] = (
            collections.OrderedDict()
        )

    def add(self, key: Hashable, at: int) -> None:
        self.times.setdefault(key, collections.deque()).append(at)
        if len(self.times) > MAX_PENDING:
            self.times.popitem(last=False)

    def take(self, key: Hashable) -> int | None:
        waiting = self.times.get(key)
        if waiting is None:
            return None
        at = waiting.popleft()
        if not waiting:
            del self.times[key]
        return at


def _key(event: Event) -> Hashable | None:
    try:
        hash(event)
    except TypeError:
        return None
    return event


def _stream_starts(own: JournalReader) -> dict[int, int]:
    """Pair index -> when the orchestrator first published that pair's StreamStarted: it
    does so before it asks the source to send, so every chunk of the pair comes later."""
    starts: dict[int, int] = {}
    for entry in own.entries():
        if isinstance(entry, EventRecord) and isinstance(entry.event, StreamStarted):
            starts.setdefault(entry.event.source.index, entry.at_ns)
    return starts


def _notice_bounds(
    own: JournalReader,
    address: str,
    agent: JournalReader,
    index: int,
    starts: dict[int, int],
    constraints: _Constraints,
) -> None:
    """Bound agent ``index``'s offset by the events both journals hold: the agent journals
    an event before it sends the notice the orchestrator records at receipt, so
    ``off <= received - journaled`` (the fastest notice counts as instantaneous); and its
    first chunk of a pair comes after the orchestrator's StreamStarted of the pair, so
    ``off >= started - first chunk``."""
    wall = _wall_offset(own.header, agent.header)

    def copies() -> Iterator[tuple[int, int, int, EventRecord]]:
        for e in own.entries():
            if isinstance(e, EventRecord) and e.origin == address:
                yield e.at_ns, 0, e.seq, e

    def originals() -> Iterator[tuple[int, int, int, EventRecord]]:
        for e in agent.entries():
            if isinstance(e, EventRecord):
                yield e.at_ns + wall, 1, e.seq, e

    waiting = (_Waiting(), _Waiting())
    first_chunk: dict[int, int] = {}
    for _, side, _, record in heapq.merge(copies(), originals()):
        event = record.event
        if side == 1 and isinstance(event, ChunkSent | ChunkReceived):
            first_chunk.setdefault(event.device.index, record.at_ns)
        key = _key(event)
        if key is None:
            continue
        other = waiting[1 - side].take(key)
        if other is None:
            waiting[side].add(key, record.at_ns)
            continue
        received, journaled = (record.at_ns, other) if side == 0 else (other, record.at_ns)
        constraints.at_most(0, index, received - journaled)
        constraints.pairs[index] += 1
    for pair, at in first_chunk.items():
        started = starts.get(pair)
        if started is not None:
            constraints.at_most(index, 0, at - started)
            constraints.pairs[index] += 1


def merge_run(
    own: Path, agents: Sequence[AgentSide], output: Path, **writer_options: Any
) -> MergeReport:
    """One timeline of a run: the orchestrator's journal ``own`` (the reference clock) with
    each fetched agent's own journal in place of the copies of its events that ``own``
    holds, every agent's offset bounded by the events it shares with ``own``, by stream
    starts and by chunk pairs with the other agents. The records of an agent keep the
    address the orchestrator knew it by as their origin. An agent whose journal is missing
    keeps its copies in ``own``, and the header says why."""
    fetched = [a for a in agents if a.path is not None]
    readers = [JournalReader(own)]
    try:
        readers += [JournalReader(a.path) for a in fetched if a.path is not None]
        constraints = _Constraints(len(readers))
        starts = _stream_starts(readers[0])
        for i, side in enumerate(fetched, start=1):
            _notice_bounds(readers[0], side.address, readers[i], i, starts, constraints)
        for i in range(1, len(readers)):
            for j in range(i + 1, len(readers)):
                low, high, pairs = _chunk_bounds(readers[i], readers[j])
                if high is not None:
                    constraints.at_most(i, j, high)
                if low is not None:
                    constraints.at_most(j, i, -low)
                constraints.pairs[i] += pairs
                constraints.pairs[j] += pairs
        offsets: list[tuple[int, str, int, int | None]] = [(0, "reference", 0, 0)]
        for i, (low, high) in enumerate(constraints.bounds()[1:], start=1):
            pairs = constraints.pairs[i]
            if low is not None and high is not None:
                offsets.append(((low + high) // 2, "paired events", pairs, abs(high - low) // 2))
            elif low is not None or high is not None:
                bound = low if low is not None else high
                assert bound is not None
                offsets.append((bound, "paired events", pairs, None))
            else:
                wall = _wall_offset(readers[0].header, readers[i].header)
                offsets.append((wall, "wall clock", 0, None))
        ref = readers[0].header
        sources: list[dict[str, Any]] = [
            _source(
                r,
                off,
                method,
                pairs,
                uncertainty_ns=spread,
                **(
                    {"file": fetched[i - 1].name or r.path.name, "address": fetched[i - 1].address}
                    if i
                    else {}
                ),
            )
            for i, (r, (off, method, pairs, spread)) in enumerate(
                zip(readers, offsets, strict=True)
            )
        ]
        sources += [
            {
                "file": None,
                "host": a.address,
                "address": a.address,
                "role": "agent",
                "run_id": ref.run_id,
                "offset_ns": 0,
                "method": "the orchestrator's copies of its events",
                "pairs": 0,
                "error": a.error or "not fetched",
            }
            for a in agents
            if a.path is None
        ]
        header = _merged_header(readers, ref.host, sources)
        replaced = {a.address for a in fetched}
        origins = [None, *(a.address for a in fetched)]
        copies = {a.address: 0 for a in agents if a.path is None}

        def shifted(i: int) -> Iterator[_Entry]:
            off = offsets[i][0]
            for entry in readers[i].entries():
                if not isinstance(entry, EventRecord | DataRecord):
                    continue
                if i == 0 and entry.origin in replaced:
                    continue  # the agent's own record of it comes from its journal
                yield entry.at_ns + off, i, entry.seq, entry

        def origin(i: int, entry: EventRecord | DataRecord) -> str:
            where = origins[i] or entry.origin
            if where in copies:
                copies[where] += 1
            return where

        streams = [shifted(i) for i in range(len(readers))]
        written = _write(output, header, streams, origin, writer_options)
        inputs = _reports(readers, [(off, method, pairs) for off, method, pairs, _ in offsets])
        return MergeReport(output=output, inputs=inputs, records=written, copies=copies)
    finally:
        for r in readers:
            r.close()
