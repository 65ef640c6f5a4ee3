"""Every script in examples/ runs, from a neutral directory, and says what it promises."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from vfmig.core.fsm import DeviceState
from vfmig.device.open import open_device
from vfmig.device.sim import SimDevice

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: What an example needs: its arguments, given a scratch directory it may prepare.
Setup = Callable[[Path], list[str]]


def left_by_a_migration(files: Path, *, damaged: bool = False) -> list[str]:
    """A source device left in STOP with state-dir=, and a file of its state (or not quite)."""
    spec = f"sim:src,size=3MiB,content=realistic,state-dir={files / 'src'}"
    dump = files / "dump.bin"
    with open_device(spec) as device:
        device.set_state(DeviceState.STOP)
        assert isinstance(device, SimDevice)
        device.snapshot_to(dump)
    if damaged:
        with open(dump, "r+b") as file:
            file.seek(1 << 20)
            file.write(b"\xff")
    return [spec, str(dump)]


#: Each run: its setup, the exit status and a line its output must hold.
RUNS: dict[str, tuple[str, Setup, int, str]] = {
    "save_and_resume": (
        "save_and_resume.py",
        lambda _: ["--size", "8MiB"],
        0,
        "destination state equals the source's: yes",
    ),
    "migrate_api": (
        "migrate_api.py",
        lambda _: ["--size", "8MiB"],
        0,
        "source left in STOP; destination state equals it: yes",
    ),
    "compare_state": (
        "compare_state.py",
        left_by_a_migration,
        0,
        "the file equals the device's state",
    ),
    "compare_state-damaged": (
        "compare_state.py",
        lambda files: left_by_a_migration(files, damaged=True),
        1,
        "the file DIFFERS from the state",
    ),
}


def test_every_example_is_run_here() -> None:
    covered = {script for script, _, _, _ in RUNS.values()}
    assert sorted(path.name for path in EXAMPLES.glob("*.py")) == sorted(covered)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_example_runs(name: str, tmp_path: Path) -> None:
    script, setup, status, expected = RUNS[name]
    files, cwd = tmp_path / "files", tmp_path / "cwd"
    files.mkdir()
    cwd.mkdir()
    args = setup(files)
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == status, result.stderr
    assert expected in result.stdout.splitlines()
    assert list(cwd.iterdir()) == []  # examples leave nothing behind in the cwd
