"""Fuzz target for vfmig.protocol (atheris / libFuzzer). Run it with ``make fuzz``.

Whatever the input, the protocol may raise RemoteProtocolError (the peer's fault) and
nothing else, must return (libFuzzer's ``-timeout``), and must stay within its memory
bounds (``-rss_limit_mb``). Input layout: ``mode | arg | split | payload``:

* mode 0 -- ``payload`` is the byte stream from a peer, fed to a fresh Connection whose
  role is ``arg % 4``, in pieces of ``split`` bytes (0: frame by frame). The connection
  uses the fixed key, names and nonces of the seed corpus, and a :class:`Model` answers
  its events as an engine would, so seeds are whole valid sessions and mutations reach
  every handler after the handshake (data chunks carry no MAC); chunks are decoded.
* mode 1 -- ``payload`` is a msgpack body decoded as message type ``arg`` (bypassing the
  MAC, to reach every field decoder); LocalProtocolError is the expected failure there.
* mode 2 -- ``payload`` is a chunk payload with encoding ``arg & 1`` and ``raw_len`` from
  ``split`` (KiB), decoded by ``decode_chunk_payload``: the decompression-bomb surface.

``--make-corpus DIR`` writes the seed corpus (tests/fuzz/corpus is its committed output).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import msgpack
    import zstandard

    from vfmig.protocol import (
        METHODS,
        Config,
        Connection,
        ConnectionState,
        Credit,
        DataChunk,
        Encoding,
        EndOfStream,
        ErrorResponse,
        Goodbye,
        InitialDataSent,
        LocalProtocolError,
        Notification,
        Ping,
        RemoteProtocolError,
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
    from vfmig.protocol._codec import DECODERS, decode_fields, unpack_map
    from vfmig.protocol._state import PEER_ROLE

KEY = b"vfmig fuzz key, fixed on purpose"
ROLES = [Role.ORCHESTRATOR, Role.AGENT, Role.DATA_SENDER, Role.DATA_RECEIVER]
NONCES = {role: bytes([i]) * 32 for i, role in enumerate(ROLES)}
#: Names are part of the Hellos, hence of the transcript: seeds and target must agree.
NAMES = {role: f"fuzz-{role}" for role in ROLES}
#: Small limits: the fuzzer explores them faster, and memory stays far below -rss_limit_mb.
CONFIG = Config(
    key=KEY,
    max_chunk_size=256 << 10,
    max_control_frame_size=64 << 10,
    max_str_len=16 << 10,
    max_bin_len=16 << 10,
    max_streams=4,
    max_outstanding_requests=4,
)


REQUESTS = [
    Request(id=i, method=method, params={
        name: {"str": "x", "int": 1, "bool": True, "bytes": b"x", "list": [], "map": {}}[shape]
        for name, (shape, _) in METHODS[method].params.items()
    })
    for i, method in enumerate(sorted(METHODS))
]  # fmt: skip
RAW_CHUNKS = [bytes(8192), b"state " * 2000, bytes(range(256)) * 8]


class Model:
    """What an engine does in reply to events: just enough to carry the seed sessions from
    handshake to Goodbye, so that mutations of them reach every message handler."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.started = False
        self.sent_data = False

    def react(self, events: list) -> bytes:
        """Bytes this side writes after ``events``: data_to_send() first, then its sends."""
        out = bytearray(self.conn.data_to_send())
        if self.conn.state is ConnectionState.CLOSING:  # the peer said Goodbye: answer it
            if any(isinstance(event, Goodbye) for event in events):
                out += self.conn.send(Goodbye())
            return bytes(out)
        if self.conn.state not in (ConnectionState.AUTHENTICATED, ConnectionState.ESTABLISHED):
            return bytes(out)
        role = self.conn.role
        if not self.started:
            self.started = True
            if role is Role.ORCHESTRATOR:
                out += self.conn.send(REQUESTS[0])
            elif role is Role.DATA_RECEIVER:
                out += self.conn.send(Credit(stream=1, increment=1 << 20))
        for event in events:
            out += self._reply(event)
        return bytes(out)

    def _reply(self, event: object) -> bytes:
        conn = self.conn
        if isinstance(event, Request):
            out = b""
            if event.id == 0:
                out += conn.send(Notification(payload={"type": "state", "state": 2}))
            answer = (
                Response(id=event.id, result={"ok": True})
                if event.id % 2
                else ErrorResponse(id=event.id, code="refused", message="no", errno=22)
            )
            return out + conn.send(answer)  # fmt: skip
        if isinstance(event, Response | ErrorResponse):
            if event.id + 1 < len(REQUESTS):
                return conn.send(REQUESTS[event.id + 1])
            return conn.send(Ping(payload=b"12345678")) + conn.send(Goodbye(reason="done"))
        if isinstance(event, Credit) and not self.sent_data:
            self.sent_data = True
            return self._send_stream()
        if isinstance(event, InitialDataSent):
            return conn.send(SwitchoverAck(stream=event.stream, offset=event.offset))
        if isinstance(event, SwitchoverAck):
            return conn.send(EndOfStream(stream=event.stream, total=event.offset))
        if isinstance(event, StreamEnded):
            return conn.send(Goodbye(reason="stream done"))
        return b""

    def _send_stream(self) -> bytes:
        out = bytearray()
        compressor = make_compressor(1)
        offset = 0
        for seq, raw in enumerate(RAW_CHUNKS):
            encoding, payload = encode_chunk_payload(compressor if seq < 2 else None, raw)
            out += b"".join(self.conn.send_data(1, seq, offset, len(raw), encoding, payload))
            offset += len(raw)
        return bytes(out + self.conn.send(InitialDataSent(stream=1, offset=offset)))


