"""``vfmig save DEVICE FILE`` and ``vfmig load FILE DEVICE``: a device's state to a file and back.

No VM and no second host: the device is driven directly through
:class:`~vfmig.device.backend.MigrationDevice`, synchronously, one 1 MiB buffer at a time.

Save: the device must be RUNNING. With PRE_COPY (unless ``--no-precopy``): RUNNING ->
PRE_COPY, read the initial bytes until ``initial_bytes`` is 0, then PRE_COPY ->
STOP_COPY on the same data session; without: RUNNING -> STOP_COPY. Drain to end of stream,
then STOP_COPY -> STOP (never STOP_COPY -> PRE_COPY, which vfmig refuses). The device then
**stays in STOP**: the file is now its state, and a device that ran on would make the file
stale and allow two running copies once it is loaded elsewhere -- the same rule as a
migration's source. ``--resume`` runs it again (STOP -> RUNNING). On any failure the
device is recovered to RUNNING (:func:`vfmig.device.recovery.recover`).

The FILE is a journal (docs/journal.md) whose data records are the stream: it is written
under a temporary name, mode 0600, and appears under FILE only once complete; a failed
save leaves its journal as ``FILE.failed`` for ``vfmig journal diagnose``.

Load: FILE is any journal holding one device's complete stream -- a save, or a migration
journaled with ``--journal-data`` (``--device src<N>`` picks the stream; ``@last`` the
newest journal of the store). The destination must be RUNNING or STOP: -> RESUMING,
write the stream in order, RESUMING -> STOP (the driver validates), -> RUNNING. After a
failed write or a failed validation the device is reset, never stepped out of RESUMING by
a SET. Every GET, SET, reset, sample and chunk of both commands is journaled: ``save``
into FILE itself, ``load`` into ``--journal PATH`` or the default store.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from vfmig import __version__
from vfmig.cli.journal import journal_path
from vfmig.core import events as ev
from vfmig.core.errors import (
    DeviceError,
    ExitStatus,
    JournalError,
    StateChangeError,
    UsageError,
    VfmigError,
)
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.core.model import CAUSES, Cause, DeviceId, Outcome, Phase, Role, destination, source
from vfmig.core.spec import parse_spec
from vfmig.core.view import RunView, format_bytes, format_ns, reduce, timeline
from vfmig.device.recovery import Method, Step, recover
from vfmig.journal.codec import DataRecord, DeviceInfo, EventRecord, JournalHeader
from vfmig.journal.reader import JournalReader
from vfmig.journal.store import JournalStore
from vfmig.journal.writer import JournalWriter

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator

    from vfmig.cli.context import Environment
    from vfmig.core.spec import DeviceSpec
    from vfmig.device.backend import DataSession, MigrationDevice

CHUNK: Final = 1 << 20
#: How long precopy may see "nothing now" while initial_bytes is still above 0.
PRECOPY_PATIENCE_S: Final = 5.0
_FEATURE = "VFIO_DEVICE_FEATURE"
_STATE_ARGS = (("feature", 2),)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    save = sub.add_parser(
        "save",
        help="save a device's migration state to a file (the device stays stopped)",
        description="Stop-copy snapshot of DEVICE into FILE (a journal with the stream), "
        "with precopy where the device has it. The device is left in STOP: --resume runs "
        "it again. On failure the device is brought back to RUNNING.",
    )
    save.add_argument("device", metavar="DEVICE", help="a device spec: vfio:ID or sim:NAME")
    save.add_argument("file", metavar="FILE", type=Path)
    save.add_argument("--resume", action="store_true", help="run the device again afterwards")
    save.add_argument("--no-precopy", action="store_true", help="stop-copy only")
    save.add_argument("--force", action="store_true", help="replace FILE if it exists")
    save.add_argument("--json", action="store_true", help="print a JSON envelope")
    save.set_defaults(run=run_save)

    load = sub.add_parser(
        "load",
        help="load a saved (or journaled) migration state into a device",
        description="Write the stream FILE holds (a save, or a migration journaled with "
        "--journal-data) into DEVICE: RESUMING, the stream in order, STOP (the driver "
        "validates it), RUNNING. On failure the device is reset.",
    )
    load.add_argument("file", metavar="FILE", help="a journal path, or @last")
    load.add_argument("device", metavar="DEVICE", help="a device spec: vfio:ID or sim:NAME")
    load.add_argument("--device", dest="stream", metavar="D", help="whose stream: src<N>")
    load.add_argument("--journal", metavar="PATH", type=Path, help="journal of this load")
    load.add_argument("--json", action="store_true", help="print a JSON envelope")
    load.set_defaults(run=run_load)


# --- journaling the device calls -----------------------------------------------------------


class _Failure(Exception):
    """A step failed; the error was journaled and the device is being brought back."""

    def __init__(self, error: VfmigError, cause: Cause) -> None:
        super().__init__(str(error))
        self.error = error
        self.cause = cause


class _Recorder:
    """Journals every device call of one command and shows the timeline as it goes."""

    def __init__(
        self,
        writer: JournalWriter,
        dev: DeviceId,
        device: MigrationDevice,
        env: Environment,
        *,
        quiet: bool,
    ) -> None:
        self.writer = writer
        self.dev = dev
        self.device = device
        self.env = env
        self.quiet = quiet
        self.model = RunView()
        self.state: DeviceState | None = None
        self.phase: Phase | None = None
        self.chunk_seq = 0

    def emit(self, event: ev.Event) -> None:
        seq = self.writer.append(event)
        record = EventRecord(
            seq=seq, at_ns=self.writer.view.at_ns or 0, wall_ns=0, origin="", event=event
        )
        if not self.quiet:
            for line in timeline(self.model, record):
                self.env.print(f"  {line}")
        self.model = reduce(self.model, record)

    def enter(self, phase: Phase) -> None:
        self.emit(ev.PhaseChanged(phase=phase, previous=self.phase))
        self.phase = phase

    def _ioctl(self, name: str, args: tuple[tuple[str, int], ...], fn: Callable[[], Any]) -> Any:
        start = time.monotonic_ns()
        try:
            result = fn()
        except DeviceError as exc:
            self.emit(
                ev.IoctlCompleted(
                    device=self.dev,
                    name=name,
                    args=args,
                    result=-1,
                    errno=exc.errno,
                    duration_ns=time.monotonic_ns() - start,
                )
            )
            raise
        self.emit(
            ev.IoctlCompleted(
                device=self.dev,
                name=name,
                args=args,
                result=0,
                errno=None,
                duration_ns=time.monotonic_ns() - start,
            )
        )
        return result

    def debugfs(self) -> None:
        reader = self.device.debugfs
        if reader is None:
            return
        start = time.monotonic_ns()
        reading = reader.read_state()
        self.emit(
            ev.DebugfsSampled(
                device=self.dev,
                state=reading.state,
                text=reading.raw,
                duration_ns=time.monotonic_ns() - start,
            )
        )

    def get_state(self) -> DeviceState:
        state: DeviceState = self._ioctl(
            _FEATURE, (*_STATE_ARGS, ("get", 1)), self.device.get_state
        )
        self.state = state
        return state

    def data_size(self) -> int | None:
        try:
            size: int = self._ioctl(_FEATURE, (("feature", 9), ("get", 1)), self.device.data_size)
        except DeviceError:
            return None
        self.emit(ev.DataSizeSampled(device=self.dev, size=size))
        return size

    def set_state(self, target: DeviceState) -> DataSession | None:
        before = self.state if self.state is not None else self.get_state()
        step = f"{before.name}>{target.name}"
        args = (*_STATE_ARGS, ("set", 1), ("device_state", int(target)))
        try:
            session: DataSession | None = self._ioctl(
                _FEATURE, args, lambda: self.device.set_state(target)
            )
        except StateChangeError as exc:
            after = DeviceState(exc.state_after) if exc.state_after is not None else None
            if after is not None and after is not before:
                self.emit(ev.StateChanged(device=self.dev, before=before, after=after, step=step))
            self.state = after
            self.debugfs()
            raise
        self.emit(ev.StateChanged(device=self.dev, before=before, after=target, step=step))
        self.state = target
        self.debugfs()
        return session

    def chunk(self, offset: int, n: int, *, final: bool, sent: bool) -> None:
        kind = ev.ChunkSent if sent else ev.ChunkReceived
        self.emit(
            kind(device=self.dev, seq=self.chunk_seq, offset=offset, raw=n, wire=n, final=final)
        )
        self.chunk_seq += 1

    def error(self, cause: Cause, step: str, exc: VfmigError, errno: int | None) -> None:
        known = CAUSES[cause]
        assert self.phase is not None
        self.emit(
            ev.ErrorRaised(
                device=self.dev,
                phase=self.phase,
                step=step,
                errno=errno,
                cause=cause,
                message=f"{known.explanation} ({exc.message})",
                hint=known.hint,
            )
        )

    def recovery_step(self, step: Step) -> None:
        """Journal one step of :func:`recover` (its own SETs, resets and GETs)."""
        if step.method is Method.READ:
            args: tuple[tuple[str, int], ...] = (*_STATE_ARGS, ("get", 1))
            name = _FEATURE
        elif step.method is Method.RESET:
            args, name = (), "VFIO_DEVICE_RESET"
        else:
            target = step.request.split(">")[-1]
            args = (*_STATE_ARGS, ("set", 1), ("device_state", int(DeviceState[target])))
            name = _FEATURE
        self.emit(
            ev.IoctlCompleted(
                device=self.dev,
                name=name,
                args=args,
                result=0 if step.ok else -1,
                errno=step.errno,
                duration_ns=0,
            )
        )
        if step.before is not None and step.after is not None and step.after is not step.before:
            self.emit(
                ev.StateChanged(
                    device=self.dev, before=step.before, after=step.after, step=step.request
                )
            )
        self.state = step.after

    def reset(self) -> None:
        before = self.state
        self._ioctl("VFIO_DEVICE_RESET", (), self.device.reset)
        if before is not None and before is not DeviceState.RUNNING:
            self.emit(
                ev.StateChanged(
                    device=self.dev, before=before, after=DeviceState.RUNNING, step="reset"
                )
            )
        self.state = DeviceState.RUNNING
        self.debugfs()

    def finish(self, outcome: Outcome, text: str) -> None:
        self.enter(Phase.FINISHED)
        self.emit(
            ev.RunFinished(outcome=outcome, exit_status=int(outcome.exit_status), summary=text)
        )


def _header(role: str, devices: tuple[DeviceInfo, ...], *, data: bool) -> JournalHeader:
    return JournalHeader(
        host=socket.gethostname(),
        role=role,
        run_id=uuid.uuid4().hex[:12],
        kernel=platform.release(),
        start_wall_ns=time.time_ns(),
        start_mono_ns=time.monotonic_ns(),
        devices=devices,
        data=data,
        vfmig=__version__,
    )


def _identity(device: MigrationDevice) -> str:
    return f"{socket.gethostname()}:{device.kind}:{device.name}"


def _default_opener(spec: DeviceSpec) -> MigrationDevice:
    from vfmig.device.open import open_device  # the sim or vfio backend, loaded on demand

    return open_device(spec)


def _error_json(exc: VfmigError) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc), "hint": exc.hint}


# --- save ------------------------------------------------------------------------------------


@dataclass
class _Saved:
    total: int = 0
    precopy: int = 0
    final: DeviceState | None = None


def run_save(
    args: argparse.Namespace,
    env: Environment,
    *,
    opener: Callable[[DeviceSpec], MigrationDevice] = _default_opener,
) -> int:
    spec = parse_spec(args.device)
    target: Path = args.file
    if target.exists() and not args.force:
        raise UsageError(f"{target} already exists", hint="give another FILE, or --force")
    if not target.parent.is_dir():
        raise UsageError(f"{target.parent} is not a directory")
    quiet = args.json
    with opener(spec) as device:
        dev = source(0)
        info = DeviceInfo(id=dev, spec=str(spec), identity=_identity(device), flags=device.flags)
        header = _header("save", (info,), data=True)
        partial = target.parent / f".{target.name}.{header.run_id}.partial"
        if not quiet:
            env.print(f"saving {spec} to {target}")
        started = time.monotonic_ns()
        with JournalWriter.create(partial, header) as writer:
            rec = _Recorder(writer, dev, device, env, quiet=quiet)
            saved = _Saved()
            try:
                _save(rec, device, saved, precopy=not args.no_precopy, resume=args.resume)
            except _Failure as failure:
                _recover_source(rec, device, failure)
                writer.close()
                kept = target.with_name(target.name + ".failed")
                os.replace(partial, kept)
                if args.json:
                    env.emit_json("save", {"journal": str(kept)}, error=_error_json(failure.error))
                else:
                    env.print(f"the journal of this failed save is {kept} (vfmig journal diagnose)")
                raise failure.error from None
            except BaseException:
                writer.close()
                with contextlib.suppress(OSError):
                    partial.unlink()
                raise
        if args.force:
            os.replace(partial, target)
        else:
            try:
                os.link(partial, target)
            except FileExistsError:
                raise UsageError(f"{target} appeared meanwhile; the save is in {partial}") from None
            partial.unlink()
    elapsed = time.monotonic_ns() - started
    size = target.stat().st_size
    final = saved.final.name if saved.final else "unknown"
    if args.json:
        env.emit_json(
            "save",
            {
                "file": str(target),
                "device": str(spec),
                "stream_bytes": saved.total,
                "precopy_bytes": saved.precopy,
                "file_bytes": size,
                "elapsed_ns": elapsed,
                "state": final,
            },
        )
    else:
        env.print(
            f"saved {format_bytes(saved.total)} of state in {format_ns(elapsed)} to {target} "
            f"({format_bytes(size)}); the device is {final}"
            + ("" if args.resume else " (--resume would have run it again)")
        )
    return int(ExitStatus.OK)


def _check(rec: _Recorder, cause: Cause, step: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except VfmigError as exc:
        errno = exc.errno if isinstance(exc, DeviceError) else None
        rec.error(cause, step, exc, errno)
        raise _Failure(exc, cause) from exc


def _save(
    rec: _Recorder, device: MigrationDevice, saved: _Saved, *, precopy: bool, resume: bool
) -> None:
    rec.enter(Phase.PREFLIGHT)
    state = _check(rec, Cause.OPEN_FAILED, "GET device state", rec.get_state)
    size = rec.data_size()
    rec.emit(
        ev.DeviceOpened(
            device=rec.dev,
            identity=_identity(device),
            flags=device.flags,
            state=state,
            data_size=size,
        )
    )
    rec.debugfs()
    if state is not DeviceState.RUNNING:
        error = DeviceError(
            device.name,
            "save",
            f"found in {state.name}, expected RUNNING",
            hint="bring it back first: vfmig recover",
        )
        rec.error(Cause.LEFTOVER_STATE, "preflight", error, None)
        raise _Failure(error, Cause.LEFTOVER_STATE)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    session: DataSession | None
    if precopy and MigrationFlags.PRE_COPY in device.flags:
        rec.enter(Phase.PRECOPY)
        session = _check(
            rec, Cause.SET_FAILED, "RUNNING>PRE_COPY", lambda: rec.set_state(DeviceState.PRE_COPY)
        )
        assert session is not None
        saved.precopy = _read_precopy(rec, session, view)
        saved.total = saved.precopy
        rec.enter(Phase.SWITCHOVER)
        _check(
            rec,
            Cause.SET_FAILED,
            "PRE_COPY>STOP_COPY",
            lambda: rec.set_state(DeviceState.STOP_COPY),
        )
        session = device.session
    else:
        rec.enter(Phase.SWITCHOVER)
        session = _check(
            rec, Cause.SET_FAILED, "RUNNING>STOP_COPY", lambda: rec.set_state(DeviceState.STOP_COPY)
        )
    if session is None:
        error = DeviceError(device.name, "STOP_COPY", "no data session after entering STOP_COPY")
        rec.error(Cause.READ_FAILED, "STOP_COPY", error, None)
        raise _Failure(error, Cause.READ_FAILED)
    rec.enter(Phase.STOPCOPY)
    saved.total = _drain(rec, session, view, saved.total)
    rec.enter(Phase.COMMIT)
    _check(rec, Cause.PARK_FAILED, "STOP_COPY>STOP", lambda: rec.set_state(DeviceState.STOP))
    if resume:
        _check(rec, Cause.SET_FAILED, "STOP>RUNNING", lambda: rec.set_state(DeviceState.RUNNING))
    saved.final = rec.state
    rec.finish(
        Outcome.COMPLETED,
        f"saved {saved.total} bytes; the device is {rec.state.name if rec.state else 'unknown'}",
    )


def _read_precopy(rec: _Recorder, session: DataSession, view: memoryview) -> int:
    """Read the initial precopy bytes; returns how many were read."""
    offset = 0
    idle_since: float | None = None
    while True:
        info = _check(rec, Cause.PRECOPY_INFO_FAILED, "precopy info", session.precopy_info)
        rec.emit(
            ev.PrecopySampled(
                device=rec.dev,
                initial=info.initial_bytes,
                dirty=info.dirty_bytes,
                reinit=info.reinit,
            )
        )
        if info.initial_bytes == 0:
            return offset
        want = min(CHUNK, info.initial_bytes)
        n = _check(
            rec,
            Cause.READ_FAILED,
            f"data read at offset {offset}",
            lambda: session.readinto(view[:want]),  # noqa: B023 -- called at once
        )
        if not n:
            now = time.monotonic()
            idle_since = idle_since or now
            if now - idle_since > PRECOPY_PATIENCE_S:
                rec.emit(
                    ev.DecisionMade(
                        rule="precopy-idle",
                        numbers=(("initial_bytes", float(info.initial_bytes)),),
                        text=f"the device reports {info.initial_bytes} initial bytes but "
                        f"gives none for {PRECOPY_PATIENCE_S:g} s: going on to stop-copy",
                    )
                )
                return offset
            time.sleep(0.001)
            continue
        idle_since = None
        rec.writer.append_data(rec.dev, offset, view[:n])
        rec.chunk(offset, n, final=False, sent=True)
        offset += n


def _drain(rec: _Recorder, session: DataSession, view: memoryview, offset: int) -> int:
    """Read the stop-copy stream to its end; returns the stream's total length."""
    while True:
        n = _check(
            rec, Cause.READ_FAILED, f"data read at offset {offset}", lambda: session.readinto(view)
        )
        if n is None:  # EAGAIN on a non-blocking fd: nothing yet
            time.sleep(0.001)
            continue
        if n == 0:
            rec.chunk(offset, 0, final=True, sent=True)
            return offset
        rec.writer.append_data(rec.dev, offset, view[:n])
        rec.chunk(offset, n, final=False, sent=True)
        offset += n


