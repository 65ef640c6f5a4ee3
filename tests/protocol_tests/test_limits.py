"""Every limit a peer can hit is a RemoteProtocolError naming the Config field."""

from __future__ import annotations

import pytest

from vfmig.protocol import (
    Config,
    Connection,
    ConnectionState,
    Credit,
    DataChunk,
    Encoding,
    ErrorCode,
    LocalProtocolError,
    Notification,
    Ping,
    Pong,
    RemoteProtocolError,
    Request,
    Response,
    Role,
)
from vfmig.protocol._codec import Hello, chunk_header
from vfmig.protocol._framing import pack_header

ORCH, AGENT, SENDER, RECEIVER = Role.ORCHESTRATOR, Role.AGENT, Role.DATA_SENDER, Role.DATA_RECEIVER
BIG = {
    "max_str_len": 1 << 20,
    "max_bin_len": 1 << 20,
    "max_array_len": 1 << 16,
    "max_map_len": 1 << 16,
    "max_depth": 500,
}


def _remote(fn, *args, code=None, limit=None):
    with pytest.raises(RemoteProtocolError) as info:
        fn(*args)
    if code is not None:
        assert info.value.code is code, info.value
    assert info.value.limit == limit, info.value
    if limit:
        assert limit in str(info.value)
    return info.value


def _local(fn, *args, code=None, limit=None):
    with pytest.raises(LocalProtocolError) as info:
        fn(*args)
    if code is not None:
        assert info.value.code is code, info.value
    assert info.value.limit == limit, info.value
    return info.value


# --- sizes -----------------------------------------------------------------------------------


def test_handshake_frame_limit_is_checked_before_buffering(key):
    a = Connection(AGENT, Config(key=key), name="agent")
    _remote(
        a.receive_data,
        pack_header(1, Hello.TAG, 4097),
        code=ErrorCode.FRAME_TOO_LARGE,
        limit="max_handshake_frame_size",
    )
    assert a.statistics().buffered == 0


def test_control_frame_limit(pair, key):
    p = pair(ORCH, config=Config(key=key, max_control_frame_size=4096))
    _remote(
        p.conn[AGENT].receive_data,
        pack_header(1, Request.TAG, 4097),
        code=ErrorCode.FRAME_TOO_LARGE,
        limit="max_control_frame_size",
    )
    q = pair(ORCH, config=Config(key=key, max_control_frame_size=4096))
    # the sender knows the peer's limit from its Hello and refuses locally
    _local(
        q.conn[AGENT].send,
        Notification(payload={"x": "y" * 5000}),
        code=ErrorCode.FRAME_TOO_LARGE,
        limit="max_control_frame_size",
    )


def test_chunk_frame_limit(pair, key):
    p = pair(SENDER, config=Config(key=key, max_chunk_size=1024))
    p.send(RECEIVER, Credit(stream=1, increment=1 << 20))
    _remote(
        p.conn[RECEIVER].receive_data,
        pack_header(1, DataChunk.TAG, 25 + 1025),
        code=ErrorCode.FRAME_TOO_LARGE,
        limit="max_chunk_size",
    )
    q = pair(SENDER, config=Config(key=key, max_chunk_size=1024))
    q.send(RECEIVER, Credit(stream=1, increment=1 << 20))
    _local(
        q.conn[SENDER].send_data,
        1,
        0,
        0,
        1025,
        Encoding.RAW,
        bytes(1025),
        code=ErrorCode.BAD_CHUNK,
        limit="max_chunk_size",
    )


def test_a_small_payload_claiming_a_large_raw_length_is_refused(pair, key):
    p = pair(SENDER, config=Config(key=key, max_chunk_size=1024))
    p.send(RECEIVER, Credit(stream=1, increment=1 << 20))
    body = chunk_header(1, 0, 0, 1 << 30, Encoding.ZSTD) + b"\x28\xb5\x2f\xfd"
    _remote(
        p.conn[RECEIVER].receive_data,
        pack_header(1, DataChunk.TAG, len(body)) + body,
        code=ErrorCode.BAD_CHUNK,
        limit="max_chunk_size",
    )


