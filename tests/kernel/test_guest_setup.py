"""In the guest: guest-setup.sh left the kernel as the tier promises (docs/kernel-tier.md)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from vfmig.core.fsm import DeviceState
from vfmig.device.debugfs import Availability, DebugfsReader

pytestmark = pytest.mark.kernel

MDEV_DEVICES = Path("/sys/bus/mdev/devices")


def iommu_group(uuid: str) -> str:
    return (MDEV_DEVICES / uuid / "iommu_group").resolve().name


def is_char_device(path: Path) -> bool:
    return path.exists() and stat.S_ISCHR(path.stat().st_mode)


def test_booted_the_kernel_the_host_prepared(guest: dict[str, Any]) -> None:
    assert guest["kernel"] == guest["expected_kernel"]


@pytest.mark.parametrize("module", ["vfio", "vfio_iommu_type1", "mdev", "mtty"])
def test_module_loaded(guest: dict[str, Any], module: str) -> None:
    assert (Path("/sys/module") / module / "initstate").read_text().strip() == "live"


@pytest.mark.parametrize("module", ["vfio", "mtty"])
def test_out_of_tree_module_is_the_one_built(guest: dict[str, Any], module: str) -> None:
    """vfio and mtty are the harness's builds (taint O: out of tree), not stock modules."""
    assert "O" in (Path("/sys/module") / module / "taint").read_text()


def test_vfio_has_debugfs(guest: dict[str, Any]) -> None:
    """The stock Debian vfio.ko has no CONFIG_VFIO_DEBUGFS; the rebuilt one has."""
    assert (Path(guest["debugfs"]) / "vfio").is_dir()


def test_container_node(guest: dict[str, Any]) -> None:
    assert is_char_device(Path("/dev/vfio/vfio"))


def test_mdev_exists_with_its_type(mdev: tuple[str, str]) -> None:
    uuid, kind = mdev
    assert (MDEV_DEVICES / uuid / "mdev_type").resolve().name == kind


def test_mdev_has_its_own_iommu_group_node(mdev: tuple[str, str]) -> None:
    group = iommu_group(mdev[0])
    assert group.isdigit()
    assert is_char_device(Path("/dev/vfio") / group)


def test_iommu_groups_are_distinct(guest: dict[str, Any]) -> None:
    groups = [iommu_group(m["uuid"]) for m in guest["mdevs"]]
    assert len(set(groups)) == len(groups), groups


def test_debugfs_state_reads_running(guest: dict[str, Any], mdev: tuple[str, str]) -> None:
    reader = DebugfsReader(mdev[0], root=Path(guest["debugfs"]))
    assert reader.availability() is Availability.OK
    reading = reader.read_state()
    assert reading.state is DeviceState.RUNNING, reading
