"""Fixtures of the real-kernel tier (docs/kernel-tier.md).

Three kinds of test live here:

* ``test_guest_*.py`` run **inside** the guest that ``harness.py`` boots. guest-setup.sh
  describes the guest in a JSON file named by ``VFMIG_KERNEL_GUEST``; without it the
  ``guest`` fixture skips (they are not meant for the host).
* ``test_vm_tier.py`` runs on the **host**: it runs the harness once and fails with the
  guest's pytest summary when the guest run failed.
* ``test_harness.py`` checks the harness's pieces that need no apt, build or QEMU (the
  ``harness`` fixture loads harness.py as a module); it runs anywhere.

``test_guest_kernel_log.py`` judges what every other test did to the kernel, so it is
moved to the end of the run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import ModuleType

    from vfmig.device.vfio import VfioDevice

#: The mdevs guest-setup.sh creates, in order: mtty-2 -> mtty-2 migrates, mtty-2 -> mtty-1 fails.
MDEV_TYPES = ("mtty-2", "mtty-2", "mtty-1")
#: Runs after every other test (see module docstring).
LAST_MODULE = "test_guest_kernel_log.py"
_VM_TIER_OUTCOME = pytest.StashKey[dict[str, Any]]()

#: On the host the guest's tests are not even collected (they would only skip, one line
#: each); test_vm_tier.py runs them inside the guest, where VFMIG_KERNEL_GUEST is set.
collect_ignore_glob = [] if os.environ.get("VFMIG_KERNEL_GUEST") else ["test_guest_*.py"]


@pytest.fixture(scope="session")
def guest() -> dict[str, Any]:
    """The booted guest as guest-setup.sh describes it; skips outside the guest.

    Keys: ``kernel`` (``uname -r``), ``expected_kernel`` (the release the host booted),
    ``debugfs`` (mount point), ``vfio_ko`` and ``mtty_ko`` (module paths), ``mdevs``
    (``[{"uuid": ..., "type": "mtty-2"}, ...]`` in :data:`MDEV_TYPES` order).
    """
    path = os.environ.get("VFMIG_KERNEL_GUEST")
    if not path:
        pytest.skip(
            "runs inside the kernel-tier guest only: 'make test-kernel' boots it "
            "(and tests/kernel/test_vm_tier.py does in the full suite)"
        )
    description: dict[str, Any] = json.loads(Path(path).read_text())
    return description


@pytest.fixture(params=range(len(MDEV_TYPES)), ids=[f"{t}#{i}" for i, t in enumerate(MDEV_TYPES)])
def mdev(request: pytest.FixtureRequest, guest: dict[str, Any]) -> tuple[str, str]:
    """Each mdev of the guest in turn: ``(uuid, type)``."""
    device = guest["mdevs"][request.param]
    assert device["type"] == MDEV_TYPES[request.param], guest["mdevs"]
    return device["uuid"], device["type"]


def _load(name: str, filename: str) -> ModuleType:
    """A file of this directory as a module (test modules cannot import each other)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(filename))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def harness() -> ModuleType:
    """tests/kernel/harness.py as a module, for testing its pieces without booting anything."""
    return _load("vfmig_kernel_tier_harness", "harness.py")


#: mtty's UART registers (offsets into port N's BAR N) the guest tests use.
UART_DATA, UART_FCR, UART_LSR = 0, 2, 5
#: FCR: FIFO on, both FIFOs cleared. LSR: data ready.
FCR_ENABLE_AND_CLEAR, LSR_DATA_READY = 0x07, 0x01
#: Bytes an mtty FIFO holds (mtty.c MAX_FIFO_SIZE).
FIFO_SIZE = 16


