"""The progress display, fed event lists with their times: plain lines, live bars, the summary."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from rich.console import Console

from vfmig.cli.context import Environment
from vfmig.cli.progress import ProgressDisplay, human_rate, human_size, human_time
from vfmig.core.events import (
    ChunkReceived,
    ChunkSent,
    DataSizeSampled,
    DecisionMade,
    DeviceHung,
    DeviceOpened,
    ErrorRaised,
    Event,
    PhaseChanged,
    PrecopySampled,
    RunFinished,
    StateChanged,
    StreamEnded,
    summary_of,
)
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.core.model import Cause, Outcome, Phase, destination, source

if TYPE_CHECKING:
    from pathlib import Path

MS = 1_000_000
MiB = 1 << 20
SRC, DST = source(0), destination(0)
ALL = MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY


def phase(at: int, new: Phase, old: Phase | None) -> tuple[int, Event]:
    return at * MS, PhaseChanged(phase=new, previous=old)


def chunk(at: int, seq: int, raw: int, wire: int, final: bool = False) -> list[tuple[int, Event]]:
    return [
        (at * MS, ChunkSent(device=SRC, seq=seq, offset=0, raw=raw, wire=wire, final=final)),
        (at * MS, ChunkReceived(device=DST, seq=seq, offset=0, raw=raw, wire=wire, final=final)),
    ]


def opened(at: int, size: int) -> list[tuple[int, Event]]:
    return [
        (
            at * MS,
            DeviceOpened(device=dev, identity=f"h/{dev}", flags=ALL, state=state, data_size=size),
        )
        for dev, state in ((SRC, DeviceState.RUNNING), (DST, DeviceState.RUNNING))
    ]


def precopy_run() -> list[tuple[int, Event]]:
    """A one-pair run with precopy: 4 MiB chunks every 100 ms, 3:1 compression."""
    events = [phase(0, Phase.PREFLIGHT, None), *opened(5, 64 * MiB)]
    events += [phase(10, Phase.SETUP, Phase.PREFLIGHT), phase(20, Phase.PRECOPY, Phase.SETUP)]
    events.append((25 * MS, PrecopySampled(device=SRC, initial=64 * MiB, dirty=0, reinit=False)))
    for i in range(16):  # 64 MiB of precopy from 100 ms to 1600 ms
        events += chunk(100 + 100 * i, i, 4 * MiB, 4 * MiB // 3)
        if i == 7:
            sample = PrecopySampled(device=SRC, initial=32 * MiB, dirty=2 * MiB, reinit=False)
            events.append(((100 + 100 * i) * MS, sample))
            events.append(((100 + 100 * i) * MS, DataSizeSampled(device=SRC, size=8 * MiB)))
    events.append(
        (1650 * MS, DecisionMade(rule="downtime", numbers=(), text="estimate 80 ms <= 300 ms"))
    )
    events += [
        phase(1700, Phase.SWITCHOVER, Phase.PRECOPY),
        phase(1710, Phase.STOPCOPY, Phase.SWITCHOVER),
    ]
    events += chunk(1800, 16, 4 * MiB, 4 * MiB // 3)
    events += chunk(1900, 17, 4 * MiB, 4 * MiB // 3)
    events += chunk(1950, 18, 0, 8, final=True)
    events.append((1960 * MS, StreamEnded(device=DST, total=72 * MiB, digest_ok=True)))
    events.append(phase(1970, Phase.RESUME, Phase.STOPCOPY))
    events.append(
        (
            2000 * MS,
            StateChanged(device=DST, before=DeviceState.RESUMING, after=DeviceState.STOP, step=""),
        )
    )
    events.append(phase(2010, Phase.COMMIT, Phase.RESUME))
    events.append(
        (
            2030 * MS,
            StateChanged(
                device=DST, before=DeviceState.RUNNING_P2P, after=DeviceState.RUNNING, step=""
            ),
        )
    )
    events.append(phase(2040, Phase.FINISHED, Phase.COMMIT))
    events.append(
        (
            2041 * MS,
            RunFinished(
                outcome=Outcome.COMPLETED, exit_status=0, summary="completed: 1 pair migrated"
            ),
        )
    )
    return events


def plain(events: list[tuple[int, Event]], **kwargs: object) -> list[str]:
    out = io.StringIO()
    env = Environment(stdout=out, stderr=io.StringIO(), stdout_isatty=False)
    with ProgressDisplay(env, live=False, **kwargs) as display:  # type: ignore[arg-type]
        for at, event in events:
            display.handle(event, at_ns=at)
    return out.getvalue().splitlines()


def test_human_units() -> None:
    assert [human_size(n) for n in (0, 1023, 1536, 230 * MiB, 3 << 40)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "230.0 MiB",
        "3.0 TiB",
    ]
    assert [human_time(ns) for ns in (850_000, 42 * MS, 3210 * MS, 125_000 * MS)] == [
        "0.85 ms",
        "42 ms",
        "3.21 s",
        "2m05s",
    ]
    assert (human_rate(None), human_rate(2 * MiB)) == ("-", "2.0 MiB/s")


def test_plain_lines_phases_progress_and_summary() -> None:
    names = {SRC: "sim:src,size=64MiB,seed=1@10.0.0.2:7300", DST: "vfio:0000:3b:00.1,iommu=group"}
    lines = plain(precopy_run(), names=names)
    progress = [
        line
        for line in lines
        if re.match(r"\[ *[0-9.]+s\] (precopy|stopcopy|drained|verified) ", line)
    ]
    assert lines[:5] == [
        "[   0.0s] phase preflight",
        "pair 0: src0 sim:src@10.0.0.2:7300 -> dst0 vfio:0000:3b:00.1",
        "[   0.0s] phase setup",
        "[   0.0s] phase precopy",
        "[   0.1s] precopy    6% src0 sim:src@10.0.0.2:7300: 4.0 MiB of ~64.0 MiB, "
        "wire 1.3 MiB (3.00x), -, precopy initial 64.0 MiB dirty 0 B",
    ]
    # one progress line a second (0.1 s, 1.1 s), then one at the end of the stream and its check
    assert [line[:9] for line in progress] == ["[   0.1s]", "[   1.1s]", "[   1.9s]", "[   2.0s]"]
    assert progress[1] == (
        "[   1.1s] precopy   66% src0 sim:src@10.0.0.2:7300: 44.0 MiB of ~66.0 MiB, "
        "wire 14.7 MiB (3.00x), 40.0 MiB/s, precopy initial 32.0 MiB dirty 2.0 MiB, ETA 550 ms"
    )
    assert progress[2].startswith(
        "[   1.9s] drained  100% src0 sim:src@10.0.0.2:7300: 72.0 MiB of ~72.0 MiB"
    )
    assert progress[3].startswith("[   2.0s] verified 100% src0 sim:src@10.0.0.2:7300: 72.0 MiB")
    assert "[   1.6s] decision downtime: estimate 80 ms <= 300 ms" in lines
    assert "[   2.0s] completed: 1 pair migrated" in lines
    tail = lines[lines.index("completed in 2.04 s") :]
    assert tail[1:5] == [
        "",
        "stream per device",
        "device                         time        raw       wire   ratio   throughput",
        "-" * 78,
    ]
    assert tail[5].split() == [
        "src0",
        "sim:src@10.0.0.2:7300",
        "1.85",
        "s",
        "72.0",
        "MiB",
        "24.0",
        "MiB",
        "3.00x",
        "38.9",
        "MiB/s",
    ]
    assert tail[6].split()[:2] == ["dst0", "vfio:0000:3b:00.1"]
    phases = {line.split()[0]: line.split()[1:] for line in tail[11:18]}
    assert list(phases) == [
        "preflight",
        "setup",
        "precopy",
        "switchover",
        "stopcopy",
        "resume",
        "commit",
    ]
    assert phases["precopy"] == [
        "1.68",
        "s",
        "64.0",
        "MiB",
        "21.3",
        "MiB",
        "3.00x",
        "38.1",
        "MiB/s",
    ]
    assert phases["setup"] == ["10", "ms", "-", "-", "-", "-"]
    assert "downtime 330 ms" in tail
    parts = {
        " ".join(line.split()[:-3]): line.split()[-3:]
        for line in tail[tail.index("downtime 330 ms") + 3 :]
    }
    assert parts == {
        "quiesce": ["10", "ms", "3%"],
        "stop-copy drain": ["240", "ms", "73%"],
        "transfer": ["0.00", "ms", "0%"],
        "resume write": ["20", "ms", "6%"],
        "validation": ["40", "ms", "12%"],
        "start": ["20", "ms", "6%"],
    }


def test_at_most_one_progress_line_a_second() -> None:
    events = [*opened(0, 1000 * MiB), phase(0, Phase.PRECOPY, None)]
    for i in range(300):  # a chunk every 10 ms for 3 s
        events += chunk(10 * i, i, MiB, MiB)
    lines = plain(events)
    progress = [line for line in lines if " src0: " in line]
    assert [line[:9] for line in progress] == ["[   0.0s]", "[   1.0s]", "[   2.0s]"]


def test_a_run_without_precopy_estimates_from_mig_data_size() -> None:
    events = [*opened(0, 100 * MiB), phase(0, Phase.STOPCOPY, None)]
    events += chunk(1000, 0, 50 * MiB, 10 * MiB)
    events += chunk(2000, 1, 25 * MiB, 5 * MiB)
    events += chunk(3000, 2, 25 * MiB, 5 * MiB)  # all of the estimate, no end of stream yet
    lines = [line for line in plain(events) if " src0: " in line]
    assert lines == [
        "[   1.0s] stopcopy  50% src0: 50.0 MiB of ~100.0 MiB, wire 10.0 MiB (5.00x), -",
        "[   2.0s] stopcopy  75% src0: 75.0 MiB of ~100.0 MiB, wire 15.0 MiB (5.00x), "
        "25.0 MiB/s, ETA 1.00 s",
        "[   3.0s] stopcopy 100% src0: 100.0 MiB of ~100.0 MiB, wire 20.0 MiB (5.00x), 25.0 MiB/s",
    ]


def test_stop_copy_takes_the_last_mig_data_size_as_what_is_left() -> None:
    events = [*opened(0, 100 * MiB), phase(0, Phase.PRECOPY, None)]
    events.append((0, PrecopySampled(device=SRC, initial=100 * MiB, dirty=0, reinit=False)))
    events += chunk(100, 0, 90 * MiB, 90 * MiB)
    events.append((150 * MS, DataSizeSampled(device=SRC, size=30 * MiB)))
    events.append(phase(200, Phase.STOPCOPY, Phase.PRECOPY))
    events += chunk(1300, 1, 15 * MiB, 15 * MiB)
    lines = [line for line in plain(events) if " src0: " in line]
    assert lines[-1] == (
        "[   1.3s] stopcopy  87% src0: 105.0 MiB of ~120.0 MiB, wire 105.0 MiB (1.00x), "
        "12.5 MiB/s, ETA 1.20 s"
    )


def test_errors_hangs_and_a_failed_run() -> None:
    error = ErrorRaised(
        device=DST,
        phase=Phase.RESUME,
        step="RESUMING>STOP",
        errno=22,
        cause=Cause.STREAM_REJECTED,
        message="the destination rejected the migration data",
        hint="check that both devices are of the same type",
    )
    hung = DeviceHung(
        device=SRC,
        phase=Phase.ROLLBACK,
        step="STOP_COPY>STOP",
        state=DeviceState.STOP_COPY,
        target=DeviceState.STOP,
    )
    events = [
        phase(0, Phase.RESUME, None),
        (5 * MS, error),
        (6 * MS, hung),
        phase(7, Phase.ROLLBACK, Phase.RESUME),
        (9 * MS, RunFinished(outcome=Outcome.FAILED, exit_status=1, summary="failed: rolled back")),
    ]
    lines = plain(events, names={DST: "the destination"})
    assert lines[:6] == [
        "[   0.0s] phase resume",
        "[   0.0s] error dst0 the destination: RESUMING>STOP: "
        "the destination rejected the migration data (EINVAL)",
        "          hint: check that both devices are of the same type",
        "[   0.0s] HUNG src0: STOP_COPY>STOP towards STOP (last state STOP_COPY)",
        "[   0.0s] phase rollback",
        "[   0.0s] failed: rolled back",
    ]
    assert lines[6] == "failed in 9 ms"
    assert not any(line.startswith("downtime") for line in lines)


def test_close_shows_a_given_summary_once_and_later_events_are_ignored() -> None:
    out = io.StringIO()
    display = ProgressDisplay(Environment(stdout=out, stdout_isatty=False), live=False)
    display.handle(PhaseChanged(phase=Phase.PREFLIGHT, previous=None), at_ns=0)
    display.close(summary_of(precopy_run()))
    display.close()
    display.handle(PhaseChanged(phase=Phase.SETUP, previous=None), at_ns=MS)
    text = out.getvalue()
    assert text.count("completed in 2.04 s") == 1
    assert "phase setup" not in text
    assert display.summary.phases.keys() == {Phase.PREFLIGHT}


def test_without_a_time_the_display_stamps_events_itself() -> None:
    out = io.StringIO()
    with ProgressDisplay(Environment(stdout=out, stdout_isatty=False), live=False) as display:
        display.handle(PhaseChanged(phase=Phase.PREFLIGHT, previous=None))
        display.handle(RunFinished(outcome=Outcome.COMPLETED, exit_status=0, summary="ok"))
        assert display.summary.total_ns >= 0
    assert out.getvalue().splitlines()[0] == "[   0.0s] phase preflight"


def live_output(events: list[tuple[int, Event]]) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    display = ProgressDisplay(Environment(stdout=out), live=True, console=console)
    with display:
        for at, event in events:
            display.handle(event, at_ns=at)
    return out.getvalue()


def test_live_bars_show_phase_bytes_rate_eta_and_precopy() -> None:
    text = live_output(precopy_run())
    assert "src0 -> dst0 precopy" in text
    assert re.search(r"src0 -> dst0 precopy +━+╸? +60% 40\.0 MiB of ~66\.0 MiB\n", text)
    assert (
        "  40.0 MiB/s, ETA 650 ms, wire 13.3 MiB (3.00x), initial 32.0 MiB, dirty 2.0 MiB" in text
    )
    assert re.search(r"src0 -> dst0 stopcopy +━+ +94% 68\.0 MiB of ~72\.0 MiB\n", text)
    assert "  37.6 MiB/s, ETA 106 ms, wire 22.7 MiB (3.00x)\r" in text
    assert re.search(r"src0 -> dst0 verified +━+ +100% 72\.0 MiB of ~72\.0 MiB", text)
    assert "[   1.7s] phase switchover" in text  # log lines go above the bars
    final = text[text.index("completed in 2.04 s") :]
    assert "stream per device" in final
    assert "downtime 330 ms" in final
    assert "─" in final  # terminal tables are drawn with box characters


def test_live_redraws_at_most_eight_times_a_second_of_event_time() -> None:
    events = [*opened(0, 1000 * MiB), phase(0, Phase.PRECOPY, None)]
    for i in range(1000):  # a chunk every ms for one second
        events += chunk(i, i, MiB, MiB)
    text = live_output(events)
    # every redraw writes the bar line once; the final one comes from close()
    assert 8 <= text.count("src0 -> dst0 precopy") <= 8 + 1 + 1


def test_the_display_does_not_load_textual(tmp_path: Path) -> None:
    code = "import sys, vfmig.cli.progress; print('textual' in sys.modules, 'trio' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("live", [False, True])
def test_an_empty_run_still_closes_cleanly(live: bool) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=live, width=100) if live else None
    ProgressDisplay(Environment(stdout=out), live=live, console=console).close()
    assert "unfinished in 0.00 ms" in out.getvalue()
