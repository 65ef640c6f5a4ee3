"""What went wrong in a run, in plain words, from its records: the table of known causes.

Theory of operation
-------------------
:class:`Diagnoser` folds records (anything :func:`vfmig.core.view.reduce` takes) one at a
time, in bounded memory, and :meth:`Diagnoser.result` concludes a :class:`Diagnosis`:

* the *first failure*: the first error the run reported (the phase machine reports the root
  cause first, then whatever the rollback met), with its device, phase, step (an arc such
  as ``RESUMING>STOP``, a data write at an offset), errno, time and record;
* the device's state *before* the failing step -- by ioctl and by debugfs, as they stood
  when the failed request (a SET or a reset) was sent, or when the error was raised for
  any other step (a data write, a hung request) -- and *after* it, including what was read
  back before the next request, the next state change of another step or the next phase;
* the *likely cause*, from :data:`KNOWN`: the rules below look at the error's cause and at
  the evidence around it (MIG_DATA_SIZE of both sides of the pair, the errno, missing
  acks, the last precopy sample, a hung step's target, debugfs disagreeing with the ioctl
  state, whether the journal ends before the run did).

A run that completed is diagnosed as such (an error after the commit point is still
reported). A journal that ends without the run's end record is ``unfinished``: the
recording process stopped (a crash, ``kill -9``, a power loss) and nothing is known of the
devices' final states. Causes the table does not refine fall back to the run's own
explanation of its cause (:data:`vfmig.core.model.CAUSES`).

Pure: stdlib only.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from vfmig.core.errors import errno_name
from vfmig.core.events import (
    DebugfsSampled,
    DeviceHung,
    DeviceOpened,
    ErrorRaised,
    IoctlCompleted,
    PeerLost,
    PhaseChanged,
    StateChanged,
)
from vfmig.core.model import CAUSES, Cause, DeviceId, Outcome, Phase, Role
from vfmig.core.view import RunView, format_bytes, reduce

if TYPE_CHECKING:
    from vfmig.core.fsm import DeviceState
    from vfmig.core.view import Observed


@dataclass(frozen=True, slots=True)
class Known:
    """One known cause: what it is, why it happens, what to do."""

    title: str
    explanation: str
    hint: str | None = None


#: The table of known causes. Keys are what :attr:`Diagnosis.cause` holds.
KNOWN: Final[dict[str, Known]] = {
    "completed": Known("the run completed", "every destination runs; every source is stopped"),
    "unfinished": Known(
        "the journal ends before the run did",
        "the process that recorded it stopped (a crash, kill -9, a power loss, or it is "
        "still running): the devices' final states are not in the journal",
        "check every device with 'vfmig inspect' and bring leftovers back with 'vfmig recover'",
    ),
    "size-mismatch": Known(
        "stream size mismatch between device types",
        "the source's state does not fit the destination: their MIG_DATA_SIZE differ, so the "
        "devices are of different types or configurations, and the destination refused it",
        "migrate between devices of the same type, firmware and configuration",
    ),
    "device-busy": Known(
        "device busy",
        "another process holds the device (QEMU, another vfmig), or a reset is in progress",
        "stop the other user of the device, then retry",
    ),
    "stream-rejected": Known(
        "the destination rejected the stream at RESUMING>STOP",
        "the destination took every byte, but loading the state failed when it left "
        "RESUMING: the data does not match what this device can load (type, firmware, "
        "configuration), or was damaged before it reached vfmig",
        "compare the two devices' types and firmware; the destination was reset",
    ),
    "write-refused": Known(
        "a data write was refused",
        "the destination's driver refused migration data while in RESUMING; vfmig stopped "
        "the stream at once so that it never loads a partial state",
        "the errno says why; check that both devices are of the same type",
    ),
    "not-converged": Known(
        "precopy did not converge",
        "precopy ran out of time before the switchover could happen",
        "raise the precopy timeout or the downtime limit, or migrate without precopy",
    ),
    "link-lost": Known(
        "the data link broke",
        "the data link between the agents broke mid-stream (or could not be connected) while "
        "both agents stayed reachable; the destination was reset, the source runs on",
        "check the network path between the agents' hosts (firewall, MTU, the data port)",
    ),
    "peer-lost": Known(
        "peer lost",
        "the orchestrator lost contact with an agent before the commit point; each side "
        "brought its own devices back",
        "check the agent's host, network and the agent's own journal",
    ),
    "in-doubt": Known(
        "the run is in doubt",
        "an agent was lost after the commit point and nobody can tell whether its "
        "destination started: the source stays stopped, so there are never two running copies",
        "find out from the destination agent's journal whether it runs; if not, resume the source",
    ),
    "hung": Known(
        "a device hung on an arc",
        "a request to the device did not return within the step timeout; the driver may be "
        "stuck holding its lock (a kernel without the blocked-arc fix spins forever)",
        "the device needs attention: check the host's kernel log before using it again",
    ),
    "refused": Known(
        "the run was refused before it changed anything",
        "preflight found a device or pair it cannot migrate",
    ),
    "interrupted": Known(
        "the run was interrupted",
        "a signal (Ctrl-C, SIGTERM) stopped the run before the commit point; every device "
        "was brought back",
    ),
    "set-failed": Known(
        "a state change failed",
        "the device refused a state change on the way (its errno says why); the run rolled back",
    ),
    "other": Known("the run failed", "see the run's own explanation"),
}

_PREFLIGHT = frozenset(
    {
        Cause.NOT_MIGRATABLE,
        Cause.LEFTOVER_STATE,
        Cause.SAME_DEVICE,
        Cause.FLAGS_MISMATCH,
        Cause.NO_P2P,
        Cause.OPEN_FAILED,
    }
)

#: What a write's errno says, per the kernel drivers (vfio-migration.md §5, §10).
_WRITE_ERRNO: Final = {
    _errno.ENOMEM: "more data than the destination's state holds (ENOMEM)",
    _errno.EFAULT: "a stream header the destination does not accept (EFAULT)",
    _errno.EINVAL: "a malformed record (EINVAL)",
    _errno.EIO: "an I/O error in the destination's driver (EIO)",
}


@dataclass(frozen=True, slots=True)
class Seen:
    """A device's state as vfmig knew it, by ioctl and by debugfs."""

    ioctl: DeviceState | None
    debugfs: str | None  #: the debugfs text; None if never sampled
    stale: bool = False  #: the debugfs sample predates the device's last state change

    def text(self) -> str:
        ioctl = self.ioctl.name if self.ioctl is not None else "unknown"
        debugfs = self.debugfs.strip() if self.debugfs is not None else "not sampled"
        if self.debugfs is not None and self.stale:
            debugfs += " (sampled before the last state change)"
        return f"{ioctl} by ioctl, {debugfs} by debugfs"


