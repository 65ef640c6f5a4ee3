"""``vfmig migrate --via HOST:PORT``: the thin client of a run an agent hosts (ADR 0010).

Theory of operation
-------------------
The command asks the agent at ``--via`` (started with ``--orchestrate``) to run the
migration, and waits for the answer; the agent drives the very run ``vfmig migrate``
drives in its own process (:mod:`vfmig.engine.hosted`). This side imports neither trio
nor the engine -- the start-up a short migration otherwise pays for before its first
byte: one blocking socket (TLS with ``--tls-*``) drives the sans-IO
:class:`~vfmig.protocol.Connection`: the handshake authenticated with the shared key,
the ``migrate`` request, keepalive ticks at least every :data:`TICK` seconds, the run's
events as they come (the progress display on a terminal, periodic lines otherwise,
nothing with ``--json``: then the events are not even asked for), and the answer.

Signals: SIGINT and SIGTERM only note their name (the wait for the agent looks every
0.1 s), so a frame is never cut in half; the loop then sends ``abort`` and goes on waiting
while the agent rolls the run back, and the answer carries the interrupted outcome (one
more signal changes nothing: the rollback is under way). Losing the
agent ends the command with exit status 4; the agent, having lost its client, aborts the
run the same way (the commit, once passed, is finished).
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import time
from typing import TYPE_CHECKING, Any, Final

from vfmig.core.errors import ExitStatus, PeerError, VfmigError
from vfmig.protocol import (
    Config,
    Connection,
    ConnectionClosed,
    ErrorResponse,
    Goodbye,
    HandshakeCompleted,
    Notification,
    ProtocolError,
    Request,
    Response,
    Role,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Iterator

    from vfmig.cli.context import Environment
    from vfmig.cli.progress import ProgressDisplay
    from vfmig.core.options import RunOptions
    from vfmig.protocol import Event, Value

#: The longest wait between keepalive ticks (the protocol wants keepalive_interval / 2).
TICK: Final = 0.5
#: Connecting and the TLS handshake may take this long.
CONNECT_TIMEOUT: Final = 10.0
#: A write that takes longer means the agent stopped reading.
SEND_TIMEOUT: Final = 30.0
RECEIVE_SIZE: Final = 256 << 10
_MIGRATE, _ABORT = 1, 2
#: ErrorResponse codes -> exit status (anything else: FAILED). An agent that does not
#: orchestrate (or predates hosted runs) answers unknown_method.
_EXIT: Final = {
    "bad_params": ExitStatus.USAGE,
    "refused": ExitStatus.PEER,
    "unknown_method": ExitStatus.PEER,
}
#: What a result must hold for this command to print it.
_RESULT_SHAPE: Final = {
    "outcome": str,
    "exit_status": int,
    "summary": str,
    "errors": list,
    "journal": str,
}


class RunRefused(VfmigError):
    """The agent would not take the run (an ErrorResponse to ``migrate``)."""

    def __init__(self, message: str, status: ExitStatus, hint: str | None) -> None:
        super().__init__(message, hint=hint)
        self.exit_status = status


def run_via(
    address: str,
    env: Environment,
    devices: list[str],
    options: RunOptions,
    *,
    key: bytes,
    tls: ssl.SSLContext | None,
    json: bool,
) -> tuple[dict[str, Any], Callable[[], None] | None]:
    """Have the agent at ``address`` run the migration of ``devices`` (SRC DST ..., each on
    an agent); returns the answer's result and what prints the summary (None if nothing
    was shown), as ``vfmig migrate`` ends every run."""
    peer = f"agent {address}"
    with _interrupts() as interrupted, _connect(address, tls) as sock:
        client = _Client(sock, peer, key)
        client.handshake(interrupted)
        params: dict[str, Value] = {
            "devices": list(devices),
            "options": options.to_wire(),
            "progress": not json,
        }
        client.send(Request(id=_MIGRATE, method="migrate", params=params))
        shown = _Display(env, devices) if not json else None
        aborting = False
        while True:
            if interrupted and not aborting:
                aborting = True
                name = interrupted[0]
                print(f"vfmig: {name}: rolling the run back (the agent does it)", file=env.stderr)
                client.send(Request(id=_ABORT, method="abort", params={"signal": name}))
            wake = _never if aborting else lambda: bool(interrupted)
            for event in client.receive(wake=wake):  # in order: an answer before a Goodbye
                if isinstance(event, Notification) and shown is not None:
                    shown.handle(event.payload)
                elif isinstance(event, Response | ErrorResponse) and event.id == _MIGRATE:
                    client.close()
                    return _answer(event, shown, peer)
                client.check(event)


def _answer(
    event: Response | ErrorResponse, shown: _Display | None, peer: str
) -> tuple[dict[str, Any], Callable[[], None] | None]:
    if isinstance(event, ErrorResponse):
        hint = None
        if event.code == "unknown_method":
            hint = "start the agent with --orchestrate (vfmig agent --help)"
        raise RunRefused(event.message, _EXIT.get(event.code, ExitStatus.FAILED), hint)
    answer = event.result if isinstance(event.result, dict) else {}
    error = answer.get("error")
    if isinstance(error, dict):
        raise HostedRunError(error)
    result = answer.get("result")
    if not isinstance(result, dict) or not all(
        isinstance(result.get(name), kind) for name, kind in _RESULT_SHAPE.items()
    ):
        raise PeerError(peer, "the answer to migrate is not a run's result (another version?)")
    if shown is None:
        return result, None
    return result, shown.closer(answer.get("summary"))


class HostedRunError(VfmigError):
    """The hosted run could not go on (an agent it needs unreachable, say)."""

    def __init__(self, error: dict[str, Value]) -> None:
        message, hint = error.get("message"), error.get("hint")
        super().__init__(str(message), hint=hint if isinstance(hint, str) else None)
        status = error.get("exit_status")
        self.exit_status = ExitStatus.FAILED
        if isinstance(status, int) and status in set(ExitStatus):
            self.exit_status = ExitStatus(status)
        journal, host = error.get("journal"), error.get("journal_host")
        self.journal: str | None = None
        if isinstance(journal, str) and isinstance(host, str):
            self.journal = f"{host}:{journal}"


class _Display:
    """The progress display, fed the run's event notices (created at the first event)."""

    def __init__(self, env: Environment, devices: list[str]) -> None:
        from vfmig.core.model import by_device

        self._env = env
        self._names = by_device(zip(devices[::2], devices[1::2], strict=True))
        self._display: ProgressDisplay | None = None

    def handle(self, payload: dict[str, Value]) -> None:
        from vfmig.cli.progress import ProgressDisplay
        from vfmig.engine import wire

        try:
            items = wire.batch_items(payload) if "batch" in payload else [payload]
            notices = [wire.parse_notice(item) for item in items]
        except wire.WireError:
            return  # a newer agent's notice: not for this display
        for notice in notices:
            if notice.event is None:
                continue
            if self._display is None:
                env = self._env
                self._display = ProgressDisplay(env, live=env.stdout_isatty, names=self._names)
            self._display.handle(notice.event)

    def closer(self, summary: Value) -> Callable[[], None] | None:
        """What prints the run's summary at the end (None if nothing was shown)."""
        display = self._display
        if display is None:
            return None
        from vfmig.engine import wire

        try:
            parsed = wire.parse_summary(summary)
        except wire.WireError:
            parsed = None  # the display's own, from the events it saw
        return lambda: display.close(parsed)


