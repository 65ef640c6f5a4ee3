"""Authentication, integrity and versioning: what an attacker or a mismatched peer meets."""

from __future__ import annotations

import msgpack
import pytest

from vfmig.protocol import (
    Config,
    Connection,
    ConnectionState,
    Credit,
    DataChunk,
    Encoding,
    EndOfStream,
    ErrorCode,
    HandshakeCompleted,
    LocalProtocolError,
    Notification,
    RemoteProtocolError,
    Request,
    Role,
    StreamEnded,
)
from vfmig.protocol import _connection as connection_module
from vfmig.protocol._codec import Hello, chunk_header, encode_fields
from vfmig.protocol._framing import pack_header

ORCH, AGENT, SENDER, RECEIVER = Role.ORCHESTRATOR, Role.AGENT, Role.DATA_SENDER, Role.DATA_RECEIVER
OTHER_KEY = b"another key, also 32 bytes long!"


def _frames(data: bytes) -> list[bytes]:
    """Split a byte stream into its frames."""
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 4 : pos + 8], "big")
        out.append(data[pos : pos + 8 + length])
        pos += 8 + length
    return out


def _exchange(x: Connection, y: Connection) -> None:
    """Run a handshake; let errors propagate."""
    while True:
        dx, dy = x.data_to_send(), y.data_to_send()
        if not dx and not dy:
            return
        if dx:
            y.receive_data(dx)
        if dy:
            x.receive_data(dy)


def _raises(code: ErrorCode, fn, *args):
    with pytest.raises(RemoteProtocolError) as info:
        fn(*args)
    assert info.value.code is code, info.value
    return info.value


# --- authentication ----------------------------------------------------------------------


def test_wrong_key_fails_on_both_sides(key):
    o = Connection(ORCH, Config(key=key), name="orch")
    a = Connection(AGENT, Config(key=OTHER_KEY), name="agent")
    a.receive_data(o.data_to_send())
    err = _raises(ErrorCode.AUTH_FAILED, o.receive_data, a.data_to_send())
    assert "agent 'agent' does not know the shared key" in str(err)
    assert err.hint
    assert o.state is ConnectionState.ERROR
    # o told a why; a independently rejects o's proof as well
    _raises(ErrorCode.AUTH_FAILED, a.receive_data, o.data_to_send())
    assert a.state is ConnectionState.ERROR


def test_the_key_never_crosses_the_wire(pair, key):
    p = pair(ORCH)
    p.send(ORCH, Request(id=1, method="status", params={}))
    for wire in p.wire.values():
        assert key not in wire
        assert key[:8] not in wire


@pytest.mark.parametrize(("mine", "theirs"), [(b"k" * 32, None), (None, b"k" * 32)])
def test_a_side_with_a_key_never_talks_to_one_without(mine, theirs):
    me = Connection(AGENT, Config(key=mine), name="agent")
    peer = Connection(ORCH, Config(key=theirs), name="orch")
    err = _raises(ErrorCode.AUTH_MODE_MISMATCH, me.receive_data, peer.data_to_send())
    assert "runs with auth" in str(err)


def test_a_no_key_peer_that_lies_about_its_mode_still_fails(key, nonces):
    """The auth field only words the error: the proof is what decides."""
    from vfmig.protocol._auth import SessionKeys, transcript_hash
    from vfmig.protocol._codec import Auth

    agent = Connection(AGENT, Config(key=key), name="agent")
    forged_hello = _hello([1], nonces[ORCH])  # says "psk" without having the key
    agent.receive_data(forged_hello)
    transcript = transcript_hash(forged_hello, agent._hello_frame)
    for guess in (None, b"", b"k" * 32):  # the attacker's best guesses at the key
        proof = SessionKeys(guess, transcript, 1).proof("orchestrator")
        body = msgpack.packb(encode_fields(Auth(mac=proof)))
        victim = Connection(AGENT, Config(key=key), name="agent", nonce=agent._nonce)
        victim.receive_data(forged_hello)
        _raises(
            ErrorCode.AUTH_FAILED, victim.receive_data, pack_header(1, Auth.TAG, len(body)) + body
        )


def _hello_fields(conn: Connection) -> dict:
    from vfmig.protocol._codec import unpack_map

    return unpack_map(conn._hello_frame[8:], conn.config, "Hello")


