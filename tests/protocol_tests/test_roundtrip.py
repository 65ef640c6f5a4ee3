"""Round trips through a connection pair: every message, every split, random sequences."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfmig.protocol import (
    METHODS,
    AbortStream,
    Config,
    Connection,
    ConnectionClosed,
    ConnectionState,
    Credit,
    DataChunk,
    Encoding,
    EndOfStream,
    ErrorResponse,
    Goodbye,
    HandshakeCompleted,
    InitialDataSent,
    Notification,
    Ping,
    Pong,
    Request,
    Response,
    Role,
    StreamEnded,
    SwitchoverAck,
    decode_chunk_payload,
    encode_chunk_payload,
    make_compressor,
    make_decompressor,
)

ORCH, AGENT, SENDER, RECEIVER = Role.ORCHESTRATOR, Role.AGENT, Role.DATA_SENDER, Role.DATA_RECEIVER


@pytest.mark.parametrize("first", [ORCH, SENDER])
def test_handshake_negotiates_session(pair, first):
    p = pair(first)
    a, b = p.conn[first], p.conn[p.second]
    assert a.state is b.state is ConnectionState.ESTABLISHED
    assert a.session is not None
    assert a.session.peer_name == f"{p.second}-1"
    assert a.session.peer_role is p.second
    assert a.session.version == 1
    assert a.session.compression
    assert a.session.features == frozenset({"reinit_ack"})


def test_handshake_takes_the_smaller_chunk_size_and_common_features(pair, key):
    small = Config(key=key, max_chunk_size=1 << 16, compression=False, features=frozenset())
    p = pair(SENDER, config=Config(key=key), peer_config=small)
    for conn in p.conn.values():
        assert conn.session is not None
        assert conn.session.max_chunk_size == 1 << 16
        assert not conn.session.compression
        assert conn.session.features == frozenset()


def test_handshake_with_random_nonces_and_no_key(pair):
    p = pair(ORCH, config=Config(key=None), fixed_nonces=False)
    assert p.conn[ORCH].state is ConnectionState.ESTABLISHED


def test_handshake_completes_in_one_shot_too(key):
    """Feeding the peer's whole handshake at once gives the same result as ping-pong."""
    o = Connection(ORCH, Config(key=key), name="o")
    a = Connection(AGENT, Config(key=key), name="a")
    a.receive_data(o.data_to_send())  # o's Hello; a answers with Hello + Auth
    events = o.receive_data(a.data_to_send())  # a's Hello + Auth; o sends Auth + Ready
    assert events == []
    assert o.state is ConnectionState.AUTHENTICATED
    (done,) = a.receive_data(o.data_to_send())  # o's Auth + Ready
    assert isinstance(done, HandshakeCompleted)
    (done,) = o.receive_data(a.data_to_send())  # a's Ready
    assert isinstance(done, HandshakeCompleted)


def test_sending_is_allowed_once_authenticated(key):
    """Pipelining: a side that verified the peer may send before the peer's Ready."""
    o = Connection(ORCH, Config(key=key), name="o")
    a = Connection(AGENT, Config(key=key), name="a")
    a.receive_data(o.data_to_send())
    o.receive_data(a.data_to_send())
    assert o.state is ConnectionState.AUTHENTICATED
    request = Request(id=7, method="status", params={})
    data = o.data_to_send() + o.send(request)
    events = a.receive_data(data)
    assert [type(e) for e in events] == [HandshakeCompleted, Request]


def test_control_messages_round_trip(pair):
    p = pair(ORCH)
    p.send(ORCH, Request(id=1, method="open_device", params={"device": "sim:a", "options": {}}))
    p.send(ORCH, Request(id=2, method="set_state", params={"device": "sim:a", "state": 3}))
    p.send(AGENT, Response(id=1, result={"flags": 7, "name": "sim:a", "size": 1 << 40}))
    p.send(
        AGENT,
        ErrorResponse(
            id=2, code="refused", message="no", errno=22, device="sim:a", phase="precopy"
        ),
    )
    p.send(AGENT, Notification(payload={"tag": 3, "seq": 1, "fields": [1, 2.5, None, True, b"x"]}))
    p.send(ORCH, Ping(payload=b"12345678"))
    assert p.pump() == {ORCH: [Pong(payload=b"12345678")], AGENT: []}
    p.send(AGENT, Goodbye(code="normal", reason="bye"))
    assert p.conn[AGENT].state is ConnectionState.CLOSING
    p.send(ORCH, Goodbye())
    assert p.conn[ORCH].state is p.conn[AGENT].state is ConnectionState.CLOSED
    assert p.conn[ORCH].receive_data(b"") == [ConnectionClosed(clean=True, transport_lost=False)]


