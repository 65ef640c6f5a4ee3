"""Data streams: decompression bombs, flow control, stream order, switchover marks and acks."""

from __future__ import annotations

import tracemalloc

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfmig.protocol import (
    AbortStream,
    Config,
    ConnectionState,
    Credit,
    DataChunk,
    Encoding,
    EndOfStream,
    ErrorCode,
    InitialDataSent,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    SwitchoverAck,
    decode_chunk_payload,
    make_compressor,
    make_decompressor,
)
from vfmig.protocol._codec import chunk_header
from vfmig.protocol._framing import pack_header

SENDER, RECEIVER = Role.DATA_SENDER, Role.DATA_RECEIVER


def _chunk_frame(stream, seq, offset, raw_len, encoding, payload):
    body = chunk_header(stream, seq, offset, raw_len, encoding) + payload
    return pack_header(1, DataChunk.TAG, len(body)) + body


def _chunk(stream=1, seq=0, offset=0, payload=b"abc", encoding=Encoding.RAW, raw_len=None):
    return DataChunk(
        stream=stream,
        seq=seq,
        offset=offset,
        raw_len=len(payload) if raw_len is None else raw_len,
        encoding=encoding,
        payload=payload,
    )


def _with_content_size(frame: bytes, size: int) -> bytes:
    """Rewrite the Frame_Content_Size field of a zstd frame header (RFC 8878 3.1.1.1)."""
    fhd = frame[4]
    field = {0: 1 if fhd & 0x20 else 0, 1: 2, 2: 4, 3: 8}[fhd >> 6]
    start = 5 + (0 if fhd & 0x20 else 1) + {0: 0, 1: 1, 2: 2, 3: 4}[fhd & 3]
    value = size - 256 if field == 2 else size
    return frame[:start] + value.to_bytes(field, "little") + frame[start + field :]


def _remote(fn, *args, code):
    with pytest.raises(RemoteProtocolError) as info:
        fn(*args)
    assert info.value.code is code, info.value
    return info.value


def _local(fn, *args, code):
    with pytest.raises(LocalProtocolError) as info:
        fn(*args)
    assert info.value.code is code, info.value
    return info.value


# --- decompression bombs --------------------------------------------------------------------


def test_a_frame_that_lies_about_its_size_cannot_allocate_more():
    bomb = make_compressor(1).compress(bytes(64 << 20))  # 64 MiB of zeros, ~2 KiB
    lie = _with_content_size(bomb, 1024)
    assert zstandard.frame_content_size(lie) == 1024
    chunk = _chunk(payload=lie, encoding=Encoding.ZSTD, raw_len=1024)
    tracemalloc.start()
    try:
        _remote(
            decode_chunk_payload,
            make_decompressor(1 << 20),
            chunk,
            1 << 20,
            code=ErrorCode.BAD_CHUNK,
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10, f"decoding the bomb peaked at {peak} bytes"


def test_a_frame_without_a_content_size_is_refused_before_decompression(pair):
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(4096))
    assert zstandard.frame_content_size(no_size) == -1
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=1 << 20))
    err = _remote(
        p.conn[RECEIVER].receive_data,
        _chunk_frame(1, 0, 0, 4096, Encoding.ZSTD, no_size),
        code=ErrorCode.BAD_CHUNK,
    )
    assert "no content size" in str(err)
    chunk = _chunk(payload=no_size, encoding=Encoding.ZSTD, raw_len=4096)
    _remote(
        decode_chunk_payload, make_decompressor(1 << 20), chunk, 1 << 20, code=ErrorCode.BAD_CHUNK
    )


def test_a_declared_size_other_than_the_raw_length_is_refused(pair):
    frame = make_compressor(1).compress(bytes(8192))
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=1 << 20))
    err = _remote(
        p.conn[RECEIVER].receive_data,
        _chunk_frame(1, 0, 0, 4096, Encoding.ZSTD, frame),
        code=ErrorCode.BAD_CHUNK,
    )
    assert "declares content size 8192, raw length is 4096" in str(err)


