"""``vfmig doctor`` on fake host trees: every check's pass, warn, fail and n/a, and the CLI.

The host is a tree under ``tmp_path`` (tests/cli/conftest.py) plus what doctor reads besides:
``/sys/module``, ``/dev`` nodes, the kernel config, ``modules.alias``. Probes go to a stub
kernel that answers the group path and the FEATURE ioctl and records every request, so a
test can tell that a probe never sends a SET or a reset.
"""

from __future__ import annotations

import ctypes
import errno
import gzip
import io
import json
import os
import threading
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.cli import doctor as doctor_cli
from vfmig.cli.context import Environment
from vfmig.cli.main import build_parser, main
from vfmig.core.errors import ExitStatus, UsageError
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.device import _uapi as uapi
from vfmig.device.doctor import (
    BLOCKED_ARC_LOOP,
    Check,
    DoctorHost,
    Status,
    check_device,
    check_host,
    parse_release,
)
from vfmig.device.kernel import RealKernel

if TYPE_CHECKING:
    from pathlib import Path

    from vfmig.device.sysfs import HostPaths

MDEV = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
VF = "0000:3b:00.1"
PF = "0000:3b:00.0"
RELEASE = "6.12.117+deb12-amd64"
ALL = MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY
MLX5_ALIAS = "alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci\n"
MODALIAS = "pci:v000015B3d0000101Esv000015B3sd00000070bc02sc00i00\n"


class StubKernel(RealKernel):
    """The group path and the FEATURE ioctl of any device, answering like a migration driver.

    Filesystem queries go to the fake tree. GET MIGRATION answers ``flags`` (or raises
    ``migration_errno``), GET MIG_DEVICE_STATE ``state``, a PROBE ``probe_errno.get(feature)``
    (0 = supported), GET DMA_LOGGING_REPORT ``report_errno`` (0 = ok). Every device ioctl is
    recorded in ``requests``; ``gate``, when set, blocks every ioctl until it is released.
    """

    def __init__(self, host: HostPaths) -> None:
        self.host = host
        self.flags = ALL
        self.state = DeviceState.RUNNING
        self.migration_errno = 0
        self.probe_errno: dict[uapi.FeatureId, int] = {}
        self.report_errno = errno.EINVAL
        self.requests: list[str] = []
        self.opened: list[str] = []
        self.fds: dict[int, str] = {}
        self.gate: threading.Event | None = None

    def open(self, path: str | os.PathLike[str], flags: int) -> int:
        node = self.host.canonical_dev(os.fspath(path))
        self.opened.append(node)
        fd = 100 + len(self.opened)
        self.fds[fd] = "container" if node == "/dev/vfio/vfio" else "group"
        return fd

    def close(self, fd: int) -> None:
        del self.fds[fd]

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        if self.gate is not None:
            self.gate.wait()
        kind = self.fds[fd]
        if kind == "container":
            return 1 if request == uapi.ContainerIoctl.CHECK_EXTENSION else 0
        if kind == "group":
            if request == uapi.GroupIoctl.GET_STATUS:
                uapi.GroupStatus.from_buffer(arg).flags = uapi.GROUP_FLAGS_VIABLE
            if request == uapi.GroupIoctl.GET_DEVICE_FD:
                fd = 500 + len(self.fds)
                self.fds[fd] = "device"
                return fd
            return 0
        if request != uapi.DeviceIoctl.FEATURE:
            self.requests.append(uapi.c_name(uapi.DeviceIoctl(request)))
            return 0
        hdr = uapi.DeviceFeature.from_buffer(arg)
        feature = uapi.FeatureId(hdr.flags & uapi.FEATURE_MASK)
        ops = [op for bit, op in ((uapi.FEATURE_PROBE, "PROBE"), (uapi.FEATURE_GET, "GET"),
                                  (uapi.FEATURE_SET, "SET")) if hdr.flags & bit]  # fmt: skip
        self.requests.append(f"{'|'.join(ops)} {feature.name}")
        code = 0
        if hdr.flags & uapi.FEATURE_PROBE:
            code = self.probe_errno.get(feature, 0)
        elif feature is uapi.FeatureId.MIGRATION:
            code = self.migration_errno
            ctypes.c_uint64.from_buffer(arg, 8).value = int(self.flags)
        elif feature is uapi.FeatureId.MIG_DEVICE_STATE:
            uapi.FeatureMigState.from_buffer(arg, 8).device_state = self.state
        elif feature is uapi.FeatureId.DMA_LOGGING_REPORT:
            code = self.report_errno
        if code:
            raise OSError(code, os.strerror(code))
        return 0