def _recover_source(rec: _Recorder, device: MigrationDevice, failure: _Failure) -> None:
    if failure.cause is Cause.LEFTOVER_STATE:
        rec.finish(Outcome.REFUSED, f"refused: {failure.error.message}")
        return
    rec.enter(Phase.ROLLBACK)
    report = recover(device, observer=rec.recovery_step)
    if not report.ok:
        rec.emit(
            ev.ErrorRaised(
                device=rec.dev,
                phase=Phase.ROLLBACK,
                step="recover",
                errno=None,
                cause=Cause.RECOVERY_FAILED,
                message=CAUSES[Cause.RECOVERY_FAILED].explanation,
                hint=CAUSES[Cause.RECOVERY_FAILED].hint,
            )
        )
    rec.finish(Outcome.FAILED, f"failed: {failure.error.message}")


# --- load ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Stream:
    device: DeviceId
    total: int
    source_size: int | None
    source_spec: str


def _pick_stream(reader: JournalReader, wanted: str | None) -> DeviceId:
    if wanted is not None:
        try:
            dev = DeviceId.parse(wanted)
        except ValueError as exc:
            raise UsageError(f"--device: {exc}") from None
        if dev.role is not Role.SOURCE:
            raise UsageError("--device names the source whose stream to load (src<N>)")
        return dev
    sources = [d.id for d in reader.header.devices if d.id.role is Role.SOURCE]
    if len(sources) != 1:
        raise UsageError(
            f"{reader.path} holds {len(sources)} source devices",
            hint="choose one with --device src<N>",
        )
    return sources[0]


