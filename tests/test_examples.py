"""Every script in examples/ runs, from a neutral directory, and says what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: Each example: the arguments that keep it quick, and a line its output must hold.
RUNS: dict[str, tuple[list[str], str]] = {
    "save_and_resume.py": (["--size", "8MiB"], "destination state equals the source's: yes"),
}


def test_every_example_is_run_here() -> None:
    assert sorted(path.name for path in EXAMPLES.glob("*.py")) == sorted(RUNS)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_example_runs(name: str, tmp_path: Path) -> None:
    args, expected = RUNS[name]
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout.splitlines()
    assert list(tmp_path.iterdir()) == []  # examples leave nothing behind in the cwd
