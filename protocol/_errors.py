"""Protocol errors: who broke the rules, which rule, and which limit.

    ProtocolError (abstract)           code: ErrorCode, limit: str | None, hint: str | None
    +-- LocalProtocolError             this side misused the Connection (a bug in the caller,
    |                                  or a bad Config); nothing was sent
    +-- RemoteProtocolError            the peer (or the network) broke the protocol

As in h11, every check is written once and raises :class:`LocalProtocolError`; the one
receive boundary (``Connection.receive_data``) re-raises those as
:class:`RemoteProtocolError`, because there the "local" data came from the peer. After
either, the Connection is in ``ERROR`` and refuses further calls.

``code`` is machine-readable and stable: the same strings travel in ``Goodbye.code`` and
are listed in docs/protocol.md. ``limit`` names the :class:`~vfmig.protocol.Config` field
whose bound was exceeded, when one was. These errors are not ``VfmigError`` subclasses
(``vfmig.protocol`` imports nothing else from vfmig): the engine maps them at its edge.
"""

from __future__ import annotations

import enum
from typing import NoReturn


class ErrorCode(enum.StrEnum):
    """Why a connection failed. Stable strings: they are sent in ``Goodbye.code``."""

    BAD_MAGIC = "bad_magic"  #: the bytes are not vfmig frames
    VERSION_MISMATCH = "version_mismatch"  #: no protocol version in common
    BAD_VERSION = "bad_version"  #: a frame not in the negotiated version
    FRAME_TOO_LARGE = "frame_too_large"  #: a frame's length exceeds a size limit
    TRUNCATED = "truncated"  #: the stream ended inside a frame
    UNKNOWN_MESSAGE = "unknown_message"  #: a message type this version does not define
    BAD_MESSAGE = "bad_message"  #: undecodable, or a field missing or of the wrong shape
    LIMIT = "limit"  #: a msgpack length, nesting or count limit was exceeded
    UNEXPECTED_MESSAGE = "unexpected_message"  #: not allowed in this state or for this role
    ROLE_MISMATCH = "role_mismatch"  #: the peer's role does not pair with ours
    AUTH_MODE_MISMATCH = "auth_mode_mismatch"  #: one side has a key, the other has none
    AUTH_FAILED = "auth_failed"  #: the peer does not know the shared key (or replayed)
    BAD_MAC = "bad_mac"  #: a control frame was altered or injected
    BAD_SEQUENCE = "bad_sequence"  #: a control frame was replayed, dropped or reordered
    FLOW_CONTROL = "flow_control"  #: data beyond the granted window, or a window overflow
    UNKNOWN_STREAM = "unknown_stream"  #: a stream that is not open
    STREAM_ORDER = "stream_order"  #: a chunk out of sequence or offset order
    BAD_CHUNK = "bad_chunk"  #: a chunk whose payload is inconsistent or undecodable
    UNKNOWN_REQUEST = "unknown_request"  #: a response to no outstanding request
    DUPLICATE_REQUEST = "duplicate_request"  #: a request id already outstanding
    BAD_PARAMS = "bad_params"  #: request params of the wrong msgpack shape
    HANDSHAKE_TIMEOUT = "handshake_timeout"  #: the handshake took too long
    IDLE_TIMEOUT = "idle_timeout"  #: nothing received for too long
    CLOSED = "closed"  #: the connection is closed
    BAD_STATE = "bad_state"  #: a call the current state does not allow
    BAD_CONFIG = "bad_config"  #: an invalid Config (local only)
    PEER_ERROR = "peer_error"  #: the peer closed the handshake with an error of its own


class ProtocolError(Exception):
    """Base of both protocol errors; never raised itself.

    ``str(error)`` is one line. ``hint`` (optional) says what to do about it.
    """

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode,
        limit: str | None = None,
        hint: str | None = None,
    ) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract: raise LocalProtocolError instead")
        super().__init__(message)
        self.message = message
        self.code = code
        self.limit = limit
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def _reraise_as_remote_protocol_error(self) -> NoReturn:
        """Re-raise as a RemoteProtocolError with the same fields (h11's trick)."""
        raise RemoteProtocolError(
            self.message, code=self.code, limit=self.limit, hint=self.hint
        ) from None


class LocalProtocolError(ProtocolError):
    """This side broke the protocol (or was misconfigured); nothing was sent."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol, or the bytes were damaged or tampered with in transit."""


def limit_error(
    what: str, value: int, limit_name: str, bound: int, code: ErrorCode = ErrorCode.LIMIT
) -> LocalProtocolError:
    """The standard error for "``what`` is ``value``, above ``Config.<limit_name>``"."""
    return LocalProtocolError(
        f"{what} is {value}, above the limit {limit_name}={bound}", code=code, limit=limit_name
    )
