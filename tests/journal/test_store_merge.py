"""The default journal store (location, rotation) and merging journals of skewed hosts."""

from __future__ import annotations

import stat
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.core import events as ev
from vfmig.core.errors import JournalError
from vfmig.core.model import Role
from vfmig.journal import synthetic
from vfmig.journal.codec import EventRecord
from vfmig.journal.merge import merge
from vfmig.journal.reader import JournalReader
from vfmig.journal.store import DEFAULT_KEEP, ROOT_DIR, JournalStore, default_dir
from vfmig.journal.writer import JournalWriter

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from vfmig.journal.codec import JournalHeader

S = 1_000_000_000


def test_default_dir() -> None:
    assert default_dir({"XDG_STATE_HOME": "/x/state", "HOME": "/home/u"}, uid=1000) == Path(
        "/x/state/vfmig"
    )
    assert default_dir({"HOME": "/home/u"}, uid=1000) == Path("/home/u/.local/state/vfmig")
    # a relative XDG_STATE_HOME is ignored, as the XDG spec says
    assert default_dir({"XDG_STATE_HOME": "rel", "HOME": "/home/u"}, uid=1000) == Path(
        "/home/u/.local/state/vfmig"
    )
    # root never follows a user's XDG_STATE_HOME (sudo may carry it over)
    assert default_dir({"XDG_STATE_HOME": "/home/u/.state"}, uid=0) == ROOT_DIR


def test_store_rotation_keeps_the_newest(
    tmp_path: Path, journal_header: Callable[..., JournalHeader]
) -> None:
    store = JournalStore(tmp_path / "state" / "vfmig", keep=3)
    assert store.journals() == []
    with pytest.raises(JournalError, match="no journal in"):
        store.latest()
    foreign = tmp_path / "state" / "vfmig" / "notes.txt"
    names = []
    for i in range(5):
        h = journal_header(start_wall_ns=(1_700_000_000 + i) * S, run_id=f"r{i}", role="save")
        store.create(h).close()
        names.append(store.latest().name)
        if i == 0:
            foreign.write_text("keep me")
    kept = store.journals()
    assert [p.name for p in kept] == names[-3:]
    assert kept[0].name.startswith("20231114T221322.000000Z-save-r2.vfj")
    assert foreign.read_text() == "keep me"
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in kept)
    assert DEFAULT_KEEP == 20
    assert JournalStore(tmp_path).keep == DEFAULT_KEEP


def test_last_is_the_newest_run_of_a_command_not_an_agent(
    tmp_path: Path, journal_header: Callable[..., JournalHeader]
) -> None:
    store = JournalStore(tmp_path)
    for i, role in enumerate(("agent", "orchestrator", "agent", "agent")):
        h = journal_header(start_wall_ns=(1_700_000_000 + i) * S, run_id=f"r{i}", role=role)
        store.create(h).close()
    assert store.latest().name.endswith("-orchestrator-r1.vfj")
    only_agents = JournalStore(tmp_path / "agents")
    only_agents.create(journal_header(run_id="a", role="agent")).close()
    assert only_agents.latest().name.endswith("-agent-a.vfj")


def test_a_runs_journal_is_found_by_role_and_run(
    tmp_path: Path, journal_header: Callable[..., JournalHeader]
) -> None:
    store = JournalStore(tmp_path)
    runs = [("agent", "r1"), ("orchestrator", "r1"), ("agent", "r1"), ("agent", "xr1")]
    for i, (role, run) in enumerate(runs):
        h = journal_header(start_wall_ns=(1_700_000_000 + i) * S, run_id=run, role=role)
        store.create(h).close()
    names = [p.name for p in store.journals()]
    assert store.find("r1", "agent") == tmp_path / names[2]  # the newest of that run
    assert store.find("r1", "orchestrator") == tmp_path / names[1]
    assert store.find("xr1", "agent") == tmp_path / names[3]
    assert store.find("r", "agent") is None  # a whole run id, not a suffix
    assert store.find("r1", "merged") is None
    assert store.find("r1", "orchestrator-r1.vfj") is None


