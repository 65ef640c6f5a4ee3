"""The run as one model, folded from records: what the live display, replay and diagnose show.

Theory of operation
-------------------
:func:`reduce` is the one pure reducer ``(RunView, record) -> RunView``. A record is
anything with ``seq``, ``at_ns`` (monotonic time) and ``event``: the engine bus's records
and the journal reader's event records alike, so the live TUI and ``vfmig replay`` fold the
same facts through the same code and cannot disagree (style.md §6, after dolphie). Time
and byte accounting is not repeated here: every record also goes through
:func:`vfmig.core.events.tally`, and :attr:`RunView.summary` is
:func:`vfmig.core.events.summarize` of it.

Per device the model keeps what the last records said: the state by ioctl (open, every
state change) and by debugfs (the last sample), flags, MIG_DATA_SIZE, the last precopy
sample, stream position and end, the last failed ioctl. Run-wide: the phase, the last
:data:`MAX_DECISIONS` decisions, the first :data:`MAX_ERRORS` errors (the first are the
ones that explain a failure; later ones only count), the commit point and the end. The
model is bounded whatever the run's length or state size.

:func:`to_snapshot` and :func:`from_snapshot` turn the model into msgpack-able primitives
and back, so a journal can hold periodic snapshots and a reader can start folding there
instead of from the first record. A snapshot is an optimisation: a reader that cannot use
one folds from the start.

:func:`timeline` says, for one record and the model before it, what a person reading the
run needs to see (phases with the previous phase's throughput, state changes, debugfs
disagreeing with the ioctl state, failed ioctls, decisions, errors, a lost agent with its
devices and side of the commit point, the end); chunk and sample records say nothing
there, they only move the counters.

Pure: stdlib only.
"""

from __future__ import annotations

import collections.abc
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, Protocol

from vfmig.core.errors import errno_name
from vfmig.core.events import (
    ChunkReceived,
    ChunkSent,
    CommitPointPassed,
    DataSizeSampled,
    DebugfsSampled,
    DecisionMade,
    DeviceHung,
    DeviceOpened,
    ErrorRaised,
    Event,
    IoctlCompleted,
    PeerLost,
    PhaseChanged,
    PrecopySampled,
    RunFinished,
    StateChanged,
    StreamEnded,
    StreamStarted,
    Summary,
    SwitchoverAcked,
    Tally,
    Transfer,
    from_record,
    summarize,
    tally,
    to_record,
)
from vfmig.core.fsm import DeviceState, MigrationFlags, flag_names
from vfmig.core.model import DeviceId, Outcome, Phase

if typing.TYPE_CHECKING:
    from collections.abc import Mapping

#: Decisions kept (the newest); errors kept (the oldest). Everything else is per device.
MAX_DECISIONS: Final = 16
MAX_ERRORS: Final = 32


class Observed(Protocol):
    """What :func:`reduce` needs of a record (the bus's Record, the reader's EventRecord)."""

    @property
    def seq(self) -> int: ...

    @property
    def at_ns(self) -> int: ...

    @property
    def event(self) -> Event: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceView:
    state: DeviceState | None = None  #: by ioctl: at open, then every state change
    debugfs: DeviceState | None = None  #: by debugfs: the last sample (None: unreadable)
    debugfs_text: str | None = None  #: the last sample's text; None: never sampled
    flags: MigrationFlags | None = None
    identity: str = ""
    data_size: int | None = None  #: the last MIG_DATA_SIZE (at open or sampled)
    initial: int | None = None  #: the last precopy sample
    dirty: int | None = None
    reinits: int = 0
    chunks: int = 0
    offset: int = 0  #: stream bytes up to the end of the last chunk
    ended: bool = False  #: the final chunk went by (end of stream)
    digest_ok: bool | None = None  #: a destination's end-of-stream digest check
    last_step: str = ""  #: the last state change's step, or the last failed ioctl
    errno: int | None = None  #: the errno of the last failed ioctl (None after a success)
    hung: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RunView:
    records: int = 0
    seq: int | None = None
    at_ns: int | None = None
    phase: Phase | None = None
    devices: Mapping[DeviceId, DeviceView] = field(default_factory=dict)
    decisions: tuple[DecisionMade, ...] = ()
    errors: tuple[ErrorRaised, ...] = ()
    errors_total: int = 0
    committed: bool = False
    finished: RunFinished | None = None
    tally: Tally = field(default_factory=Tally)

    @property
    def summary(self) -> Summary:
        return summarize(self.tally)

    def device(self, dev: DeviceId) -> DeviceView:
        return self.devices.get(dev, _NO_DEVICE)


