"""An agent killed (kill -9) mid-run and restarted brings back the devices it was migrating,
from its ledger, by the failure policy, and still answers ``status`` about its verdicts.

Most tests use real agent processes; two use an Agent in this process that starts from a
ledger the test wrote.

Real ``vfmig agent`` processes on fixed loopback ports (a restarted agent must be found at
the address its peer recorded), each with its own ``--state-file``; ``sim:`` devices with a
``state-dir`` so a device's state survives the process, read back from its simulated
debugfs as a person would.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import trio

from vfmig.core.fsm import DeviceState
from vfmig.core.model import Role
from vfmig.device.open import open_device
from vfmig.engine import wire
from vfmig.engine.agent import Agent, AgentConfig
from vfmig.engine.keys import load_key
from vfmig.engine.ledger import Ledger, LedgerDevice, load
from vfmig.engine.link import Link, connect, protocol_config, with_link
from vfmig.protocol import Connection
from vfmig.protocol import Role as LinkRole

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

S = DeviceState
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Host:
    """One agent's host: its --sim-dir, its fixed address, its ledger; started and killed
    as often as a test likes. Its log (stderr) is read in a thread as it comes."""

    def __init__(self, root: Path, name: str, key: Path, sims_type: Any) -> None:
        self.dir = root / name
        self.dir.mkdir()
        (root / f"j{name}").mkdir()
        self.journal_dir = root / f"j{name}"
        self.state_file = root / f"{name}.ledger"
        self.key = key
        self.address = f"127.0.0.1:{free_port()}"
        self.sims = sims_type(self.dir, relative=True)
        self.process: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "vfmig", "agent", "--listen", self.address]
        command += ["--key-file", str(self.key), "--sim-dir", str(self.dir), "--grace", "0.2"]
        command += ["--state-file", str(self.state_file), "--journal-dir", str(self.journal_dir)]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self.log = []
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, text=True, cwd=self.dir.parent, env=env
        )
        stream = self.process.stderr
        assert stream is not None
        log = self.log
        self._reader = threading.Thread(target=lambda: log.extend(line.rstrip() for line in stream))
        self._reader.start()
        self.wait_for("listening on ")

    def wait_for(self, text: str, timeout: float = 60) -> str:
        """The first log line containing ``text`` (waits for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in tuple(self.log):
                if text in line:
                    return line
            assert self.process is not None
            if self.process.poll() is not None and self._reader and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged:\n" + "\n".join(self.log))

    def _end(self) -> None:
        assert self.process is not None
        assert self._reader is not None
        self.process.wait(timeout=30)
        self._reader.join(timeout=30)
        assert self.process.stderr is not None
        self.process.stderr.close()
        self.process = None

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self._end()

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._end()


@pytest.fixture
def agents(tmp_path: Path, key_file: Path, remote_sims: Any) -> Iterator[tuple[Host, Host]]:
    """Two agents, on hosts A and B, started (a test kills and restarts them)."""
    made = (
        Host(tmp_path, "A", key_file, type(remote_sims)),
        Host(tmp_path, "B", key_file, type(remote_sims)),
    )
    try:
        for host in made:
            host.start()
        yield made
    finally:
        for host in made:
            host.stop()


def migrate(tmp_path: Path, key_file: Path, *argv: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "vfmig", "migrate", "--key-file", str(key_file), *argv]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )


def wait_phase(process: subprocess.Popen[str], phase: str) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        if f"phase {phase}" in line:
            return
    raise AssertionError(f"phase {phase} never came: {process.communicate()}")


def run_of(host: Host) -> str:
    found = re.search(r" of run (\S+)$", host.wait_for(" of run "))
    assert found is not None
    return found[1]


def status(address: str, key_file: Path, run: str) -> str:
    """What the agent at ``address`` answers about ``run`` (its ``status`` RPC)."""

    async def ask() -> str:
        stream = await connect(address)
        conn = Connection(LinkRole.ORCHESTRATOR, protocol_config(load_key(key_file)), name="test")
        link = Link(stream, conn, peer=f"agent {address}")

        async def ignore(event: object) -> None:
            pass

        async def query() -> str:
            return wire.parse_verdict(await link.request("status", {"run": run}), run).value

        return await with_link(link, ignore, query)

    return trio.run(ask)


