"""The flight recorder wired to the engine: ``vfmig migrate`` and ``vfmig agent`` journal
every run, and the journal commands read what they wrote.

Local-mode runs go through the CLI in this process; agents are real processes. The
default journal store is the test's own (``$VFMIG_JOURNAL_DIR``, set by the top-level
conftest), never the real one.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import signal
import stat
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from vfmig.core import events as ev
from vfmig.core.fsm import DeviceState
from vfmig.core.model import Outcome, destination, source
from vfmig.core.phases import MachineConfig, PrecopyMode
from vfmig.core.spec import parse_spec
from vfmig.engine.agent import AgentConfig
from vfmig.engine.bus import EventBus, Lossless
from vfmig.engine.local import LocalAgent
from vfmig.engine.orchestrator import LOCAL, Orchestrator, OrchestratorConfig
from vfmig.journal.codec import DataRecord, DeviceInfo, EventRecord, JournalHeader
from vfmig.journal.reader import JournalReader
from vfmig.journal.recorder import Written, bus_clock, record
from vfmig.journal.writer import JournalWriter

if TYPE_CHECKING:
    from vfmig.engine.bus import Record

S = DeviceState
MIB = 1 << 20


def records(path: Path) -> list[EventRecord]:
    with JournalReader(path) as reader:
        found = [e for e in reader.entries() if isinstance(e, EventRecord)]
        assert reader.status.intact, reader.status
    return found


def events_of(path: Path) -> list[ev.Event]:
    return [r.event for r in records(path)]


def sets_of(found: list[ev.Event], dev: object) -> list[int]:
    """The targets of every SET ioctl of ``dev``, in order."""
    return [
        dict(e.args)["device_state"]
        for e in found
        if isinstance(e, ev.IoctlCompleted) and e.device == dev and ("set", 1) in e.args
    ]


# --- a local run, journaled ------------------------------------------------------------------


def test_a_local_run_is_journaled_whole(sims, cli, diagnose, tmp_path: Path) -> None:
    src = sims.spec("a", size=3 * MIB)
    dst = sims.spec("b", size=3 * MIB, image=False, dump=True)
    path = tmp_path / "run.vfj"
    result = cli("migrate", "--json", "--journal", str(path), src, dst)
    assert result.status == 0, result.stdout + result.stderr
    envelope = json.loads(result.stdout)["result"]
    assert envelope["journal"] == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    with JournalReader(path) as reader:
        header = reader.header
    assert header.role == "orchestrator"
    assert header.run_id == envelope["run"]
    assert header.kernel == platform.release()
    assert [(d.id, d.spec) for d in header.devices] == [(source(0), src), (destination(0), dst)]
    assert not header.data

    found = records(path)
    kinds = {type(r.event) for r in found}
    assert {ev.DeviceOpened, ev.ChunkSent, ev.ChunkReceived, ev.RunFinished} <= kinds
    # the agent's events carry its origin; the machine's the orchestrator's
    assert {r.origin for r in found if isinstance(r.event, ev.ChunkReceived)} == {LOCAL}
    assert {r.origin for r in found if isinstance(r.event, ev.PhaseChanged)} == {"orchestrator"}

    # every ioctl: each state change of a SET has its SET, with the uAPI args diagnose reads
    events = [r.event for r in found]
    for dev in (source(0), destination(0)):
        changes = [
            int(e.after)
            for e in events
            if isinstance(e, ev.StateChanged) and e.device == dev and e.step != "reset"
        ]
        assert changes, dev
        assert sets_of(events, dev) == changes
    ioctls = [e for e in events if isinstance(e, ev.IoctlCompleted)]
    assert {e.name for e in ioctls} == {"VFIO_DEVICE_FEATURE", "VFIO_MIG_GET_PRECOPY_INFO"}
    assert any(("feature", 9) in e.args for e in ioctls)  # MIG_DATA_SIZE
    assert all(e.errno is None and e.duration_ns >= 0 for e in ioctls)
    assert any(isinstance(e, ev.PrecopySampled) for e in events)

    # the commit point comes before the destination is asked to run
    commit = next(r.seq for r in found if isinstance(r.event, ev.CommitPointPassed))
    run = next(
        r.seq
        for r in found
        if isinstance(r.event, ev.IoctlCompleted)
        and r.event.device == destination(0)
        and ("device_state", int(S.RUNNING)) in r.event.args
    )
    assert commit < run
    assert sum(isinstance(e, ev.CommitPointPassed) for e in events) == 1

    verify = cli("journal", "verify", str(path))
    assert verify.status == 0, verify.stdout + verify.stderr
    replay = cli("replay", str(path))
    assert replay.status == 0
    assert "completed" in replay.stdout
    assert "RUNNING>PRE_COPY" in replay.stdout
    diagnosis = diagnose(path)
    assert diagnosis["cause"] == "completed"


def test_without_journal_the_run_goes_to_the_store(sims, cli, journal_store: Path) -> None:
    for name in ("a", "c", "e"):
        src = sims.spec(name, size=MIB)
        dst = sims.spec(name + "2", size=MIB, image=False)
        result = cli("migrate", "--keep-journals", "2", src, dst)
        assert result.status == 0, result.stdout + result.stderr
        shown = result.stdout.strip().splitlines()[-1]
        assert shown.startswith("journal: ")
        assert Path(shown.removeprefix("journal: ")).parent == journal_store
    kept = sorted(journal_store.iterdir())
    assert len(kept) == 2
    assert all("-orchestrator-" in p.name for p in kept)
    assert stat.S_IMODE(journal_store.stat().st_mode) == 0o700
    assert cli("journal", "verify", "@last").status == 0


def test_journal_data_then_load_gives_the_same_state(sims, cli, tmp_path: Path) -> None:
    src = sims.spec("a", size=3 * MIB)
    dst = sims.spec("b", size=3 * MIB, image=False, dump=True)
    path = tmp_path / "run.vfj"
    result = cli("migrate", "--journal", str(path), "--journal-data", src, dst)
    assert result.status == 0, result.stdout + result.stderr
    with JournalReader(path) as reader:
        assert reader.header.data
        data = [e for e in reader.entries() if isinstance(e, DataRecord)]
    assert data
    assert {d.device for d in data} == {source(0)}  # a stream is its source's
    spare = sims.spec("spare", size=3 * MIB, image=False, dump=True)
    loaded = cli("load", "--journal", str(tmp_path / "load.vfj"), str(path), spare)
    assert loaded.status == 0, loaded.stdout + loaded.stderr
    assert sims.dump("spare") == sims.dump("b") == sims.image("a")


# --- failures, diagnosed from the journal -----------------------------------------------------


FAILURES = {
    "write-refused": (
        {"size": 3 * MIB},
        {"size": 3 * MIB, "write_error": "1MiB:ENOMEM"},
        (),
        ("write-refused", "dst0", errno.ENOMEM),
    ),
    "size-mismatch": (
        {"size": 3 * MIB},
        {"size": MIB},
        (),
        ("size-mismatch", "dst0", None),
    ),
    "hung-arc": (
        {"size": MIB},
        {"size": MIB, "hang": "STOP>RESUMING"},
        ("--timeout", "0.5"),
        ("hung", "dst0", None),
    ),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_a_failed_run_is_diagnosed_from_its_journal(
    sims, cli, diagnose, tmp_path: Path, case: str
) -> None:
    src_opts, dst_opts, extra, (cause, device, code) = FAILURES[case]
    src = sims.spec("a", **src_opts)
    dst = sims.spec("b", image=False, **dst_opts)
    path = tmp_path / "run.vfj"
    result = cli("migrate", "--journal", str(path), *extra, src, dst)
    assert result.status != 0
    assert cli("journal", "verify", str(path)).status == 0
    diagnosis = diagnose(path)
    assert diagnosis["cause"] == cause, diagnosis
    assert diagnosis["device"] == device
    if code is not None:
        assert diagnosis["errno"] == code
    replay = cli("replay", str(path))
    assert replay.status == 0
    found = events_of(path)
    if case == "hung-arc":
        assert diagnosis["step"] == "RUNNING>RESUMING"  # the request whose path hung
        assert diagnosis["phase"] == "setup"
        hung = [e for e in found if isinstance(e, ev.DeviceHung)]
        assert hung
        assert hung[0].device == destination(0)
    if case == "write-refused":
        assert diagnosis["step"].startswith("data write")
    if case == "size-mismatch":
        sizes = {e.device: e.data_size for e in found if isinstance(e, ev.DeviceOpened)}
        assert sizes[source(0)] > 3 * MIB > sizes[destination(0)]  # stream framing on top


# --- the commit point is on disk before the agents hear the Commit ---------------------------


@pytest.mark.trio
async def test_the_commit_point_is_on_disk_before_any_agent_commits(tmp_path: Path) -> None:
    src = f"sim:a,size=2MiB,state-dir={tmp_path / 'a'}"
    dst = f"sim:b,size=2MiB,state-dir={tmp_path / 'b'}"
    path = tmp_path / "run.vfj"
    header = JournalHeader(
        host="test",
        role="orchestrator",
        run_id="commit",
        kernel="",
        start_wall_ns=time.time_ns(),
        start_mono_ns=int(trio.current_time() * 1e9),
        devices=(DeviceInfo(id=source(0), spec=src), DeviceInfo(id=destination(0), spec=dst)),
    )
    writer = JournalWriter.create(path, header, mono_clock=bus_clock())
    bus = EventBus()
    written = Written()
    seen: list[tuple[bool, bool]] = []
    local = LocalAgent(AgentConfig(name="local", key=None, step_timeout=10.0))

    async def hook(commit: Record) -> None:
        assert await written.wait(commit.seq)
        with JournalReader(path) as reader:  # what a crash now would leave
            on_disk = any(
                isinstance(e, EventRecord) and isinstance(e.event, ev.CommitPointPassed)
                for e in reader.entries()
            )
        seen.append((on_disk, local.agent.runs["commit"].committed))

    async with trio.open_nursery() as nursery:
        await nursery.start(local.run)
        await nursery.start(partial(record, bus.subscribe(Lossless()), writer, written=written))
        config = OrchestratorConfig(machine=MachineConfig(step_timeout_ns=10**10))
        specs = [(parse_spec(src), parse_spec(dst))]
        orchestrator = Orchestrator(
            specs, {LOCAL: local.endpoint()}, bus, config, run_id="commit", commit_hook=hook
        )
        with trio.fail_after(60):
            report = await orchestrator.run()
        bus.close()
        nursery.cancel_scope.cancel()
    assert report.outcome is Outcome.COMPLETED
    assert seen == [(True, False)]  # on disk, and no agent told yet


# --- agents as processes --------------------------------------------------------------------


def _journals(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.vfj"))


def test_two_agents_journal_their_sides_and_merge(
    agent_process, key_file, tmp_path: Path, cli, diagnose, remote_sims
) -> None:
    dirs = {name: tmp_path / name for name in ("A", "B", "JA", "JB")}
    for d in dirs.values():
        d.mkdir()
    a = agent_process(key_file, dirs["A"], "--journal-dir", str(dirs["JA"]))
    b = agent_process(key_file, dirs["B"], "--journal-dir", str(dirs["JB"]))
    a_sims = type(remote_sims)(dirs["A"], relative=True)
    b_sims = type(remote_sims)(dirs["B"], relative=True)
    src = a_sims.spec("a", size=4 * MIB, at=a.address)
    dst = b_sims.spec("b", size=4 * MIB, image=False, dump=True, at=b.address)
    path = tmp_path / "run.vfj"
    result = cli("migrate", "--json", "--journal", str(path), "--key-file", str(key_file), src, dst)
    assert result.status == 0, result.stdout + result.stderr
    run_id = json.loads(result.stdout)["result"]["run"]
    assert a.stop() == 0
    assert b.stop() == 0
    (ja,) = _journals(dirs["JA"])
    (jb,) = _journals(dirs["JB"])
    for side, sent in ((ja, True), (jb, False)):
        assert stat.S_IMODE(side.stat().st_mode) == 0o600
        with JournalReader(side) as reader:
            assert reader.header.role == "agent"
            assert reader.header.run_id == run_id
        found = events_of(side)
        assert any(isinstance(e, ev.ChunkSent if sent else ev.ChunkReceived) for e in found)
        assert any(isinstance(e, ev.IoctlCompleted) for e in found)
    # the orchestrator's journal has both agents' events, each with its origin
    origins = {r.origin for r in records(path) if isinstance(r.event, ev.IoctlCompleted)}
    assert origins == {a.address, b.address}

    # the agents' sides alone make the run's timeline (as when its orchestrator died)
    merged = tmp_path / "merged.vfj"
    out = cli("journal", "merge", "--json", str(ja), str(jb), "-o", str(merged))
    assert out.status == 0, out.stdout + out.stderr
    inputs = json.loads(out.stdout)["result"]["inputs"]
    assert [i["method"] for i in inputs[1:]] == ["chunk pairs"]
    assert len(records(merged)) == len(records(ja)) + len(records(jb))  # each once
    assert cli("journal", "verify", str(merged)).status == 0
    assert diagnose(merged)["cause"] == "unfinished"  # the end is the orchestrator's to record
    assert diagnose(path)["cause"] == "completed"


def test_an_agent_killed_in_stop_copy_leaves_a_readable_journal(
    agent_process, key_file, tmp_path: Path, cli, diagnose, remote_sims
) -> None:
    dirs = {name: tmp_path / name for name in ("A", "B", "JA", "JB")}
    for d in dirs.values():
        d.mkdir()
    a = agent_process(key_file, dirs["A"], "--journal-dir", str(dirs["JA"]))
    b = agent_process(key_file, dirs["B"], "--journal-dir", str(dirs["JB"]))
    a_sims = type(remote_sims)(dirs["A"], relative=True)
    b_sims = type(remote_sims)(dirs["B"], relative=True)
    # 2 MiB reads 0.4 s apart: stop-copy of 16 MiB takes over 3 s
    src = a_sims.spec("a", size=16 * MIB, read_delay="0.4s", at=a.address)
    dst = b_sims.spec("b", size=16 * MIB, image=False, at=b.address)
    path = tmp_path / "run.vfj"
    command = [sys.executable, "-m", "vfmig", "migrate", "--no-precopy", "--journal", str(path)]
    command += ["--key-file", str(key_file), src, dst]
    migrate = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    assert migrate.stdout is not None
    for line in migrate.stdout:
        if "phase stopcopy" in line:
            break
    time.sleep(2.0)  # well into stop-copy: chunks have been received and journaled
    killed_at = time.time_ns()
    os.kill(b.process.pid, signal.SIGKILL)
    out, err = migrate.communicate(timeout=120)
    assert migrate.returncode == 4, out + err  # peer lost

    # the killed agent's journal: not closed, but good up to about a second before the kill
    (jb,) = _journals(dirs["JB"])
    verify = cli("journal", "verify", "--json", str(jb))
    assert verify.status == 1
    status = json.loads(verify.stdout)["result"]
    assert not status["closed"]
    with JournalReader(jb) as reader:
        found = list(reader.entries())
        assert reader.status.damage is None or reader.status.damage.reason
    received = [
        e for e in found if isinstance(e, EventRecord) and isinstance(e.event, ev.ChunkReceived)
    ]
    assert received
    assert killed_at - max(e.wall_ns for e in found) < 1.5e9

    # the orchestrator's journal names the lost host, typed
    lost = [e for e in events_of(path) if isinstance(e, ev.PeerLost)]
    assert [(e.host, e.devices, e.committed) for e in lost] == [
        (b.address, (destination(0),), False)
    ]
    diagnosis = diagnose(path)
    assert (diagnosis["cause"], diagnosis["outcome"]) == ("peer-lost", "peer-lost")
    assert any(b.address in line for line in diagnosis["evidence"])
    assert cli("replay", str(path)).status == 0


@pytest.mark.trio
async def test_a_data_link_cut_mid_stream_is_link_lost(
    cluster, remote_sims, tmp_path: Path
) -> None:
    from vfmig.core.model import Cause, Phase, StartStream, StreamPhase

    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    src_sims = type(remote_sims)(tmp_path / "A", relative=True)
    dst_sims = type(remote_sims)(tmp_path / "B", relative=True)
    a = await cluster.agent(src_sims)
    b = await cluster.agent(dst_sims)
    # 2 MiB reads 0.2 s apart: stop-copy of 16 MiB takes 1.6 s
    src = src_sims.spec("a", size=16 * MIB, read_delay="0.2s", at=a.address)
    dst = dst_sims.spec("b", size=16 * MIB, image=False, at=b.address)

    async def cut_later() -> None:
        await trio.sleep(0.5)  # a few chunks into stop-copy
        for link in list(a.agent._links):
            if link.peer.startswith("data receiver"):
                await link.abort()  # the cable between the agents, pulled

    async def trace(action: object) -> None:
        if isinstance(action, StartStream) and action.phase is StreamPhase.STOPCOPY:
            cluster.nursery.start_soon(cut_later)

    machine = MachineConfig(precopy=PrecopyMode.OFF, step_timeout_ns=10**10)
    report = await cluster.migrate([(src, dst)], machine=machine, trace=trace)
    assert report.outcome is Outcome.FAILED
    first = report.errors[0]
    assert (first.cause, first.device, first.phase) == (
        Cause.LINK_LOST,
        destination(0),
        Phase.STOPCOPY,
    )
    assert first.step == "data link"
    await cluster.settle()
    assert (src_sims.state("a"), dst_sims.state("b")) == (S.RUNNING, S.RUNNING)
