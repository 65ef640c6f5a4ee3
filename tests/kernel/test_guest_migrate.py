"""In the guest: ``vfmig migrate`` between real mtty devices, the good path and a failing one.

mtty-2 -> mtty-2 moves UART state set through the device's regions (scratch registers and
FIFO bytes on both ports) with precopy: mtty sends its 24-byte header in precopy and the
72 bytes of its ports in stop-copy. mtty-2 -> mtty-1 is a natural failure: 96 bytes of
state into a device that takes 60. The run must stop at the first refused write, bring
the source back to RUNNING, reset the destination and name the failing step and errno.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.core.errors import ExitStatus
from vfmig.core.fsm import DeviceState

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable

    Cli = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.kernel


def _phase_row(output: str, phase: str) -> list[str]:
    """The cells of one row of the run summary's phase table (``phase time raw wire ...``)."""
    for line in output.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == phase:
            return cells
    raise AssertionError(f"no {phase} row in:\n{output}")


def test_migrate_moves_uart_state_with_precopy(
    uart: Any, vfmig_cli: Cli, at_rest: list[str]
) -> None:
    source, destination = at_rest[0], at_rest[1]
    with uart.open(source) as src, uart.open(destination) as dst:
        assert src.get_state() is DeviceState.RUNNING
        for port, (scr, fifo) in enumerate([(0x48, b"Hi"), (0x7E, b"there")]):
            uart.set_scr(src, port, scr)
            uart.fill_fifo(src, port, fifo)
            uart.set_scr(dst, port, scr ^ 0xFF)
            uart.fill_fifo(dst, port, b"")

    result = vfmig_cli("migrate", f"vfio:{source}", f"vfio:{destination}")
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


def test_migrate_into_a_smaller_device_fails_and_rolls_back(
    guest: dict[str, Any], uart: Any, vfmig_cli: Cli, at_rest: list[str]
) -> None:
    source = at_rest[0]
    small = next(d["uuid"] for d in guest["mdevs"] if d["type"] == "mtty-1")
    with uart.open(source) as src, uart.open(small) as dst:
        uart.set_scr(src, 0, 0x11)
        uart.set_scr(dst, 0, 0x22)
        uart.fill_fifo(dst, 0, b"keep")

    result = vfmig_cli("migrate", f"vfio:{source}", f"vfio:{small}")
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