def _check_stream(reader: JournalReader, dev: DeviceId) -> _Stream:
    """One pass: the stream's data records are contiguous from 0 and reach its end."""
    if not reader.header.data:
        raise JournalError(
            f"{reader.path} holds no device data",
            hint="save with 'vfmig save', or journal a migration with --journal-data",
        )
    expected = 0
    end: int | None = None
    source_size: int | None = None
    for entry in reader.entries():
        if isinstance(entry, DataRecord) and entry.device == dev:
            if entry.offset != expected:
                raise JournalError(
                    f"{reader.path}: {dev}'s data jumps from offset {expected} to {entry.offset}"
                )
            expected += len(entry.data)
        elif isinstance(entry, EventRecord):
            e = entry.event
            if isinstance(e, ev.ChunkSent) and e.device == dev and e.final:
                end = e.offset + e.raw
            elif isinstance(e, ev.DeviceOpened) and e.device == dev:
                source_size = e.data_size
    status = reader.status
    if status.damage is not None or status.gaps:
        raise JournalError(
            f"{reader.path} is damaged "
            f"({status.damage.reason if status.damage else 'records missing'})",
            hint="vfmig journal verify tells how much of it is good",
        )
    if end is None:
        raise JournalError(
            f"{reader.path} holds {expected} bytes of {dev}'s stream but not its end: the save or "
            "migration stopped before the source's end of stream",
            hint="a partial stream never loads (RESUMING>STOP would reject it)",
        )
    if end != expected:
        raise JournalError(
            f"{reader.path}: {dev}'s stream ends at {end} but its data at {expected}"
        )
    info = reader.header.device(dev)
    return _Stream(dev, expected, source_size, info.spec if info else str(dev))


