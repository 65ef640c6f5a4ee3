"""The one reducer: what it keeps, its bounds, its snapshots and its timeline."""

from __future__ import annotations

import errno
from dataclasses import dataclass

import msgpack
import pytest

from vfmig.core import events as ev
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.core.model import Cause, Outcome, Phase, StreamPhase, destination, source
from vfmig.core.view import (
    MAX_DECISIONS,
    MAX_ERRORS,
    RunView,
    concerns,
    from_snapshot,
    reduce,
    timeline,
    to_snapshot,
)
from vfmig.journal.synthetic import MIB, Faults, Scenario, run


@dataclass(frozen=True, slots=True)
class Rec:
    seq: int
    at_ns: int
    event: ev.Event


def fold(scenario: Scenario) -> tuple[RunView, list[Rec]]:
    records = [Rec(i, o.at_ns, o.event) for i, o in enumerate(run(scenario))]
    model = RunView()
    for r in records:
        model = reduce(model, r)
    return model, records


def test_a_completed_run() -> None:
    model, records = fold(Scenario())
    assert model.records == len(records)
    assert model.phase is Phase.FINISHED
    assert model.committed
    assert model.finished is not None
    assert model.finished.outcome is Outcome.COMPLETED
    src, dst = model.device(source(0)), model.device(destination(0))
    assert src.state is DeviceState.STOP
    assert dst.state is DeviceState.RUNNING
    assert dst.debugfs is DeviceState.RUNNING
    assert src.offset == dst.offset == 64 * MIB
    assert src.ended
    assert dst.ended
    assert dst.digest_ok
    assert src.initial == 8 * MIB  # sampled once, before the first chunk
    assert model.errors == ()


def test_the_summary_is_the_events_modules_own() -> None:
    model, records = fold(Scenario())
    assert model.summary == ev.summary_of((r.at_ns, r.event) for r in records)
    assert model.summary.devices[source(0)].raw_bytes == 64 * MIB


def test_failed_ioctls_and_errors_are_kept() -> None:
    scenario = Scenario(faults=Faults(set_fail={(destination(0), "RESUMING>STOP"): errno.EINVAL}))
    model, _ = fold(scenario)
    assert model.errors[0].cause is Cause.STREAM_REJECTED
    assert model.errors_total == len(model.errors)
    assert model.finished is not None
    assert model.finished.outcome is Outcome.FAILED
    dst = model.device(destination(0))
    assert dst.state is DeviceState.RUNNING  # reset during the rollback
    assert dst.last_step == "reset"


def test_errors_and_decisions_are_bounded() -> None:
    model = RunView()
    for i in range(100):
        error = ev.ErrorRaised(
            device=None,
            phase=Phase.ROLLBACK,
            step=f"step {i}",
            errno=None,
            cause=Cause.RESET_FAILED,
            message="m",
            hint=None,
        )
        decision = ev.DecisionMade(rule="r", numbers=(), text=f"decision {i}")
        model = reduce(model, Rec(2 * i, i, error))
        model = reduce(model, Rec(2 * i + 1, i, decision))
    assert len(model.errors) == MAX_ERRORS
    assert model.errors[0].step == "step 0"  # the first errors explain a failure
    assert model.errors_total == 100
    assert len(model.decisions) == MAX_DECISIONS
    assert model.decisions[-1].text == "decision 99"  # the newest decisions


SNAPSHOT_SCENARIOS = {
    "completed": Scenario(size=8 * MIB, initial=2 * MIB),
    "rejected": Scenario(
        size=8 * MIB, faults=Faults(set_fail={(destination(0), "RESUMING>STOP"): errno.EINVAL})
    ),
    "hung": Scenario(size=4 * MIB, faults=Faults(hang=(destination(0), "RESUMING>STOP"))),
}


