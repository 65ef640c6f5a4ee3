"""vfmig's error tree and exit statuses.

Every error a user can see is a :class:`VfmigError`: one line of message, an optional hint
on how to fix it, and the exit status the CLI maps it to. Tracebacks are for ``--debug``.

    VfmigError
    +-- UsageError            bad arguments on the command line         (exit 2)
    |   +-- SpecError         a device spec that does not parse         (exit 2)
    +-- DeviceError           a device operation failed                 (exit 3)
    |   +-- RequestRefused    vfmig will not send this request          (exit 3)
    |   +-- StateChangeError  a SET failed; carries the read-back state (exit 3)
    |   +-- DataError         a data fd read or write failed            (exit 3)
    |   +-- DeviceHung        a step did not return in time             (exit 6)
    +-- ProtocolError lives in vfmig.protocol (it imports nothing from vfmig)

Pure: stdlib only.
"""

from __future__ import annotations

import enum
import errno as _errno
import os


class ExitStatus(enum.IntEnum):
    """Exit statuses of the ``vfmig`` command (documented in the README)."""

    OK = 0
    FAILED = 1  #: the job ran and failed (a migration rolled back, a check failed)
    USAGE = 2  #: bad arguments or a bad device spec
    DEVICE = 3  #: a device could not be opened or refused an operation
    PEER = 4  #: a peer could not be reached, authenticated or understood
    IN_DOUBT = 5  #: a migration whose outcome nobody can tell; the source stays stopped
    HUNG = 6  #: a device did not return from a step; it needs attention
    INTERRUPTED = 130  #: Ctrl-C or SIGTERM (after rolling back)


class VfmigError(Exception):
    """Base of every error vfmig reports to a user."""

    exit_status: ExitStatus = ExitStatus.FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(VfmigError):
    exit_status = ExitStatus.USAGE


class SpecError(UsageError):
    """A device spec that does not parse; the message names the offending part."""


class JournalError(VfmigError):
    """A journal that cannot be read or written (the message names the file)."""


class PeerError(VfmigError):
    """A peer could not be reached, authenticated or understood, or its link broke."""

    exit_status = ExitStatus.PEER

    def __init__(
        self, peer: str, message: str, *, code: str | None = None, hint: str | None = None
    ) -> None:
        super().__init__(f"{peer}: {message}", hint=hint)
        self.peer = peer
        self.reason = message
        self.code = code


#: Names the kernel uses where Python's errorcode picks an alias of the same number.
_KERNEL_NAMES = {
    _errno.EOPNOTSUPP: "EOPNOTSUPP",
    _errno.EAGAIN: "EAGAIN",
    _errno.EDEADLK: "EDEADLK",
}


def errno_name(code: int | None) -> str:
    """``EINVAL`` for 22; the kernel's spelling for aliases (``EOPNOTSUPP``, not ``ENOTSUP``);
    ``errno 4242`` for unknown codes; ``-`` for None."""
    if code is None:
        return "-"
    return _KERNEL_NAMES.get(code) or _errno.errorcode.get(code, f"errno {code}")


class DeviceError(VfmigError):
    """A device operation failed. ``step`` names the operation (an arc, a read, an ioctl)."""

    exit_status = ExitStatus.DEVICE

    def __init__(
        self,
        device: str,
        step: str,
        message: str | None = None,
        *,
        errno: int | None = None,
        hint: str | None = None,
    ) -> None:
        if message is None:
            message = os.strerror(errno) if errno is not None else "failed"
        text = f"{device}: {step}: {message}"
        if errno is not None:
            text += f" ({errno_name(errno)})"
        super().__init__(text, hint=hint)
        self.device = device
        self.step = step
        self.errno = errno
        self.reason = message


class RequestRefused(DeviceError):
    """vfmig refused a state change before any ioctl (see ``fsm.vfmig_refusal``)."""


class StateChangeError(DeviceError):
    """A SET failed. ``state_after`` is the state read back afterwards (None if unreadable)."""

    def __init__(
        self,
        device: str,
        step: str,
        *,
        errno: int | None,
        state_before: int,
        target: int,
        state_after: int | None,
        message: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(device, step, message, errno=errno, hint=hint)
        self.state_before = state_before
        self.target = target
        self.state_after = state_after


class DataError(DeviceError):
    """A read or write on a data fd failed at ``offset`` bytes into the stream."""

    def __init__(
        self, device: str, step: str, *, errno: int | None, offset: int, message: str | None = None
    ) -> None:
        super().__init__(device, f"{step} at offset {offset}", message, errno=errno)
        self.offset = offset


class DeviceHung(DeviceError):
    """A step did not return within its timeout; its thread is abandoned."""

    exit_status = ExitStatus.HUNG
