"""Host discovery: the VFIO devices of this host, read from sysfs, ``/proc`` and debugfs only.

Theory of operation
-------------------
Nothing here opens a device node: opening a vfio-pci device resets the function, so a
listing must not. Everything comes from files anyone (or root) can read:

* ``<sys>/bus/pci/devices/<bdf>`` and ``<sys>/bus/mdev/devices/<uuid>``: a device's
  ``driver`` link (vfio-pci, a variant driver such as ``mlx5_vfio_pci``, or the mdev
  parent's driver), its ``iommu_group`` link (the ``/dev/vfio/N`` of the group path),
  its ``vfio-dev/vfioN`` directory (every VFIO device has one; the cdev path's
  ``/dev/vfio/devices/vfioN`` node exists only with ``VFIO_DEVICE_CDEV``: Debian's 6.12
  has the directory but not the node), ``physfn`` for an SR-IOV VF and ``mdev_type`` for an mdev;
* ``<sys>/kernel/iommu_groups/N/devices``: the other members of a group, whose
  drivers decide whether the group is *viable* (usable from user space);
* ``<proc>/*/fd``: which processes hold ``/dev/vfio/N`` or ``/dev/vfio/devices/vfioN``
  open (readable for every process only as root; otherwise the answer is "unknown"
  unless a holder was found anyway);
* ``<debugfs>/vfio/<dev>/``: ``migration/features`` (6.18+) gives the migration flags
  without opening the device; a ``vfio/<dev>`` directory without ``migration/`` means
  the driver has no migration support; ``migration/state`` is the current state.

Every root (sysfs, ``/dev``, ``/proc``, debugfs) is a field of :class:`HostPaths`, and
every sysfs and ``/proc`` query goes through the injected
:class:`~vfmig.device.kernel.Kernel` (debugfs through :class:`DebugfsReader`, which reads
with a timeout), so tests run on a fake tree under ``tmp_path``. Device paths seen by
other processes (``/proc/N/fd`` link targets) are compared in their ``/dev/...`` spelling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from vfmig.core.fsm import MigrationFlags, flag_names
from vfmig.device import debugfs
from vfmig.device.debugfs import DebugfsReader

if TYPE_CHECKING:
    from vfmig.device.kernel import Kernel


@dataclass(frozen=True, slots=True)
class HostPaths:
    """Where this host's sysfs, ``/dev``, ``/proc`` and debugfs are."""

    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    proc: Path = Path("/proc")
    debugfs: Path = debugfs.DEFAULT_ROOT

    @classmethod
    def under(cls, root: Path) -> HostPaths:
        """The four roots laid out as on a normal host, below ``root`` (a fake tree)."""
        return cls(root / "sys", root / "dev", root / "proc", root / "sys" / "kernel" / "debug")

    def sys_path(self, text: str) -> Path:
        """A ``/sys/...`` path as the user wrote it, mapped into :attr:`sys`."""
        if text == str(self.sys) or text.startswith(str(self.sys) + "/"):
            return Path(text)
        if text.startswith("/sys/"):
            return self.sys / text.removeprefix("/sys/")
        return Path(text)

    def dev_node(self, canonical: str) -> Path:
        """``/dev/vfio/12`` -> where that node is on this host (below :attr:`dev`)."""
        return self.dev / canonical.removeprefix("/dev/")

    def canonical_dev(self, target: str) -> str:
        """A ``/proc/N/fd`` link target in its ``/dev/...`` spelling."""
        prefix = str(self.dev) + "/"
        if self.dev != Path("/dev") and target.startswith(prefix):
            return "/dev/" + target.removeprefix(prefix)
        return target


#: Drivers that make a PCI function a VFIO device: vfio-pci itself and its variant drivers.
VFIO_PCI_DRIVER = "vfio-pci"

#: Drivers that keep a group viable besides VFIO's own (they never DMA for the host).
_DMA_SAFE_DRIVERS = frozenset({"pci-stub", "pcieport"})

_PCI_RE = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{4}):)?(?P<bus>[0-9a-fA-F]{2}):"
    r"(?P<slot>[0-9a-fA-F]{2})\.(?P<fn>[0-7])$"
)
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


def is_vfio_pci_driver(driver: str | None) -> bool:
    """vfio-pci or a variant driver (``*-vfio-pci``, ``*_vfio_pci``)."""
    return driver is not None and (
        driver in (VFIO_PCI_DRIVER, "vfio_pci") or driver.endswith(("-vfio-pci", "_vfio_pci"))
    )


def normalize_pci_address(text: str) -> str | None:
    """``3b:00.1`` -> ``0000:3b:00.1`` (lower case); None if ``text`` is not a PCI address."""
    m = _PCI_RE.match(text)
    if m is None:
        return None
    domain = m["domain"] or "0000"
    return f"{domain}:{m['bus']}:{m['slot']}.{m['fn']}".lower()


def is_uuid(text: str) -> bool:
    return _UUID_RE.match(text) is not None


