"""A blocking, authenticated control link to an agent, for commands that import no trio.

Theory of operation
-------------------
The thin ``vfmig migrate`` and ``vfmig journal fetch`` talk to one agent and wait for its
answers; the start-up of trio and the engine would cost them more than the work. One
blocking socket (TLS with ``--tls-*``) drives the sans-IO :class:`~vfmig.protocol.
Connection`: the handshake authenticated with the shared key, requests, keepalive ticks at
least every :data:`TICK` seconds while waiting, and the events that arrive, in order. A wait
looks at its ``wake`` callable every 0.1 s, so a signal handler that only notes the signal
(:func:`interrupts`) is seen promptly and a frame is never cut in half. The end of the link
becomes a :class:`~vfmig.core.errors.PeerError` that says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import select
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from vfmig.core.errors import ExitStatus, PeerError, VfmigError
from vfmig.protocol import (
    Config,
    Connection,
    ConnectionClosed,
    ErrorResponse,
    Goodbye,
    HandshakeCompleted,
    ProtocolError,
    Request,
    Response,
    Role,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Iterator, Mapping

    from vfmig.protocol import Event, Value

#: The longest wait between keepalive ticks (the protocol wants keepalive_interval / 2).
TICK: Final = 0.5
#: Connecting and the TLS handshake may take this long.
CONNECT_TIMEOUT: Final = 10.0
#: A write that takes longer means the agent stopped reading.
SEND_TIMEOUT: Final = 30.0
RECEIVE_SIZE: Final = 256 << 10
#: The host's identity (systemd's; readable by everyone).
MACHINE_ID: Final = Path("/etc/machine-id")


def this_machine() -> str | None:
    """This host's identity as agents report it (``status``): a digest of its machine id
    (the id itself is not shown), None where there is none."""
    try:
        raw = MACHINE_ID.read_bytes().strip()
    except OSError:
        return None
    return hashlib.sha256(b"vfmig machine " + raw).hexdigest()[:32] if raw else None


class RequestFailed(VfmigError):
    """The agent answered a request with an ErrorResponse (``code``: its error code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Refused(VfmigError):
    """An agent's ErrorResponse as a command reports it: the exit status its code means to
    that command (``statuses``; FAILED otherwise) and what to do (``hints``)."""

    def __init__(
        self,
        code: str,
        message: str,
        statuses: Mapping[str, ExitStatus],
        hints: Mapping[str, str],
    ) -> None:
        super().__init__(message, hint=hints.get(code))
        self.exit_status = statuses.get(code, ExitStatus.FAILED)


class AgentClient:
    """One authenticated control link over a blocking socket; ``name`` is this side's
    name in the handshake (the agent logs it), ``lost_hint`` what to do when the link is
    lost."""

    def __init__(
        self, sock: socket.socket, peer: str, key: bytes, *, name: str, lost_hint: str | None
    ) -> None:
        self._sock = sock
        self.peer = peer
        self._lost_hint = lost_hint
        self._ids = itertools.count(1)
        self._conn = Connection(Role.ORCHESTRATOR, Config(key=key), name=name)
        self._ready = False
        self._lost: str | None = None  # why the transport failed, if it did
        self._write(self._conn.data_to_send())

    def handshake(self, interrupted: list[str]) -> None:
        while not self._ready:
            if interrupted:
                raise KeyboardInterrupt
            for event in self.receive(wake=lambda: bool(interrupted)):
                self.check(event)

    def request(self, method: str, params: dict[str, Value]) -> int:
        """Send a request; its id."""
        request_id = next(self._ids)
        self.send(Request(id=request_id, method=method, params=params))
        return request_id

    def call(self, method: str, params: dict[str, Value], interrupted: list[str]) -> Value:
        """Ask ``method`` and wait for its answer's result (an interrupt raises
        KeyboardInterrupt; an ErrorResponse, :class:`RequestFailed`)."""
        request_id = self.request(method, params)
        while True:
            if interrupted:
                raise KeyboardInterrupt
            for event in self.receive(wake=lambda: bool(interrupted)):
                if isinstance(event, Response) and event.id == request_id:
                    return event.result
                if isinstance(event, ErrorResponse) and event.id == request_id:
                    raise RequestFailed(event.code, event.message)
                self.check(event)

    def send(self, event: Event) -> None:
        try:
            data = self._conn.data_to_send() + self._conn.send(event)
        except ProtocolError as exc:
            raise PeerError(self.peer, exc.message, hint=exc.hint) from None
        self._write(data)

    def receive(self, *, wake: Callable[[], bool]) -> list[Event]:
        """The events of what arrives within :data:`TICK` (``wake()`` becoming true cuts
        the wait short), in order; pass each one the caller does not take to :meth:`check`."""
        events: list[Event] = []
        pending = getattr(self._sock, "pending", None)  # TLS: bytes decrypted already
        if (pending is not None and pending()) or _readable(self._sock, wake):
            data: bytes | None
            try:
                data = self._sock.recv(RECEIVE_SIZE)
            except OSError as exc:
                data, self._lost = None, str(exc) or type(exc).__name__
            events = self._feed(data)
        try:
            self._conn.tick(time.monotonic())
        except ProtocolError as exc:
            raise self._failed(exc) from None
        self._write(self._conn.data_to_send())
        self._ready = self._ready or any(isinstance(e, HandshakeCompleted) for e in events)
        return events

    def close(self) -> None:
        with contextlib.suppress(ProtocolError, OSError, VfmigError):
            self._write(self._conn.data_to_send() + self._conn.send(Goodbye(code="normal")))

    def _feed(self, data: bytes | None) -> list[Event]:
        try:
            return self._conn.receive_data(data)
        except ProtocolError as exc:
            with contextlib.suppress(OSError, VfmigError):
                self._write(self._conn.data_to_send())  # the Goodbye that says why
            raise self._failed(exc) from None

    def check(self, event: Event) -> None:
        """Turn the end of the link into the error that says why."""
        if isinstance(event, Goodbye):
            reason = f"{event.code}: {event.reason}" if event.code != "normal" else event.reason
            raise PeerError(
                self.peer,
                f"the agent closed the link: {reason}",
                code=event.code,
                hint=self._lost_hint,
            )
        if not isinstance(event, ConnectionClosed):
            return
        if not self._ready:
            raise PeerError(
                self.peer,
                "the connection closed during the handshake",
                hint="check that the address is a vfmig agent's, and that both sides use "
                "TLS (--tls-*) or neither",
            )
        if self._lost is not None:
            raise PeerError(
                self.peer, f"the connection was lost ({self._lost})", hint=self._lost_hint
            )
        raise PeerError(self.peer, "the agent closed the connection", hint=self._lost_hint)

    def _failed(self, exc: ProtocolError) -> PeerError:
        return PeerError(self.peer, exc.message, code=exc.code.value, hint=exc.hint)

    def _write(self, data: bytes) -> None:
        if not data:
            return
        try:
            self._sock.settimeout(SEND_TIMEOUT)
            self._sock.sendall(data)
        except OSError as exc:
            self._conn.send_failed()
            raise PeerError(
                self.peer, f"the connection was lost ({exc})", hint=self._lost_hint
            ) from None


def never() -> bool:
    return False


def _readable(sock: socket.socket, wake: Callable[[], bool]) -> bool:
    """Wait up to TICK for ``sock``; ``wake()`` becoming true (an interrupt) ends it."""
    deadline = time.monotonic() + TICK
    while not wake():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([sock], [], [], min(left, 0.1))
        if ready:
            return True
    return False


@contextlib.contextmanager
def connect(address: str, tls: ssl.SSLContext | None, *, hint: str) -> Iterator[socket.socket]:
    """A connected socket to the agent at ``address``; ``hint`` when nobody answers."""
    from vfmig.core.spec import split_address

    try:
        host, port = split_address(address)
    except ValueError as exc:
        raise PeerError(address, str(exc)) from None
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        raise PeerError(
            address,
            f"cannot connect to the agent: {exc.strerror or exc}",
            hint=hint,
        ) from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        import ssl

        try:
            sock = tls.wrap_socket(sock, server_hostname=host)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise PeerError(
                address,
                f"TLS handshake with the agent failed: {exc}",
                hint="check --tls-ca/--tls-cert/--tls-key on both sides",
            ) from None
    with sock:
        yield sock


@contextlib.contextmanager
def interrupts() -> Iterator[list[str]]:
    """A list that gets the name of each SIGINT/SIGTERM received meanwhile (in the main
    thread; elsewhere signals stay with whoever has them)."""
    received: list[str] = []

    def handler(number: int, frame: object) -> None:
        received.append(signal.Signals(number).name)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread (a test's): signals are not ours to take
        pass
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
