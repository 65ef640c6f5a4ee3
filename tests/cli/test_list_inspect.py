"""``vfmig list`` and ``vfmig inspect`` on a fake host tree, a stub kernel and a sim device."""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.cli import devices, inspect
from vfmig.cli.context import Environment
from vfmig.cli.main import build_parser, main
from vfmig.core.errors import errno_name
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.device import _uapi as uapi
from vfmig.device.kernel import RealKernel
from vfmig.device.vfio import open_vfio_device

if TYPE_CHECKING:
    from vfmig.core.spec import DeviceSpec
    from vfmig.device.backend import MigrationDevice
    from vfmig.device.sysfs import HostPaths

MDEV = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
ALL = MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY


class StubKernel(RealKernel):
    """Just enough of the group path and the FEATURE ioctl to open, read and probe a device.

    Filesystem queries go to the fake tree. Every device of every group opens; each answers
    GET MIGRATION with ``flags``, GET MIG_DEVICE_STATE with ``state``, GET MIG_DATA_SIZE with
    ``data_size``, and a PROBE of feature ``f`` with ``probe_errno.get(f)`` (0 = supported).
    """

    def __init__(self, host: HostPaths) -> None:
        self.host = host
        self.flags = ALL
        self.state = DeviceState.RUNNING
        self.data_size = 96
        self.probe_errno: dict[uapi.FeatureId, int] = dict.fromkeys(
            (uapi.FeatureId.DMA_BUF, uapi.FeatureId.ZPCI_ERROR), errno.ENOTTY
        )
        self.sets: list[int] = []
        self.opened: list[str] = []
        self.fds: dict[int, str] = {}

    def open(self, path: str | os.PathLike[str], flags: int) -> int:
        node = self.host.canonical_dev(os.fspath(path))
        self.opened.append(node)
        fd = 100 + len(self.opened)
        self.fds[fd] = "container" if node == "/dev/vfio/vfio" else "group"
        return fd

    def close(self, fd: int) -> None:
        del self.fds[fd]

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
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
        hdr = uapi.DeviceFeature.from_buffer(arg)
        feature = uapi.FeatureId(hdr.flags & uapi.FEATURE_MASK)
        if hdr.flags & uapi.FEATURE_PROBE:
            code = self.probe_errno.get(feature, 0)
            if code:
                raise OSError(code, os.strerror(code))
            return 0
        if hdr.flags & uapi.FEATURE_SET:
            self.sets.append(int(feature))
        elif feature is uapi.FeatureId.MIGRATION:
            ctypes.c_uint64.from_buffer(arg, 8).value = int(self.flags)
        elif feature is uapi.FeatureId.MIG_DEVICE_STATE:
            uapi.FeatureMigState.from_buffer(arg, 8).device_state = self.state
        elif feature is uapi.FeatureId.MIG_DATA_SIZE:
            ctypes.c_uint64.from_buffer(arg, 8).value = self.data_size
        return 0