@pytest.mark.parametrize("name", sorted(SNAPSHOT_SCENARIOS))
def test_snapshots_round_trip_at_every_record(name: str) -> None:
    model = RunView()
    assert from_snapshot(to_snapshot(model)) == model
    for i, o in enumerate(run(SNAPSHOT_SCENARIOS[name])):
        model = reduce(model, Rec(i, o.at_ns, o.event))
        packed = msgpack.packb(to_snapshot(model), use_bin_type=True)
        assert from_snapshot(msgpack.unpackb(packed, raw=False)) == model


def test_an_unusable_snapshot_is_refused() -> None:
    good = to_snapshot(fold(Scenario(size=2 * MIB))[0])
    for broken in ({}, {**good, "tally": {}}, {**good, "phase": "no-such-phase"}):
        with pytest.raises(ValueError, match="unusable snapshot"):
            from_snapshot(broken)
    with pytest.raises(ValueError, match="unusable snapshot"):
        from_snapshot({**good, "errors": [[12345]]})


def test_a_snapshot_of_a_newer_model_ignores_unknown_device_fields() -> None:
    model, _ = fold(Scenario(size=2 * MIB))
    snap = to_snapshot(model)
    snap["devices"]["src0"]["future_field"] = 1
    assert from_snapshot(snap) == model


def test_timeline_tells_phases_states_decisions_errors_and_throughput() -> None:
    scenario = Scenario(faults=Faults(set_fail={(destination(0), "RESUMING>STOP"): errno.EINVAL}))
    model = RunView()
    lines: list[str] = []
    for i, o in enumerate(run(scenario)):
        record = Rec(i, o.at_ns, o.event)
        lines.extend(timeline(model, record))
        model = reduce(model, record)
    text = "\n".join(lines)
    assert "phase precopy" in lines
    assert "dst0 RUNNING -> RESUMING (RUNNING>RESUMING)" in lines
    assert "decision precopy: precopy: every device has PRE_COPY" in lines
    assert any(x.startswith("stopcopy took 56.0 MiB in ") and "GiB/s" in x for x in lines)
    assert "dst0 VFIO_DEVICE_FEATURE(feature=2, set=1, device_state=1) failed: EINVAL" in text
    assert "ERROR dst0 [resume] RESUMING>STOP: the destination rejected" in text
    assert "  hint: check that both devices" in text
    assert lines[-1].startswith("finished: failed: dst0")
    assert not any("ChunkSent" in x or "chunk" in x for x in lines)


def test_timeline_shows_debugfs_only_when_it_disagrees() -> None:
    dev = destination(0)
    model = reduce(
        RunView(),
        Rec(
            0,
            0,
            ev.DeviceOpened(
                device=dev,
                identity="x",
                flags=MigrationFlags.STOP_COPY,
                state=DeviceState.RUNNING,
                data_size=None,
            ),
        ),
    )
    agree = ev.DebugfsSampled(
        device=dev, state=DeviceState.RUNNING, text="RUNNING\n", duration_ns=1
    )
    differ = ev.DebugfsSampled(device=dev, state=None, text="Invalid\n", duration_ns=1)
    assert timeline(model, Rec(1, 1, agree)) == []
    assert timeline(model, Rec(1, 1, differ)) == ["dst0 debugfs reads Invalid, ioctl state RUNNING"]


def test_concerns() -> None:
    sent = ev.ChunkSent(device=source(0), seq=0, offset=0, raw=1, wire=1, final=False)
    started = ev.StreamStarted(
        source=source(0), destination=destination(0), phase=StreamPhase.PRECOPY
    )
    commit = ev.CommitPointPassed(devices=(source(0), destination(0)))
    phase = ev.PhaseChanged(phase=Phase.SETUP, previous=Phase.PREFLIGHT)
    assert concerns(sent, source(0))
    assert not concerns(sent, destination(0))
    assert concerns(started, destination(0))
    assert concerns(commit, destination(0))
    assert not concerns(commit, source(1))
    assert not concerns(phase, source(0))