@pytest.mark.parametrize(
    ("payload", "raw_len", "problem"),
    [
        (make_compressor(1).compress(bytes(4096)) + b"junk", 4096, "unused data"),
        (make_compressor(1).compress(bytes(2048)) * 2, 2048, "unused data"),
        (make_compressor(1).compress(bytes(4096))[:-2], 4096, "zstd:"),
        (b"\x28\xb5\x2f\xfd" + bytes(8), 4096, ""),
        (b"definitely not zstd", 4096, "does not start with a zstd frame header"),
    ],
)
def test_malformed_zstd_payloads(payload, raw_len, problem):
    chunk = _chunk(payload=payload, encoding=Encoding.ZSTD, raw_len=raw_len)
    err = _remote(
        decode_chunk_payload, make_decompressor(1 << 20), chunk, 1 << 20, code=ErrorCode.BAD_CHUNK
    )
    assert problem in str(err)


def test_payload_length_rules(pair):
    for body, problem in [
        (_chunk_frame(1, 0, 0, 10, Encoding.RAW, b"short"), "raw payload of 5 bytes"),
        (_chunk_frame(1, 0, 0, 4, Encoding.ZSTD, b"longer"), "does not shrink"),
        (_chunk_frame(1, 0, 0, 3, 7, b"abc"), "unknown payload encoding 7"),
        (pack_header(1, DataChunk.TAG, 3) + b"abc", "shorter than its 25-byte header"),
    ]:
        p = pair(SENDER)
        p.send(RECEIVER, Credit(stream=1, increment=100))
        with pytest.raises(RemoteProtocolError) as info:
            p.conn[RECEIVER].receive_data(body)
        assert info.value.code in (ErrorCode.BAD_CHUNK, ErrorCode.BAD_MESSAGE)
        assert problem in str(info.value)


def test_zstd_needs_negotiated_compression(pair, key):
    plain = Config(key=key, compression=False)
    frame = make_compressor(1).compress(bytes(4096))
    p = pair(SENDER, config=Config(key=key), peer_config=plain)
    p.send(RECEIVER, Credit(stream=1, increment=1 << 20))
    _local(p.conn[SENDER].send_data, 1, 0, 0, 4096, Encoding.ZSTD, frame, code=ErrorCode.BAD_CHUNK)
    q = pair(SENDER, config=Config(key=key), peer_config=plain)
    q.send(RECEIVER, Credit(stream=1, increment=1 << 20))
    _remote(
        q.conn[RECEIVER].receive_data,
        _chunk_frame(1, 0, 0, 4096, Encoding.ZSTD, frame),
        code=ErrorCode.BAD_CHUNK,
    )
    _remote(
        decode_chunk_payload,
        None,
        _chunk(payload=frame, encoding=Encoding.ZSTD, raw_len=4096),
        1 << 20,
        code=ErrorCode.BAD_CHUNK,
    )


# --- flow control ---------------------------------------------------------------------------


def test_sending_past_the_window_is_a_local_error(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=2))
    err = _local(p.conn[SENDER].send, _chunk(payload=b"abc"), code=ErrorCode.FLOW_CONTROL)
    assert "exceeds the window of 2" in str(err)
    assert p.conn[SENDER].state is ConnectionState.ERROR


def test_a_peer_sending_past_the_window_is_a_remote_error(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=2))
    _remote(
        p.conn[RECEIVER].receive_data,
        _chunk_frame(1, 0, 0, 3, Encoding.RAW, b"abc"),
        code=ErrorCode.FLOW_CONTROL,
    )


