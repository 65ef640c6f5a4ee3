"""The one device interface the engine uses, whatever backs it (a kernel VFIO device or ``sim:``).

Theory of operation
-------------------
A backend implements four small kernel-exact primitives -- ``_get_state``,
``_set_state``, ``_reset``, ``_data_size`` -- that behave exactly like the
ioctls: a failed SET raises ``OSError`` with the kernel's errno and may leave
the device anywhere on the path. :class:`MigrationDevice` wraps them with
vfmig's policy, identical for every backend:

* every request is vetted by :func:`vfmig.core.fsm.plan` first: refused
  requests never reach the device (:class:`RequestRefused`);
* after a failed SET the state is read back, and the current data session is
  dropped unless the read-back state shows it survived
  (:func:`vfmig.core.fsm.session_survives`); a stale data fd is never used;
* a successful SET that ends the data session closes it, one that opens a
  session makes it :attr:`MigrationDevice.session`.

Every primitive (and the precopy query) is reported to :attr:`MigrationDevice.observer`
if one is set: the ioctl's uAPI name, its arguments (``("feature", 2), ("set", 1),
("device_state", 3)``), result, errno and duration -- the journal's ``IoctlCompleted``
records. The observer is a plain callable, called in the calling (device) thread.

``set_state_unchecked`` skips the vetting (it still refuses the two arcs that
hang unfixed kernels): the conformance suite uses it to compare backends on
requests the kernel itself refuses.

Everything here is synchronous and may block (a driver may sit on its lock):
the engine calls it from the device's worker thread, never from the event loop.
"""

from __future__ import annotations

import abc
import enum
import errno as _errno
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Self, TypeVar

from vfmig.core import fsm
from vfmig.core.errors import DeviceError, RequestRefused, StateChangeError
from vfmig.core.fsm import DeviceState, MigrationFlags

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType
    from typing import TypeAlias

    #: ``observer(name, args, result, errno, duration_ns)``: one completed ioctl.
    IoctlObserver: TypeAlias = Callable[
        [str, tuple[tuple[str, int], ...], int, int | None, int], None
    ]

    from vfmig.device.debugfs import DebugfsReader


#: uAPI names and feature ids the observer reports (linux/vfio.h).
FEATURE: Final = "VFIO_DEVICE_FEATURE"
RESET: Final = "VFIO_DEVICE_RESET"
PRECOPY_INFO: Final = "VFIO_MIG_GET_PRECOPY_INFO"
FEATURE_MIG_DEVICE_STATE: Final = 2
FEATURE_MIG_DATA_SIZE: Final = 9
_STATE: Final = (("feature", FEATURE_MIG_DEVICE_STATE),)
_GET_STATE: Final = (*_STATE, ("get", 1))
_GET_SIZE: Final = (("feature", FEATURE_MIG_DATA_SIZE), ("get", 1))
_T = TypeVar("_T")


class Direction(enum.Enum):
    SAVING = "saving"
    RESUMING = "resuming"


@dataclass(frozen=True, slots=True)
class PrecopyInfo:
    """``struct vfio_precopy_info``: bytes the source still has to send in precopy."""

    initial_bytes: int
    dirty_bytes: int
    reinit: bool = False  #: v2: the device re-initialised its precopy data (MIG_PRECOPY_INFOv2)


class DataSession(abc.ABC):
    """A migration data fd: a saving one (read) or a resuming one (write).

    ``readinto`` returns the number of bytes read, ``0`` at the end of the stream
    (STOP_COPY only) and ``None`` for "nothing now" (ENOMSG, EAGAIN, or a 0-byte read in
    PRE_COPY*, which mtty returns): precopy is never "ended" by a read. Errors raise
    :class:`vfmig.core.errors.DataError` with the errno and the stream offset.
    """

    direction: Direction

    @abc.abstractmethod
    def readinto(self, buffer: bytearray | memoryview) -> int | None: ...

    @abc.abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write some of ``data``; returns how many bytes the driver took."""

    @abc.abstractmethod
    def precopy_info(self) -> PrecopyInfo:
        """``VFIO_MIG_GET_PRECOPY_INFO`` on this fd (PRE_COPY* only, else EINVAL)."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Drop this side's reference to the fd (idempotent)."""


