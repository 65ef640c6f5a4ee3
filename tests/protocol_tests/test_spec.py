"""docs/protocol.md and the code cannot drift: its example frames, message table, method
table, error codes and limits are parsed out of the document and checked here.

If the encoding changes on purpose, the failure message of
``test_example_frames_are_what_the_code_sends`` contains the regenerated examples section.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import msgpack

from vfmig.protocol import (
    METHODS,
    Config,
    Connection,
    Credit,
    DataChunk,
    Encoding,
    EndOfStream,
    ErrorCode,
    ErrorResponse,
    Goodbye,
    InitialDataSent,
    Notification,
    Ping,
    Request,
    Response,
    Role,
    StreamEnded,
    SwitchoverAck,
    make_compressor,
)
from vfmig.protocol._codec import DECODERS, KNOWN_TAGS, message_name

SPEC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
KEY = b"vfmig example key - never use it"
CONTROL = (Role.ORCHESTRATOR, "orch", bytes(range(0x20)), Role.AGENT, "agent-a",
           bytes(range(0x20, 0x40)))  # fmt: skip
DATA = (Role.DATA_SENDER, "src-agent", bytes(range(0x40, 0x60)), Role.DATA_RECEIVER,
        "dst-agent", bytes(range(0x60, 0x80)))  # fmt: skip
DEVICE = "vfio:0000:3b:00.1"


@dataclasses.dataclass
class Example:
    name: str
    sender: str
    frame: bytes
    fields: str  # the decoded fields, as written in the spec
    events: str  # what the receiving Connection returns, as written in the spec


# --- the example sessions (the single source of the spec's examples) -----------------------


def _session(spec, actions):
    """Run a session; returns [(sender role, frame bytes, receiver events)] frame by frame."""
    r1, n1, nonce1, r2, n2, nonce2 = spec
    conns = {r1: Connection(r1, Config(key=KEY), name=n1, nonce=nonce1),
             r2: Connection(r2, Config(key=KEY), name=n2, nonce=nonce2)}  # fmt: skip
    other = {r1: r2, r2: r1}
    out = []

    def deliver(role, data):
        out.extend((role, f, conns[other[role]].receive_data(f)) for f in _split_frames(data))

    # the handshake, in the order the frames are produced (Hellos first)
    pending = {r1: conns[r1].data_to_send(), r2: conns[r2].data_to_send()}
    while any(pending.values()):
        for role in (r1, r2):
            data, pending[role] = pending[role], b""
            deliver(role, data)
        pending = {r1: conns[r1].data_to_send(), r2: conns[r2].data_to_send()}
    for role, event in actions:
        if isinstance(event, DataChunk):
            deliver(role, b"".join(conns[role].send_data(
                event.stream, event.seq, event.offset, event.raw_len, event.encoding,
                event.payload)))  # fmt: skip
        else:
            deliver(role, conns[role].send(event))
        deliver(other[role], conns[other[role]].data_to_send())
    return out


def _examples_from_code():
    zeros = make_compressor(-1).compress(bytes(4096))
    control = _session(CONTROL, [
        (Role.ORCHESTRATOR, Request(id=1, method="get_state", params={"device": DEVICE})),
        (Role.AGENT, Response(id=1, result=2)),
        (Role.ORCHESTRATOR, Request(id=2, method="set_state",
                                    params={"device": DEVICE, "state": 6})),
        (Role.AGENT, ErrorResponse(id=2, code="refused", message="device lacks PRE_COPY",
                                   errno=22, device=DEVICE, phase="preflight")),
        (Role.AGENT, Notification(payload={"type": "state", "device": DEVICE, "state": 2})),
        (Role.ORCHESTRATOR, Ping(payload=b"\x00\x00\x00\x00\x00\x00\x00\x07")),
        (Role.ORCHESTRATOR, Goodbye(code="normal", reason="done")),
        (Role.AGENT, Goodbye(code="normal", reason="")),
    ])  # fmt: skip
    data = _session(DATA, [
        (Role.DATA_RECEIVER, Credit(stream=1, increment=8 << 20)),
        (Role.DATA_SENDER, DataChunk(stream=1, seq=0, offset=0, raw_len=16,
                                     encoding=Encoding.RAW, payload=b"device state 001")),
        (Role.DATA_SENDER, DataChunk(stream=1, seq=1, offset=16, raw_len=4096,
                                     encoding=Encoding.ZSTD, payload=zeros)),
        (Role.DATA_SENDER, InitialDataSent(stream=1, offset=4112)),
        (Role.DATA_RECEIVER, SwitchoverAck(stream=1, offset=4112)),
        (Role.DATA_SENDER, EndOfStream(stream=1, total=4112)),
    ])  # fmt: skip
    examples = []
    for prefix, session, skip_handshake in (("C", control, False), ("D", data, True)):
        for role, frame, events in session:
            if skip_handshake and frame[3] in (0x01, 0x02, 0x03):
                continue
            name = f"{prefix}{len([e for e in examples if e.name[0] == prefix]) + 1}"
            examples.append(Example(name, role.value, frame, _fields_text(frame),
                                    _events_text(events)))  # fmt: skip
    return examples


def _fields_text(frame: bytes) -> str:
    body = frame[8:]
    if frame[3] == DataChunk.TAG:
        s, q, o, n, e = (int.from_bytes(body[a:b], "big") for a, b in
                         ((0, 4), (4, 12), (12, 20), (20, 24), (24, 25)))  # fmt: skip
        return _show({"stream": s, "seq": q, "offset": o, "raw_len": n, "encoding": e,
                      "payload": bytes(body[25:])})  # fmt: skip
    if frame[3] in (0x01, 0x02):
        return _show(msgpack.unpackb(body))
    seq = int.from_bytes(body[:8], "big")
    return f"seq {seq}, mac {body[-16:].hex()}, " + _show(msgpack.unpackb(body[8:-16]))


def _events_text(events) -> str:
    return _show(list(events))


def _show(value) -> str:
    """repr(), except that bytes print as 0x<hex> (no quotes or backticks in the spec)."""
    if isinstance(value, bytes | memoryview):
        return "0x" + bytes(value).hex() if value else "0x"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_show(k)}: {_show(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        inner = ", ".join(
            f"{f.name}={_show(getattr(value, f.name))}" for f in dataclasses.fields(value)
        )
        return f"{type(value).__name__}({inner})"
    if isinstance(value, frozenset):
        return "{" + ", ".join(sorted(map(repr, value))) + "}"
    return repr(value)


def _hexdump(frame: bytes) -> str:
    lines = []
    for pos in range(0, len(frame), 16):
        row = frame[pos : pos + 16]
        hexes = " ".join(f"{b:02x}" for b in row)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{pos:04x}  {hexes:<47}  {text}")
    return "\n".join(lines)


def render(examples) -> str:
    """The examples section of docs/protocol.md, as the code produces it."""
    return "\n".join(
        f"```hexdump {ex.name} {ex.sender}\n{_hexdump(ex.frame)}\n```\n\n"
        f"- fields: `{ex.fields}`\n- receiver gets: `{ex.events}`\n"
        for ex in examples
    )


def _split_frames(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 4 : pos + 8], "big")
        out.append(data[pos : pos + 8 + length])
        pos += 8 + length
    return out


# --- parsing the document --------------------------------------------------------------------

_EXAMPLE = re.compile(
    r"```hexdump (\w+) ([\w-]+)\n(.*?)```\s*\n- fields: `(.*?)`\n- receiver gets: `(.*?)`\n",
    re.S,
)


def _examples_from_spec() -> list[Example]:
    text = SPEC.read_text()
    found = []
    for name, sender, dump, fields, events in _EXAMPLE.findall(text):
        frame = bytearray()
        for line in dump.strip().splitlines():
            frame += bytes.fromhex(line[6:53])
        found.append(Example(name, sender, bytes(frame), fields, events))
    return found


def _section(title: str) -> str:
    text = SPEC.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def _table_rows(section: str) -> list[list[str]]:
    rows = [
        [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("|") and not set(line) <= set("|-: ")
    ]
    return rows[1:]  # without the heading row


# --- the tests -------------------------------------------------------------------------------


def test_example_frames_are_what_the_code_sends():
    documented = _examples_from_spec()
    generated = _examples_from_code()
    assert documented, "no ```hexdump examples found in docs/protocol.md"
    assert [(e.name, e.sender, e.frame) for e in documented] == [
        (e.name, e.sender, e.frame) for e in generated
    ], "docs/protocol.md examples are stale; current rendering:\n\n" + render(generated)


def test_example_frames_decode_to_what_the_spec_says():
    """Decode the spec's bytes (not the code's) and compare with the spec's words; then
    check that the sending side, given what was decoded, produces those same bytes."""
    by_link: dict[str, list[Example]] = {}
    for ex in _examples_from_spec():
        by_link.setdefault(ex.name[0], []).append(ex)
    for prefix, spec in (("C", CONTROL), ("D", DATA)):
        r1, n1, nonce1, r2, n2, nonce2 = spec
        conns = {r1.value: Connection(r1, Config(key=KEY), name=n1, nonce=nonce1),
                 r2.value: Connection(r2, Config(key=KEY), name=n2, nonce=nonce2)}  # fmt: skip
        other = {r1.value: r2.value, r2.value: r1.value}
        if prefix == "D":  # the data link's handshake is not printed: run it
            _handshake(conns[r1.value], conns[r2.value])
        produced = {side: bytearray() for side in conns}
        for ex in by_link[prefix]:
            assert _fields_text(ex.frame) == ex.fields, ex.name
            events = conns[other[ex.sender]].receive_data(ex.frame)
            assert _events_text(events) == ex.events, ex.name
            produced[ex.sender] += conns[ex.sender].data_to_send()
            if not produced[ex.sender]:  # an application message: send what was decoded
                (event,) = events
                produced[ex.sender] += _resend(conns[ex.sender], event)
            assert bytes(produced[ex.sender][: len(ex.frame)]) == ex.frame, ex.name
            del produced[ex.sender][: len(ex.frame)]


def _resend(conn: Connection, event) -> bytes:
    if isinstance(event, StreamEnded):
        return conn.send(EndOfStream(stream=event.stream, total=event.total))
    if isinstance(event, DataChunk):
        return b"".join(conn.send_data(event.stream, event.seq, event.offset, event.raw_len,
                                       event.encoding, bytes(event.payload)))  # fmt: skip
    return conn.send(event)


def _handshake(a: Connection, b: Connection) -> None:
    while True:
        da, db = a.data_to_send(), b.data_to_send()
        if not da and not db:
            return
        if da:
            b.receive_data(da)
        if db:
            a.receive_data(db)


def test_the_example_key_and_nonces_are_the_documented_ones():
    text = SPEC.read_text()
    assert repr(KEY) in text
    for spec in (CONTROL, DATA):
        assert spec[2].hex() in text
        assert spec[5].hex() in text


def test_message_table_matches_the_code():
    rows = _table_rows(_section("## 5. Messages"))
    documented = {int(row[0], 16): row[1] for row in rows}
    assert documented == {tag: message_name(tag) for tag in KNOWN_TAGS}
    chunk_row = next(r for r in rows if int(r[0], 16) == DataChunk.TAG)
    assert [x.strip() for x in chunk_row[3].split(",")] == [
        f.name for f in dataclasses.fields(DataChunk)
    ]
    for tag, (cls, _) in DECODERS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        row = next(r for r in rows if int(r[0], 16) == tag)
        listed = {name.strip("` ?") for name in row[3].split(",")} - {"-"}
        assert listed == fields, f"fields of {message_name(tag)}"


def test_method_table_matches_the_code():
    rows = _table_rows(_section("## 6. The agent's methods"))
    documented = {row[0]: row[1] for row in rows}
    assert set(documented) == set(METHODS)
    assert {row[0]: row[2] for row in rows} == {m.name: m.summary for m in METHODS.values()}
    for name, method in METHODS.items():
        params = {
            f"{p}: {shape}{'' if required else '?'}"
            for p, (shape, required) in method.params.items()
        }
        cell = documented[name]
        assert {x.strip() for x in cell.split(",") if x.strip() and x.strip() != "-"} == params


def test_error_code_table_matches_the_code():
    rows = _table_rows(_section("## 8. Errors"))
    assert {row[0] for row in rows} == {code.value for code in ErrorCode}


def test_limit_table_matches_the_config_defaults():
    rows = _table_rows(_section("## 7. Limits"))
    documented = {row[0]: row[1] for row in rows}
    defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.name != "key"}
    limits = {k: v for k, v in defaults.items() if k.startswith("max_") or "timeout" in k
              or k == "keepalive_interval"}  # fmt: skip
    assert set(documented) == set(limits)
    for name, value in limits.items():
        assert _quantity(documented[name]) == value, name


_UNITS = {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "s": 1}


def _quantity(text: str) -> float:
    """``"8 MiB"`` -> 8388608, ``"10 s"`` -> 10, ``"4096"`` -> 4096."""
    number, _, unit = text.partition(" ")
    return ast.literal_eval(number) * _UNITS[unit]
