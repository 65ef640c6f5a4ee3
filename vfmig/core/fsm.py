"""The kernel's VFIO migration v2 state machine, transcribed, plus vfmig's own safety rules.

Theory of operation
-------------------
A ``VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`` SET names a *target* state. The
driver does not jump there: it loops ``while (cur != new)``, asking
``vfio_mig_get_next_state()`` for one step at a time and executing each step
(an *arc*) on the device. That helper is a lookup in ``vfio_from_fsm_table``
followed by a skip loop over states the device's migration flags lack. This
module is a line-by-line transcription of that function and its two tables
from Linux 6.12 (``drivers/vfio/vfio_main.c``), so :func:`path` predicts every
state the kernel passes through for any request, and the errno it refuses
with.

Three things sit on top of the transcription, none of which changes it:

* :data:`VFMIG_REFUSALS`: arcs vfmig never requests although the kernel table
  has an entry for them. STOP_COPY -> PRE_COPY/PRE_COPY_P2P makes kernels from
  6.2 until the 2026 fix (stable 6.12.96, 6.18.39) spin forever in the skip
  loop on the ERROR sentinel while holding the driver's state mutex.
* :func:`arc_effect`: what each single arc does to the data session (open a
  saving or resuming fd, keep it, end it), so a caller knows after any request
  -- successful or not -- which cached data fd may still be used.
* :func:`plan`: one call that combines the kernel's answer, vfmig's refusals
  and the data-fd bookkeeping into a :class:`Plan` a caller acts on.

:func:`kernel_refusal` says in words why the kernel answers EINVAL, and
:func:`driver_arcs` lists the single arcs a driver with given flags executes
(what ``vfmig fsm --dot`` draws). tests/core/test_fsm_kernel.py compiles the
kernel's own function from Debian's 6.12 source and compares it with
:func:`path` for every flag set, current state and target 0..8.

Pure: no I/O, no clock, stdlib only.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass
from typing import Final


class DeviceState(enum.IntEnum):
    """``enum vfio_device_mig_state`` (include/uapi/linux/vfio.h), values as in the uAPI."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class MigrationFlags(enum.IntFlag):
    """``VFIO_MIGRATION_*``: what ``VFIO_DEVICE_FEATURE_MIGRATION`` GET reports."""

    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


#: Number of states in the uAPI enum (``VFIO_DEVICE_NUM_STATES``); targets >= this are EINVAL.
NUM_STATES: Final = 8

#: Every flag combination a migratable device can report (STOP_COPY is mandatory).
FLAG_SETS: Final[tuple[MigrationFlags, ...]] = (
    MigrationFlags.STOP_COPY,
    MigrationFlags.STOP_COPY | MigrationFlags.P2P,
    MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY,
    MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY,
)

_S = DeviceState
_ST, _RU, _SC, _RS = _S.STOP, _S.RUNNING, _S.STOP_COPY, _S.RESUMING
_RP, _PC, _PP, _ER = _S.RUNNING_P2P, _S.PRE_COPY, _S.PRE_COPY_P2P, _S.ERROR

#: ``vfio_from_fsm_table`` of Linux 6.12 drivers/vfio/vfio_main.c, ``vfio_mig_get_next_state()``,
#: transcribed row by row: ``KERNEL_TABLE[cur][new]`` is the next single step towards ``new``.
#: Unchanged from 6.2 (4db52602a607, PRE_COPY) through 7.0. The 2026 fix ("vfio: prevent
#: infinite loop in vfio_mig_get_next_state() on blocked arc") changed the skip loop, not the table.
KERNEL_TABLE: Final[dict[DeviceState, dict[DeviceState, DeviceState]]] = {
    _ST: {_ST: _ST, _RU: _RP, _PC: _RP, _PP: _RP, _SC: _SC, _RS: _RS, _RP: _RP, _ER: _ER},
    _RU: {_ST: _RP, _RU: _RU, _PC: _PC, _PP: _RP, _SC: _RP, _RS: _RP, _RP: _RP, _ER: _ER},
    _PC: {_ST: _RU, _RU: _RU, _PC: _PC, _PP: _PP, _SC: _PP, _RS: _RU, _RP: _RU, _ER: _ER},
    _PP: {_ST: _RP, _RU: _RP, _PC: _PC, _PP: _PP, _SC: _SC, _RS: _RP, _RP: _RP, _ER: _ER},
    _SC: {_ST: _ST, _RU: _ST, _PC: _ER, _PP: _ER, _SC: _SC, _RS: _ST, _RP: _ST, _ER: _ER},
    _RS: {_ST: _ST, _RU: _ST, _PC: _ST, _PP: _ST, _SC: _ST, _RS: _RS, _RP: _ST, _ER: _ER},
    _RP: {_ST: _ST, _RU: _RU, _PC: _RU, _PP: _PP, _SC: _ST, _RS: _ST, _RP: _RP, _ER: _ER},
    _ER: dict.fromkeys(DeviceState, _ER),
}