class Tree:
    """The conftest's fake host plus what doctor reads besides (modules, nodes, config)."""

    def __init__(self, host_tree: Any, root: Path) -> None:
        self.fake = host_tree
        self.root = root
        self.paths: HostPaths = host_tree.paths

    def modules(self, *names: str) -> None:
        for name in names:
            (self.paths.sys / "module" / name).mkdir(parents=True, exist_ok=True)

    def node(self, canonical: str) -> None:
        self.fake.node(canonical)

    def vfio_debugfs(self) -> None:
        (self.paths.debugfs / "vfio").mkdir(parents=True, exist_ok=True)

    def config(self, text: str) -> Path:
        path = self.root / "boot" / f"config-{RELEASE}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def host(
        self,
        *,
        release: str = RELEASE,
        euid: int = 0,
        kernel: RealKernel | None = None,
        access: bool = True,
    ) -> DoctorHost:
        base = DoctorHost.under(
            self.root, release=release, euid=euid, kernel=kernel or RealKernel()
        )
        if access:
            return base
        return DoctorHost(
            paths=base.paths,
            kernel=base.kernel,
            release=release,
            euid=euid,
            boot=base.boot,
            modules=base.modules,
            access=lambda path: False,
        )


@pytest.fixture
def tree(host_tree: Any, tmp_path: Path) -> Tree:
    return Tree(host_tree, tmp_path / "host")


@pytest.fixture
def healthy(tree: Tree) -> Tree:
    """A 6.12 host like the kernel tier's guest: modules, container, debugfs vfio.ko, mtty."""
    tree.modules("vfio", "vfio_iommu_type1", "mdev", "mtty")
    tree.node("/dev/vfio/vfio")
    tree.vfio_debugfs()
    tree.paths.proc.mkdir(parents=True)  # no process holds anything
    return tree


def by_id(checks: list[Check]) -> dict[str, Check]:
    return {check.id: check for check in checks}


def statuses(checks: list[Check]) -> dict[str, str]:
    return {check.id: check.status.value for check in checks}


# --- host checks -------------------------------------------------------------------------


def test_a_healthy_6_12_host(healthy: Tree) -> None:
    checks = check_host(healthy.host())
    assert statuses(checks) == {
        "kernel": "pass",
        "bug:blocked-arc-loop": "pass",
        "bug:mtty-resuming-reopen": "warn",
        "module:vfio": "pass",
        "module:vfio_iommu_type1": "pass",
        "module:vfio_pci": "warn",  # no device named: PCI functions would need it
        "module:mdev": "pass",
        "group-path": "pass",
        "cdev-path": "n/a",
        "debugfs": "pass",
        "privileges": "pass",
    }
    found = by_id(checks)
    assert found["kernel"].detail == f"Linux {RELEASE}"
    assert "6.12.96" in found["bug:blocked-arc-loop"].detail
    assert "resets a device found in RESUMING" in (found["bug:mtty-resuming-reopen"].hint or "")
    assert found["cdev-path"].detail.endswith("vfmig opens devices through their group")


@pytest.mark.parametrize(
    ("release", "status"),
    [
        ("6.1.90", "pass"),  # before PRE_COPY: no such arc
        ("6.2.0", "warn"),
        ("6.6.120-1-lts", "warn"),  # no stable fix known in 6.6.y
        ("6.12.95", "warn"),
        ("6.12.96", "pass"),
        ("6.12.117+deb12-amd64", "pass"),
        ("6.18.38", "warn"),
        ("6.18.39-fc", "pass"),
        ("7.0.9", "warn"),
        ("7.1-rc1", "pass"),
        ("7.2.3", "pass"),
        ("linux-next", "warn"),  # no version: cannot tell
    ],
)
def test_blocked_arc_loop_by_release(tree: Tree, release: str, status: str) -> None:
    check = by_id(check_host(tree.host(release=release)))["bug:blocked-arc-loop"]
    assert check.status.value == status, check
    if status == "warn":
        assert "vfmig never requests these arcs" in (check.hint or "")


