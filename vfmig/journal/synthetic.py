"""Synthetic runs: the real phase machine driven by a scripted engine, as a stream of events.

Theory of operation
-------------------
:func:`run` feeds :class:`vfmig.core.phases.MigrationMachine` the inputs an engine would,
on a virtual clock, and answers every action the machine asks for the way the scenario
scripts it: devices open with their flags and MIG_DATA_SIZE, state changes walk the
kernel's path (:func:`vfmig.core.fsm.path`) or fail with a scripted errno, streams move
chunks at a scripted rate and latency, precopy samples fall as the initial bytes are sent.
Along the way it yields the observations an engine publishes (ioctls with duration and
errno, state changes, debugfs samples, precopy and MIG_DATA_SIZE samples, chunks sent on
the source host and received on the destination host, acks, stream ends) interleaved with
the machine's own events (phases, decisions, errors, commit, end). Faults -- a busy device,
a failing arc, a refused write, a hung arc, a lost agent, a missing ack -- are injected at
exactly one point, so each failure the machine knows can be produced as the engine would
meet it.

Memory is bounded: chunks are produced one at a time, so a 1 GiB run in 1 MiB chunks is a
stream of a few thousand events that is never held. The journal tests, the diagnosis tests
and the journal-size benchmark use it; it stands in for engine-produced journals until the
engine lands (docs/journal.md, "Testing").
"""

from __future__ import annotations

import errno as _errno
import heapq
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from vfmig.core import events as ev
from vfmig.core import fsm
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.core.model import (
    Abort,
    Action,
    AgentLost,
    Commit,
    DataSizeSampled,
    DataWriteFailed,
    DeviceId,
    DeviceOpened,
    DeviceSpec,
    Emit,
    Finish,
    Input,
    OpenDevice,
    OpenFailed,
    Phase,
    PrecopySampled,
    QueryDataSize,
    QueryPrecopy,
    Reset,
    ResetDone,
    Role,
    SetState,
    SetStateDone,
    SetStateFailed,
    Start,
    StartStream,
    StepTimedOut,
    StopStream,
    StreamBroken,
    StreamEnded,
    StreamPhase,
    StreamProgress,
    SwitchoverAcked,
    Tick,
    destination,
    source,
)
from vfmig.core.phases import MachineConfig, MigrationMachine

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

NS_PER_S: Final = 1_000_000_000
MIB: Final = 1 << 20
TICK_NS: Final = 100_000_000
ORCHESTRATOR: Final = "orchestrator"
SOURCE_HOST: Final = "hostA"
DESTINATION_HOST: Final = "hostB"
#: A run that has not finished after this much virtual time is a bug in the script.
LIMIT_NS: Final = 3600 * NS_PER_S

_ALL = MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY
_FEATURE = "VFIO_DEVICE_FEATURE"
_MIG_DEVICE_STATE = 2
_MIG_DATA_SIZE = 9


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """At most one of each, aimed at one device or arc."""

    busy: DeviceId | None = None  #: opening it fails with EBUSY
    set_fail: Mapping[tuple[DeviceId, str], int] = field(default_factory=dict)  #: arc -> errno
    write_error: tuple[int, int] | None = None  #: (stream offset, errno) on dst0's writes
    hang: tuple[DeviceId, str] | None = None  #: this arc never returns
    no_ack: bool = False  #: destinations never ack their initial data
    lose_host: tuple[str, Phase] | None = None  #: this agent is lost when that phase starts
    break_link: Phase | None = None  #: pair 0's data link breaks when that phase starts
    #: debugfs reads this state after every state change of the device (a driver bug)
    debugfs_lies: tuple[DeviceId, DeviceState] | None = None
    found: Mapping[DeviceId, DeviceState] = field(default_factory=dict)  #: states at open
    abort_in: Phase | None = None  #: SIGINT when this phase starts
    bad_digest: bool = False  #: the destination's end-of-stream digest does not match


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    size: int = 64 * MIB  #: the source's stop-copy stream, bytes
    dst_size: int | None = None  #: the destination's MIG_DATA_SIZE (default: ``size``)
    initial: int = 8 * MIB  #: precopy initial bytes (part of ``size``)
    flags: MigrationFlags = _ALL
    dst_flags: MigrationFlags | None = None
    pairs: int = 1
    chunk: int = MIB
    rate: int = 2 << 30  #: stream bytes per second
    latency_ns: int = 150_000  #: source read to destination write
    ratio: float = 3.4  #: compression on the wire
    faults: Faults = field(default_factory=Faults)
    config: MachineConfig = field(default_factory=MachineConfig)


