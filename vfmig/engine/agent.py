"""The per-host agent: owns its devices, serves the control RPC, streams device data.

Theory of operation
-------------------
An :class:`Agent` holds every device of its host that a migration uses. It serves each
orchestrator on a control link (:meth:`Agent.serve_control`) and runs the data streams on
data links of their own, directly agent to agent (:meth:`Agent.serve_data` accepts them);
device bytes never pass through the orchestrator. The same class serves ``vfmig agent``
over TCP and local mode inside ``vfmig migrate`` over socketpairs (:mod:`vfmig.engine.local`).

**Devices.** ``open_device`` opens a spec through :func:`vfmig.device.open.open_device`
(image=, dump= and state-dir= confined to ``--sim-dir``), behind a :class:`DeviceWorker`
that serializes every call in the device's thread. A device belongs to the orchestrator
that opened it until it is closed: another one gets ``busy``. The same orchestrator
naming a device twice gets the same handle and identity, so the phase machine refuses
the run (``same-device``) before anything changes.

**Streams.** The orchestrator asks the destination's agent for a listener
(``start_receive``: an address and a one-time ticket) and tells the source's agent to
connect (``start_send``); the ticket travels as the data sender's name in its Hello, which
the handshake authenticates with the shared key. The source (:class:`Sender`) reads
chunks of at most :data:`CHUNK_SIZE` (or MIG_DATA_SIZE if smaller) in the device's thread,
has them compressed in threads of their own (two chunks at once, while the next one is
read) and sends them in order, only while it holds credit; during precopy a read with
nothing to give is retried with a short back-off (data fds cannot be polled). The destination
(:class:`Receiver`) queues at most a window of chunks, decompresses and writes each in
order in its device's thread, and returns credit as chunks are written, so memory does not
grow with the state size. The first write error stops the stream at once (some drivers
would accept a half-written stream). Switchover: when a precopy query shows the initial
data gone, the source marks the stream offset (InitialDataSent); the destination acks once
it has written that far and tells the orchestrator.

**Losing the orchestrator.** If a control link ends while it still holds devices, the
agent waits a grace period and then applies :func:`vfmig.core.phases.agent_fallback` to
each of that run's devices, from what it knows locally and reads back. The destination's
agent is the arbiter of the commit point: it runs its devices only if the Commit reached
it, otherwise it resets them and records that it never will; a source's agent whose
streams all ended asks the destination's agent (``status`` with the run id) and keeps its
source stopped when nobody can tell (in doubt).

**Hosting runs.** With ``host_runs`` (``vfmig agent --orchestrate``) the agent also runs
whole migrations for thin clients (``migrate``, ``abort``): :mod:`vfmig.engine.hosted`.

**Restarting.** ``vfmig agent`` keeps a durable ledger (:mod:`vfmig.engine.ledger`) of the
devices each run holds here, of a source's entry into stop-copy and of its verdicts (the
destination's agent writes COMMITTED before it answers the Commit). Started again after a
crash, the agent reopens every device the ledger names before it serves anyone
(:meth:`Agent.recover`), then falls back for each run exactly as after losing its
orchestrator, with what the ledger knows: a device it had touched may be anywhere; a source
that may have sent its whole stream asks the destination's agent, and one still in doubt
stays in STOP and stays in the ledger, so the next restart asks again. ``status`` answers
from the ledger's verdicts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as _errno
import math
import os
import re
import secrets
import socket
import ssl
from collections import defaultdict, deque
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import trio
import zstandard

from vfmig.core.compression import CompressionProbe
from vfmig.core.errors import (
    DataError,
    DeviceError,
    DeviceHung,
    PeerError,
    RequestRefused,
    VfmigError,
)
from vfmig.core.events import (
    ChunkReceived,
    ChunkSent,
    ErrorRaised,
    IoctlCompleted,
    RunFinished,
    StreamEnded,
)
from vfmig.core.events import SwitchoverAcked as SwitchoverAckedEvent
from vfmig.core.fsm import DeviceState
from vfmig.core.model import (
    AskPeer,
    DeviceId,
    Emit,
    Finish,
    Outcome,
    RecordVerdict,
    Reset,
    Role,
    SetState,
    StreamPhase,
)
from vfmig.core.phases import AgentKnowledge, DeviceKnowledge, PeerAnswer, agent_fallback
from vfmig.core.spec import parse_spec
from vfmig.device.open import open_device
from vfmig.engine import wire
from vfmig.engine.hosted import HostedError, HostedRuns
from vfmig.engine.ledger import LedgerDevice, public_spec
from vfmig.engine.link import INPROC, Link, LinkClosed, connect, protocol_config, with_link
from vfmig.engine.wire import Code, Fact, FactKind, Progress, Verdict
from vfmig.engine.worker import ENCODERS, DeviceWorker, ReadResult, thread_executor
from vfmig.journal import parts
from vfmig.protocol import (
    AbortStream,
    Connection,
    Credit,
    DataChunk,
    Encoding,
    EndOfStream,
    ErrorResponse,
    InitialDataSent,
    Notification,
    ProtocolError,
    Request,
    Response,
    SwitchoverAck,
    make_compressor,
    make_decompressor,
)
from vfmig.protocol import Event as LinkEvent
from vfmig.protocol import Role as LinkRole
from vfmig.protocol import StreamEnded as LinkStreamEnded

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from vfmig.core.events import Event as RunEvent
    from vfmig.core.spec import DeviceSpec
    from vfmig.device.backend import MigrationDevice, PrecopyInfo
    from vfmig.engine.ledger import Ledger
    from vfmig.engine.worker import Executor
    from vfmig.journal.runs import AgentJournal
    from vfmig.journal.store import JournalStore
    from vfmig.protocol import Event, Value

#: Largest chunk read from a data fd. QEMU reads 1 MiB; 2 MiB cut the agents' CPU per byte
#: by ~15% (fewer chunks, notices and frames per byte); 4 MiB gained no more and added
#: ~45 MiB of peak RSS to a local migration. The journal splits the data it taps into
#: 1 MiB records.
CHUNK_SIZE: Final = 2 << 20
#: Chunks the destination lets be in flight per stream (its credit window).
WINDOW_CHUNKS: Final = 4
#: Chunks a sender reads and encodes ahead of the one it is sending.
READ_AHEAD: Final = 2
#: A sender reports its stream's progress at most this often (seconds), and at its end.
PROGRESS_INTERVAL: Final = 0.05
#: A precopy read that found nothing is retried after this long, doubling up to MAX_POLL.
MIN_POLL: Final = 0.002
MAX_POLL: Final = 0.05
#: Notifications queued towards one orchestrator before the data path waits for it.
NOTIFY_CAPACITY: Final = 256
#: Chunk progress waits at most this long (seconds) for more notices to share a frame.
NOTIFY_LINGER: Final = 0.02
#: Most notices in one batch (a few KiB: far below the protocol's frame and array limits).
NOTIFY_BATCH: Final = 64
#: A source's agent asks the destination's agent for this long before calling it in doubt.
ASK_PEER_FOR: Final = 10.0
ASK_PEER_EVERY: Final = 0.2
#: Fallback rounds per run: each round is one step per device; a few always suffice.
MAX_FALLBACK_ROUNDS: Final = 16
_ROLE_NAMES: Final = {Role.SOURCE: "source", Role.DESTINATION: "destination"}


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """How an agent behaves. ``key`` authenticates TCP links (None: in-process use only)."""

    name: str
    key: bytes | None
    sim_dir: Path | None = None
    #: Devices this agent may open, as ``KIND:NAME``; None allows every device.
    allow: frozenset[str] | None = None
    #: Default for a device step (ioctl, data read or write) before it counts as hung.
    step_timeout: float = 30.0
    #: How long to wait after losing the orchestrator before falling back alone.
    grace: float = 2.0
    #: How long a source's agent keeps asking the destination's agent about the commit
    #: point (while it is undecided or unreachable) before keeping its source stopped.
    ask_peer_for: float = ASK_PEER_FOR
    chunk_size: int = CHUNK_SIZE
    window_chunks: int = WINDOW_CHUNKS
    #: TLS for TCP links this agent accepts (server) and makes (client); None: plain TCP.
    server_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext | None = None
    executor: Executor = thread_executor
    log: Callable[[str], None] = lambda line: None
    #: This agent's own journals of the runs it serves (``vfmig agent --journal-dir``).
    journal: AgentJournal | None = None
    #: The durable record of the runs it serves (``vfmig agent --state-file``).
    ledger: Ledger | None = None
    #: Host runs for thin clients (``vfmig agent --orchestrate``), journaled into this
    #: store; None refuses ``migrate`` (:mod:`vfmig.engine.hosted`).
    host_runs: JournalStore | None = None
    #: The journal store whose finished journals ``fetch_journal`` serves (the store of
    #: ``journal`` and ``host_runs``); None serves none.
    journal_store: JournalStore | None = None
    #: This host's identity (``status``), for a client that hosts runs here only when it
    #: runs on the same machine (:func:`vfmig.cli.agent_client.this_machine`).
    machine: str | None = None


# --- state ------------------------------------------------------------------------------------


class ControlSession:
    """One orchestrator's control link, and its queue of notifications."""

    def __init__(self, link: Link, peer: str) -> None:
        self.link = link
        self.peer = peer
        self.subscribed = False
        self._send, self._receive = trio.open_memory_channel[dict[str, "Value"]](NOTIFY_CAPACITY)

    async def notify(self, payload: dict[str, Value]) -> None:
        if not self.subscribed:
            return
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._send.send(payload)

    def offer(self, payload: dict[str, Value]) -> None:
        """Queue ``payload`` if there is room: for a watcher that must never wait (a slow
        client of a hosted run skips notices, the run goes on)."""
        if not self.subscribed:
            return
        with contextlib.suppress(
            trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            self._send.send_nowait(payload)

    async def pump(self) -> None:
        """Send queued notifications until the session ends. Chunk progress waits up to
        NOTIFY_LINGER for more to share its frame, folded (:func:`wire.coalesce`): the
        longer the link is busy, the more a frame folds. Anything else goes out at once."""
        async with self._receive:
            async for payload in self._receive:
                batch = [payload]
                ended = False
                if wire.deferrable(payload):
                    with trio.move_on_after(NOTIFY_LINGER):
                        while len(batch) < NOTIFY_BATCH and wire.deferrable(batch[-1]):
                            try:
                                batch.append(await self._receive.receive())
                            except trio.EndOfChannel:
                                ended = True
                                break
                batch = wire.coalesce(batch)
                message = batch[0] if len(batch) == 1 else wire.batch_notice(batch)
                try:
                    await self.link.send(Notification(payload=message))
                except PeerError:
                    return
                if ended:
                    return

    def end(self) -> None:
        self._send.close()


@dataclass(eq=False, slots=True)
class Run:
    """What this agent knows of one run (by the orchestrator's run id)."""

    id: str
    owner: ControlSession | None
    slots: list[Slot] = field(default_factory=list)
    committed: bool = False
    #: Recorded by a rollback or a fallback: False is final, the run never starts here.
    verdict: bool | None = None
    #: Found in the ledger when this agent started: what it does is a restart's recovery.
    restored: bool = False

    def answer(self) -> Verdict:
        if self.committed:
            return Verdict.COMMITTED
        if self.verdict is False:
            return Verdict.NOT_COMMITTED
        return Verdict.UNDECIDED


@dataclass(eq=False, slots=True)
class Slot:
    """One open device."""

    handle: str
    spec: DeviceSpec
    worker: DeviceWorker
    identity: str
    owner: ControlSession | None
    run: Run | None
    ids: list[DeviceId]
    refs: int = 1
    touched: bool = False
    sender: Sender | None = None
    receiver: Receiver | None = None
    #: The destination agent's control address, to ask it about the commit point.
    peer_control: str | None = None
    stream_complete: bool = False
    fallback_failed: bool = False
    fallback_reset: bool = False
    #: Ioctls completed in the device's thread, not yet sent as IoctlCompleted.
    ioctls: deque[IoctlCompleted] = field(default_factory=deque)

    @property
    def device_id(self) -> DeviceId:
        return self.ids[0]


@dataclass(slots=True)
class _Ticket:
    slot: Slot
    stream: int


# --- the agent --------------------------------------------------------------------------------


class Agent:
    """See the module docstring. Start with ``await nursery.start(agent.run)``."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{config.name}"
        self.slots: dict[str, Slot] = {}
        self.runs: dict[str, Run] = {}
        self._tickets: dict[str, _Ticket] = {}
        self._opening: dict[str, trio.Event] = {}
        self._sessions: set[ControlSession] = set()
        self._links: set[Link] = set()
        self._nursery: trio.Nursery | None = None
        #: ``HOST:PORT`` of this agent's TCP data listener, if it has one.
        self.data_host: str | None = None
        self.data_port: int | None = None
        #: Opens a TCP data listener on a host on demand (local mode, remote sources).
        self._bind: Callable[[str], Awaitable[tuple[str, int]]] | None = None
        self._fallbacks: dict[str, trio.Event] = {}  #: run id -> set when its fallback ended
        self._graces: dict[str, trio.CancelScope] = {}
        self._changed = trio.Event()
        self.stopping = False
        self._hosted = None if config.host_runs is None else HostedRuns(self, config.host_runs)

    def log(self, line: str) -> None:
        self.config.log(line)

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "the agent is not running (nursery.start(agent.run))"
        return self._nursery

    async def run(self, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the agent's background tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await trio.sleep_forever()

    # --- connections ----------------------------------------------------------------------

    async def serve_control(self, stream: trio.abc.Stream, *, peer: str, key: bytes | None) -> None:
        """Serve one orchestrator on ``stream`` until the link ends."""
        conn = Connection(LinkRole.AGENT, protocol_config(key), name=self.config.name)
        link = Link(stream, conn, peer=f"orchestrator {peer}")
        session = ControlSession(link, peer)
        self._links.add(link)
        self._sessions.add(session)
        self.nursery.start_soon(session.pump)

        async def handle(event: Event) -> None:
            if isinstance(event, Request):
                self.nursery.start_soon(self._serve_request, session, event)

        async def body() -> None:
            assert link.session is not None
            self.log(f"orchestrator {peer} connected ({link.session.peer_name})")
            await link.finished.wait()

        try:
            await with_link(link, handle, body)
        except PeerError:
            pass
        finally:
            failure = link.failure
            self.log(
                f"orchestrator {peer}: {failure.reason}" if failure else f"orchestrator {peer} left"
            )
            self._links.discard(link)
            self._sessions.discard(session)
            session.end()
            self._session_ended(session)
            self.changed()

    async def serve_data(self, stream: trio.abc.Stream, *, peer: str, key: bytes | None) -> None:
        """Accept one data link on ``stream``: a source agent streaming to a ticket of ours."""
        conn = Connection(LinkRole.DATA_RECEIVER, protocol_config(key), name=self.config.name)
        link = Link(stream, conn, peer=f"data sender {peer}")
        receiver: list[Receiver] = []

        async def handle(event: Event) -> None:
            if receiver:
                await receiver[0].on_event(event)

        def peek(events: list[Event]) -> None:
            if receiver:
                receiver[0].peek(events)

        async def body() -> None:
            assert link.session is not None
            ticket = self._tickets.pop(link.session.peer_name, None)
            if ticket is None:
                self.log(f"data sender {peer}: unknown or used ticket; closing")
                return
            r = Receiver(self, ticket.slot, link, ticket.stream)
            ticket.slot.receiver = r
            receiver.append(r)
            await r.run()

        self._links.add(link)
        try:
            await with_link(
                link, handle, body, peek=peek, outlive=lambda: bool(receiver) and receiver[0].ended
            )
        except PeerError as exc:
            if receiver:
                await receiver[0].link_failed(exc)
            else:
                self.log(f"data sender {peer}: {exc.reason}")
        except (DeviceError, ProtocolError) as exc:
            if receiver:
                await receiver[0].device_failed(exc)
            else:
                raise
        finally:
            self._links.discard(link)
            if receiver and receiver[0].slot.receiver is receiver[0]:
                receiver[0].slot.receiver = None

    def use_tcp_data(self, host: str | None, port: int) -> None:
        """This agent's data listener (``vfmig agent``): sources connect there."""
        self.data_host, self.data_port = host, port

    def use_data_binder(self, bind: Callable[[str], Awaitable[tuple[str, int]]]) -> None:
        """Local mode: open a TCP data listener on a given host when a remote source needs one."""
        self._bind = bind

    async def dial(self, address: str) -> tuple[trio.abc.Stream, bytes | None]:
        """A stream to a destination's data listener, and the key the link uses."""
        if address == INPROC:
            ours, theirs = trio.socket.socketpair()
            self.nursery.start_soon(
                partial(self.serve_data, trio.SocketStream(theirs), peer="in-process", key=None)
            )
            return trio.SocketStream(ours), None
        if self.config.key is None:
            raise PeerError(address, "a TCP data link needs a shared key (--key-file)")
        stream = await connect(address, ssl_context=self.config.client_ssl, what="data listener")
        return stream, self.config.key

    async def abort_connections(self) -> None:
        """Drop every link at once, without a Goodbye (peers see the links lost)."""
        for link in tuple(self._links):
            await link.abort()

    # --- requests -------------------------------------------------------------------------

    async def _serve_request(self, session: ControlSession, request: Request) -> None:
        response: Response | ErrorResponse
        try:
            result = await self._dispatch(session, request.method, request.params)
            response = Response(id=request.id, result=result)
        except VfmigError as exc:
            response = _error_response(request.id, exc)
        except wire.WireError as exc:
            response = ErrorResponse(id=request.id, code=Code.BAD_PARAMS, message=str(exc))
        except Exception as exc:  # a bug must fail this request, not the whole agent
            self.log(f"internal error serving {request.method}: {type(exc).__name__}: {exc}")
            message = f"internal error: {type(exc).__name__}: {exc}"
            response = ErrorResponse(id=request.id, code=Code.FAILED, message=message)
        with contextlib.suppress(PeerError):
            await session.link.send(response)
        if request.method == "migrate" and self._hosted is not None:
            self._hosted.answered(session)  # the run's journal merge, now the answer is out

    async def _dispatch(
        self, session: ControlSession, method: str, params: dict[str, Value]
    ) -> Value:
        if method == "open_device":
            return await self._open(session, params)
        if method == "status":
            return self._status(params)
        if method == "subscribe":
            session.subscribed = True
            return None
        if method == "commit":
            return await self._commit(session, _param(params, "run", str))
        if method == "journal":
            return await self._journal_part(session, params)
        if method == "fetch_journal":
            return await self._fetch_journal(params)
        if method in ("migrate", "abort"):
            return await self._host(session, method, params)
        handler = _DEVICE_METHODS.get(method)
        if handler is None:
            raise _AgentError(Code.UNKNOWN_METHOD, f"this agent does not serve {method!r}")
        slot = self._slot(session, _param(params, "device", str))
        try:
            return await handler(self, slot, params)
        finally:
            await self._flush_ioctls(slot)

    async def _host(self, session: ControlSession, method: str, params: dict[str, Value]) -> Value:
        if self._hosted is None:
            raise _AgentError(Code.UNKNOWN_METHOD, "this agent does not orchestrate runs")
        if self.stopping:
            raise _AgentError(Code.REFUSED, "the agent is shutting down")
        try:
            if method == "migrate":
                return await self._hosted.migrate(session, params)
            signal = params.get("signal")
            if not isinstance(signal, str):
                return await self._hosted.abort(session, "aborted by its client", None)
            return await self._hosted.abort(session, "interrupted by the user", signal)
        except HostedError as exc:
            raise _AgentError(Code.BAD_PARAMS, exc.message) from None

    def _slot(self, session: ControlSession, handle: str) -> Slot:
        slot = self.slots.get(handle)
        if slot is None or slot.owner is not session:
            raise _AgentError(Code.UNKNOWN_DEVICE, f"{handle} is not open for this orchestrator")
        return slot

    async def _open(self, session: ControlSession, params: dict[str, Value]) -> Value:
        text = _param(params, "device", str)
        options = params.get("options") or {}
        if not isinstance(options, dict):
            raise _AgentError(Code.BAD_PARAMS, "options must be a map")
        run_id = _param(options, "run", str)
        dev_id = _device_id(_param(options, "id", str))
        step_timeout = _timeout(params, None) or self.config.step_timeout
        try:
            spec = parse_spec(text)
        except VfmigError as exc:
            raise _AgentError(Code.BAD_SPEC, exc.message) from None
        handle = f"{spec.kind}:{spec.name}"
        if self.config.allow is not None and handle not in self.config.allow:
            raise _AgentError(
                Code.NOT_ALLOWED,
                f"{handle}: this agent may not open it (not in its --allow list)",
                device=handle,
            )
        if self.stopping:
            raise _AgentError(Code.BUSY, "the agent is shutting down", device=handle)
        if options.get("journal_data") is True:  # vfmig migrate --journal-data
            if self.config.journal is None and dev_id.role is Role.DESTINATION:
                raise _AgentError(
                    Code.REFUSED,
                    f"{handle}: this agent keeps no journal (vfmig agent --no-journal), so it "
                    "cannot capture the stream for --journal-data",
                    device=handle,
                )
            if self.config.journal is not None:
                self.config.journal.capture(run_id)
        run = self.runs.get(run_id)
        if run is None:
            run = self.runs[run_id] = Run(run_id, session)
        while handle in self._opening:  # the same device named twice: wait for the first open
            await self._opening[handle].wait()
        slot = self.slots.get(handle)
        if slot is not None:
            if slot.owner is not session:
                who = slot.owner.peer if slot.owner is not None else "a finished run"
                raise _AgentError(
                    Code.BUSY,
                    f"{handle}: device busy: another migration holds it (orchestrator {who})",
                    errno=_errno.EBUSY,
                    device=handle,
                )
            slot.refs += 1
            slot.ids.append(dev_id)
        else:
            opening = self._opening[handle] = trio.Event()
            try:
                device = await _open_in_thread(spec, self.config.sim_dir, step_timeout)
            finally:
                del self._opening[handle]
                opening.set()
            worker = DeviceWorker(
                device, label=handle, step_timeout=step_timeout, executor=self.config.executor
            )
            slot = Slot(handle, spec, worker, f"{handle}@{self.identity}", session, run, [dev_id])
            device.observer = partial(_observe, slot)
            self.slots[handle] = slot
            run.slots.append(slot)
            self.log(f"opened {handle} as {dev_id} of run {run_id}")
            if self.config.ledger is not None:
                entry = LedgerDevice(handle, public_spec(spec), dev_id.role, (str(dev_id),))
                await self.config.ledger.open_device(run_id, entry)
        worker = slot.worker
        state = await worker.get_state()
        started = trio.current_time()
        reading = await worker.read_debugfs_state()
        debugfs = None
        if reading is not None:
            debugfs = wire.DebugfsSample(
                state=reading.state,
                text=reading.raw,
                duration_ns=int((trio.current_time() - started) * 1e9),
            )
        try:
            size: int | None = await worker.data_size()
        except DeviceError:
            size = None
        await self._flush_ioctls(slot)
        return wire.opened_result(
            wire.Opened(
                handle=handle,
                identity=slot.identity,
                flags=worker.device.flags,
                state=state,
                data_size=size,
                debugfs=debugfs,
            )
        )

    async def _close(self, slot: Slot, params: dict[str, Value]) -> Value:
        slot.refs -= 1
        if slot.refs > 0:
            return None
        await self._release(slot)
        run = slot.run
        if run is not None and not any(s in self.slots.values() for s in run.slots):
            if not run.committed and run.verdict is None:
                run.verdict = False  # closed without a Commit: final, never started here
            self.log(f"run {run.id} ended ({run.answer().value})")
            await self._ledger_end(run, set())
            if self.config.journal is not None:
                await self.config.journal.end(run.id)
        return None

    async def wait_idle(self) -> None:
        """Wait until this agent holds no device, serves no orchestrator and merges no
        hosted run's journal."""
        while self.slots or self._sessions or (self._hosted and self._hosted.merging):
            await self._changed.wait()

    def changed(self) -> None:
        """Wake :meth:`wait_idle` (something it waits for may have ended)."""
        self._changed.set()
        self._changed = trio.Event()

    async def _release(self, slot: Slot) -> None:
        await self._stop_streams(slot)
        self.slots.pop(slot.handle, None)
        self.changed()
        try:
            await slot.worker.close()
        except VfmigError as exc:
            self.log(f"closing {slot.handle}: {exc}")
        self.log(f"closed {slot.handle}")

    async def _get_state(self, slot: Slot, params: dict[str, Value]) -> Value:
        return int(await slot.worker.get_state())

    async def _set_state(self, slot: Slot, params: dict[str, Value]) -> Value:
        target = _param(params, "state", int)
        try:
            state = DeviceState(target)
        except ValueError:
            raise _AgentError(Code.BAD_PARAMS, f"{target} is not a device state") from None
        hang_after = _timeout(params, slot.worker.step_timeout)
        step = params.get("step")
        slot.touched = True
        result = await slot.worker.set_state(
            state,
            step=step if isinstance(step, str) else f"SET {state.name}",
            hang_after=hang_after,
        )
        answer = wire.SetAnswer(
            ok=result.ok, state=result.state, errno=result.errno, message=result.message
        )
        return wire.set_result(answer)

    async def _reset(self, slot: Slot, params: dict[str, Value]) -> Value:
        slot.touched = True
        await self._stop_streams(slot)
        await slot.worker.reset(hang_after=_timeout(params, None))
        return None

    async def _precopy(self, slot: Slot, params: dict[str, Value]) -> Value:
        sender = slot.sender
        info = await slot.worker.precopy_info(then=sender.note_precopy if sender else None)
        return wire.precopy_result(info.initial_bytes, info.dirty_bytes, info.reinit)

    async def _data_size(self, slot: Slot, params: dict[str, Value]) -> Value:
        return await slot.worker.data_size()

    async def _start_receive(self, slot: Slot, params: dict[str, Value]) -> Value:
        stream = _param(params, "stream", int)
        bind = params.get("bind")
        ticket = f"ticket-{secrets.token_hex(16)}"
        if isinstance(bind, str) and self._bind is not None:
            host, port = await self._bind(bind)
            listener = wire.Listener(host=host, port=port, ticket=ticket)
        elif self.data_port is not None:
            listener = wire.Listener(host=self.data_host, port=self.data_port, ticket=ticket)
        else:
            listener = wire.Listener(host=INPROC, port=0, ticket=ticket)
        self._tickets[ticket] = _Ticket(slot, stream)
        self.log(f"{slot.handle}: waiting for stream {stream}")
        return wire.listener_result(listener)

    async def _start_send(self, slot: Slot, params: dict[str, Value]) -> Value:
        stream = _param(params, "stream", int)
        try:
            phase = StreamPhase(_param(params, "phase", str))
        except ValueError:
            raise _AgentError(Code.BAD_PARAMS, "phase must be precopy or stopcopy") from None
        sender = slot.sender
        if sender is not None and sender.stream == stream:
            await self._ledger_stopcopy(slot, phase)
            sender.switch(phase)
            return None
        peer = _param(params, "peer", str)
        ticket = _param(params, "ticket", str)
        level = params.get("level")
        if level is not None and type(level) is not int:
            raise _AgentError(Code.BAD_PARAMS, "level must be an int or nil")
        peer_control = params.get("peer_control")
        slot.peer_control = peer_control if isinstance(peer_control, str) else None
        slot.stream_complete = False
        await self._ledger_stopcopy(slot, phase)
        sender = Sender(self, slot, stream, peer, ticket, phase, level)
        slot.sender = sender
        self.nursery.start_soon(sender.run)
        return None

    async def _stop_stream(self, slot: Slot, params: dict[str, Value]) -> Value:
        await self._stop_streams(slot)
        return None

    async def _stop_streams(self, slot: Slot) -> None:
        for ticket, pending in tuple(self._tickets.items()):
            if pending.slot is slot:
                del self._tickets[ticket]
        if slot.sender is not None:
            await slot.sender.stop()
        if slot.receiver is not None:
            await slot.receiver.stop()

    async def _ledger_stopcopy(self, slot: Slot, phase: StreamPhase) -> None:
        """Before a stop-copy stream starts: from now on it may reach its end."""
        ledger = self.config.ledger
        if ledger is not None and phase is StreamPhase.STOPCOPY and slot.run is not None:
            await ledger.stopcopy(slot.run.id, slot.handle, slot.peer_control)

    async def _ledger_end(self, run: Run, keep: set[str]) -> None:
        """The run's devices released but ``keep``; its verdict, if it has one, recorded."""
        if self.config.ledger is not None:
            answer = run.answer()
            verdict = None if answer is Verdict.UNDECIDED else answer is Verdict.COMMITTED
            await self.config.ledger.keep_only(run.id, keep, verdict)

    async def _commit(self, session: ControlSession, run_id: str) -> Value:
        run = self.runs.get(run_id)
        if run is None or run.owner is not session:
            raise _AgentError(Code.UNKNOWN_DEVICE, f"run {run_id} holds no device here")
        if run.verdict is False:
            raise _AgentError(
                Code.DECIDED, f"run {run_id} was already rolled back here: it never starts"
            )
        if self.config.ledger is not None:  # durable before the answer
            await self.config.ledger.verdict(run_id, True)
        run.committed = True
        self.log(f"run {run_id} committed")
        return None

    async def _journal_part(self, session: ControlSession, params: dict[str, Value]) -> Value:
        """Bytes of this agent's journal of a run the session's orchestrator ran, from
        ``offset``; the journal is ended first (the run's devices must be closed)."""
        run_id = _param(params, "run", str)
        offset = _param(params, "offset", int)
        run = self.runs.get(run_id)
        if run is None or run.owner is not session:
            raise _AgentError(Code.UNKNOWN_DEVICE, f"run {run_id} is not this orchestrator's here")
        if any(self.slots.get(s.handle) is s for s in run.slots):
            raise _AgentError(
                Code.BUSY, f"run {run_id} still holds devices here: its journal is still open"
            )
        journal = self.config.journal
        if journal is None:
            raise _AgentError(Code.FAILED, "this agent keeps no journal (vfmig agent --no-journal)")
        path = await journal.closed(run_id)  # a JournalError is answered as failed
        return parts.to_wire(await trio.to_thread.run_sync(_read_journal, path, offset))

    async def _fetch_journal(self, params: dict[str, Value]) -> Value:
        """Bytes of a finished journal of this agent's store, from ``offset``: the
        newest one ``role`` (orchestrator: a hosted run's; agent: this agent's side)
        wrote for ``run``, to any authenticated peer (``vfmig journal fetch``)."""
        run_id = _param(params, "run", str)
        offset = _param(params, "offset", int)
        role = params.get("role") or "orchestrator"
        if role not in parts.ROLES:
            raise _AgentError(Code.BAD_PARAMS, f"role must be orchestrator or agent, not {role!r}")
        if not _RUN_ID.fullmatch(run_id):
            raise _AgentError(Code.BAD_PARAMS, f"{run_id!r} is not a run id")
        store = self.config.journal_store
        if store is None:
            raise _AgentError(Code.NOT_FOUND, "this agent keeps no journals (--no-journal)")
        run = self.runs.get(run_id)
        held = run is not None and any(self.slots.get(s.handle) is s for s in run.slots)
        if held or (self._hosted is not None and self._hosted.running(run_id)):
            raise _AgentError(
                Code.BUSY, f"run {run_id} is in progress here: its journal is not finished"
            )
        if role == "agent" and self.config.journal is not None:
            await self.config.journal.end(run_id)  # an ended run's journal still open: close it
        if self._hosted is not None and not await self._hosted.settled(run_id):
            raise _AgentError(Code.BUSY, f"the journal of run {run_id} is still being merged")
        path = await trio.to_thread.run_sync(store.find, run_id, str(role))
        if path is None:
            raise _AgentError(
                Code.NOT_FOUND, f"no {role} journal of run {run_id} in {store.directory}"
            )
        return parts.to_wire(await trio.to_thread.run_sync(_read_journal, path, offset))

    def _status(self, params: dict[str, Value]) -> Value:
        devices: list[Value] = [
            {
                "handle": slot.handle,
                "spec": str(slot.spec),
                "ids": [str(i) for i in slot.ids],
                "run": slot.run.id if slot.run else None,
                "streaming": slot.sender is not None or slot.receiver is not None,
            }
            for slot in self.slots.values()
        ]
        runs: dict[str, Value] = {}
        wanted = params.get("run")
        for run in self.runs.values():
            if wanted is None or run.id == wanted:
                runs[run.id] = {"verdict": run.answer().value}
        return {
            "agent": self.config.name,
            "devices": devices,
            "runs": runs,
            "machine": self.config.machine,
            "orchestrates": self._hosted is not None,
        }

    # --- notifications ----------------------------------------------------------------------

    async def notify(self, slot: Slot, payload: dict[str, Value]) -> None:
        await self._flush_ioctls(slot)
        await self._send_notice(slot, payload)

    async def notify_event(self, slot: Slot, event: RunEvent) -> None:
        """``event`` to the orchestrator and the journal, after the ioctls that came first."""
        await self._flush_ioctls(slot)
        await self._send_event(slot, event)

    async def _send_event(self, slot: Slot, event: RunEvent) -> None:
        run = slot.run.id if slot.run is not None else ""
        await self._send_notice(slot, wire.event_notice(run, event), event)

    async def _send_notice(
        self, slot: Slot, payload: dict[str, Value], event: RunEvent | None = None
    ) -> None:
        journal = self.config.journal
        if journal is not None and slot.run is not None and event is not None:
            devices = [(i, str(s.spec)) for s in slot.run.slots for i in s.ids]
            await journal.notice(slot.run.id, devices, event)
        if slot.owner is not None:
            await slot.owner.notify(payload)

    async def _journal_fallback(self, run: Run, slots: list[Slot], event: RunEvent) -> None:
        """Journal what a fallback decided, after the ioctls that led there."""
        for slot in slots:
            await self._flush_ioctls(slot)
        if slots:
            await self._send_event(slots[0], event)

    async def _flush_ioctls(self, slot: Slot) -> None:
        """Send the ioctls the device's thread completed, in order, before anything newer."""
        while slot.ioctls:
            await self._send_event(slot, slot.ioctls.popleft())

    # --- losing the orchestrator --------------------------------------------------------------

    def _session_ended(self, session: ControlSession) -> None:
        if self._hosted is not None:
            self._hosted.session_ended(session)
        for run in self.runs.values():
            if run.owner is session and any(s in self.slots.values() for s in run.slots):
                grace = self.config.grace
                self.log(f"lost the orchestrator of run {run.id}; falling back in {grace:g} s")
                self.nursery.start_soon(self.fall_back, run, self.config.grace)

    async def fall_back(self, run: Run, grace: float) -> None:
        """Bring ``run``'s devices to rest by the failure policy, without an orchestrator.

        Waits ``grace`` seconds first; a second call (a shutdown) with no grace cuts a
        waiting one short, and returns when the fallback has ended.
        """
        done = self._fallbacks.get(run.id)
        if done is not None:
            if grace <= 0 and run.id in self._graces:
                self._graces[run.id].cancel()
            await done.wait()
            return
        done = self._fallbacks[run.id] = trio.Event()
        try:
            with trio.CancelScope() as waiting:
                self._graces[run.id] = waiting
                await trio.sleep(grace)
            del self._graces[run.id]
            await self._fall_back(run)
        finally:
            done.set()

    async def _fall_back(self, run: Run, keep: frozenset[str] = frozenset()) -> None:
        """The fallback proper; ``keep``: devices the ledger keeps whatever happens (a
        restarted agent could not reopen them)."""
        slots = [s for s in run.slots if self.slots.get(s.handle) is s]
        for slot in slots:
            await self._stop_streams(slot)
        destinations = [s for s in slots if s.device_id.role is Role.DESTINATION]
        sources = [s for s in slots if s.device_id.role is Role.SOURCE]
        unsettled: set[str] = set(keep)
        if destinations:
            outcome = await self._fallback_group(run, Role.DESTINATION, destinations, None)
            if outcome is None:
                unsettled.update(s.handle for s in destinations)
        by_peer: dict[str | None, list[Slot]] = defaultdict(list)
        for slot in sources:
            by_peer[slot.peer_control].append(slot)
        for peer, group in by_peer.items():
            outcome = await self._fallback_group(run, Role.SOURCE, group, peer)
            if outcome is None or outcome is Outcome.IN_DOUBT:
                unsettled.update(s.handle for s in group)
            if outcome is Outcome.IN_DOUBT:
                names = " ".join(s.handle for s in group)
                self.log(
                    f"run {run.id} IN DOUBT: {names} kept in STOP: the destination's agent "
                    f"({peer or 'unknown'}) cannot tell whether the run committed; once you "
                    f"know the destination does not run, bring it back with: vfmig recover "
                    f"{names}"
                    + ("; a restart of this agent asks again" if self.config.ledger else "")
                )
        await self._ledger_end(run, unsettled)  # the devices are where they stay
        for slot in slots:
            await self._flush_ioctls(slot)
            if self.config.ledger is not None:
                await self._log_left(run, slot)
            slot.owner = None
            await self._release(slot)
        run.owner = None
        if self.config.journal is not None:
            await self.config.journal.end(run.id)

    async def _log_left(self, run: Run, slot: Slot) -> None:
        state = await _state_name(slot.worker)
        role = _ROLE_NAMES[slot.device_id.role]
        self.log(f"{slot.handle}: {role} of run {run.id} left in {state}")

    async def _fallback_group(
        self, run: Run, role: Role, slots: list[Slot], peer: str | None
    ) -> Outcome | None:
        """Apply the failure policy to ``slots``; the outcome (None: it did not settle)."""
        answer = PeerAnswer.NOT_ASKED
        for _ in range(MAX_FALLBACK_ROUNDS):
            live = [s for s in slots if s.worker.hung is None]
            knowledge = AgentKnowledge(
                role=role,
                devices=tuple([await self._knowledge(s) for s in live]),
                committed=run.committed,
                stream_complete=bool(live) and all(s.stream_complete for s in live),
                peer=answer,
                step_timeout_ns=int(self.config.step_timeout * 1e9),
                restarted=run.restored,
            )
            by_id = {s.device_id: s for s in live}
            for action in agent_fallback(knowledge):
                if isinstance(action, SetState):
                    slot = by_id[action.dev]
                    try:
                        result = await slot.worker.set_state(action.target, step=action.arc)
                    except VfmigError as exc:
                        self.log(f"{slot.handle}: {exc}")
                        slot.fallback_failed = True
                        continue
                    if not result.ok:
                        slot.fallback_failed = True
                    self.log(
                        f"{slot.handle}: {action.arc} "
                        + ("done" if result.ok else f"failed: {result.message}")
                    )
                elif isinstance(action, Reset):
                    slot = by_id[action.dev]
                    slot.fallback_reset = True
                    try:
                        await slot.worker.reset()
                        self.log(f"{slot.handle}: reset")
                    except VfmigError as exc:
                        self.log(f"{slot.handle}: reset failed: {exc}")
                elif isinstance(action, AskPeer):
                    answer = await self._ask_peer(run, peer)
                    self.log(f"run {run.id}: the destination's agent says {answer.value}")
                elif isinstance(action, RecordVerdict):
                    run.verdict = action.committed
                    if self.config.ledger is not None:
                        await self.config.ledger.verdict(run.id, action.committed)
                elif isinstance(action, Emit):
                    event = action.event
                    await self._journal_fallback(run, slots, event)
                    if isinstance(event, ErrorRaised | RunFinished):
                        text = event.summary if isinstance(event, RunFinished) else event.message
                        self.log(f"run {run.id}: {text}")
                elif isinstance(action, Finish):
                    return action.outcome
        self.log(f"run {run.id}: the fallback did not settle; devices left as they are")
        return None

    async def _knowledge(self, slot: Slot) -> DeviceKnowledge:
        try:
            state: DeviceState | None = await slot.worker.get_state()
        except VfmigError:
            state = None
        return DeviceKnowledge(
            dev=slot.device_id,
            flags=slot.worker.device.flags,
            state=state,
            touched=slot.touched,
            failed=slot.fallback_failed,
            reset_done=slot.fallback_reset,
        )

    async def _ask_peer(self, run: Run, peer: str | None) -> PeerAnswer:
        """Whether the run committed, from the destination's agent (retrying while undecided)."""
        if peer is None:
            return PeerAnswer.UNREACHABLE
        with trio.move_on_after(self.config.ask_peer_for):
            while True:
                local = self.runs.get(run.id) if peer == INPROC else None
                verdict = local.answer() if local is not None else await self._query(peer, run.id)
                if verdict is Verdict.COMMITTED:
                    return PeerAnswer.COMMITTED
                if verdict is Verdict.NOT_COMMITTED:
                    return PeerAnswer.NOT_COMMITTED
                await trio.sleep(ASK_PEER_EVERY)
        return PeerAnswer.UNREACHABLE

    async def _query(self, address: str, run_id: str) -> Verdict | None:
        if self.config.key is None:
            return None
        try:
            stream = await connect(address, ssl_context=self.config.client_ssl)
        except PeerError:
            return None
        config = protocol_config(self.config.key)
        conn = Connection(LinkRole.ORCHESTRATOR, config, name=self.config.name)
        link = Link(stream, conn, peer=f"agent {address}")

        async def ignore(event: Event) -> None:
            pass

        async def ask() -> Verdict:
            return wire.parse_verdict(await link.request("status", {"run": run_id}), run_id)

        try:
            return await with_link(link, ignore, ask)
        except (VfmigError, wire.WireError):
            return None

    # --- restarting ---------------------------------------------------------------------------

    async def recover(self) -> None:
        """On start, before serving: reopen the devices the ledger says runs held here, and
        bring them back by the failure policy in the background (a source may wait for its
        destination's agent, which may be restarting too and must be able to answer)."""
        ledger = self.config.ledger
        if ledger is None:
            return
        for run_id, committed in ledger.state.verdicts.items():
            self.runs[run_id] = Run(run_id, None, committed=committed, verdict=committed)
        for run_id, devices in tuple(ledger.state.runs.items()):
            run = self.runs.setdefault(run_id, Run(run_id, None))
            run.restored = True
            unopened: set[str] = set()
            for entry in devices:
                if not await self._reopen(run, entry):
                    unopened.add(entry.handle)
            self.nursery.start_soon(self._recover_run, run, frozenset(unopened))

    async def _reopen(self, run: Run, entry: LedgerDevice) -> bool:
        step_timeout = self.config.step_timeout
        try:
            spec = parse_spec(entry.spec)
            ids = [_device_id(i) for i in entry.ids]
            device = await _open_in_thread(spec, self.config.sim_dir, step_timeout)
        except VfmigError as exc:
            self.log(
                f"{entry.handle}: {_ROLE_NAMES[entry.role]} of run {run.id} cannot be reopened "
                f"({exc}); left as it is, kept in the ledger: check it with vfmig recover "
                f"{entry.handle}"
            )
            return False
        worker = DeviceWorker(
            device, label=entry.handle, step_timeout=step_timeout, executor=self.config.executor
        )
        identity = f"{entry.handle}@{self.identity}"
        slot = Slot(entry.handle, spec, worker, identity, None, run, ids, touched=True)
        slot.peer_control = entry.peer_control
        slot.stream_complete = entry.stopcopy
        device.observer = partial(_observe, slot)
        self.slots[entry.handle] = slot
        run.slots.append(slot)
        state = await _state_name(worker)
        self.log(f"{entry.handle}: {_ROLE_NAMES[entry.role]} of run {run.id} reopened in {state}")
        return True

    async def _recover_run(self, run: Run, unopened: frozenset[str]) -> None:
        self.log(f"run {run.id}: recovering its devices after a restart")
        done = self._fallbacks[run.id] = trio.Event()
        try:
            await self._fall_back(run, unopened)
        finally:
            done.set()

    # --- shutting down ------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """SIGTERM: refuse new devices, bring every run's devices to rest, close everything."""
        self.stopping = True
        for session in tuple(self._sessions):
            await session.link.aclose("the agent is shutting down")
        async with trio.open_nursery() as nursery:
            for run in self.runs.values():
                if any(s in self.slots.values() for s in run.slots):
                    nursery.start_soon(self.fall_back, run, 0.0)
        for slot in tuple(self.slots.values()):
            await self._release(slot)


class _AgentError(VfmigError):
    def __init__(
        self,
        code: Code,
        message: str,
        *,
        errno: int | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.errno = errno
        self.device = device


def _error_response(request_id: int, exc: VfmigError) -> ErrorResponse:
    if isinstance(exc, _AgentError):
        return ErrorResponse(
            id=request_id, code=exc.code, message=exc.message, errno=exc.errno, device=exc.device
        )
    code = Code.FAILED
    if isinstance(exc, DeviceHung):
        code = Code.HUNG
    elif isinstance(exc, RequestRefused):
        code = Code.REFUSED
    elif isinstance(exc, DeviceError) and exc.errno == _errno.EBUSY:
        code = Code.BUSY
    errno = exc.errno if isinstance(exc, DeviceError) else None
    device = exc.device if isinstance(exc, DeviceError) else None
    step = exc.step if isinstance(exc, DeviceHung) else None
    return ErrorResponse(
        id=request_id, code=code, message=exc.message, errno=errno, device=device, step=step
    )


def _param(params: Any, name: str, kind: type) -> Any:
    value = params.get(name) if isinstance(params, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _AgentError(Code.BAD_PARAMS, f"parameter {name!r} ({kind.__name__}) is missing")
    return value


def _device_id(text: str) -> DeviceId:
    try:
        return DeviceId.parse(text)
    except ValueError as exc:
        raise _AgentError(Code.BAD_PARAMS, str(exc)) from None


def _observe(
    slot: Slot,
    name: str,
    args: tuple[tuple[str, int], ...],
    result: int,
    errno: int | None,
    duration_ns: int,
) -> None:
    """The device's ioctl observer (in its thread): queue the record for the event loop."""
    slot.ioctls.append(
        IoctlCompleted(
            device=slot.device_id,
            name=name,
            args=args,
            result=result,
            errno=errno,
            duration_ns=duration_ns,
        )
    )


def _timeout(params: dict[str, Value], default: float | None) -> float | None:
    value = params.get("timeout")
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        return float(value)
    return default


#: What a run id looks like (a journal's name keeps it as it is).
_RUN_ID: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _read_journal(path: Path, offset: int) -> parts.Part:
    """A part of the journal at ``path`` from ``offset`` (runs in a thread)."""
    try:
        return parts.read(path, offset)
    except ValueError as exc:
        raise _AgentError(Code.BAD_PARAMS, str(exc)) from None
    except OSError as exc:
        raise _AgentError(Code.FAILED, f"cannot read {path.name}: {exc.strerror}") from None


async def _state_name(worker: DeviceWorker) -> str:
    """The device's state, for a log line (what went wrong if it cannot be read)."""
    try:
        return (await worker.get_state()).name
    except VfmigError as exc:
        return f"an unreadable state ({exc})"


async def _open_in_thread(
    spec: DeviceSpec, sim_dir: Path | None, hang_after: float | None
) -> MigrationDevice:
    limit = 30.0 if hang_after is None else hang_after
    with trio.move_on_after(limit):
        return await trio.to_thread.run_sync(
            partial(open_device, spec, sim_dir=sim_dir), abandon_on_cancel=True
        )
    raise DeviceHung(f"{spec.kind}:{spec.name}", "open", f"did not return within {limit:g} s")


_DEVICE_METHODS: Final[dict[str, Callable[[Agent, Slot, dict[str, Value]], Awaitable[Value]]]] = {
    "close_device": Agent._close,
    "get_state": Agent._get_state,
    "set_state": Agent._set_state,
    "reset": Agent._reset,
    "precopy_info": Agent._precopy,
    "data_size": Agent._data_size,
    "start_receive": Agent._start_receive,
    "start_send": Agent._start_send,
    "stop_stream": Agent._stop_stream,
}


# --- streams ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _ReadAhead:
    started: float  #: when the read began (trio time)
    result: ReadResult  #: RAW until encoded
    encoded: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None  #: the encoding failed


class Sender:
    """The source side of one stream: read, compress, send within credit."""

    def __init__(
        self,
        agent: Agent,
        slot: Slot,
        stream: int,
        peer: str,
        ticket: str,
        phase: StreamPhase,
        level: int | None,
    ) -> None:
        self.agent = agent
        self.slot = slot
        self.stream = stream
        self.peer = peer
        self.ticket = ticket
        self.phase = phase
        self.level = level
        self._switched = trio.Event()
        if phase is StreamPhase.STOPCOPY:
            self._switched.set()
        self._credit = trio.Event()
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self.stopped = False
        self.read_offset = 0  #: stream bytes read from the device (updated in its thread)
        self.sent_offset = 0
        self._mark_at: int | None = None  #: an InitialDataSent is due once this much is sent
        self._marks = 0
        self.raw = 0
        self.wire = 0
        self.busy_ns = 0
        self._unsent = 0  #: raw bytes read ahead, not sent yet (they use credit)
        self._connected = False

    def switch(self, phase: StreamPhase) -> None:
        self.phase = phase
        if phase is StreamPhase.STOPCOPY:
            self._switched.set()

    def note_precopy(self, info: PrecopyInfo) -> None:
        """Called in the device's thread after a precopy query: mark the initial data's end."""
        if info.initial_bytes == 0 and (self._marks == 0 or info.reinit) and self._mark_at is None:
            self._mark_at = self.read_offset

    def _advance(self, count: int) -> int:
        offset = self.read_offset
        self.read_offset += count
        return offset

    async def stop(self) -> None:
        """Stop sending at once and wait for the end: the data link is dropped, and the
        destination, stopped too, never accepts what it got."""
        self.stopped = True
        self._scope.cancel()
        await self._done.wait()

    async def run(self) -> None:
        slot = self.slot
        try:
            with self._scope:
                await self._run()
        except DataError as exc:
            await self._report(FactKind.READ_FAILED, exc.errno, exc.offset, exc.reason, "data read")
        except DeviceHung as exc:
            await self._report(FactKind.HUNG, None, self.read_offset, exc.reason, "data read")
        except DeviceError as exc:
            await self._report(
                FactKind.READ_FAILED, exc.errno, self.read_offset, exc.reason, "data read"
            )
        except PeerError as exc:
            if not self._connected:
                await self._report(
                    FactKind.CONNECT_FAILED, _errno.ECONNREFUSED, 0, exc.reason, "data link"
                )
            else:
                # The destination's agent reports a broken link itself (or is lost).
                self.agent.log(f"{slot.handle}: stream {self.stream} to {self.peer}: {exc.reason}")
        finally:
            self._done.set()
            if slot.sender is self:
                slot.sender = None
        if self.stopped:
            self.agent.log(f"{slot.handle}: stream {self.stream} stopped")

    async def _report(
        self, kind: FactKind, errno: int | None, offset: int, message: str, step: str
    ) -> None:
        if self.stopped:
            return
        slot = self.slot
        self.agent.log(f"{slot.handle}: stream {self.stream}: {step} failed: {message}")
        fact = Fact(
            kind=kind, device=slot.device_id, errno=errno, offset=offset, message=message, step=step
        )
        await self.agent.notify(slot, wire.fact_notice(slot.run.id if slot.run else "", fact))

    async def _run(self) -> None:
        stream, key = await self.agent.dial(self.peer)
        conn = Connection(
            LinkRole.DATA_SENDER, protocol_config(key, level=self.level), name=self.ticket
        )
        link = Link(stream, conn, peer=f"data receiver {self.peer}")
        self.agent._links.add(link)

        async def handle(event: Event) -> None:
            if isinstance(event, Credit):
                self._credit.set()

        async def body() -> None:
            self._connected = True
            self.agent.log(f"{self.slot.handle}: streaming {self.phase.value} to {self.peer}")
            await self._pump(link)

        try:
            await with_link(link, handle, body)
        finally:
            self.agent._links.discard(link)

    async def _pump(self, link: Link) -> None:
        conn = link.conn
        session = link.session
        assert session is not None
        worker = self.slot.worker
        size = max(1, min(self.agent.config.chunk_size, session.max_chunk_size))
        try:
            estimate = await worker.data_size()
            size = max(1, min(size, estimate)) if estimate > 0 else size
        except DeviceError:
            pass
        compressors: list[zstandard.ZstdCompressor] = []
        if session.compression and self.level is not None:
            compressors = [make_compressor(self.level) for _ in range(ENCODERS)]
        # The device's thread reads the next chunks while others compress them (ENCODERS
        # at once) and this task sends: READ_AHEAD results queue, one is being sent, one is
        # being read; a payload is a view of its buffer until it is sent (or compressed), so
        # each of them has a buffer of its own.
        buffers = [bytearray(size) for _ in range(READ_AHEAD + 2)]
        results, receive = trio.open_memory_channel[_ReadAhead | Exception | None](READ_AHEAD)
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_ahead, conn, buffers, size, compressors, results)
            try:
                await self._send_all(link, receive)
            except Exception as exc:  # re-raised below, outside the nursery
                error = exc
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _read_ahead(
        self,
        conn: Connection,
        buffers: list[bytearray],
        size: int,
        compressors: list[zstandard.ZstdCompressor],
        results: trio.MemorySendChannel[_ReadAhead | Exception | None],
    ) -> None:
        """Read chunks within the credit the sent ones leave and have them encoded, in
        order (raw, untried, while the stream does not compress: CompressionProbe); None
        says a read found nothing now; the end of stream or the first error is the last
        item."""
        worker = self.slot.worker
        probe = CompressionProbe()
        poll = MIN_POLL
        turn = 0
        idle, taken = trio.open_memory_channel[zstandard.ZstdCompressor](len(compressors))
        for compressor in compressors:
            idle.send_nowait(compressor)

        async def encode(item: _ReadAhead) -> None:
            compressor = await taken.receive()
            try:
                raw = memoryview(item.result.payload)
                encoding, payload = await worker.encode(compressor, raw)
                probe.observe(encoding is not Encoding.RAW)
                item.result = dataclasses.replace(item.result, encoding=encoding, payload=payload)
            except Exception as exc:  # the sending task raises it, in order
                item.error = exc
            finally:
                idle.send_nowait(compressor)
                item.encoded.set()

        async with results, trio.open_nursery() as encoders:
            try:
                while True:
                    window = conn.send_window(self.stream) - self._unsent
                    if window <= 0:
                        self._credit = trio.Event()
                        await self._credit.wait()
                        continue
                    started = trio.current_time()
                    buffer = buffers[turn % len(buffers)]
                    result = await worker.read_chunk(buffer, min(size, window), self._advance)
                    if result is None:
                        await results.send(None)  # the sender may owe a switchover mark
                        # Back off, but not past the switch to stop-copy: the device stops
                        # then, and each millisecond until its last bytes are read is
                        # downtime.
                        with trio.move_on_after(poll):
                            if self.phase is StreamPhase.PRECOPY:
                                await self._switched.wait()
                            else:
                                await trio.sleep_forever()
                        poll = min(poll * 2, MAX_POLL)
                        continue
                    poll = MIN_POLL
                    turn += 1
                    self._unsent += result.raw
                    item = _ReadAhead(started, result)
                    if result.raw and compressors and probe.attempt():
                        encoders.start_soon(encode, item)
                    else:
                        item.encoded.set()
                    await results.send(item)
                    if result.raw == 0:
                        return
            except Exception as exc:  # the sending task raises it, in order
                await results.send(exc)

    async def _send_all(
        self, link: Link, receive: trio.MemoryReceiveChannel[_ReadAhead | Exception | None]
    ) -> None:
        slot = self.slot
        run = slot.run.id if slot.run else ""
        seq = 0
        sent_at = 0.0
        reported_at: float | None = None
        await self._send_mark(link)
        async for item in receive:
            if item is None:
                await self._send_mark(link)
                continue
            if isinstance(item, Exception):
                raise item
            await item.encoded.wait()
            if item.error is not None:
                raise item.error
            result = item.result
            if result.raw == 0:
                await self._switched.wait()
                await self._send_mark(link)
                await link.send(EndOfStream(stream=self.stream, total=result.offset))
                slot.stream_complete = True
                if reported_at is not None and reported_at < sent_at:
                    await self._notify_progress(run)
                event = ChunkSent(
                    device=slot.device_id, seq=seq, offset=result.offset, raw=0, wire=0, final=True
                )
                await self.agent.notify_event(slot, event)
                self.agent.log(f"{slot.handle}: stream {self.stream} sent ({result.offset} bytes)")
                return
            assert result.encoding is not None
            await link.send_chunk(
                self.stream, seq, result.offset, result.raw, result.encoding, result.payload
            )
            self._unsent -= result.raw
            wire_bytes = len(result.payload)
            self.sent_offset = result.offset + result.raw
            self.raw += result.raw
            self.wire += wire_bytes
            # Busy: from the read's start (or the previous chunk's send, if later) to now;
            # polls for data and waits for credit are not counted.
            now = trio.current_time()
            self.busy_ns += int((now - max(item.started, sent_at)) * 1e9)
            sent_at = now
            event = ChunkSent(
                device=slot.device_id,
                seq=seq,
                offset=result.offset,
                raw=result.raw,
                wire=wire_bytes,
                final=False,
            )
            seq += 1
            await self.agent.notify_event(slot, event)
            if reported_at is None or now - reported_at >= PROGRESS_INTERVAL:
                await self._notify_progress(run)
                reported_at = now
            await self._send_mark(link)

    async def _notify_progress(self, run: str) -> None:
        slot = self.slot
        progress = Progress(
            device=slot.device_id, raw=self.raw, wire=self.wire, busy_ns=self.busy_ns
        )
        await self.agent.notify(slot, wire.progress_notice(run, progress))

    async def _send_mark(self, link: Link) -> None:
        mark = self._mark_at
        if mark is None or self.sent_offset < mark:
            return
        session = link.session
        if self._marks and (session is None or "reinit_ack" not in session.features):
            self._mark_at = None
            return
        await link.send(InitialDataSent(stream=self.stream, offset=mark))
        self._marks += 1
        self._mark_at = None


class Receiver:
    """The destination side of one stream: queue a window, write in order, return credit."""

    def __init__(self, agent: Agent, slot: Slot, link: Link, stream: int) -> None:
        self.agent = agent
        self.slot = slot
        self.link = link
        self.stream = stream
        config = agent.config
        self.window = config.chunk_size * config.window_chunks
        self._send, self._receive = trio.open_memory_channel[LinkEvent](config.window_chunks + 4)
        self.ended = False  #: EndOfStream or AbortStream received: no more credit
        self.complete = False
        self.stopped = False
        self._marks_received = 0
        self._scope = trio.CancelScope()
        self._written = 0

    def peek(self, events: list[Event]) -> None:
        """A batch just received: the connection already closed a stream it ends, and
        already counted its switchover marks (no credit or ack may follow)."""
        for event in events:
            if isinstance(event, LinkStreamEnded | AbortStream):
                self.ended = True
            elif isinstance(event, InitialDataSent):
                self._marks_received += 1

    async def on_event(self, event: Event) -> None:
        """Called by the link's receive loop, in order; blocks when a window is queued."""
        if isinstance(event, DataChunk | InitialDataSent | LinkStreamEnded | AbortStream):
            with contextlib.suppress(trio.ClosedResourceError):
                await self._send.send(event)

    async def stop(self) -> None:
        """Stop writing at once and drop the link."""
        self.stopped = True
        self._scope.cancel()
        await self.link.abort()

    async def run(self) -> None:
        slot = self.slot
        run = slot.run.id if slot.run else ""
        dev = slot.device_id
        session = self.link.session
        assert session is not None
        decompressor = make_decompressor(session.max_chunk_size) if session.compression else None
        journal = self.agent.config.journal
        tap = journal.tap(run, dev) if journal is not None else None
        marks_seen = 0
        self.agent.log(f"{slot.handle}: receiving stream {self.stream}")
        with self._scope:
            await self.link.send(Credit(stream=self.stream, increment=self.window))
            async for event in self._receive:
                if isinstance(event, DataChunk):
                    await slot.worker.write_chunk(
                        event, decompressor, session.max_chunk_size, event.offset, tap
                    )
                    self._written = event.offset + event.raw_len
                    await self._send_quietly(Credit(stream=self.stream, increment=event.raw_len))
                    received = ChunkReceived(
                        device=dev,
                        seq=event.seq,
                        offset=event.offset,
                        raw=event.raw_len,
                        wire=len(event.payload),
                        final=False,
                    )
                    await self.agent.notify_event(slot, received)
                elif isinstance(event, InitialDataSent):
                    marks_seen += 1
                    if marks_seen == self._marks_received:
                        ack = SwitchoverAck(stream=self.stream, offset=event.offset)
                        await self._send_quietly(ack)
                        acked = SwitchoverAckedEvent(device=dev)
                        await self.agent.notify_event(slot, acked)
                elif isinstance(event, LinkStreamEnded):
                    self.complete = True
                    final = ChunkReceived(
                        device=dev,
                        seq=event.chunks,
                        offset=event.total,
                        raw=0,
                        wire=0,
                        final=True,
                    )
                    await self.agent.notify_event(slot, final)
                    ended = StreamEnded(device=dev, total=event.total, digest_ok=event.ok)
                    await self.agent.notify_event(slot, ended)
                    self.agent.log(
                        f"{slot.handle}: stream {self.stream} received ({event.total} bytes, "
                        f"digest {'ok' if event.ok else 'MISMATCH'})"
                    )
                    return
                else:
                    self.agent.log(f"{slot.handle}: stream {self.stream} aborted by the source")
                    return

    async def _send_quietly(self, event: Credit | SwitchoverAck) -> None:
        with contextlib.suppress(LinkClosed):
            await self.link.send(event, unless=lambda: self.ended)

    async def link_failed(self, exc: PeerError) -> None:
        if self.stopped or self.complete:
            return
        await self._report(FactKind.LINK_FAILED, _errno.ECONNRESET, exc.reason, "data link")

    async def device_failed(self, exc: Exception) -> None:
        if self.stopped:
            return
        if isinstance(exc, DataError):
            await self._report(
                FactKind.WRITE_FAILED, exc.errno, exc.reason, "data write", exc.offset
            )
        elif isinstance(exc, DeviceHung):
            await self._report(FactKind.HUNG, None, exc.reason, "data write")
        elif isinstance(exc, DeviceError):
            await self._report(FactKind.WRITE_FAILED, exc.errno, exc.reason, "data write")
        else:  # a chunk that does not decode: the stream is damaged
            await self._report(FactKind.LINK_FAILED, _errno.EBADMSG, str(exc), "data link")

    async def _report(
        self, kind: FactKind, errno: int | None, message: str, step: str, offset: int | None = None
    ) -> None:
        slot = self.slot
        at = self._written if offset is None else offset
        self.agent.log(f"{slot.handle}: stream {self.stream}: {step} failed at {at}: {message}")
        fact = Fact(
            kind=kind, device=slot.device_id, errno=errno, offset=at, message=message, step=step
        )
        await self.agent.notify(slot, wire.fact_notice(slot.run.id if slot.run else "", fact))


# --- TCP --------------------------------------------------------------------------------------


async def serve_tcp(
    agent: Agent,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[int, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``agent`` on a control listener at ``host:port`` and a data listener beside it.

    Reports ``(control port, data port)`` once both listen.
    """
    control = await trio.open_tcp_listeners(port, host=host)
    data = await trio.open_tcp_listeners(0, host=host)
    control_port = control[0].socket.getsockname()[1]
    data_port = data[0].socket.getsockname()[1]
    wildcard = host in ("", "0.0.0.0", "::")
    agent.use_tcp_data(None if wildcard else host, data_port)
    key = agent.config.key

    async def on_control(stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        tls = await _tls(agent, stream, peer)
        if tls is not None:
            await agent.serve_control(tls, peer=peer, key=key)

    async def on_data(stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        tls = await _tls(agent, stream, peer)
        if tls is not None:
            await agent.serve_data(tls, peer=peer, key=key)

    async with trio.open_nursery() as nursery:
        handlers = agent.nursery
        await nursery.start(
            partial(trio.serve_listeners, on_control, control, handler_nursery=handlers)
        )
        await nursery.start(partial(trio.serve_listeners, on_data, data, handler_nursery=handlers))
        task_status.started((control_port, data_port))


async def _tls(agent: Agent, stream: trio.SocketStream, peer: str) -> trio.abc.Stream | None:
    context = agent.config.server_ssl
    if context is None:
        return stream
    tls = trio.SSLStream(stream, context, server_side=True)
    try:
        with trio.fail_after(10):
            await tls.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as exc:
        agent.log(f"{peer}: TLS handshake failed: {exc.__cause__ or exc}")
        await trio.aclose_forcefully(stream)
        return None
    return tls


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "unknown peer"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