def test_release_parsing() -> None:
    assert parse_release("6.12.117+deb12-amd64") == (6, 12, 117)
    assert parse_release("7.1-rc2") == (7, 1, 0)
    assert parse_release("5.14.0-427.el9.x86_64") == (5, 14, 0)
    assert parse_release("next") is None
    assert BLOCKED_ARC_LOOP.affects((6, 12, 95))
    assert not BLOCKED_ARC_LOOP.affects((6, 12, 96))
    assert BLOCKED_ARC_LOOP.why_not((6, 1, 0)) == "the bug came with 6.2"
    assert BLOCKED_ARC_LOOP.why_not((6, 12, 117)) == "fixed in 6.12.96"
    assert BLOCKED_ARC_LOOP.why_not((7, 2, 0)) == "fixed in 7.1"


@pytest.mark.parametrize(
    ("release", "status"), [("5.15.0", "fail"), ("6.1.0", "warn"), ("6.2.0", "pass")]
)
def test_kernel_release(tree: Tree, release: str, status: str) -> None:
    assert by_id(check_host(tree.host(release=release)))["kernel"].status.value == status


def test_mtty_bug_applies_only_with_mtty_loaded(tree: Tree) -> None:
    check = by_id(check_host(tree.host()))["bug:mtty-resuming-reopen"]
    assert check.status is Status.NA
    assert check.detail == "the mtty sample driver is not loaded"


def test_stock_vfio_without_debugfs_warns_with_the_hint(healthy: Tree) -> None:
    (healthy.paths.debugfs / "vfio").rmdir()
    (healthy.paths.debugfs / "tracing").mkdir()
    config = healthy.config("CONFIG_VFIO=m\n# CONFIG_VFIO_DEBUGFS is not set\n")
    check = by_id(check_host(healthy.host()))["debugfs"]
    assert check.status is Status.WARN
    assert "built without CONFIG_VFIO_DEBUGFS" in check.detail
    assert f"CONFIG_VFIO_DEBUGFS is not set in {config}" in check.detail
    assert "CONFIG_VFIO_DEBUGFS=y" in (check.hint or "")


def test_unmounted_debugfs_warns_with_the_mount_command(healthy: Tree) -> None:
    (healthy.paths.debugfs / "vfio").rmdir()
    check = by_id(check_host(healthy.host()))["debugfs"]
    assert check.status is Status.WARN
    assert check.detail == f"debugfs is not mounted at {healthy.paths.debugfs}"
    assert check.hint == f"mount -t debugfs none {healthy.paths.debugfs}"


def test_missing_vfio_fails_with_a_hint_from_the_config(tree: Tree) -> None:
    checks = by_id(check_host(tree.host()))
    assert checks["module:vfio"].status is Status.FAIL
    assert checks["module:vfio"].hint is not None
    assert checks["module:vfio"].hint.startswith("modprobe vfio-pci")
    assert checks["module:vfio_iommu_type1"].status is Status.FAIL
    assert checks["group-path"].status is Status.FAIL
    tree.config("# CONFIG_VFIO is not set\n")
    checks = by_id(check_host(tree.host()))
    assert checks["module:vfio"].hint == (
        "this kernel is built without CONFIG_VFIO: boot one built with it"
    )


def test_the_config_comes_from_proc_first(tree: Tree) -> None:
    tree.config("CONFIG_VFIO=m\n")
    tree.paths.proc.mkdir(parents=True)
    (tree.paths.proc / "config.gz").write_bytes(gzip.compress(b"# CONFIG_VFIO is not set\n"))
    check = by_id(check_host(tree.host()))["module:vfio"]
    assert check.detail == f"not loaded (CONFIG_VFIO is not set in {tree.paths.proc}/config.gz)"


def test_the_cdev_path(healthy: Tree) -> None:
    healthy.node("/dev/iommu")
    (healthy.paths.dev / "vfio" / "devices").mkdir()
    (healthy.paths.sys / "module" / "vfio_iommu_type1").rmdir()
    checks = by_id(check_host(healthy.host()))
    assert checks["cdev-path"].status is Status.PASS
    assert checks["module:vfio_iommu_type1"].status is Status.NA


def test_not_root(healthy: Tree) -> None:
    check = by_id(check_host(healthy.host(euid=1000)))["privileges"]
    assert check.status is Status.WARN
    assert "uid 1000" in check.detail