def test_replayed_handshake_fails(key):
    """An attacker replays the agent's side of an old session to a new orchestrator."""
    o1 = Connection(ORCH, Config(key=key), name="orch")
    a1 = Connection(AGENT, Config(key=key), name="agent")
    a1_bytes = bytearray()
    while True:
        do, da = o1.data_to_send(), a1.data_to_send()
        if not do and not da:
            break
        a1_bytes += da
        a1.receive_data(do) if do else None
        o1.receive_data(da) if da else None
    assert o1.state is ConnectionState.ESTABLISHED
    o2 = Connection(ORCH, Config(key=key), name="orch")  # fresh random nonce
    _raises(ErrorCode.AUTH_FAILED, o2.receive_data, bytes(a1_bytes))


def test_reflected_hello_fails(key):
    o = Connection(ORCH, Config(key=key), name="orch")
    own = o.data_to_send()
    err = _raises(ErrorCode.ROLE_MISMATCH, o.receive_data, own)
    assert "orchestrator 'orch' is not an agent" in str(err)


def test_reflected_hello_with_forged_role_fails(key):
    o = Connection(ORCH, Config(key=key), name="orch")
    fields = {**_hello_fields(o), "role": "agent"}
    body = msgpack.packb(fields)
    err = _raises(ErrorCode.AUTH_FAILED, o.receive_data, pack_header(1, 1, len(body)) + body)
    assert "reflected" in str(err)


def test_reflected_auth_fails(key):
    """A man in the middle sends the orchestrator its own Auth as the agent's."""
    o = Connection(ORCH, Config(key=key), name="orch")
    a = Connection(AGENT, Config(key=key), name="agent")
    a.receive_data(o.data_to_send())
    agent_hello = _frames(a.data_to_send())[0]
    o.receive_data(agent_hello)
    own_auth = o.data_to_send()
    _raises(ErrorCode.AUTH_FAILED, o.receive_data, own_auth)


def test_nothing_but_the_handshake_before_authentication(key):
    a = Connection(AGENT, Config(key=key), name="agent")
    body = chunk_header(0, 0, 0, 3, Encoding.RAW) + b"abc"
    _raises(
        ErrorCode.UNEXPECTED_MESSAGE,
        a.receive_data,
        pack_header(1, DataChunk.TAG, len(body)) + body,
    )
    # a Request before the peer authenticated, even after its Hello
    o = Connection(ORCH, Config(key=key), name="orch")
    a = Connection(AGENT, Config(key=key), name="agent")
    a.receive_data(o.data_to_send())
    request = msgpack.packb({"id": 1, "method": "status", "params": {}})
    err = _raises(
        ErrorCode.UNEXPECTED_MESSAGE,
        a.receive_data,
        pack_header(1, Request.TAG, len(request)) + request,
    )
    assert "before authenticating" in str(err)


def test_this_side_cannot_send_before_the_peer_is_authenticated(key):
    o = Connection(ORCH, Config(key=key), name="orch")
    with pytest.raises(LocalProtocolError) as info:
        o.send(Request(id=1, method="status", params={}))
    assert info.value.code is ErrorCode.BAD_STATE
    assert o.state is ConnectionState.ERROR


def test_a_goodbye_during_the_handshake_is_reported_with_the_peers_reason(key):
    o = Connection(ORCH, Config(key=key), name="orch")
    a = Connection(AGENT, Config(key=OTHER_KEY), name="agent")
    a.receive_data(o.data_to_send())
    with pytest.raises(RemoteProtocolError):
        o.receive_data(a.data_to_send())
    goodbye = _frames(o.data_to_send())[-1]  # o's error Goodbye, after its Auth
    a2 = Connection(AGENT, Config(key=key), name="agent")
    a2.receive_data(_frames(Connection(ORCH, Config(key=key), name="x").data_to_send())[0])
    err = _raises(ErrorCode.PEER_ERROR, a2.receive_data, _plain_goodbye())
    assert "ended the handshake: auth_failed: nope" in str(err)
    assert goodbye  # o did queue one


def _plain_goodbye() -> bytes:
    body = msgpack.packb({"code": "auth_failed", "reason": "nope"})
    return pack_header(1, 0x12, len(body)) + body


# --- integrity after the handshake -------------------------------------------------------


def _control_frames(pair, n=3):
    p = pair(ORCH)
    frames = [
        p.conn[AGENT].send(Notification(payload={"n": i})) for i in range(n)
    ]  # not delivered yet
    return p, frames


