"""Merging a run's journal with its agents' own (what ``vfmig migrate`` does after a run with
remote agents): offsets from the events both sides hold, copies replaced by originals; and
an agent's journal of a run as the ``journal`` RPC gets it (closed first, or a clear error)."""

from __future__ import annotations

import stat
import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest
import trio

from vfmig.core import events as ev
from vfmig.core.errors import JournalError
from vfmig.core.model import destination
from vfmig.journal import runs, synthetic
from vfmig.journal.codec import EventRecord, JournalHeader
from vfmig.journal.merge import AgentSide, merge_run
from vfmig.journal.reader import JournalReader
from vfmig.journal.runs import RunJournals
from vfmig.journal.store import JournalStore
from vfmig.journal.writer import JournalWriter

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

S = 1_000_000_000
ADDRESS = {synthetic.SOURCE_HOST: "10.0.0.1:7300", synthetic.DESTINATION_HOST: "10.0.0.2:7300"}
#: The fastest notice from an agent to the orchestrator; others take up to 300 µs more.
NOTICE_NS = 100_000


def journal(path: Path, header: JournalHeader, records: list[tuple[int, str, ev.Event]]) -> Path:
    clock = [0]
    with JournalWriter.create(
        path, header, mono_clock=lambda: clock[0], wall_clock=lambda: clock[0]
    ) as writer:
        for at, origin, event in sorted(records, key=lambda r: r[0]):
            clock[0] = max(clock[0], at)
            writer.append(event, at_ns=at, origin=origin)
    return path