def _sealed(conn, message, fields):
    """A correctly MACed frame whose fields the sending API would not produce."""
    return conn._seal(message, fields)


@pytest.mark.parametrize(
    ("limit", "value"),
    [
        ("max_str_len", "x" * 2000),
        ("max_bin_len", b"x" * 2000),
        ("max_array_len", list(range(2000))),
        ("max_map_len", {str(i): i for i in range(2000)}),
    ],
)
def test_msgpack_length_limits(pair, key, limit, value):
    small = Config(key=key, **{limit: 1000})
    p = pair(ORCH, config=small, peer_config=Config(key=key, **BIG))
    data = p.conn[AGENT].send(Notification(payload={"v": value}))
    err = _remote(p.conn[ORCH].receive_data, data, code=ErrorCode.LIMIT, limit=limit)
    assert "2000" in str(err)


def test_msgpack_nesting_limit(pair, key):
    nested: object = 1
    for _ in range(40):
        nested = [nested]
    p = pair(ORCH, config=Config(key=key), peer_config=Config(key=key, **BIG))
    data = p.conn[AGENT].send(Notification(payload={"v": nested}))
    _remote(p.conn[ORCH].receive_data, data, code=ErrorCode.LIMIT, limit="max_depth")
    # deeper than msgpack-python's own stack (1024): still the same error
    q = pair(ORCH, config=Config(key=key), peer_config=Config(key=key, **BIG))
    body = b"\x81\xa7payload\x81\xa1v" + b"\x91" * 3000 + b"\x01"
    frame = q.conn[AGENT]._seal(Notification(payload={}), {})
    forged = _reseal(q.conn[AGENT], frame, body)
    _remote(q.conn[ORCH].receive_data, forged, code=ErrorCode.LIMIT, limit="max_depth")


def _reseal(conn, frame, body):
    """Replace a just-sealed frame's msgpack body, re-MACed with the same sequence number."""
    from vfmig.protocol._framing import SEQ

    conn._tx_seq -= 1
    header = pack_header(1, frame[3], 8 + len(body) + 16)
    seq = SEQ.pack(conn._tx_seq)
    conn._tx_seq += 1
    return header + seq + body + conn._tx_mac.tag(header, seq, body)


def test_name_and_ping_limits(pair, key):
    a = Connection(AGENT, Config(key=key, max_name_len=8), name="agent")
    o = Connection(ORCH, Config(key=key), name="a-long-orchestrator-name")
    _remote(a.receive_data, o.data_to_send(), code=ErrorCode.LIMIT, limit="max_name_len")
    p = pair(ORCH, config=Config(key=key), peer_config=Config(key=key, max_ping_payload=8))
    _remote(
        p.conn[AGENT].receive_data,
        p.conn[ORCH].send(Ping(payload=bytes(9))),
        code=ErrorCode.LIMIT,
        limit="max_ping_payload",
    )
    q = pair(ORCH)
    _local(
        q.conn[ORCH].send, Ping(payload=bytes(65)), code=ErrorCode.LIMIT, limit="max_ping_payload"
    )


# --- counts ----------------------------------------------------------------------------------


def test_outstanding_requests(pair, key):
    p = pair(ORCH, config=Config(key=key), peer_config=Config(key=key, max_outstanding_requests=2))
    for i in range(2):
        p.send(ORCH, Request(id=i, method="status", params={}))
    _local(
        p.conn[ORCH].send,
        Request(id=2, method="status", params={}),
        code=ErrorCode.LIMIT,
        limit="max_outstanding_requests",
    )
    # a peer that ignores the announced limit
    q = pair(ORCH, config=Config(key=key), peer_config=Config(key=key, max_outstanding_requests=2))
    frames = [q.conn[ORCH]._seal(Request(id=i, method="status", params={})) for i in range(3)]
    q.conn[AGENT].receive_data(frames[0] + frames[1])
    _remote(
        q.conn[AGENT].receive_data,
        frames[2],
        code=ErrorCode.LIMIT,
        limit="max_outstanding_requests",
    )


