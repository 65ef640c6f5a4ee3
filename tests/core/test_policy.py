"""Convergence rules and the per-device recovery rule, as pure functions over samples."""

from __future__ import annotations

import itertools

import pytest

from vfmig.core import fsm
from vfmig.core.errors import UsageError
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.core.policy import (
    ConvergenceConfig,
    Decision,
    Goal,
    PairProgress,
    RecoveryStep,
    Rule,
    StepKind,
    data_size_sample,
    decide,
    precopy_sample,
    recovery_step,
    stream_sample,
)

S = 1_000_000_000
MS = 1_000_000
CFG = ConvergenceConfig()
_S = DeviceState
ALL = MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY


def progress(
    *, sent: int = 0, busy_ns: int = 0, initial: int = 0, dirty: int = 0, size: int | None = 0
) -> PairProgress:
    """A pair that has streamed ``sent`` bytes in ``busy_ns`` and reports the given sizes."""
    p = stream_sample(PairProgress(), CFG, sent=sent, busy_ns=busy_ns)
    p = precopy_sample(p, CFG, initial=initial, dirty=dirty, reinit=False, now_ns=0)
    return data_size_sample(p, size)


def numbers(decision: Decision) -> dict[str, float]:
    return dict(decision.numbers)


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"downtime_limit_ns": 0},
        {"max_precopy_ns": -1},
        {"stall_samples": 0},
        {"ewma_weight": 0.0},
        {"ewma_weight": 1.5},
    ],
)
def test_config_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        ConvergenceConfig(**kwargs)  # type: ignore[arg-type]


def test_defaults_are_qemus_downtime_and_two_minutes() -> None:
    assert CFG.downtime_limit_ns == 300 * MS
    assert CFG.max_precopy_ns == 120 * S


# --- samples ---------------------------------------------------------------------------------