def test_modules_that_no_named_device_needs_are_n_a(healthy: Tree) -> None:
    healthy.fake.mdev(MDEV, group="20")
    from vfmig.device import sysfs

    dev = sysfs.find(MDEV, healthy.paths, RealKernel())
    assert dev is not None
    check = by_id(check_host(healthy.host(), [dev]))["module:vfio_pci"]
    assert check.status is Status.NA


# --- device checks -----------------------------------------------------------------------


def test_a_missing_device_fails(healthy: Tree) -> None:
    [check] = check_device("0000:99:00.0", healthy.host())
    assert check.status is Status.FAIL
    assert check.detail.startswith("no such device 0000:99:00.0 (looked in ")
    assert "'vfmig list'" in (check.hint or "")


def test_an_mtty_mdev_on_6_12_without_probe(healthy: Tree) -> None:
    healthy.fake.mdev(MDEV, group="20", cdev="vfio1")
    healthy.fake.node("/dev/vfio/20")
    healthy.fake.debugfs(MDEV, state="RUNNING")
    checks = check_device(MDEV, healthy.host())
    assert statuses(checks) == {
        "device": "pass",
        "driver": "pass",
        "iommu-group": "pass",
        "access": "pass",
        "cdev": "n/a",
        "vf-token": "n/a",
        "busy": "pass",
        "migration": "pass",
        "state": "pass",
        "dirty-tracking": "n/a",
    }
    found = by_id(checks)
    assert found["device"].detail == f"{MDEV}: mdev of type mtty-2 (parent mtty)"
    assert found["migration"].detail.startswith("supported (debugfs shows its migration state)")
    assert found["state"].detail == "RUNNING (debugfs)"
    assert found["access"].detail == "read-write access to /dev/vfio/20, /dev/vfio/vfio"
    assert "--probe" in found["dirty-tracking"].detail


@pytest.mark.parametrize(
    ("state", "status"), [("STOP", "warn"), ("PRE_COPY", "fail"), ("RESUMING", "fail")]
)
def test_a_leftover_state(healthy: Tree, state: str, status: str) -> None:
    healthy.fake.mdev(MDEV, group="20")
    healthy.fake.debugfs(MDEV, state=state)
    check = by_id(check_device(MDEV, healthy.host()))["state"]
    assert check.status.value == status
    assert check.hint is not None
    assert check.hint.endswith(f"vfmig recover vfio:{MDEV}")


def test_plain_vfio_pci_fails_and_names_the_variant_driver(healthy: Tree) -> None:
    healthy.fake.pci(VF, driver="vfio-pci", group="12")
    (healthy.paths.sys / "bus" / "pci" / "devices" / VF / "modalias").write_text(MODALIAS)
    aliases = healthy.root / "lib" / "modules" / RELEASE / "modules.alias"
    aliases.parent.mkdir(parents=True)
    aliases.write_text("alias pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_core\n" + MLX5_ALIAS)
    found = by_id(check_device(VF, healthy.host()))
    driver = found["driver"]
    assert driver.status is Status.FAIL
    assert driver.detail == (
        "bound to plain vfio-pci, which cannot migrate; its variant driver here is mlx5_vfio_pci"
    )
    assert driver.hint is not None
    assert f"echo mlx5_vfio_pci > /sys/bus/pci/devices/{VF}/driver_override" in driver.hint
    assert found["migration"].status is Status.FAIL
    assert "plain vfio-pci has no migration support" in found["migration"].detail


def test_plain_vfio_pci_without_a_variant_driver(healthy: Tree) -> None:
    healthy.fake.pci(VF, driver="vfio-pci", group="12")
    check = by_id(check_device(VF, healthy.host()))["driver"]
    assert check.status is Status.FAIL
    assert "no variant driver of this kernel claims it" in check.detail


def test_a_variant_driver_with_6_18_debugfs_features(healthy: Tree) -> None:
    healthy.fake.pci(VF, driver="mlx5_vfio_pci", group="12")
    healthy.fake.node("/dev/vfio/12")
    features = ["stop-copy", "p2p", "pre-copy", "dirty-tracking"]
    healthy.fake.debugfs(VF, state="RUNNING", features=features)
    found = by_id(check_device(VF, healthy.host()))
    assert [c.id for c in found.values() if c.status is not Status.PASS] == ["cdev", "vf-token"]
    assert found["migration"].detail == "STOP_COPY+P2P+PRE_COPY (debugfs)"
    assert found["dirty-tracking"].detail == "the driver tracks DMA (debugfs)"


