"""``vfmig journal fetch``: a journal of an agent's host copied here (``fetch_journal``).

The command runs in a worker thread against agents in this process (their journal stores
in the test's directory, the command's store the suite's temporary one), against agent
processes where the agents' own journals matter, and against a fake agent for answers no
real agent gives.
"""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from vfmig.core.errors import JournalError
from vfmig.core.model import Phase
from vfmig.journal.codec import JournalHeader
from vfmig.journal.reader import JournalReader
from vfmig.journal.store import JournalStore
from vfmig.journal.writer import JournalWriter

from .conftest import Sims, run_cli
from .test_hosted import (
    client,
    fake_agent,
    one_pair,
    start_slow_run,
    two_agents,
    via,
    wait_for,
)

RUN_NAME = "20261126T050007.807594Z-orchestrator-r1.vfj"


async def fetch(key_file: Path, address: str, *argv: str) -> Any:
    """``vfmig journal fetch ADDRESS ARGV --key-file KEY`` in a worker thread."""
    command = ["journal", "fetch", address, *argv, "--key-file", str(key_file)]
    return await trio.to_thread.run_sync(lambda: run_cli(*command))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


async def test_a_hosted_runs_journal_is_fetched_once_merged(
    cluster, remote_sims, b_sims, key_file, tmp_path, journal_store, monkeypatch
) -> None:
    from vfmig.journal import collect

    def slow_merge(*args: Any) -> Any:
        time.sleep(0.5)  # in the agent's worker thread, after the run's answer
        return merge_run(*args)

    merge_run = collect.merge_run
    monkeypatch.setattr(collect, "merge_run", slow_merge)
    a, b = await two_agents(cluster, remote_sims, b_sims, tmp_path)
    src, dst = one_pair(remote_sims, b_sims, a, b)
    result = await via(key_file, a.address, "--json", src, dst)
    run = json.loads(result.stdout)["result"]
    # At once: the agent merges the run's journal after its answer, and the fetch waits.
    copy = tmp_path / "copy.vfj"
    fetched = await fetch(key_file, a.address, run["run"], "-o", str(copy), "--json")
    assert fetched.status == 0, fetched.stderr
    info = json.loads(fetched.stdout)["result"]
    assert info == {
        "path": str(copy),
        "run": run["run"],
        "role": "orchestrator",
        "name": Path(run["journal"]).name,
        "host": info["host"],
        "bytes": copy.stat().st_size,
        "records": info["records"],
        "intact": True,
        "closed": True,
    }
    with JournalReader(copy) as reader:
        assert (reader.header.role, reader.header.run_id) == ("merged", run["run"])
    await cluster.settle()
    original = await trio.Path(run["journal"]).read_bytes()
    assert copy.read_bytes() == original
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert leftovers(tmp_path).count("copy.vfj") == 1
    assert not [n for n in leftovers(tmp_path) if n.endswith(".fetch")]
    # Without -o: into this host's journal store, under the agent's name for it.
    fetched = await fetch(key_file, a.address, run["run"])
    assert fetched.status == 0, fetched.stderr
    here = journal_store / Path(run["journal"]).name
    assert f"journal: {here}" in fetched.stdout
    assert "records, intact" in fetched.stdout
    assert JournalStore().latest() == here
    assert here.read_bytes() == copy.read_bytes()
    # Again: the same journal, replaced by a fresh copy; an existing -o is refused.
    assert (await fetch(key_file, a.address, run["run"])).status == 0
    assert leftovers(journal_store) == [here.name]
    again = await fetch(key_file, a.address, run["run"], "-o", str(copy))
    assert (again.status, "exists: give -o a new path" in again.stderr) == (2, True)


async def test_what_an_agent_does_not_serve(
    cluster, remote_sims, b_sims, key_file, tmp_path, journal_store
) -> None:
    a, b = await two_agents(cluster, remote_sims, b_sims, tmp_path)
    cases = [
        (a, ["0123abcd"], 1, "no orchestrator journal of run 0123abcd in"),
        (a, ["../etc", "--role", "agent"], 2, "'../etc' is not a run id"),
        (b, ["0123abcd"], 1, "this agent keeps no journals (--no-journal)"),
    ]
    for agent, argv, status, message in cases:
        result = await fetch(key_file, agent.address, *argv)
        assert (result.status, message in result.stderr) == (status, True), result.stderr
        assert "Traceback" not in result.stderr
    assert "--role agent fetches an agent's own side" in result.stderr
    wrong = tmp_path / "wrong.key"
    run_cli("keygen", str(wrong))
    result = await fetch(wrong, a.address, "0123abcd")
    assert result.status == 4, result.stderr
    assert leftovers(journal_store) == []


