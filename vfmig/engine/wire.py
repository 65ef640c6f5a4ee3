"""What the engine puts inside the protocol's RPC results and Notification payloads.

Theory of operation
-------------------
The protocol fixes the methods and the shapes of their parameters (``vfmig.protocol``
``METHODS``, docs/protocol.md §6) and leaves results and notification payloads to the
engine. This module is that half of the contract, written once for both ends:

* **Parameters beyond the table.** The protocol ignores extra parameters, so the engine
  adds what it needs: ``timeout`` (seconds a device step may take before it counts as
  hung), ``ticket``/``phase``/``level``/``peer_control`` for ``start_send``, ``bind`` for
  ``start_receive``, ``run`` for ``status``. ``open_device`` carries the run id and the
  device's id in the run (``src0``) in its ``options`` map.
* **Results** are small msgpack maps (:class:`Opened`, :class:`SetAnswer`, ...). A device
  that refuses a SET is an answer (``ok: false`` with the state read back), not an
  error: the phase machine decides recovery from it.
* **Errors** travel as ErrorResponse with one of :class:`Code` and the device's errno.
* **Notifications** carry the run id and one of: an event record
  (:func:`vfmig.core.events.to_record`: chunks, stream ends, switchover acks), a stream
  progress sample, or a :class:`Fact` -- a stream failure the machine must hear about.
  An agent sends chunk progress in batches (``{"batch": [notice, ...]}``, in order): one
  frame per few milliseconds of a stream instead of one per chunk; anything else is sent
  at once, after the batch it would otherwise overtake. A batch is folded first
  (:func:`coalesce`): a device's chunk events become one record covering them all, its
  progress samples the latest, so what the orchestrator handles grows with time and
  devices, not with bytes (the agent's own journal keeps every chunk).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from vfmig.core.events import (
    ChunkReceived,
    ChunkSent,
    Downtime,
    Event,
    RecordError,
    Summary,
    Transfer,
    from_record,
    to_record,
)
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.core.model import DeviceId, Outcome, Phase

if TYPE_CHECKING:
    from vfmig.protocol import Value


class Code(enum.StrEnum):
    """ErrorResponse codes the agent answers with."""

    UNKNOWN_METHOD = "unknown_method"  #: the agent does not serve this method
    BAD_PARAMS = "bad_params"  #: a parameter the engine needs is missing or wrong
    BAD_SPEC = "bad_spec"  #: the device spec does not parse or is not for this host
    NOT_ALLOWED = "not_allowed"  #: the agent's --allow list does not name the device
    BUSY = "busy"  #: another migration holds the device
    UNKNOWN_DEVICE = "unknown_device"  #: no such device is open for this orchestrator
    REFUSED = "refused"  #: vfmig refuses the request (fsm.vfmig_refusal)
    HUNG = "hung"  #: the device did not return within the step timeout
    FAILED = "failed"  #: the device operation failed (errno)
    DECIDED = "decided"  #: the run was already decided otherwise (a late commit)
    NOT_FOUND = "not_found"  #: no such journal here (fetch_journal)


class Verdict(enum.StrEnum):
    """What an agent knows of a run's commit point (``status`` with ``run``)."""

    COMMITTED = "committed"  #: the Commit reached this agent
    NOT_COMMITTED = "not committed"  #: final: this agent will never start the run's devices
    UNDECIDED = "undecided"  #: the run is still in progress here
    UNKNOWN = "unknown"  #: this agent has never heard of the run


class FactKind(enum.StrEnum):
    READ_FAILED = "read_failed"  #: the source's data read failed
    WRITE_FAILED = "write_failed"  #: the destination refused a write: the stream stopped
    LINK_FAILED = "link_failed"  #: the data link broke before the end of the stream
    CONNECT_FAILED = "connect_failed"  #: the source could not reach the destination
    HUNG = "hung"  #: a data read or write did not return within the step timeout


