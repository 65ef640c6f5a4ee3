"""Events: what a caller sends with ``Connection.send`` and gets from ``receive_data``.

Each wire message class has an explicit ``TAG`` (the frame's type byte, never derived from
the class name) and is both sent and received as itself, with one exception: a sender
sends :class:`EndOfStream` and the receiver gets :class:`StreamEnded` (the receiver's
verdict on the digest). :class:`HandshakeCompleted` and :class:`ConnectionClosed` are
produced by the connection itself. Field meanings and limits: docs/protocol.md §5.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeAlias

if TYPE_CHECKING:
    from ._state import Role

#: A msgpack value as this protocol carries it: str map keys, lists (never tuples), no ext.
Value: TypeAlias = "bool | int | float | str | bytes | list[Value] | dict[str, Value] | None"


class Encoding(enum.IntEnum):
    """How a data chunk's payload encodes its raw bytes (the chunk header's ``encoding``)."""

    RAW = 0  #: the payload is the raw bytes
    ZSTD = 1  #: the payload is one independent zstd frame declaring its content size


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every event."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Message(Event):
    """An event that travels as one frame of type ``TAG``."""

    TAG: ClassVar[int]


# --- produced by the connection ------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeCompleted(Event):
    """Both sides proved the key and agreed on the session; the connection is ESTABLISHED."""

    peer_name: str
    peer_role: Role
    version: int
    #: Chunks may be zstd-compressed (both sides offered zstd).
    compression: bool
    #: The zstd level the peer compresses with (informational: for the journal).
    peer_compression_level: int
    #: Largest raw chunk either side may send (the smaller of both sides' limits).
    max_chunk_size: int
    #: Optional features both sides offered.
    features: frozenset[str]
    #: Requests this side may have outstanding towards the peer.
    peer_max_outstanding_requests: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed(Event):
    """The transport ended: ``receive_data(b"")`` (EOF) or ``receive_data(None)`` (lost).

    ``clean`` means the peer said Goodbye first; ``transport_lost`` means the transport
    failed rather than closed.
    """

    clean: bool
    transport_lost: bool


# --- keepalive and closing -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping(Message):
    """Keepalive probe; the peer's connection answers with a :class:`Pong` by itself."""

    TAG: ClassVar[int] = 0x10
    payload: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong(Message):
    """Answer to a :class:`Ping`, echoing its payload. Sent by the connection, never by you."""

    TAG: ClassVar[int] = 0x11
    payload: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class Goodbye(Message):
    """This side sends nothing more. ``code`` is ``normal`` or an :class:`ErrorCode` value."""

    TAG: ClassVar[int] = 0x12
    code: str = "normal"
    reason: str = ""


# --- control RPC (orchestrator -> agent) ---------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Request(Message):
    """Call ``method`` (one of ``METHODS``) on the agent; answered by the same ``id``."""

    TAG: ClassVar[int] = 0x20
    id: int
    method: str
    params: dict[str, Value]


@dataclass(frozen=True, slots=True, kw_only=True)
class Response(Message):
    """Successful result of request ``id``."""

    TAG: ClassVar[int] = 0x21
    id: int
    result: Value


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorResponse(Message):
    """Failed request ``id``: ``code`` is machine-readable, ``message`` one line for people."""

    TAG: ClassVar[int] = 0x22
    id: int
    code: str
    message: str
    errno: int | None = None
    device: str | None = None
    phase: str | None = None
    #: With code ``hung``: the step that holds the device (which may not be the request's).
    step: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Notification(Message):
    """One of the agent's events, streamed to the orchestrator (the engine defines it)."""

    TAG: ClassVar[int] = 0x23
    payload: dict[str, Value]


# --- data link (data-sender -> data-receiver) ----------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DataChunk(Message):
    """``raw_len`` bytes of stream ``stream`` at ``offset``, encoded as ``encoding``.

    Prefer ``Connection.send_data`` (no copy) to ``send(DataChunk(...))``. A received
    payload is a read-only memoryview; decode it with ``decode_chunk_payload``.
    """

    TAG: ClassVar[int] = 0x30
    stream: int
    seq: int
    offset: int
    raw_len: int
    encoding: Encoding
    payload: bytes | memoryview


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfStream(Message):
    """Sent by the data sender after the last chunk; ``total`` raw bytes were sent.

    The connection adds the chunk count and the keyed digest; the receiver gets
    :class:`StreamEnded`.
    """

    TAG: ClassVar[int] = 0x31
    stream: int
    total: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEnded(Event):
    """The receiver's verdict on a stream: ``ok`` only if the digest, the total and the
    chunk count all match what arrived. Accept the device state only if ``ok``."""

    stream: int
    total: int
    chunks: int
    ok: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Credit(Message):
    """The data receiver allows ``increment`` more raw bytes on ``stream``.

    The first grant for a stream id opens the stream.
    """

    TAG: ClassVar[int] = 0x32
    stream: int
    increment: int


@dataclass(frozen=True, slots=True, kw_only=True)
class InitialDataSent(Message):
    """The sender's device reported its initial precopy data done at stream ``offset``."""

    TAG: ClassVar[int] = 0x33
    stream: int
    offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SwitchoverAck(Message):
    """The receiver loaded the stream's initial precopy data up to ``offset`` (a mark)."""

    TAG: ClassVar[int] = 0x34
    stream: int
    offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AbortStream(Message):
    """The sender gives up on ``stream``; the receiver must not accept its data."""

    TAG: ClassVar[int] = 0x35
    stream: int
    reason: str