def test_request_ids(pair):
    p = pair(ORCH)
    p.send(ORCH, Request(id=1, method="status", params={}))
    _local(
        p.conn[ORCH].send,
        Request(id=1, method="status", params={}),
        code=ErrorCode.DUPLICATE_REQUEST,
    )
    q = pair(ORCH)
    frames = [q.conn[ORCH]._seal(Request(id=1, method="status", params={})) for _ in range(2)]
    q.conn[AGENT].receive_data(frames[0])
    _remote(q.conn[AGENT].receive_data, frames[1], code=ErrorCode.DUPLICATE_REQUEST)
    r = pair(ORCH)
    _local(r.conn[AGENT].send, Response(id=9, result=None), code=ErrorCode.UNKNOWN_REQUEST)
    t = pair(ORCH)
    _remote(
        t.conn[ORCH].receive_data,
        t.conn[AGENT]._seal(Response(id=9, result=None)),
        code=ErrorCode.UNKNOWN_REQUEST,
    )


def test_request_params_shapes(pair):
    p = pair(ORCH)
    _local(
        p.conn[ORCH].send,
        Request(id=1, method="set_state", params={"device": "d"}),
        code=ErrorCode.BAD_PARAMS,
    )
    q = pair(ORCH)
    _local(
        q.conn[ORCH].send, Request(id=1, method="frobnicate", params={}), code=ErrorCode.BAD_PARAMS
    )
    t = pair(ORCH)
    bad = t.conn[ORCH]._seal(
        Request(id=1, method="set_state", params={"device": "d", "state": "3"})
    )
    err = _remote(t.conn[AGENT].receive_data, bad, code=ErrorCode.BAD_PARAMS)
    assert "'state' must be msgpack int, got str" in str(err)


def test_extra_params_are_ignored(pair):
    p = pair(ORCH)
    params = {"device": "d", "state": 3, "from_the_future": [1]}
    p.send(ORCH, Request(id=1, method="set_state", params=params))


def test_streams_limit(pair, key):
    p = pair(SENDER, config=Config(key=key, max_streams=1), peer_config=Config(key=key))
    p.send(RECEIVER, Credit(stream=1, increment=10))
    _remote(
        p.conn[SENDER].receive_data,
        p.conn[RECEIVER].send(Credit(stream=2, increment=10)),
        code=ErrorCode.LIMIT,
        limit="max_streams",
    )
    q = pair(SENDER, config=Config(key=key), peer_config=Config(key=key, max_streams=1))
    q.send(RECEIVER, Credit(stream=1, increment=10))
    _local(
        q.conn[RECEIVER].send,
        Credit(stream=2, increment=10),
        code=ErrorCode.LIMIT,
        limit="max_streams",
    )


def test_window_limit(pair, key):
    p = pair(SENDER, config=Config(key=key, max_window=1000), peer_config=Config(key=key))
    _remote(
        p.conn[SENDER].receive_data,
        p.conn[RECEIVER].send(Credit(stream=1, increment=1001)),
        code=ErrorCode.FLOW_CONTROL,
        limit="max_window",
    )
    q = pair(SENDER, config=Config(key=key), peer_config=Config(key=key, max_window=1000))
    _local(
        q.conn[RECEIVER].send,
        Credit(stream=1, increment=1001),
        code=ErrorCode.FLOW_CONTROL,
        limit="max_window",
    )


# --- message types and fields ----------------------------------------------------------------


@pytest.mark.parametrize("established", [False, True])
def test_unknown_message_types_are_errors(pair, key, established):
    conn = pair(ORCH).conn[AGENT] if established else Connection(AGENT, Config(key=key), name="a")
    err = _remote(conn.receive_data, pack_header(1, 0x7E, 0), code=ErrorCode.UNKNOWN_MESSAGE)
    assert "0x7e" in str(err)


