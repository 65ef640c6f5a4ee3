"""The vocabulary of a migration run: identities, phases, outcomes, causes, inputs and actions.

Theory of operation
-------------------
A run migrates N *pairs*. Inside a run a device is named by its :class:`DeviceId`, a
(role, index) identity such as ``src0`` or ``dst2``: the phase machine, the events and the
journal use it, and the spec a user typed (``vfio:0000:04:10.0@hostB:7000``) stays a
display name next to it. Pair *i* is always ``src<i>`` -> ``dst<i>``.

Every run ends with one :class:`Outcome`, which maps to exactly one
:class:`~vfmig.core.errors.ExitStatus`. Every error a run reports names one
:class:`Cause` from :data:`CAUSES`, a table of plain explanations and hints, so the same
failure reads the same way in the terminal, the journal and the TUI.

The phase machine (:mod:`vfmig.core.phases`) and the engine that executes it speak in
:class:`Input` s -- frozen facts in the past tense that the engine feeds in -- and
:class:`Action` s -- what the machine asks the engine to do. Both are defined here so
that the engine, the agents' fallback and the tests share them without importing the
machine.

Pure: stdlib only.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

from vfmig.core.errors import ExitStatus

if TYPE_CHECKING:
    from collections.abc import Iterable

    from vfmig.core.events import Event
    from vfmig.core.fsm import DeviceState, MigrationFlags


T = TypeVar("T")


class Role(enum.Enum):
    SOURCE = "src"
    DESTINATION = "dst"


@dataclass(frozen=True, slots=True)
class DeviceId:
    """A device's identity inside a run: its role and its pair's index (``src0``, ``dst2``)."""

    role: Role
    index: int

    def __str__(self) -> str:
        return f"{self.role.value}{self.index}"

    @classmethod
    def parse(cls, text: str) -> DeviceId:
        """The inverse of ``str()``; raises ValueError on anything else (TypeError for
        what is not a string). Every event record names devices: answers are cached."""
        if type(text) is not str:
            raise TypeError(f"not a device id: {text!r}")
        return _parse_device_id(text)


@functools.lru_cache(maxsize=1024)
def _parse_device_id(text: str) -> DeviceId:
    for role in _ROLES:
        digits = text.removeprefix(role.value)
        if digits != text and digits.isdigit() and digits == str(int(digits)):
            return DeviceId(role, int(digits))
    raise ValueError(f"not a device id: {text!r} (expected src<N> or dst<N>)")


_ROLES: Final = tuple(Role)


def source(index: int) -> DeviceId:
    return DeviceId(Role.SOURCE, index)


def destination(index: int) -> DeviceId:
    return DeviceId(Role.DESTINATION, index)


def by_device(pairs: Iterable[tuple[T, T]]) -> dict[DeviceId, T]:
    """What the pairs hold for each device of a run: ``{src0: SRC, dst0: DST, src1: ...}``."""
    named: dict[DeviceId, T] = {}
    for i, (src, dst) in enumerate(pairs):
        named[source(i)], named[destination(i)] = src, dst
    return named


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """What the user named: a display name (the spec) and the host whose agent owns it."""

    name: str
    host: str = "local"


class Phase(enum.Enum):
    """Phases of a run, in order; ROLLBACK replaces the rest after a failure before commit."""

    PREFLIGHT = "preflight"  #: open every device and check it; changes nothing
    SETUP = "setup"  #: destinations -> RESUMING; with precopy, sources -> PRE_COPY
    PRECOPY = "precopy"  #: stream while the source runs, until the policy and every ack agree
    SWITCHOVER = "switchover"  #: P2P staging, then every source -> STOP_COPY (downtime starts)
    STOPCOPY = "stopcopy"  #: drain every source to end of stream
    RESUME = "resume"  #: destinations RESUMING -> STOP (prepared), then P2P staging
    COMMIT = "commit"  #: point of no return: destinations -> RUNNING, then sources -> STOP
    ROLLBACK = "rollback"  #: sources back to RUNNING, destinations reset
    FINISHED = "finished"


class StreamPhase(enum.Enum):
    """How a data stream's reader treats a 0-byte read: "nothing now" or end of stream."""

    PRECOPY = "precopy"
    STOPCOPY = "stopcopy"