_NO_DEVICE: Final = DeviceView()


def _dev(model: RunView, dev: DeviceId, **changes: Any) -> Mapping[DeviceId, DeviceView]:
    return {**model.devices, dev: replace(model.device(dev), **changes)}


def reduce(model: RunView, record: Observed) -> RunView:
    """Fold one record into the model (pure)."""
    event = record.event
    at = record.at_ns
    changes: dict[str, Any] = _changes(model, event)
    return replace(
        model,
        records=model.records + 1,
        seq=record.seq,
        at_ns=at if model.at_ns is None else max(model.at_ns, at),
        tally=tally(model.tally, at, event),
        **changes,
    )


def _changes(model: RunView, event: Event) -> dict[str, Any]:
    """The fields ``event`` changes besides the counters and the tally (one replace)."""
    match event:
        case DeviceOpened():
            devices = _dev(
                model,
                event.device,
                state=event.state,
                flags=event.flags,
                identity=event.identity,
                data_size=event.data_size,
            )
            return {"devices": devices}
        case StateChanged():
            devices = _dev(model, event.device, state=event.after, last_step=event.step, errno=None)
            return {"devices": devices}
        case IoctlCompleted():
            if event.errno is None:
                if model.device(event.device).errno is None:
                    return {}
                return {"devices": _dev(model, event.device, errno=None)}
            devices = _dev(model, event.device, last_step=event.name, errno=event.errno)
            return {"devices": devices}
        case DebugfsSampled():
            devices = _dev(model, event.device, debugfs=event.state, debugfs_text=event.text)
            return {"devices": devices}
        case PrecopySampled():
            old = model.device(event.device)
            devices = _dev(
                model,
                event.device,
                initial=event.initial,
                dirty=event.dirty,
                reinits=old.reinits + int(event.reinit),
            )
            return {"devices": devices}
        case DataSizeSampled():
            return {"devices": _dev(model, event.device, data_size=event.size)}
        case ChunkSent() | ChunkReceived():
            old = model.device(event.device)
            devices = _dev(
                model,
                event.device,
                chunks=old.chunks + event.chunks,
                offset=max(old.offset, event.offset + event.raw),
                ended=old.ended or event.final,
            )
            return {"devices": devices}
        case StreamEnded():
            return {"devices": _dev(model, event.device, ended=True, digest_ok=event.digest_ok)}
        case PhaseChanged():
            return {"phase": event.phase}
        case DecisionMade():
            return {"decisions": (*model.decisions, event)[-MAX_DECISIONS:]}
        case ErrorRaised():
            errors = model.errors if len(model.errors) >= MAX_ERRORS else (*model.errors, event)
            return {"errors": errors, "errors_total": model.errors_total + 1}
        case DeviceHung():
            return {"devices": _dev(model, event.device, hung=True)}
        case CommitPointPassed():
            return {"committed": True}
        case RunFinished():
            return {"finished": event}
    return {}


# --- snapshots -------------------------------------------------------------------------------

#: The key type of Tally.marks (the summary's private downtime marks), found by reflection.
_MARK: Final = typing.get_args(
    typing.get_type_hints(Tally, localns={"Mapping": collections.abc.Mapping})["marks"]
)[0]


def _transfer_out(t: Transfer) -> list[int]:
    return [t.time_ns, t.raw_bytes, t.wire_bytes]


def _transfer_in(v: Any) -> Transfer:
    time_ns, raw, wire = v
    return Transfer(time_ns=int(time_ns), raw_bytes=int(raw), wire_bytes=int(wire))


