"""Host discovery on a fake sysfs / /dev / /proc / debugfs tree under tmp_path."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vfmig.core.fsm import MigrationFlags
from vfmig.device import sysfs
from vfmig.device.debugfs import Availability, DebugfsReader
from vfmig.device.kernel import RealKernel
from vfmig.device.sysfs import HostPaths

if TYPE_CHECKING:
    from collections.abc import Iterator

MDEV_UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"


class Tree:
    """Builds a host tree laid out like the real one (devices reached through symlinks)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = HostPaths.under(root)

    def _link(self, link: Path, target: Path) -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        target.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link)

    def pci(
        self,
        address: str,
        *,
        driver: str | None,
        group: str | None,
        cdev: str | None = None,
        ids: tuple[str, str] = ("0x15b3", "0x101e"),
        physfn: str | None = None,
    ) -> Path:
        sys = self.host.sys
        real = sys / "devices" / "pci0000:00" / "0000:00:02.0" / address
        real.mkdir(parents=True)
        (real / "vendor").write_text(ids[0] + "\n")
        (real / "device").write_text(ids[1] + "\n")
        self._link(real / "subsystem", sys / "bus" / "pci")
        if driver is not None:
            self._link(real / "driver", sys / "bus" / "pci" / "drivers" / driver)
        if group is not None:
            self._link(real / "iommu_group", sys / "kernel" / "iommu_groups" / group)
            members = sys / "kernel" / "iommu_groups" / group / "devices"
            members.mkdir(parents=True, exist_ok=True)
            os.symlink(real, members / address)
        if cdev is not None:
            (real / "vfio-dev" / cdev).mkdir(parents=True)
        if physfn is not None:
            os.symlink(real.parent / physfn, real / "physfn")
        (sys / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)
        os.symlink(real, sys / "bus" / "pci" / "devices" / address)
        return real

    def mdev(self, uuid: str, *, group: str, driver: str | None = "mtty") -> Path:
        sys = self.host.sys
        real = sys / "devices" / "virtual" / "mtty" / "mtty" / uuid
        real.mkdir(parents=True)
        self._link(real / "subsystem", sys / "bus" / "mdev")
        types = sys / "devices" / "virtual" / "mtty" / "mtty" / "mdev_supported_types"
        self._link(real / "mdev_type", types / "mtty-2")
        if driver is not None:
            self._link(real / "driver", sys / "bus" / "mdev" / "drivers" / driver)
        self._link(real / "iommu_group", sys / "kernel" / "iommu_groups" / group)
        members = sys / "kernel" / "iommu_groups" / group / "devices"
        members.mkdir(parents=True, exist_ok=True)
        os.symlink(real, members / uuid)
        (sys / "bus" / "mdev" / "devices").mkdir(parents=True, exist_ok=True)
        os.symlink(real, sys / "bus" / "mdev" / "devices" / uuid)
        return real

    def process(self, pid: int, command: str, targets: list[str]) -> None:
        fd_dir = self.host.proc / str(pid) / "fd"
        fd_dir.mkdir(parents=True)
        (self.host.proc / str(pid) / "comm").write_text(command + "\n")
        for n, target in enumerate(targets, start=3):
            os.symlink(target, fd_dir / str(n))

    def debugfs(self, name: str, *, state: str | None, features: list[str] | None) -> None:
        device_dir = self.host.debugfs / "vfio" / name
        device_dir.mkdir(parents=True)
        if state is None:
            return
        (device_dir / "migration").mkdir()
        (device_dir / "migration" / "state").write_text(state + "\n")
        if features is not None:
            (device_dir / "migration" / "features").write_text("".join(f + "\n" for f in features))


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    t = Tree(tmp_path)
    t.pci("0000:3b:00.0", driver="mlx5_core", group="11")
    t.pci("0000:3b:00.1", driver="mlx5_vfio_pci", group="12", cdev="vfio0", physfn="0000:3b:00.0")
    t.pci("0000:3b:00.2", driver="vfio-pci", group="13", ids=("0x8086", "0x10ca"))
    t.pci("0000:5e:00.0", driver="ixgbe", group="13")
    t.mdev(MDEV_UUID, group="20")
    return t


KERNEL = RealKernel()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0000:3b:00.1", "0000:3b:00.1"),
        ("3b:00.1", "0000:3b:00.1"),
        ("3B:00.7", "0000:3b:00.7"),
        ("0001:00:1f.2", "0001:00:1f.2"),
        ("3b:00.8", None),
        ("3b:0.1", None),
        ("nonexistent", None),
    ],
)
def test_normalize_pci_address(text: str, expected: str | None) -> None:
    assert sysfs.normalize_pci_address(text) == expected