_F = MigrationFlags
#: ``state_flags_table`` of the same function: the migration flags a state needs. ERROR's ``~0U``
#: (never satisfiable) is represented by ``None``.
REQUIRED_FLAGS: Final[dict[DeviceState, MigrationFlags | None]] = {
    _ST: _F.STOP_COPY,
    _RU: _F.STOP_COPY,
    _PC: _F.STOP_COPY | _F.PRE_COPY,
    _PP: _F.STOP_COPY | _F.P2P | _F.PRE_COPY,
    _SC: _F.STOP_COPY,
    _RS: _F.STOP_COPY,
    _RP: _F.STOP_COPY | _F.P2P,
    _ER: None,
}

#: Arcs vfmig refuses on every kernel, before any ioctl, with the reason shown to the user.
VFMIG_REFUSALS: Final[dict[tuple[DeviceState, DeviceState], str]] = {
    (_SC, _PC): (
        "STOP_COPY -> PRE_COPY is a blocked arc: kernels from 6.2 until the 2026 fix "
        "(6.12.96, 6.18.39, 7.1) loop forever on it holding the driver's state mutex"
    ),
    (_SC, _PP): (
        "STOP_COPY -> PRE_COPY_P2P is a blocked arc: kernels from 6.2 until the 2026 fix "
        "(6.12.96, 6.18.39, 7.1) loop forever on it holding the driver's state mutex"
    ),
}

SAVING_STATES: Final = frozenset({_PC, _PP, _SC})
"""States in which a saving data session exists (PRE_COPY group plus STOP_COPY)."""

PRECOPY_STATES: Final = frozenset({_PC, _PP})
"""States in which ``VFIO_MIG_GET_PRECOPY_INFO`` answers."""


def supports(state: DeviceState | int, flags: MigrationFlags) -> bool:
    """Whether a device with ``flags`` has ``state`` (the kernel's flag check, ERROR never)."""
    if not 0 <= state < NUM_STATES:
        return False
    required = REQUIRED_FLAGS[DeviceState(state)]
    return required is not None and required & flags == required


def next_state(cur: DeviceState, new: int, flags: MigrationFlags) -> DeviceState | None:
    """``vfio_mig_get_next_state()`` as fixed in 2026: the next step, or None for -EINVAL.

    ``cur`` must be a state the device has (the kernel WARNs and returns EINVAL otherwise,
    which is what None stands for here too). The fixed kernel stops the skip loop on the
    ERROR sentinel instead of spinning; an unfixed one never returns for those requests.
    """
    if not supports(cur, flags) or not supports(new, flags):
        return None
    target = DeviceState(new)
    step = KERNEL_TABLE[cur][target]
    while step is not _ER and not supports(step, flags):
        step = KERNEL_TABLE[step][target]
    return None if step is _ER else step


class ArcEffect(enum.Enum):
    """What a single arc does to the device's data session."""

    NONE = "none"
    OPENS_SAVING = "opens a saving data fd"
    OPENS_RESUMING = "opens a resuming data fd"
    CONTINUES = "keeps the saving data fd"
    ENDS = "closes the data fd"


