"""Fixtures of the CLI tests: a fake host tree for ``vfmig list`` (sysfs, /dev, /proc, debugfs)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from vfmig.device.sysfs import HostPaths

if TYPE_CHECKING:
    from pathlib import Path


class FakeHostTree:
    """A host laid out like the real one under a tmp directory (devices behind symlinks)."""

    def __init__(self, root: Path) -> None:
        self.paths = HostPaths.under(root)

    def _link(self, link: Path, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link)

    def _group(self, real: Path, name: str, group: str) -> None:
        sys = self.paths.sys
        self._link(real / "iommu_group", sys / "kernel" / "iommu_groups" / group)
        members = sys / "kernel" / "iommu_groups" / group / "devices"
        members.mkdir(parents=True, exist_ok=True)
        os.symlink(real, members / name)

    def pci(self, address: str, *, driver: str, group: str, cdev: str | None = None) -> None:
        sys = self.paths.sys
        real = sys / "devices" / "pci0000:00" / address
        real.mkdir(parents=True)
        (real / "vendor").write_text("0x15b3\n")
        (real / "device").write_text("0x101e\n")
        self._link(real / "subsystem", sys / "bus" / "pci")
        self._link(real / "driver", sys / "bus" / "pci" / "drivers" / driver)
        self._group(real, address, group)
        if cdev is not None:
            (real / "vfio-dev" / cdev).mkdir(parents=True)
        (sys / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)
        os.symlink(real, sys / "bus" / "pci" / "devices" / address)

    def mdev(self, uuid: str, *, group: str, cdev: str | None = None) -> None:
        sys = self.paths.sys
        parent = sys / "devices" / "virtual" / "mtty" / "mtty"
        real = parent / uuid
        real.mkdir(parents=True)
        self._link(real / "subsystem", sys / "bus" / "mdev")
        self._link(real / "mdev_type", parent / "mdev_supported_types" / "mtty-2")
        self._link(real / "driver", sys / "bus" / "mdev" / "drivers" / "mtty")
        self._group(real, uuid, group)
        if cdev is not None:
            (real / "vfio-dev" / cdev).mkdir(parents=True)
        (sys / "bus" / "mdev" / "devices").mkdir(parents=True, exist_ok=True)
        os.symlink(real, sys / "bus" / "mdev" / "devices" / uuid)

    def node(self, canonical: str) -> None:
        """Create a device node such as ``/dev/vfio/devices/vfio0`` (an empty file here)."""
        path = self.paths.dev_node(canonical)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def process(self, pid: int, command: str, targets: list[str]) -> None:
        fd_dir = self.paths.proc / str(pid) / "fd"
        fd_dir.mkdir(parents=True)
        (self.paths.proc / str(pid) / "comm").write_text(command + "\n")
        for n, target in enumerate(targets, start=3):
            os.symlink(target, fd_dir / str(n))

    def debugfs(self, name: str, *, state: str, features: list[str] | None = None) -> None:
        migration = self.paths.debugfs / "vfio" / name / "migration"
        migration.mkdir(parents=True)
        (migration / "state").write_text(state + "\n")
        if features is not None:
            (migration / "features").write_text("".join(f + "\n" for f in features))


@pytest.fixture
def host_tree(tmp_path: Path) -> FakeHostTree:
    """An empty fake host; tests add devices, processes and debugfs entries."""
    return FakeHostTree(tmp_path / "host")