def env() -> tuple[Environment, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Environment(stdout=out, stderr=err, stdout_isatty=False), out, err


def run_list(argv: list[str], host: HostPaths, kernel: RealKernel) -> tuple[int, str, str]:
    args = build_parser().parse_args(["list", *argv])
    environment, out, err = env()
    status = devices.run(args, environment, host=host, kernel=kernel)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def populated(host_tree: Any) -> Any:
    host_tree.pci("0000:3b:00.0", driver="mlx5_core", group="11")
    host_tree.pci("0000:3b:00.1", driver="mlx5_vfio_pci", group="12", cdev="vfio0")
    host_tree.pci("0000:3b:00.2", driver="vfio-pci", group="13")
    host_tree.node("/dev/vfio/devices/vfio0")
    host_tree.mdev(MDEV, group="20", cdev="vfio1")  # no /dev/vfio/devices/vfio1, as on 6.12
    host_tree.process(4242, "qemu-system-x86", ["/dev/vfio/vfio", "/dev/vfio/12"])
    host_tree.debugfs("0000:3b:00.1", state="PRE_COPY", features=["stop-copy", "p2p", "pre-copy"])
    host_tree.debugfs(MDEV, state="RUNNING")
    return host_tree


# --- vfmig list --------------------------------------------------------------------------


def test_list_table(populated: Any) -> None:
    status, out, err = run_list([], populated.paths, RealKernel())
    assert status == 0
    assert err == ""
    lines = out.splitlines()
    assert lines[0].split() == [
        "DEVICE", "BUS", "ID/TYPE", "DRIVER", "GROUP", "CDEV", "HELD", "MIGRATION", "STATE",
    ]  # fmt: skip
    assert lines[1].split() == [
        "0000:3b:00.1", "pci", "15b3:101e", "mlx5_vfio_pci", "12", "vfio0",
        "4242/qemu-system-x86", "STOP_COPY+P2P+PRE_COPY", "PRE_COPY",
    ]  # fmt: skip
    assert lines[2].split() == [
        "0000:3b:00.2", "pci", "15b3:101e", "vfio-pci", "13", "-", "no",
        "unknown", "-",
    ]  # fmt: skip
    assert lines[3].split() == [
        MDEV,
        "mdev",
        "mtty-2",
        "mtty",
        "20",
        "-",
        "no",
        "unknown",
        "RUNNING",
    ]
    assert len(lines) == 4  # mlx5_core's PF is not a VFIO device
    for header in ("HELD", "MIGRATION", "STATE"):  # every column starts where its header does
        column = lines[0].index(header)
        assert all(line[column - 2 : column] == "  " and line[column] != " " for line in lines)


def test_list_json(populated: Any) -> None:
    status, out, _ = run_list(["--json"], populated.paths, RealKernel())
    assert status == 0
    envelope = json.loads(out)
    assert envelope["command"] == "list"
    assert envelope["ok"] is True
    rows = {row["device"]: row for row in envelope["result"]["devices"]}
    assert set(rows) == {"0000:3b:00.1", "0000:3b:00.2", MDEV}
    vf = rows["0000:3b:00.1"]
    assert (vf["cdev"], vf["cdev_node"]) == ("vfio0", True)
    assert (rows[MDEV]["cdev"], rows[MDEV]["cdev_node"]) == ("vfio1", False)
    assert vf["held"] == "yes"
    assert vf["holders"] == [{"pid": 4242, "command": "qemu-system-x86"}]
    assert (vf["migration"], vf["migration_source"], vf["state"]) == (
        "STOP_COPY+P2P+PRE_COPY",
        "debugfs",
        "PRE_COPY",
    )
    assert rows[MDEV]["parent"] == "mtty"
    assert "probe" not in vf


def test_list_on_a_host_without_vfio_devices(host_tree: Any) -> None:
    status, out, _ = run_list([], host_tree.paths, RealKernel())
    assert status == 0
    assert out.startswith("no VFIO devices (looked in ")
    assert str(host_tree.paths.sys / "bus" / "pci" / "devices") in out


def test_list_probe_opens_only_idle_devices(populated: Any) -> None:
    kernel = StubKernel(populated.paths)
    kernel.state = DeviceState.STOP
    status, out, err = run_list(["--probe"], populated.paths, kernel)
    assert status == 0
    assert "opening a vfio-pci device resets the function" in err
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["0000:3b:00.1"].endswith("skipped: held")
    assert "STOP_COPY+P2P+PRE_COPY  STOP" in rows["0000:3b:00.2"]
    assert rows["0000:3b:00.2"].endswith("ok")
    assert rows[MDEV].endswith("ok")
    assert "/dev/vfio/12" not in kernel.opened  # the held group was never opened
    assert kernel.fds == {}  # every probed device closed again
    assert kernel.sets == []  # probing changes no state


def test_list_probe_json_reports_why_a_probe_failed(populated: Any) -> None:
    kernel = RealKernel()  # the fake tree has no /dev/vfio/vfio: every open fails cleanly
    status, out, _ = run_list(["--probe", "--json"], populated.paths, kernel)
    assert status == 0
    result = json.loads(out)["result"]
    assert "resets the function" in result["note"]
    rows = {row["device"]: row for row in result["devices"]}
    assert rows["0000:3b:00.1"]["probe"] == {"probed": False, "reason": "held"}
    reason = rows["0000:3b:00.2"]["probe"]["reason"]
    assert reason == "/dev/vfio/vfio does not exist (the VFIO container) (ENOENT)"


def test_list_probe_leaves_devices_alone_when_holders_are_unknown(populated: Any) -> None:
    class NoProc(StubKernel):
        def listdir(self, path: str | os.PathLike[str]) -> list[str]:
            if os.fspath(path) == str(self.host.proc):
                raise PermissionError(errno.EACCES, "Permission denied")
            return super().listdir(path)

    kernel = NoProc(populated.paths)
    status, out, _ = run_list(["--probe"], populated.paths, kernel)
    assert status == 0
    assert kernel.opened == []
    assert all("skipped: holders unknown (run as root)" in line for line in out.splitlines()[1:])


def test_list_through_main_on_this_host() -> None:
    environment, out, _ = env()
    assert main(["list", "--json"], environment) == 0
    envelope = json.loads(out.getvalue())
    assert envelope["command"] == "list"
    assert isinstance(envelope["result"]["devices"], list)


# --- vfmig inspect -----------------------------------------------------------------------


def run_inspect(argv: list[str], opener: Any) -> tuple[int, str]:
    args = build_parser().parse_args(["inspect", *argv])
    environment, out, _ = env()
    status = inspect.run(args, environment, opener=opener)
    return status, out.getvalue()


def vfio_opener(kernel: StubKernel, host: HostPaths) -> Any:
    def opener(spec: DeviceSpec) -> MigrationDevice:
        return open_vfio_device(spec, kernel=kernel, host=host)

    return opener


def test_inspect_vfio_device(populated: Any) -> None:
    kernel = StubKernel(populated.paths)
    kernel.probe_errno[uapi.FeatureId.DMA_LOGGING_REPORT] = errno.EOPNOTSUPP
    status, out = run_inspect(["vfio:3b:00.2"], vfio_opener(kernel, populated.paths))
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["device", "vfio:3b:00.2"]
    assert lines[1].split() == ["driver", "vfio-pci", "(group", "13)"]
    assert lines[2].startswith("opened via   group /dev/vfio/13 (container /dev/vfio/vfio")
    assert lines[3].split() == ["flags", "STOP_COPY+P2P+PRE_COPY"]
    assert lines[4].split()[:3] == ["state", "RUNNING", "(ioctl)"]
    assert "? (debugfs has no migration directory for this device) (debugfs)" in lines[4]
    assert lines[5].split() == ["data", "size", "96", "bytes", "(MIG_DATA_SIZE)"]
    assert lines[6] == "precopy      n/a: not in a precopy state"
    report = errno_name(errno.EOPNOTSUPP)  # ENOTSUP: Python's name of the same errno 95
    assert lines[7] == f"dma logging  no: START supported, STOP supported, REPORT {report}"
    features = dict(line[13:].split() for line in lines[8:])
    assert list(features) == [f.name for f in uapi.FeatureId]
    assert features["MIGRATION"] == "supported"
    assert features["DMA_BUF"] == "ENOTTY"
    assert not any(line.startswith("warning") for line in lines)
    assert kernel.sets == []  # inspect sent no SET
    assert kernel.fds == {}  # and closed the device


def test_inspect_vfio_json_shows_a_leftover_state_and_both_views(populated: Any) -> None:
    kernel = StubKernel(populated.paths)
    kernel.state = DeviceState.PRE_COPY
    status, out = run_inspect(
        ["--json", "vfio:3b:00.1,iommu=group"], vfio_opener(kernel, populated.paths)
    )
    assert status == 0
    envelope = json.loads(out)
    assert envelope["command"] == "inspect"
    report = envelope["result"]
    assert report["spec"] == "vfio:3b:00.1,iommu=group"
    assert report["vfio"]["driver"] == "mlx5_vfio_pci"
    assert report["vfio"]["cdev"] == "vfio0"
    assert report["state"] == {
        "ioctl": "PRE_COPY",
        "ioctl_error": None,
        "debugfs": "PRE_COPY",
        "debugfs_note": None,
        "agree": True,
    }
    assert "left in PRE_COPY" in report["leftover"]
    assert report["precopy"]["available"] is False
    assert "needs a saving data session" in report["precopy"]["reason"]
    assert report["dma_logging"]["supported"] is True
    assert report["data_size"] == 96
    assert kernel.sets == []


def test_inspect_text_warns_about_a_leftover_state_and_a_disagreement(populated: Any) -> None:
    kernel = StubKernel(populated.paths)
    kernel.state = DeviceState.RESUMING
    status, out = run_inspect([f"vfio:{MDEV}"], vfio_opener(kernel, populated.paths))
    assert status == 0
    assert "RESUMING (ioctl)   RUNNING (debugfs)" in out
    assert "ioctl and debugfs disagree" in out
    assert out.splitlines()[-1].startswith("warning: left in RESUMING by an earlier user: reset it")


def test_inspect_errors_are_one_line_with_an_exit_status() -> None:
    environment, _, err = env()
    assert main(["inspect", "vfio:nonexistent"], environment) == 3
    text = err.getvalue().splitlines()
    assert text[0].startswith("vfmig: error: nonexistent: open: no such device (looked in ")
    assert text[1].startswith("hint: ")
    assert len(text) == 2
    environment, _out, err = env()
    assert main(["inspect", "vfio:0000:3b:00.1,vf-token=xyz"], environment) == 2
    assert "vf-token='xyz' is not a UUID" in err.getvalue()


def test_inspect_sim_device_through_main() -> None:
    environment, out, err = env()
    assert main(["inspect", "sim:x,size=4MiB,flags=stop-copy+pre-copy"], environment) == 0
    assert err.getvalue() == ""
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["device", "sim:x,size=4MiB,flags=stop-copy+pre-copy"]
    assert lines[1].split() == ["flags", "STOP_COPY+PRE_COPY"]
    assert lines[2].split() == ["state", "RUNNING", "(ioctl)", "RUNNING", "(debugfs)"]
    assert lines[3].startswith("data size")
    assert lines[3].endswith("bytes (MIG_DATA_SIZE)")
    assert lines[4].endswith("n/a: not in a precopy state")
    assert not any(line.startswith(("driver", "opened via", "warning")) for line in lines)


def test_inspect_sim_device_json() -> None:
    environment, out, _ = env()
    assert main(["inspect", "--json", "sim:x,size=4MiB"], environment) == 0
    report = json.loads(out.getvalue())["result"]
    assert (report["kind"], report["name"], report["spec"]) == ("sim", "x", "sim:x,size=4MiB")
    assert report["flags"] == ["STOP_COPY", "P2P", "PRE_COPY"]
    assert report["state"]["agree"] is True
    assert report["data_size"] >= 4 << 20
    assert "vfio" not in report
    if report["features"] is None:  # the sim offers no probe_features()
        assert report["dma_logging"] == {"supported": None, "answers": {}}
    else:
        assert list(report["dma_logging"]["answers"]) == list(inspect.DMA_LOGGING)
