"""Typed events -- the facts vfmig journals, shows and sends -- and the run summary built from them.

Theory of operation
-------------------
An event is a ``@dataclass(frozen=True, slots=True, kw_only=True)`` naming a fact in the
past tense. Observations come from the engine (an ioctl completed, a chunk was sent);
decisions come from the phase machine (a phase changed, a rule fired, an error was
raised). Commands are a different family (:mod:`vfmig.core.phases` actions).

Each class carries an explicit ``TAG: ClassVar[int]``, never derived from its name, and
is added to :data:`REGISTRY` by :func:`register`, which refuses a missing or reused tag
when the module is imported. A tag is never reused, even for a deleted class.

Records. :func:`to_record` turns an event into ``[TAG, field, field, ...]`` of
msgpack-able primitives, by the fields' annotated types: enums by value, a
:class:`~vfmig.core.model.DeviceId` as ``"src0"``, tuples as lists, ``None`` as nil.
:func:`from_record` reverses it and checks every type. Evolution: fields are only ever
appended, and every appended field has a default. So a reader accepts a record with more
fields than it knows (written by a newer vfmig: the extra ones are dropped) and a record
with fewer (written by an older vfmig: the defaults fill in). Enum members are only
added, never renamed; a journal's ``schema_version`` tells a reader when it is too old.

Summary. :func:`tally` is a pure reducer ``(Tally, at_ns, event) -> Tally`` and
:func:`summarize` turns the result into a :class:`Summary`: per device and per phase
time, raw and wire bytes, ratio and throughput, and the downtime cut into consecutive
segments (quiesce, stop-copy drain, transfer, resume write, validation, start). The live
display and a journal replay fold the same records through it, so they cannot disagree.

Pure: stdlib only.
"""

from __future__ import annotations

import enum
import itertools
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

from vfmig.core.errors import VfmigError
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.core.model import Cause, DeviceId, Outcome, Phase, Role, StreamPhase

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

#: Names the annotations of event fields refer to; :func:`typing.get_type_hints` resolves
#: them here, so these imports are needed at run time, not only by the type checker.
_ANNOTATION_NAMES: Final = {
    "DeviceId": DeviceId,
    "DeviceState": DeviceState,
    "MigrationFlags": MigrationFlags,
    "Phase": Phase,
    "StreamPhase": StreamPhase,
    "Cause": Cause,
    "Outcome": Outcome,
}

NS_PER_S: Final = 1_000_000_000


class RecordError(VfmigError):
    """A record that does not decode: unknown tag, wrong type, missing field."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message, hint="the journal or peer may come from a newer vfmig, or be damaged"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every event. Subclasses set ``TAG`` and are decorated with :func:`register`."""

    TAG: ClassVar[int]


E = TypeVar("E", bound=Event)

#: TAG -> event class, filled by :func:`register`.
REGISTRY: dict[int, type[Event]] = {}

_Encode = Callable[[Any], Any]
_Decode = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    encode: _Encode
    decode: _Decode
    required: bool


_PLANS: dict[type[Event], tuple[_Field, ...]] = {}


def register(cls: type[E]) -> type[E]:
    """Add an event class to :data:`REGISTRY`; refuse a missing, invalid or reused TAG."""
    tag = cls.__dict__.get("TAG")
    if type(tag) is not int or tag <= 0:
        raise TypeError(f"{cls.__name__} needs its own positive integer TAG")
    if tag in REGISTRY:
        raise ValueError(f"TAG {tag} of {cls.__name__} is already {REGISTRY[tag].__name__}'s")
    hints = typing.get_type_hints(cls, localns=_ANNOTATION_NAMES)
    plan = []
    for f in fields(cls):
        encode, decode = _codec(hints[f.name])
        required = f.default is MISSING and f.default_factory is MISSING
        plan.append(_Field(f.name, encode, decode, required))
    _PLANS[cls] = tuple(plan)
    REGISTRY[tag] = cls
    return cls


def _identity(value: Any) -> Any:
    return value


def _checked(*types_: type) -> _Decode:
    def decode(value: Any) -> Any:
        if type(value) not in types_:
            raise RecordError(f"expected {'/'.join(t.__name__ for t in types_)}, got {value!r}")
        return value

    return decode


def _enum_decoder(kind: type[enum.Enum]) -> _Decode:
    value_type = type(next(iter(kind)).value)
    members = {member.value: member for member in kind}

    def decode(value: Any) -> Any:
        if type(value) is not value_type:
            raise RecordError(f"{value!r} is not a {kind.__name__}")
        member = members.get(value)
        if member is not None:
            return member
        try:  # a combination of flags is no member of its own
            return kind(value)
        except (ValueError, TypeError):
            raise RecordError(f"{value!r} is not a {kind.__name__}") from None

    return decode


