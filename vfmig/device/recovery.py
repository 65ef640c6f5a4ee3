"""Bring a device found in a leftover migration state back to RUNNING, and say how.

Theory of operation
-------------------
A process that dies mid-migration leaves its devices where they were: mtty keeps its
migration state across close and reopen (vfio-migration.md §10), so the next opener finds
PRE_COPY, STOP_COPY, RESUMING, a P2P state, STOP or ERROR, without the data fd that went
with it. :func:`recover` brings such a device back to RUNNING:

1. GET the state. RUNNING: nothing to do.
2. ERROR, RESUMING, or an unreadable state: VFIO_DEVICE_RESET, never a SET. ERROR has no
   SET out of it. RESUMING is never stepped out of, because on mtty (6.12) a state change
   out of a RESUMING that survived a close oopses the kernel and leaves the device hung
   (§11); a reset first avoids it. An unreadable state may be RESUMING, so it is reset too.
3. Any other state: one SET per arc of the kernel's path to RUNNING
   (:func:`vfmig.core.fsm.plan`), so every step is reported on its own: STOP_COPY ->
   STOP -> RUNNING_P2P -> RUNNING on a P2P device, PRE_COPY -> RUNNING. Paths to RUNNING
   never take a blocked arc (STOP_COPY leaves through STOP), and every SET goes through
   :meth:`MigrationDevice.set_state`, which vets it again.
4. A refused or failed SET (its state read back, :class:`StateChangeError`): reset. After
   the last SET, GET: a device that does not read RUNNING then is reset too.
5. After a reset, GET again: the device must read RUNNING.

Every GET, SET and reset is a :class:`Step` in the :class:`RecoveryReport`, with the errno
of a failure; an ``observer`` sees each step as it completes (the CLI prints them, an agent
journals them). Failures never raise: they are reported, and :attr:`RecoveryReport.ok` says
whether the device ended in RUNNING.

Synchronous: every call may block in the driver. An agent runs it in the device's worker
thread; ``vfmig recover`` in a thread it can stop waiting for.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from vfmig.core import fsm
from vfmig.core.errors import DeviceError, StateChangeError, errno_name
from vfmig.core.fsm import DeviceState

if TYPE_CHECKING:
    from collections.abc import Callable

    from vfmig.device.backend import MigrationDevice


class Method(enum.Enum):
    """How a step acts on the device."""

    READ = "read"  #: GET of the state; changes nothing
    FSM = "fsm"  #: a SET of one arc of the kernel's path
    RESET = "reset"  #: VFIO_DEVICE_RESET


class Outcome(enum.Enum):
    NOTHING_TO_DO = "nothing to do"  #: found RUNNING
    RECOVERED = "recovered"  #: brought back to RUNNING
    FAILED = "failed"  #: not RUNNING at the end: the device needs attention


@dataclass(frozen=True, slots=True)
class Step:
    """One operation on the device and what it found."""

    method: Method
    request: str  #: ``GET``, ``STOP_COPY>STOP``, ``reset``
    before: DeviceState | None  #: state before (None: unknown)
    after: DeviceState | None  #: state after, read back on failure (None: unknown)
    ok: bool
    errno: int | None = None  #: the kernel's errno of a failure (None: none, or refused)
    note: str = ""  #: why this step was taken; for a failed step, what went wrong

    def describe(self) -> str:
        """One line for a person: ``SET STOP_COPY>STOP: ok, now STOP``."""
        after = self.after.name if self.after is not None else "unknown"
        errno = f" ({errno_name(self.errno)})" if self.errno is not None else ""
        verb = {Method.READ: "", Method.FSM: "SET ", Method.RESET: ""}[self.method]
        if not self.ok:
            return f"{verb}{self.request}: failed: {self.note}{errno}, now {after}"
        head = (
            f"GET: {after}"
            if self.method is Method.READ
            else f"{verb}{self.request}: ok, now {after}"
        )
        return f"{head} -- {self.note}" if self.note else head


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What :func:`recover` found, did and left."""

    device: str
    found: DeviceState | None  #: state found by the first GET (None: unreadable)
    final: DeviceState | None  #: state read at the end (None: unreadable)
    steps: tuple[Step, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.final is DeviceState.RUNNING

    @property
    def outcome(self) -> Outcome:
        if not self.ok:
            return Outcome.FAILED
        changed = any(step.method is not Method.READ for step in self.steps)
        return Outcome.RECOVERED if changed else Outcome.NOTHING_TO_DO

    @property
    def methods(self) -> tuple[Method, ...]:
        """The methods that changed the device, in order, each once (``fsm``, ``reset``)."""
        seen: list[Method] = []
        for step in self.steps:
            if step.method is not Method.READ and step.ok and step.method not in seen:
                seen.append(step.method)
        return tuple(seen)


#: Why a state found at the start is reset rather than stepped through the FSM.
RESET_REASONS: Final = {
    DeviceState.ERROR: "only a reset leaves ERROR",
    DeviceState.RESUMING: "a device found in RESUMING is always reset first "
    "(stepping out of a reopened RESUMING oopses mtty)",
}


class _Recovery:
    def __init__(self, device: MigrationDevice, observer: Callable[[Step], None] | None) -> None:
        self.device = device
        self.observer = observer
        self.steps: list[Step] = []

    def add(self, step: Step) -> None:
        self.steps.append(step)
        if self.observer is not None:
            self.observer(step)

    def get(self, before: DeviceState | None, note: str = "") -> DeviceState | None:
        try:
            state = self.device.get_state()
        except DeviceError as exc:
            self.add(Step(Method.READ, "GET", before, None, False, exc.errno, exc.reason))
            return None
        self.add(Step(Method.READ, "GET", before, state, True, None, note))
        return state

    def reset(self, before: DeviceState | None, why: str) -> DeviceState | None:
        try:
            self.device.reset()
        except DeviceError as exc:
            failure = f"{why}; {exc.reason}"
            self.add(Step(Method.RESET, "reset", before, None, False, exc.errno, failure))
            return self.get(None, "after the failed reset")
        self.add(Step(Method.RESET, "reset", before, DeviceState.RUNNING, True, None, why))
        return self.get(DeviceState.RUNNING, "checking the reset")

    def walk(self, found: DeviceState) -> DeviceState | None:
        """SET one arc of the kernel's path at a time; reset when a SET is refused or fails."""
        state = found
        for arc in fsm.plan(found, DeviceState.RUNNING, self.device.flags).kernel.arcs:
            request = str(arc)
            try:
                self.device.set_state(arc.dst)
            except StateChangeError as exc:
                after = _state_or_none(exc.state_after)
                self.add(Step(Method.FSM, request, state, after, False, exc.errno, exc.reason))
                return self.reset(after, f"the SET {request} failed")
            except DeviceError as exc:  # refused before any ioctl, or its GET failed
                self.add(Step(Method.FSM, request, state, None, False, exc.errno, exc.reason))
                return self.reset(None, f"the SET {request} could not be made")
            self.add(Step(Method.FSM, request, state, arc.dst, True))
            state = arc.dst
        final = self.get(state, "checking the result")
        if final is DeviceState.RUNNING:
            return final
        what = "cannot be read" if final is None else f"reads {final.name}, not RUNNING"
        return self.reset(final, f"after the path to RUNNING the state {what}")


def _state_or_none(value: int | None) -> DeviceState | None:
    if value is None or not 0 <= value < fsm.NUM_STATES:
        return None
    return DeviceState(value)


def recover(
    device: MigrationDevice, *, observer: Callable[[Step], None] | None = None
) -> RecoveryReport:
    """Bring ``device`` back to RUNNING (see the module docstring); never raises DeviceError."""
    run = _Recovery(device, observer)
    found = run.get(None)
    if found is DeviceState.RUNNING:
        final: DeviceState | None = found
    elif found is None:
        final = run.reset(None, "the state cannot be read, and it may be RESUMING")
    elif found in RESET_REASONS:
        final = run.reset(found, RESET_REASONS[found])
    elif not fsm.supports(found, device.flags):
        final = run.reset(found, f"{found.name} is not a state this device's flags allow")
    else:
        final = run.walk(found)
    return RecoveryReport(device=device.name, found=found, final=final, steps=tuple(run.steps))