def arc_effect(cur: DeviceState, nxt: DeviceState) -> ArcEffect:
    """The data-session effect of one arc (uAPI comments in vfio.h; measured on mtty).

    Entering the saving group (RUNNING -> PRE_COPY, RUNNING_P2P -> PRE_COPY_P2P, STOP ->
    STOP_COPY) or STOP -> RESUMING opens a new fd; moving inside the saving group keeps it
    (PRE_COPY -> STOP_COPY returns data_fd -1 and the same fd yields the rest); leaving the
    saving group or RESUMING closes it.
    """
    if cur in SAVING_STATES:
        return ArcEffect.CONTINUES if nxt in SAVING_STATES else ArcEffect.ENDS
    if cur is _RS:
        return ArcEffect.ENDS if nxt is not _RS else ArcEffect.NONE
    if nxt in SAVING_STATES:
        return ArcEffect.OPENS_SAVING
    if nxt is _RS:
        return ArcEffect.OPENS_RESUMING
    return ArcEffect.NONE


@dataclass(frozen=True, slots=True)
class Arc:
    """One step the driver executes, with its data-session effect."""

    src: DeviceState
    dst: DeviceState
    effect: ArcEffect

    def __str__(self) -> str:
        return f"{self.src.name}>{self.dst.name}"


@dataclass(frozen=True, slots=True)
class KernelPath:
    """What the kernel does for one SET: the arcs it walks, or its refusal.

    ``arcs`` is empty for a no-op (``cur == new``) and for a refusal; ``errno`` is None on
    success. The kernel refuses before the first step: every refusal depends only on the
    current state, the target and the flags, or on the first table lookup (tested
    exhaustively, and against the compiled kernel function).
    """

    arcs: tuple[Arc, ...]
    errno: int | None

    @property
    def states(self) -> tuple[DeviceState, ...]:
        """The states after ``from``, ending in the target (the ``path`` of ``vfmig fsm``)."""
        return tuple(arc.dst for arc in self.arcs)


def path(cur: DeviceState, new: int, flags: MigrationFlags) -> KernelPath:
    """Every state the kernel passes through when asked to go from ``cur`` to ``new``.

    Mirrors the drivers' ``while (cur != new)`` loop: equal states succeed without consulting
    the table (even ERROR -> ERROR), otherwise one :func:`next_state` per step. The table has
    no cycles, so the loop ends within four steps (tested exhaustively, with a cap).
    """
    arcs: list[Arc] = []
    here = cur
    while here != new:
        step = next_state(here, new, flags)
        if step is None:
            return KernelPath(arcs=(), errno=errno.EINVAL)
        arcs.append(Arc(here, step, arc_effect(here, step)))
        here = step
    return KernelPath(arcs=tuple(arcs), errno=None)


def driver_arcs(flags: MigrationFlags) -> tuple[Arc, ...]:
    """Every single arc the kernel can ask a driver with ``flags`` to execute, sorted.

    The table's answers for every pair of states the device has, after the skip loop: the
    "driver must implement" lists in the comment atop ``vfio_mig_get_next_state()``.
    """
    found: set[tuple[DeviceState, DeviceState]] = set()
    for cur in DeviceState:
        for new in DeviceState:
            if cur != new and (step := next_state(cur, new, flags)) is not None:
                found.add((cur, step))
    return tuple(Arc(src, dst, arc_effect(src, dst)) for src, dst in sorted(found))