def _data(reader: JournalReader, dev: DeviceId) -> Iterator[DataRecord]:
    return reader.data(dev)


def run_load(
    args: argparse.Namespace,
    env: Environment,
    *,
    opener: Callable[[DeviceSpec], MigrationDevice] = _default_opener,
    store: JournalStore | None = None,
) -> int:
    spec = parse_spec(args.device)
    quiet = args.json
    with JournalReader(journal_path(args.file)) as reader:
        stream = _check_stream(reader, _pick_stream(reader, args.stream))
        with opener(spec) as device:
            dev = destination(0)
            infos = (
                DeviceInfo(id=stream.device, spec=stream.source_spec),
                DeviceInfo(id=dev, spec=str(spec), identity=_identity(device), flags=device.flags),
            )
            header = _header("load", infos, data=False)
            if args.journal is not None:
                writer = JournalWriter.create(args.journal, header)
            else:
                writer = (store or JournalStore()).create(header)
            if not quiet:
                env.print(
                    f"loading {stream.device}'s stream ({format_bytes(stream.total)}) "
                    f"from {reader.path} into {spec}"
                )
            started = time.monotonic_ns()
            with writer:
                rec = _Recorder(writer, dev, device, env, quiet=quiet)
                try:
                    _load(rec, device, reader, stream)
                except _Failure as failure:
                    _reset_destination(rec, failure)
                    if args.json:
                        env.emit_json(
                            "load", {"journal": str(writer.path)}, error=_error_json(failure.error)
                        )
                    else:
                        env.print(
                            f"the journal of this load is {writer.path} (vfmig journal diagnose)"
                        )
                    raise failure.error from None
    elapsed = time.monotonic_ns() - started
    if args.json:
        env.emit_json(
            "load",
            {
                "device": str(spec),
                "stream_bytes": stream.total,
                "elapsed_ns": elapsed,
                "journal": str(writer.path),
            },
        )
    else:
        env.print(
            f"loaded {format_bytes(stream.total)} in {format_ns(elapsed)}; {spec} is RUNNING "
            f"(journal: {writer.path})"
        )
    return int(ExitStatus.OK)


