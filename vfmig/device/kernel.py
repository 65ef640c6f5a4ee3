"""The Kernel facade: every OS call the VFIO backend and host discovery make, in one place.

Theory of operation
-------------------
:mod:`vfmig.device.vfio` and :mod:`vfmig.device.sysfs` never call :mod:`os` or
:mod:`fcntl` directly. They take a :class:`Kernel` -- a :class:`typing.Protocol` of
exactly the calls they need -- so tests inject a fake that models ``/dev/vfio/vfio``,
groups, device fds, data fds, cdevs and ``/dev/iommu`` in memory (and decodes the
ctypes buffers it is handed), while :class:`RealKernel` maps each call one to one onto
the system call.

Two families of calls:

* **fd calls** -- ``open``, ``close``, ``ioctl``, ``readv``, ``write``. ``ioctl`` takes
  the argument the kernel expects: an integer, or a *mutable* ctypes object (a struct,
  a ``c_int32``, a char array) that the kernel reads and writes in place, so results
  such as ``out_devid`` or ``data_fd`` come back in the same object. Every call raises
  :class:`OSError` with the kernel's errno on failure.
* **filesystem queries** -- ``exists``, ``is_dir``, ``listdir``, ``readlink``,
  ``realpath``, ``read_text``: what discovery needs from sysfs, ``/dev`` and
  ``/proc``. They never open a device node (opening a vfio-pci device resets the
  function). ``listdir`` and ``readlink`` raise :class:`OSError` like their
  :mod:`os` counterparts; ``exists`` and ``is_dir`` never raise.

Everything here is synchronous and may block (a driver may sit on its lock).
"""

from __future__ import annotations

import fcntl
import os
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence
    from ctypes import _CData

    #: A path as the facade takes it.
    StrPath = str | os.PathLike[str]
    #: A buffer the kernel may write into (readv).
    WritableBuffer = bytearray | memoryview


class Kernel(Protocol):
    """The OS calls vfmig's kernel backend makes (see the module docstring)."""

    # --- fd calls -----------------------------------------------------------------

    def open(self, path: StrPath, flags: int) -> int:
        """``open(2)``; returns the new fd."""
        ...

    def close(self, fd: int) -> None:
        """``close(2)``."""
        ...

    def ioctl(self, fd: int, request: int, arg: _CData | int = 0) -> int:
        """``ioctl(2)`` with an integer or a mutable ctypes argument; returns its result."""
        ...

    def readv(self, fd: int, buffers: Sequence[WritableBuffer]) -> int:
        """``readv(2)`` straight into the caller's buffers; returns the byte count (0 = EOF)."""
        ...

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        """``write(2)``; returns how many bytes the kernel took."""
        ...

    # --- filesystem queries -------------------------------------------------------

    def exists(self, path: StrPath) -> bool:
        """Whether ``path`` exists (a dangling symlink does not)."""
        ...

    def is_dir(self, path: StrPath) -> bool:
        """Whether ``path`` is a directory (following symlinks)."""
        ...

    def listdir(self, path: StrPath) -> list[str]:
        """The entries of a directory, sorted."""
        ...

    def readlink(self, path: StrPath) -> str:
        """The target of a symlink, as stored."""
        ...

    def realpath(self, path: StrPath) -> str:
        """``path`` with every symlink resolved."""
        ...

    def read_text(self, path: StrPath) -> str:
        """The whole content of a small text file (sysfs attributes, ``/proc/N/comm``)."""
        ...


class RealKernel:
    """:class:`Kernel` on the running system: :mod:`os` and :func:`fcntl.ioctl`."""

    def open(self, path: StrPath, flags: int) -> int:
        return os.open(path, flags)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: _CData | int = 0) -> int:
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        # A mutable buffer with mutate_flag=True: the kernel's writes land in ``arg``.
        result: int = fcntl.ioctl(fd, request, arg, True)
        return result

    def readv(self, fd: int, buffers: Sequence[WritableBuffer]) -> int:
        return os.readv(fd, buffers)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        return os.write(fd, data)

    def exists(self, path: StrPath) -> bool:
        return os.path.exists(path)

    def is_dir(self, path: StrPath) -> bool:
        return os.path.isdir(path)

    def listdir(self, path: StrPath) -> list[str]:
        return sorted(os.listdir(path))

    def readlink(self, path: StrPath) -> str:
        return os.readlink(path)

    def realpath(self, path: StrPath) -> str:
        return os.path.realpath(path)

    def read_text(self, path: StrPath) -> str:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()


#: This process's RealKernel. Code that opens devices defaults to it rather than to a new
#: instance, so state kept per Kernel (the VFIO groups this process holds, which every device
#: of a group must share) is shared by all devices opened without an explicit kernel.
REAL_KERNEL: Final = RealKernel()