class MttyUart:
    """An mtty device's UART registers through its regions (vfio-migration.md section 10).

    Port N is BAR N; registers are single bytes: the scratch register (``scr``) keeps any
    value, the FIFO (``fifo``) takes bytes written at offset 0 and gives them back on reads
    there. Both travel in mtty's migration stream, and a reset clears neither.
    """

    def __init__(self, regs: ModuleType) -> None:
        self._regs = regs

    def open(self, uuid: str) -> VfioDevice:
        """Open the mdev through its group (no state change: a leftover state stays)."""
        from vfmig.core.spec import parse_spec
        from vfmig.device.vfio import open_vfio_device

        return open_vfio_device(parse_spec(f"vfio:{uuid},iommu=group"))

    def scr(self, device: VfioDevice, port: int) -> int:
        value: int = self._regs.read_byte(device, port, self._regs.UART_SCR)
        return value

    def set_scr(self, device: VfioDevice, port: int, value: int) -> None:
        self._regs.write_byte(device, port, self._regs.UART_SCR, value)

    def fill_fifo(self, device: VfioDevice, port: int, data: bytes) -> None:
        """Empty the FIFO, then put ``data`` in it."""
        assert len(data) <= FIFO_SIZE, data
        self._regs.write_byte(device, port, UART_FCR, FCR_ENABLE_AND_CLEAR)
        for byte in data:
            self._regs.write_byte(device, port, UART_DATA, byte)

    def drain_fifo(self, device: VfioDevice, port: int) -> bytes:
        """Everything the FIFO holds (reading empties it)."""
        out = bytearray()
        while (
            len(out) <= FIFO_SIZE and self._regs.read_byte(device, port, UART_LSR) & LSR_DATA_READY
        ):
            out.append(self._regs.read_byte(device, port, UART_DATA))
        return bytes(out)


@pytest.fixture(scope="session")
def uart(guest: dict[str, Any]) -> MttyUart:
    """Register access to the guest's mtty devices (:class:`MttyUart`)."""
    return MttyUart(_load("vfmig_kernel_tier_mtty", "conformance_mtty.py"))


@pytest.fixture(scope="session")
def vfmig_argv(guest: dict[str, Any]) -> list[str]:
    """The command line that runs this checkout's vfmig (-P: the checkout stays off sys.path)."""
    return [sys.executable, "-P", "-m", "vfmig"]


@pytest.fixture(scope="session")
def vfmig_cli(vfmig_argv: list[str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``vfmig_cli(*args, timeout=300)``: run vfmig, capture its output, never raise on status.

    Python starts slowly under TCG (trio alone takes ~10 s to import): timeouts are generous.
    """

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*vfmig_argv, *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    return run


@pytest.fixture(scope="session")
def vfmig_main(guest: dict[str, Any]) -> Callable[..., tuple[int, str, str]]:
    """``vfmig_main(*args)``: vfmig's ``main`` in this process -> (status, stdout, stderr).

    For commands that are not themselves under test, or whose in-process run tests the same
    code: it saves a Python start-up (~10 s under TCG) per call.
    """
    import io

    from vfmig.cli.context import Environment
    from vfmig.cli.main import main

    def run(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main(list(args), Environment(stdout=out, stderr=err, stdout_isatty=False))
        return status, out.getvalue(), err.getvalue()

    return run


@pytest.fixture
def at_rest(guest: dict[str, Any], uart: MttyUart) -> Iterator[list[str]]:
    """The mdevs' UUIDs; after the test every one is back in RUNNING (reset where it must).

    mtty keeps its migration state across close and reopen, so a test that fails half-way
    would leave the next one a device in PRE_COPY or RESUMING. Recovery resets a device found
    in RESUMING before any other change (stepping out of it oopses mtty).
    """
    from vfmig.device.recovery import recover

    yield [device["uuid"] for device in guest["mdevs"]]
    for device in guest["mdevs"]:
        with uart.open(device["uuid"]) as opened:
            report = recover(opened)
        assert report.ok, report


@pytest.fixture
def report_vm_tier(request: pytest.FixtureRequest) -> Callable[[dict[str, Any]], None]:
    """``report_vm_tier(outcome)``: show the guest run's outcome in the terminal summary."""

    def report(outcome: dict[str, Any]) -> None:
        request.config.stash[_VM_TIER_OUTCOME] = outcome

    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    last = [item for item in items if item.path.name == LAST_MODULE]
    if last:
        moved = set(map(id, last))
        items[:] = [item for item in items if id(item) not in moved] + last


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    outcome = terminalreporter.config.stash.get(_VM_TIER_OUTCOME, None)
    if outcome is None:
        return
    terminalreporter.section("kernel tier")
    terminalreporter.line(f"{outcome['outcome']}: {outcome['message']}")
    for line in outcome["failures"]:
        terminalreporter.line(f"  guest {line}")
    if outcome["kernel"]:
        times = ", ".join(f"{name} {value:g} s" for name, value in outcome["timings"].items())
        build, accel = outcome["build"], outcome["accel"]
        terminalreporter.line(f"Linux {outcome['kernel']} ({build}, {accel}): {times}")
    if outcome["run_dir"]:
        terminalreporter.line(f"logs: {outcome['run_dir']}")
