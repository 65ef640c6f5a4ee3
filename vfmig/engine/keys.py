"""The shared key of an agent and its orchestrator: a small file, created and read carefully.

Theory of operation
-------------------
Agents and orchestrators authenticate each other with a pre-shared key (PSK,
:class:`vfmig.protocol` ``Config.key``): 32 random bytes from the OS. The key file holds
a header line and the key in hex::

    vfmig-key v1
    9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

``vfmig keygen`` writes it with :func:`create_key`. The file is created with mode 0600
at ``open()`` (``O_CREAT | O_EXCL``), so it is never readable by anyone else, not even for
an instant, and an existing file is never overwritten by accident. With ``force`` the new
key goes to a fresh 0600 file beside the old one, which then replaces it in one
``rename()``: a reader sees the old key or the new one, never a mix.

:func:`load_key` refuses a file that group or others may read or write (like ssh refuses
a private key), a file that is not a regular file, and anything that is not exactly the
header and 64 hex digits. The key itself never appears in a message, a repr or a log.

Synchronous and stdlib only; an agent reads its key once at start.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import string
from typing import TYPE_CHECKING, Final

from vfmig.core.errors import ExitStatus, VfmigError

if TYPE_CHECKING:
    from pathlib import Path

#: Bytes of key material (256 bits; the protocol needs at least 16).
KEY_BYTES: Final = 32
#: First line of every key file; the version changes if the format ever does.
HEADER: Final = "vfmig-key v1"
#: A key file is two short lines; anything much larger is not one.
MAX_FILE_SIZE: Final = 4096


class KeyFileError(VfmigError):
    """A key file that cannot be created or used; the message names the file, never the key."""

    exit_status = ExitStatus.USAGE


def render_key(key: bytes) -> bytes:
    """The file content for ``key``."""
    return f"{HEADER}\n{key.hex()}\n".encode("ascii")


def create_key(path: Path, *, force: bool = False) -> None:
    """Write a new random key to ``path``, mode 0600; an existing file only with ``force``."""
    data = render_key(secrets.token_bytes(KEY_BYTES))
    if not path.parent.is_dir():
        raise KeyFileError(
            f"cannot create key file {path}: directory {path.parent} does not exist",
            hint=f"create it first (mkdir -p {path.parent})",
        )
    if not force:
        _write_new(path, path, data)
        return
    if path.is_dir():
        raise KeyFileError(f"cannot create key file {path}: it is a directory")
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.new")
    _write_new(partial, path, data)
    try:
        os.replace(partial, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise KeyFileError(f"cannot replace key file {path}: {exc.strerror}") from None


def _write_new(target: Path, shown: Path, data: bytes) -> None:
    """Create ``target`` (exclusively, 0600 from the start) holding ``data``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(
            f"key file {shown} already exists",
            hint="pass --force to replace it (agents using the old key must get the new one)",
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {shown}: {exc.strerror}") from None
    try:
        # The umask can only take bits away from 0600; make the mode exactly 0600 anyway.
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise KeyFileError(f"cannot write key file {shown}: {exc.strerror}") from None
    os.close(fd)


def load_key(path: Path) -> bytes:
    """The key stored in ``path``; KeyFileError if the file is unsafe or malformed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(
            f"key file {path} does not exist",
            hint=f"create one with: vfmig keygen {path} (and copy it to every host)",
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot open key file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        _check_mode(path, stat.S_IMODE(info.st_mode))
        if info.st_size > MAX_FILE_SIZE:
            raise _malformed(path, f"{info.st_size} bytes, far more than a key")
        data = os.read(fd, MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return _parse(path, data)


def _check_mode(path: Path, mode: int) -> None:
    if mode & 0o044:
        raise KeyFileError(
            f"key file {path} is readable by others (mode {mode:04o})", hint=f"chmod 600 {path}"
        )
    if mode & 0o033:
        raise KeyFileError(
            f"key file {path} is writable or executable by others (mode {mode:04o})",
            hint=f"chmod 600 {path}",
        )


def _malformed(path: Path, what: str) -> KeyFileError:
    return KeyFileError(
        f"key file {path} is not a vfmig key ({what})",
        hint=f"create a new one with: vfmig keygen --force {path}",
    )


def _parse(path: Path, data: bytes) -> bytes:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise _malformed(path, "not ASCII text") from None
    lines = text.splitlines()
    if not lines or lines[0].strip() != HEADER:
        raise _malformed(path, f"the first line is not {HEADER!r}")
    body = [line.strip() for line in lines[1:] if line.strip()]
    if len(body) != 1:
        raise _malformed(path, f"expected one line of {2 * KEY_BYTES} hex digits after the header")
    digits = body[0]
    if len(digits) != 2 * KEY_BYTES:
        raise _malformed(path, f"the key has {len(digits)} hex digits, not {2 * KEY_BYTES}")
    if not all(c in string.hexdigits for c in digits):
        raise _malformed(path, "the key is not hex digits")
    return bytes.fromhex(digits)
