"""The connection state machine and the role table, as data.

Theory of operation
-------------------
A connection pairs two complementary roles: ORCHESTRATOR with AGENT (the control link)
and DATA_SENDER with DATA_RECEIVER (the data link). :data:`MAY_SEND` lists, per role,
the message classes it may send once established; anything else is a
``LocalProtocolError`` when sent and a ``RemoteProtocolError`` when received. The
handshake messages (Hello, Auth, Ready) are not in it: the connection sends them itself.

The state is one value for the whole connection (both directions)::

    HANDSHAKE --peer's Auth verified--> AUTHENTICATED --peer's Ready--> ESTABLISHED
        |                                   |                              |
        +---------- a Goodbye sent or received (either side) -------------+--> CLOSING
    CLOSING --the other Goodbye--> CLOSED;    any --EOF / transport lost--> CLOSED
    (CLOSED after both Goodbyes still takes the transport's end, once)
    any --protocol error, send_failed()--> ERROR (absorbing)

HANDSHAKE: Hellos and Auths are exchanged; nothing else may be sent or received.
AUTHENTICATED: the peer proved the key; this side has sent its Ready and may send
(pipelined); the peer's next frame must be its Ready. ESTABLISHED: the peer's Ready
proved that it accepted this side's Auth and derived the same session keys.
CLOSING: a side that said Goodbye sends nothing more, and one that received a Goodbye
may only answer with its own; frames sent before a Goodbye are still accepted. CLOSED
and ERROR refuse everything (ERROR remembers why).

Only :meth:`StateMachine.process` changes the state, and only through
:data:`TRANSITIONS`; an input the table does not list for the current state is refused
with ``LocalProtocolError`` and changes nothing (h11's rule).
"""

from __future__ import annotations

import enum

from ._errors import ErrorCode, LocalProtocolError
from ._events import (
    AbortStream,
    Credit,
    DataChunk,
    EndOfStream,
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
)


class Role(enum.StrEnum):
    """Who this side is. The value travels in the Hello and in key-derivation labels."""

    ORCHESTRATOR = "orchestrator"
    AGENT = "agent"
    DATA_SENDER = "data-sender"
    DATA_RECEIVER = "data-receiver"


#: The role each role must talk to.
PEER_ROLE: dict[Role, Role] = {
    Role.ORCHESTRATOR: Role.AGENT,
    Role.AGENT: Role.ORCHESTRATOR,
    Role.DATA_SENDER: Role.DATA_RECEIVER,
    Role.DATA_RECEIVER: Role.DATA_SENDER,
}

#: The role whose Hello comes first in the handshake transcript (both sides agree on it).
FIRST_ROLES = frozenset({Role.ORCHESTRATOR, Role.DATA_SENDER})


def _kinds(*classes: type[Message]) -> frozenset[type[Message]]:
    return frozenset((Ping, Pong, Goodbye, *classes))


#: What each role may send once authenticated (docs/protocol.md §5, "sent by").
MAY_SEND: dict[Role, frozenset[type[Message]]] = {
    Role.ORCHESTRATOR: _kinds(Request),
    Role.AGENT: _kinds(Response, ErrorResponse, Notification),
    Role.DATA_SENDER: _kinds(DataChunk, EndOfStream, InitialDataSent, AbortStream),
    Role.DATA_RECEIVER: _kinds(Credit, SwitchoverAck),
}


class ConnectionState(enum.Enum):
    HANDSHAKE = "handshake"
    AUTHENTICATED = "authenticated"
    ESTABLISHED = "established"
    CLOSING = "closing"
    CLOSED = "closed"
    ERROR = "error"


class Input(enum.Enum):
    """What moves the state machine."""

    PEER_AUTHENTICATED = "peer authenticated"
    PEER_READY = "peer ready"
    GOODBYE_SENT = "goodbye sent"
    GOODBYE_RECEIVED = "goodbye received"
    TRANSPORT_ENDED = "transport ended"
    FAILED = "failed"


_S = ConnectionState
_OPEN = (_S.HANDSHAKE, _S.AUTHENTICATED, _S.ESTABLISHED)

#: (state, input) -> next state. CLOSING needs to know whose Goodbye is still missing;
#: that is :attr:`StateMachine.goodbye_sent` / ``goodbye_received``, checked in process().
TRANSITIONS: dict[tuple[ConnectionState, Input], ConnectionState] = {
    (_S.HANDSHAKE, Input.PEER_AUTHENTICATED): _S.AUTHENTICATED,
    (_S.AUTHENTICATED, Input.PEER_READY): _S.ESTABLISHED,
    **{(s, Input.GOODBYE_SENT): _S.CLOSING for s in _OPEN},
    **{(s, Input.GOODBYE_RECEIVED): _S.CLOSING for s in _OPEN},
    (_S.CLOSING, Input.GOODBYE_SENT): _S.CLOSED,
    (_S.CLOSING, Input.GOODBYE_RECEIVED): _S.CLOSED,
    **{(s, Input.TRANSPORT_ENDED): _S.CLOSED for s in (*_OPEN, _S.CLOSING, _S.CLOSED)},
    **{(s, Input.FAILED): _S.ERROR for s in (*_OPEN, _S.CLOSING, _S.CLOSED)},
}


#: Inputs that can happen once per connection, and the flag that remembers them.
_ONCE = {
    Input.GOODBYE_SENT: "goodbye_sent",
    Input.GOODBYE_RECEIVED: "goodbye_received",
    Input.TRANSPORT_ENDED: "transport_ended",
}


class StateMachine:
    """The connection's state plus the once-only flags (Goodbyes, transport end)."""

    def __init__(self) -> None:
        self.state = ConnectionState.HANDSHAKE
        self.goodbye_sent = False
        self.goodbye_received = False
        self.transport_ended = False

    def process(self, event: Input) -> None:
        flag = _ONCE.get(event)
        new = TRANSITIONS.get((self.state, event))
        if new is None or (flag is not None and getattr(self, flag)):
            raise _refuse(self.state, event)
        if flag is not None:
            setattr(self, flag, True)
        self.state = new

    @property
    def may_send(self) -> bool:
        """This side may send application messages (in CLOSING only a Goodbye, if unsent)."""
        return self.state in (_S.AUTHENTICATED, _S.ESTABLISHED)


def _refuse(state: ConnectionState, event: Input) -> LocalProtocolError:
    return LocalProtocolError(
        f"{event.value} is not possible in state {state.value}", code=ErrorCode.BAD_STATE
    )
