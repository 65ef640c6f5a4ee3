"""When to end precopy: pure functions over precopy and stream samples.

Theory of operation
-------------------
During precopy the source keeps running while its migration data streams to the
destination. Stopping it (switchover) starts the downtime, which lasts at least as long
as sending whatever the source still has to send. This module keeps, per pair, a
:class:`PairProgress` folded from two kinds of samples:

* stream samples (cumulative raw bytes read and *busy* time: time spent reading and
  sending, not waiting for the device to have data) give the throughput, an exponentially
  weighted moving average (EWMA) of ``bytes / busy time`` per sample;
* precopy samples (``VFIO_MIG_GET_PRECOPY_INFO``: initial and dirty bytes) and
  ``MIG_DATA_SIZE`` give the pending bytes and, between two precopy samples, the rate at
  which the device produces new data: ``(pending now - pending before + bytes sent
  meanwhile) / elapsed``.

:func:`decide` looks at every pair and names the first rule that fires, with its numbers:

1. ``downtime``: the estimated stop-copy time, all pending bytes over the summed
   throughput, is within the downtime limit (default 300 ms). Pending bytes are
   ``initial + dirty + MIG_DATA_SIZE``, summed as QEMU does
   (``hw/vfio/migration.c``, ``vfio_state_pending_exact``): conservative, because
   MIG_DATA_SIZE may already include the unsent precopy bytes. Without a data size or a
   throughput there is no estimate and this rule cannot fire.
2. ``stalled``: some pair's production rate was at or above its throughput for
   ``stall_samples`` precopy samples in a row: precopy is not making progress and waiting
   longer does not help.
3. ``max-precopy``: precopy has run for ``max_precopy`` (default 120 s).

Otherwise the rule is ``continue``. A REINIT (MIG_PRECOPY_INFOv2) restarts a pair's
production-rate history, because ``initial_bytes`` may jump anywhere. The decision is only
the policy's: the phase machine also waits for every switchover-ack.

Pure: stdlib only, no clock (times are sample arguments).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

from vfmig.core import fsm
from vfmig.core.errors import UsageError
from vfmig.core.fsm import DeviceState, MigrationFlags

if TYPE_CHECKING:
    from collections.abc import Sequence

NS_PER_S: Final = 1_000_000_000
NS_PER_MS: Final = 1_000_000

_S = DeviceState


class Rule(enum.Enum):
    CONTINUE = "continue"
    DOWNTIME = "downtime"
    STALLED = "stalled"
    MAX_PRECOPY = "max-precopy"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConvergenceConfig:
    """Limits of the switchover decision."""

    #: Downtime the stop-copy transfer may take (QEMU's default downtime-limit is 300 ms).
    downtime_limit_ns: int = 300 * NS_PER_MS
    #: Precopy never runs longer than this before switching over.
    max_precopy_ns: int = 120 * NS_PER_S
    #: Consecutive precopy samples without progress before giving up on convergence.
    stall_samples: int = 5
    #: Weight of the newest throughput sample in the EWMA (0 < w <= 1).
    ewma_weight: float = 0.25

    def __post_init__(self) -> None:
        if self.downtime_limit_ns <= 0 or self.max_precopy_ns <= 0:
            raise UsageError(
                "the downtime limit and the precopy time cap must be positive",
                hint="give both in milliseconds or seconds, greater than zero",
            )
        if self.stall_samples < 1:
            raise UsageError("stall_samples must be at least 1")
        if not 0.0 < self.ewma_weight <= 1.0:
            raise UsageError("ewma_weight must be in (0, 1]")


@dataclass(frozen=True, slots=True, kw_only=True)
class PairProgress:
    """What the policy knows about one pair's precopy. Fold samples in with the functions below."""

    sent: int = 0  #: raw bytes read from the source so far
    busy_ns: int = 0  #: time the stream spent reading and sending so far
    throughput: float | None = None  #: EWMA, raw bytes per second
    initial: int | None = None  #: initial_bytes of the last precopy sample
    dirty: int | None = None  #: dirty_bytes of the last precopy sample
    data_size: int | None = None  #: MIG_DATA_SIZE; None while unknown
    sample_ns: int | None = None  #: when the last precopy sample was taken
    sample_sent: int = 0  #: ``sent`` at that sample
    produce_rate: float | None = None  #: bytes per second the device produced, last interval
    stalled: int = 0  #: consecutive samples with produce_rate >= throughput

    @property
    def pending(self) -> int | None:
        """Bytes the stop-copy phase would still have to move, if every number is known."""
        if self.initial is None or self.dirty is None or self.data_size is None:
            return None
        return self.initial + self.dirty + self.data_size