def test_unknown_method_is_passed_through_to_the_agent(pair):
    """A newer orchestrator may call a method this side does not know (forward compat)."""
    p = pair(ORCH)
    o = p.conn[ORCH]
    frame = o._seal(Request(id=3, method="frobnicate", params={}))
    assert p.conn[AGENT].receive_data(frame) == [Request(id=3, method="frobnicate", params={})]


def test_data_stream_round_trips_and_decodes(pair):
    p = pair(SENDER)
    s = p.conn[SENDER]
    p.send(RECEIVER, Credit(stream=5, increment=3 << 20))
    compressor, decompressor = make_compressor(-1), make_decompressor(8 << 20)
    blocks = [bytes(1 << 20), os.urandom(1 << 20), b"abc" * 1000]
    offset = 0
    received = []
    for seq, raw in enumerate(blocks):
        encoding, payload = encode_chunk_payload(compressor, raw)
        parts = s.send_data(5, seq, offset, len(raw), encoding, payload)
        assert len(parts) == 2
        assert len(parts[1]) == len(payload)
        events = p.conn[RECEIVER].receive_data(b"".join(parts))
        (chunk,) = events
        assert isinstance(chunk, DataChunk)
        received.append(bytes(decode_chunk_payload(decompressor, chunk, 8 << 20)))
        offset += len(raw)
    assert received == blocks
    p.send(SENDER, InitialDataSent(stream=5, offset=offset))
    p.send(RECEIVER, SwitchoverAck(stream=5, offset=offset))
    (ended,) = p.conn[RECEIVER].receive_data(s.send(EndOfStream(stream=5, total=offset)))
    assert ended == StreamEnded(stream=5, total=offset, chunks=3, ok=True)
    stats = s.statistics()
    assert stats.raw_bytes_sent == offset
    assert stats.data_chunks_sent == 3
    assert stats.payload_bytes_sent < offset  # zeros and text compressed, random sent raw
    assert p.conn[RECEIVER].statistics().payload_bytes_received == stats.payload_bytes_sent


def test_encode_sends_incompressible_data_raw_and_compressible_data_as_zstd():
    compressor = make_compressor(1)
    random_bytes = os.urandom(4096)
    assert encode_chunk_payload(compressor, random_bytes) == (Encoding.RAW, random_bytes)
    encoding, payload = encode_chunk_payload(compressor, bytes(4096))
    assert encoding is Encoding.ZSTD
    assert len(payload) < 100
    assert encode_chunk_payload(None, bytes(4096)) == (Encoding.RAW, bytes(4096))


def test_send_data_does_not_copy_the_payload(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=1 << 20))
    payload = os.urandom(1 << 20)
    header, body = p.conn[SENDER].send_data(1, 0, 0, len(payload), Encoding.RAW, payload)
    assert isinstance(body, memoryview)
    assert body.obj is payload
    assert len(header) == 8 + 25


def test_abort_stream(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=2, increment=100))
    p.send(
        SENDER,
        DataChunk(stream=2, seq=0, offset=0, raw_len=3, encoding=Encoding.RAW, payload=b"abc"),
    )
    p.send(SENDER, AbortStream(stream=2, reason="device read failed"))
    assert p.conn[SENDER].statistics().open_streams == 0
    assert p.conn[RECEIVER].statistics().open_streams == 0


# --- every split ---------------------------------------------------------------------------


