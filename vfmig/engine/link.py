"""A protocol :class:`~vfmig.protocol.Connection` driven over a trio stream.

Theory of operation
-------------------
The sans-IO connection turns events into bytes and bytes into events; a :class:`Link`
moves those bytes over one trio stream (TCP, TLS, a socketpair or a test stream pair):

* **Sending.** Every write happens under one lock and in a shielded scope with its own
  deadline, so a frame is never cut in half by a cancellation and frames reach the wire
  in the order the connection produced them (the MAC sequence numbers depend on it):
  bytes the connection queued by itself (``data_to_send()``: handshake replies, Pongs,
  keepalive Pings) go first, then the caller's. If the transport fails or the deadline
  passes, ``conn.send_failed()`` marks the connection unusable.
* **Receiving.** One loop (:meth:`Link.run`) feeds received bytes to the connection and
  dispatches the events: a Response or ErrorResponse wakes the task waiting in
  :meth:`Link.request` for that id; a Goodbye is answered; everything else (requests,
  notifications, data) goes to the owner's handler, in order. The handler may block: the
  loop then stops reading, which is TCP backpressure, never an unbounded queue.
* **Time.** A keepalive task calls ``conn.tick(now)`` often enough for the connection's
  handshake deadline, idle timeout and keepalive pings.
* **Errors** are mapped at this edge: transport errors and protocol errors become
  :class:`PeerError` (exit status PEER) naming the peer; an ErrorResponse becomes
  :class:`RpcError` carrying the agent's code, errno, device and phase. When a link fails,
  every waiting request fails with the link's error.

Closing: :meth:`Link.aclose` says Goodbye, waits briefly for the peer's, then closes the
transport; a peer's Goodbye is answered and the loop ends at the transport's end.
"""

from __future__ import annotations

import contextlib
import itertools
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeVar

import trio

