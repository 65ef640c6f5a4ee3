"""In the guest: ``vfmig doctor`` on a real 6.12 host with mtty devices.

No check fails on the mtty mdevs: what this kernel cannot offer (the cdev path without
IOMMUFD, dirty-page reports without IOMMUFD_DRIVER) is a warning or n/a with the reason,
and the known mtty oops is a warning. A device that does not exist fails, and so does
the run. (The plain run and the next one call vfmig's main in this process, to save a
Python start-up.) With debugfs pointed at a tree without ``vfio/`` (what a stock vfio.ko built
without CONFIG_VFIO_DEBUGFS gives) the debugfs check warns with its hint.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.core.errors import ExitStatus

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable
    from pathlib import Path

    Cli = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.kernel

MISSING = "0badc0de-0000-4000-8000-000000000000"


def _by_id(checks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {check["id"]: check for check in checks}


def test_doctor_probe_passes_mtty_and_fails_a_missing_device(
    guest: dict[str, Any], vfmig_cli: Cli, at_rest: list[str]
) -> None:
    result = vfmig_cli("doctor", *(f"vfio:{u}" for u in at_rest), MISSING, "--probe", "--json")
    assert result.returncode == ExitStatus.FAILED, result.stdout + result.stderr
    envelope = json.loads(result.stdout)
    assert envelope["ok"] is False
    assert envelope["error"]["message"] == "1 check failed"
    report = envelope["result"]
    assert report["host"]["release"] == guest["kernel"]

    host = _by_id(report["host"]["checks"])
    assert [c for c in host.values() if c["status"] == "fail"] == []
    expected = {
        "kernel": "pass",
        "bug:blocked-arc-loop": "pass",  # fixed in 6.12.96
        "bug:mtty-resuming-reopen": "warn",
        "module:vfio": "pass",
        "module:vfio_iommu_type1": "pass",
        "module:vfio_pci": "n/a",  # only mdevs asked about, and vfio-pci is not loaded
        "module:mdev": "pass",
        "group-path": "pass",
        "cdev-path": "n/a",
        "debugfs": "pass",
        "privileges": "pass",
    }
    assert {name: check["status"] for name, check in host.items()} == expected, host
    assert "opens devices through their group" in host["cdev-path"]["detail"]

    devices = {entry["device"]: _by_id(entry["checks"]) for entry in report["devices"]}
    for uuid in at_rest:
        checks = devices[f"vfio:{uuid}"]
        assert [c for c in checks.values() if c["status"] == "fail"] == [], checks
        statuses = {name: check["status"] for name, check in checks.items()}
        assert statuses == {
            "device": "pass",
            "driver": "pass",
            "iommu-group": "pass",
            "access": "pass",
            "cdev": "n/a",
            "vf-token": "n/a",
            "busy": "pass",
            "open": "pass",
            "migration": "pass",
            "state": "pass",
            "dirty-tracking": "warn",
        }, checks
        assert checks["migration"]["detail"] == "STOP_COPY+P2P+PRE_COPY (probe)"
        assert checks["state"]["detail"] == "RUNNING (ioctl)"
        assert "EOPNOTSUPP" in checks["dirty-tracking"]["detail"]
        assert "CONFIG_IOMMUFD_DRIVER" in checks["dirty-tracking"]["detail"]
    assert devices[MISSING] == {"device": devices[MISSING]["device"]}
    assert devices[MISSING]["device"]["status"] == "fail"
    assert envelope["result"]["summary"]["fail"] == 1


def test_doctor_without_probe_reads_debugfs_and_passes(
    guest: dict[str, Any], vfmig_main: Callable[..., tuple[int, str, str]]
) -> None:
    uuid = guest["mdevs"][0]["uuid"]
    status, out, err = vfmig_main("doctor", uuid)
    assert status == ExitStatus.OK, out + err
    lines = out.splitlines()
    assert lines[0] == "host"
    assert not [line for line in lines if line.startswith("  fail")], out
    rows = {line.split()[1]: line for line in lines if line.startswith(("  pass", "  warn"))}
    assert "supported (debugfs shows its migration state)" in rows["migration"]
    assert rows["state"].split()[-2:] == ["RUNNING", "(debugfs)"]
    assert ", 0 failed," in lines[-1], lines[-1]


def test_doctor_warns_without_vfio_debugfs(
    guest: dict[str, Any], vfmig_main: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    """A debugfs without vfio/ is what a stock vfio.ko (no CONFIG_VFIO_DEBUGFS) leaves."""
    (tmp_path / "tracing").mkdir()
    uuid = guest["mdevs"][0]["uuid"]
    status, out, err = vfmig_main("doctor", uuid, "--debugfs", str(tmp_path), "--json")
    assert status == ExitStatus.OK, out + err
    report = json.loads(out)["result"]
    debugfs = _by_id(report["host"]["checks"])["debugfs"]
    assert debugfs["status"] == "warn"
    assert "CONFIG_VFIO_DEBUGFS" in debugfs["detail"]
    assert "CONFIG_VFIO_DEBUGFS=y" in debugfs["hint"]
    checks = _by_id(report["devices"][0]["checks"])
    assert checks["migration"]["status"] == "warn"
    assert "--probe" in checks["migration"]["hint"]
    assert checks["state"]["status"] == "n/a"
