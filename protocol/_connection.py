"""The sans-IO connection: events in, bytes out; bytes in, events out.

Theory of operation
-------------------
A :class:`Connection` owns no socket, thread or clock. The caller moves bytes:

* ``data_to_send()`` returns bytes the connection produced by itself -- its Hello (queued
  at construction), handshake replies, automatic Pongs, keepalive Pings and the Goodbye
  it sends when the peer breaks the protocol. Call it after construction and after every
  ``receive_data()`` and ``tick()``, and write what it returns.
* ``send(event)`` and ``send_data(...)`` return the bytes of what *you* send; write them
  in the order you called (the MAC sequence numbers depend on it), after anything
  ``data_to_send()`` returned before.
* ``receive_data(data)`` returns every event the bytes complete, eagerly, as a list;
  ``b""`` means EOF and ``None`` means the transport was lost, both ending in a
  :class:`ConnectionClosed` event.
* ``tick(now)`` is how time enters: the handshake deadline, the idle timeout and
  keepalive pings are computed from the ``now`` values (seconds, any monotonic origin)
  the caller passes, at least every ``keepalive_interval / 2``.

Every check raises :class:`LocalProtocolError`; ``receive_data`` and ``tick`` re-raise
it as :class:`RemoteProtocolError` (the peer is at fault there) after queueing a Goodbye
naming the error for the peer. Either way the connection is then in ERROR and every
call but ``data_to_send()``, ``state`` and ``statistics()`` raises. If the transport
fails while writing, call ``send_failed()``: a partial frame may be on the wire.

Threads: nothing here may be called from two threads. The pure functions
``encode_chunk_payload`` / ``decode_chunk_payload`` are what a worker thread runs.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._auth import ControlMac, SessionKeys, new_nonce, transcript_hash
from ._chunks import check_chunk
from ._codec import (
    KNOWN_TAGS,
    NONCE_SIZE,
    U32,
    U64,
    Auth,
    EndOfStreamFrame,
    Hello,
    Packer,
    Ready,
    check_value,
    chunk_header,
    decode_chunk,
    decode_fields,
    encode_fields,
    message_name,
    unpack_map,
)
from ._config import SUPPORTED_VERSIONS, Config
from ._errors import ErrorCode, LocalProtocolError, ProtocolError
from ._events import (
    AbortStream,
    ConnectionClosed,
    Credit,
    DataChunk,
    Encoding,
    EndOfStream,
    ErrorResponse,
    Event,
    Goodbye,
    HandshakeCompleted,
    InitialDataSent,
    Message,
    Ping,
    Pong,
    Request,
    Response,
    StreamEnded,
    SwitchoverAck,
)
from ._flow import Streams
from ._framing import (
    CHUNK_HEADER_SIZE,
    MAC_SIZE,
    SEQ,
    SEQ_SIZE,
    Frame,
    FrameReader,
    pack_header,
)
from ._methods import METHODS, check_params
from ._state import FIRST_ROLES, MAY_SEND, PEER_ROLE, ConnectionState, Input, Role, StateMachine

if TYPE_CHECKING:
    from ._events import Value

#: A Goodbye reason this side sends on error is cut to this many characters, so that it
#: fits in a handshake frame and within any sane max_str_len.
_GOODBYE_REASON_MAX = 256

_MAY_RECEIVE_TAGS: dict[Role, frozenset[int]] = {
    role: frozenset(cls.TAG for cls in MAY_SEND[PEER_ROLE[role]]) for role in Role
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionStatistics:
    """A snapshot of one connection's counters (bytes are as produced or fed in)."""

    state: ConnectionState
    version: int | None
    bytes_sent: int
    bytes_received: int
    frames_sent: int
    frames_received: int
    data_chunks_sent: int
    data_chunks_received: int
    #: Raw (uncompressed) chunk bytes and payload bytes on the wire, both directions.
    raw_bytes_sent: int
    raw_bytes_received: int
    payload_bytes_sent: int
    payload_bytes_received: int
    requests_outstanding_sent: int
    requests_outstanding_received: int
    open_streams: int
    #: Bytes of a partial frame held by the reader.
    buffered: int