def _frames(data: bytes) -> list[bytes]:
    """Split at frame boundaries as the headers claim (best effort on mutated input)."""
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 4 : pos + 8], "big") if pos + 8 <= len(data) else 0
        out.append(data[pos : pos + 8 + length])
        pos += 8 + length
    return out


def fuzz_stream(role: Role, split: int, payload: bytes) -> None:
    conn = Connection(role, CONFIG, name=NAMES[role], nonce=NONCES[role])
    model = Model(conn)
    decompressor = make_decompressor(CONFIG.max_chunk_size)
    if split:
        pieces = [payload[i : i + split] for i in range(0, len(payload), split)]
    else:
        pieces = _frames(payload)  # an engine reacting between frames
    for piece in [*pieces, b""]:
        try:
            events = conn.receive_data(piece)
        except RemoteProtocolError:
            if conn.state is not ConnectionState.ERROR:
                raise AssertionError("a protocol error must leave ERROR") from None
            return
        for event in events:
            if isinstance(event, DataChunk):
                try:
                    decode_chunk_payload(decompressor, event, CONFIG.max_chunk_size)
                except RemoteProtocolError as exc:  # as the engine does: tell the peer, close
                    conn.send(Goodbye(code=exc.code.value, reason=str(exc)))
                    return
        model.react(events)


def fuzz_codec(tag: int, payload: bytes) -> None:
    if tag not in DECODERS:
        return
    with contextlib.suppress(LocalProtocolError):
        decode_fields(tag, unpack_map(payload, CONFIG, "fuzz"), CONFIG)


def fuzz_chunk(encoding: int, raw_kib: int, payload: bytes) -> None:
    chunk = DataChunk(
        stream=1,
        seq=0,
        offset=0,
        raw_len=max(1, raw_kib << 10) if raw_kib else max(1, len(payload)),
        encoding=Encoding(encoding & 1),
        payload=payload,
    )
    with contextlib.suppress(RemoteProtocolError):
        decode_chunk_payload(make_decompressor(CONFIG.max_chunk_size), chunk, 64 << 10)


def test_one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    mode, arg, split, payload = data[0] % 3, data[1], data[2], data[3:]
    if mode == 0:
        fuzz_stream(ROLES[arg % 4], split, payload)
    elif mode == 1:
        fuzz_codec(arg, payload)
    else:
        fuzz_chunk(arg, split, payload)


# --- the seed corpus ------------------------------------------------------------------------


def _session(first: Role) -> tuple[bytes, bytes]:
    """Both directions of a whole valid session between two models."""
    second = PEER_ROLE[first]
    models = {role: Model(Connection(role, CONFIG, name=NAMES[role], nonce=NONCES[role]))
              for role in (first, second)}  # fmt: skip
    wire = {first: bytearray(), second: bytearray()}
    pending = {role: models[role].react([]) for role in (first, second)}
    while any(pending.values()):
        for role, peer in ((first, second), (second, first)):
            data, pending[role] = pending[role], b""
            wire[role] += data
            for frame in _frames(data):
                pending[peer] += models[peer].react(models[peer].conn.receive_data(frame))
    for role in (first, second):
        assert models[role].conn.state is ConnectionState.CLOSED, role
    return bytes(wire[first]), bytes(wire[second])


def seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for first in (Role.ORCHESTRATOR, Role.DATA_SENDER):
        a_bytes, b_bytes = _session(first)
        second = PEER_ROLE[first]
        hello_end = 8 + int.from_bytes(a_bytes[4:8], "big")
        out[f"hello-from-{first}"] = bytes([0, ROLES.index(second), 0]) + a_bytes[:hello_end]
        for split in (0, 7, 100):
            out[f"session-from-{first}-split{split}"] = (
                bytes([0, ROLES.index(second), split]) + a_bytes
            )
            out[f"session-from-{second}-split{split}"] = (
                bytes([0, ROLES.index(first), split]) + b_bytes
            )
    samples = {
        0x01: {"versions": [1], "role": "agent", "name": "x", "nonce": bytes(32),
               "auth": "psk", "codecs": ["zstd"], "level": 1, "max_chunk": 1 << 20,
               "max_requests": 8, "max_frame": 1 << 16, "features": ["reinit_ack"]},
        0x02: {"mac": bytes(32)},
        0x12: {"code": "normal", "reason": "bye"},
        0x20: {"id": 1, "method": "set_state", "params": {"device": "d", "state": 2}},
        0x22: {"id": 1, "code": "x", "message": "m", "errno": 5, "device": None},
        0x23: {"payload": {"a": [1, 2.5, None, True, b"x", {"b": "c"}]}},
        0x31: {"stream": 1, "total": 10, "chunks": 1, "digest": bytes(32)},
        0x32: {"stream": 1, "increment": 100},
    }  # fmt: skip
    for tag, fields in samples.items():
        out[f"codec-0x{tag:02x}"] = bytes([1, tag, 0]) + msgpack.packb(fields)
    zstd = make_compressor(1)
    out["chunk-zstd-4k"] = bytes([2, 1, 4]) + zstd.compress(bytes(4096))
    out["chunk-zstd-nosize"] = bytes([2, 1, 4]) + zstandard.ZstdCompressor(
        write_content_size=False
    ).compress(bytes(4096))
    out["chunk-raw"] = bytes([2, 0, 0]) + b"raw bytes"
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-corpus":
        target = Path(sys.argv[2])
        target.mkdir(parents=True, exist_ok=True)
        for name, data in seeds().items():
            (target / name).write_bytes(data)
            test_one_input(data)  # every seed runs clean
        print(f"wrote {len(seeds())} seeds to {target}")
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
