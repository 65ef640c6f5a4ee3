"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

REPO = Path(__file__).resolve().parent.parent
KERNEL_SOURCE_SCRIPT = REPO / "tests" / "kernel" / "kernel-source.sh"


def cache_dir() -> Path:
    """Where downloaded and built artefacts live (``$VFMIG_CACHE`` or ``.cache/`` in the repo)."""
    return Path(os.environ.get("VFMIG_CACHE", REPO / ".cache"))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(reason: str) -> None:
    """Skip a test whose prerequisite is missing -- but fail under CI, where it must run."""
    if in_ci():
        pytest.fail(f"prerequisite missing under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kernel_source() -> Path:
    """The Linux 6.12 source files vfmig checks itself against (see kernel-source.sh)."""
    dest = cache_dir() / "kernel"
    result = subprocess.run(
        ["bash", str(KERNEL_SOURCE_SCRIPT), str(dest)], capture_output=True, text=True
    )
    if result.returncode != 0:
        need(
            "Linux 6.12 sources unavailable "
            f"({result.stderr.strip().splitlines()[-1:] or 'no output'}); "
            f"run: bash {KERNEL_SOURCE_SCRIPT.relative_to(REPO)} .cache/kernel"
        )
    return dest / "linux-source-6.12"


@pytest.fixture(scope="session")
def prerequisite() -> Callable[[str], None]:
    """``prerequisite(reason)``: skip locally, fail under CI (tests cannot import conftest)."""
    return need


@pytest.fixture(autouse=True)
def journal_store(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Runs journal into the default store: never the real one (``$VFMIG_JOURNAL_DIR``, which
    child processes inherit, points every test at a temporary store)."""
    store = tmp_path_factory.mktemp("journal-store")
    monkeypatch.setenv("VFMIG_JOURNAL_DIR", str(store))
    return store