class Outcome(enum.Enum):
    """How a run ended. :attr:`exit_status` is the CLI's exit status for it."""

    COMPLETED = "completed"  #: the destinations run, the sources are stopped
    FAILED = "failed"  #: a failure; every device was brought back (sources RUNNING)
    REFUSED = "refused"  #: preflight refused the devices; nothing was changed
    INVALID = "invalid"  #: the request itself is wrong (one device on both sides)
    PEER_LOST = "peer-lost"  #: an agent was lost before the commit point; rolled back
    IN_DOUBT = "in-doubt"  #: nobody can tell whether a destination started; source stopped
    HUNG = "hung"  #: a device did not return from a step; the others were brought back
    INTERRUPTED = "interrupted"  #: Ctrl-C or SIGTERM before the commit point; rolled back

    @property
    def exit_status(self) -> ExitStatus:
        return _EXIT_STATUS[self]


_EXIT_STATUS: Final[dict[Outcome, ExitStatus]] = {
    Outcome.COMPLETED: ExitStatus.OK,
    Outcome.FAILED: ExitStatus.FAILED,
    Outcome.REFUSED: ExitStatus.DEVICE,
    Outcome.INVALID: ExitStatus.USAGE,
    Outcome.PEER_LOST: ExitStatus.PEER,
    Outcome.IN_DOUBT: ExitStatus.IN_DOUBT,
    Outcome.HUNG: ExitStatus.HUNG,
    Outcome.INTERRUPTED: ExitStatus.INTERRUPTED,
}


class Cause(enum.Enum):
    """Known causes of the errors a run reports (explained in :data:`CAUSES`)."""

    SAME_DEVICE = "same-device"
    NOT_MIGRATABLE = "not-migratable"
    FLAGS_MISMATCH = "flags-mismatch"
    NO_P2P = "no-p2p"
    LEFTOVER_STATE = "leftover-state"
    OPEN_FAILED = "open-failed"
    DEVICE_BUSY = "device-busy"
    SET_FAILED = "set-failed"
    STREAM_REJECTED = "stream-rejected"
    SIZE_MISMATCH = "size-mismatch"
    WRITE_REFUSED = "write-refused"
    READ_FAILED = "read-failed"
    DIGEST_MISMATCH = "digest-mismatch"
    STREAM_UNEXPECTED = "stream-unexpected"
    PRECOPY_INFO_FAILED = "precopy-info-failed"
    NOT_CONVERGED = "not-converged"
    REINIT_LATE = "reinit-late"
    STATE_DRIFT = "state-drift"
    PEER_LOST = "peer-lost"
    IN_DOUBT = "in-doubt"
    HUNG = "hung"
    LINK_LOST = "link-lost"
    PHASE_TIMEOUT = "phase-timeout"
    INTERRUPTED = "interrupted"
    START_FAILED = "start-failed"
    PARK_FAILED = "park-failed"
    RECOVERY_FAILED = "recovery-failed"
    RESET_FAILED = "reset-failed"


@dataclass(frozen=True, slots=True)
class KnownCause:
    """A plain explanation of a cause and, where there is one, what to do about it."""

    explanation: str
    hint: str | None = None


