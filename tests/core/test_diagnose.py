"""Diagnosis of runs the real phase machine produced, with one scripted fault each.

Every entry of the table of known causes has a scenario here; the runs come from
:mod:`vfmig.journal.synthetic` (the phase machine driven by a scripted engine). Journals
produced by the engine itself are checked by the engine's tests once they journal.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import pytest

from vfmig.core import events as ev
from vfmig.core.diagnose import KNOWN, Diagnoser, Diagnosis
from vfmig.core.fsm import DeviceState
from vfmig.core.model import CAUSES, Cause, Outcome, Phase, destination, source
from vfmig.core.phases import MachineConfig, PhaseTimeouts
from vfmig.core.policy import ConvergenceConfig
from vfmig.journal.synthetic import DESTINATION_HOST, MIB, Faults, Scenario, run

S = 1_000_000_000
SHORT_PRECOPY = MachineConfig(
    convergence=ConvergenceConfig(max_precopy_ns=2 * S),
    timeouts=PhaseTimeouts(precopy_ns=3 * S),
)


@dataclass(frozen=True, slots=True)
class Rec:
    seq: int
    at_ns: int
    event: ev.Event


def diagnose(scenario: Scenario, *, stop_after: int | None = None) -> Diagnosis:
    d = Diagnoser()
    for seq, o in enumerate(run(scenario)):
        if stop_after is not None and seq >= stop_after:
            break
        d.feed(Rec(seq, o.at_ns, o.event))
    return d.result()


SCENARIOS: dict[str, Scenario] = {
    "completed": Scenario(),
    "size-mismatch": Scenario(
        dst_size=32 * MIB, faults=Faults(write_error=(32 * MIB, errno.ENOMEM))
    ),
    "device-busy": Scenario(faults=Faults(busy=destination(0))),
    "stream-rejected": Scenario(
        faults=Faults(set_fail={(destination(0), "RESUMING>STOP"): errno.EINVAL})
    ),
    "write-refused": Scenario(faults=Faults(write_error=(8 * MIB + 100, errno.EFAULT))),
    "not-converged": Scenario(faults=Faults(no_ack=True), config=SHORT_PRECOPY),
    "peer-lost": Scenario(faults=Faults(lose_host=(DESTINATION_HOST, Phase.PRECOPY))),
    "link-lost": Scenario(faults=Faults(break_link=Phase.PRECOPY)),
    "in-doubt": Scenario(faults=Faults(lose_host=(DESTINATION_HOST, Phase.COMMIT))),
    "hung": Scenario(faults=Faults(hang=(destination(0), "RESUMING>STOP"))),
    "refused": Scenario(faults=Faults(found={source(0): DeviceState.PRE_COPY})),
    "interrupted": Scenario(faults=Faults(abort_in=Phase.PRECOPY)),
    "set-failed": Scenario(faults=Faults(set_fail={(source(0), "RUNNING>PRE_COPY"): errno.EIO})),
    "other": Scenario(faults=Faults(bad_digest=True)),
}


def test_every_known_cause_has_a_scenario() -> None:
    assert set(SCENARIOS) | {"unfinished"} == set(KNOWN)


@pytest.mark.parametrize("cause", sorted(SCENARIOS))
def test_each_known_cause_is_recognised(cause: str) -> None:
    result = diagnose(SCENARIOS[cause])
    assert result.cause == cause
    assert result.failed == (cause != "completed")
    text = "\n".join(result.lines())
    assert KNOWN[cause].title in text
    if cause != "completed":
        assert "first failure" in text or result.step is None


def test_completed_run() -> None:
    result = diagnose(SCENARIOS["completed"])
    assert result.outcome is Outcome.COMPLETED
    assert result.step is None
    assert result.errors_total == 0


def test_stream_rejected_names_device_phase_arc_errno_and_states() -> None:
    result = diagnose(SCENARIOS["stream-rejected"])
    assert result.outcome is Outcome.FAILED
    assert result.device == destination(0)
    assert result.phase is Phase.RESUME
    assert result.step == "RESUMING>STOP"
    assert result.errno == errno.EINVAL
    assert result.error_cause is Cause.STREAM_REJECTED
    assert result.before is not None
    assert result.before.ioctl is DeviceState.RESUMING
    assert result.before.debugfs == "RESUMING"
    assert result.after is not None
    assert result.after.ioctl is DeviceState.RESUMING
    assert any("equals" in line for line in result.evidence)
    lines = result.lines()
    assert "first failure: dst0, phase resume, step RESUMING>STOP, EINVAL" in lines[1]
    assert "state before: RESUMING by ioctl, RESUMING by debugfs" in lines


def test_size_mismatch_shows_both_sizes_and_the_errno() -> None:
    result = diagnose(SCENARIOS["size-mismatch"])
    assert result.device == destination(0)
    assert result.errno == errno.ENOMEM
    assert result.phase is Phase.STOPCOPY
    assert "64.0 MiB" in result.evidence[0]
    assert "differs from" in result.evidence[0]
    assert "32.0 MiB" in result.evidence[0]
    assert any("ENOMEM" in line for line in result.evidence)


def test_size_mismatch_at_validation() -> None:
    scenario = Scenario(
        dst_size=60 * MIB,
        faults=Faults(set_fail={(destination(0), "RESUMING>STOP"): errno.EINVAL}),
    )
    result = diagnose(scenario)
    assert result.cause == "size-mismatch"
    assert result.step == "RESUMING>STOP"


def test_write_refused_explains_the_errno() -> None:
    result = diagnose(SCENARIOS["write-refused"])
    assert result.step == f"data write at offset {8 * MIB + 100}"
    assert result.before is not None
    assert result.before.ioctl is DeviceState.RESUMING  # the state the write met
    assert any("EFAULT" in line for line in result.evidence)
    assert result.errors_total >= 1


def test_not_converged_tells_about_the_missing_ack() -> None:
    result = diagnose(SCENARIOS["not-converged"])
    assert result.phase is Phase.PRECOPY
    assert any("switchover-ack" in line for line in result.evidence)
    assert any("src0's last precopy sample" in line for line in result.evidence)


def test_hung_device_says_where_it_may_be() -> None:
    result = diagnose(SCENARIOS["hung"])
    assert result.outcome is Outcome.HUNG
    assert result.device == destination(0)
    assert any("hung in RESUMING>STOP toward STOP" in line for line in result.evidence)
    assert result.before is not None
    assert result.before.ioctl is DeviceState.RESUMING  # the hung request never answered


def test_in_doubt_is_after_the_commit_point() -> None:
    result = diagnose(SCENARIOS["in-doubt"])
    assert result.outcome is Outcome.IN_DOUBT


def test_busy_device_is_refused_before_anything_changed() -> None:
    result = diagnose(SCENARIOS["device-busy"])
    assert result.outcome is Outcome.REFUSED
    assert result.errno == errno.EBUSY
    assert result.step == "open"


def test_other_causes_use_the_runs_own_explanation() -> None:
    result = diagnose(SCENARIOS["other"])
    assert result.error_cause is Cause.DIGEST_MISMATCH
    assert result.explanation == CAUSES[Cause.DIGEST_MISMATCH].explanation
    assert result.hint == CAUSES[Cause.DIGEST_MISMATCH].hint


def test_a_journal_that_ends_before_the_run_is_unfinished() -> None:
    total = sum(1 for _ in run(Scenario()))
    result = diagnose(Scenario(), stop_after=total // 2)
    assert result.cause == "unfinished"
    assert result.outcome is None
    assert result.seq == total // 2 - 1
    assert "no end-of-run record" in result.evidence[0]


def test_an_unfinished_failing_run_keeps_its_first_failure() -> None:
    scenario = SCENARIOS["stream-rejected"]
    observations = list(run(scenario))
    first_error = next(i for i, o in enumerate(observations) if isinstance(o.event, ev.ErrorRaised))
    result = diagnose(scenario, stop_after=first_error + 1)
    assert result.cause == "stream-rejected"
    assert result.outcome is None
    assert any("no end-of-run record" in line for line in result.evidence)


def test_debugfs_disagreeing_with_the_ioctl_state_is_evidence() -> None:
    scenario = Scenario(
        faults=Faults(
            set_fail={(destination(0), "RESUMING>STOP"): errno.EINVAL},
            debugfs_lies=(destination(0), DeviceState.ERROR),
        )
    )
    result = diagnose(scenario)
    assert result.cause == "stream-rejected"
    assert result.after is not None
    assert result.after.debugfs == "ERROR"
    assert any("debugfs reads ERROR but the ioctl state is RESUMING" in x for x in result.evidence)


def test_without_ioctl_records_the_states_come_from_state_changes() -> None:
    """The engine may journal no IoctlCompleted: the diagnosis must not depend on them."""
    d = Diagnoser()
    for seq, o in enumerate(run(SCENARIOS["stream-rejected"])):
        if not isinstance(o.event, ev.IoctlCompleted):
            d.feed(Rec(seq, o.at_ns, o.event))
    result = d.result()
    assert result.cause == "stream-rejected"
    assert result.before is not None
    assert result.before.ioctl is DeviceState.RESUMING
    assert result.after is not None
    assert result.after.ioctl is DeviceState.RESUMING


def test_a_request_that_moved_part_of_the_way() -> None:
    """RUNNING>STOP_COPY failing at its last arc leaves the device in STOP: before is RUNNING."""
    dev = source(0)
    flags = ev.MigrationFlags.STOP_COPY | ev.MigrationFlags.P2P
    records: list[ev.Event] = [
        ev.DeviceOpened(
            device=dev, identity="a", flags=flags, state=DeviceState.RUNNING, data_size=None
        ),
        ev.DebugfsSampled(device=dev, state=DeviceState.RUNNING, text="RUNNING\n", duration_ns=1),
        ev.StateChanged(
            device=dev, before=DeviceState.RUNNING, after=DeviceState.STOP, step="RUNNING>STOP_COPY"
        ),
        ev.DebugfsSampled(device=dev, state=DeviceState.STOP, text="STOP\n", duration_ns=1),
        ev.ErrorRaised(
            device=dev,
            phase=Phase.SWITCHOVER,
            step="RUNNING>STOP_COPY",
            errno=errno.EIO,
            cause=Cause.SET_FAILED,
            message="the device refused the state change",
            hint=None,
        ),
    ]
    d = Diagnoser()
    for seq, event in enumerate(records):
        d.feed(Rec(seq, seq, event))
    result = d.result()
    assert result.cause == "set-failed"
    assert result.outcome is None  # and unfinished
    assert result.before is not None
    assert (result.before.ioctl, result.before.debugfs) == (DeviceState.RUNNING, "RUNNING\n")
    assert result.after is not None
    assert (result.after.ioctl, result.after.debugfs) == (DeviceState.STOP, "STOP\n")
    assert "state before: RUNNING by ioctl, RUNNING by debugfs" in result.lines()
