"""In the guest: ``vfmig list`` and ``vfmig inspect`` on the mtty mdevs, and debugfs against ioctl.

The commands run as subprocesses of this checkout's interpreter. The last test drives a
migration between the two mtty-2 by hand through the device API, one arc at a time, and
reads the state of both devices by ioctl and by debugfs after every arc: the two views must
agree at every step, and the UART state must arrive.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.core.fsm import DeviceState

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable

    Cli = Callable[..., subprocess.CompletedProcess[str]]

    from vfmig.device.backend import DataSession

pytestmark = pytest.mark.kernel


#: mtty's stream: a 24-byte header (sent in precopy), then 36 bytes per port.
MTTY_HEADER_BYTES = 24
MTTY_PORT_BYTES = 36
ALL_FLAGS = "STOP_COPY+P2P+PRE_COPY"


def _ports(kind: str) -> int:
    return int(kind.rpartition("-")[2])


def _group(uuid: str) -> str:
    return (Path("/sys/bus/mdev/devices") / uuid / "iommu_group").resolve().name


def _envelope(result: subprocess.CompletedProcess[str], command: str) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    envelope: dict[str, Any] = json.loads(result.stdout)
    assert envelope["command"] == command
    assert envelope["ok"] is True
    return envelope


def test_list_shows_every_mdev_with_its_state(guest: dict[str, Any], vfmig_cli: Cli) -> None:
    table = vfmig_cli("list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "BUS", "ID/TYPE"], lines
    for device in guest["mdevs"]:
        row = next(line.split() for line in lines if line.startswith(device["uuid"]))
        # DEVICE BUS ID/TYPE DRIVER GROUP CDEV HELD MIGRATION STATE: 6.12's debugfs has the
        # state but not the flags (the features file is 6.18's).
        assert row == [
            device["uuid"],
            "mdev",
            device["type"],
            "mtty",
            _group(device["uuid"]),
            "-",
            "no",
            "unknown",
            "RUNNING",
        ]

    probed = _envelope(vfmig_cli("list", "--probe", "--json"), "list")["result"]
    assert "resets the function" in probed["note"]
    rows = {row["device"]: row for row in probed["devices"]}
    for device in guest["mdevs"]:
        row = rows[device["uuid"]]
        assert row["probe"] == {"probed": True, "flags": ALL_FLAGS, "state": "RUNNING"}
        assert (row["migration"], row["migration_source"]) == (ALL_FLAGS, "probe")
        assert row["held"] == "no"
        assert row["holders"] == []


def test_inspect_reports_flags_state_sizes_and_features(
    guest: dict[str, Any], vfmig_cli: Cli
) -> None:
    # One device of each type (each run costs a Python start-up, ~10 s under TCG).
    for kind in ("mtty-2", "mtty-1"):
        uuid = next(d["uuid"] for d in guest["mdevs"] if d["type"] == kind)
        result = vfmig_cli("inspect", f"vfio:{uuid}", "--json")
        report = _envelope(result, "inspect")["result"]
        assert report["name"] == uuid
        assert report["vfio"]["driver"] == "mtty"
        assert report["vfio"]["iommu_group"] == _group(uuid)
        assert report["vfio"]["opened_via"].startswith(f"group /dev/vfio/{_group(uuid)} ")
        assert report["flags"] == ["STOP_COPY", "P2P", "PRE_COPY"]
        assert report["state"] == {
            "ioctl": "RUNNING",
            "ioctl_error": None,
            "debugfs": "RUNNING",
            "debugfs_note": None,
            "agree": True,
        }
        assert report["leftover"] is None
        assert report["data_size"] == MTTY_HEADER_BYTES + MTTY_PORT_BYTES * _ports(kind)
        assert report["precopy"]["available"] is False
        # mtty has (dummy) DMA logging ops, so PROBE says yes; MIGRATION is there, DMA_BUF not.
        assert report["dma_logging"]["supported"] is True
        assert report["features"]["MIGRATION"] == "supported"
        assert report["features"]["MIG_DEVICE_STATE"] == "supported"
        assert report["features"]["DMA_BUF"] == "ENOTTY"


def _copy(saving: DataSession, resuming: DataSession, *, precopy: bool) -> int:
    """Move what the saving fd has now (precopy) or until its end (stop-copy); bytes moved."""
    buffer = bytearray(4096)
    moved = 0
    while True:
        n = saving.readinto(buffer)
        if n is None:  # nothing now: the end of what precopy has, never of stop-copy
            assert precopy, "a STOP_COPY read said 'nothing now'"
            return moved
        if n == 0:
            assert not precopy, "a PRE_COPY read ended the stream"
            return moved
        view = memoryview(buffer)[:n]
        while view:
            view = view[resuming.write(view) :]
        moved += n


def test_debugfs_agrees_with_ioctl_at_every_step_of_a_migration(
    uart: Any, at_rest: list[str]
) -> None:
    S = DeviceState
    samples: list[tuple[str, str, str, str]] = []
    with uart.open(at_rest[0]) as src, uart.open(at_rest[1]) as dst:

        def step(device: Any, target: DeviceState) -> None:
            device.set_state(target)
            label = f"{'src' if device is src else 'dst'}>{target.name}"
            for each in (src, dst):
                by_ioctl = each.get_state().name
                samples.append((label, each.name, by_ioctl, each.debugfs.read_state().raw))

        for port in range(2):
            uart.set_scr(src, port, 0x30 + port)
            uart.set_scr(dst, port, 0xC0 + port)
        uart.fill_fifo(src, 0, b"Hi")
        uart.fill_fifo(src, 1, b"!")
        uart.fill_fifo(dst, 0, b"")
        uart.fill_fifo(dst, 1, b"")

        for target in (S.RUNNING_P2P, S.STOP, S.RESUMING):
            step(dst, target)
        step(src, S.PRE_COPY)
        assert src.session is not None
        assert dst.session is not None
        assert _copy(src.session, dst.session, precopy=True) == MTTY_HEADER_BYTES
        step(src, S.PRE_COPY_P2P)
        step(src, S.STOP_COPY)
        assert _copy(src.session, dst.session, precopy=False) == 2 * MTTY_PORT_BYTES
        step(src, S.STOP)
        for target in (S.STOP, S.RUNNING_P2P, S.RUNNING):  # RESUMING>STOP loads the stream
            step(dst, target)

        assert [uart.scr(dst, port) for port in range(2)] == [0x30, 0x31]
        assert [uart.drain_fifo(dst, port) for port in range(2)] == [b"Hi", b"!"]
        assert [uart.drain_fifo(src, port) for port in range(2)] == [b"Hi", b"!"]
        step(src, S.RUNNING_P2P)
        step(src, S.RUNNING)

    disagreements = [sample for sample in samples if sample[2] != sample[3]]
    assert not disagreements, disagreements
    assert len(samples) == 2 * 12
    visited = {state for _, _, state, _ in samples}
    assert visited == {s.name for s in DeviceState} - {"ERROR"}
