"""The journal file: round trip, truncation, corruption, versions, flushing, snapshots, data."""

from __future__ import annotations

import os
import stat
import struct
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.core import events as ev
from vfmig.core.errors import JournalError
from vfmig.core.model import Phase, source
from vfmig.core.view import RunView, from_snapshot, reduce
from vfmig.journal import codec
from vfmig.journal.codec import (
    FRAME_HEADER_SIZE,
    ClosedRecord,
    DataRecord,
    EventRecord,
    SnapshotRecord,
)
from vfmig.journal.reader import JournalReader
from vfmig.journal.writer import JournalWriter

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from vfmig.journal.synthetic import Observation


def read_all(path: Path) -> tuple[list[codec.Entry], JournalReader]:
    reader = JournalReader(path)
    with reader:
        entries = list(reader.entries())
    return entries, reader


def events_of(entries: list[codec.Entry]) -> list[tuple[int, str, ev.Event]]:
    return [(e.at_ns, e.origin, e.event) for e in entries if isinstance(e, EventRecord)]


def frame_offsets(path: Path) -> list[int]:
    with JournalReader(path) as reader:
        return [f.offset for f in reader.frames()]


def test_round_trip(
    tmp_path: Path, write_journal: Callable[..., Path], default_run: list[Observation]
) -> None:
    path = write_journal(tmp_path / "run.vfj", default_run, frame_bytes=2048)
    entries, reader = read_all(path)
    assert events_of(entries) == [(o.at_ns, o.host, o.event) for o in default_run]
    times = [o.at_ns for o in default_run]
    assert times == sorted(times)  # as a live writer's clock gives them
    assert reader.status.intact
    assert reader.status.frames > 3  # the small frame cap split it
    assert isinstance(entries[-1], ClosedRecord)
    assert entries[-1].records == entries[-1].seq
    assert reader.header.devices[0].identity == "hostA:sim:a0"
    assert reader.header.schema_version == codec.SCHEMA_VERSION


def test_header_round_trip(journal_header: Callable[..., codec.JournalHeader]) -> None:
    h = journal_header(data=True, merged_from=({"host": "hostA", "offset_ns": -5},))
    assert codec.decode_header(codec.encode_header(h)) == h


def test_sequence_numbers_are_gap_free_over_every_record(
    tmp_path: Path, write_journal: Callable[..., Path], default_run: list[Observation]
) -> None:
    path = write_journal(tmp_path / "run.vfj", default_run, frame_bytes=512)
    with JournalReader(path) as reader:
        expected = 0
        for frame in reader.frames():
            assert frame.header.first_seq == expected
            expected += frame.header.records
    entries, _ = read_all(path)
    assert entries[-1].seq == expected - 1


def test_file_is_private_and_never_overwritten(
    tmp_path: Path, journal_header: Callable[..., codec.JournalHeader]
) -> None:
    path = tmp_path / "j.vfj"
    old = os.umask(0)
    try:
        JournalWriter.create(path, journal_header()).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(JournalError, match="already exists"):
        JournalWriter.create(path, journal_header())


def test_truncation_at_every_byte_of_the_last_frame(
    tmp_path: Path, write_journal: Callable[..., Path], default_run: list[Observation]
) -> None:
    path = write_journal(tmp_path / "run.vfj", default_run, frame_bytes=4096)
    data = path.read_bytes()
    with JournalReader(path) as reader:
        last_frame = list(reader.frames())[-1]
    last = last_frame.offset
    full, _ = read_all(path)
    before_last = [e for e in full if e.seq < last_frame.header.first_seq]
    cut_path = tmp_path / "cut.vfj"
    for cut in range(last, len(data)):
        cut_path.write_bytes(data[:cut])
        entries, reader = read_all(cut_path)
        assert entries == before_last, cut
        status = reader.status
        assert not status.closed
        if cut == last:
            assert status.damage is None  # ends cleanly between frames, without its end
        else:
            assert status.damage is not None
            assert status.damage.truncated
            assert status.damage.offset == last
        assert status.last_seq == before_last[-1].seq


