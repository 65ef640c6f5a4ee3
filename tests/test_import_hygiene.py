"""What each layer must *not* load, checked in a fresh interpreter per import (ADR 0001).

A subprocess per case, started from a neutral directory, so neither this test process nor the
repository root on sys.path can hide a bad import.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

FORBIDDEN_EVERYWHERE = ("protocol", "tui")

PURE = ("trio", "textual", "msgpack", "zstandard", "vfmig.device", "vfmig.engine", "vfmig.journal")
SYNC = ("trio", "textual", "vfmig.engine", "vfmig.tui")
TRIO_GLUE = ("recorder", "runs", "collect")


def modules_of(package: str) -> list[str]:
    """Every module of a vfmig package, found on disk (a new module is checked without edits)."""
    import importlib.util
    import pkgutil

    spec = importlib.util.find_spec(package)
    assert spec is not None
    assert spec.submodule_search_locations is not None
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules(spec.submodule_search_locations)]


CASES: dict[str, tuple[str, ...]] = {
    # The pure core: decisions without I/O, tested exhaustively (ADR 0003, 0005).
    **dict.fromkeys(modules_of("vfmig.core"), PURE),
    # Devices are synchronous: the engine runs them in worker threads.
    **dict.fromkeys(modules_of("vfmig.device"), SYNC),
    # The journal is read and written without trio; only the engine's glue is trio code:
    # the bus recorder task, an agent's per-run journals, fetching the agents' journals.
    **{m: SYNC for m in modules_of("vfmig.journal") if m.rsplit(".", 1)[1] not in TRIO_GLUE},
    "vfmig.protocol": ("trio", "textual", "socket", "threading", "vfmig.core", "vfmig.engine"),
    **dict.fromkeys(modules_of("vfmig.engine"), ("textual", "vfmig.tui")),
    # The CLI starts fast: no textual and no trio until a command needs them.
    "vfmig.cli.main": ("textual", "trio"),
}


def loaded_after_import(module: str, tmp_path: object) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


@pytest.mark.parametrize("module", sorted(CASES))
def test_module_does_not_load_forbidden(module: str, tmp_path: object) -> None:
    loaded = loaded_after_import(module, tmp_path)
    forbidden = CASES[module] + FORBIDDEN_EVERYWHERE
    bad = sorted(name for name in loaded if name.split(".")[0] in forbidden or name in forbidden)
    bad += sorted(
        name for name in loaded for f in forbidden if "." in f and name.startswith(f + ".")
    )
    assert not bad, f"importing {module} loaded {bad}"


@pytest.mark.parametrize("name", FORBIDDEN_EVERYWHERE)
def test_no_top_level_package(name: str, tmp_path: object) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import {name}"], cwd=str(tmp_path), capture_output=True, text=True
    )
    assert result.returncode != 0, f"a top-level '{name}' is importable"
    assert name not in sys.modules


def test_installed_names() -> None:
    import vfmig.protocol
    import vfmig.tui

    assert vfmig.protocol.__name__ == "vfmig.protocol"
    assert vfmig.tui.__name__ == "vfmig.tui"


def run_command(argv: list[str], tmp_path: object, *, setup: str = "") -> tuple[str, list[str]]:
    """``vfmig ARGV`` in a fresh interpreter (after ``setup``): its exit status and every
    module it loaded."""
    code = (
        "import sys, io, contextlib, pathlib\n"
        "from vfmig.cli.main import main\n"
        f"{setup}\n"
        "quiet = io.StringIO()\n"
        "with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):\n"
        f"    status = main({argv!r})\n"
        "print(status, *sorted(sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, check=True
    )
    status, *loaded = out.stdout.split()
    return status, loaded


def test_a_command_loads_only_its_own_module(tmp_path: object) -> None:
    """``vfmig fsm`` starts without the engine, the journal or trio (lazy command table)."""
    status, loaded = run_command(["fsm", "path", "RUNNING", "STOP"], tmp_path)
    assert status == "0"
    heavy = [
        m
        for m in loaded
        if m.split(".")[0] == "trio"
        or m.startswith(("vfmig.engine", "vfmig.journal", "vfmig.cli.migrate"))
    ]
    assert not heavy, f"vfmig fsm loaded {heavy}"


@pytest.mark.parametrize(
    ("argv", "forbidden"),
    [
        (
            ["migrate", "--via", "127.0.0.1:1", "sim:a@127.0.0.1:1", "sim:b@127.0.0.1:2"],
            ("trio", "rich", "zstandard", "vfmig.journal"),
        ),
        (["journal", "fetch", "127.0.0.1:1", "r1"], ("trio", "rich", "textual")),
    ],
    ids=["migrate-via", "journal-fetch"],
)
def test_a_blocking_client_of_an_agent_loads_no_trio_and_no_engine(
    tmp_path: object, argv: list[str], forbidden: tuple[str, ...]
) -> None:
    """``vfmig migrate --via`` (ADR 0010) and ``vfmig journal fetch`` are blocking clients of
    the protocol (:mod:`vfmig.cli.agent_client`): their start-up is what a short migration
    pays for, so trio, the engine and rich stay out (the fetch reads journals: their codec
    is in)."""
    setup = "from vfmig.engine.keys import create_key; create_key(pathlib.Path('k'))"
    status, loaded = run_command([*argv, "--key-file", "k", "--json"], tmp_path, setup=setup)
    assert status == "4"  # nobody listens there: the client got as far as connecting
    heavy = [
        m
        for m in loaded
        if m.split(".")[0] in forbidden
        or any(m.startswith(f"{f}.") for f in forbidden)
        or (m.startswith("vfmig.engine.") and m != "vfmig.engine.keys")
    ]
    assert not heavy, f"vfmig {argv[0]} loaded {heavy}"
