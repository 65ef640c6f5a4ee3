"""Journals the engine itself produces: a local-mode run recorded from the bus.

The orchestrator and its in-process agent migrate simulated devices while the recorder task
writes the bus to a journal; the journal must then fold to the summary the orchestrator
computed live (one reducer: live and replay cannot disagree) and be diagnosed as the run
actually went.
"""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING

import pytest
import trio

from vfmig.core import events as ev
from vfmig.core.diagnose import Diagnoser
from vfmig.core.events import summarize
from vfmig.core.model import Outcome, destination, source
from vfmig.core.phases import MachineConfig
from vfmig.core.spec import parse_spec
from vfmig.core.view import RunView, reduce
from vfmig.engine.agent import AgentConfig
from vfmig.engine.bus import EventBus, Lossless
from vfmig.engine.local import LocalAgent
from vfmig.engine.orchestrator import LOCAL, Orchestrator, OrchestratorConfig
from vfmig.journal.codec import DeviceInfo, EventRecord, JournalHeader
from vfmig.journal.reader import JournalReader
from vfmig.journal.recorder import record
from vfmig.journal.writer import JournalWriter

if TYPE_CHECKING:
    from pathlib import Path

    from vfmig.engine.orchestrator import RunReport

MIB = 1 << 20


async def journaled_run(path: Path, src: str, dst: str) -> RunReport:
    specs = [(parse_spec(src), parse_spec(dst))]
    header = JournalHeader(
        host="test",
        role="orchestrator",
        run_id="engine",
        kernel="",
        start_wall_ns=time.time_ns(),
        start_mono_ns=int(trio.current_time() * 1e9),
        devices=(DeviceInfo(id=source(0), spec=src), DeviceInfo(id=destination(0), spec=dst)),
    )
    bus = EventBus()
    recorded = trio.Event()

    async def recorder(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await record(
                bus.subscribe(Lossless()),
                JournalWriter.create(path, header),
                task_status=task_status,
            )
        finally:
            recorded.set()

    async with trio.open_nursery() as nursery:
        local = LocalAgent(AgentConfig(name="local", key=None, step_timeout=10.0))
        await nursery.start(local.run)
        await nursery.start(recorder)
        config = OrchestratorConfig(machine=MachineConfig(step_timeout_ns=10**10))
        orchestrator = Orchestrator(specs, {LOCAL: local.endpoint()}, bus, config)
        with trio.fail_after(60):
            report = await orchestrator.run()
        bus.close()
        with trio.fail_after(30):
            await recorded.wait()
        nursery.cancel_scope.cancel()
    return report


def fold(path: Path) -> tuple[RunView, Diagnoser, list[ev.Event]]:
    model = RunView()
    diagnoser = Diagnoser()
    found = []
    with JournalReader(path) as reader:
        for entry in reader.entries():
            if isinstance(entry, EventRecord):
                model = reduce(model, entry)
                diagnoser.feed(entry)
                found.append(entry.event)
        assert reader.status.intact
    return model, diagnoser, found


@pytest.mark.trio
async def test_a_completed_engine_run_replays_to_the_live_summary(tmp_path: Path) -> None:
    src = f"sim:a,size=3MiB,state-dir={tmp_path / 'a'}"
    dst = f"sim:b,size=3MiB,dump={tmp_path / 'b.bin'},state-dir={tmp_path / 'b'}"
    report = await journaled_run(tmp_path / "run.vfj", src, dst)
    assert report.outcome is Outcome.COMPLETED
    model, diagnoser, found = fold(tmp_path / "run.vfj")
    assert model.summary == summarize(report.tally)
    assert model.summary.devices[source(0)].raw_bytes >= 3 * MIB
    assert diagnoser.result().cause == "completed"
    assert isinstance(found[-1], ev.RunFinished)
    assert any(isinstance(e, ev.ChunkReceived) for e in found)


@pytest.mark.trio
async def test_a_refused_write_in_an_engine_run_is_diagnosed(tmp_path: Path) -> None:
    src = f"sim:a,size=3MiB,state-dir={tmp_path / 'a'}"
    dst = f"sim:b,size=3MiB,write-error=1MiB:ENOMEM,state-dir={tmp_path / 'b'}"
    report = await journaled_run(tmp_path / "run.vfj", src, dst)
    assert report.outcome is Outcome.FAILED
    model, diagnoser, _ = fold(tmp_path / "run.vfj")
    assert model.summary == summarize(report.tally)
    result = diagnoser.result()
    assert result.cause == "write-refused"
    assert result.device == destination(0)
    assert result.errno == errno.ENOMEM
    assert any("ENOMEM" in line for line in result.evidence)


@pytest.mark.trio
async def test_a_size_mismatch_in_an_engine_run_is_diagnosed(tmp_path: Path) -> None:
    src = f"sim:a,size=3MiB,state-dir={tmp_path / 'a'}"
    dst = f"sim:b,size=1MiB,state-dir={tmp_path / 'b'}"
    report = await journaled_run(tmp_path / "run.vfj", src, dst)
    assert report.outcome is Outcome.FAILED
    _, diagnoser, _ = fold(tmp_path / "run.vfj")
    result = diagnoser.result()
    assert result.cause == "size-mismatch"
    assert any("differs from" in line for line in result.evidence)
    # the engine samples debugfs at open only: an old sample is not held against the driver
    assert result.after is not None
    assert result.after.stale
    assert not any("debugfs reads" in line for line in result.evidence)
