"""One journal for a run with remote agents: ``vfmig migrate --journal`` fetches each agent's
own journal of the run after it and merges it in; ``--journal-data`` with a remote
destination; what happens when an agent's journal cannot be had.

Agents are real ``vfmig agent`` processes over loopback TCP; migrate runs in this process.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
from typing import TYPE_CHECKING, Any

import pytest
import trio

from vfmig.core import events as ev
from vfmig.core.fsm import DeviceState
from vfmig.core.model import source
from vfmig.engine.agent import protocol_config
from vfmig.engine.keys import load_key
from vfmig.engine.link import Link, RpcError, connect
from vfmig.journal import collect
from vfmig.journal.codec import DataRecord, EventRecord
from vfmig.journal.reader import JournalReader
from vfmig.protocol import Connection
from vfmig.protocol import Role as LinkRole

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

MIB = 1 << 20
ORCHESTRATOR = "orchestrator"


def records(path: Path) -> list[EventRecord]:
    with JournalReader(path) as reader:
        found = [e for e in reader.entries() if isinstance(e, EventRecord)]
        assert reader.status.intact, reader.status
    return found


class Hosts:
    """Two agent processes (A for sources, B for destinations), each journaling into its
    own directory, and the simulated devices of each."""

    def __init__(self, agent_process: Any, key_file: Path, tmp: Path, sims: Any, *b: str) -> None:
        self.dirs = {name: tmp / name for name in ("A", "B", "JA", "JB")}
        for d in self.dirs.values():
            d.mkdir()
        b_journal = ("--journal-dir", str(self.dirs["JB"])) if "--no-journal" not in b else ()
        self.a = agent_process(key_file, self.dirs["A"], "--journal-dir", str(self.dirs["JA"]))
        self.b = agent_process(key_file, self.dirs["B"], *b_journal, *b)
        self.a_sims = type(sims)(self.dirs["A"], relative=True)
        self.b_sims = type(sims)(self.dirs["B"], relative=True)
        self.key = ("--key-file", str(key_file))

    def own(self, name: str) -> Path:
        (path,) = sorted(self.dirs[name].glob("*.vfj"))
        return path


@pytest.fixture
def hosts(agent_process: Any, key_file: Path, tmp_path: Path, remote_sims: Any) -> Any:
    def make(*b: str) -> Hosts:
        return Hosts(agent_process, key_file, tmp_path, remote_sims, *b)

    return make


def test_a_remote_run_has_one_merged_journal(
    hosts: Any, cli: Any, diagnose: Any, tmp_path: Path
) -> None:
    h = hosts()
    src = h.a_sims.spec("a", size=4 * MIB, at=h.a.address)
    dst = h.b_sims.spec("b", size=4 * MIB, image=False, dump=True, at=h.b.address)
    path = tmp_path / "run.vfj"
    result = cli("migrate", "--journal", str(path), *h.key, src, dst)
    assert result.status == 0, result.stdout + result.stderr
    assert "warning" not in result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    with JournalReader(path) as reader:
        header = reader.header
    assert header.role == "merged"
    inputs = {m.get("address", m["host"]): m for m in header.merged_from}
    assert inputs[header.host]["method"] == "reference"
    for address in (h.a.address, h.b.address):
        assert inputs[address]["method"] == "paired events"
        assert inputs[address]["pairs"] > 0
        assert isinstance(inputs[address]["offset_ns"], int)

    merged = records(path)
    by_origin: dict[str, list[ev.Event]] = {}
    for r in merged:
        by_origin.setdefault(r.origin, []).append(r.event)
    assert set(by_origin) == {ORCHESTRATOR, h.a.address, h.b.address}
    # each agent's events once: exactly its own journal's (which the agent keeps)
    for address, name in ((h.a.address, "JA"), (h.b.address, "JB")):
        assert by_origin[address] == [r.event for r in records(h.own(name))]
    assert [r.at_ns for r in merged] == sorted(r.at_ns for r in merged)
    sent = {e.event.seq: e.at_ns for e in merged if isinstance(e.event, ev.ChunkSent)}
    received = [e for e in merged if isinstance(e.event, ev.ChunkReceived)]
    assert received
    assert all(e.at_ns >= sent[e.event.seq] for e in received)

    assert cli("journal", "verify", str(path)).status == 0
    assert cli("replay", str(path)).status == 0
    assert diagnose(path)["cause"] == "completed"
    assert h.b_sims.dump("b") == h.a_sims.image("a")


def test_journal_data_of_a_remote_destination_then_load(
    hosts: Any, cli: Any, tmp_path: Path, sims: Any
) -> None:
    h = hosts()  # agent B was started without --journal-data: the orchestrator asks for it
    src = h.a_sims.spec("a", size=5 * MIB, at=h.a.address)
    dst = h.b_sims.spec("b", size=5 * MIB, image=False, at=h.b.address)
    path = tmp_path / "run.vfj"
    result = cli("migrate", "--journal", str(path), "--journal-data", *h.key, src, dst)
    assert result.status == 0, result.stdout + result.stderr
    with JournalReader(path) as reader:
        assert reader.header.data
        data = [e for e in reader.entries() if isinstance(e, DataRecord)]
    assert {(d.device, d.origin) for d in data} == {(source(0), h.b.address)}
    assert cli("journal", "verify", str(path)).status == 0
    spare = sims.spec("spare", size=5 * MIB, image=False, dump=True)
    loaded = cli("load", "--journal", str(tmp_path / "load.vfj"), str(path), spare)
    assert loaded.status == 0, loaded.stdout + loaded.stderr
    assert sims.dump("spare") == h.a_sims.image("a")


def test_journal_data_is_refused_at_open_by_an_agent_without_journal(
    hosts: Any, cli: Any, tmp_path: Path
) -> None:
    h = hosts("--no-journal")
    src = h.a_sims.spec("a", size=MIB, at=h.a.address)
    dst = h.b_sims.spec("b", size=MIB, image=False, at=h.b.address)
    path = tmp_path / "run.vfj"
    result = cli("migrate", "--journal", str(path), "--journal-data", *h.key, src, dst)
    assert result.status != 0
    assert "--no-journal" in result.stderr
    assert "Traceback" not in result.stderr
    assert h.b_sims.state("b") is None  # never opened
    assert h.a_sims.state("a") in (None, DeviceState.RUNNING)
    assert "warning" not in result.stderr  # B did nothing of the run: nothing is missing
    assert cli("journal", "verify", str(path)).status == 0


def test_an_agent_without_journal_keeps_the_orchestrators_copies(
    hosts: Any, cli: Any, diagnose: Any, tmp_path: Path
) -> None:
    h = hosts("--no-journal")
    src = h.a_sims.spec("a", size=MIB, at=h.a.address)
    dst = h.b_sims.spec("b", size=MIB, image=False, at=h.b.address)
    path = tmp_path / "run.vfj"
    result = cli("migrate", "--journal", str(path), *h.key, src, dst)
    assert result.status == 0, result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, result.stderr
    assert f"the journal of agent {h.b.address} is not merged" in warnings[0]
    assert "--no-journal" in warnings[0]
    with JournalReader(path) as reader:
        header = reader.header
    missing = [m for m in header.merged_from if m.get("error")]
    assert [m["address"] for m in missing] == [h.b.address]
    origins = {r.origin for r in records(path)}
    assert origins == {ORCHESTRATOR, h.a.address, h.b.address}
    a_events = [r.event for r in records(path) if r.origin == h.a.address]
    assert a_events == [r.event for r in records(h.own("JA"))]
    assert diagnose(path)["cause"] == "completed"


def test_a_failed_remote_run_is_diagnosed_from_the_merged_journal(
    hosts: Any, cli: Any, diagnose: Any, tmp_path: Path
) -> None:
    h = hosts()
    src = h.a_sims.spec("a", size=3 * MIB, at=h.a.address)
    dst = h.b_sims.spec("b", size=3 * MIB, image=False, write_error="1MiB:ENOMEM", at=h.b.address)
    path = tmp_path / "run.vfj"
    result = cli("migrate", "--journal", str(path), *h.key, src, dst)
    assert result.status != 0
    with JournalReader(path) as reader:
        assert reader.header.role == "merged"
    assert cli("journal", "verify", str(path)).status == 0
    diagnosis = diagnose(path)
    assert (diagnosis["cause"], diagnosis["device"]) == ("write-refused", "dst0"), diagnosis
    assert diagnosis["errno"] == errno.ENOMEM
    assert diagnosis["step"].startswith("data write")
    assert diagnosis["phase"]
    assert cli("replay", str(path)).status == 0


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_an_agent_gone_before_the_fetch_leaves_its_copies(
    hosts: Any, cli: Any, diagnose: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    h = hosts()
    fetch = collect.Collector.__call__

    async def gone_first(self: collect.Collector, links: Mapping[str, Link]) -> None:
        os.kill(h.b.process.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        await fetch(self, links)

    monkeypatch.setattr(collect.Collector, "__call__", gone_first)
    monkeypatch.setattr(collect, "FETCH_TIMEOUT", 1.0)
    src = h.a_sims.spec("a", size=2 * MIB, at=h.a.address)
    dst = h.b_sims.spec("b", size=2 * MIB, image=False, at=h.b.address)
    path = tmp_path / "run.vfj"
    try:
        result = cli("migrate", "--journal", str(path), *h.key, src, dst)
    finally:
        if how == "stopped":
            os.kill(h.b.process.pid, signal.SIGCONT)
    assert result.status == 0, result.stdout + result.stderr  # the migration's own outcome
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, result.stderr
    assert f"agent {h.b.address} is not merged" in warnings[0]
    with JournalReader(path) as reader:
        missing = [m for m in reader.header.merged_from if m.get("error")]
    assert [m["address"] for m in missing] == [h.b.address]
    origins = {r.origin for r in records(path) if isinstance(r.event, ev.IoctlCompleted)}
    assert origins == {h.a.address, h.b.address}  # B's as the orchestrator received them
    assert cli("journal", "verify", str(path)).status == 0
    assert diagnose(path)["cause"] == "completed"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


async def _ask(address: str, key: bytes, params: dict[str, Any]) -> Any:
    stream = await connect(address)
    link = Link(stream, Connection(LinkRole.ORCHESTRATOR, protocol_config(key), name="t"), peer="a")

    async def ignore(event: object) -> None:
        return None

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run, ignore)
            await link.wait_established()
            try:
                return await link.request("journal", params)
            except RpcError as exc:
                return exc
            finally:
                await link.aclose("done")
                nursery.cancel_scope.cancel()


def test_the_journal_of_an_unknown_run_is_a_clear_error(
    hosts: Any, key_file: Path, tmp_path: Path, cli: Any
) -> None:
    h = hosts()
    src = h.a_sims.spec("a", size=MIB, at=h.a.address)
    dst = h.b_sims.spec("b", size=MIB, image=False, at=h.b.address)
    result = cli("migrate", "--json", "--journal", str(tmp_path / "r.vfj"), *h.key, src, dst)
    run_id = json.loads(result.stdout)["result"]["run"]
    key = load_key(key_file)
    for run in ("0123456789abcdef", run_id):  # a run another session ran is not this one's
        error = trio.run(_ask, h.a.address, key, {"run": run, "offset": 0})
        assert isinstance(error, RpcError)
        assert error.code == "unknown_device"
        assert f"run {run} is not this orchestrator's here" in error.reason


def test_agents_journal_the_destination_devices_opened_with_the_flag(
    hosts: Any, cli: Any, tmp_path: Path
) -> None:
    """An agent's own journal of a --journal-data run holds the stream and says so."""
    h = hosts()
    src = h.a_sims.spec("a", size=MIB, at=h.a.address)
    dst = h.b_sims.spec("b", size=MIB, image=False, at=h.b.address)
    result = cli("migrate", "--journal-data", *h.key, src, dst)
    assert result.status == 0, result.stdout + result.stderr
    with JournalReader(h.own("JB")) as reader:
        assert reader.header.data
        assert {e.device for e in reader.entries() if isinstance(e, DataRecord)} == {source(0)}
    assert stat.S_IMODE(h.own("JB").stat().st_mode) == 0o600