def test_a_driver_bound_device_without_migration_in_debugfs(healthy: Tree) -> None:
    healthy.fake.pci(VF, driver="hisi_acc_vfio_pci", group="12")
    (healthy.paths.debugfs / "vfio" / VF).mkdir()  # vfio/<dev>/ without migration/
    found = by_id(check_device(VF, healthy.host()))
    assert found["driver"].status is Status.FAIL
    assert found["migration"].detail == "not supported: debugfs has no migration/ directory for it"


def test_a_device_bound_to_a_host_driver(healthy: Tree) -> None:
    healthy.fake.pci(VF, driver="mlx5_core", group="12")
    check = by_id(check_device(VF, healthy.host()))["driver"]
    assert check.status is Status.FAIL
    assert check.detail == "bound to mlx5_core, not to VFIO"


def test_a_group_shared_with_a_host_driver_is_not_viable(healthy: Tree) -> None:
    healthy.fake.pci(VF, driver="mlx5_vfio_pci", group="12")
    healthy.fake.pci("0000:3b:00.2", driver="e1000e", group="12")
    check = by_id(check_device(VF, healthy.host()))["iommu-group"]
    assert check.status is Status.FAIL
    assert check.detail == "group 12 is not viable: 0000:3b:00.2 (e1000e)"


def test_access_missing_or_denied(healthy: Tree) -> None:
    healthy.fake.mdev(MDEV, group="20")
    check = by_id(check_device(MDEV, healthy.host()))["access"]
    assert (check.status, check.detail) == (Status.FAIL, "/dev/vfio/20 missing")
    healthy.fake.node("/dev/vfio/20")
    check = by_id(check_device(MDEV, healthy.host(euid=1000, access=False)))["access"]
    assert check.status is Status.FAIL
    assert check.detail == "no read-write access to /dev/vfio/20, /dev/vfio/vfio for uid 1000"


def _vf_of(tree: Tree, pf_driver: str) -> None:
    tree.fake.pci(PF, driver=pf_driver, group="11")
    tree.fake.pci(VF, driver="mlx5_vfio_pci", group="12")
    real = tree.paths.sys / "devices" / "pci0000:00"
    os.symlink(real / PF, real / VF / "physfn")


def test_a_vf_whose_pf_is_on_vfio_pci_needs_a_token(healthy: Tree) -> None:
    _vf_of(healthy, "vfio-pci")
    check = by_id(check_device(VF, healthy.host()))["vf-token"]
    assert check.status is Status.WARN
    assert check.detail == f"PF {PF} is bound to vfio-pci: opening this VF needs its VF token"
    assert check.hint == f"give vfio:{VF},vf-token=<uuid> with the token the PF's user set"
    import uuid

    given = by_id(check_device(VF, healthy.host(), vf_token=uuid.uuid4()))["vf-token"]
    assert given.status is Status.PASS


def test_a_vf_whose_pf_is_on_its_host_driver_needs_no_token(healthy: Tree) -> None:
    _vf_of(healthy, "mlx5_core")
    check = by_id(check_device(VF, healthy.host()))["vf-token"]
    assert (check.status, check.detail) == (
        Status.PASS,
        f"none needed: PF {PF} is bound to mlx5_core",
    )


def test_a_held_device_fails_and_is_not_probed(healthy: Tree) -> None:
    healthy.fake.mdev(MDEV, group="20")
    healthy.fake.process(4242, "qemu-system-x86", ["/dev/vfio/vfio", "/dev/vfio/20"])
    kernel = StubKernel(healthy.paths)
    found = by_id(check_device(MDEV, healthy.host(kernel=kernel), probe=True))
    assert found["busy"].status is Status.FAIL
    assert found["busy"].detail == "held by pid 4242 (qemu-system-x86)"
    assert (found["open"].status, found["open"].detail) == (
        Status.NA,
        "not opened: it is held by another process",
    )
    assert kernel.opened == []


# --- probes ------------------------------------------------------------------------------


