"""The journal format in bytes: header, frames and records (pure: no files, no clock).

Theory of operation
-------------------
A journal is a header followed by independent frames (docs/journal.md is the
specification; this module is its only implementation)::

    header   "VFMIGJNL" u16 format-version u16 flags(0) u32 length, msgpack map, u32 CRC-32
    frame    "VJF1" u32 length u32 records u16 flags u16 0 u64 first-seq i64 first-mono-ns
             u32 CRC-32 of the 32 bytes before it, then ``length`` bytes: one zstd frame
             (content size and content checksum on) holding msgpack records back to back
    record   [seq, mono_ns, wall_ns, tag, field, ...]

A frame header carries its own CRC, so a damaged length is caught before it is trusted, and
the zstd content checksum covers the records; a reader therefore never acts on damaged
bytes, and can skip a frame by its header alone (seeking, counting). Frames decode on their
own: a reader holds one frame at a time, and a crash loses only the frame being written.

Records: ``tag > 0`` is an event (:func:`vfmig.core.events.to_record` gives ``[tag,
fields...]``); negative tags are the journal's own records: a snapshot of the reduced view
(-1), a chunk of raw device data (-2), a change of origin host within a frame (-3) and the
closing record (-4). ``seq`` is gap-free over the file (the writer's host numbers every
record it writes, its own included).

Versions: the *format version* is the container layout above; the *schema version* is the
records' vocabulary (event tags and fields), bumped whenever it grows. A reader refuses a
journal of a newer format or schema with a clear message, and reads every older one: tags
are never reused and fields are only appended, with defaults.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import msgpack
import zstandard

from vfmig.core.errors import JournalError
from vfmig.core.events import Event, RecordError, from_record, to_record
from vfmig.core.fsm import MigrationFlags
from vfmig.core.model import DeviceId

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

MAGIC: Final = b"VFMIGJNL"
FORMAT_VERSION: Final = 1
#: The records' vocabulary. 1: the first schema (tests/journal/data/ keeps a journal of it);
#: 2: PeerLost (tag 18).
SCHEMA_VERSION: Final = 2

FRAME_MAGIC: Final = b"VJF1"
#: Frame flag: the frame's first record is a snapshot (a reader may start folding there).
FRAME_SNAPSHOT: Final = 0x1

_PREFIX = struct.Struct("<8sHHI")
_CRC = struct.Struct("<I")
_FRAME = struct.Struct("<4sIIHHQq")
FRAME_HEADER_SIZE: Final = _FRAME.size + _CRC.size  # 36

#: Limits a reader enforces, so damaged or hostile bytes cannot make it allocate much.
#: The header map is a few KiB (one entry per device); 1 MiB is generous.
MAX_HEADER_BYTES: Final = 1 << 20
#: A writer closes a frame at 1 MiB of records (plus at most one 1 MiB data record);
#: 32 MiB leaves room for a writer configured with a bigger cap without trusting anything.
MAX_FRAME_BYTES: Final = 32 << 20
#: Raw device data is stored in records of at most this many bytes (bounded memory).
MAX_DATA_RECORD: Final = 1 << 20


_NO_FLAGS: Final = MigrationFlags(0)


class Kind(enum.IntEnum):
    """Tags of the journal's own records (events use positive tags)."""

    SNAPSHOT = -1  #: [state map]: the reduced view before this record
    DATA = -2  #: [device, offset, bytes]: raw device stream bytes at that stream offset
    ORIGIN = -3  #: [host]: the following records of this frame were observed on ``host``
    CLOSED = -4  #: [records]: the writer closed the journal after this many records


# --- header ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceInfo:
    """One device of the run, as the header lists it."""

    id: DeviceId
    spec: str  #: what the user typed (``sim:a,size=64MiB``, ``vfio:0000:3b:00.1@hostB:7000``)
    identity: str = ""  #: host-qualified physical identity, when known at the start
    flags: MigrationFlags = _NO_FLAGS


@dataclass(frozen=True, slots=True, kw_only=True)
class JournalHeader:
    """What a journal says about itself before its first record."""

    host: str
    role: str  #: ``orchestrator``, ``agent``, ``save``, ``load``, ``merged``...
    run_id: str
    kernel: str
    start_wall_ns: int
    start_mono_ns: int
    devices: tuple[DeviceInfo, ...] = ()
    data: bool = False  #: raw device data records may follow (``--journal-data``, ``save``)
    vfmig: str = ""
    schema_version: int = SCHEMA_VERSION
    #: ``merged`` journals: one map per input (host, role, run_id, offset_ns, pairs, method).
    merged_from: tuple[Mapping[str, Any], ...] = ()

    def device(self, dev: DeviceId) -> DeviceInfo | None:
        return next((d for d in self.devices if d.id == dev), None)


