"""A run an agent hosts for a thin client (``vfmig migrate --via``, ``vfmig agent --orchestrate``).

The client is the real command (``vfmig migrate --via``) in a worker thread, or a protocol
link the test drives itself where it must vanish or abort at a chosen moment; the agents
run in this process over loopback TCP (one test uses agent processes and a signal).
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import socket
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from vfmig.cli.context import Environment
from vfmig.core.errors import PeerError
from vfmig.core.events import PhaseChanged
from vfmig.core.fsm import DeviceState
from vfmig.core.model import Phase
from vfmig.engine import wire
from vfmig.engine.link import Link, connect, protocol_config
from vfmig.journal.store import JournalStore
from vfmig.protocol import Connection, Notification
from vfmig.protocol import Role as LinkRole

from .conftest import Cluster, RunningAgent, Sims, run_cli, signal_in_precopy

S = DeviceState
SIZE = 4 << 20


async def two_agents(
    cluster: Cluster, a_sims: Sims, b_sims: Sims, tmp_path: Path, *, orchestrate: bool = True
) -> tuple[RunningAgent, RunningAgent]:
    """Agent A (hosting runs with ``orchestrate``, journaling them into tmp_path/hosted, and
    serving that store as ``vfmig agent --orchestrate`` does) and agent B."""
    store = JournalStore(tmp_path / "hosted") if orchestrate else None
    a = await cluster.agent(a_sims, host_runs=store, journal_store=store)
    return a, await cluster.agent(b_sims)


def one_pair(a_sims: Sims, b_sims: Sims, a: RunningAgent, b: RunningAgent) -> tuple[str, str]:
    """A source ``a`` on agent ``a`` and a destination ``b`` (dumped) on agent ``b``."""
    src = a_sims.spec("a", size=SIZE, at=a.address)
    return src, b_sims.spec("b", size=SIZE, image=False, dump=True, at=b.address)


async def via(key_file: Path, address: str, *argv: str) -> Any:
    """``vfmig migrate --via ADDRESS --key-file KEY ARGV`` in a worker thread."""
    command = ["migrate", "--via", address, "--key-file", str(key_file), *argv]
    return await trio.to_thread.run_sync(lambda: run_cli(*command))


async def test_a_thin_client_has_the_agent_run_the_migration(
    cluster, remote_sims, b_sims, key_file, tmp_path, journal_store
) -> None:
    a, b = await two_agents(cluster, remote_sims, b_sims, tmp_path)
    src, dst = one_pair(remote_sims, b_sims, a, b)
    result = await via(key_file, a.address, "--json", src, dst)
    assert result.status == 0, result.stdout + result.stderr
    run = json.loads(result.stdout)["result"]
    assert run["outcome"] == "completed"
    assert run["bytes"]["src0"]["raw"] == run["bytes"]["dst0"]["raw"] > SIZE
    assert run["downtime_ms"] is not None
    assert (remote_sims.state("a"), b_sims.state("b")) == (S.STOP, S.RUNNING)
    assert b_sims.dump("b") == remote_sims.image("a")
    # The agent journals the run and merges both agents' own journals into it; the client
    # copies it into this host's store once merged, as if it had run the migration itself.
    journal = Path(run["journal"])
    assert journal.parent == journal_store
    assert "journal_host" not in run
    hosted = tmp_path / "hosted" / journal.name
    await cluster.settle()
    assert await trio.Path(journal).read_bytes() == await trio.Path(hosted).read_bytes()
    info = json.loads(run_cli("journal", "info", "--json", "@last").stdout)["result"]
    assert (info["header"]["role"], info["header"]["run_id"]) == ("merged", run["run"])
    assert info["outcome"] == "completed"
    assert len(info["header"]["merged_from"]) == 3
    assert any(f"run {run['run']} for client" in line for line in a.log)
    assert any("journals are merged into its journal" in line for line in a.log)


async def test_the_thin_client_shows_progress_and_the_summary(
    cluster, remote_sims, b_sims, key_file, tmp_path, journal_store
) -> None:
    a, b = await two_agents(cluster, remote_sims, b_sims, tmp_path)
    src, dst = one_pair(remote_sims, b_sims, a, b)
    result = await via(key_file, a.address, src, dst)
    assert result.status == 0, result.stderr
    for line in ("phase precopy", "phase commit", "completed: 1 pair migrated", "downtime"):
        assert line in result.stdout
    assert f"journal: {journal_store}" in result.stdout
    assert (remote_sims.state("a"), b_sims.state("b")) == (S.STOP, S.RUNNING)


async def test_an_agent_without_orchestrate_refuses_the_run(
    cluster, remote_sims, b_sims, key_file, tmp_path
) -> None:
    a, b = await two_agents(cluster, remote_sims, b_sims, tmp_path, orchestrate=False)
    src, dst = one_pair(remote_sims, b_sims, a, b)
    result = await via(key_file, a.address, src, dst)
    assert result.status == 4
    assert "does not orchestrate runs" in result.stderr
    assert "hint: start the agent with --orchestrate" in result.stderr
    assert (remote_sims.state("a"), b_sims.state("b")) == (None, None)


@pytest.mark.parametrize(
    ("orchestrate", "argv", "hosted"),
    [(True, [], True), (False, [], False), (True, ["--no-via"], False)],
    ids=["orchestrates", "does-not", "no-via"],
)
def test_the_sources_agent_hosts_the_run_when_it_orchestrates(
    agent_process, key_file, tmp_path, journal_store, orchestrate, argv, hosted
) -> None:
    """Every device on an agent: the first source's agent is asked to host the run; one
    that does not orchestrate answers unknown_method, and the command runs it itself (as
    with --no-via). The run, its output and its journal here are the same either way."""
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    a_dir.mkdir()
    b_dir.mkdir()
    a = agent_process(key_file, a_dir, *(["--orchestrate"] if orchestrate else []))
    b = agent_process(key_file, b_dir)
    a_sims, b_sims = Sims(a_dir, relative=True), Sims(b_dir, relative=True)
    src = a_sims.spec("a", size=SIZE, at=a.address)
    dst = b_sims.spec("b", size=SIZE, image=False, dump=True, at=b.address)
    result = run_cli("migrate", "--key-file", str(key_file), *argv, src, dst)
    assert result.status == 0, result.stderr
    assert "completed: 1 pair migrated" in result.stdout
    assert b_sims.dump("b") == a_sims.image("a")
    assert (f"hosted by the agent at {a.address}" in result.stdout) == hosted
    a.stop()
    assert len([line for line in a.log if "for client" in line]) == hosted
    info = json.loads(run_cli("journal", "info", "--json", "@last").stdout)["result"]
    assert info["header"]["role"] == "merged"
    assert len(info["header"]["merged_from"]) == 3
    assert f"journal: {journal_store}" in result.stdout
    assert "warning" not in result.stderr


def test_who_is_asked_to_host_a_run() -> None:
    from vfmig.cli.migrate import hosting_agent, pairs_of

    def host(*specs: str, refused: bool = False) -> str | None:
        return hosting_agent(pairs_of(list(specs)), refused)

    assert host("sim:a@127.0.0.1:1", "sim:b@h2:2", "sim:c@h3:3", "sim:d@h1:1") == "127.0.0.1:1"
    assert host("sim:a@h1:1", "sim:b") is None  # a device of this command
    assert host("sim:a@h1:1", "sim:b@h2:2", refused=True) is None


@pytest.mark.parametrize(
    ("orchestrate", "machine", "hosted"),
    [(True, "here", True), (True, "elsewhere", False), (True, None, False), (False, "here", False)],
    ids=["orchestrates-here", "another-machine", "no-machine-id", "does-not-orchestrate"],
)
async def test_only_an_agent_of_this_machine_that_orchestrates_hosts_by_default(
    cluster, remote_sims, b_sims, key_file, tmp_path, orchestrate, machine, hosted
) -> None:
    """A port forwarded to another host's agent looks like loopback here: the devices'
    addresses mean the same to the hosting agent only if it runs on this machine."""
    from vfmig.cli.agent_client import this_machine
    from vfmig.cli.via import NoHost, run_via
    from vfmig.core.options import RunOptions
    from vfmig.engine.keys import load_key

    store = JournalStore(tmp_path / "hosted") if orchestrate else None
    identity = this_machine() if machine == "here" else machine
    a = await cluster.agent(remote_sims, host_runs=store, journal_store=store, machine=identity)
    b = await cluster.agent(b_sims)
    src, dst = one_pair(remote_sims, b_sims, a, b)
    env = Environment(stdout=io.StringIO(), stderr=io.StringIO(), stdout_isatty=False)

    def ask() -> Any:
        options = RunOptions(precopy=False)
        key = load_key(key_file)
        try:
            return run_via(a.address, env, [src, dst], options, key=key, tls=None, json=True,
                           journal=None, keep=None, probe=True)  # fmt: skip
        except NoHost:
            return None

    answer = await trio.to_thread.run_sync(ask)
    assert (answer is not None) == hosted
    if hosted:
        assert answer[0]["outcome"] == "completed"
        assert b_sims.dump("b") == remote_sims.image("a")
    else:
        assert (remote_sims.state("a"), b_sims.state("b")) == (None, None)  # never opened
        assert not [line for line in a.log if "for client" in line]


async def test_a_journal_that_cannot_be_copied_stays_on_the_agents_host(
    cluster, remote_sims, b_sims, key_file, tmp_path, journal_store, monkeypatch
) -> None:
    a, b = await two_agents(cluster, remote_sims, b_sims, tmp_path)
    monkeypatch.setattr(JournalStore, "find", lambda self, run, role: None)
    src, dst = one_pair(remote_sims, b_sims, a, b)
    result = await via(key_file, a.address, src, dst)
    assert result.status == 0, result.stderr  # the run's outcome, whatever its journal
    assert "vfmig: warning: the run's journal stays on the agent's host: agent" in result.stderr
    assert f"journal: {socket.gethostname()}:{tmp_path / 'hosted'}" in result.stdout
    assert list(journal_store.iterdir()) == []


async def test_a_hosted_runs_journal_goes_where_journal_says(
    cluster, remote_sims, b_sims, key_file, tmp_path, journal_store
) -> None:
    a, b = await two_agents(cluster, remote_sims, b_sims, tmp_path)
    src, dst = one_pair(remote_sims, b_sims, a, b)
    path = tmp_path / "run.vfj"
    result = await via(key_file, a.address, "--journal", str(path), "--json", src, dst)
    assert result.status == 0, result.stderr
    assert json.loads(result.stdout)["result"]["journal"] == str(path)
    assert run_cli("journal", "verify", str(path)).status == 0
    assert list(journal_store.iterdir()) == []


async def test_a_hosted_runs_journal_joins_the_store_as_any_runs(
    cluster, remote_sims, b_sims, key_file, tmp_path, journal_store
) -> None:
    """Copied into the store, then the store rotated: --keep-journals as for any run."""
    a, b = await two_agents(cluster, remote_sims, b_sims, tmp_path)
    runs = []
    for src, dst in ("a", "b"), ("c", "d"):
        pair = (
            remote_sims.spec(src, size=SIZE, at=a.address),
            b_sims.spec(dst, size=SIZE, image=False, dump=True, at=b.address),
        )
        result = await via(key_file, a.address, "--keep-journals", "1", "--json", *pair)
        assert result.status == 0, result.stderr
        runs.append(json.loads(result.stdout)["result"])
    assert [p.name for p in journal_store.iterdir()] == [Path(runs[1]["journal"]).name]
    assert len(list((tmp_path / "hosted").iterdir())) >= 2  # the agent keeps its own


async def test_a_wrong_key_is_refused(cluster, remote_sims, b_sims, tmp_path) -> None:
    from vfmig.engine.keys import create_key

    a, b = await two_agents(cluster, remote_sims, b_sims, tmp_path)
    other = tmp_path / "other.key"
    create_key(other)
    src, dst = one_pair(remote_sims, b_sims, a, b)
    result = await via(other, a.address, src, dst)
    assert result.status == 4
    assert "authentication failed" in result.stderr
    assert (remote_sims.state("a"), b_sims.state("b")) == (None, None)


async def test_an_unreachable_agent_of_the_run_is_reported_with_the_journal(
    cluster, remote_sims, b_sims, key_file, tmp_path, journal_store
) -> None:
    a, _ = await two_agents(cluster, remote_sims, b_sims, tmp_path)
    src = remote_sims.spec("a", size=SIZE, at=a.address)
    result = await via(key_file, a.address, "--json", src, "sim:b,size=4MiB@127.0.0.1:1")
    assert result.status == 4, result.stdout + result.stderr
    error = json.loads(result.stdout)["error"]
    assert "127.0.0.1:1: cannot connect to the agent" in error["message"]
    assert Path(error["journal"]).parent == journal_store  # copied here, as a run's is
    assert remote_sims.state("a") in (None, S.RUNNING)
    await cluster.settle()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sim:a", "sim:b@127.0.0.1:1"], "every device needs its @HOST:PORT (sim:a has none)"),
        (["--journal", __file__, "sim:a@127.0.0.1:1", "sim:b@127.0.0.1:1"], "exists: journals"),
        (["sim:a@127.0.0.1:1", "sim:b@127.0.0.1:1", "sim:c@127.0.0.1:1"], "come in pairs"),
    ],
    ids=["local-device", "existing-journal", "odd"],
)
def test_what_a_thin_client_cannot_ask_is_a_usage_error(key_file, argv, message) -> None:
    result = run_cli("migrate", "--via", "127.0.0.1:1", "--key-file", str(key_file), *argv)
    assert result.status == 2
    assert message in result.stderr


async def test_a_bad_spec_is_refused_by_the_agent_as_bad_params(
    cluster, remote_sims, b_sims, tmp_path
) -> None:
    a, _ = await two_agents(cluster, remote_sims, b_sims, tmp_path)
    async with client(cluster, a) as (link, _):
        for params, message in (
            ({"devices": ["sim:a@x:1", "bogus:b@x:1"]}, "unknown device kind 'bogus'"),
            ({"devices": ["sim:a", "sim:b"]}, "names every device with @HOST:PORT"),
            ({"devices": ["sim:a@x:1", "sim:b@x:1"], "options": {"step_timeout_s": -1}},
             "step_timeout_s must be a positive number"),
        ):  # fmt: skip
            with pytest.raises(Exception, match=message) as raised:
                await link.request("migrate", params)
            assert getattr(raised.value, "code", None) == "bad_params"


@contextlib.asynccontextmanager
async def client(cluster: Cluster, agent: RunningAgent) -> Any:
    """A control link to ``agent`` as a thin client's, and the phases its run notices
    announced (phase -> an event set once it began)."""
    stream = await connect(agent.address)
    conn = Connection(LinkRole.ORCHESTRATOR, protocol_config(cluster.key), name="test client")
    link = Link(stream, conn, peer=f"agent {agent.address}")
    phases: defaultdict[Phase, trio.Event] = defaultdict(trio.Event)

    async def handle(event: object) -> None:
        if isinstance(event, Notification):
            payload = event.payload
            for item in wire.batch_items(payload) if "batch" in payload else [payload]:
                notice = wire.parse_notice(item)
                if isinstance(notice.event, PhaseChanged):
                    phases[notice.event.phase].set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_quietly, link.run, handle)
        await link.wait_established()
        yield link, phases
        await link.aclose()
        nursery.cancel_scope.cancel()


async def _quietly(run: Any, handle: Any) -> None:
    with contextlib.suppress(PeerError):
        await run(handle)


async def start_slow_run(
    cluster: Cluster, remote_sims: Sims, b_sims: Sims, a: RunningAgent, b: RunningAgent
) -> dict[str, Any]:
    # 1 MiB reads 100 ms apart: precopy of 16 MiB takes well over a second.
    src = remote_sims.spec("a", size=16 << 20, image=False, read_delay="100ms", at=a.address)
    dst = b_sims.spec("b", size=16 << 20, image=False, dump=True, at=b.address)
    return {"devices": [src, dst], "options": {}, "progress": True}


async def wait_for(phases: defaultdict[Phase, trio.Event], phase: Phase) -> None:
    with trio.fail_after(30):
        await phases[phase].wait()


async def test_abort_rolls_the_hosted_run_back(cluster, remote_sims, b_sims, tmp_path) -> None:
    a, b = await two_agents(cluster, remote_sims, b_sims, tmp_path)
    params = await start_slow_run(cluster, remote_sims, b_sims, a, b)
    answers: list[Any] = []
    async with client(cluster, a) as (link, phases), trio.open_nursery() as nursery:

        async def migrate() -> None:
            answers.append(await link.request("migrate", params))

        nursery.start_soon(migrate)
        await wait_for(phases, Phase.PRECOPY)
        assert await link.request("abort", {"signal": "SIGINT"}) is True
    result = answers[0]["result"]
    assert (result["outcome"], result["exit_status"]) == ("interrupted", 130)
    assert phases[Phase.ROLLBACK].is_set()
    await cluster.settle()
    assert (remote_sims.state("a"), b_sims.state("b")) == (S.RUNNING, S.RUNNING)
    assert b_sims.dump("b") is None


async def test_a_device_in_another_hosted_run_is_busy(
    cluster, remote_sims, b_sims, key_file, tmp_path
) -> None:
    a, b = await two_agents(cluster, remote_sims, b_sims, tmp_path)
    params = await start_slow_run(cluster, remote_sims, b_sims, a, b)
    src = params["devices"][0]
    other = b_sims.spec("c", size=16 << 20, image=False, dump=True, at=b.address)
    async with client(cluster, a) as (link, phases), trio.open_nursery() as nursery:
        nursery.start_soon(link.request, "migrate", params)
        await wait_for(phases, Phase.PRECOPY)
        result = await via(key_file, a.address, src, other)
        assert await link.request("abort", {}) is True
    assert result.status == 3, result.stderr
    assert "preflight: open: the device is busy" in result.stderr
    assert "another migration holds it" in result.stderr
    await cluster.settle()
    states = (remote_sims.state("a"), b_sims.state("b"), b_sims.state("c"))
    assert states == (S.RUNNING, S.RUNNING, S.RUNNING)  # c opened in preflight, unchanged
    assert (b_sims.dump("b"), b_sims.dump("c")) == (None, None)


async def test_the_client_vanishing_aborts_the_hosted_run(
    cluster, remote_sims, b_sims, tmp_path
) -> None:
    a, b = await two_agents(cluster, remote_sims, b_sims, tmp_path)
    params = await start_slow_run(cluster, remote_sims, b_sims, a, b)
    async with client(cluster, a) as (link, phases):

        async def migrate() -> None:
            with contextlib.suppress(PeerError):
                await link.request("migrate", params)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(migrate)
            await wait_for(phases, Phase.PRECOPY)
            await link.abort()  # the client's process is gone: no Goodbye
    await cluster.settle()
    assert (remote_sims.state("a"), b_sims.state("b")) == (S.RUNNING, S.RUNNING)
    assert b_sims.dump("b") is None
    assert any("the client of the run left" in line for line in a.log)


def test_ctrl_c_in_a_thin_client_rolls_back_and_exits_130(
    agent_process, key_file, tmp_path
) -> None:
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    a_dir.mkdir()
    b_dir.mkdir()
    a = agent_process(key_file, a_dir, "--orchestrate")
    b = agent_process(key_file, b_dir)
    a_sims, b_sims = Sims(a_dir, relative=True), Sims(b_dir, relative=True)
    src = a_sims.spec("a", size=64 << 20, image=False, read_delay="40ms", at=a.address)
    dst = b_sims.spec("b", size=64 << 20, image=False, dump=True, at=b.address)
    argv = ["migrate", "--via", a.address, "--key-file", str(key_file), src, dst]
    result = signal_in_precopy(argv, signal.SIGINT, tmp_path)
    stdout, stderr = result.stdout, result.stderr
    assert result.status == 130, stdout + stderr
    assert "vfmig: SIGINT: rolling the run back (the agent does it)" in stderr
    assert "(SIGINT: interrupted by the user)" in stderr
    assert "phase rollback" in stdout
    assert (a_sims.state("a"), b_sims.state("b")) == (S.RUNNING, S.RUNNING)
    assert b_sims.dump("b") is None
    a.stop()
    assert any("interrupted by the user; aborting" in line for line in a.log)


def test_run_summaries_cross_the_wire_unchanged() -> None:
    from vfmig.core.events import Downtime, Summary, Transfer
    from vfmig.core.model import DeviceId, Outcome, Role

    summary = Summary(
        total_ns=5,
        devices={DeviceId(Role.SOURCE, 0): Transfer(time_ns=1, raw_bytes=2, wire_bytes=3)},
        phases={Phase.PRECOPY: Transfer(time_ns=4, raw_bytes=5, wire_bytes=6)},
        downtime=Downtime(
            quiesce_ns=1, drain_ns=2, transfer_ns=3, resume_write_ns=4, validation_ns=5, start_ns=6
        ),
        outcome=Outcome.COMPLETED,
    )
    assert wire.parse_summary(wire.summary_result(summary)) == summary
    empty = Summary(total_ns=0, devices={}, phases={}, downtime=None, outcome=None)
    assert wire.parse_summary(wire.summary_result(empty)) == empty
    for bad in ({}, {**wire.summary_result(summary), "phases": {"nope": [1, 2, 3]}}):
        with pytest.raises(wire.WireError):
            wire.parse_summary(bad)


async def fake_agent(nursery: trio.Nursery, key_file: Path, answer: Any, *, leave: bool) -> str:
    """An agent that answers every request with ``answer`` (and with ``leave`` says
    Goodbye right after it); its address."""
    from vfmig.engine.keys import load_key
    from vfmig.protocol import Goodbye, Request, Response

    key = load_key(key_file)

    async def serve(stream: trio.SocketStream) -> None:
        conn = Connection(LinkRole.AGENT, protocol_config(key), name="odd agent")
        link = Link(stream, conn, peer="client")

        async def handle(event: object) -> None:
            if not isinstance(event, Request):
                return
            response = Response(id=event.id, result=answer)
            if not leave:
                await link.send(response)
                return
            # The answer and the Goodbye in one write: the client reads them together.
            data = conn.data_to_send() + conn.send(response) + conn.send(Goodbye(reason="bye"))
            await stream.send_all(data)

        with contextlib.suppress(PeerError):
            await link.run(handle)

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


@pytest.mark.parametrize(
    ("answer", "status", "message"),
    [
        ({"result": {"outcome": 1}}, 4, "the answer to migrate is not a run's result"),
        ("nonsense", 4, "the answer to migrate is not a run's result"),
        ({"result": None, "error": {"message": "it broke", "exit_status": 1}}, 1, "it broke"),
        ({"result": None, "error": {"message": "odd", "exit_status": 99}}, 1, "odd"),
    ],
    ids=["bad-result", "not-a-map", "error", "unknown-status"],
)
async def test_a_strange_answer_is_a_clear_error(
    nursery, key_file, answer, status, message
) -> None:
    address = await fake_agent(nursery, key_file, answer, leave=False)
    result = await via(key_file, address, f"sim:a@{address}", f"sim:b@{address}")
    assert result.status == status, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


async def test_an_answer_followed_at_once_by_a_goodbye_is_the_answer(nursery, key_file) -> None:
    done = {"outcome": "completed", "exit_status": 0, "summary": "completed: 1 pair migrated"}
    answer = {
        "result": {**done, "run": "r1", "errors": [], "journal": "/j.vfj", "journal_host": "h"}
    }
    address = await fake_agent(nursery, key_file, answer, leave=True)
    result = await via(key_file, address, f"sim:a@{address}", f"sim:b@{address}")
    assert result.status == 0, result.stderr
    assert "journal: h:/j.vfj" in result.stdout
    # On another host than this command's: how to copy it here.
    assert f"copy it here: vfmig journal fetch {address} r1 --key-file {key_file}" in result.stdout


async def test_a_client_that_stops_reading_never_holds_the_forwarder() -> None:
    from vfmig.engine.agent import NOTIFY_CAPACITY, ControlSession

    session = ControlSession(link=None, peer="slow client")  # type: ignore[arg-type]
    session.offer({"dropped": True})  # not subscribed: nothing is queued
    session.subscribed = True
    for n in range(NOTIFY_CAPACITY + 10):  # offer() is synchronous: it cannot wait
        session.offer({"n": n})
    session.end()
    queued = [payload["n"] async for payload in session._receive]
    assert queued == list(range(NOTIFY_CAPACITY))  # the rest were dropped