def _load(rec: _Recorder, device: MigrationDevice, reader: JournalReader, stream: _Stream) -> None:
    rec.enter(Phase.PREFLIGHT)
    state = _check(rec, Cause.OPEN_FAILED, "GET device state", rec.get_state)
    size = rec.data_size()
    rec.emit(
        ev.DeviceOpened(
            device=rec.dev,
            identity=_identity(device),
            flags=device.flags,
            state=state,
            data_size=size,
        )
    )
    rec.debugfs()
    if state not in (DeviceState.RUNNING, DeviceState.STOP):
        error = DeviceError(
            device.name,
            "load",
            f"found in {state.name}, expected RUNNING or STOP",
            hint="bring it back first: vfmig recover",
        )
        rec.error(Cause.LEFTOVER_STATE, "preflight", error, None)
        raise _Failure(error, Cause.LEFTOVER_STATE)
    sizes_differ = (
        size is not None and stream.source_size is not None and size != stream.source_size
    )
    if sizes_differ:
        rec.emit(
            ev.DecisionMade(
                rule="size-estimate",
                numbers=(
                    ("source_bytes", float(stream.source_size or 0)),
                    ("destination_bytes", float(size or 0)),
                ),
                text=f"the stream's source estimated {stream.source_size} bytes of state, this "
                f"device {size}: going on, MIG_DATA_SIZE is only an estimate",
            )
        )
    rec.enter(Phase.SETUP)
    session = _check(
        rec, Cause.SET_FAILED, f"{state.name}>RESUMING", lambda: rec.set_state(DeviceState.RESUMING)
    )
    assert session is not None
    rec.enter(Phase.STOPCOPY)
    refused = Cause.SIZE_MISMATCH if sizes_differ else Cause.WRITE_REFUSED
    for record in _data(reader, stream.device):
        view = memoryview(record.data)
        written = 0
        while written < len(view):
            offset = record.offset + written
            n = _check(
                rec,
                refused,
                f"data write at offset {offset}",
                lambda: session.write(view[written:]),  # noqa: B023 -- called at once
            )
            written += n
        rec.chunk(
            record.offset, len(view), final=record.offset + len(view) == stream.total, sent=False
        )
    rec.emit(ev.StreamEnded(device=rec.dev, total=stream.total, digest_ok=True))
    rec.enter(Phase.RESUME)
    rejected = Cause.SIZE_MISMATCH if sizes_differ else Cause.STREAM_REJECTED
    _check(rec, rejected, "RESUMING>STOP", lambda: rec.set_state(DeviceState.STOP))
    rec.enter(Phase.COMMIT)
    _check(rec, Cause.START_FAILED, "STOP>RUNNING", lambda: rec.set_state(DeviceState.RUNNING))
    rec.finish(Outcome.COMPLETED, f"loaded {stream.total} bytes; the device runs")


def _reset_destination(rec: _Recorder, failure: _Failure) -> None:
    if failure.cause is Cause.LEFTOVER_STATE:
        rec.finish(Outcome.REFUSED, f"refused: {failure.error.message}")
        return
    rec.enter(Phase.ROLLBACK)
    if rec.state is not DeviceState.RUNNING or failure.cause is Cause.START_FAILED:
        try:
            rec.reset()  # never a SET out of RESUMING after a failed write or validation
        except DeviceError as exc:
            rec.error(Cause.RESET_FAILED, "reset", exc, exc.errno)
    rec.finish(Outcome.FAILED, f"failed: {failure.error.message}")