@pytest.fixture
def probed_mdev(healthy: Tree) -> tuple[Tree, StubKernel]:
    healthy.fake.mdev(MDEV, group="20")
    healthy.fake.node("/dev/vfio/20")
    healthy.fake.debugfs(MDEV, state="RUNNING")
    return healthy, StubKernel(healthy.paths)


def test_a_probe_reads_and_changes_nothing(probed_mdev: tuple[Tree, StubKernel]) -> None:
    tree, kernel = probed_mdev
    kernel.report_errno = errno.EOPNOTSUPP  # Debian's 6.12: no CONFIG_IOMMUFD_DRIVER
    found = by_id(check_device(MDEV, tree.host(kernel=kernel), probe=True))
    assert found["open"].status is Status.PASS
    assert found["open"].detail.startswith("opened via group /dev/vfio/20")
    assert found["migration"].detail == "STOP_COPY+P2P+PRE_COPY (probe)"
    assert found["state"].detail == "RUNNING (ioctl)"
    dirty = found["dirty-tracking"]
    assert dirty.status is Status.WARN
    assert "DMA_LOGGING_REPORT answers EOPNOTSUPP" in dirty.detail
    assert "CONFIG_IOMMUFD_DRIVER" in dirty.detail
    assert "mtty's DMA logging ops are dummies" in dirty.detail
    assert kernel.requests == [
        "GET MIGRATION",
        "GET MIG_DEVICE_STATE",
        "PROBE|SET DMA_LOGGING_START",
        "PROBE|SET DMA_LOGGING_STOP",
        "PROBE|GET DMA_LOGGING_REPORT",
        "GET DMA_LOGGING_REPORT",
    ]
    assert kernel.fds == {}  # everything closed


def test_a_probe_of_a_device_with_working_dma_logging(healthy: Tree) -> None:
    healthy.fake.pci(VF, driver="mlx5_vfio_pci", group="12")
    healthy.fake.node("/dev/vfio/12")
    kernel = StubKernel(healthy.paths)  # REPORT answers EINVAL: logging not started
    found = by_id(check_device(VF, healthy.host(kernel=kernel), probe=True))
    assert found["dirty-tracking"].status is Status.PASS
    assert found["driver"].status is Status.PASS


def test_a_probe_of_a_driver_without_dma_logging(probed_mdev: tuple[Tree, StubKernel]) -> None:
    tree, kernel = probed_mdev
    names = ("DMA_LOGGING_START", "DMA_LOGGING_STOP", "DMA_LOGGING_REPORT")
    kernel.probe_errno = {uapi.FeatureId[name]: errno.ENOTTY for name in names}
    check = by_id(check_device(MDEV, tree.host(kernel=kernel), probe=True))["dirty-tracking"]
    assert check.status is Status.WARN
    assert "no DMA logging in the driver (PROBE: START ENOTTY" in check.detail
    assert "GET DMA_LOGGING_REPORT" not in kernel.requests


def test_a_probe_of_a_device_without_migration(probed_mdev: tuple[Tree, StubKernel]) -> None:
    tree, kernel = probed_mdev
    kernel.migration_errno = errno.ENOTTY
    found = by_id(check_device(MDEV, tree.host(kernel=kernel), probe=True))
    assert (found["open"].status, found["open"].detail) == (
        Status.PASS,
        "opened; it has no migration support",
    )
    assert found["migration"].status is Status.FAIL
    assert "ENOTTY" in found["migration"].detail
    assert found["driver"].status is Status.FAIL


def test_a_probe_finds_a_leftover_state(probed_mdev: tuple[Tree, StubKernel]) -> None:
    tree, kernel = probed_mdev
    kernel.state = DeviceState.PRE_COPY
    check = by_id(check_device(MDEV, tree.host(kernel=kernel), probe=True))["state"]
    assert check.status is Status.FAIL
    assert check.detail.startswith("PRE_COPY (ioctl; debugfs says RUNNING): left in a migration")


def test_a_probe_that_hangs_is_abandoned(probed_mdev: tuple[Tree, StubKernel]) -> None:
    tree, kernel = probed_mdev
    kernel.gate = threading.Event()  # every ioctl blocks: a driver stuck on its lock
    try:
        found = by_id(check_device(MDEV, tree.host(kernel=kernel), probe=True, timeout=0.05))
    finally:
        kernel.gate.set()
    assert found["open"].status is Status.FAIL
    assert found["open"].detail.startswith("opening or reading it: no answer within 0.05 s")
    assert found["state"].detail == "RUNNING (debugfs)"


