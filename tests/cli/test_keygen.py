"""``vfmig keygen`` and the key file rules of :mod:`vfmig.engine.keys`."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
from typing import TYPE_CHECKING

import pytest

from vfmig.cli.context import Environment
from vfmig.cli.main import main
from vfmig.engine.keys import HEADER, KEY_BYTES, KeyFileError, create_key, load_key, render_key

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), Environment(stdout=out, stderr=err, stdout_isatty=False))
    return status, out.getvalue(), err.getvalue()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """A umask that lets everyone read new files (the worst case keygen must resist)."""
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.mark.usefixtures("loose_umask")
def test_keygen_writes_a_private_key_and_never_prints_it(tmp_path: Path) -> None:
    path = tmp_path / "vfmig.key"
    status, out, err = run("keygen", str(path))
    assert (status, err) == (0, "")
    assert mode(path) == 0o600
    key = load_key(path)
    assert len(key) == KEY_BYTES
    assert key.hex() not in out
    assert path.read_text() == f"{HEADER}\n{key.hex()}\n"
    assert f"wrote a new 256-bit key to {path} (mode 0600)" in out


def test_two_keys_differ(tmp_path: Path) -> None:
    create_key(tmp_path / "a")
    create_key(tmp_path / "b")
    assert load_key(tmp_path / "a") != load_key(tmp_path / "b")


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "vfmig.key"
    create_key(path)
    before = path.read_bytes()
    status, _, err = run("keygen", str(path))
    assert status == 2
    assert err.splitlines() == [
        f"vfmig: error: key file {path} already exists",
        "hint: pass --force to replace it (agents using the old key must get the new one)",
    ]
    assert path.read_bytes() == before


@pytest.mark.usefixtures("loose_umask")
def test_force_replaces_the_key_and_a_loose_mode(tmp_path: Path) -> None:
    path = tmp_path / "vfmig.key"
    path.write_text("old, and readable by all\n")
    path.chmod(0o644)
    status, _, err = run("keygen", "--force", str(path))
    assert (status, err) == (0, "")
    assert mode(path) == 0o600
    assert len(load_key(path)) == KEY_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vfmig.key"]  # no partial file left


@pytest.mark.usefixtures("loose_umask")
def test_force_never_exposes_a_readable_file(tmp_path: Path) -> None:
    """While keygen --force runs, every file in the directory is 0600 whenever it is seen."""
    path = tmp_path / "vfmig.key"
    create_key(path)
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for entry in tmp_path.iterdir():
                with contextlib.suppress(FileNotFoundError):  # replaced meanwhile
                    seen.add(stat.S_IMODE(entry.stat().st_mode))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(50):
            create_key(path, force=True)
    finally:
        stop.set()
        watcher.join()
    assert seen == {0o600}


def test_keygen_into_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "vfmig.key"
    status, _, err = run("keygen", str(path))
    assert status == 2
    assert f"directory {path.parent} does not exist" in err
    assert f"hint: create it first (mkdir -p {path.parent})" in err


def test_keygen_does_not_follow_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "vfmig.key").symlink_to(target)
    status, _, err = run("keygen", str(tmp_path / "vfmig.key"))
    assert status == 2
    assert "already exists" in err
    assert not target.exists()


@pytest.mark.parametrize(
    ("bits", "words"),
    [(0o644, "readable by others"), (0o640, "readable by others"), (0o620, "writable")],
)
def test_load_refuses_a_key_others_can_touch(tmp_path: Path, bits: int, words: str) -> None:
    path = tmp_path / "vfmig.key"
    create_key(path)
    path.chmod(bits)
    with pytest.raises(KeyFileError) as caught:
        load_key(path)
    assert str(caught.value).startswith(f"key file {path} is {words}")
    assert f"(mode {bits:04o})" in str(caught.value)
    assert caught.value.hint == f"chmod 600 {path}"


def test_the_refusal_names_the_mode_as_the_brief_says(tmp_path: Path) -> None:
    path = tmp_path / "k"
    create_key(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError) as caught:
        load_key(path)
    assert f"{caught.value}: {caught.value.hint}" == (
        f"key file {path} is readable by others (mode 0644): chmod 600 {path}"
    )


def test_a_stricter_mode_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "k"
    create_key(path)
    path.chmod(0o400)
    assert len(load_key(path)) == KEY_BYTES


GOOD = "ab" * KEY_BYTES


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "the first line is not 'vfmig-key v1'"),
        (GOOD.encode() + b"\n", "the first line is not 'vfmig-key v1'"),
        (f"{HEADER}\n".encode(), "expected one line of 64 hex digits after the header"),
        (
            f"{HEADER}\n{GOOD}\n{GOOD}\n".encode(),
            "expected one line of 64 hex digits after the header",
        ),
        (f"{HEADER}\n{GOOD[:-2]}\n".encode(), "the key has 62 hex digits, not 64"),
        (f"{HEADER}\n{GOOD[:-1]}g\n".encode(), "the key is not hex digits"),
        (f"{HEADER}\n{GOOD[:31]} {GOOD[32:]}\n".encode(), "the key is not hex digits"),
        (b"\xff\xfe" + GOOD.encode(), "not ASCII text"),
        (b"x" * 5000, "5000 bytes, far more than a key"),
    ],
)
def test_load_refuses_a_malformed_file(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as caught:
        load_key(path)
    assert str(caught.value) == f"key file {path} is not a vfmig key ({why})"
    assert caught.value.hint == f"create a new one with: vfmig keygen --force {path}"


def test_load_accepts_what_render_writes_with_blank_lines_and_crlf(tmp_path: Path) -> None:
    key = bytes(range(KEY_BYTES))
    path = tmp_path / "k"
    path.write_bytes(render_key(key).replace(b"\n", b"\r\n") + b"\r\n")
    path.chmod(0o600)
    assert load_key(path) == key


def test_load_errors_for_a_missing_file_and_a_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as caught:
        load_key(tmp_path / "absent")
    assert caught.value.hint == f"create one with: vfmig keygen {tmp_path / 'absent'} " + (
        "(and copy it to every host)"
    )
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="is not a regular file"):
        load_key(tmp_path / "dir")
