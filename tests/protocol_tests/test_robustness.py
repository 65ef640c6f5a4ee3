"""Damaged input: corruption, truncation and garbage raise RemoteProtocolError and nothing
else, always return, and never allocate beyond the configured limits."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfmig.protocol import (
    Config,
    Connection,
    ConnectionState,
    Credit,
    DataChunk,
    Encoding,
    EndOfStream,
    InitialDataSent,
    RemoteProtocolError,
    Request,
    Role,
    decode_chunk_payload,
    make_compressor,
    make_decompressor,
)

ORCH, AGENT, SENDER, RECEIVER = (
    Role.ORCHESTRATOR,
    Role.AGENT,
    Role.DATA_SENDER,
    Role.DATA_RECEIVER,
)
KEY = b"robustness test key, 32 bytes.."
LIMIT = 64 << 10
SMALL = Config(
    key=KEY,
    max_chunk_size=LIMIT,
    max_control_frame_size=LIMIT,
    max_str_len=LIMIT,
    max_bin_len=LIMIT,
    max_array_len=1024,
    max_map_len=256,
)
#: What one receiver may hold at once: a partial frame, its decoded form, one decoded
#: chunk, plus interpreter noise. Generous, but orders of magnitude below "unbounded".
MEMORY_BOUND = 1 << 20


def _record(first: Role) -> tuple[bytes, Connection]:
    """A session recorded from ``first`` (fixed nonces) and the peer that read it."""
    second = {ORCH: AGENT, SENDER: RECEIVER}[first]
    a = Connection(first, SMALL, name="a", nonce=b"a" * 32)
    b = Connection(second, SMALL, name="b", nonce=b"b" * 32)
    wire = bytearray()
    while True:
        da, db = a.data_to_send(), b.data_to_send()
        if not da and not db:
            break
        wire += da
        if da:
            b.receive_data(da)
        if db:
            a.receive_data(db)
    if first is ORCH:
        wire += a.send(Request(id=1, method="set_state", params={"device": "d", "state": 2}))
        wire += a.send(Request(id=2, method="status", params={}))
    else:
        a.receive_data(b.send(Credit(stream=1, increment=1 << 20)))
        compressor = make_compressor(1)
        offset = 0
        for seq, raw in enumerate([bytes(5000), b"ab" * 3000, bytes(range(256)) * 4]):
            encoding, payload = (
                (Encoding.ZSTD, compressor.compress(raw)) if seq < 2 else (Encoding.RAW, raw)
            )
            wire += b"".join(a.send_data(1, seq, offset, len(raw), encoding, payload))
            offset += len(raw)
        wire += a.send(InitialDataSent(stream=1, offset=offset))
        wire += a.send(EndOfStream(stream=1, total=offset))
    return bytes(wire), b


SESSIONS = {role: _record(role)[0] for role in (ORCH, SENDER)}


def _feed(role: Role, pieces: list[bytes]) -> None:
    """Feed ``pieces`` to a fresh peer like an engine would; only RemoteProtocolError, and
    one the connection raises leaves it in ERROR. A payload that does not decode is found
    outside the connection (data frames carry no MAC: the stream digest covers them at the
    end), so the connection cannot know it: the engine drops such a link itself."""
    peer = Connection(role, SMALL, name="b", nonce=b"b" * 32)
    decompressor = make_decompressor(LIMIT)
    granted = False
    try:
        for piece in [*pieces, b""]:
            for event in peer.receive_data(piece):
                if isinstance(event, DataChunk):
                    try:
                        decode_chunk_payload(decompressor, event, LIMIT)
                    except RemoteProtocolError:
                        return  # the engine aborts the stream and drops the link
            if role is RECEIVER and not granted and peer.state is ConnectionState.ESTABLISHED:
                peer.send(Credit(stream=1, increment=1 << 20))
                granted = True
            peer.data_to_send()
    except RemoteProtocolError:
        assert peer.state is ConnectionState.ERROR


def _pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos = [], 0
    for size in sizes:
        if data[pos : pos + size]:
            out.append(data[pos : pos + size])
        pos += size
    if data[pos:]:
        out.append(data[pos:])
    return out


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 16), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16), st.just(0)),
)


def _mutate(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    for kind, position, arg in mutations:
        if not buf:
            break
        pos = position % len(buf)
        if kind == "flip":
            buf[pos] ^= arg
        elif kind == "cut":
            del buf[pos : pos + arg]
        elif kind == "insert":
            buf[pos:pos] = arg
        else:
            del buf[pos:]
    return bytes(buf)


@pytest.fixture(scope="module")
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def _peak_of(fn, *args) -> int:
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn(*args)
    return tracemalloc.get_traced_memory()[1] - base


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=st.sampled_from([ORCH, SENDER]),
    mutations=st.lists(mutation, min_size=1, max_size=4),
    sizes=st.lists(st.integers(1, 600), max_size=10),
)
def test_corrupted_sessions_fail_cleanly_within_bounded_memory(traced, first, mutations, sizes):
    data = _mutate(SESSIONS[first], mutations)
    role = {ORCH: AGENT, SENDER: RECEIVER}[first]
    peak = _peak_of(_feed, role, _pieces(data, sizes))
    assert peak < MEMORY_BOUND + 4 * len(data)


@settings(max_examples=300, deadline=None)
@given(
    role=st.sampled_from(list(Role)),
    data=st.binary(min_size=1, max_size=2000),
    sizes=st.lists(st.integers(1, 300), max_size=6),
)
def test_garbage_fails_cleanly_within_bounded_memory(traced, role, data, sizes):
    peak = _peak_of(_feed, role, _pieces(data, sizes))
    assert peak < MEMORY_BOUND + 4 * len(data)


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.integers(0, 10_000),
    garbage=st.binary(min_size=1, max_size=300),
)
def test_garbage_after_a_valid_prefix(traced, prefix, garbage):
    for first, role in ((ORCH, AGENT), (SENDER, RECEIVER)):
        session = SESSIONS[first]
        data = session[: prefix % (len(session) + 1)] + garbage
        peak = _peak_of(_feed, role, [data])
        assert peak < MEMORY_BOUND + 4 * len(data)


def test_unmutated_sessions_feed_without_error():
    """The property tests above start from sessions that are themselves valid."""
    for first, role in ((ORCH, AGENT), (SENDER, RECEIVER)):
        peer = Connection(role, SMALL, name="b", nonce=b"b" * 32)
        events = []
        data = SESSIONS[first]
        handshake_end = (
            data.index(b"VF\x01\x03")
            + 8
            + int.from_bytes(
                data[data.index(b"VF\x01\x03") + 4 : data.index(b"VF\x01\x03") + 8], "big"
            )
        )
        events += peer.receive_data(data[:handshake_end])
        if role is RECEIVER:
            peer.send(Credit(stream=1, increment=1 << 20))
        events += peer.receive_data(data[handshake_end:])
        assert peer.state is ConnectionState.ESTABLISHED
        assert len(events) in (3, 6)
    # and a peer that is not fed the credit refuses the data
    peer = Connection(RECEIVER, SMALL, name="b", nonce=b"b" * 32)
    with pytest.raises(RemoteProtocolError):
        peer.receive_data(SESSIONS[SENDER])


def test_a_huge_declared_frame_is_refused_before_allocation(traced):
    """A frame header claiming 4 GiB costs nothing: the length is checked first."""
    conn = Connection(AGENT, SMALL, name="b")
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data(b"VF\x01\x01\xff\xff\xff\xff")
    assert tracemalloc.get_traced_memory()[1] - base < 64 << 10  # no 4 GiB, no 256 KiB
    assert info.value.limit == "max_handshake_frame_size"
    assert conn.statistics().buffered == 0