@pytest.mark.parametrize(
    ("driver", "expected"),
    [
        ("vfio-pci", True),
        ("mlx5_vfio_pci", True),
        ("hisi-acc-vfio-pci", True),
        ("nvgrace-gpu-vfio-pci", True),
        ("mlx5_core", False),
        ("vfio-pcie", False),
        (None, False),
    ],
)
def test_vfio_pci_drivers(driver: str | None, expected: bool) -> None:
    assert sysfs.is_vfio_pci_driver(driver) is expected


def test_read_pci_vf(tree: Tree) -> None:
    dev = sysfs.find("0000:3b:00.1", tree.host, KERNEL)
    assert dev is not None
    assert (dev.name, dev.bus, dev.driver, dev.iommu_group, dev.cdev) == (
        "0000:3b:00.1",
        "pci",
        "mlx5_vfio_pci",
        "12",
        "vfio0",
    )
    assert dev.description == "15b3:101e"
    assert dev.physfn == "0000:3b:00.0"
    assert dev.is_vfio
    assert dev.group_node == "/dev/vfio/12"
    assert dev.cdev_node == "/dev/vfio/devices/vfio0"


def test_read_mdev(tree: Tree) -> None:
    dev = sysfs.find(MDEV_UUID.upper(), tree.host, KERNEL)
    assert dev is not None
    assert (dev.name, dev.bus, dev.driver, dev.iommu_group, dev.cdev) == (
        MDEV_UUID,
        "mdev",
        "mtty",
        "20",
        None,
    )
    assert dev.description == "mtty-2"
    assert dev.parent == "mtty"
    assert dev.is_vfio


@pytest.mark.parametrize(
    "ident",
    [
        "3b:00.2",
        "0000:3B:00.2",
        "/sys/bus/pci/devices/0000:3b:00.2",
        "/sys/devices/pci0000:00/0000:00:02.0/0000:3b:00.2",
    ],
)
def test_find_pci_spellings(tree: Tree, ident: str) -> None:
    dev = sysfs.find(ident, tree.host, KERNEL)
    assert dev is not None
    assert dev.name == "0000:3b:00.2"
    assert dev.driver == "vfio-pci"


def test_find_by_tree_path_and_mdev_path(tree: Tree) -> None:
    by_tree_path = sysfs.find(
        str(tree.host.sys / "bus/mdev/devices" / MDEV_UUID), tree.host, KERNEL
    )
    by_sys_path = sysfs.find(f"/sys/devices/virtual/mtty/mtty/{MDEV_UUID}", tree.host, KERNEL)
    assert by_tree_path is not None
    assert by_sys_path is not None
    assert by_tree_path.name == by_sys_path.name == MDEV_UUID


def test_find_missing_says_where_it_looked(tree: Tree) -> None:
    assert sysfs.find("nonexistent", tree.host, KERNEL) is None
    assert sysfs.candidate_paths("nonexistent", tree.host) == [
        tree.host.sys / "bus/pci/devices/nonexistent",
        tree.host.sys / "bus/mdev/devices/nonexistent",
    ]
    assert sysfs.find("0000:aa:00.0", tree.host, KERNEL) is None
    assert sysfs.candidate_paths("aa:00.0", tree.host) == [
        tree.host.sys / "bus/pci/devices/0000:aa:00.0"
    ]


def test_scan_lists_vfio_functions_and_mdevs(tree: Tree) -> None:
    names = [(d.name, d.driver) for d in sysfs.scan(tree.host, KERNEL)]
    assert names == [
        ("0000:3b:00.1", "mlx5_vfio_pci"),
        ("0000:3b:00.2", "vfio-pci"),
        (MDEV_UUID, "mtty"),
    ]


def test_scan_of_an_empty_host(tmp_path: Path) -> None:
    assert sysfs.scan(HostPaths.under(tmp_path), KERNEL) == []


def test_group_members_and_viability(tree: Tree) -> None:
    members = sysfs.group_members("13", tree.host, KERNEL)
    assert [(m.name, m.driver, m.keeps_group_viable) for m in members] == [
        ("0000:3b:00.2", "vfio-pci", True),
        ("0000:5e:00.0", "ixgbe", False),
    ]
    assert str(members[1]) == "0000:5e:00.0 (ixgbe)"
    assert sysfs.group_members("99", tree.host, KERNEL) == []