from vfmig.core.errors import ExitStatus, PeerError, VfmigError
from vfmig.core.spec import split_address
from vfmig.protocol import (
    DEFAULT_COMPRESSION_LEVEL,
    Config,
    ConnectionClosed,
    ConnectionState,
    ErrorResponse,
    Goodbye,
    HandshakeCompleted,
    Ping,
    Pong,
    ProtocolError,
    Request,
    Response,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from vfmig.protocol import Connection, Encoding, Event, Value

T = TypeVar("T")

#: Bytes asked of the transport per receive: a few frames, or a quarter of a 1 MiB chunk.
RECEIVE_SIZE: Final = 256 << 10
#: A write that takes longer than this means the peer stopped reading: the link is dead.
SEND_TIMEOUT: Final = 30.0
#: How long a closing side waits for the peer's Goodbye before closing the transport.
CLOSE_TIMEOUT: Final = 2.0
#: The keepalive task ticks at least this often (the protocol needs keepalive_interval / 2).
MAX_TICK: Final = 0.5

#: The address of an agent in the ``vfmig migrate`` process itself (no socket).
INPROC: Final = "in-process"

_OPEN: Final = (ConnectionState.AUTHENTICATED, ConnectionState.ESTABLISHED)


def protocol_config(key: bytes | None, *, level: int | None = DEFAULT_COMPRESSION_LEVEL) -> Config:
    """The link configuration: ``level`` is the zstd level of chunks this side sends, None
    to send them uncompressed (a side that only receives accepts zstd either way)."""
    if level is None:
        return Config(key=key, compression=False)
    return Config(key=key, compression_level=level)


class LinkClosed(PeerError):
    """The link is closed or closing: nothing more can be sent on it."""


class RpcError(VfmigError):
    """An agent answered a request with an ErrorResponse."""

    exit_status = ExitStatus.DEVICE

    def __init__(
        self,
        peer: str,
        method: str,
        response: ErrorResponse,
    ) -> None:
        super().__init__(f"{peer}: {method}: {response.message}")
        self.code = response.code
        self.reason = response.message
        self.errno = response.errno
        self.device = response.device
        self.phase = response.phase
        self.step = response.step


@dataclass(slots=True)
class _Call:
    method: str
    done: trio.Event = field(default_factory=trio.Event)
    result: Value = None
    error: VfmigError | None = None


async def connect(
    address: str, *, ssl_context: ssl.SSLContext | None = None, what: str = "agent"
) -> trio.abc.Stream:
    """A TCP (or TLS) stream to ``address``; PeerError if it cannot be opened."""
    try:
        host, port = split_address(address)
    except ValueError as exc:
        raise PeerError(address, str(exc)) from None
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise PeerError(
            address,
            f"cannot connect to the {what}: {exc.strerror or exc}",
            hint=f"check that the {what} runs there (vfmig agent --listen {address})",
        ) from None
    if ssl_context is None:
        return tcp
    tls = trio.SSLStream(tcp, ssl_context, server_hostname=host)
    try:
        await tls.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        await trio.aclose_forcefully(tcp)
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        raise PeerError(
            address,
            f"TLS handshake with the {what} failed: {cause}",
            hint="check --tls-ca/--tls-cert/--tls-key on both sides",
        ) from None
    return tls


class Link:
    """One connection over one stream; see the module docstring. Run :meth:`run` in a task."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: Connection,
        *,
        peer: str,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.conn = conn
        self.peer = peer
        self._stream = stream
        self._send_timeout = send_timeout
        self._send_lock = trio.Lock()
        self._pending: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._failure: PeerError | None = None
        self._closing = False
        self._goodbye_received = False
        self.session: HandshakeCompleted | None = None
        self.finished = trio.Event()
        self._ready = trio.Event()  # set at HandshakeCompleted, or when the link ends

    @property
    def failure(self) -> PeerError | None:
        """Why the link failed (None while it works, or after a clean close)."""
        return self._failure

    # --- running -------------------------------------------------------------------------

    async def run(
        self,
        handler: Callable[[Event], Awaitable[None]],
        *,
        peek: Callable[[list[Event]], None] | None = None,
        task_status: trio.TaskStatus[Link] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Handshake, report readiness (``task_status.started(self)``), then receive until
        the link ends: returns after a clean close, raises PeerError otherwise.

        ``peek(events)`` sees each batch the connection returns before the handler gets
        its events one by one: the connection's state already reflects the whole batch
        (a stream the batch ends is closed), and ``peek`` runs before anything else can.
        """
        failure: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive)
                try:
                    await self._flush()
                    await self._receive_loop(handler, peek, task_status)
                except Exception as exc:  # mapped below; the nursery must not wrap it
                    failure = exc
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)
            if isinstance(failure, PeerError) and self._failure is None:
                self._failure = failure
            self._fail_pending(
                self._failure or LinkClosed(self.peer, "the link closed before the answer came")
            )
            self._ready.set()
            self.finished.set()
        if failure is not None:
            raise failure

    async def _receive_loop(
        self,
        handler: Callable[[Event], Awaitable[None]],
        peek: Callable[[list[Event]], None] | None,
        task_status: trio.TaskStatus[Link],
    ) -> None:
        lost = ""
        while True:
            data: bytes | bytearray | None
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if self._failure is not None:
                    raise self._failure from None
                if self._closing or self._goodbye_received:
                    return  # the protocol closed already (TLS may end raggedly after it)
                data = None
                lost = str(exc.__cause__ or exc) or type(exc).__name__
            try:
                events = self.conn.receive_data(data)
            except ProtocolError as exc:
                await self._flush_quietly()  # the Goodbye that tells the peer why
                raise self._protocol_error(exc) from None
            if peek is not None and events:
                peek(events)
            await self._flush()
            for event in events:
                if isinstance(event, HandshakeCompleted):
                    self.session = event
                    self._ready.set()
                    task_status.started(self)
                elif isinstance(event, Response | ErrorResponse):
                    self._deliver(event)
                elif isinstance(event, Goodbye):
                    await self._on_goodbye(event)
                    if self._failure is not None:
                        raise self._failure
                    if self._closing:
                        return
                elif isinstance(event, ConnectionClosed):
                    if self._failure is not None:
                        raise self._failure
                    if event.clean or self._closing:
                        return
                    if self.session is None:
                        raise PeerError(
                            self.peer,
                            "the connection closed during the handshake",
                            hint="check that the address is a vfmig agent's, and that both "
                            "sides use TLS (--tls-*) or neither",
                        )
                    if data is None:
                        raise PeerError(self.peer, f"the connection was lost ({lost})")
                    raise PeerError(self.peer, "the peer closed the connection without a Goodbye")
                elif not isinstance(event, Ping | Pong):
                    await handler(event)

    async def _on_goodbye(self, event: Goodbye) -> None:
        self._goodbye_received = True
        if event.code != "normal":
            message = f"the peer closed the link: {event.code}: {event.reason}"
            self._failure = PeerError(self.peer, message, code=event.code)
        if self.conn.state is ConnectionState.CLOSING:
            async with self._send_lock:
                try:
                    data = self.conn.data_to_send() + self.conn.send(Goodbye(code="normal"))
                except ProtocolError:
                    return
                await self._write((data,))

    async def _keepalive(self) -> None:
        config = self.conn.config
        interval = min(MAX_TICK, config.keepalive_interval / 2, config.handshake_timeout / 4)
        while self.conn.state not in (ConnectionState.ERROR, ConnectionState.CLOSED):
            try:
                self.conn.tick(trio.current_time())
            except ProtocolError as exc:
                self._failure = self._protocol_error(exc)
                await self._flush_quietly()
                await trio.aclose_forcefully(self._stream)
                return
            try:
                await self._flush()
            except PeerError as exc:
                self._failure = exc
                return
            await trio.sleep(interval)

    async def wait_established(self) -> HandshakeCompleted:
        """Wait for the handshake; the link's PeerError if it ended first."""
        await self._ready.wait()
        if self.session is None:
            raise self._failure or LinkClosed(self.peer, "the link closed during the handshake")
        return self.session

    # --- sending -------------------------------------------------------------------------

    async def send(self, event: Event, *, unless: Callable[[], bool] | None = None) -> bool:
        """Send ``event``; False if ``unless()`` (checked under the send lock) says not to.

        LinkClosed if the link can no longer send; PeerError if the write fails.
        """
        async with self._send_lock:
            if unless is not None and unless():
                return False
            self._check_open(type(event).__name__)
            try:
                data = self.conn.data_to_send() + self.conn.send(event)
            except ProtocolError as exc:
                raise self._protocol_error(exc) from None
            await self._write((data,))
        return True

    async def send_chunk(
        self,
        stream: int,
        seq: int,
        offset: int,
        raw_len: int,
        encoding: Encoding,
        payload: bytes | bytearray | memoryview,
    ) -> None:
        """Send one data chunk (the payload is written without a copy)."""
        async with self._send_lock:
            self._check_open("DataChunk")
            try:
                head = self.conn.data_to_send()
                parts = self.conn.send_data(stream, seq, offset, raw_len, encoding, payload)
            except ProtocolError as exc:
                raise self._protocol_error(exc) from None
            await self._write((head, *parts))

    async def request(self, method: str, params: dict[str, Value]) -> Value:
        """Call ``method`` on the peer and wait for its answer (RpcError, PeerError)."""
        call = _Call(method)
        call_id = next(self._ids)
        self._pending[call_id] = call
        try:
            await self.send(Request(id=call_id, method=method, params=params))
            await call.done.wait()
        finally:
            self._pending.pop(call_id, None)
        if call.error is not None:
            raise call.error
        return call.result

    async def aclose(self, reason: str = "") -> None:
        """Say Goodbye, wait a moment for the peer's, and close the transport."""
        if self._closing:
            return
        self._closing = True
        with trio.CancelScope(shield=True):
            if self.conn.state in _OPEN:
                try:
                    await self.send(Goodbye(code="normal", reason=reason))
                except PeerError:
                    pass
                else:
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await self.finished.wait()
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._stream.aclose()  # TLS: close_notify
            await trio.aclose_forcefully(self._stream)

    async def abort(self) -> None:
        """Close the transport at once, without a Goodbye (the peer sees a lost link)."""
        self._closing = True
        await trio.aclose_forcefully(self._stream)

    def local_host(self) -> str | None:
        """The local address of the underlying socket (where this host is seen by the peer)."""
        stream: object = self._stream
        while not isinstance(stream, trio.SocketStream):
            inner = getattr(stream, "transport_stream", None)
            if inner is None:
                return None
            stream = inner
        try:
            host = stream.socket.getsockname()[0]
        except OSError:
            return None
        return host if isinstance(host, str) else None

    def _check_open(self, what: str) -> None:
        if self._failure is not None:
            raise LinkClosed(self.peer, f"cannot send {what}: {self._failure.reason}")
        if self.conn.state not in _OPEN:
            raise LinkClosed(self.peer, f"cannot send {what}: the link is {self.conn.state.value}")

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self.conn.data_to_send()
            if data:
                await self._write((data,))

    async def _flush_quietly(self) -> None:
        try:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._flush()
        except PeerError:
            pass

    async def _write(self, parts: tuple[bytes | bytearray | memoryview, ...]) -> None:
        """Write under the caller's lock: shielded, with its own deadline."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self._send_timeout
            try:
                for part in parts:
                    if len(part):
                        await self._stream.send_all(part)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.conn.send_failed()
                cause = exc.__cause__ or exc
                message = f"the connection was lost while sending ({cause})"
                raise PeerError(self.peer, message) from None
        if scope.cancelled_caught:
            self.conn.send_failed()
            await trio.aclose_forcefully(self._stream)
            raise PeerError(
                self.peer, f"the peer stopped reading: a write took over {self._send_timeout:g} s"
            )

    # --- helpers -------------------------------------------------------------------------

    def _deliver(self, event: Response | ErrorResponse) -> None:
        call = self._pending.get(event.id)
        if call is None:
            return  # its caller gave up waiting
        if isinstance(event, ErrorResponse):
            call.error = RpcError(self.peer, call.method, event)
        else:
            call.result = event.result
        call.done.set()

    def _fail_pending(self, error: VfmigError) -> None:
        for call in self._pending.values():
            if not call.done.is_set():
                call.error = error
                call.done.set()

    def _protocol_error(self, exc: ProtocolError) -> PeerError:
        return PeerError(self.peer, exc.message, code=exc.code.value, hint=exc.hint)


async def with_link(
    link: Link,
    handler: Callable[[Event], Awaitable[None]],
    body: Callable[[], Awaitable[T]],
    *,
    peek: Callable[[list[Event]], None] | None = None,
    outlive: Callable[[], bool] | None = None,
) -> T:
    """Run ``link`` in the background while ``body()`` runs, once the handshake completed.

    Returns the body's result after closing the link with a Goodbye. When the link ends
    first, the body is cancelled and the link's PeerError raised (LinkClosed after a clean
    close) -- unless ``outlive()`` says, at that moment, that the body has all it needs
    (a receiver that got the whole stream goes on writing it). An exception of the body
    propagates as is (never inside an exception group), after the link is aborted.
    """
    body_scope = trio.CancelScope()
    results: list[T] = []
    error: Exception | None = None

    async def run_link() -> None:
        with contextlib.suppress(PeerError):
            await link.run(handler, peek=peek)
        if outlive is None or not outlive():
            body_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_link)
        with body_scope:
            try:
                await link.wait_established()
                results.append(await body())
            except Exception as exc:  # re-raised below, outside the nursery
                error = exc
        if results:
            await link.aclose()
        else:
            await link.abort()
        nursery.cancel_scope.cancel()
    if results:
        return results[0]
    if link.failure is not None and (error is None or isinstance(error, PeerError)):
        raise link.failure
    if error is not None:
        raise error
    raise LinkClosed(link.peer, "the peer closed the link")
