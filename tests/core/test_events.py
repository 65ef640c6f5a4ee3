"""Event records (tags, primitives, evolution) and the summary reducer."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, ClassVar

import msgpack
import pytest

from vfmig.core import events
from vfmig.core.events import (
    REGISTRY,
    ChunkReceived,
    ChunkSent,
    DecisionMade,
    Event,
    PhaseChanged,
    RecordError,
    RunFinished,
    StateChanged,
    StreamEnded,
    Tally,
    from_record,
    register,
    summarize,
    summary_of,
    tally,
    to_record,
)
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.core.model import DeviceId, Outcome, Phase, destination, source

MS = 1_000_000
S = 1_000_000_000

#: Tags are part of the journal and wire format: a change here breaks old journals.
PINNED_TAGS = {
    1: "DeviceOpened",
    2: "IoctlCompleted",
    3: "StateChanged",
    4: "DebugfsSampled",
    5: "PrecopySampled",
    6: "DataSizeSampled",
    7: "StreamStarted",
    8: "ChunkSent",
    9: "ChunkReceived",
    10: "StreamEnded",
    11: "SwitchoverAcked",
    12: "PhaseChanged",
    13: "DecisionMade",
    14: "ErrorRaised",
    15: "DeviceHung",
    16: "CommitPointPassed",
    17: "RunFinished",
    18: "PeerLost",
}


def sample_value(tp: Any, flavour: int) -> Any:
    """A value of an annotated field type; ``flavour`` varies it (1 makes optionals None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = (a for a in typing.get_args(tp) if a is not type(None))
        return None if flavour == 1 else sample_value(inner, flavour)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(sample_value(args[0], flavour) for _ in range(flavour + 1))
        return tuple(sample_value(a, flavour) for a in args)
    if tp is DeviceId:
        return destination(3) if flavour else source(0)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        members = list(tp)
        return members[flavour % len(members)]
    return {int: 7 + flavour, str: f"text{flavour}", bool: bool(flavour), float: 1.5 * flavour}[tp]


def samples(cls: type[Event]) -> list[Event]:
    hints = typing.get_type_hints(cls)
    return [
        cls(**{f.name: sample_value(hints[f.name], flavour) for f in dataclasses.fields(cls)})
        for flavour in (0, 1, 2)
    ]


def only_primitives(value: Any) -> bool:
    if isinstance(value, list):
        return all(only_primitives(v) for v in value)
    return value is None or type(value) in (bool, int, float, str, bytes)


def test_tags_are_pinned() -> None:
    assert {tag: cls.__name__ for tag, cls in REGISTRY.items()} == PINNED_TAGS


def test_every_event_is_a_frozen_slotted_kw_only_dataclass() -> None:
    for cls in REGISTRY.values():
        params = cls.__dataclass_params__  # type: ignore[attr-defined]
        assert params.frozen
        assert "__slots__" in cls.__dict__
        assert all(f.kw_only for f in dataclasses.fields(cls))


@pytest.mark.parametrize("cls", list(REGISTRY.values()), ids=lambda c: c.__name__)
def test_records_round_trip_through_msgpack(cls: type[Event]) -> None:
    for event in samples(cls):
        record = to_record(event)
        assert record[0] == cls.TAG
        assert only_primitives(record), record
        wire = msgpack.unpackb(msgpack.packb(record), raw=False, strict_map_key=True)
        assert from_record(wire) == event


def test_record_layout_is_tag_then_fields_in_order() -> None:
    event = StateChanged(
        device=destination(1), before=DeviceState.RESUMING, after=DeviceState.STOP, step="x"
    )
    assert to_record(event) == [3, "dst1", 4, 1, "x"]
    decision = DecisionMade(rule="downtime", numbers=(("estimate_ms", 4.0),), text="t")
    assert to_record(decision) == [13, "downtime", [["estimate_ms", 4.0]], "t"]


def test_register_refuses_a_reused_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "REGISTRY", dict(REGISTRY))

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class Clash(Event):
        TAG: ClassVar[int] = 3

    with pytest.raises(ValueError, match="TAG 3 of Clash is already StateChanged's"):
        register(Clash)
    assert events.REGISTRY[3] is StateChanged