def test_an_altered_control_frame_is_detected(pair):
    _, frames = _control_frames(pair)
    for index in (8, 12, len(frames[0]) - 20, len(frames[0]) - 1, 3):
        altered = bytearray(frames[0])
        altered[index] ^= 0x01
        fresh, _ = _control_frames(pair)
        _raises(ErrorCode.BAD_MAC, fresh.conn[ORCH].receive_data, bytes(altered))


def test_a_replayed_control_frame_is_detected(pair):
    p, frames = _control_frames(pair)
    assert p.conn[ORCH].receive_data(frames[0]) == [Notification(payload={"n": 0})]
    err = _raises(ErrorCode.BAD_SEQUENCE, p.conn[ORCH].receive_data, frames[0])
    assert "seq 1, expected 2" in str(err)


def test_reordered_and_dropped_control_frames_are_detected(pair):
    p, frames = _control_frames(pair)
    _raises(ErrorCode.BAD_SEQUENCE, p.conn[ORCH].receive_data, frames[1])
    p, frames = _control_frames(pair)
    p.conn[ORCH].receive_data(frames[0])
    _raises(ErrorCode.BAD_SEQUENCE, p.conn[ORCH].receive_data, frames[2])


def test_an_injected_control_frame_is_detected(pair, key):
    """A frame sealed by someone without the key (here: the same nonces, another key)."""
    p, _ = _control_frames(pair)
    q = pair(ORCH, config=Config(key=OTHER_KEY))
    forged = q.conn[AGENT].send(Notification(payload={"n": 0}))
    _raises(ErrorCode.BAD_MAC, p.conn[ORCH].receive_data, forged)


def test_an_altered_data_chunk_is_caught_by_the_digest(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=1000))
    chunk = bytearray(
        p.conn[SENDER].send(
            DataChunk(
                stream=1, seq=0, offset=0, raw_len=100, encoding=Encoding.RAW, payload=bytes(100)
            )
        )
    )
    chunk[-1] ^= 0xFF  # one payload bit flipped in flight
    (received,) = p.conn[RECEIVER].receive_data(bytes(chunk))
    assert bytes(received.payload) != bytes(100)  # written to the device, not yet accepted
    (ended,) = p.conn[RECEIVER].receive_data(p.conn[SENDER].send(EndOfStream(stream=1, total=100)))
    assert ended == StreamEnded(stream=1, total=100, chunks=1, ok=False)


def test_an_altered_zstd_chunk_is_caught(pair):
    from vfmig.protocol import decode_chunk_payload, make_compressor, make_decompressor

    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=10_000))
    payload = make_compressor(1).compress(b"hello world " * 500)
    chunk = bytearray(
        p.conn[SENDER].send(
            DataChunk(
                stream=1, seq=0, offset=0, raw_len=6000, encoding=Encoding.ZSTD, payload=payload
            )
        )
    )
    chunk[-3] ^= 0x10
    (received,) = p.conn[RECEIVER].receive_data(bytes(chunk))
    outcome = _decode_or_error(decode_chunk_payload, make_decompressor(1 << 20), received)
    assert outcome is ErrorCode.BAD_CHUNK or outcome != b"hello world " * 500
    (ended,) = p.conn[RECEIVER].receive_data(p.conn[SENDER].send(EndOfStream(stream=1, total=6000)))
    assert not ended.ok


def _decode_or_error(decode, decompressor, chunk):
    try:
        return bytes(decode(decompressor, chunk, 1 << 20))
    except RemoteProtocolError as err:
        return err.code


def test_injected_or_dropped_data_chunks_are_detected(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=1000))
    good = [
        p.conn[SENDER].send(
            DataChunk(
                stream=1, seq=i, offset=10 * i, raw_len=10, encoding=Encoding.RAW, payload=bytes(10)
            )
        )
        for i in range(2)
    ]
    body = chunk_header(1, 0, 0, 10, Encoding.RAW) + b"X" * 10
    injected = pack_header(1, DataChunk.TAG, len(body)) + body
    p.conn[RECEIVER].receive_data(injected)  # looks like the next chunk...
    _raises(ErrorCode.STREAM_ORDER, p.conn[RECEIVER].receive_data, good[0])  # ...until the real one
    q = pair(SENDER)
    q.send(RECEIVER, Credit(stream=1, increment=1000))
    _raises(ErrorCode.STREAM_ORDER, q.conn[RECEIVER].receive_data, good[1])  # chunk 0 dropped