def test_data_needs_an_open_stream(pair):
    p = pair(SENDER)
    err = _local(p.conn[SENDER].send, _chunk(), code=ErrorCode.UNKNOWN_STREAM)
    assert "no credit granted yet" in str(err)
    q = pair(SENDER)
    _remote(
        q.conn[RECEIVER].receive_data,
        _chunk_frame(1, 0, 0, 3, Encoding.RAW, b"abc"),
        code=ErrorCode.UNKNOWN_STREAM,
    )


def test_chunks_must_come_in_order(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=100))
    _local(p.conn[SENDER].send, _chunk(seq=1), code=ErrorCode.STREAM_ORDER)
    q = pair(SENDER)
    q.send(RECEIVER, Credit(stream=1, increment=100))
    q.send(SENDER, _chunk())
    _local(q.conn[SENDER].send, _chunk(seq=1, offset=4), code=ErrorCode.STREAM_ORDER)


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.integers(0, 300), st.integers(1, 400)), max_size=30))
def test_a_chunk_larger_than_the_window_is_always_refused(pair, steps):
    p = pair(SENDER)
    s, r = p.conn[SENDER], p.conn[RECEIVER]
    p.send(RECEIVER, Credit(stream=1, increment=1))
    granted, sent, seq = 1, 0, 0
    for credit, size in steps:
        if credit:
            p.send(RECEIVER, Credit(stream=1, increment=credit))
            granted += credit
        assert s.send_window(1) == granted - sent
        chunk = _chunk(seq=seq, offset=sent, payload=bytes(size))
        if size > granted - sent:
            _local(s.send, chunk, code=ErrorCode.FLOW_CONTROL)
            return
        p.send(SENDER, chunk)
        sent, seq = sent + size, seq + 1
        assert r.statistics().raw_bytes_received == sent <= granted


def test_late_credit_for_a_closed_stream_is_dropped(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=10))
    late_credit = p.conn[RECEIVER].send(Credit(stream=1, increment=10))  # in flight...
    p.send(SENDER, EndOfStream(stream=1, total=0))  # ...while the sender ends the stream
    assert p.conn[SENDER].receive_data(late_credit) == []
    assert p.conn[SENDER].send_window(1) == 0


def test_stream_ids_only_grow(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=5, increment=10))
    p.send(SENDER, EndOfStream(stream=5, total=0))
    _local(p.conn[RECEIVER].send, Credit(stream=5, increment=10), code=ErrorCode.UNKNOWN_STREAM)
    q = pair(SENDER)
    q.send(RECEIVER, Credit(stream=5, increment=10))
    _local(q.conn[RECEIVER].send, Credit(stream=3, increment=10), code=ErrorCode.UNKNOWN_STREAM)


def test_data_after_the_end_of_a_stream_is_refused(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=10))
    p.send(SENDER, EndOfStream(stream=1, total=0))
    err = _remote(
        p.conn[RECEIVER].receive_data,
        _chunk_frame(1, 0, 0, 3, Encoding.RAW, b"abc"),
        code=ErrorCode.UNKNOWN_STREAM,
    )
    assert "which is closed" in str(err)
    q = pair(SENDER)
    q.send(RECEIVER, Credit(stream=1, increment=10))
    q.send(SENDER, AbortStream(stream=1, reason="gave up"))
    _local(q.conn[SENDER].send, _chunk(), code=ErrorCode.UNKNOWN_STREAM)


def test_end_of_stream_total_must_match(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=10))
    p.send(SENDER, _chunk())
    _local(p.conn[SENDER].send, EndOfStream(stream=1, total=4), code=ErrorCode.STREAM_ORDER)


# --- switchover marks and acks --------------------------------------------------------------


