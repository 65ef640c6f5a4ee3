"""The migration as a pure state machine: inputs in, actions out, no I/O and no clock.

Theory of operation
-------------------
:class:`MigrationMachine` decides; an engine executes. The engine feeds it *inputs*
(frozen dataclasses, facts in the past tense: ``SetStateDone``, ``StreamEnded``,
``Tick(now_ns)``...) through :meth:`MigrationMachine.handle`, which never blocks and
returns a list of *actions* (``SetState``, ``StartStream``, ``Commit``, ``Emit``,
``Finish``...). Time enters only as ``now_ns`` fields, so every decision, timeout
included, is reproducible from the input list alone: that is how the tests run it.

Contract with the engine:

* Actions are started in list order. State changes, resets and queries on one device are
  executed one at a time in order; different devices may run concurrently. ``Commit``
  must complete (durably journaled, every agent told) before any later action starts.
* Every ``OpenDevice``/``SetState``/``Reset`` gets exactly one answer
  (``DeviceOpened``/``OpenFailed``, ``SetStateDone``/``SetStateFailed``,
  ``ResetDone``/``ResetFailed``), or ``StepTimedOut`` after the action's ``timeout_ns``.
  A failed SET is answered with the state read back right after it (``state_after``,
  None if unreadable): recovery is decided from that, here.
* ``Tick`` arrives regularly (every 50-100 ms): phase deadlines and precopy sampling are
  derived from it. Stream samples, precopy samples and acks arrive as they happen.
* After ``Finish`` the machine ignores every input (a hung step may still answer).

The run goes through :class:`~vfmig.core.model.Phase` s in order, each a few *stages*;
a stage sends one batch of state changes (one per device) and waits for all of them:

========== ===================================================================
PREFLIGHT  open every device; refuse the run (changing nothing) on a bad pair
SETUP      destinations -> RESUMING; with precopy, then sources -> PRE_COPY
PRECOPY    stream while the sources run; query precopy progress every sample
           interval; switch when :func:`vfmig.core.policy.decide` says so *and*
           every destination acked its initial data (a REINIT needs a new ack)
SWITCHOVER with several pairs: every source -> PRE_COPY_P2P/RUNNING_P2P; then
           every source -> STOP_COPY
STOPCOPY   drain every stream to end of stream; the destination checks the digest
RESUME     destinations RESUMING -> STOP (*prepared*); with several pairs, every
           destination -> RUNNING_P2P before any runs
COMMIT     ``Commit`` (point of no return), destinations -> RUNNING, then only
           sources STOP_COPY -> STOP (outside the downtime window)
========== ===================================================================

Failure policy (``docs/failure-policy.md`` holds the table the tests check): before the
commit point any failure stops every stream, brings every source back to RUNNING and
resets every destination that was touched (a destination is never stepped out of
RESUMING); after it, the commit is finished and no source is ever run again. Each
device's way back is :func:`recovery_step`, which the agents' :func:`agent_fallback`
shares: through the FSM where it can (never a blocked arc: STOP_COPY goes to STOP
first), by reset where it must, one attempt each. A device that does not return from a
step is reported hung and abandoned; the run finishes without waiting for it.

Pure: stdlib only.
"""

from __future__ import annotations