def _device_out(d: DeviceView) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(DeviceView):
        value = getattr(d, f.name)
        if isinstance(value, DeviceState | MigrationFlags):
            value = int(value)
        out[f.name] = value
    return out


_STATE_FIELDS: Final = ("state", "debugfs")


def _device_in(m: Mapping[str, Any]) -> DeviceView:
    known = {f.name for f in fields(DeviceView)}
    values: dict[str, Any] = {k: v for k, v in m.items() if k in known}
    for key in _STATE_FIELDS:
        if values.get(key) is not None:
            values[key] = DeviceState(values[key])
    if values.get("flags") is not None:
        values["flags"] = MigrationFlags(values["flags"])
    return DeviceView(**values)


def to_snapshot(model: RunView) -> dict[str, Any]:
    """The model as msgpack-able primitives (maps with string keys, lists, ints, strings)."""
    t = model.tally
    return {
        "records": model.records,
        "seq": model.seq,
        "at_ns": model.at_ns,
        "phase": model.phase.value if model.phase else None,
        "devices": {str(k): _device_out(v) for k, v in model.devices.items()},
        "decisions": [to_record(e) for e in model.decisions],
        "errors": [to_record(e) for e in model.errors],
        "errors_total": model.errors_total,
        "committed": model.committed,
        "finished": to_record(model.finished) if model.finished else None,
        "tally": {
            "first_ns": t.first_ns,
            "last_ns": t.last_ns,
            "phase": t.phase.value if t.phase else None,
            "phase_since": t.phase_since,
            "phases": {p.value: _transfer_out(v) for p, v in t.phases.items()},
            "devices": {str(k): _transfer_out(v) for k, v in t.devices.items()},
            "spans": {str(k): list(v) for k, v in t.spans.items()},
            "marks": {k.value: v for k, v in t.marks.items()},
            "outcome": t.outcome.value if t.outcome else None,
        },
    }