@pytest.mark.parametrize("tag", [None, 0, True, "7"])
def test_register_refuses_a_missing_or_invalid_tag(
    tag: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "REGISTRY", dict(REGISTRY))
    namespace: dict[str, Any] = {} if tag is None else {"TAG": tag}
    cls = types.new_class("Bad", (Event,), exec_body=lambda ns: ns.update(namespace))
    with pytest.raises(TypeError, match="needs its own positive integer TAG"):
        register(cls)


def test_records_evolve_by_appending_fields_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """A v1 reader takes a v2 record (extra field dropped); a v2 reader takes a v1 record."""
    monkeypatch.setattr(events, "REGISTRY", {})

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class ThingV1(Event):
        TAG: ClassVar[int] = 900
        count: int

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class ThingV2(Event):
        TAG: ClassVar[int] = 900
        count: int
        label: str = "none"

    register(ThingV2)
    v2_record = to_record(ThingV2(count=2, label="new"))
    assert from_record([900, 1]) == ThingV2(count=1, label="none")

    monkeypatch.setattr(events, "REGISTRY", {})
    register(ThingV1)
    assert from_record(v2_record) == ThingV1(count=2)
    with pytest.raises(RecordError, match="lacks its field 'count'"):
        from_record([900])


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ([], "not an event record"),
        (["12"], "not an event record"),
        ([4242], "unknown event tag 4242"),
        ([12, "nowhere", None], "PhaseChanged.phase: 'nowhere' is not a Phase"),
        ([3, "dst1", "4", 1, "x"], "StateChanged.before: '4' is not a DeviceState"),
        ([3, "dst1", True, 1, "x"], "StateChanged.before: True is not a DeviceState"),
        ([3, "src01", 4, 1, "x"], "StateChanged.device: 'src01' is not a device id"),
        ([3, 7, 4, 1, "x"], "StateChanged.device: 7 is not a device id"),
        ([6, "src0", "96"], "DataSizeSampled.size: expected int, got '96'"),
        ([6, "src0", True], "DataSizeSampled.size: expected int, got True"),
        ([13, "r", [["a"]], "t"], "DecisionMade.numbers: expected 2 items"),
        ([13, "r", "ab", "t"], "DecisionMade.numbers: expected list/tuple"),
        ([13, "r", [["a", "1"]], "t"], "expected int/float, got '1'"),
    ],
)
def test_bad_records_are_refused_with_a_reason(record: list[Any], match: str) -> None:
    with pytest.raises(RecordError, match=match) as info:
        from_record(record)
    assert info.value.hint is not None


def test_flags_keep_unknown_bits() -> None:
    opened = from_record([1, "src0", "host/x", 0x17, 2, None])
    assert isinstance(opened, events.DeviceOpened)
    assert opened.flags == MigrationFlags(0x17)


# --- summary ---------------------------------------------------------------------------------


def run_records() -> list[tuple[int, Event]]:
    """A successful one-pair run with precopy, its times in ms, as the journal would hold it."""
    s, d = source(0), destination(0)

    def phase(at: int, p: Phase, prev: Phase | None) -> tuple[int, Event]:
        return at * MS, PhaseChanged(phase=p, previous=prev)

    def sent(at: int, seq: int, raw: int, wire: int, final: bool = False) -> tuple[int, Event]:
        return at * MS, ChunkSent(device=s, seq=seq, offset=0, raw=raw, wire=wire, final=final)

    def received(at: int, seq: int, raw: int, wire: int, final: bool = False) -> tuple[int, Event]:
        return at * MS, ChunkReceived(device=d, seq=seq, offset=0, raw=raw, wire=wire, final=final)

    def state(at: int, dev: DeviceId, before: DeviceState, after: DeviceState) -> tuple[int, Event]:
        return at * MS, StateChanged(device=dev, before=before, after=after, step="")

    return [
        phase(0, Phase.PREFLIGHT, None),
        phase(10, Phase.SETUP, Phase.PREFLIGHT),
        phase(30, Phase.PRECOPY, Phase.SETUP),
        sent(40, 0, 4000, 1000),
        received(45, 0, 4000, 1000),
        phase(100, Phase.SWITCHOVER, Phase.PRECOPY),
        phase(110, Phase.STOPCOPY, Phase.SWITCHOVER),
        sent(120, 1, 2000, 1000),
        sent(125, 2, 0, 10, final=True),
        received(128, 1, 2000, 1000),
        received(130, 2, 0, 10, final=True),
        phase(136, Phase.RESUME, Phase.STOPCOPY),
        state(140, d, DeviceState.RESUMING, DeviceState.STOP),
        phase(150, Phase.COMMIT, Phase.RESUME),
        state(165, d, DeviceState.STOP, DeviceState.RUNNING),
        state(175, s, DeviceState.STOP_COPY, DeviceState.STOP),
        phase(180, Phase.FINISHED, Phase.COMMIT),
        (181 * MS, RunFinished(outcome=Outcome.COMPLETED, exit_status=0, summary="ok")),
    ]