import enum
import errno as _errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from vfmig.core import fsm
from vfmig.core.errors import UsageError
from vfmig.core.events import (
    CommitPointPassed,
    DecisionMade,
    DeviceHung,
    ErrorRaised,
    Event,
    PeerLost,
    PhaseChanged,
    RunFinished,
)
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.core.model import (
    CAUSES,
    Abort,
    Action,
    AgentLost,
    AskPeer,
    Cause,
    Commit,
    DataReadFailed,
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
    Outcome,
    Phase,
    PrecopySampled,
    Query,
    QueryDataSize,
    QueryFailed,
    QueryPrecopy,
    RecordVerdict,
    Reset,
    ResetDone,
    ResetFailed,
    Role,
    SetState,
    SetStateDone,
    SetStateFailed,
    Start,
    StartStream,
    StateObserved,
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
from vfmig.core.policy import (
    ConvergenceConfig,
    Goal,
    PairProgress,
    Rule,
    StepKind,
    data_size_sample,
    decide,
    precopy_sample,
    recovery_step,
    staging_ready,
    stream_sample,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

NS_PER_S: Final = 1_000_000_000
NS_PER_MS: Final = 1_000_000

_S = DeviceState

# --- configuration ---------------------------------------------------------------------------


class PrecopyMode(enum.Enum):
    AUTO = "auto"  #: precopy when both devices of every pair have PRE_COPY
    OFF = "off"  #: never precopy
    REQUIRE = "require"  #: refuse a run that cannot precopy


@dataclass(frozen=True, slots=True, kw_only=True)
class PhaseTimeouts:
    """How long each phase may take. COMMIT has none: after the point of no return there is
    nothing to time out to, and a step that hangs is caught by the step timeout."""

    preflight_ns: int = 30 * NS_PER_S
    setup_ns: int = 60 * NS_PER_S
    precopy_ns: int = 180 * NS_PER_S  #: must exceed the precopy cap: acks may come late
    switchover_ns: int = 30 * NS_PER_S
    stopcopy_ns: int = 600 * NS_PER_S  #: draining "100s of MB" over a slow link
    resume_ns: int = 60 * NS_PER_S
    rollback_ns: int = 120 * NS_PER_S

    def of(self, phase: Phase) -> int | None:
        return {
            Phase.PREFLIGHT: self.preflight_ns,
            Phase.SETUP: self.setup_ns,
            Phase.PRECOPY: self.precopy_ns,
            Phase.SWITCHOVER: self.switchover_ns,
            Phase.STOPCOPY: self.stopcopy_ns,
            Phase.RESUME: self.resume_ns,
            Phase.ROLLBACK: self.rollback_ns,
        }.get(phase)


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineConfig:
    precopy: PrecopyMode = PrecopyMode.AUTO
    #: Let a multi-device run go without P2P on every device (QEMU refuses it).
    allow_no_p2p: bool = False
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    timeouts: PhaseTimeouts = field(default_factory=PhaseTimeouts)
    #: One ioctl, data read or write may take this long before its device counts as hung.
    step_timeout_ns: int = 30 * NS_PER_S
    #: Precopy progress is queried this often (mlx5 may start a firmware SAVE per query).
    sample_interval_ns: int = 100 * NS_PER_MS

    def __post_init__(self) -> None:
        limits = [getattr(self.timeouts, f) for f in self.timeouts.__slots__]
        if min(limits) <= 0 or self.step_timeout_ns <= 0 or self.sample_interval_ns <= 0:
            raise UsageError("timeouts and the sample interval must be positive")
        if self.timeouts.precopy_ns <= self.convergence.max_precopy_ns:
            raise UsageError(
                "the precopy timeout must be longer than the precopy time cap",
                hint="the cap decides the switchover; the timeout gives up waiting for acks",
            )


def _maybe_states(
    state: DeviceState | None, target: DeviceState | None, flags: MigrationFlags
) -> str:
    """What is known of a device whose request did not return: where it may be."""
    if state is None:
        return "its state is unknown"
    if target is None:
        return f"it was last seen in {state.name}"
    along = fsm.path(state, target, flags).states
    if not along:
        return f"it was last seen in {state.name}"
    return f"it is in {state.name} or any of {', '.join(s.name for s in along)}"


# --- the machine -----------------------------------------------------------------------------


class _Stage(enum.Enum):
    OPEN = "open"
    DST_RESUMING = "destinations to RESUMING"
    SRC_PRECOPY = "sources to PRE_COPY"
    ITERATE = "precopy iterations"
    SRC_STAGE = "sources to P2P"
    SRC_STOPCOPY = "sources to STOP_COPY"
    DRAIN = "drain"
    DST_VALIDATE = "destinations to STOP"
    DST_STAGE = "destinations to RUNNING_P2P"
    DST_START = "destinations to RUNNING"
    SRC_PARK = "sources to STOP"


_STAGE_PHASE: Final = {
    _Stage.OPEN: Phase.PREFLIGHT,
    _Stage.DST_RESUMING: Phase.SETUP,
    _Stage.SRC_PRECOPY: Phase.SETUP,
    _Stage.ITERATE: Phase.PRECOPY,
    _Stage.SRC_STAGE: Phase.SWITCHOVER,
    _Stage.SRC_STOPCOPY: Phase.SWITCHOVER,
    _Stage.DRAIN: Phase.STOPCOPY,
    _Stage.DST_VALIDATE: Phase.RESUME,
    _Stage.DST_STAGE: Phase.RESUME,
    _Stage.DST_START: Phase.COMMIT,
    _Stage.SRC_PARK: Phase.COMMIT,
}

_Request = OpenDevice | SetState | Reset
_NO_FLAGS: Final = MigrationFlags(0)


@dataclass(slots=True)
class _Dev:
    id: DeviceId
    spec: DeviceSpec
    flags: MigrationFlags = _NO_FLAGS
    state: DeviceState | None = None
    found: DeviceState | None = None  #: the state it was found in at open
    opened: bool = False
    identity: str = ""
    data_size: int | None = None  #: at open
    pending: _Request | None = None
    touched: bool = False  #: a SET or reset was sent to it in this run
    hung: bool = False
    lost: bool = False
    goal: Goal | None = None
    may_reset: bool = True
    recovery_failed: bool = False
    reset_done: bool = False

    @property
    def gone(self) -> bool:
        """Hung or lost: never commanded again by this machine."""
        return self.hung or self.lost

    @property
    def busy(self) -> bool:
        return isinstance(self.pending, SetState | Reset)

    @property
    def settled(self) -> bool:
        return self.gone or (not self.busy and self.goal is None)


@dataclass(slots=True)
class _Pair:
    src: DeviceId
    dst: DeviceId
    streaming: bool = False
    drained: bool = False
    acked: bool = False
    progress: PairProgress = field(default_factory=PairProgress)
    querying: set[Query] = field(default_factory=set)
    last_query_ns: int | None = None


class MigrationMachine:
    """One migration run of ``pairs`` (source spec, destination spec), as a pure machine.

    Pair *i* is ``src<i>`` -> ``dst<i>``. See the module docstring for the contract.
    """

    def __init__(
        self, config: MachineConfig, pairs: Sequence[tuple[DeviceSpec, DeviceSpec]]
    ) -> None:
        if not pairs:
            raise UsageError("nothing to migrate: no device pair was given")
        self.config = config
        self._pairs = [_Pair(source(i), destination(i)) for i in range(len(pairs))]
        self._devs: dict[DeviceId, _Dev] = {}
        for i, (src, _) in enumerate(pairs):
            self._devs[source(i)] = _Dev(source(i), src)
        for i, (_, dst) in enumerate(pairs):
            self._devs[destination(i)] = _Dev(destination(i), dst)
        self._phase: Phase | None = None
        self._phase_since = 0
        self._now = 0
        self._stage: _Stage | None = None
        self._batch: dict[DeviceId, DeviceState] = {}
        self._precopy = False
        self._staged = False
        self._precopy_since = 0
        self._switch_decided = False
        self._committed = False
        self._rolling_back = False
        self._failure: Outcome | None = None
        self._first_error: str | None = None
        self._hung = False
        self._in_doubt = False
        self._finished = False
        self._last_rule: Rule | None = None
        self._waiting_for: tuple[DeviceId, ...] = ()
        self._abort_noted = False
        self._out: list[Action] = []

    @property
    def phase(self) -> Phase | None:
        """The current phase; None before ``Start``."""
        return self._phase

    # --- entry point ---------------------------------------------------------------------

    def handle(self, inp: Input) -> list[Action]:
        """Take one input; return the actions it calls for, in the order to start them."""
        if self._finished:
            return []
        if self._phase is None and not isinstance(inp, Start):
            raise RuntimeError(f"{type(inp).__name__} before Start")
        self._out = []
        match inp:
            case Start() | Tick() | PrecopySampled() | StreamProgress():
                self._now = max(self._now, inp.now_ns)
        match inp:
            case Start():
                self._on_start()
            case DeviceOpened():
                self._on_opened(inp)
            case OpenFailed():
                self._on_open_failed(inp)
            case StateObserved():
                self._on_observed(inp)
            case SetStateDone():
                self._on_set_done(inp)
            case SetStateFailed():
                self._on_set_failed(inp)
            case ResetDone() | ResetFailed():
                self._on_reset(inp)
            case PrecopySampled():
                self._on_precopy(inp)
            case DataSizeSampled():
                self._on_data_size(inp)
            case QueryFailed():
                self._on_query_failed(inp)
            case StreamProgress():
                self._on_progress(inp)
            case SwitchoverAcked():
                self._on_ack(inp)
            case StreamEnded():
                self._on_stream_ended(inp)
            case DataWriteFailed() | DataReadFailed():
                self._on_data_failed(inp)
            case AgentLost():
                self._on_agent_lost(inp)
            case StreamBroken():
                self._on_stream_broken(inp)
            case StepTimedOut():
                self._on_timed_out(inp)
            case Tick():
                self._on_tick()
            case Abort():
                self._on_abort(inp)
            case _:
                raise TypeError(f"not a machine input: {inp!r}")
        return self._out

    # --- helpers -------------------------------------------------------------------------

    def _dev(self, dev_id: DeviceId) -> _Dev:
        try:
            return self._devs[dev_id]
        except KeyError:
            raise ValueError(f"{dev_id} is not a device of this run") from None

    def _pair(self, dev_id: DeviceId) -> _Pair:
        self._dev(dev_id)
        return self._pairs[dev_id.index]

    def _emit(self, event: Event) -> None:
        self._out.append(Emit(event=event))

    def _decision(self, rule: str, text: str, numbers: tuple[tuple[str, float], ...] = ()) -> None:
        self._emit(DecisionMade(rule=rule, numbers=numbers, text=text))

    def _set_phase(self, phase: Phase) -> None:
        self._emit(PhaseChanged(phase=phase, previous=self._phase))
        self._phase = phase
        self._phase_since = self._now

    def _send(self, dev: _Dev, action: _Request) -> None:
        dev.pending = action
        if not isinstance(action, OpenDevice):
            dev.touched = True
        self._out.append(action)

    def _set(self, dev: _Dev, target: DeviceState, *, recover: bool) -> None:
        assert dev.state is not None, "a SET is only planned from a known state"
        assert fsm.vfmig_refusal(dev.state, target, dev.flags) is None, (dev.state, target)
        self._send(
            dev,
            SetState(
                dev=dev.id,
                current=dev.state,
                target=target,
                recover=recover,
                timeout_ns=self.config.step_timeout_ns,
            ),
        )

    def _error(
        self,
        dev: _Dev | None,
        cause: Cause,
        step: str,
        *,
        errno: int | None = None,
        detail: str | None = None,
    ) -> None:
        known = CAUSES[cause]
        message = f"{known.explanation} ({detail})" if detail else known.explanation
        assert self._phase is not None
        self._emit(
            ErrorRaised(
                device=dev.id if dev else None,
                phase=self._phase,
                step=step,
                errno=errno,
                cause=cause,
                message=message,
                hint=known.hint,
            )
        )
        if self._first_error is None:
            who = f"{dev.id} ({dev.spec.name}): " if dev else ""
            self._first_error = f"{who}{step}: {message}"

    def _fail(
        self,
        dev: _Dev | None,
        cause: Cause,
        step: str,
        *,
        errno: int | None = None,
        detail: str | None = None,
        outcome: Outcome = Outcome.FAILED,
    ) -> None:
        """Report a failure; before the commit point it starts the rollback."""
        self._error(dev, cause, step, errno=errno, detail=detail)
        if self._failure is None:
            self._failure = outcome
        if not self._committed and not self._rolling_back:
            self._start_rollback()

    def _stop_stream(self, pair: _Pair) -> None:
        if pair.streaming:
            pair.streaming = False
            self._out.append(StopStream(source=pair.src, destination=pair.dst))

    # --- the forward path ----------------------------------------------------------------

    def _on_start(self) -> None:
        if self._phase is not None:
            return
        self._stage = _Stage.OPEN
        self._set_phase(Phase.PREFLIGHT)
        for dev in self._devs.values():
            self._send(dev, OpenDevice(dev=dev.id, timeout_ns=self.config.step_timeout_ns))

    def _on_opened(self, inp: DeviceOpened) -> None:
        dev = self._dev(inp.dev)
        if self._stage is not _Stage.OPEN or not isinstance(dev.pending, OpenDevice):
            return
        dev.pending = None
        dev.opened = True
        dev.identity = inp.identity
        dev.flags = inp.flags
        dev.state = dev.found = inp.state
        dev.data_size = inp.data_size
        if dev.id.role is Role.SOURCE:
            pair = self._pair(dev.id)
            pair.progress = data_size_sample(pair.progress, inp.data_size)
        if all(d.opened for d in self._devs.values()):
            self._preflight()

    def _on_open_failed(self, inp: OpenFailed) -> None:
        dev = self._dev(inp.dev)
        if self._stage is not _Stage.OPEN or not isinstance(dev.pending, OpenDevice):
            return
        dev.pending = None
        cause = Cause.DEVICE_BUSY if inp.errno == _errno.EBUSY else Cause.OPEN_FAILED
        self._fail(dev, cause, "open", errno=inp.errno, detail=inp.message, outcome=Outcome.REFUSED)

    def _preflight(self) -> None:
        """Check every device and pair; refuse the run, changing nothing, on any problem."""
        refusals: list[tuple[_Dev | None, Cause, str]] = []
        seen: dict[str, _Dev] = {}
        for dev in self._devs.values():
            if dev.identity in seen:
                other = seen[dev.identity]
                refusals.append(
                    (dev, Cause.SAME_DEVICE, f"{other.id} and {dev.id} are both {dev.identity}")
                )
            seen[dev.identity] = dev
        for dev in self._devs.values():
            assert dev.state is not None
            if MigrationFlags.STOP_COPY not in dev.flags:
                refusals.append((dev, Cause.NOT_MIGRATABLE, f"flags {fsm.flag_names(dev.flags)}"))
            allowed = (_S.RUNNING,) if dev.id.role is Role.SOURCE else (_S.RUNNING, _S.STOP)
            if dev.state not in allowed:
                refusals.append((dev, Cause.LEFTOVER_STATE, f"found in {dev.state.name}"))
        all_p2p = all(MigrationFlags.P2P in d.flags for d in self._devs.values())
        if len(self._pairs) > 1 and not all_p2p and not self.config.allow_no_p2p:
            lacking = [str(d.id) for d in self._devs.values() if MigrationFlags.P2P not in d.flags]
            refusals.append((None, Cause.NO_P2P, f"{', '.join(lacking)} lack P2P"))
        no_precopy = [
            p
            for p in self._pairs
            if not all(MigrationFlags.PRE_COPY in self._devs[d].flags for d in (p.src, p.dst))
        ]
        if self.config.precopy is PrecopyMode.REQUIRE and no_precopy:
            names = ", ".join(f"{p.src}->{p.dst}" for p in no_precopy)
            refusals.append((None, Cause.FLAGS_MISMATCH, f"precopy is required but {names} cannot"))
        if refusals:
            same = any(cause is Cause.SAME_DEVICE for _, cause, _ in refusals)
            for who, cause, detail in refusals:
                self._error(who, cause, "preflight", detail=detail)
            self._failure = Outcome.INVALID if same else Outcome.REFUSED
            self._finish()
            return
        self._plan(no_precopy, all_p2p)
        self._begin(_Stage.DST_RESUMING)

    def _plan(self, no_precopy: list[_Pair], all_p2p: bool) -> None:
        """Decide precopy and P2P staging, and say why."""
        n = len(self._pairs)
        self._precopy = not no_precopy and self.config.precopy is not PrecopyMode.OFF
        if self._precopy:
            why = "every device has PRE_COPY"
        elif no_precopy:
            why = f"{no_precopy[0].src}->{no_precopy[0].dst} cannot precopy (PRE_COPY missing)"
        else:
            why = "precopy is turned off"
        self._decision(
            "precopy",
            f"{'precopy' if self._precopy else 'stop-copy only'}: {why}",
            (("precopy", float(self._precopy)), ("pairs", float(n))),
        )
        self._staged = n > 1 and all_p2p
        if n > 1:
            text = (
                "P2P staging: every source reaches a P2P state before any stops, every "
                "destination reaches RUNNING_P2P before any runs"
                if self._staged
                else "no P2P staging: not every device has P2P (allowed by configuration)"
            )
            self._decision("p2p-staging", text, (("staged", float(self._staged)),))
        for pair in self._pairs:
            src, dst = self._devs[pair.src], self._devs[pair.dst]
            if (
                src.data_size is not None
                and dst.data_size is not None
                and src.data_size != dst.data_size
            ):
                self._decision(
                    "size-estimate",
                    f"{src.id} estimates {src.data_size} bytes of state, {dst.id} "
                    f"{dst.data_size}: going on, MIG_DATA_SIZE is only an estimate",
                    (
                        ("source_bytes", float(src.data_size)),
                        ("destination_bytes", float(dst.data_size)),
                    ),
                )

    def _next_stage(self, stage: _Stage) -> _Stage | None:
        stopping = _Stage.SRC_STAGE if self._staged else _Stage.SRC_STOPCOPY
        return {
            _Stage.DST_RESUMING: _Stage.SRC_PRECOPY if self._precopy else stopping,
            _Stage.SRC_PRECOPY: _Stage.ITERATE,
            _Stage.ITERATE: stopping,
            _Stage.SRC_STAGE: _Stage.SRC_STOPCOPY,
            _Stage.SRC_STOPCOPY: _Stage.DRAIN,
            _Stage.DRAIN: _Stage.DST_VALIDATE,
            _Stage.DST_VALIDATE: _Stage.DST_STAGE if self._staged else _Stage.DST_START,
            _Stage.DST_STAGE: _Stage.DST_START,
            _Stage.DST_START: _Stage.SRC_PARK,
        }.get(stage)

    def _advance(self) -> None:
        assert self._stage is not None
        nxt = self._next_stage(self._stage)
        if nxt is None:
            self._stage = None
            self._maybe_finish()
        else:
            self._begin(nxt)

    def _begin(self, stage: _Stage) -> None:
        self._stage = stage
        phase = _STAGE_PHASE[stage]
        if phase is not self._phase:
            self._set_phase(phase)
        sources = [self._devs[p.src] for p in self._pairs]
        destinations = [self._devs[p.dst] for p in self._pairs]
        targets: list[tuple[_Dev, DeviceState]] = []
        match stage:
            case _Stage.DST_RESUMING:
                targets = [(d, _S.RESUMING) for d in destinations]
            case _Stage.SRC_PRECOPY:
                targets = [(s, _S.PRE_COPY) for s in sources]
            case _Stage.ITERATE | _Stage.DRAIN:
                phase_ = StreamPhase.PRECOPY if stage is _Stage.ITERATE else StreamPhase.STOPCOPY
                for pair in self._pairs:
                    pair.streaming = True
                    self._out.append(
                        StartStream(
                            source=pair.src,
                            destination=pair.dst,
                            phase=phase_,
                            step_timeout_ns=self.config.step_timeout_ns,
                        )
                    )
                if stage is _Stage.ITERATE:
                    self._precopy_since = self._now
                    self._evaluate()
                    if self._stage is _Stage.ITERATE:
                        self._sample()
                return
            case _Stage.SRC_STAGE:
                targets = [
                    (s, _S.PRE_COPY_P2P if s.state is _S.PRE_COPY else _S.RUNNING_P2P)
                    for s in sources
                ]
            case _Stage.SRC_STOPCOPY:
                targets = [(s, _S.STOP_COPY) for s in sources]
            case _Stage.DST_VALIDATE:
                targets = [(d, _S.STOP) for d in destinations]
            case _Stage.DST_STAGE:
                targets = [(d, _S.RUNNING_P2P) for d in destinations]
            case _Stage.DST_START:
                self._committed = True
                everyone = tuple(self._devs)
                self._out.append(Commit(devices=everyone))
                self._emit(CommitPointPassed(devices=everyone))
                targets = [(d, _S.RUNNING) for d in destinations if not d.gone]
            case _Stage.SRC_PARK:
                # a source found elsewhere after the commit point is left to recovery
                targets = [
                    (s, _S.STOP)
                    for s in sources
                    if not s.gone and s.goal is None and s.state is _S.STOP_COPY
                ]
        self._batch = {dev.id: target for dev, target in targets}
        for dev, target in targets:
            self._set(dev, target, recover=False)
        if not targets:
            self._advance()

    def _on_set_done(self, inp: SetStateDone) -> None:
        dev = self._dev(inp.dev)
        request = dev.pending
        if not isinstance(request, SetState) or request.target is not inp.target:
            return
        dev.pending = None
        dev.state = inp.target
        if self._batch.pop(dev.id, None) is not None and not self._batch:
            self._advance()
        self._drive()
        self._maybe_finish()

    def _on_set_failed(self, inp: SetStateFailed) -> None:
        dev = self._dev(inp.dev)
        request = dev.pending
        if not isinstance(request, SetState) or request.target is not inp.target:
            return
        dev.pending = None
        dev.state = inp.state_after
        after = inp.state_after.name if inp.state_after is not None else "unreadable"
        detail = f"state read back afterwards: {after}"
        if request.recover:
            dev.recovery_failed = True
            self._error(dev, Cause.RECOVERY_FAILED, request.arc, errno=inp.errno, detail=detail)
        elif self._rolling_back:
            self._error(dev, Cause.SET_FAILED, request.arc, errno=inp.errno, detail=detail)
        elif self._committed:
            self._batch.pop(dev.id, None)
            self._set_failed_after_commit(dev, request, inp.errno, detail)
            if self._stage is not None and not self._batch:
                self._advance()
        else:
            self._batch.pop(dev.id, None)
            self._fail(
                dev,
                self._set_cause(dev, request, inp.errno),
                request.arc,
                errno=inp.errno,
                detail=detail,
            )
        self._drive()
        self._maybe_finish()

    def _set_cause(self, dev: _Dev, request: SetState, errno: int | None) -> Cause:
        if errno == _errno.EBUSY:
            return Cause.DEVICE_BUSY
        if request.current is _S.RESUMING and request.target is _S.STOP:
            return Cause.SIZE_MISMATCH if self._sizes_differ(dev.id) else Cause.STREAM_REJECTED
        return Cause.SET_FAILED

    def _sizes_differ(self, dev_id: DeviceId) -> bool:
        pair = self._pair(dev_id)
        a, b = self._devs[pair.src].data_size, self._devs[pair.dst].data_size
        return a is not None and b is not None and a != b

    def _set_failed_after_commit(
        self, dev: _Dev, request: SetState, errno: int | None, detail: str
    ) -> None:
        """Past the point of no return: keep both sides stopped rather than undo anything."""
        if dev.id.role is Role.DESTINATION:
            if dev.state is _S.RUNNING:
                return  # it did start; the error came after
            self._error(dev, Cause.START_FAILED, request.arc, errno=errno, detail=detail)
            if self._failure is None:
                self._failure = Outcome.FAILED
            dev.goal = Goal.STOP
        elif dev.state is not _S.STOP:
            self._error(dev, Cause.PARK_FAILED, request.arc, errno=errno, detail=detail)

    def _on_observed(self, inp: StateObserved) -> None:
        dev = self._dev(inp.dev)
        if dev.busy or dev.gone or not dev.opened or inp.state is dev.state:
            return
        was = dev.state.name if dev.state is not None else "unknown"
        now = inp.state.name if inp.state is not None else "unreadable"
        dev.state = inp.state
        if self._stage is _Stage.OPEN:
            return  # preflight checks the state it reads last
        detail = f"expected {was}, read {now}"
        if not self._committed and not self._rolling_back:
            self._fail(dev, Cause.STATE_DRIFT, inp.step, errno=inp.errno, detail=detail)
            return
        self._error(dev, Cause.STATE_DRIFT, inp.step, errno=inp.errno, detail=detail)
        if dev.goal is None:
            dev.goal = self._goal_after_drift(dev)
        dev.recovery_failed = dev.reset_done = False  # a new situation: a new attempt
        self._drive()
        self._maybe_finish()

    def _goal_after_drift(self, dev: _Dev) -> Goal:
        """Where a device found somewhere unexpected goes, by the side of the commit point."""
        if not self._committed:
            return Goal.RUNNING if dev.id.role is Role.SOURCE else Goal.RESET
        if dev.id.role is Role.DESTINATION:
            return Goal.START
        dev.may_reset = False  # a reset would run a source after the commit point
        return Goal.STOP

    # --- precopy -------------------------------------------------------------------------

    def _sample(self) -> None:
        interval = self.config.sample_interval_ns
        for pair in self._pairs:
            last = pair.last_query_ns
            if pair.querying or (last is not None and self._now - last < interval):
                continue
            pair.querying = {Query.PRECOPY_INFO, Query.DATA_SIZE}
            pair.last_query_ns = self._now
            timeout = self.config.step_timeout_ns
            self._out.append(QueryPrecopy(dev=pair.src, timeout_ns=timeout))
            self._out.append(QueryDataSize(dev=pair.src, timeout_ns=timeout))

    def _evaluate(self) -> None:
        """Ask the policy; switch over when it says so and every destination has acked."""
        decision = decide(
            self.config.convergence,
            [p.progress for p in self._pairs],
            elapsed_ns=self._now - self._precopy_since,
        )
        if decision.rule is not self._last_rule:
            self._last_rule = decision.rule
            self._decision(decision.rule.value, decision.text, decision.numbers)
        if not decision.switch:
            return
        missing = tuple(p.dst for p in self._pairs if not p.acked)
        if missing:
            if missing != self._waiting_for:
                self._waiting_for = missing
                names = ", ".join(map(str, missing))
                self._decision(
                    "wait-ack",
                    f"switchover waits for the switchover-ack of {names}",
                    (("missing_acks", float(len(missing))),),
                )
            return
        self._switch_decided = True
        self._advance()

    def _on_precopy(self, inp: PrecopySampled) -> None:
        pair = self._pair(inp.dev)
        pair.querying.discard(Query.PRECOPY_INFO)
        if self._stage is _Stage.ITERATE:
            pair.progress = precopy_sample(
                pair.progress,
                self.config.convergence,
                initial=inp.initial,
                dirty=inp.dirty,
                reinit=inp.reinit,
                now_ns=inp.now_ns,
            )
            if inp.reinit:
                pair.acked = False
                self._decision(
                    "reinit",
                    f"{pair.src} re-initialised its precopy data: {pair.dst} must ack again",
                    (("initial_bytes", float(inp.initial)),),
                )
            self._evaluate()
        elif inp.reinit and self._switch_decided and not self._committed and not self._rolling_back:
            self._fail(self._dev(pair.src), Cause.REINIT_LATE, "precopy info")

    def _on_data_size(self, inp: DataSizeSampled) -> None:
        pair = self._pair(inp.dev)
        pair.querying.discard(Query.DATA_SIZE)
        if self._stage is _Stage.ITERATE:
            pair.progress = data_size_sample(pair.progress, inp.size)
            self._evaluate()

    def _on_query_failed(self, inp: QueryFailed) -> None:
        pair = self._pair(inp.dev)
        pair.querying.discard(inp.query)
        if self._stage is not _Stage.ITERATE:
            return
        if inp.query is Query.PRECOPY_INFO:
            self._fail(
                self._dev(inp.dev), Cause.PRECOPY_INFO_FAILED, inp.query.value, errno=inp.errno
            )
        elif pair.progress.data_size is not None:
            pair.progress = data_size_sample(pair.progress, None)
            self._decision(
                "data-size-unknown",
                f"MIG_DATA_SIZE of {pair.src} failed: no downtime estimate until it answers again",
            )

    def _on_progress(self, inp: StreamProgress) -> None:
        pair = self._pair(inp.dev)
        if self._stage is _Stage.ITERATE:
            pair.progress = stream_sample(
                pair.progress, self.config.convergence, sent=inp.raw_bytes, busy_ns=inp.busy_ns
            )
            self._evaluate()

    def _on_ack(self, inp: SwitchoverAcked) -> None:
        pair = self._pair(inp.dev)
        if self._stage is _Stage.ITERATE and not pair.acked:
            pair.acked = True
            self._evaluate()

    # --- streams -------------------------------------------------------------------------

    def _on_stream_ended(self, inp: StreamEnded) -> None:
        pair = self._pair(inp.dev)
        if not pair.streaming or self._rolling_back:
            return
        dst = self._devs[pair.dst]
        if self._stage is not _Stage.DRAIN:
            self._fail(
                dst, Cause.STREAM_UNEXPECTED, "stream end", detail=f"after {inp.total} bytes"
            )
            return
        pair.streaming = False
        if not inp.digest_ok:
            self._fail(dst, Cause.DIGEST_MISMATCH, "stream digest", detail=f"{inp.total} bytes")
            return
        pair.drained = True
        if all(p.drained for p in self._pairs):
            self._advance()

    def _on_data_failed(self, inp: DataWriteFailed | DataReadFailed) -> None:
        pair = self._pair(inp.dev)
        if not pair.streaming or self._rolling_back:
            return
        dev = self._dev(inp.dev)
        self._stop_stream(pair)
        if isinstance(inp, DataWriteFailed):
            step = f"data write at offset {inp.offset}"
            cause = Cause.SIZE_MISMATCH if self._sizes_differ(dev.id) else Cause.WRITE_REFUSED
        else:
            step = f"data read at offset {inp.offset}"
            cause = Cause.READ_FAILED
        self._fail(dev, cause, step, errno=inp.errno)

    def _on_stream_broken(self, inp: StreamBroken) -> None:
        """A data link lost (both agents still answer): roll back, as for a data error."""
        pair = self._pair(inp.dev)
        if not pair.streaming or self._rolling_back:
            return
        self._stop_stream(pair)
        self._fail(self._dev(inp.dev), Cause.LINK_LOST, "data link", detail=inp.reason)

    # --- losing devices ------------------------------------------------------------------

    def _abandon(self, dev: _Dev) -> None:
        dev.pending = None
        dev.goal = None
        self._batch.pop(dev.id, None)
        self._stop_stream(self._pairs[dev.id.index])

    def _on_agent_lost(self, inp: AgentLost) -> None:
        lost = [d for d in self._devs.values() if d.spec.host == inp.host and not d.gone]
        if not lost:
            return
        for dev in lost:
            dev.lost = True
            self._abandon(dev)
        self._emit(
            PeerLost(host=inp.host, devices=tuple(d.id for d in lost), committed=self._committed)
        )
        detail = f"{inp.host}: {', '.join(str(d.id) for d in lost)}"
        if not self._committed:
            self._fail(
                None, Cause.PEER_LOST, "agent link", detail=detail, outcome=Outcome.PEER_LOST
            )
        else:
            self._error(None, Cause.PEER_LOST, "agent link", detail=detail)
            for dev in lost:
                if dev.id.role is Role.DESTINATION and dev.state is not _S.RUNNING:
                    self._in_doubt = True
                    src = self._pairs[dev.id.index].src
                    self._error(dev, Cause.IN_DOUBT, "commit", detail=f"{src} stays stopped")
            if self._stage is not None and not self._batch:
                self._advance()
        self._drive()
        self._maybe_finish()

    def _hang(self, dev: _Dev, step: str) -> None:
        """Report ``dev`` hung in ``step`` and abandon it."""
        request = dev.pending
        target = request.target if isinstance(request, SetState) else None
        if isinstance(request, SetState):
            step = request.arc
        elif isinstance(request, Reset):
            step = "reset"
        elif isinstance(request, OpenDevice):
            step = "open"
        dev.hung = True
        self._hung = True
        known = dev.state
        self._abandon(dev)
        assert self._phase is not None
        self._emit(
            DeviceHung(device=dev.id, phase=self._phase, step=step, state=known, target=target)
        )
        detail = _maybe_states(known, target, dev.flags)
        if self._committed or self._rolling_back:
            self._error(dev, Cause.HUNG, step, detail=detail)
        else:
            self._fail(dev, Cause.HUNG, step, detail=detail)

    def _on_timed_out(self, inp: StepTimedOut) -> None:
        dev = self._dev(inp.dev)
        if dev.gone:
            return
        self._hang(dev, inp.step)
        if self._committed and self._stage is not None and not self._batch:
            self._advance()
        self._drive()
        self._maybe_finish()

    def _on_abort(self, inp: Abort) -> None:
        if self._committed:
            if not self._abort_noted:
                self._abort_noted = True
                self._decision(
                    "abort-after-commit",
                    f"{inp.signal or 'abort'} after the commit point: finishing the commit, "
                    "which cannot be undone",
                )
            return
        if self._rolling_back:
            return
        assert self._phase is not None
        detail = f"{inp.signal}: {inp.reason}" if inp.signal else inp.reason
        self._fail(
            None, Cause.INTERRUPTED, self._phase.value, detail=detail, outcome=Outcome.INTERRUPTED
        )

    def _on_tick(self) -> None:
        assert self._phase is not None
        limit = self.config.timeouts.of(self._phase)
        if limit is not None and self._now - self._phase_since >= limit:
            self._deadline_passed(limit)
        if not self._finished and self._stage is _Stage.ITERATE:
            self._evaluate()
            if self._stage is _Stage.ITERATE:
                self._sample()

    def _deadline_passed(self, limit: int) -> None:
        assert self._phase is not None
        detail = f"{self._phase.value} took longer than {limit / NS_PER_S:g} s"
        if self._rolling_back:
            for dev in self._devs.values():
                if dev.busy:
                    self._hang(dev, "rollback")
            self._phase_since = self._now
            self._drive()
            self._maybe_finish()
        elif self._stage is _Stage.ITERATE:
            missing = [str(p.dst) for p in self._pairs if not p.acked]
            if missing:
                detail += f"; no switchover-ack from {', '.join(missing)}"
            self._fail(None, Cause.NOT_CONVERGED, self._phase.value, detail=detail)
        else:
            self._fail(None, Cause.PHASE_TIMEOUT, self._phase.value, detail=detail)

    # --- the way back --------------------------------------------------------------------

    def _start_rollback(self) -> None:
        """Before the commit point: stop every stream, sources to RUNNING, destinations reset."""
        self._rolling_back = True
        self._stage = None
        self._batch = {}
        for pair in self._pairs:
            self._stop_stream(pair)
        for dev in self._devs.values():
            if not dev.gone and (dev.touched or dev.state is not dev.found):
                dev.goal = Goal.RUNNING if dev.id.role is Role.SOURCE else Goal.RESET
        if any(d.goal is not None or d.busy for d in self._devs.values()):
            self._set_phase(Phase.ROLLBACK)
            self._drive()
        self._maybe_finish()

    def _sources_ready(self) -> bool:
        return all(
            d.gone or d.goal is None or staging_ready(d.state)
            for d in self._devs.values()
            if d.id.role is Role.SOURCE
        )

    def _drive(self) -> None:
        """Give every device on its way back its next step (repeat while steps finish)."""
        progressed = True
        while progressed:
            progressed = False
            for dev in self._devs.values():
                if dev.gone or dev.busy or dev.goal is None:
                    continue
                step = recovery_step(
                    dev.goal,
                    dev.flags,
                    dev.state,
                    failed=dev.recovery_failed,
                    reset_done=dev.reset_done,
                    may_reset=dev.may_reset,
                    staged=self._staged and dev.id.role is Role.SOURCE,
                    peers_ready=self._sources_ready(),
                )
                match step.kind:
                    case StepKind.SET:
                        assert step.target is not None
                        self._set(dev, step.target, recover=True)
                    case StepKind.RESET:
                        self._send(dev, Reset(dev=dev.id, timeout_ns=self.config.step_timeout_ns))
                    case StepKind.WAIT:
                        pass  # at RUNNING_P2P until every staged peer is there
                    case StepKind.DONE:
                        dev.goal = None
                        progressed = True
                    case StepKind.STUCK:
                        dev.goal = None
                        progressed = True
                        state = dev.state.name if dev.state is not None else "an unknown state"
                        self._error(dev, Cause.PARK_FAILED, "recovery", detail=f"left in {state}")

    def _on_reset(self, inp: ResetDone | ResetFailed) -> None:
        dev = self._dev(inp.dev)
        if not isinstance(dev.pending, Reset):
            return
        dev.pending = None
        dev.reset_done = True
        if isinstance(inp, ResetDone):
            dev.state = _S.RUNNING
        else:
            dev.state = None
            dev.goal = None
            self._error(dev, Cause.RESET_FAILED, "reset", errno=inp.errno)
        self._drive()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._finished or not (self._rolling_back or (self._committed and self._stage is None)):
            return
        if all(d.settled for d in self._devs.values()):
            self._finish()

    def _finish(self) -> None:
        if self._in_doubt:
            outcome = Outcome.IN_DOUBT
        elif self._hung:
            outcome = Outcome.HUNG
        else:
            outcome = self._failure or Outcome.COMPLETED
        self._set_phase(Phase.FINISHED)
        if outcome is Outcome.COMPLETED:
            n = len(self._pairs)
            text = f"completed: {n} pair{'s' if n > 1 else ''} migrated"
            if self._first_error:
                text += f", with an error: {self._first_error}"
        else:
            text = f"{outcome.value}: {self._first_error}"
        self._emit(RunFinished(outcome=outcome, exit_status=int(outcome.exit_status), summary=text))
        self._out.append(Finish(outcome=outcome))
        self._finished = True


# --- an agent on its own ----------------------------------------------------------------------


class PeerAnswer(enum.Enum):
    NOT_ASKED = "not asked"
    COMMITTED = "committed"
    NOT_COMMITTED = "not committed"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceKnowledge:
    """What an agent knows of one of its devices, read back after its last step."""

    dev: DeviceId
    flags: MigrationFlags
    state: DeviceState | None
    touched: bool  #: this run sent it a state change
    failed: bool = False  #: a fallback SET already failed on it
    reset_done: bool = False  #: a fallback reset already ran on it


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentKnowledge:
    """What an agent that lost its orchestrator knows, locally, about the run."""

    role: Role
    devices: tuple[DeviceKnowledge, ...]
    committed: bool  #: the orchestrator's Commit reached this agent
    #: source: every stream was read to its end and sent, so a destination may be prepared
    stream_complete: bool = False
    peer: PeerAnswer = PeerAnswer.NOT_ASKED
    phase: Phase = Phase.ROLLBACK  #: the last phase the agent heard of, for its reports
    step_timeout_ns: int = 30 * NS_PER_S
    #: the agent restarted and found the run in its ledger (else it lost the orchestrator)
    restarted: bool = False


def agent_fallback(k: AgentKnowledge) -> list[Action]:
    """An agent's next steps once it has lost the orchestrator, decided from local knowledge.

    Call it again after every step, with the states read back, until it returns
    ``Finish``. The destination agent is the arbiter of the commit point: it starts its
    devices if the Commit reached it, and otherwise resets them and records that it never
    will (:class:`RecordVerdict`), so a source agent that asks it gets a final answer.
    A source agent whose streams did not all reach their end knows no destination can be
    prepared and brings its sources back; otherwise it asks the peer, and if the peer
    cannot be reached the source stays stopped and the run is in doubt.
    """
    head: list[Action] = []
    if k.role is Role.SOURCE:
        if k.committed or k.peer is PeerAnswer.COMMITTED:
            goal, may_reset, outcome = Goal.STOP, False, Outcome.COMPLETED
        elif not k.stream_complete or k.peer is PeerAnswer.NOT_COMMITTED:
            goal, may_reset, outcome = Goal.RUNNING, True, Outcome.PEER_LOST
        elif k.peer is PeerAnswer.NOT_ASKED:
            return [AskPeer()]
        else:
            goal, may_reset, outcome = Goal.STOP, False, Outcome.IN_DOUBT
    elif k.committed:
        goal, may_reset, outcome = Goal.START, True, Outcome.COMPLETED
    else:
        goal, may_reset, outcome = Goal.RESET, True, Outcome.PEER_LOST
        head.append(RecordVerdict(committed=False))
    staged = len(k.devices) > 1 and all(MigrationFlags.P2P in d.flags for d in k.devices)
    wanted = {d.dev: _fallback_goal(d, goal) for d in k.devices}
    peers_ready = all(wanted[d.dev] is None or staging_ready(d.state) for d in k.devices)
    steps: list[Action] = []
    stuck: list[DeviceKnowledge] = []
    for d in k.devices:
        g = wanted[d.dev]
        if g is None:
            continue
        step = recovery_step(
            g,
            d.flags,
            d.state,
            failed=d.failed,
            reset_done=d.reset_done,
            may_reset=may_reset or g is Goal.RESET,
            staged=staged,
            peers_ready=peers_ready,
        )
        if step.kind is StepKind.SET and d.state is not None and step.target is not None:
            steps.append(
                SetState(
                    dev=d.dev,
                    current=d.state,
                    target=step.target,
                    recover=True,
                    timeout_ns=k.step_timeout_ns,
                )
            )
        elif step.kind is StepKind.RESET:
            steps.append(Reset(dev=d.dev, timeout_ns=k.step_timeout_ns))
        elif step.kind is StepKind.STUCK:
            stuck.append(d)
    # A device that waits (staged) waits for a peer that has a step in this list.
    if steps:
        return head + steps
    if goal is Goal.START and any(d.failed for d in k.devices):
        outcome = Outcome.FAILED
    return head + _fallback_finish(k, outcome, stuck)


def _fallback_goal(d: DeviceKnowledge, goal: Goal) -> Goal | None:
    if goal is Goal.RESET:
        return Goal.RESET if d.touched else None
    if goal is Goal.START and d.failed:
        return Goal.STOP
    return goal


def _fallback_finish(
    k: AgentKnowledge, outcome: Outcome, stuck: list[DeviceKnowledge]
) -> list[Action]:
    cause = {
        Outcome.PEER_LOST: Cause.PEER_LOST,
        Outcome.IN_DOUBT: Cause.IN_DOUBT,
    }.get(outcome)
    errors: list[ErrorRaised] = []
    for d in k.devices if outcome is Outcome.FAILED else ():
        if d.failed:
            known = CAUSES[Cause.START_FAILED]
            errors.append(
                ErrorRaised(
                    device=d.dev,
                    phase=k.phase,
                    step="start",
                    errno=None,
                    cause=Cause.START_FAILED,
                    message=known.explanation,
                    hint=known.hint,
                )
            )
    if cause is not None:
        known = CAUSES[cause]
        message = f"{known.explanation} (the orchestrator)"
        if cause is Cause.PEER_LOST:  # the cause's wording is the orchestrator's side of it
            message = (
                "this agent restarted in the middle of the run"
                if k.restarted
                else "this agent lost contact with the orchestrator"
            ) + "; it brought its own devices back by the failure policy"
        errors.append(
            ErrorRaised(
                device=None,
                phase=k.phase,
                step="orchestrator link",
                errno=None,
                cause=cause,
                message=message,
                hint=known.hint,
            )
        )
    for d in stuck:
        known = CAUSES[Cause.PARK_FAILED]
        state = d.state.name if d.state is not None else "an unknown state"
        errors.append(
            ErrorRaised(
                device=d.dev,
                phase=k.phase,
                step="recovery",
                errno=None,
                cause=Cause.PARK_FAILED,
                message=f"{known.explanation} (left in {state})",
                hint=known.hint,
            )
        )
    why = "the agent restarted" if k.restarted else "the orchestrator was lost"
    summary = f"{outcome.value}: {why}; {k.role.value} agent finished alone"
    finished = RunFinished(outcome=outcome, exit_status=int(outcome.exit_status), summary=summary)
    return [*(Emit(event=e) for e in errors), Emit(event=finished), Finish(outcome=outcome)]