def test_corruption_anywhere_in_a_frame_stops_before_it(
    tmp_path: Path, write_journal: Callable[..., Path], default_run: list[Observation]
) -> None:
    path = write_journal(tmp_path / "run.vfj", default_run, frame_bytes=1024)
    data = path.read_bytes()
    offsets = frame_offsets(path)
    victim, after = offsets[2], offsets[3]
    full, _ = read_all(path)
    with JournalReader(path) as reader:
        headers = [f.header for f in reader.frames()]
    first_damaged = headers[2].first_seq
    good = [e for e in full if e.seq < first_damaged]
    bad_path = tmp_path / "bad.vfj"
    for position in range(victim, after):
        damaged = bytearray(data)
        damaged[position] ^= 0x5A
        bad_path.write_bytes(bytes(damaged))
        entries, reader = read_all(bad_path)
        assert entries == good, position
        assert reader.status.damage is not None
        assert not reader.status.damage.truncated
        assert reader.status.damage.offset == victim
        with JournalReader(bad_path) as again:
            frames, _records, first, _last = again.resync(victim)
        assert frames == len(offsets) - 3
        assert first == headers[3].first_seq


def test_a_missing_frame_is_a_gap(
    tmp_path: Path, write_journal: Callable[..., Path], default_run: list[Observation]
) -> None:
    path = write_journal(tmp_path / "run.vfj", default_run, frame_bytes=1024)
    data = path.read_bytes()
    offsets = frame_offsets(path)
    spliced = tmp_path / "gap.vfj"
    spliced.write_bytes(data[: offsets[2]] + data[offsets[3] :])
    with JournalReader(path) as reader:
        lost = list(reader.frames())[2].header
    _, reader = read_all(spliced)
    assert reader.status.gaps == [(lost.first_seq, lost.first_seq + lost.records)]
    assert not reader.status.intact