def _device_id(value: Any) -> DeviceId:
    try:
        return DeviceId.parse(value)
    except (ValueError, AttributeError, TypeError):
        raise RecordError(f"{value!r} is not a device id") from None


def _codec(tp: Any) -> tuple[_Encode, _Decode]:
    """Encoder and decoder for one annotated field type (the supported types only)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = (arg for arg in typing.get_args(tp) if arg is not type(None))
        enc, dec = _codec(inner)
        return (
            lambda v: None if v is None else enc(v),
            lambda v: None if v is None else dec(v),
        )
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            item_enc, item_dec = _codec(args[0])
            return (
                lambda v: [item_enc(x) for x in v],
                lambda v: tuple(item_dec(x) for x in _checked(list, tuple)(v)),
            )
        codecs = [_codec(arg) for arg in args]

        def decode_fixed(v: Any) -> tuple[Any, ...]:
            items = _checked(list, tuple)(v)
            if len(items) != len(codecs):
                raise RecordError(f"expected {len(codecs)} items, got {v!r}")
            return tuple(dec(x) for (_, dec), x in zip(codecs, items, strict=True))

        return (lambda v: [enc(x) for (enc, _), x in zip(codecs, v, strict=True)], decode_fixed)
    if tp is DeviceId:
        return str, _device_id
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return (lambda v: v.value), _enum_decoder(tp)
    if tp is float:
        return float, lambda v: float(_checked(int, float)(v))
    if tp in (int, str, bool, bytes):
        return _identity, _checked(tp)
    raise TypeError(f"unsupported event field type {tp!r}")


def to_record(event: Event) -> list[Any]:
    """``[TAG, field, ...]``: msgpack-able primitives, fields in declaration order."""
    plan = _PLANS[type(event)]
    return [event.TAG, *(f.encode(getattr(event, f.name)) for f in plan)]


def from_record(record: list[Any] | tuple[Any, ...]) -> Event:
    """The event a record holds. Extra trailing fields are dropped, missing ones defaulted."""
    if not record or type(record[0]) is not int:
        raise RecordError(f"not an event record: {record!r:.80}")
    cls = REGISTRY.get(record[0])
    if cls is None:
        raise RecordError(f"unknown event tag {record[0]}")
    plan = _PLANS[cls]
    values = record[1:]
    kwargs: dict[str, Any] = {}
    for i, f in enumerate(plan):
        if i < len(values):
            try:
                kwargs[f.name] = f.decode(values[i])
            except RecordError as exc:
                raise RecordError(f"{cls.__name__}.{f.name}: {exc.message}") from None
        elif f.required:
            raise RecordError(f"{cls.__name__} record lacks its field {f.name!r}")
    return cls(**kwargs)


#: Named numbers of a decision, as (name, value) pairs (records hold them as lists).
Numbers = tuple[tuple[str, float], ...]


# --- observations (the engine) -------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceOpened(Event):
    TAG: ClassVar[int] = 1
    device: DeviceId
    identity: str  #: host-qualified physical identity: equal identities are the same device
    flags: MigrationFlags
    state: DeviceState
    data_size: int | None  #: MIG_DATA_SIZE at open; None if the query failed


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class IoctlCompleted(Event):
    TAG: ClassVar[int] = 2
    device: DeviceId
    name: str  #: e.g. ``VFIO_DEVICE_FEATURE``, ``VFIO_DEVICE_RESET``
    args: tuple[tuple[str, int], ...]
    result: int
    errno: int | None
    duration_ns: int


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class StateChanged(Event):
    TAG: ClassVar[int] = 3
    device: DeviceId
    before: DeviceState
    after: DeviceState
    step: str  #: the request that moved it: ``RUNNING>STOP_COPY`` or ``reset``


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class DebugfsSampled(Event):
    TAG: ClassVar[int] = 4
    device: DeviceId
    state: DeviceState | None  #: None when the text is not a state name
    text: str
    duration_ns: int


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class PrecopySampled(Event):
    TAG: ClassVar[int] = 5
    device: DeviceId
    initial: int
    dirty: int
    reinit: bool


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class DataSizeSampled(Event):
    TAG: ClassVar[int] = 6
    device: DeviceId
    size: int


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class StreamStarted(Event):
    TAG: ClassVar[int] = 7
    source: DeviceId
    destination: DeviceId
    phase: StreamPhase


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkSent(Event):
    TAG: ClassVar[int] = 8
    device: DeviceId  #: the source
    seq: int
    offset: int  #: stream offset of the chunk's first byte
    raw: int  #: bytes read from the device
    wire: int  #: bytes on the wire after compression
    final: bool  #: the source read end of stream (``raw`` may be 0)
    #: Consecutive chunks the record covers (``seq`` and ``offset`` are the first's, ``raw``
    #: and ``wire`` their sums): an agent coalesces its chunk progress for the orchestrator.
    chunks: int = 1


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkReceived(Event):
    TAG: ClassVar[int] = 9
    device: DeviceId  #: the destination
    seq: int
    offset: int
    raw: int
    wire: int
    final: bool
    chunks: int = 1  #: as in :class:`ChunkSent`


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEnded(Event):
    TAG: ClassVar[int] = 10
    device: DeviceId  #: the destination: every byte written, digest compared
    total: int
    digest_ok: bool


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class SwitchoverAcked(Event):
    TAG: ClassVar[int] = 11
    device: DeviceId  #: the destination that loaded the initial precopy data


# --- decisions (the phase machine) ---------------------------------------------------------


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class PhaseChanged(Event):
    TAG: ClassVar[int] = 12
    phase: Phase
    previous: Phase | None


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class DecisionMade(Event):
    TAG: ClassVar[int] = 13
    rule: str  #: a :class:`vfmig.core.policy.Rule` value, or a machine rule (``precopy``...)
    numbers: Numbers
    text: str


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorRaised(Event):
    TAG: ClassVar[int] = 14
    device: DeviceId | None  #: None for a run-wide error (a signal, a lost agent)
    phase: Phase
    step: str  #: ``RUNNING>PRE_COPY``, ``data write at offset 4096``, ``open``...
    errno: int | None
    cause: Cause
    message: str  #: plain explanation, with this error's particulars
    hint: str | None


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceHung(Event):
    TAG: ClassVar[int] = 15
    device: DeviceId
    phase: Phase
    step: str
    state: DeviceState | None  #: last state known before the step (None: unknown)
    target: DeviceState | None  #: where the hung request was going, if it was a SET


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class CommitPointPassed(Event):
    TAG: ClassVar[int] = 16
    devices: tuple[DeviceId, ...]


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class RunFinished(Event):
    TAG: ClassVar[int] = 17
    outcome: Outcome
    exit_status: int
    summary: str  #: one line for a person


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class PeerLost(Event):
    """The orchestrator lost its control link to the agent at ``host`` (schema 2)."""

    TAG: ClassVar[int] = 18
    host: str
    devices: tuple[DeviceId, ...]  #: the run's devices of that agent
    committed: bool  #: lost after the commit point


# --- summary ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Transfer:
    """Time and bytes of one device's stream or of one phase."""

    time_ns: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0

    @property
    def ratio(self) -> float | None:
        """Raw over wire bytes (2.0 = halved by compression); None before any wire byte."""
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else None

    @property
    def throughput(self) -> float | None:
        """Raw bytes per second; None without elapsed time."""
        return self.raw_bytes * NS_PER_S / self.time_ns if self.time_ns > 0 else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Downtime:
    """The downtime as consecutive segments, from the switchover to the last destination running.

    quiesce: P2P staging and every source to STOP_COPY; drain: until the last source read
    end of stream; transfer: until the last destination received it; resume write: until
    every destination wrote everything and checked the digest; validation: RESUMING ->
    STOP (and P2P staging); start: until the last destination ran. Segments follow the
    critical path: where marks from different hosts disagree, a segment is 0, never negative.
    """

    quiesce_ns: int
    drain_ns: int
    transfer_ns: int
    resume_write_ns: int
    validation_ns: int
    start_ns: int

    @property
    def total_ns(self) -> int:
        return (
            self.quiesce_ns
            + self.drain_ns
            + self.transfer_ns
            + self.resume_write_ns
            + self.validation_ns
            + self.start_ns
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    total_ns: int
    devices: Mapping[DeviceId, Transfer]
    phases: Mapping[Phase, Transfer]
    downtime: Downtime | None  #: None unless a destination started after a switchover
    outcome: Outcome | None


class _Mark(enum.Enum):
    SWITCHOVER = "switchover"
    QUIESCED = "quiesced"
    DRAINED = "drained"
    RECEIVED = "received"
    WRITTEN = "written"
    VALIDATED = "validated"
    STARTED = "started"


_PHASE_MARKS: Final = {
    Phase.SWITCHOVER: _Mark.SWITCHOVER,
    Phase.STOPCOPY: _Mark.QUIESCED,
    Phase.RESUME: _Mark.WRITTEN,
    Phase.COMMIT: _Mark.VALIDATED,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Tally:
    """What :func:`tally` accumulates; start from ``Tally()``."""

    first_ns: int | None = None
    last_ns: int = 0
    phase: Phase | None = None
    phase_since: int = 0
    phases: Mapping[Phase, Transfer] = field(default_factory=dict)
    devices: Mapping[DeviceId, Transfer] = field(default_factory=dict)
    spans: Mapping[DeviceId, tuple[int, int]] = field(default_factory=dict)
    marks: Mapping[_Mark, int] = field(default_factory=dict)
    outcome: Outcome | None = None


def _add(
    table: Mapping[Any, Transfer], key: Any, *, time_ns: int = 0, raw: int = 0, wire: int = 0
) -> dict[Any, Transfer]:
    old = table.get(key, Transfer())
    new = Transfer(
        time_ns=old.time_ns + time_ns,
        raw_bytes=old.raw_bytes + raw,
        wire_bytes=old.wire_bytes + wire,
    )
    return {**table, key: new}


def _close_phase(acc: Tally, at_ns: int) -> Mapping[Phase, Transfer]:
    if acc.phase is None or acc.phase is Phase.FINISHED:
        return acc.phases
    return _add(acc.phases, acc.phase, time_ns=max(at_ns - acc.phase_since, 0))


def _latest(marks: Mapping[_Mark, int], mark: _Mark, at_ns: int) -> dict[_Mark, int]:
    return {**marks, mark: max(at_ns, marks.get(mark, at_ns))}


def tally(acc: Tally, at_ns: int, event: Event) -> Tally:
    """Fold one event, observed at ``at_ns`` (the journal's monotonic time), into ``acc``."""
    acc = replace(
        acc,
        first_ns=at_ns if acc.first_ns is None else acc.first_ns,
        last_ns=max(acc.last_ns, at_ns),
    )
    match event:
        case PhaseChanged(phase=phase):
            marks = acc.marks
            mark = _PHASE_MARKS.get(phase)
            if mark is not None and mark not in marks:
                marks = {**marks, mark: at_ns}
            return replace(
                acc, phases=_close_phase(acc, at_ns), phase=phase, phase_since=at_ns, marks=marks
            )
        case ChunkSent() | ChunkReceived():
            dev = event.device
            first, last = acc.spans.get(dev, (at_ns, at_ns))
            spans = {**acc.spans, dev: (min(first, at_ns), max(last, at_ns))}
            devices = _add(acc.devices, dev, raw=event.raw, wire=event.wire)
            phases = acc.phases
            if isinstance(event, ChunkSent) and acc.phase is not None:
                phases = _add(phases, acc.phase, raw=event.raw, wire=event.wire)
            marks = acc.marks
            if event.final:
                mark = _Mark.DRAINED if isinstance(event, ChunkSent) else _Mark.RECEIVED
                marks = _latest(marks, mark, at_ns)
            return replace(acc, spans=spans, devices=devices, phases=phases, marks=marks)
        case StateChanged(device=DeviceId(role=Role.DESTINATION), after=DeviceState.RUNNING) if (
            _Mark.VALIDATED in acc.marks
        ):
            return replace(acc, marks=_latest(acc.marks, _Mark.STARTED, at_ns))
        case RunFinished(outcome=outcome):
            return replace(
                acc, phases=_close_phase(acc, at_ns), phase=None, phase_since=at_ns, outcome=outcome
            )
    return acc


def _downtime(marks: Mapping[_Mark, int]) -> Downtime | None:
    if _Mark.SWITCHOVER not in marks or _Mark.STARTED not in marks:
        return None
    order = (
        _Mark.QUIESCED,
        _Mark.DRAINED,
        _Mark.RECEIVED,
        _Mark.WRITTEN,
        _Mark.VALIDATED,
        _Mark.STARTED,
    )
    bounds = [marks[_Mark.SWITCHOVER]]
    for mark in order:
        bounds.append(max(bounds[-1], marks.get(mark, bounds[-1])))
    steps = [b - a for a, b in itertools.pairwise(bounds)]
    return Downtime(
        quiesce_ns=steps[0],
        drain_ns=steps[1],
        transfer_ns=steps[2],
        resume_write_ns=steps[3],
        validation_ns=steps[4],
        start_ns=steps[5],
    )


def summarize(acc: Tally) -> Summary:
    """The :class:`Summary` of everything folded into ``acc`` so far."""
    devices = {
        dev: replace(t, time_ns=acc.spans[dev][1] - acc.spans[dev][0])
        for dev, t in acc.devices.items()
    }
    phases = _close_phase(acc, acc.last_ns) if acc.phase is not None else acc.phases
    return Summary(
        total_ns=acc.last_ns - (acc.first_ns if acc.first_ns is not None else acc.last_ns),
        devices=devices,
        phases=dict(phases),
        downtime=_downtime(acc.marks),
        outcome=acc.outcome,
    )


def summary_of(records: Iterable[tuple[int, Event]]) -> Summary:
    """Fold ``(at_ns, event)`` pairs from the start: the whole-journal convenience."""
    acc = Tally()
    for at_ns, event in records:
        acc = tally(acc, at_ns, event)
    return summarize(acc)