@dataclass(frozen=True, slots=True)
class SysfsDevice:
    """A PCI function or mdev as sysfs describes it (nothing opened)."""

    name: str  #: PCI address or mdev UUID: the name VFIO and debugfs use
    bus: str  #: ``pci``, ``mdev`` (or another bus for a sysfs path that is neither)
    path: Path  #: the resolved sysfs directory
    driver: str | None  #: bound driver, None when unbound
    iommu_group: str | None  #: group number (``/dev/vfio/N``), None without an IOMMU group
    cdev: str | None  #: ``vfioN`` of ``vfio-dev/`` (its node: ``/dev/vfio/devices/vfioN``)
    description: str  #: ``vendor:device`` ids for PCI, the mdev type for an mdev
    physfn: str | None = None  #: the PF's address when this is an SR-IOV VF
    parent: str | None = None  #: the parent device of an mdev

    @property
    def is_vfio(self) -> bool:
        """Bound to a VFIO driver: vfio-pci or a variant, any mdev driver, or has ``vfio-dev/``."""
        if self.cdev is not None:
            return True
        if self.bus == "mdev":
            return self.driver is not None
        return is_vfio_pci_driver(self.driver)

    @property
    def group_node(self) -> str | None:
        """``/dev/vfio/N`` (canonical spelling), None without a group."""
        return None if self.iommu_group is None else f"/dev/vfio/{self.iommu_group}"

    @property
    def cdev_node(self) -> str | None:
        """``/dev/vfio/devices/vfioN`` (canonical spelling), None without a cdev."""
        return None if self.cdev is None else f"/dev/vfio/devices/{self.cdev}"


def _link_name(kernel: Kernel, path: Path) -> str | None:
    """The last component of a symlink's target, None if ``path`` is no symlink."""
    try:
        return Path(kernel.readlink(path)).name
    except OSError:
        return None


def _read_attr(kernel: Kernel, path: Path) -> str | None:
    try:
        return kernel.read_text(path).strip()
    except OSError:
        return None


def read_device(directory: Path, kernel: Kernel) -> SysfsDevice:
    """Describe the device whose sysfs directory is ``directory`` (resolved first)."""
    real = Path(kernel.realpath(directory))
    bus = _link_name(kernel, real / "subsystem") or directory.parent.parent.name
    cdev = None
    if kernel.is_dir(real / "vfio-dev"):
        try:
            cdev = next(
                (e for e in kernel.listdir(real / "vfio-dev") if e.startswith("vfio")), None
            )
        except OSError:
            cdev = None
    if bus == "mdev":
        description = _link_name(kernel, real / "mdev_type") or "mdev"
        parent = real.parent.name
    else:
        vendor = _read_attr(kernel, real / "vendor")
        device = _read_attr(kernel, real / "device")
        description = (
            f"{vendor.removeprefix('0x')}:{device.removeprefix('0x')}" if vendor and device else "-"
        )
        parent = None
    return SysfsDevice(
        name=real.name,
        bus=bus,
        path=real,
        driver=_link_name(kernel, real / "driver"),
        iommu_group=_link_name(kernel, real / "iommu_group"),
        cdev=cdev,
        description=description,
        physfn=_link_name(kernel, real / "physfn"),
        parent=parent,
    )


def candidate_paths(ident: str, host: HostPaths) -> list[Path]:
    """Where a device id (PCI address, mdev UUID, sysfs path, or a bare name) is looked up."""
    pci_dir = host.sys / "bus" / "pci" / "devices"
    mdev_dir = host.sys / "bus" / "mdev" / "devices"
    if ident.startswith("/"):
        return [host.sys_path(ident)]
    address = normalize_pci_address(ident)
    if address is not None:
        return [pci_dir / address]
    if is_uuid(ident):
        return [mdev_dir / ident.lower()]
    return [pci_dir / ident, mdev_dir / ident]


def find(ident: str, host: HostPaths, kernel: Kernel) -> SysfsDevice | None:
    """The device ``ident`` names, or None (see :func:`candidate_paths` for where it looked)."""
    for path in candidate_paths(ident, host):
        if kernel.is_dir(path):
            return read_device(path, kernel)
    return None


def scan(host: HostPaths, kernel: Kernel) -> list[SysfsDevice]:
    """The VFIO devices of the host: PCI functions bound to a VFIO driver, then every mdev."""
    found: list[SysfsDevice] = []
    for bus in ("pci", "mdev"):
        directory = host.sys / "bus" / bus / "devices"
        try:
            names = kernel.listdir(directory)
        except OSError:
            continue
        for name in names:
            dev = read_device(directory / name, kernel)
            if bus == "mdev" or dev.is_vfio:
                found.append(dev)
    return found