def test_damaged_or_foreign_headers_are_refused(
    tmp_path: Path, journal_header: Callable[..., codec.JournalHeader]
) -> None:
    good = codec.encode_header(journal_header())
    cases = {
        "notes.txt": (b"hello, this is not a journal at all", "not a vfmig journal"),
        "short.vfj": (good[:5], "too short"),
        "crc.vfj": (good[:-1] + bytes([good[-1] ^ 1]), "checksum"),
        "cut.vfj": (good[:-3], "truncated journal header"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(JournalError, match=message):
            JournalReader(tmp_path / name)


def _header_with(map_changes: dict[str, Any], *, version: int = codec.FORMAT_VERSION) -> bytes:
    import zlib

    import msgpack

    m = codec._header_map(
        codec.JournalHeader(
            host="h", role="agent", run_id="r", kernel="k", start_wall_ns=0, start_mono_ns=0
        )
    )
    m.update(map_changes)
    body = msgpack.packb(m, use_bin_type=True)
    prefix = struct.pack("<8sHHI", codec.MAGIC, version, 0, len(body))
    return prefix + body + struct.pack("<I", zlib.crc32(prefix + body))


def test_newer_schema_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "new.vfj"
    path.write_bytes(_header_with({"schema_version": codec.SCHEMA_VERSION + 1, "vfmig": "9.0"}))
    with pytest.raises(JournalError) as info:
        JournalReader(path)
    assert f"schema {codec.SCHEMA_VERSION + 1} is newer" in info.value.message
    assert "vfmig 9.0" in info.value.message
    assert info.value.hint is not None


def test_newer_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.vfj"
    path.write_bytes(_header_with({}, version=codec.FORMAT_VERSION + 1))
    with pytest.raises(JournalError, match="format 2 is newer"):
        JournalReader(path)


def test_unknown_header_keys_and_missing_optional_ones_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "old.vfj"
    path.write_bytes(_header_with({"future_key": [1, 2]}))
    with JournalReader(path) as reader:
        assert reader.header.host == "h"
        assert list(reader.entries()) == []


def test_frames_close_every_second_at_phase_changes_and_at_the_size_cap(
    tmp_path: Path, journal_header: Callable[..., codec.JournalHeader], clock: Any
) -> None:
    path = tmp_path / "j.vfj"
    sample = ev.DataSizeSampled(device=source(0), size=1)
    writer = JournalWriter.create(
        path, journal_header(), mono_clock=clock.mono, wall_clock=clock.wall, frame_bytes=4096
    )
    size = path.stat().st_size
    writer.append(sample)
    clock.now_ns += 999_999_999
    writer.append(sample)
    writer.maybe_flush()
    assert path.stat().st_size == size  # younger than a second: still buffered
    clock.now_ns += 1
    writer.maybe_flush()
    assert path.stat().st_size > size
    size = path.stat().st_size
    writer.append(sample)
    writer.append(ev.PhaseChanged(phase=Phase.PRECOPY, previous=None))
    assert path.stat().st_size > size  # a phase change closes the frame at once
    size = path.stat().st_size
    for _ in range(200):
        writer.append(sample)
    assert path.stat().st_size > size  # 200 records pass 4 KiB: closed by size
    writer.close()
    writer.close()  # idempotent
    _, reader = read_all(path)
    assert reader.status.intact
    assert reader.status.records == 205


def test_snapshots_hold_the_view_folded_so_far(
    tmp_path: Path, write_journal: Callable[..., Path], default_run: list[Observation]
) -> None:
    path = write_journal(
        tmp_path / "run.vfj", default_run, frame_bytes=1024, snapshot_interval_ns=1_000_000
    )
    entries, _ = read_all(path)
    model = RunView()
    snapshots = 0
    for entry in entries:
        if isinstance(entry, SnapshotRecord):
            snapshots += 1
            assert from_snapshot(entry.state) == model
        elif isinstance(entry, EventRecord):
            model = reduce(model, entry)
    assert snapshots > 5


def test_seeking_from_a_snapshot_gives_the_same_view(
    tmp_path: Path, write_journal: Callable[..., Path], default_run: list[Observation]
) -> None:
    path = write_journal(
        tmp_path / "run.vfj", default_run, frame_bytes=1024, snapshot_interval_ns=1_000_000
    )
    entries, _ = read_all(path)
    everything = RunView()
    for entry in entries:
        if isinstance(entry, EventRecord):
            everything = reduce(everything, entry)
    middle = default_run[len(default_run) // 2].at_ns
    with JournalReader(path) as reader:
        start = reader.snapshot_before(middle)
        assert start is not None
        assert start > reader.first_frame
        model: RunView | None = None
        for entry in reader.entries(start):
            if model is None:
                assert isinstance(entry, SnapshotRecord)
                model = from_snapshot(entry.state)
            elif isinstance(entry, EventRecord):
                model = reduce(model, entry)
    assert model == everything


def test_data_records_stream_back_in_bounded_pieces(
    tmp_path: Path, journal_header: Callable[..., codec.JournalHeader], clock: Any
) -> None:
    path = tmp_path / "d.vfj"
    payload = os.urandom((3 << 20) + 12345)
    with JournalWriter.create(
        path, journal_header(data=True), mono_clock=clock.mono, wall_clock=clock.wall
    ) as writer:
        writer.append_data(source(0), 0, payload[:1000])
        writer.append(ev.DataSizeSampled(device=source(0), size=len(payload)))
        writer.append_data(source(0), 1000, payload[1000:])
    with JournalReader(path) as reader:
        pieces = list(reader.data(source(0)))
        frames = list(reader.frames())
    assert all(len(p.data) <= codec.MAX_DATA_RECORD for p in pieces)
    assert [p.offset for p in pieces] == [
        0,
        1000,
        1000 + (1 << 20),
        1000 + (2 << 20),
        1000 + (3 << 20),
    ]
    assert b"".join(p.data for p in pieces) == payload
    assert all(isinstance(p, DataRecord) for p in pieces)
    # a frame never holds much more than the cap plus one record (bounded reader memory)
    assert max(f.header.length for f in frames) < 2 * codec.MAX_DATA_RECORD + FRAME_HEADER_SIZE


def test_a_record_of_a_newer_minor_event_layout_reads_with_defaults(
    tmp_path: Path, journal_header: Callable[..., codec.JournalHeader], clock: Any
) -> None:
    """Fields are only appended: extra trailing fields are dropped, absent ones defaulted."""
    path = tmp_path / "j.vfj"
    with JournalWriter.create(
        path, journal_header(), mono_clock=clock.mono, wall_clock=clock.wall
    ) as writer:
        writer._put(0, 0, [*ev.to_record(ev.DataSizeSampled(device=source(0), size=7)), "extra"])
    entries, reader = read_all(path)
    assert reader.status.intact
    first = entries[0]
    assert isinstance(first, EventRecord)
    assert first.event == ev.DataSizeSampled(device=source(0), size=7)
