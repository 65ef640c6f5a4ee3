"""The migration debugfs view of a device: ``<debugfs>/vfio/<dev>/migration/{state,features}``.

Theory of operation
-------------------
Since 6.8 (``CONFIG_VFIO_DEBUGFS``) the vfio core exposes, per migratable device,
a ``state`` file holding the uAPI name of the current state, and since 6.18 a
``features`` file listing ``stop-copy``, ``p2p``, ``pre-copy``,
``dirty-tracking``. Reading ``state`` takes the driver's state mutex, so a stuck
driver makes the read block forever: every read here runs in a daemon thread
and is abandoned after a timeout (it changes nothing, so abandoning is safe).
The engine calls these from its own worker thread with its own limiter.

The simulated device writes the same files into a tree of its own and hands out
a reader rooted there, so both backends go through this one reader.
"""

from __future__ import annotations

import enum
import errno as _errno
import os
from dataclasses import dataclass
from pathlib import Path

from vfmig.core.fsm import DeviceState
from vfmig.device.abandon import Abandoned, call_abandonable

#: Where debugfs is mounted on a normal host.
DEFAULT_ROOT = Path("/sys/kernel/debug")

#: How long a debugfs read may take before it is abandoned (the driver is presumed stuck).
DEFAULT_TIMEOUT = 2.0


class Availability(enum.Enum):
    OK = "ok"
    NOT_MOUNTED = "debugfs is not mounted"
    NO_VFIO = "debugfs has no vfio directory (kernel built without CONFIG_VFIO_DEBUGFS?)"
    NO_DEVICE = "debugfs has no migration directory for this device"
    NO_PERMISSION = "debugfs is not readable (root needed)"


@dataclass(frozen=True, slots=True)
class DebugfsReading:
    """One read of the ``state`` file.

    ``state`` is None when the file could not give a state: ``raw`` then says why
    (``Invalid`` from the kernel, an errno name, ``timeout``, or the availability problem).
    """

    state: DeviceState | None
    raw: str


def _read(path: Path, timeout: float) -> str:
    return call_abandonable(path.read_text, timeout, f"debugfs read of {path}")


class DebugfsReader:
    """Reads one device's migration debugfs files."""

    def __init__(self, device_name: str, root: Path = DEFAULT_ROOT) -> None:
        self.device_name = device_name
        self.root = root

    @property
    def directory(self) -> Path:
        return self.root / "vfio" / self.device_name / "migration"

    def availability(self) -> Availability:
        """Why the state file cannot be read, or OK."""
        if not self.root.is_dir():
            return Availability.NOT_MOUNTED
        # Before the emptiness check: a mounted debugfs is mode 0700, and listing it as a
        # normal user fails like an empty (unmounted) directory would.
        if not os.access(self.root, os.R_OK | os.X_OK):
            return Availability.NO_PERMISSION
        if not any(self._safe_iterdir(self.root)):
            return Availability.NOT_MOUNTED
        if not (self.root / "vfio").is_dir():
            return Availability.NO_VFIO
        if not (self.directory / "state").is_file():
            return Availability.NO_DEVICE
        return Availability.OK

    @staticmethod
    def _safe_iterdir(path: Path) -> list[Path]:
        try:
            return list(path.iterdir())
        except OSError:
            return []

    def read_state(self, timeout: float = DEFAULT_TIMEOUT) -> DebugfsReading:
        """The device state as debugfs sees it; never raises, never blocks past ``timeout``."""
        available = self.availability()
        if available is not Availability.OK:
            return DebugfsReading(None, available.value)
        try:
            text = _read(self.directory / "state", timeout).strip()
        except Abandoned:
            return DebugfsReading(None, "timeout")
        except OSError as exc:
            code = exc.errno if exc.errno is not None else _errno.EIO
            return DebugfsReading(None, _errno.errorcode.get(code, str(code)))
        try:
            return DebugfsReading(DeviceState[text], text)
        except KeyError:
            return DebugfsReading(None, text)

    def features(self, timeout: float = DEFAULT_TIMEOUT) -> frozenset[str] | None:
        """The ``features`` lines (6.18+), or None where the kernel has no such file."""
        path = self.directory / "features"
        if not path.is_file():
            return None
        try:
            text = _read(path, timeout)
        except (OSError, Abandoned):
            return None
        return frozenset(line.strip() for line in text.splitlines() if line.strip())
