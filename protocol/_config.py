"""Connection configuration: the shared key (or its explicit absence) and every limit.

Every number a peer can make this side spend memory or time on is bounded here, and
each bound says why it has the value it has (h11's habit). A peer exceeding one gets a
:class:`~vfmig.protocol.RemoteProtocolError` whose ``limit`` is the field name below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ._errors import ErrorCode, LocalProtocolError

#: Protocol versions this implementation speaks, oldest first (docs/protocol.md §9).
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)

#: Optional features this implementation can negotiate (docs/protocol.md §4.3).
#: ``reinit_ack``: a stream's switchover-ack may be sent again after the device
#: re-initialised its precopy data (VFIO MIG_PRECOPY_INFOv2 ``REINIT``).
FEATURES: frozenset[str] = frozenset({"reinit_ack"})

#: zstd level used when sending. Chosen by measurement (docs/adr/0002): on
#: realistic device state, level -1 compresses ~1.7x faster than level 1 for ~1 % more
#: bytes, so it wins on any link faster than ~0.6 GB/s and ties below that.
DEFAULT_COMPRESSION_LEVEL = -1

#: A shared key shorter than this is refused: 128 bits is the floor for HMAC keys.
MIN_KEY_LENGTH = 16

_MiB = 1 << 20
_KiB = 1 << 10

#: Largest raw chunk the wire format can describe (``raw_len`` is a u32).
MAX_WIRE_CHUNK = (1 << 32) - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """How one side of a connection behaves. ``key`` has no default on purpose.

    ``key=None`` is the explicit no-key mode for links inside one process (a socketpair
    between the orchestrator and its local agent): the handshake and every MAC still run,
    keyed with the empty string, so the code path is the same, but nothing is secret. It is
    chosen by configuration only: a side with a key refuses a peer without one
    (``auth_mode_mismatch``), and could not verify it anyway.
    """

    #: The pre-shared key (at least 16 bytes), or None for an in-process link.
    key: bytes | None

    #: zstd level for chunks this side sends; receivers do not care (docs/adr/0002).
    compression_level: int = DEFAULT_COMPRESSION_LEVEL
    #: Offer zstd. If either side does not, every chunk is sent raw.
    compression: bool = True
    #: Optional features to offer; the session uses those both sides offer.
    features: frozenset[str] = field(default=FEATURES)

    # --- sizes ------------------------------------------------------------------------
    #: Largest raw chunk accepted (and sent): the session uses the smaller of both sides'.
    #: mlx5 saves in 8 MiB chunks and QEMU reads 1 MiB at a time, finding nothing gained
    #: above that; a receiver holds at most one such chunk (plus its compressed form).
    max_chunk_size: int = 8 * _MiB
    #: Largest control frame (requests, responses, notifications). Control messages are
    #: small maps; 1 MiB leaves room for a large status reply and bounds what one frame
    #: can make the receiver buffer.
    max_control_frame_size: int = 1 * _MiB
    #: Largest frame before the peer is authenticated. A Hello is ~200 bytes: an
    #: unauthenticated peer must not make this side buffer more than a few KiB.
    max_handshake_frame_size: int = 4 * _KiB

    # --- msgpack (msgpack-python#503: the defaults silently cut a stream) ---------------
    #: Longest msgpack str: names, methods, reasons and messages are short.
    max_str_len: int = 64 * _KiB
    #: Longest msgpack bin in a control message: nonces, MACs and digests are 32 bytes;
    #: device data never travels as msgpack bin (it follows a fixed binary chunk header).
    max_bin_len: int = 64 * _KiB
    #: Longest msgpack array: device lists and feature lists are short.
    max_array_len: int = 4096
    #: Largest msgpack map: messages and event payloads have tens of keys.
    max_map_len: int = 1024
    #: Deepest nesting of arrays and maps. msgpack-python stops at 1024 with StackError;
    #: event payloads need a handful of levels, and decoding cost grows with depth.
    max_depth: int = 32
    #: Longest peer name (host name plus a role suffix fits easily).
    max_name_len: int = 128
    #: Longest ping payload: it only has to carry a counter or a timestamp.
    max_ping_payload: int = 64

    # --- counts -----------------------------------------------------------------------
    #: Requests the peer may have outstanding towards this side (announced in the Hello;
    #: the peer must not exceed it). Each holds an id and a pending operation in the agent.
    max_outstanding_requests: int = 64
    #: Streams open at once. A migration has one stream per device; 64 devices is far
    #: beyond any host, and each stream holds a digest state and counters.
    max_streams: int = 64
    #: Largest flow-control window a sender may be granted on one stream (h2 caps its
    #: windows at 2**31-1 for the same reason): a grant beyond it is a peer's accounting
    #: bug, and a receiver should never have more than this in flight.
    max_window: int = 1 << 30

    # --- time (driven by the caller through Connection.tick(now)) ----------------------
    #: Seconds for the whole handshake: a peer that connects and stalls must not hold a
    #: connection slot forever.
    handshake_timeout: float = 10.0
    #: Seconds without receiving anything before the peer is declared gone. Keepalive
    #: pings every ``keepalive_interval`` keep an idle but healthy link above this.
    idle_timeout: float = 60.0
    #: Seconds without sending anything before tick() queues a keepalive ping.
    keepalive_interval: float = 15.0

    def __post_init__(self) -> None:
        if self.key is not None:
            if not isinstance(self.key, bytes):
                _bad("key must be bytes or None")
            if len(self.key) < MIN_KEY_LENGTH:
                _bad(f"key is {len(self.key)} bytes: at least {MIN_KEY_LENGTH} are required")
        if not -(1 << 17) <= self.compression_level <= 22:
            _bad(f"compression_level {self.compression_level} is outside zstd's -131072..22")
        unknown = self.features - FEATURES
        if unknown:
            _bad(f"unknown features {sorted(unknown)}; known: {sorted(FEATURES)}")
        if not 1 <= self.max_chunk_size <= MAX_WIRE_CHUNK:
            _bad(f"max_chunk_size must be between 1 and {MAX_WIRE_CHUNK}")
        for name in (
            "max_control_frame_size",
            "max_handshake_frame_size",
            "max_str_len",
            "max_bin_len",
            "max_array_len",
            "max_map_len",
            "max_depth",
            "max_name_len",
            "max_ping_payload",
            "max_outstanding_requests",
            "max_streams",
            "max_window",
        ):
            if getattr(self, name) < 1:
                _bad(f"{name} must be positive")
        if self.max_handshake_frame_size < 512:
            _bad("max_handshake_frame_size must be at least 512 (a Hello must fit)")
        for name in ("handshake_timeout", "idle_timeout", "keepalive_interval"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                _bad(f"{name} must be a positive number of seconds")
        if self.keepalive_interval >= self.idle_timeout:
            _bad("keepalive_interval must be shorter than idle_timeout")

    @property
    def auth_mode(self) -> str:
        """``"psk"`` with a key, ``"none"`` without."""
        return "none" if self.key is None else "psk"


def _bad(message: str) -> None:
    raise LocalProtocolError(f"invalid protocol config: {message}", code=ErrorCode.BAD_CONFIG)