def test_a_truncated_stream_is_not_ok(pair):
    """Chunks removed at the end: the MACed EndOfStream total disagrees."""
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=1000))
    p.send(
        SENDER,
        DataChunk(stream=1, seq=0, offset=0, raw_len=10, encoding=Encoding.RAW, payload=bytes(10)),
    )
    p.conn[SENDER].send(
        DataChunk(stream=1, seq=1, offset=10, raw_len=10, encoding=Encoding.RAW, payload=bytes(10))
    )  # dropped
    (ended,) = p.conn[RECEIVER].receive_data(p.conn[SENDER].send(EndOfStream(stream=1, total=20)))
    assert ended == StreamEnded(stream=1, total=10, chunks=1, ok=False)


# --- versions ----------------------------------------------------------------------------


def _hello(versions: list[int], nonce: bytes, role: str = "orchestrator") -> bytes:
    fields = {
        "versions": versions,
        "role": role,
        "name": "newer",
        "nonce": nonce,
        "auth": "psk",
        "codecs": ["zstd"],
        "level": 1,
        "max_chunk": 1 << 20,
        "max_requests": 8,
        "max_frame": 1 << 20,
        "features": ["something-new"],
        "field-from-the-future": [1, 2, 3],
    }
    body = msgpack.packb(fields)
    return pack_header(max(versions), Hello.TAG, len(body)) + body


def test_version_mismatch_names_both_versions(key):
    a = Connection(AGENT, Config(key=key), name="agent")
    err = _raises(ErrorCode.VERSION_MISMATCH, a.receive_data, _hello([2, 3], b"n" * 32))
    assert str(err) == (
        "protocol version mismatch: this side speaks version 1, orchestrator 'newer' speaks "
        "versions 2-3"
    )
    assert err.hint
    goodbye = _frames(a.data_to_send())[-1]
    assert b"version_mismatch" in goodbye


def test_a_newer_peer_talks_version_1_to_an_older_one(key, monkeypatch):
    """A peer speaking 1 and 2 meets one speaking 1: both use 1 (docs/protocol.md §9)."""
    monkeypatch.setattr(connection_module, "SUPPORTED_VERSIONS", (1, 2))
    newer = Connection(ORCH, Config(key=key), name="newer")
    monkeypatch.setattr(connection_module, "SUPPORTED_VERSIONS", (1,))
    older = Connection(AGENT, Config(key=key), name="older")
    assert newer._hello_frame[2] == 2  # the Hello frame says the sender's highest version
    for _ in range(3):
        if data := newer.data_to_send():
            older.receive_data(data)
        monkeypatch.setattr(connection_module, "SUPPORTED_VERSIONS", (1, 2))
        if data := older.data_to_send():
            newer.receive_data(data)
        monkeypatch.setattr(connection_module, "SUPPORTED_VERSIONS", (1,))
    assert newer.state is older.state is ConnectionState.ESTABLISHED
    assert newer.session is not None
    assert newer.session.version == 1
    assert older.session is not None
    assert older.session.version == 1


def test_unknown_hello_fields_and_features_are_ignored(key, nonces):
    a = Connection(AGENT, Config(key=key), name="agent")
    assert a.receive_data(_hello([1], nonces[ORCH])) == []
    assert a._session is not None
    assert a._session.features == frozenset()


def test_a_frame_in_another_version_after_the_handshake_is_refused(pair):
    p = pair(ORCH)
    frame = bytearray(p.conn[AGENT].send(Notification(payload={})))
    frame[2] = 2
    err = _raises(ErrorCode.BAD_VERSION, p.conn[ORCH].receive_data, bytes(frame))
    assert "version 2" in str(err)


def test_garbage_instead_of_a_hello_says_so(key):
    a = Connection(AGENT, Config(key=key), name="agent")
    err = _raises(ErrorCode.BAD_MAGIC, a.receive_data, b"GET / HTTP/1.1\r\n\r\n")
    assert "not a vfmig peer" in str(err)
    assert "b'GET '" in str(err)


def test_handshake_completed_carries_the_peer(pair):
    p = pair(SENDER)
    session = p.conn[RECEIVER].session
    assert isinstance(session, HandshakeCompleted)
    assert session.peer_role is SENDER