def kernel_refusal(cur: DeviceState, new: int, flags: MigrationFlags) -> str | None:
    """Why the (fixed) kernel answers this SET with EINVAL, or None when it does not.

    The checks of ``vfio_mig_get_next_state()`` in its order: the current state (a device
    in ERROR, or in a state its flags lack, trips a ``WARN_ON``), the target's range and
    flags (ERROR needs ``~0U``: never satisfiable), then the table's ERROR entries, the
    blocked arcs. ``path(cur, new, flags).errno`` is EINVAL exactly when this is not None.
    """
    if cur == new:
        return None
    if not supports(cur, flags):
        if cur is _ER:
            return "ERROR is not a valid current state: the kernel WARNs and refuses every SET"
        missing = (REQUIRED_FLAGS[cur] or _F(0)) & ~flags
        return (
            f"{cur.name} needs {flag_names(missing)}: not a valid current state, the kernel WARNs"
        )
    if not 0 <= new < NUM_STATES:
        return f"{new} is out of range: the states end at PRE_COPY_P2P ({NUM_STATES - 1})"
    target = DeviceState(new)
    if target is _ER:
        return "ERROR cannot be requested: its state_flags_table entry (~0U) never matches"
    if not supports(target, flags):
        missing = (REQUIRED_FLAGS[target] or _F(0)) & ~flags
        return f"{target.name} needs {flag_names(missing)}, which the device lacks"
    if next_state(cur, target, flags) is None:
        return (
            f"{cur.name} -> {target.name} is a blocked arc (the table says ERROR): "
            "EINVAL since the 2026 fix, an endless loop in the kernel before it"
        )
    return None


def vfmig_refusal(cur: DeviceState, new: int, flags: MigrationFlags) -> str | None:
    """Why vfmig refuses to send this request at all, or None if it may be sent.

    vfmig sends nothing the kernel would refuse (so refusals are never "probed" on real
    hardware), nothing that could hang an unfixed kernel (:data:`VFMIG_REFUSALS`), and never a
    SET to a device in ERROR (the kernel WARNs; only VFIO_DEVICE_RESET leaves ERROR). A
    request is refused here exactly when :func:`kernel_refusal` refuses it (tested), with
    vfmig's reason; a blocked arc to a state the device lacks is refused for the lacking flag,
    since such a request never reaches the kernel's loop.
    """
    if cur == new:
        return None
    if cur is _ER:
        return "the device is in ERROR: only a reset (VFIO_DEVICE_RESET) leaves it"
    if not supports(cur, flags):
        return f"the device reports {cur.name}, a state its flags do not allow"
    if not 0 <= new < NUM_STATES:
        return f"{new} is not a migration state (the uAPI has {NUM_STATES})"
    target = DeviceState(new)
    if target is _ER:
        return "ERROR cannot be requested: the device enters it only on a driver failure"
    if not supports(target, flags):
        missing = (REQUIRED_FLAGS[target] or _F(0)) & ~flags
        return f"the device lacks {flag_names(missing)}, which {target.name} needs"
    return VFMIG_REFUSALS.get((cur, target))


@dataclass(frozen=True, slots=True)
class Plan:
    """A request as vfmig sees it before sending it: the kernel's path plus vfmig's verdict."""

    cur: DeviceState
    target: int
    flags: MigrationFlags
    kernel: KernelPath
    refusal: str | None

    @property
    def allowed(self) -> bool:
        return self.refusal is None

    @property
    def opens(self) -> ArcEffect | None:
        """OPENS_SAVING or OPENS_RESUMING when the SET returns a new data fd, else None."""
        if self.kernel.arcs and self.kernel.arcs[-1].effect in (
            ArcEffect.OPENS_SAVING,
            ArcEffect.OPENS_RESUMING,
        ):
            return self.kernel.arcs[-1].effect
        return None


def plan(cur: DeviceState, target: int, flags: MigrationFlags) -> Plan:
    """Combine :func:`path` and :func:`vfmig_refusal` for one request."""
    return Plan(cur, target, flags, path(cur, target, flags), vfmig_refusal(cur, target, flags))


def session_survives(before: DeviceState, after: DeviceState) -> bool:
    """Whether a data session open in ``before`` is still the same session in ``after``.

    Used after a SET that failed part-way: the device may be anywhere on the path, and the
    read-back state tells whether a cached fd is still usable. Paths never leave and re-enter
    the saving group within one request, so staying inside it means the same session.
    """
    if before in SAVING_STATES:
        return after in SAVING_STATES
    return before is _RS and after is _RS


def flag_names(flags: MigrationFlags) -> str:
    """``STOP_COPY+P2P`` style, in uAPI bit order; ``none`` for no flags."""
    names = [f.name for f in MigrationFlags if f in flags and f.name is not None]
    return "+".join(names) if names else "none"