@dataclass(frozen=True, slots=True, kw_only=True)
class Diagnosis:
    cause: str  #: a key of :data:`KNOWN`
    outcome: Outcome | None  #: None when the journal ends before the run did
    device: DeviceId | None = None
    phase: Phase | None = None
    step: str | None = None
    errno: int | None = None
    error_cause: Cause | None = None  #: the run's own cause of the first failure
    message: str | None = None  #: the run's own message of the first failure
    seq: int | None = None
    at_ns: int | None = None
    before: Seen | None = None
    after: Seen | None = None
    evidence: tuple[str, ...] = ()
    errors_total: int = 0

    @property
    def known(self) -> Known:
        return KNOWN[self.cause]

    @property
    def explanation(self) -> str:
        if self.cause == "other" and self.error_cause is not None:
            return CAUSES[self.error_cause].explanation
        return self.known.explanation

    @property
    def hint(self) -> str | None:
        if self.cause == "other" and self.error_cause is not None:
            return CAUSES[self.error_cause].hint
        return self.known.hint

    @property
    def failed(self) -> bool:
        return self.cause != "completed"

    def lines(self, start_ns: int = 0) -> list[str]:
        """The diagnosis in plain words, one fact per line."""
        out = [f"verdict: {self.known.title}"]
        if self.outcome is not None:
            out[0] += f" (outcome {self.outcome.value})"
        if self.step is not None:
            where = f"{self.device}" if self.device is not None else "run-wide"
            phase = self.phase.value if self.phase is not None else "?"
            errno = f", {errno_name(self.errno)}" if self.errno is not None else ""
            when = (
                f" at +{(self.at_ns - start_ns) / 1e9:.3f} s (record {self.seq})"
                if self.at_ns is not None
                else ""
            )
            out.append(f"first failure: {where}, phase {phase}, step {self.step}{errno}{when}")
        if self.message:
            out.append(f"reported: {self.message}")
        if self.before is not None:
            out.append(f"state before: {self.before.text()}")
        if self.after is not None:
            out.append(f"state after: {self.after.text()}")
        out.append(f"likely cause: {self.explanation}")
        out.extend(f"evidence: {line}" for line in self.evidence)
        if self.hint:
            out.append(f"what to do: {self.hint}")
        if self.errors_total > 1:
            out.append(f"{self.errors_total - 1} later error(s) followed (see vfmig replay)")
        return out


