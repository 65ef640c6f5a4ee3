"""Helpers for the protocol tests, shared as fixtures (test modules cannot import each other).

``ConnectionPair`` is h11's test helper ported: two connected Connections and a ``send``
that delivers what one side sends to the other and checks, by default, that the events
received equal the events sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from vfmig.protocol import (
    Config,
    Connection,
    DataChunk,
    EndOfStream,
    Event,
    HandshakeCompleted,
    Role,
    StreamEnded,
)
from vfmig.protocol._state import PEER_ROLE

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

KEY = b"vfmig test key: not a secret...."
NONCES = {
    Role.ORCHESTRATOR: bytes(range(32)),
    Role.AGENT: bytes(range(32, 64)),
    Role.DATA_SENDER: bytes(range(64, 96)),
    Role.DATA_RECEIVER: bytes(range(96, 128)),
}


def expected_events(sent: Sequence[Event]) -> list[Event]:
    """What the peer receives for ``sent`` when nothing went wrong."""
    out: list[Event] = []
    for event in sent:
        if isinstance(event, EndOfStream):
            out.append(StreamEnded(stream=event.stream, total=event.total, chunks=-1, ok=True))
        else:
            out.append(event)
    return out


def normalize(events: Sequence[Event]) -> list[Event]:
    """Chunk payloads as bytes; StreamEnded chunk counts blanked (the sender cannot know)."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, DataChunk):
            event = DataChunk(
                stream=event.stream,
                seq=event.seq,
                offset=event.offset,
                raw_len=event.raw_len,
                encoding=event.encoding,
                payload=bytes(event.payload),
            )
        elif isinstance(event, StreamEnded):
            event = StreamEnded(stream=event.stream, total=event.total, chunks=-1, ok=event.ok)
        out.append(event)
    return out


class ConnectionPair:
    """Two connected connections; ``first`` is the orchestrator or the data sender."""

    def __init__(
        self,
        first: Role = Role.ORCHESTRATOR,
        *,
        config: Config | None = None,
        peer_config: Config | None = None,
        fixed_nonces: bool = True,
        handshake: bool = True,
    ) -> None:
        config = config or Config(key=KEY)
        second = PEER_ROLE[first]
        self.conn: dict[Role, Connection] = {
            first: Connection(
                first, config, name=f"{first}-1", nonce=NONCES[first] if fixed_nonces else None
            ),
            second: Connection(
                second,
                peer_config or config,
                name=f"{second}-1",
                nonce=NONCES[second] if fixed_nonces else None,
            ),
        }
        self.first, self.second = first, second
        self.other = {first: second, second: first}
        #: Every byte each side produced, in order (for replay and corruption tests).
        self.wire: dict[Role, bytearray] = {first: bytearray(), second: bytearray()}
        if handshake:
            events = self.pump()
            assert [type(e) for e in events[first]] == [HandshakeCompleted]
            assert [type(e) for e in events[second]] == [HandshakeCompleted]

    def pump(self) -> dict[Role, list[Event]]:
        """Move data_to_send() both ways until quiet; returns the events each side got."""
        got: dict[Role, list[Event]] = {self.first: [], self.second: []}
        moved = True
        while moved:
            moved = False
            for role in (self.first, self.second):
                data = self.conn[role].data_to_send()
                if data:
                    moved = True
                    self.wire[role] += data
                    got[self.other[role]] += self.conn[self.other[role]].receive_data(data)
        return got

    def send(
        self,
        role: Role,
        events: Event | Sequence[Event],
        expect: str | Sequence[Event] = "match",
        *,
        split: Callable[[bytes], Sequence[bytes]] | None = None,
    ) -> bytes:
        """``role`` sends ``events``; the peer receives them (optionally re-split)."""
        sent = [events] if isinstance(events, Event) else list(events)
        data = b"".join(self.conn[role].send(e) for e in sent)
        self.wire[role] += data
        peer = self.conn[self.other[role]]
        got: list[Event] = []
        for piece in split(data) if split else [data]:
            got += peer.receive_data(piece)
        wanted = expected_events(sent) if expect == "match" else expect
        assert normalize(got) == normalize(list(wanted))
        return data


@pytest.fixture
def pair() -> type[ConnectionPair]:
    """The ConnectionPair class: ``pair(Role.DATA_SENDER, config=...)``."""
    return ConnectionPair


@pytest.fixture
def key() -> bytes:
    return KEY


@pytest.fixture
def nonces() -> dict[Role, bytes]:
    return dict(NONCES)


@pytest.fixture
def helpers() -> Any:
    """Module-like access to the plain helper functions above."""

    class _Helpers:
        expected_events = staticmethod(expected_events)
        normalize = staticmethod(normalize)

    return _Helpers