def _header_map(header: JournalHeader) -> dict[str, Any]:
    return {
        "schema_version": header.schema_version,
        "vfmig": header.vfmig,
        "host": header.host,
        "role": header.role,
        "run_id": header.run_id,
        "kernel": header.kernel,
        "start_wall_ns": header.start_wall_ns,
        "start_mono_ns": header.start_mono_ns,
        "devices": [
            {"id": str(d.id), "spec": d.spec, "identity": d.identity, "flags": int(d.flags)}
            for d in header.devices
        ],
        "data": header.data,
        "merged_from": [dict(m) for m in header.merged_from],
    }


def encode_header(header: JournalHeader) -> bytes:
    body: bytes = msgpack.packb(_header_map(header), use_bin_type=True)
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(body))
    return prefix + body + _CRC.pack(zlib.crc32(prefix + body))


def header_size(prefix: bytes) -> int:
    """Total header bytes, from its first :data:`HEADER_PREFIX_SIZE` bytes (JournalError)."""
    magic, version, _flags, length = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise JournalError("not a vfmig journal (bad magic)")
    if version > FORMAT_VERSION:
        raise JournalError(
            f"journal format {version} is newer than this vfmig reads ({FORMAT_VERSION})",
            hint="read it with a newer vfmig",
        )
    if length > MAX_HEADER_BYTES:
        raise JournalError(f"damaged journal header (claims {length} bytes)")
    return int(_PREFIX.size + length + _CRC.size)


HEADER_PREFIX_SIZE: Final = _PREFIX.size


def decode_header(data: bytes) -> JournalHeader:
    """The header in ``data`` (exactly :func:`header_size` bytes); JournalError if it is bad."""
    size = header_size(data[:HEADER_PREFIX_SIZE])
    if len(data) != size:
        raise JournalError("truncated journal header")
    (crc,) = _CRC.unpack(data[-_CRC.size :])
    if zlib.crc32(data[: -_CRC.size]) != crc:
        raise JournalError("damaged journal header (checksum mismatch)")
    try:
        m = msgpack.unpackb(data[HEADER_PREFIX_SIZE : -_CRC.size], raw=False, strict_map_key=True)
        schema = m["schema_version"]
        if type(schema) is not int:
            raise TypeError("schema_version")
        if schema > SCHEMA_VERSION:
            raise JournalError(
                f"journal schema {schema} is newer than this vfmig reads ({SCHEMA_VERSION}); "
                f"it was written by vfmig {m.get('vfmig') or 'unknown'}",
                hint="read it with that vfmig or a newer one",
            )
        return JournalHeader(
            schema_version=schema,
            vfmig=str(m.get("vfmig", "")),
            host=str(m["host"]),
            role=str(m["role"]),
            run_id=str(m["run_id"]),
            kernel=str(m.get("kernel", "")),
            start_wall_ns=int(m["start_wall_ns"]),
            start_mono_ns=int(m["start_mono_ns"]),
            devices=tuple(
                DeviceInfo(
                    id=DeviceId.parse(d["id"]),
                    spec=str(d.get("spec", "")),
                    identity=str(d.get("identity", "")),
                    flags=MigrationFlags(int(d.get("flags", 0))),
                )
                for d in m.get("devices", ())
            ),
            data=bool(m.get("data", False)),
            merged_from=tuple(dict(x) for x in m.get("merged_from", ())),
        )
    except JournalError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, msgpack.UnpackException) as exc:
        raise JournalError(f"damaged journal header ({type(exc).__name__}: {exc})") from None


# --- frames ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FrameHeader:
    length: int  #: bytes of the zstd frame that follows
    records: int
    flags: int
    first_seq: int
    first_mono_ns: int

    @property
    def snapshot(self) -> bool:
        return bool(self.flags & FRAME_SNAPSHOT)


class FrameDamage(Exception):
    """A frame that cannot be used; the message says why (for the reader's damage report)."""


def encode_frame_header(h: FrameHeader) -> bytes:
    head = _FRAME.pack(FRAME_MAGIC, h.length, h.records, h.flags, 0, h.first_seq, h.first_mono_ns)
    return head + _CRC.pack(zlib.crc32(head))


def decode_frame_header(data: bytes) -> FrameHeader:
    """The frame header in ``data`` (:data:`FRAME_HEADER_SIZE` bytes); FrameDamage if bad."""
    magic, length, records, flags, _zero, first_seq, first_mono = _FRAME.unpack(data[: _FRAME.size])
    (crc,) = _CRC.unpack(data[_FRAME.size : FRAME_HEADER_SIZE])
    if magic != FRAME_MAGIC:
        raise FrameDamage("no frame starts here (bad frame magic)")
    if zlib.crc32(data[: _FRAME.size]) != crc:
        raise FrameDamage("damaged frame header (checksum mismatch)")
    if length > MAX_FRAME_BYTES or records == 0:
        raise FrameDamage(f"implausible frame header ({length} bytes, {records} records)")
    return FrameHeader(length, records, flags, first_seq, first_mono)


def compressor(level: int = 3) -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)