CAUSES: Final[dict[Cause, KnownCause]] = {
    Cause.SAME_DEVICE: KnownCause(
        "the same device is named twice (source and destination must be different devices)",
        "name a different device on each side",
    ),
    Cause.NOT_MIGRATABLE: KnownCause(
        "the device does not support migration (its migration flags lack STOP_COPY)",
        "bind the vendor's migration driver (e.g. mlx5-vfio-pci), not plain vfio-pci",
    ),
    Cause.FLAGS_MISMATCH: KnownCause(
        "the two devices' migration flags cannot work together",
        "use devices of the same type, or allow a run without precopy",
    ),
    Cause.NO_P2P: KnownCause(
        "a multi-device run needs P2P on every device, so that no device DMAs into a "
        "stopped peer while the others stop or start",
        "use devices with P2P support, or allow it explicitly if the devices never talk "
        "to each other",
    ),
    Cause.LEFTOVER_STATE: KnownCause(
        "the device is in a state left over from an earlier run: vfmig migrates only a "
        "RUNNING source to a RUNNING or STOP destination",
        "recover the device first (a reset brings it back to RUNNING)",
    ),
    Cause.OPEN_FAILED: KnownCause("the device could not be opened"),
    Cause.DEVICE_BUSY: KnownCause(
        "the device is busy: another process holds it, or a reset is in progress",
        "stop the other user (QEMU, another vfmig) and retry",
    ),
    Cause.SET_FAILED: KnownCause("the device refused the state change"),
    Cause.STREAM_REJECTED: KnownCause(
        "the destination rejected the migration data when loading it (RESUMING>STOP)",
        "check that both devices are of the same type, firmware and configuration",
    ),
    Cause.SIZE_MISMATCH: KnownCause(
        "the source's state does not fit the destination: their MIG_DATA_SIZE estimates "
        "differ, so the devices are probably of different types",
        "migrate between devices of the same type and configuration",
    ),
    Cause.WRITE_REFUSED: KnownCause(
        "the destination refused migration data; the stream was stopped at once, so the "
        "destination never loads a partial stream"
    ),
    Cause.READ_FAILED: KnownCause("reading the source's migration data failed"),
    Cause.DIGEST_MISMATCH: KnownCause(
        "the data the destination received does not match what the source sent",
        "check the network path between the agents",
    ),
    Cause.STREAM_UNEXPECTED: KnownCause(
        "a migration stream ended before stop-copy, where only the source's end of "
        "stream may end it"
    ),
    Cause.PRECOPY_INFO_FAILED: KnownCause(
        "the source could not report its precopy progress (VFIO_MIG_GET_PRECOPY_INFO)"
    ),
    Cause.NOT_CONVERGED: KnownCause(
        "precopy did not converge before its deadline",
        "raise the precopy timeout or the downtime limit, or run without precopy",
    ),
    Cause.REINIT_LATE: KnownCause(
        "the source re-initialised its precopy data after the switchover decision",
        "retry: the device's state changed shape while it was being stopped",
    ),
    Cause.STATE_DRIFT: KnownCause(
        "the device changed state outside vfmig's requests",
        "check that no other process drives this device",
    ),
    Cause.LINK_LOST: KnownCause(
        "the data link between the agents broke (or could not be made) while both agents "
        "stayed reachable; the destination never loads a partial stream",
        "check the network path between the agents' hosts (firewall, MTU, the data port)",
    ),
    Cause.PEER_LOST: KnownCause(
        "lost contact with an agent; that agent brings its own devices back by the same policy",
        "check the agent's host and its journal",
    ),
    Cause.IN_DOUBT: KnownCause(
        "nobody can tell whether the destination started: the source stays stopped in STOP, "
        "so there are never two running copies",
        "find out whether the destination runs (its agent's journal); if it does not, "
        "resume the source",
    ),
    Cause.HUNG: KnownCause(
        "the device did not return from a step; vfmig stopped waiting for it",
        "the device or its driver needs attention; its state is as described",
    ),
    Cause.PHASE_TIMEOUT: KnownCause("the phase did not finish within its timeout"),
    Cause.INTERRUPTED: KnownCause("interrupted: the run is rolled back"),
    Cause.START_FAILED: KnownCause(
        "the destination did not start after the commit point; it is kept stopped and the "
        "source stays stopped with its state",
        "decide by hand which side to run",
    ),
    Cause.PARK_FAILED: KnownCause(
        "the source could not be parked in STOP after the commit point; it is left as it is "
        "and never reset, since a reset would make it run",
        "reset the source once its saved state is no longer needed",
    ),
    Cause.RECOVERY_FAILED: KnownCause("a recovery step failed; falling back to a reset"),
    Cause.RESET_FAILED: KnownCause(
        "the device reset failed; the device needs attention",
        "check the host's kernel log",
    ),
}


