"""vfmig.protocol: the sans-IO wire protocol (installed from protocol/ as vfmig.protocol).

One :class:`Connection` class serves both links: the control link (orchestrator <-> agent:
requests, responses, the agent's events) and the data link (source agent -> destination
agent: device-state chunks with credit-based flow control and a keyed end-of-stream
digest). It turns events into bytes and bytes into events and never does I/O, so the
same code runs over TCP, TLS or a socketpair, and in tests over nothing at all.

Specification: docs/protocol.md. Design decisions: docs/adr/0002-sans-io-protocol.md.
"""

from __future__ import annotations

from ._chunks import decode_chunk_payload, encode_chunk_payload, make_compressor, make_decompressor
from ._config import DEFAULT_COMPRESSION_LEVEL, FEATURES, SUPPORTED_VERSIONS, Config
from ._connection import Connection, ConnectionStatistics
from ._errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
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
    Notification,
    Ping,
    Pong,
    Request,
    Response,
    StreamEnded,
    SwitchoverAck,
    Value,
)
from ._methods import METHODS, Method
from ._state import ConnectionState, Role

__all__ = [
    "DEFAULT_COMPRESSION_LEVEL",
    "FEATURES",
    "METHODS",
    "SUPPORTED_VERSIONS",
    "AbortStream",
    "Config",
    "Connection",
    "ConnectionClosed",
    "ConnectionState",
    "ConnectionStatistics",
    "Credit",
    "DataChunk",
    "Encoding",
    "EndOfStream",
    "ErrorCode",
    "ErrorResponse",
    "Event",
    "Goodbye",
    "HandshakeCompleted",
    "InitialDataSent",
    "LocalProtocolError",
    "Message",
    "Method",
    "Notification",
    "Ping",
    "Pong",
    "ProtocolError",
    "RemoteProtocolError",
    "Request",
    "Response",
    "Role",
    "StreamEnded",
    "SwitchoverAck",
    "Value",
    "decode_chunk_payload",
    "encode_chunk_payload",
    "make_compressor",
    "make_decompressor",
]
