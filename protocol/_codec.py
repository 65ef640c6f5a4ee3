"""Message bodies: msgpack maps with explicit limits, and the fixed binary chunk header.

Every control message body is one msgpack map whose keys are the field names of
docs/protocol.md §5. Decoding uses ``msgpack.unpackb`` on the exact frame body (the
framing already bounded it, which is what ``Unpacker(max_buffer_size=...)`` would do for a
stream), with every length limit set explicitly, ``strict_map_key=True``, ``raw=False``
and ``max_ext_len=0`` (no ext types are defined); a walk afterwards enforces the nesting
limit, string keys and the absence of ext values. Unknown keys are ignored (forward
compatibility, §9); a missing key or a value of the wrong shape is ``bad_message``.

The same walk vets values this side is about to send (tuples, sets, non-string keys or
over-long strings would not survive the round trip or would be refused by the peer), so
such mistakes are local errors, not remote ones.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, cast

import msgpack

from ._errors import ErrorCode, LocalProtocolError, limit_error
from ._events import (
    AbortStream,
    Credit,
    DataChunk,
    Encoding,
    ErrorResponse,
    Goodbye,
    InitialDataSent,
    Message,
    Notification,
    Ping,
    Pong,
    Request,
    Response,
    SwitchoverAck,
    Value,
)
from ._framing import CHUNK_HEADER, CHUNK_HEADER_SIZE

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._config import Config

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
NONCE_SIZE = 32
DIGEST_SIZE = 32


# --- handshake and internal wire forms --------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Message):
    """First frame from each side (unauthenticated). Fields only ever get added (§9)."""

    TAG: ClassVar[int] = 0x01
    versions: list[int]
    role: str
    name: str
    nonce: bytes
    auth: str
    codecs: list[str]
    level: int
    max_chunk: int
    max_requests: int
    max_frame: int
    features: list[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth(Message):
    """Proof of the key over the handshake transcript (unauthenticated frame)."""

    TAG: ClassVar[int] = 0x02
    mac: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready(Message):
    """First authenticated frame (seq 0): this side accepted the peer's Auth."""

    TAG: ClassVar[int] = 0x03


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfStreamFrame(Message):
    """Wire form of EndOfStream: the connection adds the count and the digest."""

    TAG: ClassVar[int] = 0x31
    stream: int
    total: int
    chunks: int
    digest: bytes


# --- msgpack with limits ------------------------------------------------------------------

#: How msgpack-python words a length limit: "70000 exceeds max_str_len(65536)".
_LIMIT_IN_MESSAGE = re.compile(r"(\d+) exceeds (max_\w+)\((\d+)\)")


class Packer:
    """msgpack encoding with one reused buffer (``packb`` mallocs 256 KiB per call)."""

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True, buf_size=4096)

    def pack(self, fields: dict[str, Value]) -> bytes:
        return cast("bytes", self._packer.pack(fields))


def unpack_map(body: bytes | bytearray | memoryview, config: Config, what: str) -> dict[str, Value]:
    """Decode one frame body that must be a msgpack map; errors name the limit hit."""
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            timestamp=0,
            max_str_len=config.max_str_len,
            max_bin_len=config.max_bin_len,
            max_array_len=config.max_array_len,
            max_map_len=config.max_map_len,
            max_ext_len=0,
        )
    except msgpack.StackError:
        raise LocalProtocolError(
            f"{what}: nesting beyond msgpack's own stack, far above max_depth={config.max_depth}",
            code=ErrorCode.LIMIT,
            limit="max_depth",
        ) from None
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        found = _LIMIT_IN_MESSAGE.search(str(exc))
        if found and found.group(2) != "max_ext_len":
            value, name, bound = int(found.group(1)), found.group(2), int(found.group(3))
            raise limit_error(f"{what}: a msgpack length", value, name, bound) from None
        raise LocalProtocolError(
            f"{what}: undecodable msgpack body ({_one_line(exc)})", code=ErrorCode.BAD_MESSAGE
        ) from None
    if not isinstance(value, dict):
        raise LocalProtocolError(
            f"{what}: the body is a msgpack {type(value).__name__}, not a map",
            code=ErrorCode.BAD_MESSAGE,
        )
    check_value(value, config, what)
    return cast("dict[str, Value]", value)


