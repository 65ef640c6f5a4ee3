"""In the guest: a ``vfmig migrate`` killed in precopy, the leftovers it leaves, and recovery.

mtty keeps its migration state across close, so SIGKILL in precopy leaves the source in
PRE_COPY and the destination in RESUMING, both without their data fds. mtty never reports
dirty bytes, so precopy is held open with a downtime limit no estimate can meet and a long
precopy cap: the run then stays in precopy until killed (not a race against a switchover).

A second ``vfmig migrate`` must refuse both devices as left over (exit 3, changing
nothing); ``vfmig inspect`` shows the destination with a warning; ``vfmig recover`` brings
the source back through the FSM and the destination by reset -- a state change out of a
reopened RESUMING oopses mtty on 6.12, so the kernel log must stay clean. (inspect and
recover run in this process: a Python start-up costs ~10 s under TCG; the code is the same.)
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.core.errors import ExitStatus
from vfmig.core.fsm import DeviceState
from vfmig.device.debugfs import DebugfsReader

if TYPE_CHECKING:
    from collections.abc import Callable

    Cli = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.kernel


#: How long the killed run may take to reach precopy (Python and trio start slowly in TCG).
REACH_PRECOPY_S = 180.0
SPLAT = re.compile(r"BUG:|WARNING:|Oops")


def _debugfs_state(root: Path, uuid: str) -> DeviceState | None:
    return DebugfsReader(uuid, root).read_state().state


def _wait_for(states: dict[str, DeviceState], root: Path, process: subprocess.Popen[str]) -> None:
    """Poll debugfs until every device reads its state (fails if the run ends first)."""
    deadline = time.monotonic() + REACH_PRECOPY_S
    while time.monotonic() < deadline:
        if all(_debugfs_state(root, uuid) is state for uuid, state in states.items()):
            return
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"vfmig migrate ended ({process.returncode}) first:\n{out}{err}")
        time.sleep(0.1)
    raise AssertionError(f"not in {states} after {REACH_PRECOPY_S} s")


def _kernel_log() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()


def test_killed_migration_is_refused_then_recovered(
    guest: dict[str, Any],
    vfmig_argv: list[str],
    vfmig_cli: Cli,
    vfmig_main: Callable[..., tuple[int, str, str]],
    at_rest: list[str],
) -> None:
    source, destination = at_rest[0], at_rest[1]
    root = Path(guest["debugfs"])
    logged = len(_kernel_log())

    run = subprocess.Popen(
        [
            *vfmig_argv,
            "migrate",
            f"vfio:{source}",
            f"vfio:{destination}",
            "--downtime-limit",
            "0.000001",  # ms: no downtime estimate meets it ...
            "--max-precopy",
            "3600",  # ... and mtty never stalls (no dirty bytes): precopy lasts until the kill
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for({source: DeviceState.PRE_COPY, destination: DeviceState.RESUMING}, root, run)
    finally:
        run.kill()
        run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL

    # The kernel closed both data fds; the states stay.
    assert _debugfs_state(root, source) is DeviceState.PRE_COPY
    assert _debugfs_state(root, destination) is DeviceState.RESUMING
    status, shown, err = vfmig_main("inspect", f"vfio:{destination}")
    assert status == ExitStatus.OK, err
    assert "RESUMING (ioctl)   RESUMING (debugfs)" in shown
    assert "warning: left in RESUMING by an earlier user: reset it" in shown

    refused = vfmig_cli("migrate", f"vfio:{source}", f"vfio:{destination}")
    assert refused.returncode == ExitStatus.DEVICE, refused.stdout + refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("vfmig: error:")]
    assert any(
        f"src0 (vfio:{source}): preflight" in e and "found in PRE_COPY" in e for e in errors
    ), refused.stderr
    assert any(
        f"dst0 (vfio:{destination}): preflight" in e and "found in RESUMING" in e for e in errors
    ), refused.stderr
    assert "hint: recover the device first" in refused.stderr
    assert _debugfs_state(root, source) is DeviceState.PRE_COPY  # refusing changed nothing
    assert _debugfs_state(root, destination) is DeviceState.RESUMING

    status, recovered, err = vfmig_main("recover", f"vfio:{destination}")
    assert status == ExitStatus.OK, recovered + err
    assert recovered.splitlines()[-1] == "recovered: RESUMING -> RUNNING by a reset"
    status, recovered, err = vfmig_main("recover", f"vfio:{source}")
    assert status == ExitStatus.OK, recovered + err
    assert recovered.splitlines()[-1] == "recovered: PRE_COPY -> RUNNING by the FSM"

    assert _debugfs_state(root, source) is DeviceState.RUNNING
    assert _debugfs_state(root, destination) is DeviceState.RUNNING
    splats = [line for line in _kernel_log()[logged:] if SPLAT.search(line)]
    assert not splats, splats
