"""On the host: the real-kernel tier, run once -- boot the guest, run tests/kernel in it.

harness.py does the work (docs/kernel-tier.md); this test turns its outcome into
pytest's: passed, failed with the guest's pytest summary and failing tests, or
skipped (locally) / failed (under CI) when the machine cannot run the tier.
``VFMIG_KERNEL_TIER=0`` or ``-m "not kernel"`` leaves the tier out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

HARNESS = Path(__file__).resolve().parent / "harness.py"


def test_guest_suite_passes(
    tmp_path: Path,
    prerequisite: Callable[[str], None],
    report_vm_tier: Callable[[dict[str, Any]], None],
) -> None:
    if os.environ.get("VFMIG_KERNEL_GUEST"):
        pytest.skip("this is the guest: the tier is driven from the host")
    if os.environ.get("VFMIG_KERNEL_TIER", "1") == "0":
        pytest.skip("VFMIG_KERNEL_TIER=0: real-kernel tier turned off")
    result = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, str(HARNESS), "--quiet", "--result", str(result)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.is_file(), f"harness.py wrote no result (exit {run.returncode}):\n{run.stderr}"
    outcome: dict[str, Any] = json.loads(result.read_text())
    report_vm_tier(outcome)
    if outcome["outcome"] == "unavailable":
        prerequisite(f"{outcome['message']} ({outcome['hint']})")
    lines = [outcome["message"], *outcome["failures"]]
    if outcome["hint"]:
        lines.append(f"hint: {outcome['hint']}")
    if outcome["run_dir"]:
        lines.append(f"guest logs: {outcome['run_dir']} (pytest.log, dmesg.txt, console.log)")
    assert outcome["outcome"] == "passed", "\n".join(lines)
    assert run.returncode == 0, run.stderr