def stream_sample(
    progress: PairProgress, config: ConvergenceConfig, *, sent: int, busy_ns: int
) -> PairProgress:
    """Fold in a stream sample (cumulative bytes and busy time)."""
    delta_bytes = sent - progress.sent
    delta_ns = busy_ns - progress.busy_ns
    if delta_bytes <= 0 or delta_ns <= 0:
        return replace(
            progress, sent=max(sent, progress.sent), busy_ns=max(busy_ns, progress.busy_ns)
        )
    rate = delta_bytes * NS_PER_S / delta_ns
    if progress.throughput is not None:
        rate = config.ewma_weight * rate + (1.0 - config.ewma_weight) * progress.throughput
    return replace(progress, sent=sent, busy_ns=busy_ns, throughput=rate)


def precopy_sample(
    progress: PairProgress,
    config: ConvergenceConfig,
    *,
    initial: int,
    dirty: int,
    reinit: bool,
    now_ns: int,
) -> PairProgress:
    """Fold in a ``VFIO_MIG_GET_PRECOPY_INFO`` sample taken at ``now_ns``."""
    fresh = replace(
        progress,
        initial=initial,
        dirty=dirty,
        sample_ns=now_ns,
        sample_sent=progress.sent,
    )
    if (
        reinit
        or progress.sample_ns is None
        or progress.initial is None
        or progress.dirty is None
        or now_ns <= progress.sample_ns
    ):
        return replace(fresh, produce_rate=None, stalled=0 if reinit else progress.stalled)
    produced = (
        (initial + dirty)
        - (progress.initial + progress.dirty)
        + (progress.sent - progress.sample_sent)
    )
    rate = max(produced, 0) * NS_PER_S / (now_ns - progress.sample_ns)
    if progress.throughput is None:
        stalled = progress.stalled
    elif rate >= progress.throughput:
        stalled = progress.stalled + 1
    else:
        stalled = 0
    return replace(fresh, produce_rate=rate, stalled=stalled)


def data_size_sample(progress: PairProgress, size: int | None) -> PairProgress:
    """Fold in a MIG_DATA_SIZE answer (None when the query failed: size unknown)."""
    return replace(progress, data_size=size)


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's verdict: switch over or not, the rule that fired, and its numbers."""

    switch: bool
    rule: Rule
    numbers: tuple[tuple[str, float], ...]
    text: str


def decide(
    config: ConvergenceConfig, pairs: Sequence[PairProgress], *, elapsed_ns: int
) -> Decision:
    """Apply the rules in order (see the module docstring) to every pair's progress."""
    numbers: list[tuple[str, float]] = [
        ("elapsed_ms", elapsed_ns / NS_PER_MS),
        ("max_precopy_ms", config.max_precopy_ns / NS_PER_MS),
        ("downtime_limit_ms", config.downtime_limit_ns / NS_PER_MS),
    ]
    pending = [p.pending for p in pairs]
    rates = [p.throughput for p in pairs]
    estimate_ns: float | None = None
    if pairs and None not in pending and None not in rates:
        total_pending = sum(p for p in pending if p is not None)
        total_rate = sum(r for r in rates if r is not None)
        estimate_ns = total_pending * NS_PER_S / total_rate
        numbers += [
            ("pending_bytes", float(total_pending)),
            ("throughput_bps", total_rate),
            ("estimate_ms", estimate_ns / NS_PER_MS),
        ]
    stalled = max((p.stalled for p in pairs), default=0)
    numbers.append(("stalled_samples", float(stalled)))
    limit_ms = config.downtime_limit_ns / NS_PER_MS
    if estimate_ns is not None and estimate_ns <= config.downtime_limit_ns:
        text = (
            f"estimated stop-copy time {estimate_ns / NS_PER_MS:.1f} ms is within the "
            f"{limit_ms:g} ms downtime limit"
        )
        return Decision(True, Rule.DOWNTIME, tuple(numbers), text)
    if stalled >= config.stall_samples:
        text = (
            f"precopy is not making progress: the device produced data at least as fast as "
            f"it was sent for {stalled} samples"
        )
        return Decision(True, Rule.STALLED, tuple(numbers), text)
    if elapsed_ns >= config.max_precopy_ns:
        text = f"precopy reached its {config.max_precopy_ns / NS_PER_S:g} s cap"
        return Decision(True, Rule.MAX_PRECOPY, tuple(numbers), text)
    if estimate_ns is None:
        text = "precopy continues: no downtime estimate yet (throughput or sizes unknown)"
    else:
        text = (
            f"precopy continues: estimated stop-copy time {estimate_ns / NS_PER_MS:.1f} ms "
            f"exceeds the {limit_ms:g} ms downtime limit"
        )
    return Decision(False, Rule.CONTINUE, tuple(numbers), text)