def run_journals(
    tmp_path: Path,
    journal_header: Callable[..., JournalHeader],
    observations: list[synthetic.Observation],
    skews: dict[str, int],
) -> tuple[Path, Path, Path]:
    """The orchestrator's journal (agents' events as copies stamped on receipt, on true
    time) and each agent's own (on true time + its skew; wall clocks 0.4 s off)."""
    own: list[tuple[int, str, ev.Event]] = []
    sides: dict[str, list[tuple[int, str, ev.Event]]] = {h: [] for h in skews}
    for n, o in enumerate(observations):
        if o.host == synthetic.ORCHESTRATOR:
            own.append((o.at_ns, o.host, o.event))
            continue
        own.append((o.at_ns + NOTICE_NS + (n % 7) * 50_000, ADDRESS[o.host], o.event))
        sides[o.host].append((o.at_ns + skews[o.host], o.host, o.event))
    wall = 1_700_000_000 * S
    ho = journal_header(start_mono_ns=0, start_wall_ns=wall)
    paths = [journal(tmp_path / "own.vfj", ho, own)]
    for host, skew in skews.items():
        h = replace(ho, host=host, role="agent", start_mono_ns=skew, start_wall_ns=wall + S // 4)
        paths.append(journal(tmp_path / f"{host}.vfj", h, sides[host]))
    return paths[0], paths[1], paths[2]


def events(path: Path) -> list[EventRecord]:
    with JournalReader(path) as reader:
        found = [e for e in reader.entries() if isinstance(e, EventRecord)]
        assert reader.status.intact
        return found


def test_skewed_agents_are_put_on_the_orchestrators_clock(
    tmp_path: Path, journal_header: Callable[..., JournalHeader]
) -> None:
    scenario = synthetic.Scenario(size=16 * synthetic.MIB, chunk=256 << 10, latency_ns=150_000)
    observations = list(synthetic.run(scenario))
    skews = {synthetic.SOURCE_HOST: 5 * S, synthetic.DESTINATION_HOST: -3 * S}
    own, a, b = run_journals(tmp_path, journal_header, observations, skews)
    sides = [AgentSide(ADDRESS[h], p) for h, p in zip(skews, (a, b), strict=True)]
    report = merge_run(own, sides, tmp_path / "m.vfj")
    assert report.records == len(observations)  # the copies are gone
    _, ra, rb = report.inputs
    for got, skew in ((ra, 5 * S), (rb, -3 * S)):
        assert got.method == "paired events"
        assert got.pairs > 0
        assert abs(got.offset_ns + skew) <= scenario.latency_ns, (got.offset_ns, skew)
    with JournalReader(tmp_path / "m.vfj") as reader:
        header = reader.header
    assert header.role == "merged"
    for entry, skew in zip(header.merged_from[1:], skews.values(), strict=True):
        # the true offset lies within the interval the header states
        assert abs(entry["offset_ns"] + skew) <= entry["uncertainty_ns"]
    assert [m["address"] for m in header.merged_from[1:]] == list(ADDRESS.values())

    merged = events(tmp_path / "m.vfj")
    assert [e.at_ns for e in merged] == sorted(e.at_ns for e in merged)
    for host in (synthetic.ORCHESTRATOR, *skews):
        origin = ADDRESS.get(host, host)
        assert [e.event for e in merged if e.origin == origin] == [
            o.event for o in observations if o.host == host
        ]
    sent = {e.event.seq: e.at_ns for e in merged if isinstance(e.event, ev.ChunkSent)}
    for e in merged:
        if isinstance(e.event, ev.ChunkReceived):
            assert e.at_ns >= sent[e.event.seq]


def test_an_agent_not_fetched_keeps_the_orchestrators_copies(
    tmp_path: Path,
    journal_header: Callable[..., JournalHeader],
    default_run: list[synthetic.Observation],
) -> None:
    skews = {synthetic.SOURCE_HOST: 2 * S, synthetic.DESTINATION_HOST: -S}
    own, a, _ = run_journals(tmp_path, journal_header, default_run, skews)
    lost = ADDRESS[synthetic.DESTINATION_HOST]
    sides = [AgentSide(ADDRESS[synthetic.SOURCE_HOST], a), AgentSide(lost, None, "agent lost")]
    report = merge_run(own, sides, tmp_path / "m.vfj")
    assert len(report.inputs) == 2
    merged = events(tmp_path / "m.vfj")
    copies = [e for e in events(own) if e.origin == lost]
    assert [(e.at_ns, e.event) for e in merged if e.origin == lost] == [
        (e.at_ns, e.event) for e in copies
    ]
    assert report.records == len(default_run)
    with JournalReader(tmp_path / "m.vfj") as reader:
        missing = reader.header.merged_from[-1]
    assert (missing["address"], missing["file"], missing["error"]) == (lost, None, "agent lost")


def test_without_shared_events_the_wall_clock_is_used(
    tmp_path: Path, journal_header: Callable[..., JournalHeader]
) -> None:
    wall = 1_700_000_000 * S
    ho = journal_header(start_mono_ns=0, start_wall_ns=wall)
    own = journal(tmp_path / "own.vfj", ho, [])
    ha = replace(ho, host="hostA", role="agent", start_mono_ns=4 * S, start_wall_ns=wall)
    a = journal(tmp_path / "a.vfj", ha, [])
    report = merge_run(own, [AgentSide("hostA:1", a)], tmp_path / "m.vfj")
    assert (report.inputs[1].method, report.inputs[1].offset_ns) == ("wall clock", -4 * S)


# --- an agent's journal of a run, as the journal RPC serves it ---------------------------------


ACKED = ev.SwitchoverAcked(device=destination(0))


@pytest.mark.trio
async def test_an_agents_journal_is_closed_before_it_is_handed_over(tmp_path: Path) -> None:
    journals = RunJournals(JournalStore(tmp_path), host="hostB")
    async with trio.open_nursery() as nursery:
        await nursery.start(journals.run)
        await journals.notice("run-1", [(destination(0), "sim:b")], ACKED)
        path = await journals.closed("run-1")
        with JournalReader(path) as reader:
            found = [e.event for e in reader.entries() if isinstance(e, EventRecord)]
            assert reader.status.closed
        assert found == [ev.SwitchoverAcked(device=destination(0))]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with pytest.raises(JournalError, match="no journal of run run-2: this agent journaled"):
            await journals.closed("run-2")
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_journal_that_could_not_be_created_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    journals = RunJournals(JournalStore(blocker / "sub"), host="hostB")
    async with trio.open_nursery() as nursery:
        await nursery.start(journals.run)
        await journals.notice("run-1", [(destination(0), "sim:b")], ACKED)
        with pytest.raises(JournalError, match="no journal of run run-1: cannot create"):
            await journals.closed("run-1")
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_slow_disk_holds_the_agent_back_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()  # the disk is stuck until the queue has filled
    sizes: list[int] = []
    original = runs.write_batch

    def stuck(writer: JournalWriter, batch: list[Any]) -> None:
        sizes.append(len(batch))
        gate.wait(10)
        original(writer, batch)

    monkeypatch.setattr(runs, "write_batch", stuck)
    journals = RunJournals(JournalStore(tmp_path), host="hostB")
    count = 3 * runs.QUEUE
    async with trio.open_nursery() as nursery:
        await nursery.start(journals.run)
        sent = 0
        finished = trio.Event()

        async def notify() -> None:
            nonlocal sent
            for seq in range(count):
                event = ev.ChunkReceived(
                    device=destination(0), seq=seq, offset=seq, raw=1, wire=1, final=False
                )
                await journals.notice("run-1", [(destination(0), "sim:b")], event)
                sent += 1
            finished.set()

        nursery.start_soon(notify)
        await trio.sleep(0.5)
        assert sent < 2 * runs.QUEUE  # held back: at most one queue waits, one is written
        gate.set()
        await finished.wait()
        path = await journals.closed("run-1")
        nursery.cancel_scope.cancel()
    with JournalReader(path) as reader:
        seqs = [e.event.seq for e in reader.entries() if isinstance(e, EventRecord)]
    assert seqs == list(range(count))
    assert max(sizes) <= runs.QUEUE