def _session(pair, first):
    """A deterministic session. Returns the pair, everything ``first`` sent, and where
    its handshake ends (the data receiver must grant credit there, before any chunk)."""
    p = pair(first)
    handshake_end = len(p.wire[first])
    if first is ORCH:
        p.send(ORCH, Request(id=1, method="get_state", params={"device": "sim:x"}))
        p.send(ORCH, Ping(payload=b"p"))
        p.pump()
        p.send(ORCH, Goodbye(reason="done"))
    else:
        p.send(RECEIVER, Credit(stream=1, increment=1000))
        p.send(
            SENDER,
            DataChunk(
                stream=1,
                seq=0,
                offset=0,
                raw_len=200,
                encoding=Encoding.RAW,
                payload=bytes(range(200)),
            ),
        )
        zstd = make_compressor(3).compress(b"z" * 300)
        p.send(
            SENDER,
            DataChunk(
                stream=1, seq=1, offset=200, raw_len=300, encoding=Encoding.ZSTD, payload=zstd
            ),
        )
        p.send(SENDER, InitialDataSent(stream=1, offset=500))
        p.send(SENDER, EndOfStream(stream=1, total=500))
    return p, bytes(p.wire[first]), handshake_end


def _fresh_peer(p, stream, handshake_end):
    """A new connection identical to ``p``'s second side, fed the first side's handshake."""
    role = p.second
    old = p.conn[role]
    peer = Connection(role, old.config, name=old.name, nonce=old._nonce)
    events = peer.receive_data(stream[:handshake_end])
    assert [type(e) for e in events] == [HandshakeCompleted]
    if role is RECEIVER:
        peer.send(Credit(stream=1, increment=1000))
    return peer


def _fresh_feed(p, pieces):
    role = p.second
    old = p.conn[role]
    peer = Connection(role, old.config, name=old.name, nonce=old._nonce)
    return [e for piece in pieces if piece for e in peer.receive_data(piece)]


def test_every_split_point_of_the_handshake_gives_the_same_events(pair, helpers):
    p, stream, _ = _session(pair, ORCH)
    reference = _fresh_feed(p, [stream])
    assert len(reference) == 4  # HandshakeCompleted, Request, Ping, Goodbye
    for cut in range(len(stream) + 1):
        events = _fresh_feed(p, [stream[:cut], stream[cut:]])
        assert events == reference, f"split at byte {cut}"
    one_by_one = _fresh_feed(p, [stream[i : i + 1] for i in range(len(stream))])
    assert one_by_one == reference


@pytest.mark.parametrize("first", [ORCH, SENDER])
def test_every_split_point_after_the_handshake_gives_the_same_events(pair, helpers, first):
    p, stream, start = _session(pair, first)
    reference = helpers.normalize(_fresh_peer(p, stream, start).receive_data(stream[start:]))
    assert len(reference) >= 3
    for cut in range(start, len(stream) + 1):
        peer = _fresh_peer(p, stream, start)
        events = [
            e
            for piece in (stream[start:cut], stream[cut:])
            if piece
            for e in peer.receive_data(piece)
        ]
        assert helpers.normalize(events) == reference, f"split at byte {cut}"


@pytest.mark.parametrize("first", [ORCH, SENDER])
def test_byte_at_a_time(pair, helpers, first):
    p, stream, start = _session(pair, first)
    reference = helpers.normalize(_fresh_peer(p, stream, start).receive_data(stream[start:]))
    peer = _fresh_peer(p, stream, start)
    events = []
    for i in range(start, len(stream)):
        events += peer.receive_data(stream[i : i + 1])
    assert helpers.normalize(events) == reference
    assert peer.statistics().buffered == 0


# --- random sequences ------------------------------------------------------------------------

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
payloads = st.dictionaries(st.text(max_size=8), values, max_size=5)


def _params(method):
    shapes = {
        "str": st.text(max_size=10),
        "int": st.integers(0, 1 << 40),
        "bool": st.booleans(),
        "bytes": st.binary(max_size=8),
        "list": st.lists(values, max_size=3),
        "map": payloads,
    }
    spec = METHODS[method].params
    required = {k: shapes[shape] for k, (shape, req) in spec.items() if req}
    optional = {k: shapes[shape] for k, (shape, req) in spec.items() if not req}
    return st.fixed_dictionaries(required, optional=optional)


control_actions = st.lists(
    st.one_of(
        st.sampled_from(sorted(METHODS)).flatmap(
            lambda m: _params(m).map(lambda params: ("request", m, params))
        ),
        values.map(lambda v: ("respond", v)),
        st.tuples(st.text(max_size=10), st.integers(0, 4095) | st.none()).map(
            lambda t: ("error", *t)
        ),
        payloads.map(lambda p: ("notify", p)),
        st.binary(max_size=64).map(lambda b: ("ping", b)),
    ),
    max_size=25,
)