class MigrationDevice(abc.ABC):
    """A migratable device, opened. Use as a context manager; ``close()`` is idempotent."""

    #: ``sim`` or ``vfio``.
    kind: str
    #: The device's own name: PCI address, mdev UUID, or simulated name.
    name: str
    #: Migration flags, read once at open (``VFIO_DEVICE_FEATURE_MIGRATION``).
    flags: MigrationFlags

    def __init__(self) -> None:
        self._session: DataSession | None = None
        #: Told of every ioctl this device completes (see the module docstring).
        self.observer: IoctlObserver | None = None

    def _observed(self, name: str, args: tuple[tuple[str, int], ...], call: Callable[[], _T]) -> _T:
        """Run one primitive, reporting it to the observer (if any) whether it fails or not."""
        observer = self.observer
        if observer is None:
            return call()
        start = time.monotonic_ns()
        try:
            result = call()
        except (OSError, DeviceError) as exc:  # a data session reports DeviceError itself
            observer(name, args, -1, exc.errno, time.monotonic_ns() - start)
            raise
        observer(name, args, 0, None, time.monotonic_ns() - start)
        return result

    # --- primitives, kernel-exact ------------------------------------------------------

    @abc.abstractmethod
    def _get_state(self) -> DeviceState:
        """MIG_DEVICE_STATE GET. Raises OSError."""

    @abc.abstractmethod
    def _set_state(self, target: int) -> DataSession | None:
        """MIG_DEVICE_STATE SET. Returns the new session if the SET returned a data fd.

        Raises OSError with the kernel's errno; the device may then be anywhere on the path.
        """

    @abc.abstractmethod
    def _reset(self) -> None:
        """VFIO_DEVICE_RESET: to RUNNING, every data fd closed. Raises OSError."""

    @abc.abstractmethod
    def _data_size(self) -> int:
        """MIG_DATA_SIZE GET: the estimated STOP_COPY stream length. Raises OSError."""

    @abc.abstractmethod
    def _close(self) -> None: ...

    @property
    @abc.abstractmethod
    def debugfs(self) -> DebugfsReader | None:
        """The migration debugfs view of this device, if the host has one."""

    # --- policy, shared by every backend -----------------------------------------------

    @property
    def session(self) -> DataSession | None:
        """The open data session, if any (never a stale one)."""
        if self._session is not None and self._session.closed:
            self._session = None
        return self._session

    def get_state(self) -> DeviceState:
        try:
            return self._observed(FEATURE, _GET_STATE, self._get_state)
        except OSError as exc:
            raise DeviceError(self.name, "GET device state", errno=exc.errno) from exc

    def set_state(self, target: DeviceState) -> DataSession | None:
        """Request ``target``; vetted first, state read back on failure. Returns a new session."""
        cur = self.get_state()
        refusal = fsm.vfmig_refusal(cur, target, self.flags)
        if refusal is not None:
            raise RequestRefused(self.name, f"{cur.name}>{DeviceState(target).name}", refusal)
        return self._checked_set(cur, target)

    def set_state_unchecked(self, target: int) -> DataSession | None:
        """Send any SET the kernel could answer (conformance tests); never a hanging arc."""
        cur = self.get_state()
        if 0 <= target < fsm.NUM_STATES and (cur, DeviceState(target)) in fsm.VFMIG_REFUSALS:
            raise RequestRefused(
                self.name,
                f"{cur.name}>{DeviceState(target).name}",
                fsm.VFMIG_REFUSALS[(cur, DeviceState(target))],
            )
        return self._checked_set(cur, target)

    def _checked_set(self, cur: DeviceState, target: int) -> DataSession | None:
        name = DeviceState(target).name if 0 <= target < fsm.NUM_STATES else str(target)
        try:
            args = (*_STATE, ("set", 1), ("device_state", target))
            new_session = self._observed(FEATURE, args, lambda: self._set_state(target))
        except OSError as exc:
            after = self._read_back()
            if self._session is not None and (
                after is None or not fsm.session_survives(cur, after)
            ):
                self._drop_session()
            raise StateChangeError(
                self.name,
                f"{cur.name}>{name}",
                errno=exc.errno,
                state_before=cur,
                target=target,
                state_after=after,
            ) from exc
        if cur != target and not fsm.session_survives(cur, DeviceState(target)):
            self._drop_session()
        if new_session is not None:
            self._drop_session()
            self._session = new_session
        return new_session

    def _read_back(self) -> DeviceState | None:
        try:
            return self._observed(FEATURE, _GET_STATE, self._get_state)
        except OSError:
            return None

    def _drop_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def reset(self) -> None:
        self._drop_session()
        try:
            self._observed(RESET, (), self._reset)
        except OSError as exc:
            raise DeviceError(self.name, "VFIO_DEVICE_RESET", errno=exc.errno) from exc

    def data_size(self) -> int:
        try:
            return self._observed(FEATURE, _GET_SIZE, self._data_size)
        except OSError as exc:
            raise DeviceError(self.name, "GET MIG_DATA_SIZE", errno=exc.errno) from exc

    def precopy_info(self) -> PrecopyInfo:
        session = self.session
        if session is None or session.direction is not Direction.SAVING:
            raise DeviceError(
                self.name,
                "VFIO_MIG_GET_PRECOPY_INFO",
                "no saving data session",
                errno=_errno.EINVAL,
            )
        return self._observed(PRECOPY_INFO, (), session.precopy_info)

    def close(self) -> None:
        self._drop_session()
        self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