@pytest.mark.parametrize(
    "name",
    [
        "../20231114T221320.000000Z-agent-r1.vfj",
        "notes.txt",
        "20231114T221320.000000Z-agent-r1.vfj\n",
    ],
)
def test_only_a_journals_name_is_placed_in_a_store(tmp_path: Path, name: str) -> None:
    store = JournalStore(tmp_path / "store")
    with pytest.raises(JournalError, match="is not the name of a journal"):
        store.place(name)
    good = "20231114T221320.000000Z-agent-r1.vfj"
    assert store.place(good) == tmp_path / "store" / good
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700


def test_store_refuses_to_keep_nothing(tmp_path: Path) -> None:
    with pytest.raises(JournalError):
        JournalStore(tmp_path, keep=0)


def test_store_directory_that_cannot_be_made(
    tmp_path: Path, journal_header: Callable[..., JournalHeader]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(JournalError, match="cannot create the journal directory"):
        JournalStore(blocker / "sub").create(journal_header())


# --- merging -------------------------------------------------------------------------------


def host_journal(
    path: Path,
    header: JournalHeader,
    observations: Iterable[synthetic.Observation],
    *,
    skew_ns: int,
) -> Path:
    """The journal of one host whose monotonic clock reads true time + ``skew_ns``."""
    clock = [0]
    with JournalWriter.create(
        path, header, mono_clock=lambda: clock[0], wall_clock=lambda: clock[0]
    ) as writer:
        for o in observations:
            clock[0] = max(clock[0], o.at_ns + skew_ns)
            writer.append(o.event, at_ns=o.at_ns + skew_ns, origin=o.host)
    return path


def split(
    observations: list[synthetic.Observation], on_b: Callable[[synthetic.Observation], bool]
) -> tuple[list[synthetic.Observation], list[synthetic.Observation]]:
    a = [o for o in observations if not on_b(o)]
    b = [o for o in observations if on_b(o)]
    return a, b


def merged_events(path: Path) -> list[EventRecord]:
    with JournalReader(path) as reader:
        entries = [e for e in reader.entries() if isinstance(e, EventRecord)]
        assert reader.status.intact
        return entries


def chunk_times(entries: list[EventRecord]) -> dict[tuple[int, int], dict[str, int]]:
    times: dict[tuple[int, int], dict[str, int]] = {}
    for e in entries:
        if isinstance(e.event, ev.ChunkSent | ev.ChunkReceived):
            kind = "sent" if isinstance(e.event, ev.ChunkSent) else "received"
            times.setdefault((e.event.device.index, e.event.seq), {})[kind] = e.at_ns
    return times


def headers(
    journal_header: Callable[..., JournalHeader], skew_ns: int, wall_error_ns: int
) -> tuple[JournalHeader, JournalHeader]:
    wall = 1_700_000_000 * S
    a = journal_header(host="hostA", role="agent", start_mono_ns=0, start_wall_ns=wall)
    # hostB's monotonic clock is skew_ns ahead, its wall clock wall_error_ns wrong
    b = replace(a, host="hostB", start_mono_ns=skew_ns, start_wall_ns=wall + wall_error_ns)
    return a, b


def test_merge_corrects_skewed_clocks_from_chunk_pairs(
    tmp_path: Path, journal_header: Callable[..., JournalHeader]
) -> None:
    scenario = synthetic.Scenario(size=16 * synthetic.MIB, latency_ns=150_000)
    observations = list(synthetic.run(scenario))
    skew = 7_300_000_000
    ha, hb = headers(journal_header, skew, wall_error_ns=250_000_000)
    on_a, on_b = split(observations, lambda o: o.host == synthetic.DESTINATION_HOST)
    a = host_journal(tmp_path / "a.vfj", ha, on_a, skew_ns=0)
    b = host_journal(tmp_path / "b.vfj", hb, on_b, skew_ns=skew)
    report = merge([a, b], tmp_path / "m.vfj", host="laptop")
    assert report.records == len(observations)
    ref, other = report.inputs
    assert (ref.method, ref.offset_ns) == ("reference", 0)
    assert other.method == "chunk pairs"
    assert other.pairs == 16
    # one-way pairs: the offset is exact but for the fastest chunk's latency
    assert -skew - 150_000 <= other.offset_ns <= -skew
    entries = merged_events(tmp_path / "m.vfj")
    for key, t in chunk_times(entries).items():
        assert t["received"] >= t["sent"], key
    assert [e.at_ns for e in entries] == sorted(e.at_ns for e in entries)
    for host in ("orchestrator", "hostA", "hostB"):
        assert [e.event for e in entries if e.origin == host] == [
            o.event for o in observations if o.host == host
        ]
    with JournalReader(tmp_path / "m.vfj") as reader:
        h = reader.header
    assert h.role == "merged"
    assert h.host == "laptop"
    assert [m["host"] for m in h.merged_from] == ["hostA", "hostB"]
    assert h.merged_from[1]["offset_ns"] == other.offset_ns


def test_merge_with_pairs_both_ways_takes_the_middle(
    tmp_path: Path, journal_header: Callable[..., JournalHeader]
) -> None:
    scenario = synthetic.Scenario(size=8 * synthetic.MIB, pairs=2, latency_ns=200_000)
    observations = list(synthetic.run(scenario))

    def on_host_b(o: synthetic.Observation) -> bool:
        dev = getattr(o.event, "device", None) or getattr(o.event, "source", None)
        if dev is None or o.host == synthetic.ORCHESTRATOR:
            return False
        # pair 0 flows hostA -> hostB, pair 1 hostB -> hostA
        return (dev.role is Role.DESTINATION) == (dev.index == 0)

    skew = -3_000_000_000
    ha, hb = headers(journal_header, skew, wall_error_ns=-40_000_000)
    on_a, on_b = split(observations, on_host_b)
    a = host_journal(tmp_path / "a.vfj", ha, on_a, skew_ns=0)
    b = host_journal(tmp_path / "b.vfj", hb, on_b, skew_ns=skew)
    report = merge([a, b], tmp_path / "m.vfj", host="laptop")
    other = report.inputs[1]
    assert other.method == "chunk pairs"
    assert other.offset_ns == -skew  # same latency both ways: the middle is exact
    for key, t in chunk_times(merged_events(tmp_path / "m.vfj")).items():
        assert t["received"] - t["sent"] == 200_000, key


def test_merge_without_chunks_uses_the_wall_clocks(
    tmp_path: Path, journal_header: Callable[..., JournalHeader]
) -> None:
    observations = [
        o
        for o in synthetic.run(synthetic.Scenario(size=2 * synthetic.MIB))
        if not isinstance(o.event, ev.ChunkSent | ev.ChunkReceived)
    ]
    skew = 5 * S
    ha, hb = headers(journal_header, skew, wall_error_ns=0)
    on_a, on_b = split(observations, lambda o: o.host == synthetic.DESTINATION_HOST)
    a = host_journal(tmp_path / "a.vfj", ha, on_a, skew_ns=0)
    b = host_journal(tmp_path / "b.vfj", hb, on_b, skew_ns=skew)
    report = merge([a, b], tmp_path / "m.vfj", host="laptop")
    assert (report.inputs[1].method, report.inputs[1].offset_ns) == ("wall clock", -skew)
    entries = merged_events(tmp_path / "m.vfj")
    assert [e.at_ns for e in entries] == sorted(e.at_ns for e in entries)
    assert sorted((e.at_ns, e.origin) for e in entries) == sorted(
        (o.at_ns, o.host) for o in observations
    )


def test_merge_reads_a_damaged_input_up_to_its_damage(
    tmp_path: Path, journal_header: Callable[..., JournalHeader], default_run: Any
) -> None:
    ha, hb = headers(journal_header, 0, wall_error_ns=0)
    on_a, on_b = split(default_run, lambda o: o.host == synthetic.DESTINATION_HOST)
    a = host_journal(tmp_path / "a.vfj", ha, on_a, skew_ns=0)
    b = host_journal(tmp_path / "b.vfj", hb, on_b, skew_ns=0)
    data = b.read_bytes()
    b.write_bytes(data[: len(data) - 10])
    report = merge([a, b], tmp_path / "m.vfj", host="laptop")
    damaged = report.inputs[1]
    assert damaged.damage is not None
    assert damaged.damage.truncated
    assert not damaged.closed
    assert report.records == len(on_a) + damaged.records


def test_merge_needs_two_journals(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="at least two"):
        merge([tmp_path / "a.vfj"], tmp_path / "m.vfj", host="h")