class _Client:
    """One authenticated control link over a blocking socket."""

    def __init__(self, sock: socket.socket, peer: str, key: bytes) -> None:
        self._sock = sock
        self.peer = peer
        self._conn = Connection(Role.ORCHESTRATOR, Config(key=key), name="vfmig migrate --via")
        self._ready = False
        self._lost: str | None = None  # why the transport failed, if it did
        self._write(self._conn.data_to_send())

    def handshake(self, interrupted: list[str]) -> None:
        while not self._ready:
            if interrupted:
                raise KeyboardInterrupt
            for event in self.receive(wake=lambda: bool(interrupted)):
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
                self.peer, f"the agent closed the link: {reason}", code=event.code, hint=_LOST_HINT
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
            raise PeerError(self.peer, f"the connection was lost ({self._lost})", hint=_LOST_HINT)
        raise PeerError(self.peer, "the agent closed the connection", hint=_LOST_HINT)

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
                self.peer, f"the connection was lost ({exc})", hint=_LOST_HINT
            ) from None


_LOST_HINT: Final = (
    "the failure policy brings the run's devices back either way: an agent that loses its "
    "client aborts the run (finished after the commit point); if the agent itself stopped, "
    "the other agents fall back alone and it does for its own devices when it restarts. "
    "See its log, and the run's journal on its host"
)


def _never() -> bool:
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
def _connect(address: str, tls: ssl.SSLContext | None) -> Iterator[socket.socket]:
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
            hint=f"check that the agent runs there (vfmig agent --listen {address} --orchestrate)",
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
def _interrupts() -> Iterator[list[str]]:
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