@dataclass(frozen=True, slots=True, kw_only=True)
class Fact:
    kind: FactKind
    device: DeviceId
    errno: int | None
    offset: int
    message: str
    step: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """Cumulative counts of one source's stream; ``busy_ns`` excludes waiting for data."""

    device: DeviceId
    raw: int
    wire: int
    busy_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Notice:
    """A decoded notification: exactly one of ``event``, ``progress``, ``fact``."""

    run: str
    event: Event | None = None
    progress: Progress | None = None
    fact: Fact | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Opened:
    """``open_device``'s result."""

    handle: str  #: what later calls name the device by
    identity: str  #: host-qualified: equal identities are the same device
    flags: MigrationFlags
    state: DeviceState
    data_size: int | None
    #: The debugfs ``state`` file read right after the GET (None: the device has none).
    debugfs: DebugfsSample | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DebugfsSample:
    state: DeviceState | None  #: None when the file gave no state (``text`` says why)
    text: str
    duration_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SetAnswer:
    """``set_state``'s result: reached, or refused by the device with the state read back."""

    ok: bool
    state: DeviceState | None
    errno: int | None
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Listener:
    """``start_receive``'s result: where the source connects and the one-time ticket."""

    host: str | None  #: None: the agent listens on every address; use the one you know
    port: int
    ticket: str


class WireError(ValueError):
    """A result or payload that does not have the engine's shape."""