def encode_frame(
    body: bytes,
    *,
    records: int,
    first_seq: int,
    first_mono_ns: int,
    flags: int = 0,
    zstd: zstandard.ZstdCompressor,
) -> bytes:
    """One frame: header and the zstd-compressed ``body`` (packed records)."""
    compressed = zstd.compress(body)
    header = FrameHeader(len(compressed), records, flags, first_seq, first_mono_ns)
    return encode_frame_header(header) + compressed


def decode_frame_body(header: FrameHeader, compressed: bytes) -> list[list[Any]]:
    """The records of one frame, as msgpack lists; FrameDamage if the body is damaged."""
    try:
        size = zstandard.frame_content_size(compressed)
        if size < 0 or size > MAX_FRAME_BYTES:
            raise FrameDamage(f"implausible frame content size {size}")
        body = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise FrameDamage(f"damaged frame ({exc})") from None
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max(len(body), 1))
    unpacker.feed(body)
    records: list[list[Any]] = []
    try:
        for item in unpacker:
            if type(item) is not list or len(item) < 4:
                raise FrameDamage(f"not a record: {item!r:.60}")
            records.append(item)
    except (msgpack.UnpackException, ValueError) as exc:
        raise FrameDamage(f"damaged records ({exc})") from None
    if len(records) != header.records:
        raise FrameDamage(f"frame holds {len(records)} records, its header says {header.records}")
    return records


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EventRecord:
    seq: int
    at_ns: int  #: monotonic time on the journal's clock
    wall_ns: int
    origin: str  #: the host that observed it
    event: Event


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotRecord:
    seq: int
    at_ns: int
    wall_ns: int
    origin: str
    state: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class DataRecord:
    seq: int
    at_ns: int
    wall_ns: int
    origin: str
    device: DeviceId
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ClosedRecord:
    seq: int
    at_ns: int
    wall_ns: int
    origin: str
    records: int


Entry = EventRecord | SnapshotRecord | DataRecord | ClosedRecord


def pack(seq: int, mono_ns: int, wall_ns: int, body: list[Any]) -> bytes:
    """One record: ``[seq, mono_ns, wall_ns, *body]`` where body is ``[tag, fields...]``."""
    packed: bytes = msgpack.packb([seq, mono_ns, wall_ns, *body], use_bin_type=True)
    return packed


def decode_records(raw: list[list[Any]], origin: str) -> Iterator[Entry | RecordError]:
    """Entries of one frame's records; ``origin`` is the journal's host (each frame starts
    there; ORIGIN records change it). A record that does not decode yields its RecordError
    (the caller stops there)."""
    for item in raw:
        seq, at_ns, wall_ns, tag = item[:4]
        if not (type(seq) is int and type(at_ns) is int and type(wall_ns) is int):
            yield RecordError(f"record envelope is not [seq, mono_ns, wall_ns, tag]: {item!r:.60}")
            return
        if type(tag) is not int:
            yield RecordError(f"record {seq}: tag {tag!r} is not an integer")
            return
        fields = item[4:]
        try:
            if tag > 0:
                yield EventRecord(
                    event=from_record(item[3:]),
                    seq=seq,
                    at_ns=at_ns,
                    wall_ns=wall_ns,
                    origin=origin,
                )
            elif tag == Kind.ORIGIN:
                (host,) = fields[:1]
                if type(host) is not str:
                    raise TypeError("host")
                origin = host
            elif tag == Kind.DATA:
                device, offset, data = fields[:3]
                if type(offset) is not int or type(data) is not bytes:
                    raise TypeError("offset/data")
                yield DataRecord(
                    device=DeviceId.parse(device),
                    offset=offset,
                    data=data,
                    seq=seq,
                    at_ns=at_ns,
                    wall_ns=wall_ns,
                    origin=origin,
                )
            elif tag == Kind.SNAPSHOT:
                (state,) = fields[:1]
                if type(state) is not dict:
                    raise TypeError("state")
                yield SnapshotRecord(
                    state=state, seq=seq, at_ns=at_ns, wall_ns=wall_ns, origin=origin
                )
            elif tag == Kind.CLOSED:
                (count,) = fields[:1]
                if type(count) is not int:
                    raise TypeError("records")
                yield ClosedRecord(
                    records=count, seq=seq, at_ns=at_ns, wall_ns=wall_ns, origin=origin
                )
            else:
                raise RecordError(f"unknown journal record tag {tag}")
        except RecordError as exc:
            yield RecordError(f"record {seq}: {exc.message}")
            return
        except (TypeError, ValueError, AttributeError) as exc:
            yield RecordError(f"record {seq}: malformed {Kind(tag).name} record ({exc})")
            return


def body_of(entry: EventRecord | DataRecord | SnapshotRecord) -> list[Any]:
    """``[tag, fields...]`` of an entry, to write it again (merging)."""
    if isinstance(entry, EventRecord):
        return to_record(entry.event)
    if isinstance(entry, DataRecord):
        return [int(Kind.DATA), str(entry.device), entry.offset, entry.data]
    return [int(Kind.SNAPSHOT), dict(entry.state)]