@dataclass(frozen=True, slots=True)
class GroupMember:
    name: str
    driver: str | None

    @property
    def keeps_group_viable(self) -> bool:
        """Unbound, or bound to a driver that leaves DMA to its user (VFIO, pci-stub, pcieport)."""
        return (
            self.driver is None
            or is_vfio_pci_driver(self.driver)
            or self.driver in _DMA_SAFE_DRIVERS
        )

    def __str__(self) -> str:
        return f"{self.name} ({self.driver or 'no driver'})"


def group_members(group: str, host: HostPaths, kernel: Kernel) -> list[GroupMember]:
    """The devices of IOMMU group ``group`` with their drivers (empty if unreadable)."""
    directory = host.sys / "kernel" / "iommu_groups" / group / "devices"
    try:
        names = kernel.listdir(directory)
    except OSError:
        return []
    return [GroupMember(name, _link_name(kernel, directory / name / "driver")) for name in names]


# --- who holds a device -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command})"


@dataclass(frozen=True, slots=True)
class Held:
    """Whether a device's group or cdev is open in some process."""

    status: Literal["yes", "no", "unknown"]
    holders: tuple[Holder, ...] = ()

    def __str__(self) -> str:
        if self.status == "yes":
            return "yes: " + ", ".join(str(h) for h in self.holders)
        return self.status


@dataclass(frozen=True, slots=True)
class HolderScan:
    """Open VFIO nodes found in ``/proc/*/fd``; ``complete`` if every fd table was readable."""

    by_node: dict[str, tuple[Holder, ...]] = field(default_factory=dict)
    complete: bool = True

    def held(self, device: SysfsDevice) -> Held:
        nodes = [n for n in (device.group_node, device.cdev_node) if n is not None]
        holders = tuple(h for n in nodes for h in self.by_node.get(n, ()))
        if holders:
            return Held("yes", holders)
        return Held("no" if self.complete else "unknown")


def scan_holders(host: HostPaths, kernel: Kernel) -> HolderScan:
    """Which processes hold ``/dev/vfio/*`` nodes open (needs root to see every process)."""
    try:
        entries = kernel.listdir(host.proc)
    except OSError:
        return HolderScan(complete=False)
    found: dict[str, list[Holder]] = {}
    complete = True
    for entry in entries:
        if not entry.isdigit():
            continue
        fd_dir = host.proc / entry / "fd"
        try:
            fds = kernel.listdir(fd_dir)
        except FileNotFoundError:  # the process exited meanwhile
            continue
        except OSError:
            complete = False
            continue
        nodes: set[str] = set()
        for fd in fds:
            try:
                target = host.canonical_dev(kernel.readlink(fd_dir / fd))
            except FileNotFoundError:  # the fd was closed meanwhile
                continue
            except OSError:
                complete = False
                continue
            if target.startswith("/dev/vfio/") and target != "/dev/vfio/vfio":
                nodes.add(target)
        if nodes:
            command = _read_attr(kernel, host.proc / entry / "comm") or "?"
            for node in nodes:
                found.setdefault(node, []).append(Holder(int(entry), command))
    return HolderScan({k: tuple(v) for k, v in found.items()}, complete)


# --- migration facts from debugfs ---------------------------------------------------------

_FEATURE_FLAGS = {
    "stop-copy": MigrationFlags.STOP_COPY,
    "p2p": MigrationFlags.P2P,
    "pre-copy": MigrationFlags.PRE_COPY,
}


@dataclass(frozen=True, slots=True)
class DebugfsMigration:
    """What debugfs tells about a device's migration support, without opening it.

    ``supported`` is True/False when debugfs knows, None when it cannot tell (no debugfs,
    no ``CONFIG_VFIO_DEBUGFS``, not root, or a kernel before 6.18 without ``features``).
    """

    supported: bool | None
    flags: MigrationFlags | None = None
    dirty_tracking: bool | None = None
    state: str | None = None  #: the ``state`` file's content, or why it could not be read

    @property
    def flags_text(self) -> str:
        if self.supported is False:
            return "none"
        if self.flags is None:
            return "unknown"
        text = flag_names(self.flags)
        return text + "+dirty-tracking" if self.dirty_tracking else text


def debugfs_migration(name: str, host: HostPaths) -> DebugfsMigration:
    """Migration flags (6.18+ ``features``) and state from ``<debugfs>/vfio/<name>/``."""
    reader = DebugfsReader(name, host.debugfs)
    device_dir = reader.directory.parent
    if not reader.directory.is_dir():
        # vfio/<dev>/ exists for every VFIO device; migration/ only with migration ops.
        return DebugfsMigration(supported=False if device_dir.is_dir() else None)
    reading = reader.read_state()
    state = reading.state.name if reading.state is not None else reading.raw
    features = reader.features()
    if features is None:
        return DebugfsMigration(supported=True, state=state)
    flags = MigrationFlags(0)
    for line in features:
        flags |= _FEATURE_FLAGS.get(line, MigrationFlags(0))
    return DebugfsMigration(
        supported=True, flags=flags, dirty_tracking="dirty-tracking" in features, state=state
    )