async def test_a_run_in_progress_is_busy(cluster, remote_sims, b_sims, key_file, tmp_path) -> None:
    a, b = await two_agents(cluster, remote_sims, b_sims, tmp_path)
    params = await start_slow_run(cluster, remote_sims, b_sims, a, b)
    async with client(cluster, a) as (link, phases), trio.open_nursery() as nursery:
        answers: list[Any] = []

        async def migrate() -> None:
            answers.append(await link.request("migrate", params))

        nursery.start_soon(migrate)
        await wait_for(phases, Phase.PRECOPY)
        run_id = Path(await _hosted_journal(a)).name.split("-")[-1].removesuffix(".vfj")
        busy = await fetch(key_file, a.address, run_id)
        await link.request("abort", {})
    assert busy.status == 1, busy.stderr
    assert f"run {run_id} is in progress here: its journal is not finished" in busy.stderr
    assert "fetch it once the run has ended" in busy.stderr
    assert answers[0]["result"]["run"] == run_id
    done = await fetch(key_file, a.address, run_id, "-o", str(tmp_path / "after.vfj"))
    assert done.status == 0, done.stderr  # the aborted run's journal, once it is over


async def _hosted_journal(agent: Any) -> str:
    """The journal of the run ``agent`` hosts (its store holds just that one)."""
    journals = agent.agent.config.host_runs.journals()
    assert len(journals) == 1
    return str(journals[0])


def journal_part(data: bytes, *, size: int | None = None, done: bool = True) -> dict[str, Any]:
    return {
        "data": [data],
        "size": len(data) if size is None else size,
        "done": done,
        "name": RUN_NAME,
    }


@pytest.mark.parametrize(
    ("answer", "status", "message"),
    [
        (journal_part(b"not a journal at all, just bytes"), 1, "the agent sent no journal"),
        ({**journal_part(b"x"), "name": "../../x.vfj"}, 1, "is not the name of a journal"),
        (journal_part(b"x", size=3, done=False), 4, "parts do not add up to 3 bytes"),
        ("nonsense", 4, "the answer is not a journal's part"),
    ],
    ids=["not-a-journal", "a-path-for-a-name", "never-done", "not-a-part"],
)
async def test_a_bad_answer_leaves_nothing_behind(
    nursery, key_file, journal_store, answer, status, message
) -> None:
    address = await fake_agent(nursery, key_file, answer, leave=False)
    result = await fetch(key_file, address, "r1")
    assert result.status == status, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert leftovers(journal_store) == []


def test_a_fetched_journal_must_be_of_the_run_asked_for(tmp_path: Path) -> None:
    from vfmig.cli.journal_fetch import _check

    path = tmp_path / "j.vfj"
    header = JournalHeader(
        host="h", role="orchestrator", run_id="other", kernel="k", start_wall_ns=0, start_mono_ns=0
    )
    JournalWriter.create(path, header).close()
    with pytest.raises(JournalError, match="the journal of run other, not r1"):
        _check(path, "r1")
    assert _check(path, "other")["intact"] is True


def test_agent_processes_serve_their_own_side_and_the_hosted_run(
    agent_process, key_file, tmp_path, journal_store
) -> None:
    """As a user runs it: two agent processes with stores of their own, a ``--via`` run,
    then each journal of the run fetched here and merged by hand as the agent merged it."""
    dirs = {name: tmp_path / name for name in ("A", "B", "A-journals", "B-journals")}
    for directory in dirs.values():
        directory.mkdir()
    a = agent_process(
        key_file, dirs["A"], "--orchestrate", "--journal-dir", str(dirs["A-journals"])
    )
    b = agent_process(key_file, dirs["B"], "--journal-dir", str(dirs["B-journals"]))
    a_sims, b_sims = Sims(dirs["A"], relative=True), Sims(dirs["B"], relative=True)
    src = a_sims.spec("a", size=4 << 20, at=a.address)
    dst = b_sims.spec("b", size=4 << 20, image=False, dump=True, at=b.address)
    argv = ["migrate", "--via", a.address, "--key-file", str(key_file), "--json", src, dst]
    run = json.loads(run_cli(*argv).stdout)["result"]
    assert run["outcome"] == "completed"
    run_id = run["run"]
    sides = {}
    for agent, role in ((a, "orchestrator"), (a, "agent"), (b, "agent")):
        result = run_cli(
            "journal", "fetch", agent.address, run_id, "--role", role, "--key-file", str(key_file)
        )
        assert result.status == 0, result.stderr
        path = Path(result.stdout.split("journal: ")[1].strip())
        assert path.parent == journal_store
        with JournalReader(path) as reader:
            sides[agent.address, role] = reader.header
    merged = sides[a.address, "orchestrator"]
    assert (merged.role, merged.run_id) == ("merged", run_id)
    assert [m["role"] for m in merged.merged_from] == ["orchestrator", "agent", "agent"]
    assert sides[a.address, "agent"].role == sides[b.address, "agent"].role == "agent"
    assert {s.run_id for s in sides.values()} == {run_id}
    nothing = run_cli("journal", "fetch", b.address, run_id, "--key-file", str(key_file))
    assert nothing.status == 1
    assert f"no orchestrator journal of run {run_id} in" in nothing.stderr
    assert len(JournalStore().journals()) == 3