def test_unknown_fields_are_ignored(pair):
    p = pair(ORCH)
    fields = {"payload": {"a": 1}, "added_in_a_later_version": "ignored"}
    frame = _sealed(p.conn[AGENT], Notification(payload={}), fields)
    assert p.conn[ORCH].receive_data(frame) == [Notification(payload={"a": 1})]


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({}, "field 'payload' is missing"),
        ({"payload": [1]}, "field 'payload' must be a map, got list of length 1"),
        ({"payload": {1: 2}}, "undecodable"),
    ],
)
def test_missing_or_misshaped_fields(pair, fields, problem):
    p = pair(ORCH)
    frame = _sealed(p.conn[AGENT], Notification(payload={}), fields)
    err = _remote(p.conn[ORCH].receive_data, frame, code=ErrorCode.BAD_MESSAGE)
    assert problem in str(err)


def test_values_that_would_not_round_trip_are_refused_locally(pair):
    for payload in ({"t": (1, 2)}, {"s": {1, 2}}, {"k": {1: 2}}):
        p = pair(ORCH)
        _local(p.conn[AGENT].send, Notification(payload=payload), code=ErrorCode.BAD_MESSAGE)


# --- time ------------------------------------------------------------------------------------


def test_handshake_timeout(key):
    a = Connection(AGENT, Config(key=key, handshake_timeout=10), name="agent")
    a.tick(100.0)
    a.tick(109.9)
    _remote(a.tick, 110.0, code=ErrorCode.HANDSHAKE_TIMEOUT, limit="handshake_timeout")
    assert b"handshake_timeout" in a.data_to_send()


def test_keepalive_keeps_a_quiet_link_alive_and_idle_timeout_ends_a_dead_one(pair):
    p = pair(ORCH)
    o, a = p.conn[ORCH], p.conn[AGENT]
    pings = 0
    for t in range(0, 600, 5):
        o.tick(float(t))
        a.tick(float(t))
        got = p.pump()
        pings += sum(isinstance(e, Pong) for e in got[ORCH] + got[AGENT])
    assert o.state is a.state is ConnectionState.ESTABLISHED
    assert pings >= 600 // 15 - 1  # at least one side pinged in every interval
    # the agent goes silent: no more pumping into the orchestrator
    for t in range(600, 659, 5):
        o.tick(float(t))
    err = _remote(o.tick, 660.0, code=ErrorCode.IDLE_TIMEOUT, limit="idle_timeout")
    assert "nothing received" in str(err)
    assert o.state is ConnectionState.ERROR


def test_a_ping_is_queued_only_after_the_keepalive_interval(pair):
    p = pair(ORCH)
    o = p.conn[ORCH]
    o.tick(0.0)
    o.tick(14.0)
    assert o.data_to_send() == b""
    o.tick(15.0)
    data = o.data_to_send()
    assert p.conn[AGENT].receive_data(data) == [Ping(payload=(1).to_bytes(8, "big"))]


@pytest.mark.parametrize(
    ("first", "role", "event"),
    [
        (ORCH, ORCH, Request(id=-1, method="status", params={})),
        (ORCH, ORCH, Request(id=1, method="status", params={"x": (1, 2)})),
        (SENDER, RECEIVER, Credit(stream=1 << 40, increment=1)),
        (SENDER, RECEIVER, Credit(stream=1, increment=0)),
    ],
)
def test_out_of_range_fields_are_refused_locally(pair, first, role, event):
    """What this side sends passes the decoder the peer runs, or it is not sent."""
    p = pair(first)
    with pytest.raises(LocalProtocolError) as info:
        p.conn[role].send(event)
    assert info.value.code in (ErrorCode.BAD_MESSAGE, ErrorCode.FLOW_CONTROL)
    assert p.conn[role].state is ConnectionState.ERROR


@pytest.mark.parametrize(
    ("seq", "offset", "encoding"), [(-1, 0, Encoding.RAW), (0, -1, Encoding.RAW), (0, 0, 7)]
)
def test_out_of_range_chunk_headers_are_refused_locally(pair, seq, offset, encoding):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=100))
    with pytest.raises(LocalProtocolError) as info:
        p.conn[SENDER].send_data(1, seq, offset, 3, encoding, b"abc")
    assert info.value.code is ErrorCode.BAD_CHUNK