# --- the command -------------------------------------------------------------------------


def run_doctor(argv: list[str], host: DoctorHost) -> tuple[int, str, str]:
    args = build_parser().parse_args(["doctor", *argv])
    out, err = io.StringIO(), io.StringIO()
    status = doctor_cli.run(
        args, Environment(stdout=out, stderr=err, stdout_isatty=False), host=host
    )
    return status, out.getvalue(), err.getvalue()


def test_text_report_and_exit_status(healthy: Tree) -> None:
    healthy.fake.mdev(MDEV, group="20")
    healthy.fake.node("/dev/vfio/20")
    healthy.fake.debugfs(MDEV, state="RUNNING")
    status, out, err = run_doctor([f"vfio:{MDEV}"], healthy.host())
    assert (status, err) == (ExitStatus.OK, "")
    lines = out.splitlines()
    assert lines[0] == "host"
    assert lines[1].split() == ["pass", "kernel", "Linux", RELEASE]
    warn = lines.index(next(line for line in lines if "mtty RESUMING oops" in line))
    assert lines[warn].startswith("  warn  mtty RESUMING oops")
    assert lines[warn + 1].strip().startswith("hint: vfmig resets a device found in RESUMING")
    assert f"vfio:{MDEV}" in lines
    assert lines[-1] == "15 passed, 1 warning, 0 failed, 5 n/a"

    status, out, _ = run_doctor([f"vfio:{MDEV}", "0000:99:00.0"], healthy.host())
    assert status == ExitStatus.FAILED
    assert "  fail  device" in out
    assert out.splitlines()[-1].endswith(", 1 failed, 5 n/a")


def test_json_report(healthy: Tree) -> None:
    status, out, _ = run_doctor(["0000:99:00.0", "--json"], healthy.host())
    assert status == ExitStatus.FAILED
    envelope = json.loads(out)
    assert (envelope["command"], envelope["schema"], envelope["ok"]) == ("doctor", 1, False)
    assert envelope["error"] == {
        "type": "ChecksFailed",
        "message": "1 check failed",
        "hint": "see each failed check's hint",
    }
    result = envelope["result"]
    assert result["host"]["release"] == RELEASE
    assert result["host"]["checks"][0] == {
        "id": "kernel",
        "title": "kernel",
        "status": "pass",
        "detail": f"Linux {RELEASE}",
        "hint": None,
    }
    [device] = result["devices"]
    assert device["device"] == "0000:99:00.0"
    assert [c["status"] for c in device["checks"]] == ["fail"]
    assert result["summary"]["fail"] == 1
    assert result["probe"] is False


def test_probe_note_goes_to_stderr(probed_mdev: tuple[Tree, StubKernel]) -> None:
    tree, kernel = probed_mdev
    status, _, err = run_doctor([MDEV, "--probe"], tree.host(kernel=kernel))
    assert status == ExitStatus.OK
    assert err == f"note: {doctor_cli.PROBE_NOTE}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sim:a"], "sim:a: a simulated device needs no host checks"),
        (["vfio:x@10.0.0.1:7300"], "vfio:x@10.0.0.1:7300 belongs to the host at 10.0.0.1:7300"),
        (["--timeout", "soon"], "--timeout 'soon' is not a duration"),
        (["--timeout", "0"], "--timeout must be more than 0"),
    ],
)
def test_usage_errors(argv: list[str], message: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    status = main(["doctor", *argv], Environment(stdout=out, stderr=err, stdout_isatty=False))
    assert status == ExitStatus.USAGE
    assert err.getvalue().splitlines()[0].startswith(f"vfmig: error: {message}")


def test_device_names() -> None:
    assert doctor_cli.device_ident("0000:3b:00.1") == ("0000:3b:00.1", None)
    assert doctor_cli.device_ident(MDEV) == (MDEV, None)
    token = "2a9a0c4e-5d5f-4b53-9b8a-3c6a8d1e0f00"
    name, given = doctor_cli.device_ident(f"vfio:{VF},vf-token={token}")
    assert (name, str(given)) == (VF, token)
    with pytest.raises(UsageError):
        doctor_cli.device_ident("sim:a")