@dataclass(frozen=True, slots=True)
class Observation:
    at_ns: int  #: true (virtual) time
    host: str  #: ``orchestrator``, ``hostA`` (sources) or ``hostB`` (destinations)
    event: ev.Event


@dataclass(slots=True)
class _Chunk:
    """The next chunk of a stream (an internal queue item, not a machine input)."""

    source: DeviceId
    destination: DeviceId
    generation: int
    offset: int
    end: int  #: stream offset where this stream part ends
    final: bool  #: the part ends at end of stream


@dataclass(order=True, slots=True)
class _Item:
    at_ns: int
    order: int
    payload: Input | _Chunk | None = field(compare=False)  #: None: observations only
    observations: tuple[Observation, ...] = field(compare=False, default=())


def _host(dev: DeviceId) -> str:
    return SOURCE_HOST if dev.role is Role.SOURCE else DESTINATION_HOST


class _Driver:
    def __init__(self, s: Scenario) -> None:
        self.s = s
        pairs = [
            (DeviceSpec(f"sim:a{i}", SOURCE_HOST), DeviceSpec(f"sim:b{i}", DESTINATION_HOST))
            for i in range(s.pairs)
        ]
        self.machine = MigrationMachine(s.config, pairs)
        self.now = 0
        self.queue: list[_Item] = []
        self.order = itertools.count()
        self.state = {
            d: s.faults.found.get(d, DeviceState.RUNNING)
            for i in range(s.pairs)
            for d in (source(i), destination(i))
        }
        self.sent = dict.fromkeys(range(s.pairs), 0)  #: stream bytes sent per pair
        self.generation = dict.fromkeys(range(s.pairs), 0)
        self.busy_ns = dict.fromkeys(range(s.pairs), 0)
        self.chunk_seq = dict.fromkeys(range(s.pairs), 0)
        self.out: list[Observation] = []
        self.finished = False
        self.lost: set[str] = set()

    def flags(self, dev: DeviceId) -> MigrationFlags:
        if dev.role is Role.DESTINATION and self.s.dst_flags is not None:
            return self.s.dst_flags
        return self.s.flags

    def data_size(self, dev: DeviceId) -> int:
        if dev.role is Role.DESTINATION and self.s.dst_size is not None:
            return self.s.dst_size
        return self.s.size

    def observe(self, at: int, dev: DeviceId | None, event: ev.Event) -> Observation:
        return Observation(at, _host(dev) if dev is not None else ORCHESTRATOR, event)

    def schedule(self, at: int, payload: Input | _Chunk | None, *obs: Observation) -> None:
        heapq.heappush(self.queue, _Item(at, next(self.order), payload, obs))

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> Iterator[Observation]:
        self.feed(Start(now_ns=0))
        yield from self.drain()
        next_tick = TICK_NS
        while not self.finished:
            if self.now > LIMIT_NS:
                raise RuntimeError("the synthetic run did not finish")
            if self.queue and self.queue[0].at_ns <= next_tick:
                item = heapq.heappop(self.queue)
                self.now = max(self.now, item.at_ns)
                self.out.extend(item.observations)
                if isinstance(item.payload, _Chunk):
                    self.chunk(item.payload)
                elif item.payload is not None:
                    self.feed(item.payload)
            else:
                self.now = next_tick
                next_tick += TICK_NS
                self.feed(Tick(now_ns=self.now))
            yield from self.drain()

    def drain(self) -> Iterator[Observation]:
        out, self.out = self.out, []
        yield from out

    def feed(self, inp: Input) -> None:
        for action in self.machine.handle(inp):
            self.execute(action)

    # --- actions -----------------------------------------------------------------------------

    def execute(self, action: Action) -> None:
        now = self.now
        match action:
            case Emit(event=event):
                self.out.append(Observation(now, ORCHESTRATOR, event))
                if isinstance(event, ev.PhaseChanged):
                    self.phase_started(event.phase)
            case Finish():
                self.finished = True
            case OpenDevice(dev=dev):
                self.open(dev)
            case SetState():
                self.set_state(action)
            case Reset(dev=dev):
                at = now + 2_000_000
                before = self.state[dev]
                self.state[dev] = DeviceState.RUNNING
                self.schedule(
                    at,
                    ResetDone(dev=dev),
                    self.observe(
                        at, dev, self.ioctl(dev, "VFIO_DEVICE_RESET", (), None, 2_000_000)
                    ),
                    self.observe(
                        at,
                        dev,
                        ev.StateChanged(
                            device=dev, before=before, after=DeviceState.RUNNING, step="reset"
                        ),
                    ),
                    *self.debugfs(at, dev),
                )
            case QueryPrecopy(dev=dev):
                self.query_precopy(dev)
            case QueryDataSize(dev=dev):
                at = now + 50_000
                size = max(self.s.size - self.sent[dev.index], 0)
                self.schedule(
                    at,
                    DataSizeSampled(dev=dev, size=size),
                    self.observe(
                        at,
                        dev,
                        self.ioctl(
                            dev, _FEATURE, (("feature", _MIG_DATA_SIZE), ("get", 1)), None, 50_000
                        ),
                    ),
                    self.observe(at, dev, ev.DataSizeSampled(device=dev, size=size)),
                )
            case StartStream():
                self.start_stream(action)
            case StopStream(source=src):
                self.generation[src.index] += 1
            case Commit():
                pass
            case _:
                raise TypeError(f"the synthetic engine cannot execute {action!r}")

    def phase_started(self, phase: Phase) -> None:
        faults = self.s.faults
        if faults.lose_host is not None:
            host, when = faults.lose_host
            if phase is when and host not in self.lost:
                self.lost.add(host)
                self.schedule(self.now + 1_000_000, AgentLost(host=host))
        if faults.break_link is phase:
            reason = "data link at offset 0: connection reset by peer"
            self.schedule(self.now + 1_000_000, StreamBroken(dev=destination(0), reason=reason))
        if faults.abort_in is phase:
            self.schedule(self.now + 1_000_000, Abort(reason="Ctrl-C", signal="SIGINT"))

    @staticmethod
    def ioctl(
        dev: DeviceId, name: str, args: tuple[tuple[str, int], ...], errno: int | None, ns: int
    ) -> ev.IoctlCompleted:
        return ev.IoctlCompleted(
            device=dev, name=name, args=args, result=-1 if errno else 0, errno=errno, duration_ns=ns
        )

    def debugfs(self, at: int, dev: DeviceId) -> tuple[Observation, ...]:
        state = self.state[dev]
        lie = self.s.faults.debugfs_lies
        if lie is not None and lie[0] == dev:
            state = lie[1]
        sample = ev.DebugfsSampled(device=dev, state=state, text=state.name, duration_ns=30_000)
        return (self.observe(at, dev, sample),)

    def open(self, dev: DeviceId) -> None:
        at = self.now + 5_000_000
        if dev in self.lost_devices():
            return
        if self.s.faults.busy == dev:
            self.schedule(at, OpenFailed(dev=dev, errno=_errno.EBUSY, message="device busy"))
            return
        name = f"sim:{'a' if dev.role is Role.SOURCE else 'b'}{dev.index}"
        identity = f"{_host(dev)}:{name}"
        flags, size = self.flags(dev), self.data_size(dev)
        self.schedule(
            at,
            DeviceOpened(
                dev=dev, identity=identity, flags=flags, state=self.state[dev], data_size=size
            ),
            self.observe(
                at,
                dev,
                ev.DeviceOpened(
                    device=dev,
                    identity=identity,
                    flags=flags,
                    state=self.state[dev],
                    data_size=size,
                ),
            ),
            *self.debugfs(at, dev),
        )

    def lost_devices(self) -> set[DeviceId]:
        return {d for d in self.state if _host(d) in self.lost}

    def set_state(self, action: SetState) -> None:
        dev, target = action.dev, action.target
        if dev in self.lost_devices():
            return
        arc = action.arc
        before = self.state[dev]
        args = (("feature", _MIG_DEVICE_STATE), ("set", 1), ("device_state", int(target)))
        duration = 1_000_000
        at = self.now + duration
        if self.s.faults.hang == (dev, arc):
            self.schedule(self.now + action.timeout_ns, StepTimedOut(dev=dev, step=arc))
            return
        errno = self.s.faults.set_fail.get((dev, arc))
        if errno is not None:
            self.schedule(
                at,
                SetStateFailed(dev=dev, target=target, errno=errno, state_after=before),
                self.observe(at, dev, self.ioctl(dev, _FEATURE, args, errno, duration)),
                *self.debugfs(at, dev),
            )
            return
        assert fsm.path(before, target, self.flags(dev)).states, (before, target)
        self.state[dev] = target
        self.schedule(
            at,
            SetStateDone(dev=dev, target=target),
            self.observe(at, dev, self.ioctl(dev, _FEATURE, args, None, duration)),
            self.observe(
                at, dev, ev.StateChanged(device=dev, before=before, after=target, step=arc)
            ),
            *self.debugfs(at, dev),
        )

    def query_precopy(self, dev: DeviceId) -> None:
        at = self.now + 80_000
        initial = max(self.s.initial - self.sent[dev.index], 0)
        self.schedule(
            at,
            PrecopySampled(dev=dev, initial=initial, dirty=0, reinit=False, now_ns=at),
            self.observe(
                at, dev, ev.PrecopySampled(device=dev, initial=initial, dirty=0, reinit=False)
            ),
        )

    # --- streams -----------------------------------------------------------------------------

    def start_stream(self, action: StartStream) -> None:
        i = action.source.index
        self.out.append(
            self.observe(
                self.now,
                None,
                ev.StreamStarted(
                    source=action.source, destination=action.destination, phase=action.phase
                ),
            )
        )
        self.generation[i] += 1
        if action.phase is StreamPhase.PRECOPY:
            end, final = min(self.s.initial, self.s.size), False
        else:
            end, final = self.s.size, True
        self.schedule(
            self.now,
            _Chunk(action.source, action.destination, self.generation[i], self.sent[i], end, final),
        )

    def chunk(self, c: _Chunk) -> None:
        i = c.source.index
        if c.generation != self.generation[i] or _host(c.destination) in self.lost:
            return
        n = min(self.s.chunk, c.end - c.offset)
        final = c.final and c.offset + n >= c.end
        if n <= 0 and not final:
            if not self.s.faults.no_ack:
                at = self.now + self.s.latency_ns
                ack = ev.SwitchoverAcked(device=c.destination)
                self.schedule(
                    at, SwitchoverAcked(dev=c.destination), self.observe(at, c.destination, ack)
                )
            return
        duration = max(n * NS_PER_S // self.s.rate, 1_000)
        sent_at = self.now + duration
        recv_at = sent_at + self.s.latency_ns
        wire = max(int(n / self.s.ratio), 1) if n else 0
        seq = self.chunk_seq[i]
        self.chunk_seq[i] += 1
        write_error = self.s.faults.write_error
        if write_error is not None and c.offset <= write_error[0] < c.offset + max(n, 1):
            self.schedule(
                recv_at,
                DataWriteFailed(dev=c.destination, errno=write_error[1], offset=write_error[0]),
            )
            return
        self.sent[i] = c.offset + n
        self.busy_ns[i] += duration
        sent = ev.ChunkSent(
            device=c.source, seq=seq, offset=c.offset, raw=n, wire=wire, final=final
        )
        got = ev.ChunkReceived(
            device=c.destination, seq=seq, offset=c.offset, raw=n, wire=wire, final=final
        )
        progress = StreamProgress(
            dev=c.source,
            raw_bytes=self.sent[i],
            wire_bytes=0,
            busy_ns=self.busy_ns[i],
            now_ns=sent_at,
        )
        self.schedule(sent_at, progress, self.observe(sent_at, c.source, sent))
        self.schedule(recv_at, None, self.observe(recv_at, c.destination, got))
        if final:
            ok = not self.s.faults.bad_digest
            done = ev.StreamEnded(device=c.destination, total=self.sent[i], digest_ok=ok)
            self.schedule(
                recv_at + 1_000,
                StreamEnded(dev=c.destination, total=self.sent[i], digest_ok=ok),
                self.observe(recv_at + 1_000, c.destination, done),
            )
            return
        nxt = _Chunk(c.source, c.destination, c.generation, c.offset + n, c.end, c.final)
        self.schedule(sent_at, nxt)


def run(scenario: Scenario) -> Iterator[Observation]:
    """The observations of one synthetic run, in the order an engine would publish them.

    Times are the true (virtual) times; observations of one host are in time order, and
    a chunk's ChunkReceived (destination host) may come after later source events.
    """
    return _Driver(scenario).run()
