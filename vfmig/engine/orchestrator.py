"""The orchestrator: runs the pure phase machine and executes its actions through the agents.

Theory of operation
-------------------
:class:`Orchestrator` is the small interpreter around
:class:`vfmig.core.phases.MigrationMachine` (style.md §2). It opens one control link per
agent (a remote ``vfmig agent``, or the in-process agent of local mode), then loops: take
one input, hand it to the machine, execute the actions it returns in order.

* Device actions (open, SET, reset, precopy and size queries) go to one queue per device,
  so each device's steps run one at a time in the order the machine asked for them, while
  different devices proceed concurrently. Each is an RPC to the device's agent; its answer
  becomes the machine's next input (``SetStateDone``, ``SetStateFailed`` with the state
  read back, ...). An agent that reports the step hung, or does not answer within the
  step's timeout plus a margin, yields ``StepTimedOut``.
* Stream actions go to one queue per pair: ``StartStream`` asks the destination's agent for
  a data listener and a one-time ticket and tells the source's agent to connect there
  (later, to drain to end of stream); ``StopStream`` stops both ends. Device bytes flow
  agent to agent: the orchestrator never carries them.
* ``Commit`` is executed inline: every agent of the run is told before anything else runs,
  but only once ``CommitPointPassed`` is published (here, not at the machine's Emit of it
  that follows) and the commit hook has returned -- ``vfmig migrate`` waits there until
  the journal holds the commit point on disk, so an in-doubt run can always be placed on
  one side of it.
* ``Emit`` publishes the event on the bus; ``Finish`` ends the loop.

Inputs also come from outside the machine's requests: the agents' notifications (chunks,
stream ends, switchover acks, stream failures), a lost control link (``AgentLost``),
``Tick`` every 50 ms, and ``Abort`` from a signal. At the end every opened device is
closed and every link says Goodbye; an end hook runs in between, on the links still up
(``vfmig migrate`` fetches the agents' journals of the run there: after the devices are
closed, outside any downtime). A trace hook sees each action before it executes (tests
use it to cut a link at an exact point).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as _errno
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

from vfmig.core import events
from vfmig.core.errors import PeerError
from vfmig.core.events import (
    CommitPointPassed,
    ErrorRaised,
    RunFinished,
    StateChanged,
    StreamStarted,
    Tally,
)
from vfmig.core.fsm import DeviceState
from vfmig.core.model import (
    Abort,
    Action,
    AgentLost,
    Commit,
    DataReadFailed,
    DataSizeSampled,
    DataWriteFailed,
    DeviceId,
    DeviceOpened,
    Emit,
    Finish,
    Input,
    OpenDevice,
    OpenFailed,
    Outcome,
    PrecopySampled,
    Query,
    QueryDataSize,
    QueryFailed,
    QueryPrecopy,
    Reset,
    ResetDone,
    ResetFailed,
    SetState,
    SetStateDone,
    SetStateFailed,
    Start,
    StartStream,
    StepTimedOut,
    StopStream,
    StreamBroken,
    StreamEnded,
    StreamProgress,
    SwitchoverAcked,
    Tick,
    by_device,
)
from vfmig.core.model import DeviceSpec as MachineSpec
from vfmig.core.phases import MachineConfig, MigrationMachine
from vfmig.core.spec import join_address, split_address
from vfmig.engine import wire
from vfmig.engine.link import INPROC, Link, RpcError, protocol_config
from vfmig.engine.wire import Code, FactKind
from vfmig.protocol import DEFAULT_COMPRESSION_LEVEL, Connection, Notification
from vfmig.protocol import Role as LinkRole

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from vfmig.core.spec import DeviceSpec
    from vfmig.engine.bus import EventBus, Record
    from vfmig.protocol import Event, Value

#: The machine's clock tick (phase deadlines and precopy sampling derive from it).
TICK: Final = 0.05
#: An RPC may take this much longer than the device step it carries (network, queueing).
RPC_MARGIN: Final = 2.0
#: How long the end of a run waits for each agent to close its devices.
CLOSE_TIMEOUT: Final = 5.0
#: Inputs waiting for the machine; producers wait when it is full.
INPUT_CAPACITY: Final = 1024
#: Actions waiting per device or pair (the machine keeps a few in flight at most).
QUEUE_CAPACITY: Final = 256

LOCAL: Final = "local"


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """How to reach one agent: ``connect()`` gives its control stream and the link's key."""

    host: str  #: ``local`` or the spec's ``HOST:PORT``
    connect: Callable[[], Awaitable[tuple[trio.abc.Stream, bytes | None]]]