def check_value(value: object, config: Config, what: str) -> None:
    """Raise unless ``value`` is a msgpack value this protocol carries, within the limits."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if item is None or isinstance(item, bool | float):
            continue
        if isinstance(item, int):
            if not -(1 << 63) <= item <= U64:
                _bad(what, f"integer {item} does not fit msgpack")
        elif isinstance(item, str):
            if len(item) > config.max_str_len or (
                4 * len(item) > config.max_str_len and len(item.encode()) > config.max_str_len
            ):
                raise limit_error(f"{what}: a string", len(item), "max_str_len", config.max_str_len)
        elif isinstance(item, bytes):
            if len(item) > config.max_bin_len:
                raise limit_error(f"{what}: a bin", len(item), "max_bin_len", config.max_bin_len)
        elif isinstance(item, list | dict):
            if depth > config.max_depth:
                raise limit_error(f"{what}: nesting depth", depth, "max_depth", config.max_depth)
            if isinstance(item, list):
                if len(item) > config.max_array_len:
                    raise limit_error(
                        f"{what}: an array", len(item), "max_array_len", config.max_array_len
                    )
                stack.extend((x, depth + 1) for x in item)
            else:
                if len(item) > config.max_map_len:
                    raise limit_error(
                        f"{what}: a map", len(item), "max_map_len", config.max_map_len
                    )
                for key, x in item.items():
                    if not isinstance(key, str):
                        _bad(what, f"map key {key!r} is not a string")
                    stack.append((key, depth + 1))
                    stack.append((x, depth + 1))
        else:
            _bad(what, f"{type(item).__name__} is not a msgpack value this protocol carries")


# --- typed field access -------------------------------------------------------------------


class Fields:
    """Typed, bounds-checked access to a decoded map; errors name message and field."""

    def __init__(self, fields: dict[str, Value], what: str) -> None:
        self._m = fields
        self._what = what

    def _get(self, key: str) -> Value:
        if key not in self._m:
            _bad(self._what, f"field {key!r} is missing")
        return self._m[key]

    def _shape(self, key: str, expected: str, got: Value) -> LocalProtocolError:
        return LocalProtocolError(
            f"{self._what}: field {key!r} must be {expected}, got {_describe(got)}",
            code=ErrorCode.BAD_MESSAGE,
        )

    def get_int(self, key: str, lo: int = 0, hi: int = U64) -> int:
        value = self._get(key)
        if type(value) is not int or not lo <= value <= hi:
            raise self._shape(key, f"an integer in [{lo}, {hi}]", value)
        return value

    def opt_int(self, key: str, lo: int, hi: int) -> int | None:
        return None if self._m.get(key) is None else self.get_int(key, lo, hi)

    def get_str(self, key: str, max_len: int | None = None, limit: str | None = None) -> str:
        """A str; longer than ``max_len`` is bad_message, or names ``limit`` if given."""
        value = self._get(key)
        if not isinstance(value, str):
            raise self._shape(key, "a string", value)
        if max_len is not None and len(value) > max_len:
            if limit is not None:
                raise limit_error(f"{self._what}: field {key!r}", len(value), limit, max_len)
            raise self._shape(key, f"a string of at most {max_len} characters", value)
        return value

    def opt_str(self, key: str) -> str | None:
        return None if self._m.get(key) is None else self.get_str(key)

    def get_bytes(self, key: str, size: int | None = None) -> bytes:
        value = self._get(key)
        if not isinstance(value, bytes):
            raise self._shape(key, "a bin", value)
        if size is not None and len(value) != size:
            raise self._shape(key, f"a bin of {size} bytes", value)
        return value

    def get_payload(self, key: str, config: Config) -> bytes:
        """A ping payload, bounded by ``max_ping_payload``."""
        value = self.get_bytes(key)
        if len(value) > config.max_ping_payload:
            raise limit_error(
                f"{self._what}: field {key!r}", len(value), "max_ping_payload",
                config.max_ping_payload,
            )  # fmt: skip
        return value

    def get_map(self, key: str) -> dict[str, Value]:
        value = self._get(key)
        if not isinstance(value, dict):
            raise self._shape(key, "a map", value)
        return value

    def get_value(self, key: str) -> Value:
        return self._get(key)

    def str_list(self, key: str, max_items: int, max_len: int) -> list[str]:
        value = self._get(key)
        if not (
            isinstance(value, list)
            and len(value) <= max_items
            and all(isinstance(x, str) and len(x) <= max_len for x in value)
        ):
            raise self._shape(key, f"a list of at most {max_items} short strings", value)
        return cast("list[str]", value)

    def int_list(self, key: str, max_items: int) -> list[int]:
        value = self._get(key)
        if not (
            isinstance(value, list)
            and 1 <= len(value) <= max_items
            and all(type(x) is int and 0 <= x <= 255 for x in value)
        ):
            raise self._shape(key, f"a list of 1 to {max_items} integers 0..255", value)
        return cast("list[int]", value)


def _describe(value: Value) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{type(value).__name__} {value}"
    if isinstance(value, str | bytes | list | dict):
        return f"{type(value).__name__} of length {len(value)}"
    return repr(value)


def _bad(what: str, problem: str) -> None:
    raise LocalProtocolError(f"{what}: {problem}", code=ErrorCode.BAD_MESSAGE)


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


# --- per-message codecs -------------------------------------------------------------------


def _dec_hello(f: Fields, config: Config) -> Message:
    return Hello(
        versions=f.int_list("versions", 16),
        role=f.get_str("role", 32),
        name=f.get_str("name", config.max_name_len, "max_name_len"),
        nonce=f.get_bytes("nonce", size=NONCE_SIZE),
        auth=f.get_str("auth", 16),
        codecs=f.str_list("codecs", 8, 32),
        level=f.get_int("level", -(1 << 31), 1 << 31),
        max_chunk=f.get_int("max_chunk", 1, U32),
        max_requests=f.get_int("max_requests", 1, U32),
        max_frame=f.get_int("max_frame", 512, U32),
        features=f.str_list("features", 32, 64),
    )


def _dec_end(f: Fields, config: Config) -> Message:
    return EndOfStreamFrame(
        stream=f.get_int("stream", 0, U32),
        total=f.get_int("total"),
        chunks=f.get_int("chunks"),
        digest=f.get_bytes("digest", size=DIGEST_SIZE),
    )


#: TAG -> (class, decoder). The encoder is the dataclass's fields as a map, in order.
DECODERS: dict[int, tuple[type[Message], Callable[[Fields, Config], Message]]] = {
    Hello.TAG: (Hello, _dec_hello),
    Auth.TAG: (Auth, lambda f, c: Auth(mac=f.get_bytes("mac", size=DIGEST_SIZE))),
    Ready.TAG: (Ready, lambda f, c: Ready()),
    Ping.TAG: (Ping, lambda f, c: Ping(payload=f.get_payload("payload", c))),
    Pong.TAG: (Pong, lambda f, c: Pong(payload=f.get_payload("payload", c))),
    Goodbye.TAG: (
        Goodbye,
        lambda f, c: Goodbye(code=f.get_str("code", 64), reason=f.get_str("reason")),
    ),
    Request.TAG: (
        Request,
        lambda f, c: Request(
            id=f.get_int("id"), method=f.get_str("method", 64), params=f.get_map("params")
        ),
    ),
    Response.TAG: (
        Response,
        lambda f, c: Response(id=f.get_int("id"), result=f.get_value("result")),
    ),
    ErrorResponse.TAG: (
        ErrorResponse,
        lambda f, c: ErrorResponse(
            id=f.get_int("id"),
            code=f.get_str("code", 64),
            message=f.get_str("message"),
            errno=f.opt_int("errno", 0, 4095),
            device=f.opt_str("device"),
            phase=f.opt_str("phase"),
            step=f.opt_str("step"),
        ),
    ),
    Notification.TAG: (Notification, lambda f, c: Notification(payload=f.get_map("payload"))),
    EndOfStreamFrame.TAG: (EndOfStreamFrame, _dec_end),
    Credit.TAG: (
        Credit,
        lambda f, c: Credit(
            stream=f.get_int("stream", 0, U32), increment=f.get_int("increment", 1)
        ),
    ),
    InitialDataSent.TAG: (
        InitialDataSent,
        lambda f, c: InitialDataSent(
            stream=f.get_int("stream", 0, U32), offset=f.get_int("offset")
        ),
    ),
    SwitchoverAck.TAG: (
        SwitchoverAck,
        lambda f, c: SwitchoverAck(stream=f.get_int("stream", 0, U32), offset=f.get_int("offset")),
    ),
    AbortStream.TAG: (
        AbortStream,
        lambda f, c: AbortStream(stream=f.get_int("stream", 0, U32), reason=f.get_str("reason")),
    ),
}

#: Frame types that are not msgpack maps: the DataChunk body is binary.
BINARY_TAGS = frozenset({DataChunk.TAG})

#: Every frame type this version defines.
KNOWN_TAGS = frozenset(DECODERS) | BINARY_TAGS


def message_name(tag: int) -> str:
    entry = DECODERS.get(tag)
    if entry is not None:
        name = entry[0].__name__
        return "EndOfStream" if name == "EndOfStreamFrame" else name
    return "DataChunk" if tag == DataChunk.TAG else f"type 0x{tag:02x}"


def encode_fields(message: Message) -> dict[str, Value]:
    """A message's fields as the map that goes on the wire (declaration order)."""
    return {f.name: _wire(getattr(message, f.name)) for f in dataclasses.fields(message)}