def migrate_held_in_validation(
    a: Host, b: Host, tmp_path: Path, key_file: Path
) -> tuple[subprocess.Popen[str], str]:
    """A 4 MiB migration from A to B whose destination hangs validating the whole stream
    (RESUMING>STOP), seen in its resume phase: the process and its run id."""
    src = a.sims.spec("a", size=4 * MIB, at=a.address)
    dst = b.sims.spec("b", size=4 * MIB, image=False, hang="RESUMING>STOP", at=b.address)
    run = migrate(tmp_path, key_file, "--no-precopy", "--timeout", "60", src, dst)
    wait_phase(run, "resume")
    return run, run_of(b)


def test_a_source_agent_killed_in_stop_copy_runs_its_source_again(
    agents: tuple[Host, Host], tmp_path: Path, key_file: Path
) -> None:
    a, b = agents
    # 2 MiB reads 0.4 s apart: stop-copy of 16 MiB takes over 3 s
    src = a.sims.spec("a", size=16 * MIB, read_delay="0.4s", at=a.address)
    dst = b.sims.spec("b", size=16 * MIB, image=False, at=b.address)
    run = migrate(tmp_path, key_file, "--no-precopy", src, dst)
    wait_phase(run, "stopcopy")
    time.sleep(1.0)
    a.kill()
    out, err = run.communicate(timeout=120)
    # 1 or 4: the broken data link or the lost agent, whichever the orchestrator saw first
    assert run.returncode in (1, 4), out + err
    assert a.sims.state("a") is S.STOP_COPY  # left over by the killed agent
    assert b.sims.state("b") is S.RUNNING  # the destination was reset

    a.start()
    assert a.wait_for("sim:a: source of run").endswith("reopened in STOP_COPY")
    a.wait_for("the destination's agent says not committed")
    assert a.wait_for("left in ").endswith("left in RUNNING")
    assert a.sims.state("a") is S.RUNNING
    assert b.sims.state("b") is S.RUNNING


def test_a_destination_agent_killed_before_the_commit_resets_its_device(
    agents: tuple[Host, Host], tmp_path: Path, key_file: Path
) -> None:
    a, b = agents
    run, run_id = migrate_held_in_validation(a, b, tmp_path, key_file)
    time.sleep(0.5)
    b.kill()
    out, err = run.communicate(timeout=120)
    assert run.returncode == 4, out + err
    assert a.sims.state("a") is S.RUNNING  # the orchestrator brought it back
    assert b.sims.state("b") is S.RESUMING  # left over by the killed agent

    b.start()
    assert b.wait_for("reopened in").endswith(f"destination of run {run_id} reopened in RESUMING")
    b.wait_for("sim:b: reset")
    assert b.wait_for("left in ").endswith("left in RUNNING")
    assert b.sims.state("b") is S.RUNNING
    assert a.sims.state("a") is S.RUNNING
    assert status(b.address, key_file, run_id) == "not committed"


def test_a_destination_agent_killed_after_the_commit_keeps_its_device_running(
    agents: tuple[Host, Host], tmp_path: Path, key_file: Path
) -> None:
    a, b = agents
    # the source hangs stopping after the commit: the run is past the commit point, open
    src = a.sims.spec("a", size=4 * MIB, hang="STOP_COPY>STOP", at=a.address)
    dst = b.sims.spec("b", size=4 * MIB, image=False, at=b.address)
    run = migrate(tmp_path, key_file, "--no-precopy", "--timeout", "60", src, dst)
    run_id = run_of(b)
    b.wait_for(f"run {run_id} committed")
    deadline = time.monotonic() + 30
    while b.sims.state("b") is not S.RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    b.kill()
    run.kill()
    run.communicate(timeout=30)
    a.kill()  # its hung arc would hold a graceful stop
    assert b.sims.state("b") is S.RUNNING

    b.start()
    assert b.wait_for("reopened in").endswith(f"destination of run {run_id} reopened in RUNNING")
    assert b.wait_for("left in ").endswith("left in RUNNING")
    assert not any("reset" in line for line in b.log)
    assert b.sims.state("b") is S.RUNNING
    assert status(b.address, key_file, run_id) == "committed"