def test_throughput_is_bytes_over_busy_time_then_ewma() -> None:
    p = stream_sample(PairProgress(), CFG, sent=1_000_000, busy_ns=S // 100)
    assert p.throughput == pytest.approx(100e6)
    p = stream_sample(p, CFG, sent=2_000_000, busy_ns=S // 100 + S // 50)
    # newest sample 50 MB/s, weight 0.25: 0.25 * 50 + 0.75 * 100
    assert p.throughput == pytest.approx(87.5e6)
    assert (p.sent, p.busy_ns) == (2_000_000, 3 * S // 100)


def test_a_sample_without_new_bytes_or_time_keeps_the_throughput() -> None:
    p = stream_sample(PairProgress(), CFG, sent=100, busy_ns=MS)
    assert stream_sample(p, CFG, sent=100, busy_ns=2 * MS).throughput == p.throughput
    assert stream_sample(p, CFG, sent=200, busy_ns=MS).throughput == p.throughput


def test_production_rate_counts_what_was_sent_meanwhile() -> None:
    p = stream_sample(PairProgress(), CFG, sent=1000, busy_ns=MS)  # 1 MB/s
    p = precopy_sample(p, CFG, initial=1000, dirty=0, reinit=False, now_ns=0)
    assert p.produce_rate is None
    p = stream_sample(p, CFG, sent=1500, busy_ns=2 * MS)
    # pending 1000 -> 800 while 500 bytes went out: the device produced 300 bytes in 1 s
    p = precopy_sample(p, CFG, initial=600, dirty=200, reinit=False, now_ns=S)
    assert p.produce_rate == pytest.approx(300.0)
    assert p.stalled == 0


def test_stall_counts_consecutive_samples_and_resets() -> None:
    p = stream_sample(PairProgress(), CFG, sent=100, busy_ns=S)  # 100 B/s
    p = precopy_sample(p, CFG, initial=0, dirty=0, reinit=False, now_ns=0)
    for i in range(1, 4):  # 1000 dirty bytes a second, nothing sent: no progress
        p = precopy_sample(p, CFG, initial=0, dirty=1000 * i, reinit=False, now_ns=i * S)
    assert p.stalled == 3
    p = precopy_sample(p, CFG, initial=0, dirty=3000, reinit=False, now_ns=4 * S)
    assert p.stalled == 0


def test_reinit_restarts_the_history() -> None:
    p = stream_sample(PairProgress(), CFG, sent=100, busy_ns=S)
    p = precopy_sample(p, CFG, initial=0, dirty=0, reinit=False, now_ns=0)
    p = precopy_sample(p, CFG, initial=0, dirty=5000, reinit=False, now_ns=S)
    assert p.stalled == 1
    p = precopy_sample(p, CFG, initial=9000, dirty=0, reinit=True, now_ns=2 * S)
    assert (p.stalled, p.produce_rate, p.initial) == (0, None, 9000)


def test_no_stall_judgement_before_any_throughput() -> None:
    p = precopy_sample(PairProgress(), CFG, initial=0, dirty=0, reinit=False, now_ns=0)
    p = precopy_sample(p, CFG, initial=0, dirty=10**6, reinit=False, now_ns=S)
    assert p.stalled == 0
    assert p.produce_rate == pytest.approx(1e6)


def test_pending_needs_every_number() -> None:
    assert PairProgress().pending is None
    assert progress(initial=24, dirty=8, size=96).pending == 128
    assert progress(initial=24, size=None).pending is None


# --- decide: each rule fires ------------------------------------------------------------------


def test_downtime_rule_fires_within_the_limit() -> None:
    fast = progress(sent=10**6, busy_ns=MS, initial=0, dirty=0, size=96)  # 1 GB/s
    d = decide(CFG, [fast], elapsed_ns=S)
    assert (d.switch, d.rule) == (True, Rule.DOWNTIME)
    assert numbers(d)["pending_bytes"] == 96
    assert numbers(d)["estimate_ms"] == pytest.approx(96 / 1e9 * 1e3)
    assert "within the 300 ms downtime limit" in d.text


def test_downtime_rule_sums_pending_over_summed_throughput() -> None:
    a = progress(sent=100 * 10**6, busy_ns=S, size=20 * 10**6)  # 100 MB/s, 20 MB left
    b = progress(sent=100 * 10**6, busy_ns=S, size=40 * 10**6)
    d = decide(CFG, [a, b], elapsed_ns=S)
    # 60 MB over 200 MB/s = 300 ms: exactly at the limit
    assert numbers(d)["estimate_ms"] == pytest.approx(300.0)
    assert d.rule is Rule.DOWNTIME


def test_continue_when_the_estimate_is_over_the_limit() -> None:
    slow = progress(sent=10**6, busy_ns=S, initial=10**6, size=10**6)  # 1 MB/s, 2 MB left
    d = decide(CFG, [slow], elapsed_ns=S)
    assert (d.switch, d.rule) == (False, Rule.CONTINUE)
    assert numbers(d)["estimate_ms"] == pytest.approx(2000.0)
    assert "exceeds" in d.text


def test_continue_without_an_estimate() -> None:
    d = decide(CFG, [progress(size=None)], elapsed_ns=0)
    assert (d.switch, d.rule) == (False, Rule.CONTINUE)
    assert "estimate_ms" not in numbers(d)
    assert "no downtime estimate" in d.text


def test_stalled_rule_fires_after_n_samples() -> None:
    p = stream_sample(PairProgress(), CFG, sent=1000, busy_ns=S)  # 1 kB/s
    p = data_size_sample(p, 10**9)
    p = precopy_sample(p, CFG, initial=0, dirty=0, reinit=False, now_ns=0)
    for i in range(1, CFG.stall_samples + 1):
        assert decide(CFG, [p], elapsed_ns=i * S).rule is Rule.CONTINUE
        p = precopy_sample(p, CFG, initial=0, dirty=10**6 * i, reinit=False, now_ns=i * S)
    d = decide(CFG, [p], elapsed_ns=10 * S)
    assert (d.switch, d.rule) == (True, Rule.STALLED)
    assert numbers(d)["stalled_samples"] == CFG.stall_samples


def test_max_precopy_rule_fires_at_the_cap() -> None:
    slow = progress(sent=1, busy_ns=S, size=10**9)
    assert decide(CFG, [slow], elapsed_ns=CFG.max_precopy_ns - 1).rule is Rule.CONTINUE
    d = decide(CFG, [slow], elapsed_ns=CFG.max_precopy_ns)
    assert (d.switch, d.rule) == (True, Rule.MAX_PRECOPY)
    assert numbers(d)["elapsed_ms"] == 120_000
    assert "120 s cap" in d.text


def test_rules_are_ordered_downtime_first() -> None:
    fast = progress(sent=10**6, busy_ns=MS, size=96)
    assert decide(CFG, [fast], elapsed_ns=10 * CFG.max_precopy_ns).rule is Rule.DOWNTIME


# --- recovery_step ---------------------------------------------------------------------------

SET = StepKind.SET


@pytest.mark.parametrize(
    ("goal", "state", "kwargs", "expected"),
    [
        # a source rolled back before the commit point
        (Goal.RUNNING, _S.RUNNING, {}, RecoveryStep(StepKind.DONE)),
        (Goal.RUNNING, _S.PRE_COPY, {}, RecoveryStep(SET, _S.RUNNING)),
        (Goal.RUNNING, _S.PRE_COPY_P2P, {}, RecoveryStep(SET, _S.RUNNING)),
        (Goal.RUNNING, _S.STOP_COPY, {}, RecoveryStep(SET, _S.STOP)),  # never a blocked arc
        (Goal.RUNNING, _S.STOP, {}, RecoveryStep(SET, _S.RUNNING)),
        (Goal.RUNNING, _S.RUNNING_P2P, {}, RecoveryStep(SET, _S.RUNNING)),
        (Goal.RUNNING, _S.ERROR, {}, RecoveryStep(StepKind.RESET)),
        (Goal.RUNNING, _S.RESUMING, {}, RecoveryStep(StepKind.RESET)),
        (Goal.RUNNING, None, {}, RecoveryStep(StepKind.RESET)),
        (Goal.RUNNING, _S.STOP, {"failed": True}, RecoveryStep(StepKind.RESET)),
        (Goal.RUNNING, _S.STOP, {"failed": True, "reset_done": True}, RecoveryStep(StepKind.STUCK)),
        # several P2P sources come back together: wait at RUNNING_P2P
        (Goal.RUNNING, _S.STOP, {"staged": True}, RecoveryStep(SET, _S.RUNNING_P2P)),
        (Goal.RUNNING, _S.PRE_COPY_P2P, {"staged": True}, RecoveryStep(SET, _S.RUNNING_P2P)),
        (Goal.RUNNING, _S.STOP_COPY, {"staged": True}, RecoveryStep(SET, _S.STOP)),
        (Goal.RUNNING, _S.PRE_COPY, {"staged": True}, RecoveryStep(SET, _S.RUNNING)),
        (
            Goal.RUNNING,
            _S.RUNNING_P2P,
            {"staged": True, "peers_ready": False},
            RecoveryStep(StepKind.WAIT),
        ),
        (Goal.RUNNING, _S.RUNNING_P2P, {"staged": True}, RecoveryStep(SET, _S.RUNNING)),
        # a destination rolled back: reset whatever its state, once
        (Goal.RESET, _S.RESUMING, {}, RecoveryStep(StepKind.RESET)),
        (Goal.RESET, _S.STOP, {}, RecoveryStep(StepKind.RESET)),
        (Goal.RESET, _S.RUNNING, {"reset_done": True}, RecoveryStep(StepKind.DONE)),
        # parked stopped: a source after the commit point is never reset
        (Goal.STOP, _S.STOP_COPY, {"may_reset": False}, RecoveryStep(SET, _S.STOP)),
        (Goal.STOP, _S.STOP, {"may_reset": False}, RecoveryStep(StepKind.DONE)),
        (Goal.STOP, _S.ERROR, {"may_reset": False}, RecoveryStep(StepKind.STUCK)),
        (
            Goal.STOP,
            _S.STOP_COPY,
            {"may_reset": False, "failed": True},
            RecoveryStep(StepKind.STUCK),
        ),
        (Goal.STOP, _S.RUNNING_P2P, {}, RecoveryStep(SET, _S.STOP)),
        (Goal.STOP, _S.ERROR, {}, RecoveryStep(StepKind.RESET)),
        (Goal.STOP, _S.RUNNING, {"reset_done": True}, RecoveryStep(StepKind.DONE)),
        # a committed destination started by its agent
        (Goal.START, _S.STOP, {}, RecoveryStep(SET, _S.RUNNING)),
        (Goal.START, _S.STOP, {"staged": True}, RecoveryStep(SET, _S.RUNNING_P2P)),
        (Goal.START, _S.RESUMING, {}, RecoveryStep(StepKind.RESET)),
    ],
)
def test_recovery_step(
    goal: Goal, state: DeviceState | None, kwargs: dict[str, bool], expected: RecoveryStep
) -> None:
    assert recovery_step(goal, ALL, state, **kwargs) == expected


def test_a_state_the_flags_do_not_allow_is_reset_not_stepped() -> None:
    """A read-back of RUNNING_P2P from a device without P2P: no SET is valid from there."""
    flags = MigrationFlags.STOP_COPY
    assert recovery_step(Goal.RUNNING, flags, _S.RUNNING_P2P).kind is StepKind.RESET


@pytest.mark.parametrize("flags", fsm.FLAG_SETS, ids=fsm.flag_names)
@pytest.mark.parametrize("goal", [Goal.RUNNING, Goal.STOP, Goal.START])
@pytest.mark.parametrize("staged", [False, True])
def test_recovery_reaches_its_goal_through_allowed_sets(
    flags: MigrationFlags, goal: Goal, staged: bool
) -> None:
    """From every state the device may be in, successful steps reach the goal in few SETs,
    every SET is one vfmig allows, and none leaves RESUMING or ERROR."""
    staged = staged and MigrationFlags.P2P in flags
    want = _S.STOP if goal is Goal.STOP else _S.RUNNING
    for start in [s for s in DeviceState if fsm.supports(s, flags) or s is _S.ERROR]:
        state, reset_done = start, False
        for _ in range(4):
            step = recovery_step(goal, flags, state, reset_done=reset_done, staged=staged)
            if step.kind is StepKind.DONE:
                break
            if step.kind is StepKind.RESET:
                state, reset_done = _S.RUNNING, True
                continue
            assert step.kind is StepKind.SET, (start, step)
            assert step.target is not None
            assert state not in (_S.RESUMING, _S.ERROR)
            assert fsm.vfmig_refusal(state, step.target, flags) is None
            state = step.target
        else:
            pytest.fail(f"no rest from {start.name} towards {goal.value}")
        assert state is want or (reset_done and state is _S.RUNNING)


def test_recovery_never_resets_where_it_may_not() -> None:
    for state, failed in itertools.product([*DeviceState, None], [False, True]):
        step = recovery_step(Goal.STOP, ALL, state, failed=failed, may_reset=False)
        assert step.kind is not StepKind.RESET