# --- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Input:
    """Base of everything :meth:`MigrationMachine.handle` accepts."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Start(Input):
    now_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceOpened(Input):
    dev: DeviceId
    identity: str  #: host-qualified physical identity: equal identities are the same device
    flags: MigrationFlags
    state: DeviceState
    data_size: int | None  #: MIG_DATA_SIZE, an estimate for plan and ETA only


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenFailed(Input):
    dev: DeviceId
    errno: int | None
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StateObserved(Input):
    """A state read outside a request (a GET or debugfs sample); None with errno if unreadable."""

    dev: DeviceId
    state: DeviceState | None
    errno: int | None
    step: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SetStateDone(Input):
    dev: DeviceId
    target: DeviceState


@dataclass(frozen=True, slots=True, kw_only=True)
class SetStateFailed(Input):
    dev: DeviceId
    target: DeviceState
    errno: int | None
    state_after: DeviceState | None  #: read back right after the failure; None if unreadable


@dataclass(frozen=True, slots=True, kw_only=True)
class ResetDone(Input):
    dev: DeviceId


@dataclass(frozen=True, slots=True, kw_only=True)
class ResetFailed(Input):
    dev: DeviceId
    errno: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class PrecopySampled(Input):
    dev: DeviceId  #: the source
    initial: int
    dirty: int
    reinit: bool
    now_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DataSizeSampled(Input):
    dev: DeviceId
    size: int


class Query(enum.Enum):
    PRECOPY_INFO = "precopy info"
    DATA_SIZE = "data size"


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryFailed(Input):
    dev: DeviceId
    query: Query
    errno: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamProgress(Input):
    """Cumulative counts of one source's stream; ``busy_ns`` excludes waiting for data."""

    dev: DeviceId
    raw_bytes: int
    wire_bytes: int
    busy_ns: int
    now_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SwitchoverAcked(Input):
    dev: DeviceId  #: the destination that loaded its source's initial precopy data


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEnded(Input):
    dev: DeviceId  #: the destination: everything written, digest compared
    total: int
    digest_ok: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class DataWriteFailed(Input):
    dev: DeviceId
    errno: int | None
    offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DataReadFailed(Input):
    dev: DeviceId
    errno: int | None
    offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentLost(Input):
    host: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamBroken(Input):
    """The data link of ``dev``'s pair broke mid-stream, or could not be connected, while
    the agents' control links stayed up; ``reason`` says what the agent saw."""

    dev: DeviceId
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StepTimedOut(Input):
    dev: DeviceId
    step: str  #: what the engine was doing (``data read``...); a pending request's arc wins


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick(Input):
    now_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Abort(Input):
    reason: str
    signal: str | None  #: ``SIGINT``, ``SIGTERM``


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Action:
    """Base of everything :meth:`MigrationMachine.handle` asks the engine to do."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenDevice(Action):
    dev: DeviceId
    timeout_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SetState(Action):
    dev: DeviceId
    current: DeviceState  #: the state the machine believes the device is in
    target: DeviceState
    recover: bool  #: part of bringing a device back (run it even while cancelling)
    timeout_ns: int

    @property
    def arc(self) -> str:
        return f"{self.current.name}>{self.target.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Reset(Action):
    dev: DeviceId
    timeout_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryPrecopy(Action):
    dev: DeviceId
    timeout_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryDataSize(Action):
    dev: DeviceId
    timeout_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StartStream(Action):
    """Start a pair's stream, or switch a running precopy stream to drain to end of stream."""

    source: DeviceId
    destination: DeviceId
    phase: StreamPhase
    step_timeout_ns: int  #: one read or write may take this long


@dataclass(frozen=True, slots=True, kw_only=True)
class StopStream(Action):
    """Stop a pair's stream at once, both ends; nothing more is written to the destination."""

    source: DeviceId
    destination: DeviceId


@dataclass(frozen=True, slots=True, kw_only=True)
class Commit(Action):
    """The point of no return: record it durably and tell every agent, then go on."""

    devices: tuple[DeviceId, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Emit(Action):
    event: Event


@dataclass(frozen=True, slots=True, kw_only=True)
class Finish(Action):
    outcome: Outcome


@dataclass(frozen=True, slots=True, kw_only=True)
class AskPeer(Action):
    """Agent fallback: ask the peer agent whether the run passed its commit point."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordVerdict(Action):
    """Agent fallback: durably record the commit verdict; a destination agent that recorded
    ``committed=False`` answers every later peer question so and refuses any Commit."""

    committed: bool
