"""In the guest: ``vfmig migrate`` between real mtty devices, the good path and a failing one.

mtty-2 -> mtty-2 moves UART state set through the device's regions (scratch registers and
FIFO bytes on both ports) with precopy: mtty sends its 24-byte header in precopy and the
72 bytes of its ports in stop-copy. mtty-2 -> mtty-1 is a natural failure: 96 bytes of
state into a device that takes 60. The run must stop at the first refused write, bring
the source back to RUNNING, reset the destination and name the failing step and errno.
Both runs are journaled (``--journal``) and replayed (in this process): the journal of a
real run holds every arc, the phases' bytes, and the failure with its rollback.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.core.errors import ExitStatus
from vfmig.core.fsm import DeviceState

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable
    from pathlib import Path

    Cli = Callable[..., subprocess.CompletedProcess[str]]
    Main = Callable[..., tuple[int, str, str]]

pytestmark = pytest.mark.kernel


def _replay(vfmig_main: Main, journal: Path) -> dict[str, Any]:
    """``vfmig replay JOURNAL --json`` (in this process) -> its result; the journal is intact."""
    status, out, err = vfmig_main("replay", str(journal), "--json")
    assert status == ExitStatus.OK, out + err
    result: dict[str, Any] = json.loads(out)["result"]
    assert (result["status"]["intact"], result["status"]["closed"]) == (True, True), result
    return result


def _arcs(replay: dict[str, Any]) -> list[str]:
    """The timeline's state changes of the devices (``src0 RUNNING -> PRE_COPY (...)``)."""
    lines = [line for entry in replay["timeline"] for line in entry["lines"]]
    return [line for line in lines if re.fullmatch(r"(src|dst)\d+ [A-Z_]+ -> [A-Z_]+ \(.*\)", line)]


def _phase_row(output: str, phase: str) -> list[str]:
    """The cells of one row of the run summary's phase table (``phase time raw wire ...``)."""
    for line in output.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == phase:
            return cells
    raise AssertionError(f"no {phase} row in:\n{output}")


def test_migrate_moves_uart_state_with_precopy(
    guest: dict[str, Any],
    uart: Any,
    vfmig_cli: Cli,
    vfmig_main: Main,
    at_rest: list[str],
    tmp_path: Path,
) -> None:
    source, destination = at_rest[0], at_rest[1]
    with uart.open(source) as src, uart.open(destination) as dst:
        assert src.get_state() is DeviceState.RUNNING
        for port, (scr, fifo) in enumerate([(0x48, b"Hi"), (0x7E, b"there")]):
            uart.set_scr(src, port, scr)
            uart.fill_fifo(src, port, fifo)
            uart.set_scr(dst, port, scr ^ 0xFF)
            uart.fill_fifo(dst, port, b"")

    journal = tmp_path / "run.vfj"
    result = vfmig_cli(
        "migrate", f"vfio:{source}", f"vfio:{destination}", "--journal", str(journal)
    )
    assert result.returncode == ExitStatus.OK, result.stdout + result.stderr
    # Precopy ran (mtty's 24-byte header), then stop-copy moved the 72 bytes of its ports.
    assert _phase_row(result.stdout, "precopy")[2] == "24 B", result.stdout
    assert _phase_row(result.stdout, "stopcopy")[2] == "72 B", result.stdout

    with uart.open(source) as src, uart.open(destination) as dst:
        assert dst.get_state() is DeviceState.RUNNING
        assert src.get_state() is DeviceState.STOP
        assert dst.debugfs.read_state().state is DeviceState.RUNNING
        assert src.debugfs.read_state().state is DeviceState.STOP
        assert [uart.scr(dst, port) for port in range(2)] == [0x48, 0x7E]
        assert [uart.scr(dst, port) for port in range(2)] == [uart.scr(src, p) for p in range(2)]
        assert [uart.drain_fifo(dst, port) for port in range(2)] == [b"Hi", b"there"]
        assert [uart.drain_fifo(src, port) for port in range(2)] == [b"Hi", b"there"]

    # The run's journal, replayed: intact, every arc of both devices, the bytes of each phase.
    replay = _replay(vfmig_main, journal)
    assert replay["header"]["kernel"] == guest["kernel"]
    specs = {device["id"]: device["spec"] for device in replay["header"]["devices"]}
    assert specs == {"src0": f"vfio:{source}", "dst0": f"vfio:{destination}"}
    assert replay["summary"]["outcome"] == "completed"
    phases = replay["summary"]["phases"]
    assert (phases["precopy"]["raw_bytes"], phases["stopcopy"]["raw_bytes"]) == (24, 72)
    assert _arcs(replay) == [
        "dst0 RUNNING -> RESUMING (RUNNING>RESUMING)",
        "src0 RUNNING -> PRE_COPY (RUNNING>PRE_COPY)",
        "src0 PRE_COPY -> STOP_COPY (PRE_COPY>STOP_COPY)",
        "dst0 RESUMING -> STOP (RESUMING>STOP)",
        "dst0 STOP -> RUNNING (STOP>RUNNING)",
        "src0 STOP_COPY -> STOP (STOP_COPY>STOP)",
    ]


def test_migrate_into_a_smaller_device_fails_and_rolls_back(
    guest: dict[str, Any],
    uart: Any,
    vfmig_cli: Cli,
    vfmig_main: Main,
    at_rest: list[str],
    tmp_path: Path,
) -> None:
    source = at_rest[0]
    small = next(d["uuid"] for d in guest["mdevs"] if d["type"] == "mtty-1")
    with uart.open(source) as src, uart.open(small) as dst:
        uart.set_scr(src, 0, 0x11)
        uart.set_scr(dst, 0, 0x22)
        uart.fill_fifo(dst, 0, b"keep")

    journal = tmp_path / "run.vfj"
    result = vfmig_cli("migrate", f"vfio:{source}", f"vfio:{small}", "--journal", str(journal))
    assert result.returncode == ExitStatus.FAILED, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("vfmig: error:")]
    assert errors, result.stderr
    # The first error names the destination, the phase, the failing step and the errno.
    first = errors[0]
    assert f"dst0 (vfio:{small})" in first, first
    step = re.search(r": (data write at offset \d+|[A-Z_]+>[A-Z_]+): .* \((E[A-Z]+)\)$", first)
    assert step is not None, first
    assert result.stderr.splitlines()[-1].startswith("vfmig: failed"), result.stderr

    with uart.open(source) as src, uart.open(small) as dst:
        assert src.get_state() is DeviceState.RUNNING
        assert dst.get_state() is DeviceState.RUNNING  # reset, never stepped out of RESUMING
        # The destination loaded nothing: its own UART state is still there.
        assert uart.scr(dst, 0) == 0x22
        assert uart.drain_fifo(dst, 0) == b"keep"
        assert uart.scr(src, 0) == 0x11

    # The journal tells the same story: the refused write, then the reset and the way back.
    replay = _replay(vfmig_main, journal)
    assert replay["summary"]["outcome"] == "failed"
    lines = [line for entry in replay["timeline"] for line in entry["lines"]]
    failure = re.compile(rf"ERROR dst0 \[\w+\] {re.escape(step[1])}: .* \({step[2]}\)$")
    assert any(failure.match(line) for line in lines), lines
    assert set(_arcs(replay)[-2:]) == {
        "dst0 RESUMING -> RUNNING (reset)",
        "src0 PRE_COPY -> RUNNING (PRE_COPY>RUNNING)",
    }