def test_summary_of_a_run() -> None:
    summary = summary_of(run_records())
    assert summary.outcome is Outcome.COMPLETED
    assert summary.total_ns == 181 * MS
    src = summary.devices[source(0)]
    assert (src.raw_bytes, src.wire_bytes, src.time_ns) == (6000, 2010, 85 * MS)
    assert src.ratio == pytest.approx(6000 / 2010)
    assert src.throughput == pytest.approx(6000 / 0.085)
    assert summary.devices[destination(0)].time_ns == 85 * MS
    phases = summary.phases
    assert phases[Phase.PRECOPY].time_ns == 70 * MS
    assert phases[Phase.PRECOPY].raw_bytes == 4000
    assert phases[Phase.STOPCOPY].raw_bytes == 2000
    assert phases[Phase.STOPCOPY].throughput == pytest.approx(2000 / 0.026)
    assert phases[Phase.COMMIT].time_ns == 30 * MS
    assert Phase.FINISHED not in phases
    downtime = summary.downtime
    assert downtime is not None
    assert (
        downtime.quiesce_ns,
        downtime.drain_ns,
        downtime.transfer_ns,
        downtime.resume_write_ns,
        downtime.validation_ns,
        downtime.start_ns,
    ) == (10 * MS, 15 * MS, 5 * MS, 6 * MS, 14 * MS, 15 * MS)
    assert downtime.total_ns == 65 * MS  # switchover at 100 ms to the destination running


def test_summary_so_far_closes_the_open_phase() -> None:
    acc = Tally()
    for at, event in run_records()[:4]:
        acc = tally(acc, at, event)
    summary = summarize(acc)
    assert summary.phases[Phase.PRECOPY].time_ns == 10 * MS
    assert summary.downtime is None
    assert summary.outcome is None


def test_segments_never_go_negative_when_clocks_disagree() -> None:
    records = run_records()
    # the destination's clock runs 20 ms behind: it "received" before the source drained
    skewed = [
        (at - 20 * MS, ev) if isinstance(ev, ChunkReceived) else (at, ev) for at, ev in records
    ]
    downtime = summary_of(skewed).downtime
    assert downtime is not None
    assert downtime.transfer_ns == 0
    assert downtime.total_ns == 65 * MS


def test_failed_run_has_no_downtime() -> None:
    records = [
        (0, PhaseChanged(phase=Phase.SWITCHOVER, previous=Phase.PRECOPY)),
        (5 * MS, PhaseChanged(phase=Phase.ROLLBACK, previous=Phase.SWITCHOVER)),
        (9 * MS, StreamEnded(device=destination(0), total=0, digest_ok=False)),
        (9 * MS, RunFinished(outcome=Outcome.FAILED, exit_status=1, summary="x")),
    ]
    summary = summary_of(records)
    assert summary.downtime is None
    assert summary.outcome is Outcome.FAILED
    assert summary.phases[Phase.ROLLBACK].time_ns == 4 * MS
    assert summary.devices == {}


def test_tally_is_pure() -> None:
    acc = Tally()
    records = run_records()
    before = [acc]
    for at, event in records:
        acc = tally(acc, at, event)
        before.append(acc)
    # folding later records changed none of the earlier accumulators
    assert before[0] == Tally()
    assert before[4].devices[source(0)].raw_bytes == 4000
    assert before[4].phase is Phase.PRECOPY
    assert summary_of(records) == summarize(acc)


def test_empty_summary() -> None:
    summary = summary_of([])
    assert (summary.total_ns, summary.devices, summary.phases, summary.downtime) == (
        0,
        {},
        {},
        None,
    )
    assert events.Transfer().ratio is None
    assert events.Transfer().throughput is None