def test_switchover_ack_once_without_reinit(pair, key):
    no_reinit = Config(key=key, features=frozenset())
    p = pair(SENDER, config=no_reinit)
    p.send(RECEIVER, Credit(stream=1, increment=10))
    p.send(SENDER, _chunk())
    _local(
        p.conn[RECEIVER].send, SwitchoverAck(stream=1, offset=3), code=ErrorCode.UNEXPECTED_MESSAGE
    )
    q = pair(SENDER, config=no_reinit)
    q.send(RECEIVER, Credit(stream=1, increment=10))
    q.send(SENDER, _chunk())
    q.send(SENDER, InitialDataSent(stream=1, offset=3))
    q.send(RECEIVER, SwitchoverAck(stream=1, offset=3))
    _local(
        q.conn[RECEIVER].send, SwitchoverAck(stream=1, offset=3), code=ErrorCode.UNEXPECTED_MESSAGE
    )
    t = pair(SENDER, config=no_reinit)
    t.send(RECEIVER, Credit(stream=1, increment=10))
    t.send(SENDER, InitialDataSent(stream=1, offset=0))
    _local(
        t.conn[SENDER].send, InitialDataSent(stream=1, offset=0), code=ErrorCode.UNEXPECTED_MESSAGE
    )


def test_switchover_ack_repeats_after_reinit(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=100))
    p.send(SENDER, _chunk())
    p.send(SENDER, InitialDataSent(stream=1, offset=3))
    p.send(RECEIVER, SwitchoverAck(stream=1, offset=3))
    p.send(SENDER, _chunk(seq=1, offset=3))
    p.send(SENDER, InitialDataSent(stream=1, offset=6))  # the device re-initialised
    _local(p.conn[RECEIVER].send, SwitchoverAck(stream=1, offset=3), code=ErrorCode.STREAM_ORDER)
    q = pair(SENDER)
    q.send(RECEIVER, Credit(stream=1, increment=100))
    q.send(SENDER, _chunk())
    q.send(SENDER, InitialDataSent(stream=1, offset=3))
    q.send(RECEIVER, SwitchoverAck(stream=1, offset=3))
    q.send(SENDER, InitialDataSent(stream=1, offset=3))
    q.send(RECEIVER, SwitchoverAck(stream=1, offset=3))


def test_marks_cannot_run_ahead_of_the_data_or_go_back(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=100))
    _local(p.conn[SENDER].send, InitialDataSent(stream=1, offset=1), code=ErrorCode.STREAM_ORDER)
    q = pair(SENDER)
    q.send(RECEIVER, Credit(stream=1, increment=100))
    q.send(SENDER, _chunk())
    q.send(SENDER, InitialDataSent(stream=1, offset=3))
    _local(q.conn[SENDER].send, InitialDataSent(stream=1, offset=2), code=ErrorCode.STREAM_ORDER)
    # a peer that marks beyond what it sent
    t = pair(SENDER)
    t.send(RECEIVER, Credit(stream=1, increment=100))
    forged = t.conn[SENDER]._seal(InitialDataSent(stream=1, offset=50))
    _remote(t.conn[RECEIVER].receive_data, forged, code=ErrorCode.STREAM_ORDER)


def test_a_peer_acking_beyond_the_latest_mark_is_refused(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=100))
    p.send(SENDER, _chunk())
    p.send(SENDER, InitialDataSent(stream=1, offset=2))
    forged = p.conn[RECEIVER]._seal(SwitchoverAck(stream=1, offset=3))
    _remote(p.conn[SENDER].receive_data, forged, code=ErrorCode.STREAM_ORDER)
    q = pair(SENDER)
    q.send(RECEIVER, Credit(stream=1, increment=100))
    _remote(
        q.conn[SENDER].receive_data,
        q.conn[RECEIVER]._seal(SwitchoverAck(stream=1, offset=0)),
        code=ErrorCode.UNEXPECTED_MESSAGE,
    )


def test_a_late_ack_for_an_ended_stream_is_dropped(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=100))
    p.send(SENDER, InitialDataSent(stream=1, offset=0))
    ack = p.conn[RECEIVER].send(SwitchoverAck(stream=1, offset=0))
    p.send(SENDER, EndOfStream(stream=1, total=0))
    assert p.conn[SENDER].receive_data(ack) == []