# --- recovery: the way back, one device at a time ---------------------------------------


class Goal(enum.Enum):
    RUNNING = "running"  #: a source before the commit point: RUNNING, through the FSM
    RESET = "reset"  #: a destination before the commit point: reset, whatever its state
    STOP = "stop"  #: stopped, never running: a source after the commit point or in doubt
    START = "start"  #: a committed destination: RUNNING


class StepKind(enum.Enum):
    SET = "set"
    RESET = "reset"
    WAIT = "wait"  #: staged: at RUNNING_P2P until every peer is there
    DONE = "done"
    STUCK = "stuck"  #: needs a reset it may not have (a source after the commit point)


@dataclass(frozen=True, slots=True)
class RecoveryStep:
    kind: StepKind
    target: DeviceState | None = None


def recovery_step(
    goal: Goal,
    flags: MigrationFlags,
    state: DeviceState | None,
    *,
    failed: bool = False,
    reset_done: bool = False,
    may_reset: bool = True,
    staged: bool = False,
    peers_ready: bool = True,
) -> RecoveryStep:
    """The next step bringing one device towards ``goal`` from ``state`` (None: unknown).

    ``failed``: a recovery SET already failed on it (the next step is the last resort, a
    reset). ``may_reset``: False where a reset must never happen -- it makes a device run.
    ``staged``: several P2P devices come back together: each waits at RUNNING_P2P until
    ``peers_ready`` (every peer at RUNNING_P2P or running) before it runs.
    A device in ERROR, in RESUMING (mtty oopses on leaving it after a reopen) or in an
    unknown state is reset; STOP_COPY goes to STOP first; a SET vfmig refuses is never
    chosen (:func:`vfmig.core.fsm.vfmig_refusal`): the reset is chosen instead.
    """
    last_resort = RecoveryStep(StepKind.RESET if may_reset and not reset_done else StepKind.STUCK)
    if goal is Goal.RESET:
        return RecoveryStep(StepKind.DONE if reset_done else StepKind.RESET)
    want = _S.STOP if goal is Goal.STOP else _S.RUNNING
    if state is want or (reset_done and state is _S.RUNNING):
        return RecoveryStep(StepKind.DONE)
    if failed or state is None or state in (_S.ERROR, _S.RESUMING):
        return last_resort
    if goal is Goal.STOP or state is _S.STOP_COPY:
        target = _S.STOP
    elif staged and state in (_S.STOP, _S.PRE_COPY_P2P):
        target = _S.RUNNING_P2P
    elif staged and state is _S.RUNNING_P2P and not peers_ready:
        return RecoveryStep(StepKind.WAIT)
    else:
        target = _S.RUNNING
    if fsm.vfmig_refusal(state, target, flags) is not None:
        return last_resort
    return RecoveryStep(StepKind.SET, target)


def staging_ready(state: DeviceState | None) -> bool:
    """Whether a staged peer no longer holds the others back (at RUNNING_P2P or running)."""
    return state in (_S.RUNNING_P2P, _S.RUNNING, _S.PRE_COPY)
