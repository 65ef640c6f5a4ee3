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
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

#: The mdevs guest-setup.sh creates, in order: mtty-2 -> mtty-2 migrates, mtty-2 -> mtty-1 fails.
MDEV_TYPES = ("mtty-2", "mtty-2", "mtty-1")
#: Runs after every other test (see module docstring).
LAST_MODULE = "test_guest_kernel_log.py"
_VM_TIER_OUTCOME = pytest.StashKey[dict[str, Any]]()


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


@pytest.fixture(scope="session")
def harness() -> ModuleType:
    """tests/kernel/harness.py as a module, for testing its pieces without booting anything."""
    name = "vfmig_kernel_tier_harness"
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("harness.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


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
