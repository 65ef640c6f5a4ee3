"""The flight recorder's default directory: every run journaled, the last N kept.

Theory of operation
-------------------
A run given no ``--journal PATH`` is journaled into the store all the same, as an
aircraft's recorder runs on every flight: ``$XDG_STATE_HOME/vfmig`` (default
``~/.local/state/vfmig``) for a user, ``/var/lib/vfmig`` for root -- root ignores
``XDG_STATE_HOME``, which ``sudo`` may carry over from the user who called it.
``$VFMIG_JOURNAL_DIR`` (an absolute path) overrides both, for root too: it is set on
purpose, never inherited by accident (the test suite points it at a temporary directory).
The directory is created with mode 0700; journals inside have mode 0600.

Names sort by time: ``<UTC yyyymmddThhmmss.ffffff>Z-<role>-<run id>.vfj``. After each new
journal, :meth:`JournalStore.rotate` deletes the oldest ones beyond ``keep`` (default
20); it only ever deletes files of that pattern, so anything else in the directory is
left alone. A journal being written by another process may be deleted by rotation only if
20 newer ones were created meanwhile; its writer keeps writing to the unlinked file.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from vfmig.core.errors import JournalError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from vfmig.journal.codec import JournalHeader
    from vfmig.journal.writer import JournalWriter

DEFAULT_KEEP: Final = 20
SUFFIX: Final = ".vfj"
ROOT_DIR: Final = Path("/var/lib/vfmig")
#: An explicit journal directory, for every user.
ENV_DIR: Final = "VFMIG_JOURNAL_DIR"
_NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[a-z0-9-]+-[A-Za-z0-9_.-]+\.vfj$")
#: Where the role begins in a journal's name: after ``yyyymmddThhmmss.ffffffZ-``.
_TAIL: Final = 24


def default_dir(environ: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """Where journals go without ``--journal`` (see the module docstring)."""
    environ = os.environ if environ is None else environ
    uid = os.geteuid() if uid is None else uid
    explicit = environ.get(ENV_DIR, "")
    if explicit and Path(explicit).is_absolute():
        return Path(explicit)
    if uid == 0:
        return ROOT_DIR
    state = environ.get("XDG_STATE_HOME", "")
    if state and Path(state).is_absolute():  # the XDG spec: ignore a relative path
        return Path(state) / "vfmig"
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "vfmig"


def journal_name(header: JournalHeader) -> str:
    when = _dt.datetime.fromtimestamp(header.start_wall_ns / 1e9, tz=_dt.UTC)
    return f"{when:%Y%m%dT%H%M%S.%f}Z-{_name_tail(header.role, header.run_id)}"


def _name_tail(role: str, run_id: str) -> str:
    """What follows the time in the name of ``role``'s journal of ``run_id``."""
    role = re.sub(r"[^a-z0-9-]", "-", role.lower()) or "run"
    run_id = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id) or "run"
    return f"{role}-{run_id}{SUFFIX}"


class JournalStore:
    """A directory of journals, newest last, at most ``keep`` of them after each run."""

    def __init__(self, directory: Path | None = None, *, keep: int = DEFAULT_KEEP) -> None:
        if keep < 1:
            raise JournalError("the journal store must keep at least one journal")
        self.directory = default_dir() if directory is None else directory
        self.keep = keep

    def _ensure(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(
                f"cannot create the journal directory {self.directory}: {exc.strerror}",
                hint="give --journal PATH, or set XDG_STATE_HOME to a writable directory",
            ) from None

    def journals(self) -> list[Path]:
        """The store's journals, oldest first."""
        try:
            names = sorted(p.name for p in self.directory.iterdir() if _NAME.match(p.name))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise JournalError(f"cannot list {self.directory}: {exc.strerror}") from None
        return [self.directory / n for n in names]

    def latest(self) -> Path:
        """The newest journal (``@last``): of a command run here, not an agent's own
        journal of the same run (agents sharing this host's store write one just after)."""
        journals = self.journals()
        if not journals:
            raise JournalError(
                f"no journal in {self.directory}",
                hint="a run journals there when it is given no --journal PATH",
            )
        ours = [p for p in journals if "Z-agent-" not in p.name]
        return (ours or journals)[-1]

    def find(self, run_id: str, role: str) -> Path | None:
        """The newest journal ``role`` wrote for ``run_id`` in the store (None if none)."""
        tail = _name_tail(role, run_id)
        found = [p for p in self.journals() if p.name[_TAIL:] == tail]
        return found[-1] if found else None

    def place(self, name: str) -> Path:
        """Where the journal another store calls ``name`` goes in this one (the directory
        made if need be)."""
        if not _NAME.fullmatch(name):
            raise JournalError(f"{name!r} is not the name of a journal of a store")
        self._ensure()
        return self.directory / name

    def create(self, header: JournalHeader, **options: Any) -> JournalWriter:
        """A writer of a new journal in the store (mode 0600); older ones beyond keep go."""
        from vfmig.journal.writer import JournalWriter  # the store alone is light to import

        self._ensure()
        writer = JournalWriter.create(self.directory / journal_name(header), header, **options)
        self.rotate()
        return writer

    def rotate(self) -> list[Path]:
        """Delete the oldest journals beyond ``keep``; returns what was deleted."""
        journals = self.journals()
        doomed = journals[: max(len(journals) - self.keep, 0)]
        for path in doomed:
            try:
                path.unlink()
            except FileNotFoundError:
                pass  # another process rotated it first
            except OSError as exc:
                raise JournalError(f"cannot delete old journal {path}: {exc.strerror}") from None
        return doomed
