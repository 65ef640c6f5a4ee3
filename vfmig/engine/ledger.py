"""An agent's durable ledger: the runs it serves and the verdicts it gave, across restarts.

Theory of operation
-------------------
An agent killed in the middle of a run (kill -9, a crash) leaves its devices wherever
they were: STOP_COPY, RESUMING, PRE_COPY... and forgets which side of the commit point
the run was on. The ledger is what the agent writes down so that, restarted, it can bring
those devices back by the failure policy and still answer ``status`` about its runs.

It is one small JSON file per agent (``vfmig agent --state-file``; by default
``agent-HOST-PORT.ledger`` in the journal store's directory, after the listen address so
two agents on one host never share it), mode 0600, rewritten whole and atomically (a
temporary file in the same directory, fsync, rename, fsync of the directory) in a worker
thread at each change that matters:

* a device opened for a run: the run id, the device spec as the agent resolved it (less
  ``vf-token=``, which is a secret), its role and its ids (an older run's entry for the
  same device goes: whoever brought it back by hand settled that run for it);
* a source entering stop-copy, with the destination agent's control address: from then on
  its stream may reach its end, so a destination may be prepared (written before the
  agent starts the stop-copy stream, so a crash can never lose it: the safe direction is
  asking the destination's agent);
* a verdict: committed (the destination's agent writes it before it answers the Commit,
  so a crash after the answer cannot lose it) or not committed (never starts here);
* the run's devices released: the entry goes, the verdict stays for the
  :data:`KEEP_VERDICTS` most recent runs. An entry in doubt stays until a restart resolves it.

Nothing secret is ever written: no key, no ticket, no vf-token. A temporary file left by
a crash mid-write is ignored (the rename never happened) and removed. A file that cannot
be read or decoded is moved aside as ``<name>.corrupt`` and the agent starts with an empty
ledger, after one log line: a bad ledger must not stop an agent from serving.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Final, TypeVar

import trio

from vfmig.core.model import Role
from vfmig.core.spec import DeviceSpec, Options

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

#: Version of the ledger file.
VERSION: Final = 1
#: Verdicts of runs whose devices are released, kept so ``status`` can still answer.
KEEP_VERDICTS: Final = 256
#: Options of a spec never written down.
SECRET_OPTIONS: Final = frozenset({"vf-token"})
SUFFIX: Final = ".ledger"

_T = TypeVar("_T")


class LedgerError(Exception):
    """A ledger file that does not decode (internal: the agent logs it and starts afresh)."""


@dataclass(frozen=True, slots=True)
class LedgerDevice:
    """One device a run holds on this agent."""

    handle: str
    spec: str
    role: Role
    ids: tuple[str, ...]
    #: A source's destination agent (control address), to ask about the commit point.
    peer_control: str | None = None
    #: A source's stream entered stop-copy: it may have reached its end.
    stopcopy: bool = False


@dataclass(frozen=True, slots=True)
class LedgerState:
    """The whole ledger: runs that hold devices here, and recent verdicts (oldest first)."""

    runs: dict[str, tuple[LedgerDevice, ...]] = field(default_factory=dict)
    verdicts: dict[str, bool] = field(default_factory=dict)


def public_spec(spec: DeviceSpec) -> str:
    """``spec`` as text without its secret options."""
    kept = tuple((k, v) for k, v in spec.options if k not in SECRET_OPTIONS)
    return str(replace(spec, options=Options(kept)))


def encode(state: LedgerState) -> bytes:
    runs = {
        run: [
            {
                "handle": d.handle,
                "spec": d.spec,
                "role": d.role.value,
                "ids": list(d.ids),
                "peer_control": d.peer_control,
                "stopcopy": d.stopcopy,
            }
            for d in devices
        ]
        for run, devices in state.runs.items()
    }
    verdicts = [[run, committed] for run, committed in state.verdicts.items()]
    document = {"version": VERSION, "runs": runs, "verdicts": verdicts}
    return json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"


def decode(data: bytes) -> LedgerState:
    """The state a ledger file holds; LedgerError says why it cannot be read."""
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("version") != VERSION:
            raise LedgerError(f"not a version {VERSION} ledger")
        runs: dict[str, tuple[LedgerDevice, ...]] = {}
        for run, devices in _typed(document["runs"], dict).items():
            runs[_typed(run, str)] = tuple(_device(d) for d in _typed(devices, list))
        verdicts: dict[str, bool] = {}
        for item in _typed(document["verdicts"], list):
            run, committed = _typed(item, list)
            verdicts[_typed(run, str)] = _typed(committed, bool)
    except LedgerError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise LedgerError(f"malformed ({type(exc).__name__}: {exc})") from None
    return LedgerState(runs, verdicts)


def _device(item: object) -> LedgerDevice:
    d = _typed(item, dict)
    peer = d["peer_control"]
    return LedgerDevice(
        handle=_typed(d["handle"], str),
        spec=_typed(d["spec"], str),
        role=Role(d["role"]),
        ids=tuple(_typed(i, str) for i in _typed(d["ids"], list)),
        peer_control=None if peer is None else _typed(peer, str),
        stopcopy=_typed(d["stopcopy"], bool),
    )


def _typed(value: object, kind: type[_T]) -> _T:
    if not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__}, found {type(value).__name__}")
    return value


def default_path(directory: Path, host: str, port: int) -> Path:
    """The ledger of the agent listening on ``host:port``, in ``directory``."""
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in host)
    return directory / f"agent-{safe}-{port}{SUFFIX}"


def load(path: Path, log: Callable[[str], None]) -> LedgerState:
    """The ledger at ``path``: empty if there is none; a bad one is moved aside (logged)."""
    with contextlib.suppress(OSError):  # none, or a path that is no good: read says why
        _temp(path).unlink()  # a write torn by a crash: never renamed, never valid
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return LedgerState()
    except OSError as exc:
        log(f"ledger {path}: cannot read it ({exc.strerror or exc}); starting with an empty one")
        return LedgerState()
    try:
        return decode(data)
    except LedgerError as exc:
        aside = path.with_name(path.name + ".corrupt")
        try:
            path.replace(aside)
            kept = f"kept as {aside.name}"
        except OSError as move:
            kept = f"could not move it aside: {move.strerror or move}"
        log(
            f"ledger {path} is unreadable ({exc}); {kept}; starting with an empty one "
            "(devices of runs it named are not recovered: check them with vfmig recover)"
        )
        return LedgerState()


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write(path: Path, state: LedgerState) -> None:
    """Replace the file at ``path`` with ``state``, atomically and durably (blocking)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = _temp(path)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, encode(state))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class Ledger:
    """An agent's ledger, in memory and on disk. Each change returns once it is durable;
    writes are serialized and each writes the whole current state."""

    def __init__(self, path: Path, log: Callable[[str], None]) -> None:
        self.path = path
        self._log = log
        self.state = load(path, log)
        self._lock = trio.Lock()
        self._failed = False

    def committed(self, run: str) -> bool | None:
        """The verdict recorded for ``run``: True committed, False never starts, None none."""
        return self.state.verdicts.get(run)

    async def open_device(self, run: str, device: LedgerDevice) -> None:
        """``device`` opened for ``run``. An older run's entry for the same device goes:
        whoever brought it back (``vfmig recover``) settled that run's doubt for it."""
        for other, devices in tuple(self.state.runs.items()):
            kept = tuple(d for d in devices if d.handle != device.handle)
            if other == run:
                continue
            if kept:
                self.state.runs[other] = kept
            else:
                del self.state.runs[other]
        devices = tuple(d for d in self.state.runs.get(run, ()) if d.handle != device.handle)
        self.state.runs[run] = (*devices, device)
        await self._save()

    async def stopcopy(self, run: str, handle: str, peer_control: str | None) -> None:
        devices = self.state.runs.get(run, ())
        self.state.runs[run] = tuple(
            replace(d, stopcopy=True, peer_control=peer_control) if d.handle == handle else d
            for d in devices
        )
        await self._save()

    async def verdict(self, run: str, committed: bool) -> None:
        self.state.verdicts.pop(run, None)
        self.state.verdicts[run] = committed
        await self._save()

    async def keep_only(self, run: str, handles: set[str], verdict: bool | None) -> None:
        """The run's devices released but ``handles`` (in doubt); ``verdict`` recorded if
        given. A run with no device left is forgotten, its verdict kept among the recent."""
        devices = tuple(d for d in self.state.runs.get(run, ()) if d.handle in handles)
        if devices:
            self.state.runs[run] = devices
        else:
            self.state.runs.pop(run, None)
        if verdict is not None:
            self.state.verdicts.pop(run, None)
            self.state.verdicts[run] = verdict
        self._trim()
        await self._save()

    def _trim(self) -> None:
        verdicts = self.state.verdicts
        for run in list(verdicts):
            if len(verdicts) <= KEEP_VERDICTS:
                break
            if run not in self.state.runs:
                del verdicts[run]

    async def _save(self) -> None:
        async with self._lock:
            snapshot = LedgerState(dict(self.state.runs), dict(self.state.verdicts))
            try:
                await trio.to_thread.run_sync(write, self.path, snapshot)
            except OSError as exc:
                if not self._failed:  # one line, not one per change
                    self._log(
                        f"ledger {self.path}: cannot write it ({exc.strerror or exc}); "
                        "a restart will not recover this agent's devices"
                    )
                self._failed = True
                return
            self._failed = False