def _splitter(draw_sizes):
    def split(data):
        pieces, pos = [], 0
        for size in draw_sizes:
            pieces.append(data[pos : pos + size])
            pos += size
        pieces.append(data[pos:])
        return [piece for piece in pieces if piece]  # b"" would mean EOF

    return split


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=control_actions, sizes=st.lists(st.integers(0, 40), max_size=8))
def test_random_control_sequences_round_trip(pair, actions, sizes):
    p = pair(ORCH)
    outstanding: list[int] = []
    next_id = 0
    for action in actions:
        kind = action[0]
        if kind == "request" and len(outstanding) < 64:
            p.send(
                ORCH,
                Request(id=next_id, method=action[1], params=action[2]),
                split=_splitter(sizes),
            )
            outstanding.append(next_id)
            next_id += 1
        elif kind == "respond" and outstanding:
            p.send(AGENT, Response(id=outstanding.pop(0), result=action[1]))
        elif kind == "error" and outstanding:
            rid = outstanding.pop()
            p.send(AGENT, ErrorResponse(id=rid, code="failed", message=action[1], errno=action[2]))
        elif kind == "notify":
            p.send(AGENT, Notification(payload=action[1]), split=_splitter(sizes))
        elif kind == "ping":
            p.send(ORCH, Ping(payload=action[1]))
            assert p.pump()[ORCH] == [Pong(payload=action[1])]
    assert p.conn[ORCH].statistics().requests_outstanding_sent == len(outstanding)
    assert p.conn[AGENT].statistics().requests_outstanding_received == len(outstanding)


data_actions = st.lists(
    st.one_of(
        st.integers(1, 5000).map(lambda n: ("credit", n)),
        st.tuples(st.integers(1, 3000), st.sampled_from(["zero", "random", "text"])).map(
            lambda t: ("chunk", *t)
        ),
        st.just(("mark",)),
        st.just(("ack",)),
        st.just(("end",)),
    ),
    max_size=40,
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=data_actions, sizes=st.lists(st.integers(0, 700), max_size=6))
def test_random_data_sequences_round_trip_within_the_window(pair, actions, sizes):
    """The sender never has more than the granted window in flight; everything decodes."""
    p = pair(SENDER)
    s, r = p.conn[SENDER], p.conn[RECEIVER]
    compressor, decompressor = make_compressor(1), make_decompressor(1 << 20)
    stream, offset, seq, marked, acked = 0, 0, 0, None, None
    p.send(RECEIVER, Credit(stream=stream, increment=1))
    granted, sent = 1, 0
    for action in actions:
        kind = action[0]
        if kind == "credit":
            p.send(RECEIVER, Credit(stream=stream, increment=action[1]))
            granted += action[1]
        elif kind == "chunk":
            size = min(action[1], s.send_window(stream))
            assert s.send_window(stream) == granted - sent
            if size == 0:
                continue
            raw = {"zero": bytes(size), "random": os.urandom(size), "text": b"ab" * size}[
                action[2]
            ][:size]
            encoding, payload = encode_chunk_payload(compressor, raw)
            chunk = DataChunk(
                stream=stream,
                seq=seq,
                offset=offset,
                raw_len=size,
                encoding=encoding,
                payload=payload,
            )
            p.send(SENDER, chunk, split=_splitter(sizes))
            assert decode_chunk_payload(decompressor, chunk, 1 << 20) == raw
            seq, offset, sent = seq + 1, offset + size, sent + size
        elif kind == "mark":
            p.send(SENDER, InitialDataSent(stream=stream, offset=offset))
            marked = offset
        elif kind == "ack" and marked is not None and marked != acked:
            p.send(RECEIVER, SwitchoverAck(stream=stream, offset=marked))
            acked = marked
        elif kind == "end":
            p.send(SENDER, EndOfStream(stream=stream, total=offset))
            stream, offset, seq, marked, acked = stream + 1, 0, 0, None, None
            p.send(RECEIVER, Credit(stream=stream, increment=1))
            granted, sent = 1, 0
        assert sent <= granted
    assert s.statistics().raw_bytes_sent == r.statistics().raw_bytes_received
