"""The journal's layering (architecture.md §2): only the recorder task may load trio."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = {
    "vfmig.core.view": ("trio", "textual", "msgpack", "zstandard", "vfmig.journal", "vfmig.engine"),
    "vfmig.core.diagnose": ("trio", "textual", "msgpack", "zstandard", "vfmig.engine"),
    "vfmig.journal.codec": ("trio", "textual", "vfmig.engine", "vfmig.device"),
    "vfmig.journal.reader": ("trio", "textual", "vfmig.engine", "vfmig.device"),
    "vfmig.journal.writer": ("trio", "textual", "vfmig.engine", "vfmig.device"),
    "vfmig.journal.store": ("trio", "textual", "vfmig.engine", "vfmig.device"),
    "vfmig.journal.merge": ("trio", "textual", "vfmig.engine", "vfmig.device"),
    "vfmig.journal.synthetic": ("trio", "textual", "msgpack", "zstandard", "vfmig.engine"),
    "vfmig.cli.journal": ("trio", "textual", "vfmig.engine"),
    "vfmig.cli.replay": ("trio", "textual", "vfmig.engine"),
    "vfmig.cli.save_load": ("trio", "textual", "vfmig.engine"),
}


@pytest.mark.parametrize("module", sorted(CASES))
def test_module_does_not_load_forbidden(module: str, tmp_path: object) -> None:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, check=True
    )
    loaded = set(out.stdout.split())
    bad = sorted(m for m in loaded for f in CASES[module] if m == f or m.startswith(f + "."))
    assert not bad, f"importing {module} loaded {bad}"