@dataclass(frozen=True, slots=True, kw_only=True)
class OrchestratorConfig:
    machine: MachineConfig = field(default_factory=MachineConfig)
    #: zstd level for device data; None sends it uncompressed.
    compress_level: int | None = DEFAULT_COMPRESSION_LEVEL
    name: str = "vfmig-migrate"
    #: Ask every agent to capture the streams its destinations receive into its journal of
    #: the run (``open_device`` option ``journal_data``; ``vfmig migrate --journal-data``).
    journal_data: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RunReport:
    """How a run ended, for the CLI."""

    run: str
    outcome: Outcome
    summary: str
    errors: tuple[ErrorRaised, ...]
    names: Mapping[DeviceId, str]
    tally: Tally


@dataclass(slots=True)
class _PairStream:
    stream: int
    peer: str
    ticket: str
    peer_control: str | None


class _Hung(Exception):
    """A step that did not return in time: the machine's input for it."""

    def __init__(self, timed_out: StepTimedOut) -> None:
        super().__init__(timed_out.step)
        self.timed_out = timed_out


class Orchestrator:
    """One migration run; see the module docstring."""

    def __init__(
        self,
        pairs: Sequence[tuple[DeviceSpec, DeviceSpec]],
        endpoints: Mapping[str, Endpoint],
        bus: EventBus,
        config: OrchestratorConfig | None = None,
        *,
        run_id: str | None = None,
        trace: Callable[[Action], Awaitable[None]] | None = None,
        commit_hook: Callable[[Record], Awaitable[None]] | None = None,
        end_hook: Callable[[Mapping[str, Link]], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config or OrchestratorConfig()
        self.run_id = run_id or secrets.token_hex(8)
        self._bus = bus
        self._endpoints = endpoints
        self._trace = trace
        self._commit_hook = commit_hook
        self._end_hook = end_hook
        self._commit_published = False
        self._specs: dict[DeviceId, DeviceSpec] = by_device(pairs)
        self._pairs = list(pairs)
        self._links: dict[str, Link] = {}
        self._handles: dict[DeviceId, str] = {}
        self._opened: list[tuple[str, str]] = []
        self._states: dict[DeviceId, DeviceState] = {}
        self._streams: dict[int, _PairStream] = {}
        self._queues: dict[object, trio.MemorySendChannel[Action]] = {}
        self._drained: list[trio.Event] = []
        self._inputs: trio.MemorySendChannel[Input] | None = None
        self._nursery: trio.Nursery | None = None
        self._started = False
        self._finished = False
        self._aborted: str | None = None
        self._tally = Tally()
        self._errors: list[ErrorRaised] = []
        self._result: RunFinished | None = None

    # --- public --------------------------------------------------------------------------

    def host_of(self, dev: DeviceId) -> str:
        return self._specs[dev].address or LOCAL

    async def abort(self, reason: str, signal: str | None) -> None:
        """Roll the run back (before the commit point); a signal handler calls this."""
        if self._inputs is not None and self._started:
            await self._feed(Abort(reason=reason, signal=signal))
        elif self._nursery is not None:
            self._aborted = signal or reason
            self._nursery.cancel_scope.cancel()

    async def run(self) -> RunReport:
        """Connect to the agents and drive the run to its end."""
        failure: BaseException | None = None
        outcome: Outcome | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._connect()
                outcome = await self._drive()
            except Exception as exc:  # re-raised below, outside the nursery
                failure = exc
            with trio.CancelScope(shield=True):
                await self._close()
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if outcome is None:
            outcome = Outcome.INTERRUPTED
        summary = self._result.summary if self._result is not None else f"{outcome.value}"
        if self._aborted is not None and self._result is None:
            summary = f"interrupted ({self._aborted}) before any device was changed"
        return RunReport(
            run=self.run_id,
            outcome=outcome,
            summary=summary,
            errors=tuple(self._errors),
            names={dev: str(spec) for dev, spec in self._specs.items()},
            tally=self._tally,
        )

    # --- links ---------------------------------------------------------------------------

    async def _connect(self) -> None:
        assert self._nursery is not None
        hosts = sorted({self.host_of(dev) for dev in self._specs})
        for host in hosts:
            endpoint = self._endpoints.get(host)
            if endpoint is None:
                raise PeerError(host, "no way to reach this agent")
            stream, key = await endpoint.connect()
            conn = Connection(
                LinkRole.ORCHESTRATOR,
                protocol_config(key),
                name=f"{self.config.name} {self.run_id}",
            )
            link = Link(stream, conn, peer=f"agent {host}")
            self._links[host] = link
            self._nursery.start_soon(self._run_link, host, link)
            await link.wait_established()
            await link.request("subscribe", {"topics": ["run"]})

    async def _run_link(self, host: str, link: Link) -> None:
        async def handle(event: Event) -> None:
            if isinstance(event, Notification):
                await self._on_notice(host, event.payload)

        with contextlib.suppress(PeerError):
            await link.run(handle)
        if self._started and not self._finished:
            await self._feed(AgentLost(host=host))

    # --- the loop ------------------------------------------------------------------------

    def _now(self) -> int:
        return int(trio.current_time() * 1e9)

    async def _drive(self) -> Outcome:
        assert self._nursery is not None
        send, receive = trio.open_memory_channel[Input](INPUT_CAPACITY)
        self._inputs = send
        specs = [
            (
                MachineSpec(name=str(src), host=src.address or LOCAL),
                MachineSpec(name=str(dst), host=dst.address or LOCAL),
            )
            for src, dst in self._pairs
        ]
        machine = MigrationMachine(self.config.machine, specs)
        self._started = True
        self._nursery.start_soon(self._ticker)
        outcome = await self._execute(machine.handle(Start(now_ns=self._now())))
        async with receive:
            while outcome is None:
                outcome = await self._execute(machine.handle(await receive.receive()))
        self._finished = True
        return outcome

    async def _ticker(self) -> None:
        while not self._finished:
            await trio.sleep(TICK)
            await self._feed(Tick(now_ns=self._now()))

    async def _feed(self, inp: Input) -> None:
        if self._inputs is None or self._finished:
            return
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._inputs.send(inp)

    async def _execute(self, actions: list[Action]) -> Outcome | None:
        for action in actions:
            if self._trace is not None:
                await self._trace(action)
            if isinstance(action, Emit):
                if isinstance(action.event, CommitPointPassed) and self._commit_published:
                    continue  # published by the Commit it follows
                await self._publish(action.event)
            elif isinstance(action, Finish):
                return action.outcome
            elif isinstance(action, Commit):
                await self._commit(action)
            elif isinstance(action, OpenDevice | SetState | Reset | QueryPrecopy | QueryDataSize):
                await self._queue(action.dev).send(action)
            elif isinstance(action, StartStream | StopStream):
                await self._queue(action.source.index).send(action)
        return None

    def _queue(self, key: DeviceId | int) -> trio.MemorySendChannel[Action]:
        queue = self._queues.get(key)
        if queue is None:
            assert self._nursery is not None
            queue, receive = trio.open_memory_channel[Action](QUEUE_CAPACITY)
            self._queues[key] = queue
            done = trio.Event()
            self._drained.append(done)
            self._nursery.start_soon(self._serve_queue, receive, done)
        return queue

    async def _serve_queue(
        self, receive: trio.MemoryReceiveChannel[Action], done: trio.Event
    ) -> None:
        try:
            async with receive:
                async for action in receive:
                    try:
                        inp = await self._perform(action)
                    except PeerError:
                        continue  # the link task feeds AgentLost
                    if inp is not None:
                        await self._feed(inp)
        finally:
            done.set()

    async def _publish(self, event: events.Event, origin: str = "orchestrator") -> Record:
        record = await self._bus.publish(event, origin=origin)
        self._tally = events.tally(self._tally, record.at_ns, event)
        if isinstance(event, ErrorRaised):
            self._errors.append(event)
        elif isinstance(event, RunFinished):
            self._result = event
        elif isinstance(event, StateChanged):
            self._states[event.device] = event.after
        return record

    # --- device actions ------------------------------------------------------------------

    def _link(self, dev: DeviceId) -> Link:
        return self._links[self.host_of(dev)]

    async def _call(
        self, dev: DeviceId, method: str, params: dict[str, Value], limit_ns: int, step: str
    ) -> Value:
        """An RPC that runs ``step`` on ``dev``. One that outlasts the step's limit plus a
        margin, or that the agent answers ``hung``, raises :class:`_Hung`, named by the step
        that holds the device when the agent says which."""
        seconds = limit_ns / 1e9
        params = {**params, "timeout": seconds}
        try:
            with trio.fail_after(seconds + RPC_MARGIN):
                return await self._link(dev).request(method, params)
        except trio.TooSlowError:
            raise _Hung(StepTimedOut(dev=dev, step=step)) from None
        except RpcError as exc:
            if exc.code == Code.HUNG:
                raise _Hung(StepTimedOut(dev=dev, step=exc.step or step)) from None
            raise

    async def _perform(self, action: Action) -> Input | None:
        try:
            match action:
                case OpenDevice():
                    return await self._open(action)
                case SetState():
                    return await self._set(action)
                case Reset():
                    return await self._reset(action)
                case QueryPrecopy():
                    return await self._query_precopy(action)
                case QueryDataSize():
                    return await self._query_size(action)
                case StartStream():
                    return await self._start_stream(action)
                case StopStream():
                    await self._stop_stream(action)
        except _Hung as hung:
            return hung.timed_out
        return None

    async def _open(self, a: OpenDevice) -> Input:
        spec = self._specs[a.dev]
        local = dataclasses.replace(spec, host=None, port=None)
        options: dict[str, Value] = {"run": self.run_id, "id": str(a.dev)}
        if self.config.journal_data:
            options["journal_data"] = True
        params: dict[str, Value] = {"device": str(local), "options": options}
        try:
            result = await self._call(a.dev, "open_device", params, a.timeout_ns, "open")
        except RpcError as exc:
            return OpenFailed(dev=a.dev, errno=exc.errno, message=exc.reason)
        opened = wire.parse_opened(result)
        self._handles[a.dev] = opened.handle
        self._opened.append((self.host_of(a.dev), opened.handle))
        self._states[a.dev] = opened.state
        await self._publish(
            events.DeviceOpened(
                device=a.dev,
                identity=opened.identity,
                flags=opened.flags,
                state=opened.state,
                data_size=opened.data_size,
            )
        )
        if opened.debugfs is not None:
            d = opened.debugfs
            await self._publish(
                events.DebugfsSampled(
                    device=a.dev, state=d.state, text=d.text, duration_ns=d.duration_ns
                )
            )
        return DeviceOpened(
            dev=a.dev,
            identity=opened.identity,
            flags=opened.flags,
            state=opened.state,
            data_size=opened.data_size,
        )

    async def _set(self, a: SetState) -> Input:
        params: dict[str, Value] = {
            "device": self._handles[a.dev],
            "state": int(a.target),
            "step": a.arc,
        }
        try:
            result = await self._call(a.dev, "set_state", params, a.timeout_ns, a.arc)
        except RpcError as exc:
            after = a.current if exc.code == Code.REFUSED else None
            return SetStateFailed(
                dev=a.dev, target=a.target, errno=exc.errno or _errno.EINVAL, state_after=after
            )
        answer = wire.parse_set(result)
        if answer.ok:
            await self._changed(a.dev, a.target, a.arc)
            return SetStateDone(dev=a.dev, target=a.target)
        if answer.state is not None:
            await self._changed(a.dev, answer.state, a.arc)
        return SetStateFailed(
            dev=a.dev, target=a.target, errno=answer.errno, state_after=answer.state
        )

    async def _changed(self, dev: DeviceId, after: DeviceState, step: str) -> None:
        before = self._states.get(dev)
        if before is not None and before != after:
            await self._publish(StateChanged(device=dev, before=before, after=after, step=step))
        self._states[dev] = after

    async def _reset(self, a: Reset) -> Input:
        try:
            params: dict[str, Value] = {"device": self._handles[a.dev]}
            await self._call(a.dev, "reset", params, a.timeout_ns, "reset")
        except RpcError as exc:
            return ResetFailed(dev=a.dev, errno=exc.errno)
        before = self._states.get(a.dev)
        if before is not None:
            await self._publish(
                StateChanged(device=a.dev, before=before, after=DeviceState.RUNNING, step="reset")
            )
        self._states[a.dev] = DeviceState.RUNNING
        return ResetDone(dev=a.dev)

    async def _query_precopy(self, a: QueryPrecopy) -> Input:
        params: dict[str, Value] = {"device": self._handles[a.dev]}
        try:
            result = await self._call(a.dev, "precopy_info", params, a.timeout_ns, "precopy info")
        except RpcError as exc:
            return QueryFailed(dev=a.dev, query=Query.PRECOPY_INFO, errno=exc.errno)
        initial, dirty, reinit = wire.parse_precopy(result)
        await self._publish(
            events.PrecopySampled(device=a.dev, initial=initial, dirty=dirty, reinit=reinit)
        )
        return PrecopySampled(
            dev=a.dev, initial=initial, dirty=dirty, reinit=reinit, now_ns=self._now()
        )

    async def _query_size(self, a: QueryDataSize) -> Input:
        params: dict[str, Value] = {"device": self._handles[a.dev]}
        try:
            result = await self._call(a.dev, "data_size", params, a.timeout_ns, "data size")
        except RpcError as exc:
            return QueryFailed(dev=a.dev, query=Query.DATA_SIZE, errno=exc.errno)
        if type(result) is not int:
            return QueryFailed(dev=a.dev, query=Query.DATA_SIZE, errno=None)
        await self._publish(events.DataSizeSampled(device=a.dev, size=result))
        return DataSizeSampled(dev=a.dev, size=result)

    # --- streams -------------------------------------------------------------------------

    async def _start_stream(self, a: StartStream) -> Input | None:
        src, dst = a.source, a.destination
        index = src.index
        stream = self._streams.get(index)
        if stream is None:
            params: dict[str, Value] = {"device": self._handles[dst], "stream": index + 1}
            src_host, dst_host = self.host_of(src), self.host_of(dst)
            if dst_host == LOCAL and src_host != LOCAL:
                bind = self._links[src_host].local_host()
                if bind is not None:
                    params["bind"] = bind
            try:
                result = await self._call(
                    dst, "start_receive", params, a.step_timeout_ns, "start receive"
                )
                listener = wire.parse_listener(result)
            except RpcError as exc:
                return self._stream_error(dst, exc, write=True)
            if listener.host == INPROC:
                peer = INPROC
            else:
                host = listener.host or split_address(dst_host)[0]
                peer = join_address(host, listener.port)
            control = None if dst_host == LOCAL else dst_host
            if dst_host == LOCAL and src_host == LOCAL:
                control = INPROC
            stream = _PairStream(index + 1, peer, listener.ticket, control)
            self._streams[index] = stream
            await self._publish(StreamStarted(source=src, destination=dst, phase=a.phase))
        params = {
            "device": self._handles[src],
            "stream": stream.stream,
            "peer": stream.peer,
            "ticket": stream.ticket,
            "phase": a.phase.value,
            "level": self.config.compress_level,
            "peer_control": stream.peer_control,
        }
        try:
            await self._call(src, "start_send", params, a.step_timeout_ns, "start send")
        except RpcError as exc:
            return self._stream_error(src, exc, write=False)
        return None

    def _stream_error(self, dev: DeviceId, exc: RpcError, *, write: bool) -> Input:
        if write:
            return DataWriteFailed(dev=dev, errno=exc.errno, offset=0)
        return DataReadFailed(dev=dev, errno=exc.errno, offset=0)

    async def _stop_stream(self, a: StopStream) -> None:
        self._streams.pop(a.source.index, None)
        for dev in (a.source, a.destination):
            handle = self._handles.get(dev)
            if handle is None:
                continue
            try:
                with trio.fail_after(RPC_MARGIN + CLOSE_TIMEOUT):
                    await self._link(dev).request(
                        "stop_stream", {"device": handle, "stream": a.source.index + 1}
                    )
            except (PeerError, RpcError, trio.TooSlowError):
                pass

    async def _commit(self, commit: Commit) -> None:
        """Publish the commit point (the machine's Emit of it follows the Commit and is not
        published again), let the commit hook see its record, then tell every agent of the
        run that it passed its point of no return."""
        record = await self._publish(CommitPointPassed(devices=commit.devices))
        self._commit_published = True
        if self._commit_hook is not None:
            await self._commit_hook(record)

        async def tell(link: Link) -> None:
            try:
                with trio.fail_after(RPC_MARGIN + CLOSE_TIMEOUT):
                    await link.request("commit", {"run": self.run_id})
            except (PeerError, RpcError, trio.TooSlowError):
                pass  # a lost agent is reported by its link; it falls back on its own

        async with trio.open_nursery() as nursery:
            for link in self._links.values():
                nursery.start_soon(tell, link)

    # --- notifications -------------------------------------------------------------------

    async def _on_notice(self, host: str, payload: dict[str, Value]) -> None:
        if "batch" in payload:  # an agent's batch of notices (wire.batch_notice), in order
            try:
                items = wire.batch_items(payload)
            except wire.WireError:
                return
            for item in items:
                await self._on_notice(host, item)
            return
        try:
            notice = wire.parse_notice(payload)
        except wire.WireError:
            return
        if notice.run != self.run_id:
            return
        if notice.event is not None:
            event = notice.event
            await self._publish(event, origin=host)
            if isinstance(event, events.StreamEnded):
                await self._feed(
                    StreamEnded(dev=event.device, total=event.total, digest_ok=event.digest_ok)
                )
            elif isinstance(event, events.SwitchoverAcked):
                await self._feed(SwitchoverAcked(dev=event.device))
        elif notice.progress is not None:
            p = notice.progress
            await self._feed(
                StreamProgress(
                    dev=p.device,
                    raw_bytes=p.raw,
                    wire_bytes=p.wire,
                    busy_ns=p.busy_ns,
                    now_ns=self._now(),
                )
            )
        elif notice.fact is not None:
            f = notice.fact
            match f.kind:
                case FactKind.READ_FAILED:
                    await self._feed(DataReadFailed(dev=f.device, errno=f.errno, offset=f.offset))
                case FactKind.LINK_FAILED if f.errno == _errno.EBADMSG:  # a damaged chunk
                    await self._feed(DataWriteFailed(dev=f.device, errno=f.errno, offset=f.offset))
                case FactKind.CONNECT_FAILED | FactKind.LINK_FAILED:
                    reason = f"{f.step} at offset {f.offset}: {f.message}"
                    await self._feed(StreamBroken(dev=f.device, reason=reason))
                case FactKind.WRITE_FAILED:
                    await self._feed(DataWriteFailed(dev=f.device, errno=f.errno, offset=f.offset))
                case FactKind.HUNG:
                    await self._feed(StepTimedOut(dev=f.device, step=f.step))

    # --- the end -------------------------------------------------------------------------

    async def _close(self) -> None:
        """Let the requests in flight end, close every opened device, say Goodbye."""
        self._finished = True
        for queue in self._queues.values():
            queue.close()
        with trio.move_on_after(CLOSE_TIMEOUT):
            for done in self._drained:
                await done.wait()
        for host, handle in self._opened:
            link = self._links.get(host)
            if link is None or link.failure is not None:
                continue
            try:
                with trio.fail_after(CLOSE_TIMEOUT):
                    await link.request("close_device", {"device": handle})
            except (PeerError, RpcError, trio.TooSlowError):
                pass
        if self._end_hook is not None:
            await self._end_hook({h: k for h, k in self._links.items() if k.failure is None})
        for link in self._links.values():
            await link.aclose("the run is over")