def from_snapshot(m: Mapping[str, Any]) -> RunView:
    """The inverse of :func:`to_snapshot`; ValueError if ``m`` is not a snapshot it can use."""
    try:
        t = m["tally"]
        acc = Tally(
            first_ns=t["first_ns"],
            last_ns=int(t["last_ns"]),
            phase=Phase(t["phase"]) if t["phase"] else None,
            phase_since=int(t["phase_since"]),
            phases={Phase(k): _transfer_in(v) for k, v in t["phases"].items()},
            devices={DeviceId.parse(k): _transfer_in(v) for k, v in t["devices"].items()},
            spans={DeviceId.parse(k): (int(v[0]), int(v[1])) for k, v in t["spans"].items()},
            marks={_MARK(k): int(v) for k, v in t["marks"].items()},
            outcome=Outcome(t["outcome"]) if t["outcome"] else None,
        )
        decisions = tuple(from_record(r) for r in m["decisions"])
        errors = tuple(from_record(r) for r in m["errors"])
        finished = from_record(m["finished"]) if m["finished"] is not None else None
        if not all(isinstance(e, DecisionMade) for e in decisions):
            raise ValueError("decisions")
        if not all(isinstance(e, ErrorRaised) for e in errors):
            raise ValueError("errors")
        if finished is not None and not isinstance(finished, RunFinished):
            raise ValueError("finished")
        return RunView(
            records=int(m["records"]),
            seq=m["seq"],
            at_ns=m["at_ns"],
            phase=Phase(m["phase"]) if m["phase"] else None,
            devices={DeviceId.parse(k): _device_in(v) for k, v in m["devices"].items()},
            decisions=typing.cast("tuple[DecisionMade, ...]", decisions),
            errors=typing.cast("tuple[ErrorRaised, ...]", errors),
            errors_total=int(m["errors_total"]),
            committed=bool(m["committed"]),
            finished=finished,
            tally=acc,
        )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ValueError(f"unusable snapshot ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # RecordError from a record the snapshot holds
        raise ValueError(f"unusable snapshot ({exc})") from None


# --- the timeline ----------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_ns(ns: float) -> str:
    """``850 us``, ``42.0 ms``, ``3.21 s``."""
    if ns < 1_000_000:
        return f"{ns / 1000:.0f} us"
    if ns < 1_000_000_000:
        return f"{ns / 1_000_000:.1f} ms"
    return f"{ns / 1_000_000_000:.2f} s"


def transfer_text(t: Transfer) -> str:
    """``1.0 GiB in 2.10 s, 487.6 MiB/s, ratio 3.40x``, or just the time without data."""
    if not t.raw_bytes:
        return format_ns(t.time_ns)
    parts = [f"{format_bytes(t.raw_bytes)} in {format_ns(t.time_ns)}"]
    if t.throughput is not None and t.raw_bytes:
        parts.append(f"{format_bytes(t.throughput)}/s")
    if t.ratio is not None:
        parts.append(f"ratio {t.ratio:.2f}x")
    return ", ".join(parts)


def concerns(event: Event, dev: DeviceId) -> bool:
    """Whether ``event`` is about ``dev`` (run-wide events are about no device)."""
    for name in ("device", "source", "destination"):
        if getattr(event, name, None) == dev:
            return True
    return dev in getattr(event, "devices", ())


def _state(s: DeviceState | None) -> str:
    return s.name if s is not None else "unknown"


def timeline(model: RunView, record: Observed) -> list[str]:
    """Lines a person needs for ``record``, given the model *before* it (often none)."""
    event = record.event
    match event:
        case PhaseChanged():
            lines = []
            if model.tally.phase is not None and model.tally.phase is not Phase.FINISHED:
                done = summarize(reduce(model, record).tally).phases.get(model.tally.phase)
                if done is not None:
                    lines.append(f"{model.tally.phase.value} took {transfer_text(done)}")
            lines.append(f"phase {event.phase.value}")
            return lines
        case DeviceOpened():
            size = "unknown" if event.data_size is None else format_bytes(event.data_size)
            return [
                f"{event.device} opened: {event.identity}, flags {flag_names(event.flags)}, "
                f"{event.state.name}, MIG_DATA_SIZE {size}"
            ]
        case StateChanged():
            return [f"{event.device} {event.before.name} -> {event.after.name} ({event.step})"]
        case DebugfsSampled():
            known = model.device(event.device).state
            if event.state is known:
                return []
            return [
                f"{event.device} debugfs reads {event.text.strip() or '(empty)'}, "
                f"ioctl state {_state(known)}"
            ]
        case IoctlCompleted(errno=int(code)):
            args = ", ".join(f"{k}={v}" for k, v in event.args)
            return [
                f"{event.device} {event.name}({args}) failed: {errno_name(code)} "
                f"after {event.duration_ns / 1e6:.1f} ms"
            ]
        case PrecopySampled(reinit=True):
            return [f"{event.device} precopy REINIT: {format_bytes(event.initial)} initial"]
        case StreamStarted():
            return [f"stream {event.source} -> {event.destination} ({event.phase.value})"]
        case SwitchoverAcked():
            return [f"{event.device} acked its initial precopy data"]
        case StreamEnded():
            ok = "digest ok" if event.digest_ok else "DIGEST MISMATCH"
            return [f"{event.device} end of stream: {format_bytes(event.total)}, {ok}"]
        case DecisionMade():
            return [f"decision {event.rule}: {event.text}"]
        case ErrorRaised():
            who = f"{event.device} " if event.device else ""
            errno = f" ({errno_name(event.errno)})" if event.errno is not None else ""
            lines = [f"ERROR {who}[{event.phase.value}] {event.step}: {event.message}{errno}"]
            if event.hint:
                lines.append(f"  hint: {event.hint}")
            return lines
        case DeviceHung():
            target = f" toward {event.target.name}" if event.target else ""
            return [f"{event.device} HUNG in {event.step}{target}, last seen {_state(event.state)}"]
        case CommitPointPassed():
            return [f"commit point passed ({', '.join(map(str, event.devices))})"]
        case PeerLost():
            when = "after" if event.committed else "before"
            devices = ", ".join(map(str, event.devices)) or "no device"
            return [f"LOST agent {event.host} ({devices}) {when} the commit point"]
        case RunFinished():
            return [f"finished: {event.summary} (exit {event.exit_status})"]
    return []
