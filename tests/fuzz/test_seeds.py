"""The fuzzer's seeds (``make fuzz`` runs them first; ``.ci/run`` fuzzes from them).

``fuzz_protocol.py --make-corpus`` builds a seed per message type and a whole session that
asks every method of the protocol's table, running each seed through the fuzz target: a
method with a parameter shape the seeds cannot build fails here, in ``make test``, not
only in CI's fuzz step. The committed corpus must be that output, so the fuzzer starts
from every method. Needs atheris (``make fuzz`` installs it; CI's fuzz step runs first).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

HARNESS = Path(__file__).with_name("fuzz_protocol.py")
CORPUS = Path(__file__).with_name("corpus")


def test_the_seeds_run_clean_and_are_the_committed_corpus(tmp_path: Path) -> None:
    command = [sys.executable, str(HARNESS), "--make-corpus", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    made = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_bytes() for p in CORPUS.iterdir()}
    stale = sorted(
        name for name in made.keys() | committed.keys() if made.get(name) != committed.get(name)
    )
    assert not stale, (
        f"tests/fuzz/corpus is not the seeds' output ({stale}): "
        "python tests/fuzz/fuzz_protocol.py --make-corpus tests/fuzz/corpus"
    )