def test_holders_of_group_and_cdev(tree: Tree) -> None:
    tree.process(4242, "qemu-system-x86", ["/dev/vfio/vfio", "/dev/vfio/12", "/dev/null"])
    tree.process(4343, "cloud-hypervisor", ["/dev/vfio/devices/vfio0", "/dev/iommu"])
    tree.process(4444, "bash", ["/dev/pts/0"])
    (tree.host.proc / "self").mkdir()
    scan = sysfs.scan_holders(tree.host, KERNEL)
    vf = sysfs.find("0000:3b:00.1", tree.host, KERNEL)
    idle = sysfs.find("0000:3b:00.2", tree.host, KERNEL)
    assert vf is not None
    assert idle is not None
    held = scan.held(vf)
    assert held.status == "yes"
    assert [(h.pid, h.command) for h in held.holders] == [
        (4242, "qemu-system-x86"),
        (4343, "cloud-hypervisor"),
    ]
    assert str(held) == "yes: pid 4242 (qemu-system-x86), pid 4343 (cloud-hypervisor)"
    assert scan.held(idle).status == "no"
    assert "/dev/vfio/vfio" not in scan.by_node


def test_holders_through_an_injected_dev_root(tree: Tree) -> None:
    tree.process(7, "vfmig", [str(tree.host.dev / "vfio" / "13")])
    dev = sysfs.find("0000:3b:00.2", tree.host, KERNEL)
    assert dev is not None
    assert sysfs.scan_holders(tree.host, KERNEL).held(dev).status == "yes"


class Unreadable(RealKernel):
    """A host where some fd tables cannot be read (not root)."""

    def __init__(self, denied: set[str]) -> None:
        self.denied = denied

    def listdir(self, path: str | os.PathLike[str]) -> list[str]:
        if os.fspath(path) in self.denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return super().listdir(path)


def test_holders_unknown_when_some_fd_table_is_unreadable(tree: Tree) -> None:
    tree.process(1, "init", ["/dev/null"])
    tree.process(4242, "qemu", ["/dev/vfio/12"])
    kernel = Unreadable({str(tree.host.proc / "1" / "fd")})
    scan = sysfs.scan_holders(tree.host, kernel)
    assert not scan.complete
    vf = sysfs.find("0000:3b:00.1", tree.host, kernel)
    idle = sysfs.find("0000:3b:00.2", tree.host, kernel)
    assert vf is not None
    assert idle is not None
    assert scan.held(vf).status == "yes"  # a holder found is certain anyway
    assert scan.held(idle).status == "unknown"
    no_proc = sysfs.scan_holders(tree.host, Unreadable({str(tree.host.proc)}))
    assert no_proc.held(idle).status == "unknown"


def test_debugfs_features_give_flags_and_state(tree: Tree) -> None:
    tree.debugfs(
        "0000:3b:00.1",
        state="PRE_COPY",
        features=["stop-copy", "p2p", "pre-copy", "dirty-tracking"],
    )
    info = sysfs.debugfs_migration("0000:3b:00.1", tree.host)
    assert info.supported is True
    assert info.flags == MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY
    assert info.dirty_tracking is True
    assert info.state == "PRE_COPY"
    assert info.flags_text == "STOP_COPY+P2P+PRE_COPY+dirty-tracking"


def test_debugfs_before_6_18_has_state_but_no_flags(tree: Tree) -> None:
    tree.debugfs(MDEV_UUID, state="RUNNING", features=None)
    info = sysfs.debugfs_migration(MDEV_UUID, tree.host)
    assert (info.supported, info.flags, info.state, info.flags_text) == (
        True,
        None,
        "RUNNING",
        "unknown",
    )


def test_debugfs_device_without_migration_ops(tree: Tree) -> None:
    tree.debugfs("0000:3b:00.2", state=None, features=None)
    info = sysfs.debugfs_migration("0000:3b:00.2", tree.host)
    assert info.supported is False
    assert info.flags_text == "none"


def test_debugfs_absent_means_unknown(tree: Tree) -> None:
    info = sysfs.debugfs_migration("0000:3b:00.1", tree.host)
    assert info.supported is None
    assert info.flags_text == "unknown"
    assert info.state is None


def test_unreadable_debugfs_is_no_permission_not_unmounted(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree.debugfs("0000:3b:00.1", state="RUNNING", features=None)
    reader = DebugfsReader("0000:3b:00.1", tree.host.debugfs)
    assert reader.availability() is Availability.OK
    # What a normal user meets on the mode-0700 debugfs root: no access, no listing.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    listing = Path.iterdir

    def iterdir(path: Path) -> Iterator[Path]:
        if path == tree.host.debugfs:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert reader.availability() is Availability.NO_PERMISSION
    assert reader.read_state().raw == Availability.NO_PERMISSION.value