def _get(data: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise WireError(f"missing {key!r} in {data!r:.80}")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(f"{key!r} has the wrong type in {data!r:.80}")
    return value


def _opt_int(data: Any, key: str) -> int | None:
    value = data.get(key) if isinstance(data, dict) else None
    if value is None:
        return None
    if type(value) is not int:
        raise WireError(f"{key!r} is not an int in {data!r:.80}")
    return value


def _state(value: int) -> DeviceState:
    try:
        return DeviceState(value)
    except ValueError:
        raise WireError(f"{value} is not a device state") from None


# --- results --------------------------------------------------------------------------------


def opened_result(o: Opened) -> dict[str, Value]:
    result: dict[str, Value] = {
        "handle": o.handle,
        "identity": o.identity,
        "flags": int(o.flags),
        "state": int(o.state),
        "data_size": o.data_size,
    }
    if o.debugfs is not None:
        d = o.debugfs
        result["debugfs"] = {
            "state": None if d.state is None else int(d.state),
            "text": d.text,
            "duration_ns": d.duration_ns,
        }
    return result


def parse_opened(value: Value) -> Opened:
    debugfs: DebugfsSample | None = None
    if isinstance(value, dict) and isinstance(value.get("debugfs"), dict):
        d = value["debugfs"]
        state = _opt_int(d, "state")
        debugfs = DebugfsSample(
            state=None if state is None else _state(state),
            text=_get(d, "text", str),
            duration_ns=_get(d, "duration_ns", int),
        )
    return Opened(
        handle=_get(value, "handle", str),
        identity=_get(value, "identity", str),
        flags=MigrationFlags(_get(value, "flags", int)),
        state=_state(_get(value, "state", int)),
        data_size=_opt_int(value, "data_size"),
        debugfs=debugfs,
    )


def set_result(a: SetAnswer) -> dict[str, Value]:
    return {
        "ok": a.ok,
        "state": None if a.state is None else int(a.state),
        "errno": a.errno,
        "message": a.message,
    }


def parse_set(value: Value) -> SetAnswer:
    state = _opt_int(value, "state")
    return SetAnswer(
        ok=_get(value, "ok", bool),
        state=None if state is None else _state(state),
        errno=_opt_int(value, "errno"),
        message=_get(value, "message", str),
    )


def listener_result(listener: Listener) -> dict[str, Value]:
    return {"host": listener.host, "port": listener.port, "ticket": listener.ticket}


def parse_listener(value: Value) -> Listener:
    host = value.get("host") if isinstance(value, dict) else None
    if host is not None and not isinstance(host, str):
        raise WireError(f"'host' is not a str in {value!r:.80}")
    return Listener(host=host, port=_get(value, "port", int), ticket=_get(value, "ticket", str))


def precopy_result(initial: int, dirty: int, reinit: bool) -> dict[str, Value]:
    return {"initial": initial, "dirty": dirty, "reinit": reinit}


def parse_precopy(value: Value) -> tuple[int, int, bool]:
    return _get(value, "initial", int), _get(value, "dirty", int), _get(value, "reinit", bool)


def parse_verdict(value: Value, run: str) -> Verdict:
    runs = _get(value, "runs", dict)
    entry = runs.get(run)
    if entry is None:
        return Verdict.UNKNOWN
    try:
        return Verdict(_get(entry, "verdict", str))
    except ValueError:
        raise WireError(f"unknown verdict in {entry!r:.80}") from None


# --- a hosted run's summary (the thin vfmig migrate) ------------------------------------------

_DOWNTIME_PARTS = tuple(f.name for f in fields(Downtime))


def summary_result(s: Summary) -> dict[str, Value]:
    """A run's :class:`Summary` as msgpack data: transfers as [time_ns, raw, wire]."""

    def transfer(t: Transfer) -> list[Value]:
        return [t.time_ns, t.raw_bytes, t.wire_bytes]

    downtime = s.downtime
    return {
        "total_ns": s.total_ns,
        "devices": {str(dev): transfer(t) for dev, t in s.devices.items()},
        "phases": {phase.value: transfer(t) for phase, t in s.phases.items()},
        "downtime": None if downtime is None else [getattr(downtime, n) for n in _DOWNTIME_PARTS],
        "outcome": None if s.outcome is None else s.outcome.value,
    }


def parse_summary(value: Value) -> Summary:
    """The inverse of :func:`summary_result` (WireError if it is not one)."""

    def transfer(data: Any) -> Transfer:
        if not (isinstance(data, list) and len(data) == 3 and all(type(n) is int for n in data)):
            raise WireError(f"bad transfer {data!r:.80}")
        return Transfer(time_ns=data[0], raw_bytes=data[1], wire_bytes=data[2])

    devices = _get(value, "devices", dict)
    phases = _get(value, "phases", dict)
    parts = _get(value, "downtime", (list, type(None)))
    outcome = _get(value, "outcome", (str, type(None)))
    try:
        return Summary(
            total_ns=_get(value, "total_ns", int),
            devices={DeviceId.parse(str(dev)): transfer(t) for dev, t in devices.items()},
            phases={Phase(phase): transfer(t) for phase, t in phases.items()},
            downtime=None
            if parts is None
            else Downtime(**dict(zip(_DOWNTIME_PARTS, parts, strict=True))),
            outcome=None if outcome is None else Outcome(outcome),
        )
    except (ValueError, TypeError) as exc:
        raise WireError(f"bad summary: {exc}") from None


# --- notifications --------------------------------------------------------------------------


def event_notice(run: str, event: Event) -> dict[str, Value]:
    return {"run": run, "event": to_record(event)}


def progress_notice(run: str, p: Progress) -> dict[str, Value]:
    return {
        "run": run,
        "progress": {"device": str(p.device), "raw": p.raw, "wire": p.wire, "busy_ns": p.busy_ns},
    }


def fact_notice(run: str, f: Fact) -> dict[str, Value]:
    return {
        "run": run,
        "fact": {
            "kind": f.kind.value,
            "device": str(f.device),
            "errno": f.errno,
            "offset": f.offset,
            "message": f.message,
            "step": f.step,
        },
    }


#: Event records of chunk progress (not the final ones): they may wait a moment for a batch.
_CHUNK_TAGS = frozenset((ChunkSent.TAG, ChunkReceived.TAG))
#: Where a chunk event's record (``[TAG, field, ...]``) holds the fields a fold touches
#: (ChunkSent and ChunkReceived declare the same fields).
_RAW, _WIRE, _FINAL, _CHUNKS = (
    1 + [f.name for f in fields(ChunkSent)].index(name)
    for name in ("raw", "wire", "final", "chunks")
)


def deferrable(payload: dict[str, Value]) -> bool:
    """Whether a notice is chunk progress (a ChunkSent or ChunkReceived that is not the
    final one, or a progress sample) that may wait a few milliseconds to join a batch."""
    if "progress" in payload:
        return True
    record = payload.get("event")
    return (
        isinstance(record, list)
        and len(record) > _FINAL
        and record[0] in _CHUNK_TAGS
        and record[_FINAL] is False
    )


def coalesce(payloads: list[dict[str, Value]]) -> list[dict[str, Value]]:
    """``payloads`` with each run of deferrable notices folded: a device's chunk events of
    one kind into one record (the first's ``seq`` and ``offset``; ``raw``, ``wire`` and
    ``chunks`` summed), its progress samples (cumulative) into the latest; each at the
    place of its first. Other notices keep their place, and nothing moves across them."""
    out: list[dict[str, Value]] = []
    place: dict[tuple[Any, ...], int] = {}  # fold key -> index in out, in the current run
    for payload in payloads:
        key = _fold_key(payload) if deferrable(payload) else None
        if key is None:
            place.clear()
            out.append(payload)
        elif (at := place.get(key)) is None:
            place[key] = len(out)
            out.append(payload)
        elif "progress" in payload:
            out[at] = payload
        else:
            out[at] = _fold(out[at], payload)
    return out


def _fold_key(payload: dict[str, Value]) -> tuple[Any, ...]:
    progress = payload.get("progress")
    if isinstance(progress, dict):
        return ("progress", payload.get("run"), progress.get("device"))
    record: list[Any] = payload["event"]  # type: ignore[assignment]  # deferrable
    return (record[0], payload.get("run"), record[1])


def _fold(first: dict[str, Value], then: dict[str, Value]) -> dict[str, Value]:
    a: list[Any] = first["event"]  # type: ignore[assignment]  # deferrable: a chunk record
    b: list[Any] = then["event"]  # type: ignore[assignment]
    record = [*a[:_CHUNKS], _count(a) + _count(b)]
    record[_RAW] += b[_RAW]
    record[_WIRE] += b[_WIRE]
    return {**first, "event": record}


def _count(record: list[Any]) -> int:
    """The ``chunks`` of a chunk event's record (1 in a record older than the field)."""
    return int(record[_CHUNKS]) if len(record) > _CHUNKS else 1


def batch_notice(payloads: list[dict[str, Value]]) -> dict[str, Value]:
    """Several notices in one Notification, in order (one frame, one MAC for all)."""
    items: list[Value] = list(payloads)
    return {"batch": items}


def batch_items(payload: dict[str, Value]) -> list[dict[str, Value]]:
    """The notices of a :func:`batch_notice`, in order."""
    items = _get(payload, "batch", list)
    if not all(isinstance(item, dict) for item in items):
        raise WireError(f"a batch item is not a map in {items!r:.80}")
    return items  # type: ignore[no-any-return]


def _device(value: Any, key: str) -> DeviceId:
    try:
        return DeviceId.parse(_get(value, key, str))
    except ValueError as exc:
        raise WireError(str(exc)) from None


def parse_notice(payload: dict[str, Value]) -> Notice:
    run = _get(payload, "run", str)
    if "event" in payload:
        record = _get(payload, "event", list)
        try:
            return Notice(run=run, event=from_record(record))
        except RecordError as exc:
            raise WireError(exc.message) from None
    if "progress" in payload:
        p = _get(payload, "progress", dict)
        return Notice(
            run=run,
            progress=Progress(
                device=_device(p, "device"),
                raw=_get(p, "raw", int),
                wire=_get(p, "wire", int),
                busy_ns=_get(p, "busy_ns", int),
            ),
        )
    f = _get(payload, "fact", dict)
    try:
        kind = FactKind(_get(f, "kind", str))
    except ValueError:
        raise WireError(f"unknown fact in {f!r:.80}") from None
    return Notice(
        run=run,
        fact=Fact(
            kind=kind,
            device=_device(f, "device"),
            errno=_opt_int(f, "errno"),
            offset=_get(f, "offset", int),
            message=_get(f, "message", str),
            step=_get(f, "step", str),
        ),
    )