def test_a_source_restarted_while_its_destination_agent_is_down_stays_in_doubt(
    agents: tuple[Host, Host], tmp_path: Path, key_file: Path
) -> None:
    a, b = agents
    # both agents die while the destination validates the stream
    run, run_id = migrate_held_in_validation(a, b, tmp_path, key_file)
    a.wait_for(" sent (")  # the whole stream
    a.kill()
    b.kill()
    out, err = run.communicate(timeout=120)
    assert run.returncode != 0, out + err
    assert (a.sims.state("a"), b.sims.state("b")) == (S.STOP_COPY, S.RESUMING)

    a.start()  # the destination's agent is down: nobody can tell
    doubt = a.wait_for("IN DOUBT")
    assert f"run {run_id} IN DOUBT: sim:a kept in STOP" in doubt
    assert "vfmig recover sim:a" in doubt
    assert a.wait_for("left in ").endswith("left in STOP")
    assert a.sims.state("a") is S.STOP
    a.stop()

    b.start()  # the arbiter: never committed, so it resets its device and says so
    assert b.wait_for("left in ").endswith("left in RUNNING")
    assert b.sims.state("b") is S.RUNNING

    a.start()  # asks again, and now knows
    a.wait_for("the destination's agent says not committed")
    assert a.wait_for("left in ").endswith("left in RUNNING")
    assert a.sims.state("a") is S.RUNNING
    a.stop()
    a.start()  # resolved: nothing left to recover
    assert not any("reopened" in line for line in a.log)


# --- in this process: what the ledger alone decides ------------------------------------------


async def start_agent(nursery: trio.Nursery, sims: Any, ledger: Ledger, log: list[str]) -> Agent:
    config = AgentConfig(
        name="restarted", key=None, sim_dir=sims.root, log=log.append, ledger=ledger
    )
    agent = Agent(config)
    await nursery.start(agent.run)
    await agent.recover()
    with trio.fail_after(30):
        await agent.wait_idle()
    return agent


async def test_a_committed_destination_found_stopped_is_started(
    nursery: trio.Nursery, tmp_path: Path, remote_sims: Any
) -> None:
    spec = remote_sims.spec("b", size=MIB, image=False)
    with open_device(spec.replace("state-dir=b", f"state-dir={remote_sims.root / 'b'}")) as dev:
        dev.set_state(S.STOP)  # past the commit point, before the destination ran
    path = tmp_path / "agent.ledger"
    ledger = Ledger(path, print)
    await ledger.open_device("r1", LedgerDevice("sim:b", spec, Role.DESTINATION, ("dst0",)))
    await ledger.verdict("r1", True)

    log: list[str] = []
    agent = await start_agent(nursery, remote_sims, Ledger(path, log.append), log)
    assert "sim:b: destination of run r1 reopened in STOP" in log
    assert "sim:b: destination of run r1 left in RUNNING" in log
    assert remote_sims.state("b") is S.RUNNING
    assert agent.runs["r1"].answer() is wire.Verdict.COMMITTED
    assert load(path, print).runs == {}
    assert load(path, print).verdicts == {"r1": True}


async def test_a_device_that_cannot_be_reopened_is_named_and_kept(
    nursery: trio.Nursery, tmp_path: Path, remote_sims: Any
) -> None:
    path = tmp_path / "agent.ledger"
    ledger = Ledger(path, print)
    entry = LedgerDevice("sim:gone", "sim:gone,state-dir=/elsewhere", Role.SOURCE, ("src0",))
    await ledger.open_device("r1", entry)

    log: list[str] = []
    await start_agent(nursery, remote_sims, Ledger(path, log.append), log)
    (line,) = [line for line in log if "cannot be reopened" in line]
    assert line.startswith("sim:gone: source of run r1 cannot be reopened (")
    assert line.endswith("check it with vfmig recover sim:gone")
    assert load(path, print).runs == {"r1": (entry,)}


def test_the_default_ledger_is_named_after_the_address_and_holds_no_secret(
    agent_process: Any, key_file: Path, tmp_path: Path, cli: Any, journal_store: Path
) -> None:
    root = tmp_path / "A"
    root.mkdir()
    port = free_port()
    agent = agent_process(key_file, root, "--listen", f"127.0.0.1:{port}")
    src = f"sim:a,size=1MiB,state-dir=a@{agent.address}"
    dst = f"sim:b,size=1MiB,state-dir=b@{agent.address}"
    result = cli("migrate", "--key-file", str(key_file), src, dst)
    assert result.status == 0, result.stdout + result.stderr
    path = journal_store / f"agent-127.0.0.1-{port}.ledger"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ledger = load(path, print)
    assert ledger.runs == {}  # every device released
    assert list(ledger.verdicts.values()) == [True]  # the run committed here
    key_text = key_file.read_text().split()[-1]
    assert key_text not in path.read_text()