def _is_request(event: IoctlCompleted) -> bool:
    """A SET or a reset: what moves a device (GETs and queries do not)."""
    return event.name == "VFIO_DEVICE_RESET" or ("set", 1) in event.args


class Diagnoser:
    """Folds records; :meth:`result` concludes. Bounded memory whatever the run's length."""

    def __init__(self) -> None:
        self.model = RunView()
        self._failed_request: dict[DeviceId, Seen] = {}
        self._pre_change: dict[DeviceId, tuple[str, Seen]] = {}
        self._stale: set[DeviceId] = set()  #: debugfs sampled before the last state change
        self._opened_size: dict[DeviceId, int | None] = {}
        self._first: ErrorRaised | None = None
        self._first_at: tuple[int, int] | None = None
        self._hung: DeviceHung | None = None
        self._before_first: Seen | None = None
        self._after: Seen | None = None
        self._watching: DeviceId | None = None
        self._peer_lost: PeerLost | None = None

    def _seen(self, dev: DeviceId) -> Seen:
        d = self.model.device(dev)
        return Seen(d.state, d.debugfs_text, dev in self._stale)

    def feed(self, record: Observed) -> None:
        event = record.event
        match event:
            case IoctlCompleted() if _is_request(event):
                if self._watching == event.device:
                    self._watching = None  # the next request: "after" is complete
                if event.errno is None:
                    self._failed_request.pop(event.device, None)
                else:
                    self._failed_request[event.device] = self._seen(event.device)
            case DeviceOpened():
                self._opened_size[event.device] = event.data_size
            case StateChanged():
                self._pre_change[event.device] = (event.step, self._seen(event.device))
                first = self._first
                if (
                    self._watching == event.device
                    and first is not None
                    and event.step != first.step
                ):
                    self._watching = None  # another request moved it: "after" is complete
            case PhaseChanged():
                self._watching = None  # the rollback (or the next phase) begins
            case DeviceHung() if self._hung is None and self._first is None:
                self._hung = event
            case PeerLost() if self._peer_lost is None:
                self._peer_lost = event
        self.model = reduce(self.model, record)
        match event:
            case DebugfsSampled():
                self._stale.discard(event.device)
            case StateChanged():
                self._stale.add(event.device)
        match event:
            case ErrorRaised() if self._first is None:
                self._first = event
                self._first_at = (record.seq, record.at_ns)
                if event.device is not None:
                    dev = event.device
                    self._before_first = self._state_before(dev, event.step)
                    self._after = self._seen(dev)
                    self._watching = dev
            case StateChanged() | DebugfsSampled() if event.device == self._watching:
                self._after = self._seen(event.device)

    def _state_before(self, dev: DeviceId, step: str) -> Seen:
        """The state the failing step met: as its failed request's answer found it, or, for
        a request that moved the device part of the way (a state change with the same step
        just before the error), before that change; else as it is now."""
        failed = self._failed_request.get(dev)
        if failed is not None:
            return failed
        moved = self._pre_change.get(dev)
        if moved is not None and moved[0] == step:
            return moved[1]
        return self._seen(dev)

    def _sizes(self, dev: DeviceId) -> tuple[int | None, int | None]:
        src = DeviceId(Role.SOURCE, dev.index)
        dst = DeviceId(Role.DESTINATION, dev.index)
        return self._opened_size.get(src), self._opened_size.get(dst)

    def result(self) -> Diagnosis:
        model = self.model
        finished = model.finished
        outcome = finished.outcome if finished is not None else None
        first = self._first
        if first is None:
            if finished is None:
                return Diagnosis(
                    cause="unfinished",
                    outcome=None,
                    seq=model.seq,
                    at_ns=model.at_ns,
                    evidence=self._unfinished_evidence(),
                )
            if outcome is Outcome.COMPLETED:
                return Diagnosis(cause="completed", outcome=outcome)
            return Diagnosis(
                cause="other",
                outcome=outcome,
                message=finished.summary,
                evidence=("the run reported no error before it ended",),
            )
        cause, evidence = self._classify(first)
        if finished is None:
            evidence = (*evidence, *self._unfinished_evidence())
        elif outcome is Outcome.COMPLETED:
            evidence = (*evidence, "the run completed despite this error (after the commit point)")
        if first.device is not None and self._after is not None:
            d = self._after
            if (
                d.debugfs is not None
                and d.ioctl is not None
                and not d.stale
                and d.debugfs.strip() != d.ioctl.name
            ):
                evidence = (
                    *evidence,
                    f"debugfs reads {d.debugfs.strip()} but the ioctl state is {d.ioctl.name}: "
                    "the driver's own view disagrees with vfmig's",
                )
        seq, at_ns = self._first_at or (None, None)
        return Diagnosis(
            cause=cause,
            outcome=outcome,
            device=first.device,
            phase=first.phase,
            step=first.step,
            errno=first.errno,
            error_cause=first.cause,
            message=first.message,
            seq=seq,
            at_ns=at_ns,
            before=self._before_first,
            after=self._after,
            evidence=evidence,
            errors_total=model.errors_total,
        )

    def _unfinished_evidence(self) -> tuple[str, ...]:
        phase = self.model.phase.value if self.model.phase else "before any phase"
        committed = "after" if self.model.committed else "before"
        return (
            f"the last record ({self.model.seq}) is in phase {phase}, {committed} the commit "
            "point; no end-of-run record follows",
        )

    def _classify(self, first: ErrorRaised) -> tuple[str, tuple[str, ...]]:
        cause = first.cause
        dev = first.device
        evidence: list[str] = []
        sizes_differ = False
        if dev is not None:
            src_size, dst_size = self._sizes(dev)
            if src_size is not None and dst_size is not None:
                sizes_differ = src_size != dst_size
                relation = "differs from" if sizes_differ else "equals"
                evidence.append(
                    f"MIG_DATA_SIZE of src{dev.index} ({format_bytes(src_size)}) {relation} "
                    f"that of dst{dev.index} ({format_bytes(dst_size)})"
                )
        if first.errno == _errno.EBUSY or cause is Cause.DEVICE_BUSY:
            return "device-busy", tuple(evidence)
        if cause is Cause.SIZE_MISMATCH or (
            sizes_differ and cause in (Cause.WRITE_REFUSED, Cause.STREAM_REJECTED)
        ):
            if first.errno in _WRITE_ERRNO:
                evidence.append(f"the destination answered {_WRITE_ERRNO[first.errno]}")
            return "size-mismatch", tuple(evidence)
        if cause is Cause.STREAM_REJECTED:
            return "stream-rejected", tuple(evidence)
        if cause is Cause.WRITE_REFUSED:
            if first.errno in _WRITE_ERRNO:
                evidence.append(f"the destination answered {_WRITE_ERRNO[first.errno]}")
            return "write-refused", tuple(evidence)
        if cause is Cause.NOT_CONVERGED:
            return "not-converged", tuple(self._precopy_evidence())
        if cause is Cause.IN_DOUBT or (
            self.model.finished is not None and self.model.finished.outcome is Outcome.IN_DOUBT
        ):
            return "in-doubt", tuple(evidence)
        if cause is Cause.LINK_LOST:
            return "link-lost", tuple(evidence)
        if cause is Cause.PEER_LOST:
            lost = self._peer_lost
            if lost is not None:
                devices = ", ".join(str(d) for d in lost.devices) or "no device"
                side = "after" if lost.committed else "before"
                evidence.append(
                    f"lost the agent at {lost.host} ({devices}) {side} the commit point"
                )
            return "peer-lost", tuple(evidence)
        if cause is Cause.HUNG:
            hung = self._hung
            if hung is not None:
                last = hung.state.name if hung.state is not None else "unknown"
                target = f" toward {hung.target.name}" if hung.target is not None else ""
                evidence.append(f"{hung.device} hung in {hung.step}{target}; last seen in {last}")
            return "hung", tuple(evidence)
        if cause in _PREFLIGHT:
            return "refused", tuple(evidence)
        if cause is Cause.INTERRUPTED:
            return "interrupted", tuple(evidence)
        if cause is Cause.SET_FAILED:
            return "set-failed", tuple(evidence)
        return "other", tuple(evidence)

    def _precopy_evidence(self) -> list[str]:
        out = []
        for dev, d in sorted(self.model.devices.items(), key=lambda kv: str(kv[0])):
            if dev.role is Role.SOURCE and d.initial is not None:
                out.append(
                    f"{dev}'s last precopy sample: {format_bytes(d.initial)} initial, "
                    f"{format_bytes(d.dirty or 0)} dirty"
                )
        first = self._first
        if first is not None and "switchover-ack" in first.message:
            out.append("a destination never acknowledged its initial data (switchover-ack)")
        return out