def _wire(value: object) -> Value:
    if isinstance(value, Encoding):
        return int(value)
    return cast("Value", value)


def decode_fields(tag: int, fields: dict[str, Value], config: Config) -> Message:
    cls_decoder = DECODERS.get(tag)
    if cls_decoder is None:
        raise LocalProtocolError(
            f"unknown message type 0x{tag:02x}", code=ErrorCode.UNKNOWN_MESSAGE
        )
    return cls_decoder[1](Fields(fields, message_name(tag)), config)


# --- data chunks ----------------------------------------------------------------------------


def chunk_header(stream: int, seq: int, offset: int, raw_len: int, encoding: int) -> bytes:
    return CHUNK_HEADER.pack(stream, seq, offset, raw_len, encoding)


def decode_chunk(body: bytes | memoryview) -> DataChunk:
    """Parse a DataChunk body; the payload is a read-only view (no copy)."""
    if len(body) < CHUNK_HEADER_SIZE:
        raise LocalProtocolError(
            f"DataChunk: body of {len(body)} bytes is shorter than its "
            f"{CHUNK_HEADER_SIZE}-byte header",
            code=ErrorCode.BAD_MESSAGE,
        )
    stream, seq, offset, raw_len, encoding = CHUNK_HEADER.unpack_from(body)
    if encoding not in (Encoding.RAW, Encoding.ZSTD):
        raise LocalProtocolError(
            f"DataChunk: unknown payload encoding {encoding}", code=ErrorCode.BAD_CHUNK
        )
    return DataChunk(
        stream=stream,
        seq=seq,
        offset=offset,
        raw_len=raw_len,
        encoding=Encoding(encoding),
        payload=memoryview(body).toreadonly()[CHUNK_HEADER_SIZE:],
    )