class Connection:
    """One side of a vfmig protocol connection (control or data link).

    ``name`` identifies this side to the peer (shown in the peer's errors and journal).
    ``nonce`` exists for tests and the spec's examples: a fixed nonce makes this side's
    handshake replayable, so production code never passes one.
    """

    def __init__(
        self, role: Role, config: Config, *, name: str, nonce: bytes | None = None
    ) -> None:
        if not 1 <= len(name) <= config.max_name_len:
            raise LocalProtocolError(
                f"invalid protocol config: name must be 1 to {config.max_name_len} characters",
                code=ErrorCode.BAD_CONFIG,
            )
        if nonce is not None and len(nonce) != NONCE_SIZE:
            raise LocalProtocolError(
                f"invalid protocol config: a nonce is {NONCE_SIZE} bytes",
                code=ErrorCode.BAD_CONFIG,
            )
        self.role = Role(role)
        self.config = config
        self.name = name
        self._sm = StateMachine()
        self._error: ProtocolError | None = None
        self._out = bytearray()
        self._packer = Packer()
        self._reader = FrameReader(self._admit)
        self._nonce = nonce if nonce is not None else new_nonce()

        self._version: int | None = None
        self._peer_hello: Hello | None = None
        self._peer_authenticated = False
        self._peer_ready = False
        self._session: HandshakeCompleted | None = None
        self._keys: SessionKeys | None = None
        self._tx_mac: ControlMac | None = None
        self._rx_mac: ControlMac | None = None
        self._tx_seq = 0
        self._rx_seq = 0
        self._peer_max_frame = config.max_control_frame_size
        self._streams: Streams | None = None
        self._requests_out: set[int] = set()
        self._requests_in: set[int] = set()

        self._bytes_sent = 0
        self._bytes_received = 0
        self._frames_sent = 0
        self._chunks_sent = 0
        self._chunks_received = 0
        self._raw_sent = 0
        self._raw_received = 0
        self._payload_sent = 0
        self._payload_received = 0
        self._pings = 0
        self._started_at: float | None = None
        self._last_rx = self._last_tx = 0.0
        self._rx_mark = self._tx_mark = 0

        hello = Hello(
            versions=list(SUPPORTED_VERSIONS),
            role=self.role.value,
            name=name,
            nonce=self._nonce,
            auth=config.auth_mode,
            codecs=["zstd"] if config.compression else [],
            level=config.compression_level,
            max_chunk=config.max_chunk_size,
            max_requests=config.max_outstanding_requests,
            max_frame=config.max_control_frame_size,
            features=sorted(config.features),
        )
        body = self._packer.pack(encode_fields(hello))
        self._hello_frame = pack_header(SUPPORTED_VERSIONS[-1], Hello.TAG, len(body)) + body
        self._queue(self._hello_frame)

    # --- public API ------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._sm.state

    @property
    def session(self) -> HandshakeCompleted | None:
        """The negotiated session, once the peer is authenticated (else None)."""
        return self._session if self._peer_authenticated else None

    def data_to_send(self) -> bytes:
        """Bytes the connection produced by itself; works in every state, even ERROR."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def send(self, event: Event) -> bytes:
        """The bytes for ``event``; raises LocalProtocolError (and enters ERROR) if this
        side may not send it now."""
        if isinstance(event, DataChunk):
            parts = self.send_data(
                event.stream, event.seq, event.offset, event.raw_len, event.encoding, event.payload
            )
            return b"".join(parts)
        self._check_usable()
        try:
            data = self._send(event)
        except LocalProtocolError as exc:
            self._fail(exc)
            raise
        self._count_sent(len(data))
        return data

    def send_data(
        self,
        stream: int,
        seq: int,
        offset: int,
        raw_len: int,
        encoding: Encoding,
        payload: bytes | bytearray | memoryview,
    ) -> list[bytes | memoryview]:
        """A data chunk as ``[header, payload]`` for a vectored write (payload not copied).

        ``encoding, payload`` come from ``encode_chunk_payload``; ``seq`` and ``offset``
        must be the stream's next ones and ``raw_len`` within its credit.
        """
        self._check_usable()
        try:
            self._check_may_send(DataChunk)
            streams, session = self._data_state()
            view = payload if isinstance(payload, memoryview) else memoryview(payload)
            if encoding not in (Encoding.RAW, Encoding.ZSTD):
                raise LocalProtocolError(
                    f"unknown payload encoding {encoding!r}", code=ErrorCode.BAD_CHUNK
                )
            chunk = DataChunk(
                stream=stream,
                seq=seq,
                offset=offset,
                raw_len=raw_len,
                encoding=Encoding(encoding),
                payload=view,
            )
            if chunk.encoding is Encoding.ZSTD and not session.compression:
                raise LocalProtocolError(
                    "a zstd chunk, but the session has no compression (send it raw)",
                    code=ErrorCode.BAD_CHUNK,
                )
            check_chunk(chunk, session.max_chunk_size)
            if not (0 <= stream <= U32 and 0 <= seq <= U64 and 0 <= offset <= U64):
                raise LocalProtocolError(
                    f"chunk header out of range: stream {stream}, seq {seq}, offset {offset}",
                    code=ErrorCode.BAD_CHUNK,
                )
            head = chunk_header(stream, seq, offset, raw_len, chunk.encoding)
            streams.chunk(stream, seq, offset, raw_len, head, view)
        except LocalProtocolError as exc:
            self._fail(exc)
            raise
        assert self._version is not None
        frame_head = pack_header(self._version, DataChunk.TAG, CHUNK_HEADER_SIZE + len(view))
        self._count_sent(len(frame_head) + len(head) + len(view))
        self._chunks_sent += 1
        self._raw_sent += raw_len
        self._payload_sent += len(view)
        return [frame_head + head, view]

    def receive_data(self, data: bytes | bytearray | memoryview | None) -> list[Event]:
        """Events completed by ``data``; ``b""`` is EOF, ``None`` a lost transport."""
        self._check_usable()
        if self._sm.transport_ended:
            if not data:
                return []
            raise LocalProtocolError(
                "receive_data() with data after the transport ended", code=ErrorCode.CLOSED
            )
        events: list[Event] = []
        try:
            if data is None or len(data) == 0:
                self._end_of_input(events, lost=data is None)
                return events
            self._bytes_received += len(data)
            self._reader.feed(data)
            while (frame := self._reader.next_frame()) is not None:
                self._handle_frame(frame, events)
        except LocalProtocolError as exc:
            self._fail(exc, tell_peer=True)
            exc._reraise_as_remote_protocol_error()
        return events

    def tick(self, now: float) -> None:
        """Advance time to ``now`` (seconds): deadlines and keepalive (see module doc)."""
        self._check_usable()
        if self._sm.state is ConnectionState.CLOSED:
            return
        if self._started_at is None:
            self._started_at = self._last_rx = self._last_tx = now
        if self._bytes_received != self._rx_mark:
            self._rx_mark, self._last_rx = self._bytes_received, now
        if self._bytes_sent != self._tx_mark:
            self._tx_mark, self._last_tx = self._bytes_sent, now
        cfg = self.config
        try:
            if not self._peer_ready and now - self._started_at >= cfg.handshake_timeout:
                raise LocalProtocolError(
                    f"the handshake did not complete within handshake_timeout="
                    f"{cfg.handshake_timeout:g} s",
                    code=ErrorCode.HANDSHAKE_TIMEOUT,
                    limit="handshake_timeout",
                )
            if now - self._last_rx >= cfg.idle_timeout:
                raise LocalProtocolError(
                    f"nothing received from the peer for {now - self._last_rx:.1f} s "
                    f"(idle_timeout={cfg.idle_timeout:g} s)",
                    code=ErrorCode.IDLE_TIMEOUT,
                    limit="idle_timeout",
                )
        except LocalProtocolError as exc:
            self._fail(exc, tell_peer=True)
            exc._reraise_as_remote_protocol_error()
        if self._sm.may_send and now - self._last_tx >= cfg.keepalive_interval:
            self._pings += 1
            self._queue(self._seal(Ping(payload=self._pings.to_bytes(8, "big"))))
            self._tx_mark, self._last_tx = self._bytes_sent, now

    def send_failed(self) -> None:
        """The transport failed while writing: the connection is unusable (ERROR)."""
        if self._sm.state is not ConnectionState.ERROR:
            self._fail(
                LocalProtocolError("the transport failed while sending", code=ErrorCode.CLOSED)
            )

    def send_window(self, stream: int) -> int:
        """Raw bytes this data sender may still send on ``stream`` (0 if not open)."""
        return 0 if self._streams is None else self._streams.window(stream)

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            state=self._sm.state,
            version=self._version,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            frames_sent=self._frames_sent,
            frames_received=self._reader.frames,
            data_chunks_sent=self._chunks_sent,
            data_chunks_received=self._chunks_received,
            raw_bytes_sent=self._raw_sent,
            raw_bytes_received=self._raw_received,
            payload_bytes_sent=self._payload_sent,
            payload_bytes_received=self._payload_received,
            requests_outstanding_sent=len(self._requests_out),
            requests_outstanding_received=len(self._requests_in),
            open_streams=0 if self._streams is None else len(self._streams.open),
            buffered=self._reader.buffered,
        )

    # --- sending ---------------------------------------------------------------------------

    def _send(self, event: Event) -> bytes:
        if not isinstance(event, Message) or isinstance(event, Pong):
            raise LocalProtocolError(
                f"{type(event).__name__} is not something a caller sends"
                + (" (the connection answers pings itself)" if isinstance(event, Pong) else ""),
                code=ErrorCode.UNEXPECTED_MESSAGE,
            )
        if isinstance(event, Goodbye):
            closing = self._sm.state is ConnectionState.CLOSING
            if self._sm.goodbye_sent or not (self._sm.may_send or closing):
                raise self._state_error(event)
            data = self._seal(event, self._vetted(event))
            self._sm.process(Input.GOODBYE_SENT)
            return data
        self._check_may_send(type(event))
        if isinstance(event, EndOfStream):
            return self._seal(self._end_stream(event))
        fields = self._vetted(event)
        if isinstance(event, Request):
            self._on_send_request(event)
        elif isinstance(event, Response | ErrorResponse):
            if event.id not in self._requests_in:
                raise LocalProtocolError(
                    f"{type(event).__name__} {event.id} answers no request received",
                    code=ErrorCode.UNKNOWN_REQUEST,
                )
        elif isinstance(event, Credit | InitialDataSent | SwitchoverAck | AbortStream):
            self._send_stream_control(event)
        data = self._seal(event, fields)
        if isinstance(event, Request):
            self._requests_out.add(event.id)
        elif isinstance(event, Response | ErrorResponse):
            self._requests_in.discard(event.id)
        return data

    def _vetted(self, message: Message) -> dict[str, Value]:
        """The message's wire fields, refused unless the peer's decoder would accept them
        (the same decoder runs here, so "what we send, a peer of this version reads")."""
        fields = encode_fields(message)
        check_value(fields, self.config, type(message).__name__)
        decode_fields(message.TAG, fields, self.config)
        return fields

    def _on_send_request(self, event: Request) -> None:
        assert self._session is not None
        if event.id in self._requests_out:
            raise LocalProtocolError(
                f"request id {event.id} is already outstanding", code=ErrorCode.DUPLICATE_REQUEST
            )
        limit = self._session.peer_max_outstanding_requests
        if len(self._requests_out) >= limit:
            raise LocalProtocolError(
                f"{limit} requests are outstanding, the peer's limit (max_outstanding_requests)",
                code=ErrorCode.LIMIT,
                limit="max_outstanding_requests",
            )
        if event.method not in METHODS:
            raise LocalProtocolError(
                f"unknown method {event.method!r}; known: {', '.join(METHODS)}",
                code=ErrorCode.BAD_PARAMS,
            )
        check_params(event.method, event.params)

    def _send_stream_control(self, event: Event) -> None:
        streams, _ = self._data_state()
        if isinstance(event, Credit):
            streams.credit(event.stream, event.increment, local=True)
        elif isinstance(event, InitialDataSent):
            streams.mark(event.stream, event.offset)
        elif isinstance(event, SwitchoverAck):
            streams.ack(event.stream, event.offset, local=True)
        else:
            assert isinstance(event, AbortStream)
            streams.end(event.stream)

    def _end_stream(self, event: EndOfStream) -> EndOfStreamFrame:
        streams, _ = self._data_state()
        s = streams._get(event.stream, "EndOfStream")
        if event.total != s.offset:
            raise LocalProtocolError(
                f"EndOfStream for stream {event.stream} says {event.total} bytes, but "
                f"{s.offset} were sent",
                code=ErrorCode.STREAM_ORDER,
            )
        streams.end(event.stream)
        digest = s.digest.finish(s.offset, s.chunks)
        return EndOfStreamFrame(stream=s.id, total=s.offset, chunks=s.chunks, digest=digest)

    def _seal(self, message: Message, fields: dict[str, Value] | None = None) -> bytes:
        """Frame a control message: plain before this side's Auth, MACed from Ready on."""
        body = self._packer.pack(encode_fields(message) if fields is None else fields)
        version = self._version if self._version is not None else SUPPORTED_VERSIONS[-1]
        if self._tx_mac is None:
            return pack_header(version, message.TAG, len(body)) + body
        length = SEQ_SIZE + len(body) + MAC_SIZE
        if length > self._peer_max_frame and not isinstance(message, Goodbye):
            raise LocalProtocolError(
                f"{_a(type(message).__name__)} frame of {length} bytes is above the peer's "
                f"max_control_frame_size={self._peer_max_frame}",
                code=ErrorCode.FRAME_TOO_LARGE,
                limit="max_control_frame_size",
            )
        header = pack_header(version, message.TAG, length)
        seq = SEQ.pack(self._tx_seq)
        self._tx_seq += 1
        return header + seq + body + self._tx_mac.tag(header, seq, body)

    def _queue(self, data: bytes) -> None:
        self._out += data
        self._count_sent(len(data))

    def _count_sent(self, size: int) -> None:
        self._bytes_sent += size
        self._frames_sent += 1

    # --- receiving -------------------------------------------------------------------------

    def _admit(self, tag: int) -> tuple[int, str]:
        """Header-time check of a frame type; returns its size limit and the limit's name."""
        if tag not in KNOWN_TAGS:
            raise LocalProtocolError(
                f"unknown message type 0x{tag:02x} (protocol version "
                f"{self._version or SUPPORTED_VERSIONS[-1]})",
                code=ErrorCode.UNKNOWN_MESSAGE,
            )
        if self._sm.goodbye_received:
            raise self._unexpected(tag, "after its Goodbye")
        if self._peer_hello is None:
            expected, where = {Hello.TAG, Goodbye.TAG}, "before its Hello"
        elif not self._peer_authenticated:
            expected, where = {Auth.TAG, Goodbye.TAG}, "before authenticating"
        elif not self._peer_ready:
            expected, where = {Ready.TAG, Goodbye.TAG}, "before its Ready"
        else:
            expected, where = set(_MAY_RECEIVE_TAGS[self.role]), ""
        if tag not in expected:
            raise self._unexpected(tag, where)
        if not self._peer_authenticated:
            return self.config.max_handshake_frame_size, "max_handshake_frame_size"
        if tag == DataChunk.TAG:
            assert self._session is not None
            return CHUNK_HEADER_SIZE + self._session.max_chunk_size, "max_chunk_size"
        return self.config.max_control_frame_size, "max_control_frame_size"

    def _unexpected(self, tag: int, where: str) -> LocalProtocolError:
        who = self._peer_description()
        return LocalProtocolError(
            f"{message_name(tag)} from {who} {where}".rstrip()
            + ("" if where else f": {_a(PEER_ROLE[self.role])} may not send it"),
            code=ErrorCode.UNEXPECTED_MESSAGE,
        )

    def _peer_description(self) -> str:
        if self._peer_hello is None:
            return "the peer"
        return f"{self._peer_hello.role} {self._peer_hello.name!r}"

    def _handle_frame(self, frame: Frame, events: list[Event]) -> None:
        tag = frame.tag
        if tag != Hello.TAG and self._version is not None and frame.version != self._version:
            raise LocalProtocolError(
                f"{_a(message_name(tag))} frame in protocol version {frame.version}, but the "
                f"session speaks version {self._version}",
                code=ErrorCode.BAD_VERSION,
            )
        if tag == DataChunk.TAG:
            self._on_chunk(frame, events)
            return
        body: bytes | bytearray | memoryview = frame.body
        if self._peer_authenticated:
            body = self._open(frame)
        name = message_name(tag)
        message = decode_fields(tag, unpack_map(body, self.config, name), self.config)
        if isinstance(message, Hello):
            self._on_hello(frame, message)
        elif isinstance(message, Auth):
            self._on_auth(message)
        elif isinstance(message, Ready):
            self._peer_ready = True
            if self._sm.state is ConnectionState.AUTHENTICATED:
                self._sm.process(Input.PEER_READY)
                assert self._session is not None
                events.append(self._session)
        elif isinstance(message, Goodbye):
            self._on_goodbye(message, events)
        else:
            self._on_message(message, events)

    def _open(self, frame: Frame) -> memoryview:
        """Verify a control frame's MAC and sequence number; return its msgpack part."""
        assert self._rx_mac is not None
        body = memoryview(frame.body)
        if len(body) < SEQ_SIZE + MAC_SIZE:
            raise LocalProtocolError(
                f"{_a(message_name(frame.tag))} frame of {len(body)} bytes cannot hold a "
                "sequence number and a MAC",
                code=ErrorCode.BAD_MESSAGE,
            )
        if not self._rx_mac.check(body[-MAC_SIZE:], frame.header, body[:-MAC_SIZE]):
            raise LocalProtocolError(
                f"{_a(message_name(frame.tag))} control frame failed its MAC check: it was "
                "altered or injected in transit",
                code=ErrorCode.BAD_MAC,
            )
        (seq,) = SEQ.unpack_from(body)
        if seq != self._rx_seq:
            raise LocalProtocolError(
                f"control frame seq {seq}, expected {self._rx_seq}: a frame was replayed, "
                "reordered or dropped in transit",
                code=ErrorCode.BAD_SEQUENCE,
            )
        self._rx_seq += 1
        return body[SEQ_SIZE:-MAC_SIZE]

    def _on_hello(self, frame: Frame, hello: Hello) -> None:
        cfg = self.config
        self._peer_hello = hello
        who = self._peer_description()
        common = set(hello.versions) & set(SUPPORTED_VERSIONS)
        if not common:
            raise LocalProtocolError(
                f"protocol version mismatch: this side speaks {_versions(SUPPORTED_VERSIONS)}, "
                f"{who} speaks {_versions(hello.versions)}",
                code=ErrorCode.VERSION_MISMATCH,
                hint="run the same vfmig release on both hosts (or upgrade the older one)",
            )
        if hello.role not in PEER_ROLE.values() or Role(hello.role) is not PEER_ROLE[self.role]:
            raise LocalProtocolError(
                f"{who} is not {_a(PEER_ROLE[self.role])}: {_a(self.role)} cannot talk to it",
                code=ErrorCode.ROLE_MISMATCH,
            )
        if hello.nonce == self._nonce:
            raise LocalProtocolError(
                "the peer's Hello carries this side's own nonce: a reflected handshake",
                code=ErrorCode.AUTH_FAILED,
            )
        if hello.auth != cfg.auth_mode:
            raise LocalProtocolError(
                f"{who} runs with auth {hello.auth!r}, this side with {cfg.auth_mode!r}",
                code=ErrorCode.AUTH_MODE_MISMATCH,
                hint="give both sides the same key file (no-key mode is for in-process links)",
            )
        self._version = max(common)
        self._peer_max_frame = hello.max_frame
        peer_frame = bytes(frame.header) + bytes(frame.body)
        first, second = (
            (self._hello_frame, peer_frame)
            if self.role in FIRST_ROLES
            else (peer_frame, self._hello_frame)
        )
        keys = SessionKeys(cfg.key, transcript_hash(first, second), self._version)
        self._keys = keys
        features = frozenset(hello.features) & cfg.features
        self._session = HandshakeCompleted(
            peer_name=hello.name,
            peer_role=PEER_ROLE[self.role],
            version=self._version,
            compression=cfg.compression and "zstd" in hello.codecs,
            peer_compression_level=hello.level,
            max_chunk_size=min(hello.max_chunk, cfg.max_chunk_size),
            features=features,
            peer_max_outstanding_requests=hello.max_requests,
        )
        self._streams = Streams(
            max_streams=cfg.max_streams,
            max_window=cfg.max_window,
            reinit_ack="reinit_ack" in features,
            digest_for=keys.stream_digest,
        )
        self._queue(self._seal(Auth(mac=keys.proof(self.role.value))))
        self._tx_mac = keys.control_mac(self.role.value)
        self._rx_mac = keys.control_mac(PEER_ROLE[self.role].value)

    def _on_auth(self, auth: Auth) -> None:
        assert self._keys is not None
        if not self._keys.check_proof(PEER_ROLE[self.role].value, auth.mac):
            raise LocalProtocolError(
                f"authentication failed: {self._peer_description()} does not know the shared "
                "key (or replayed an old handshake)",
                code=ErrorCode.AUTH_FAILED,
                hint="check that both sides use the same key file",
            )
        self._peer_authenticated = True
        self._sm.process(Input.PEER_AUTHENTICATED)
        self._queue(self._seal(Ready()))

    def _on_goodbye(self, goodbye: Goodbye, events: list[Event]) -> None:
        if not self._peer_authenticated:
            raise LocalProtocolError(
                f"{self._peer_description()} ended the handshake: {goodbye.code}: {goodbye.reason}",
                code=ErrorCode.PEER_ERROR,
            )
        self._sm.process(Input.GOODBYE_RECEIVED)
        events.append(goodbye)

    def _on_message(self, message: Message, events: list[Event]) -> None:
        if isinstance(message, Request):
            self._on_request(message)
        elif isinstance(message, Response | ErrorResponse):
            if message.id not in self._requests_out:
                raise LocalProtocolError(
                    f"{type(message).__name__} for request {message.id}, which is not outstanding",
                    code=ErrorCode.UNKNOWN_REQUEST,
                )
            self._requests_out.discard(message.id)
        elif isinstance(message, Ping):
            if self._sm.may_send:
                self._queue(self._seal(Pong(payload=message.payload)))
        elif isinstance(message, EndOfStreamFrame):
            events.append(self._on_end_of_stream(message))
            return
        elif isinstance(
            message, Credit | SwitchoverAck | InitialDataSent | AbortStream
        ) and not self._on_stream_control(message):
            return  # a late Credit or SwitchoverAck for a closed stream
        events.append(message)

    def _on_request(self, request: Request) -> None:
        if request.id in self._requests_in:
            raise LocalProtocolError(
                f"request id {request.id} is already outstanding",
                code=ErrorCode.DUPLICATE_REQUEST,
            )
        limit = self.config.max_outstanding_requests
        if len(self._requests_in) >= limit:
            raise LocalProtocolError(
                f"more than max_outstanding_requests={limit} requests outstanding",
                code=ErrorCode.LIMIT,
                limit="max_outstanding_requests",
            )
        check_params(request.method, request.params)
        self._requests_in.add(request.id)

    def _on_stream_control(self, message: Message) -> bool:
        """Apply a received stream message; False if it is to be dropped silently."""
        streams, _ = self._data_state()
        if isinstance(message, Credit):
            return streams.credit(message.stream, message.increment, local=False)
        if isinstance(message, SwitchoverAck):
            return streams.ack(message.stream, message.offset, local=False)
        if isinstance(message, InitialDataSent):
            streams.mark(message.stream, message.offset)
        else:
            assert isinstance(message, AbortStream)
            streams.end(message.stream)
        return True

    def _on_end_of_stream(self, frame: EndOfStreamFrame) -> StreamEnded:
        streams, _ = self._data_state()
        s = streams.end(frame.stream)
        expected = s.digest.finish(s.offset, s.chunks)
        ok = (
            frame.total == s.offset
            and frame.chunks == s.chunks
            and hmac.compare_digest(expected, frame.digest)
        )
        return StreamEnded(stream=s.id, total=s.offset, chunks=s.chunks, ok=ok)

    def _on_chunk(self, frame: Frame, events: list[Event]) -> None:
        streams, session = self._data_state()
        chunk = decode_chunk(frame.body)
        if chunk.encoding is Encoding.ZSTD and not session.compression:
            raise LocalProtocolError(
                f"chunk {chunk.seq} of stream {chunk.stream} is zstd, but the session has "
                "no compression",
                code=ErrorCode.BAD_CHUNK,
            )
        check_chunk(chunk, session.max_chunk_size)
        header = memoryview(frame.body)[:CHUNK_HEADER_SIZE]
        streams.chunk(chunk.stream, chunk.seq, chunk.offset, chunk.raw_len, header, chunk.payload)
        self._chunks_received += 1
        self._raw_received += chunk.raw_len
        self._payload_received += len(chunk.payload)
        events.append(chunk)

    def _end_of_input(self, events: list[Event], *, lost: bool) -> None:
        if not lost and self._reader.buffered:
            raise LocalProtocolError(
                f"the peer closed the connection inside a frame ({self._reader.buffered} "
                "bytes of it received)",
                code=ErrorCode.TRUNCATED,
            )
        clean = self._sm.goodbye_received and not lost
        self._sm.process(Input.TRANSPORT_ENDED)
        events.append(ConnectionClosed(clean=clean, transport_lost=lost))

    # --- helpers ---------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._sm.state is ConnectionState.ERROR:
            raise LocalProtocolError(
                f"the connection failed earlier and is unusable: {self._error}",
                code=ErrorCode.BAD_STATE,
            )

    def _check_may_send(self, cls: type[Message]) -> None:
        if cls not in MAY_SEND[self.role]:
            raise LocalProtocolError(
                f"{_a(self.role)} may not send {cls.__name__}", code=ErrorCode.UNEXPECTED_MESSAGE
            )
        if not self._sm.may_send:
            raise self._state_error(cls)

    def _state_error(self, what: Message | type[Message]) -> LocalProtocolError:
        name = what.__name__ if isinstance(what, type) else type(what).__name__
        if self._sm.state is ConnectionState.CLOSED:
            return LocalProtocolError(f"cannot send {name}: closed", code=ErrorCode.CLOSED)
        return LocalProtocolError(
            f"cannot send {name} in state {self._sm.state.value}"
            + (" (wait for HandshakeCompleted)" if not self._peer_authenticated else ""),
            code=ErrorCode.BAD_STATE,
        )

    def _data_state(self) -> tuple[Streams, HandshakeCompleted]:
        assert self._streams is not None
        assert self._session is not None
        return self._streams, self._session

    def _fail(self, exc: ProtocolError, *, tell_peer: bool = False) -> None:
        """Enter ERROR; for a peer's fault, queue a Goodbye that tells it why."""
        if self._sm.state is ConnectionState.ERROR:
            return
        if tell_peer and not self._sm.goodbye_sent and self._sm.state is not ConnectionState.CLOSED:
            reason = exc.message[:_GOODBYE_REASON_MAX]
            self._queue(self._seal(Goodbye(code=exc.code.value, reason=reason)))
        self._error = exc
        self._sm.process(Input.FAILED)


def _a(word: str) -> str:
    """``word`` with its indefinite article: "an agent", "a data-sender"."""
    return ("an " if word[:1].lower() in "aeio" else "a ") + word


def _versions(versions: list[int] | tuple[int, ...]) -> str:
    ordered = sorted(set(versions))
    if len(ordered) > 1 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"versions {ordered[0]}-{ordered[-1]}"
    return ("version " if len(ordered) == 1 else "versions ") + ", ".join(map(str, ordered))
