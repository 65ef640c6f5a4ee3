"""Agents over loopback TCP: in this process (with cuttable links) and as real processes."""

from __future__ import annotations

import json
import signal

import pytest
import trio

from vfmig.core.errors import ExitStatus, PeerError
from vfmig.core.fsm import DeviceState
from vfmig.core.model import Outcome
from vfmig.engine.agent import AgentConfig
from vfmig.engine.local import LocalAgent

S = DeviceState


async def test_two_agents_with_precopy(cluster, sims, remote_sims) -> None:
    a = await cluster.agent(sims_for(remote_sims, "A", sims))
    b = await cluster.agent(sims_for(remote_sims, "B", sims))
    src = a.sims.spec("a", size=3 << 20, at=a.address)
    dst = b.sims.spec("b", size=3 << 20, image=False, dump=True, at=b.address)
    report = await cluster.migrate([(src, dst)])
    assert report.outcome is Outcome.COMPLETED
    assert report.errors == ()
    await cluster.settle()
    assert (a.sims.state("a"), b.sims.state("b")) == (S.STOP, S.RUNNING)
    assert b.sims.dump("b") == a.sims.image("a")
    assert any("stream 1 sent" in line for line in a.log)
    assert any("digest ok" in line for line in b.log)
    from vfmig.core.events import ChunkReceived, ChunkSent, DebugfsSampled, SwitchoverAcked

    seen = await cluster.events()
    samples = [e for e in seen if isinstance(e, DebugfsSampled)]
    assert {(str(e.device), e.state) for e in samples} == {("src0", S.RUNNING), ("dst0", S.RUNNING)}
    sent = sum(e.raw for e in seen if isinstance(e, ChunkSent))
    received = sum(e.raw for e in seen if isinstance(e, ChunkReceived))
    assert sent == received > 3 << 20
    assert any(isinstance(e, SwitchoverAcked) for e in seen)


async def test_several_pairs_across_two_agents_without_precopy(cluster, sims, remote_sims) -> None:
    from vfmig.core.phases import MachineConfig, PrecopyMode

    a = await cluster.agent(sims_for(remote_sims, "A", sims))
    b = await cluster.agent(sims_for(remote_sims, "B", sims))
    pairs = [
        (a.sims.spec("s0", at=a.address), b.sims.spec("d0", image=False, dump=True, at=b.address)),
        (b.sims.spec("s1", at=b.address), a.sims.spec("d1", image=False, dump=True, at=a.address)),
    ]
    machine = MachineConfig(precopy=PrecopyMode.OFF, step_timeout_ns=10**10)
    report = await cluster.migrate(pairs, machine=machine)
    assert report.outcome is Outcome.COMPLETED
    await cluster.settle()
    assert (a.sims.state("s0"), b.sims.state("d0")) == (S.STOP, S.RUNNING)
    assert (b.sims.state("s1"), a.sims.state("d1")) == (S.STOP, S.RUNNING)
    assert b.sims.dump("d0") == a.sims.image("s0")
    assert a.sims.dump("d1") == b.sims.image("s1")


@pytest.mark.parametrize("local_side", ["source", "destination"])
async def test_local_and_remote_devices_in_one_pair(
    cluster, nursery, sims, remote_sims, key_file, local_side
) -> None:
    from vfmig.engine.keys import load_key

    b = await cluster.agent(sims_for(remote_sims, "B", sims))
    local = LocalAgent(AgentConfig(name="local", key=load_key(key_file)))
    await nursery.start(local.run)
    here = sims.spec("here", size=1 << 20, image=local_side == "source", dump=True)
    there = b.sims.spec(
        "there", size=1 << 20, image=local_side == "destination", dump=True, at=b.address
    )
    pair = (here, there) if local_side == "source" else (there, here)
    report = await cluster.migrate([pair], local=local)
    assert report.outcome is Outcome.COMPLETED, report.summary
    await cluster.settle()
    if local_side == "source":
        assert (sims.state("here"), b.sims.state("there")) == (S.STOP, S.RUNNING)
        assert b.sims.dump("there") == sims.image("here")
    else:
        assert (b.sims.state("there"), sims.state("here")) == (S.STOP, S.RUNNING)
        assert sims.dump("here") == b.sims.image("there")


async def test_a_wrong_key_is_refused_before_any_change(cluster, sims, remote_sims) -> None:
    a = await cluster.agent(sims_for(remote_sims, "A", sims))
    src = a.sims.spec("a", at=a.address)
    dst = a.sims.spec("b", image=False, at=a.address)
    with pytest.raises(PeerError, match="authentication failed") as caught:
        await cluster.migrate([(src, dst)], key=b"not the key, but as long as one")
    assert caught.value.exit_status is ExitStatus.PEER
    assert "same key file" in (caught.value.hint or "")
    await cluster.settle()
    assert (a.sims.state("a"), a.sims.state("b")) == (None, None)  # never opened
    assert any("authentication failed" in line for line in a.log)


async def test_a_file_outside_the_sim_dir_is_refused(cluster, sims, remote_sims, tmp_path) -> None:
    a = await cluster.agent(sims_for(remote_sims, "A", sims))
    outside = tmp_path / "elsewhere"
    src = f"sim:a,size=1MiB,state-dir={outside}@{a.address}"
    dst = a.sims.spec("b", image=False, at=a.address)
    report = await cluster.migrate([(src, dst)])
    assert report.outcome is Outcome.REFUSED
    assert report.outcome.exit_status is ExitStatus.DEVICE
    (error,) = report.errors
    assert error.step == "open"
    assert "only names inside its sim directory" in error.message
    assert not outside.exists()
    dotdot = f"sim:a,size=1MiB,dump=../escape@{a.address}"
    report = await cluster.migrate([(dotdot, dst)])
    assert report.outcome is Outcome.REFUSED
    assert "only names inside its sim directory" in report.errors[0].message


async def test_a_device_held_by_another_migration_is_busy(cluster, sims, remote_sims) -> None:
    from vfmig.core.events import PhaseChanged
    from vfmig.core.model import Emit, Phase

    a = await cluster.agent(sims_for(remote_sims, "A", sims))
    src = a.sims.spec("a", at=a.address)
    dst = a.sims.spec("b", image=False, dump=True, at=a.address)
    other_src = a.sims.spec("c", at=a.address)
    holding, release, first_done = trio.Event(), trio.Event(), trio.Event()
    reports = []

    async def pause_in_setup(action) -> None:
        if isinstance(action, Emit) and action.event == PhaseChanged(
            phase=Phase.SETUP, previous=Phase.PREFLIGHT
        ):
            holding.set()
            await release.wait()

    async def first() -> None:
        reports.append(await cluster.migrate([(src, dst)], trace=pause_in_setup))
        first_done.set()

    cluster.nursery.start_soon(first)
    with trio.fail_after(10):
        await holding.wait()
    report = await cluster.migrate([(other_src, dst)])
    assert report.outcome is Outcome.REFUSED
    (error,) = report.errors
    assert error.cause.value == "device-busy"
    assert "another migration holds it" in error.message
    assert a.sims.state("c") is S.RUNNING  # opened, never changed
    release.set()
    with trio.fail_after(30):
        await first_done.wait()
    assert reports[0].outcome is Outcome.COMPLETED
    assert (a.sims.state("a"), a.sims.state("b")) == (S.STOP, S.RUNNING)
    assert a.sims.dump("b") == a.sims.image("a")


async def test_an_allow_list_limits_what_an_agent_opens(cluster, sims, remote_sims) -> None:
    a = await cluster.agent(sims_for(remote_sims, "A", sims), allow=frozenset({"sim:a"}))
    src = a.sims.spec("a", at=a.address)
    dst = a.sims.spec("b", image=False, at=a.address)
    report = await cluster.migrate([(src, dst)])
    assert report.outcome is Outcome.REFUSED
    assert "--allow list" in report.errors[0].message
    assert report.errors[0].device is not None
    assert str(report.errors[0].device) == "dst0"


def sims_for(template, name, _unused):
    """A second directory of simulated devices for another agent (relative names)."""
    root = template.root.parent / name
    root.mkdir()
    return type(template)(root, relative=True)


# --- real agent processes --------------------------------------------------------------------


def test_agent_processes_migrate_and_stop_gracefully(
    agent_process, key_file, tmp_path, cli, remote_sims
) -> None:
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    a_dir.mkdir()
    b_dir.mkdir()
    a = agent_process(key_file, a_dir)
    b = agent_process(key_file, b_dir)
    a_sims = type(remote_sims)(a_dir, relative=True)
    b_sims = type(remote_sims)(b_dir, relative=True)
    src = a_sims.spec("a", size=4 << 20, at=a.address)
    dst = b_sims.spec("b", size=4 << 20, image=False, dump=True, at=b.address)
    result = cli("migrate", "--json", "--key-file", str(key_file), src, dst)
    assert result.status == 0, result.stdout + result.stderr
    envelope = json.loads(result.stdout)
    assert envelope["result"]["outcome"] == "completed"
    assert envelope["result"]["downtime_ms"] is not None
    assert (a_sims.state("a"), b_sims.state("b")) == (S.STOP, S.RUNNING)
    assert b_sims.dump("b") == a_sims.image("a")
    pairs = [
        a_sims.spec("s0", at=a.address),
        b_sims.spec("d0", image=False, dump=True, at=b.address),
        b_sims.spec("s1", at=b.address),
        a_sims.spec("d1", image=False, dump=True, at=a.address),
    ]
    result = cli("migrate", "--no-precopy", "--key-file", str(key_file), *pairs)
    assert result.status == 0, result.stdout + result.stderr
    assert "phase precopy" not in result.stdout
    assert (a_sims.state("s0"), b_sims.state("d0")) == (S.STOP, S.RUNNING)
    assert (b_sims.state("s1"), a_sims.state("d1")) == (S.STOP, S.RUNNING)
    assert b_sims.dump("d0") == a_sims.image("s0")
    assert a_sims.dump("d1") == b_sims.image("s1")
    a.process.send_signal(signal.SIGTERM)
    assert a.process.wait(timeout=30) == 0
    a.stop()
    assert any("SIGTERM: stopping" in line for line in a.log)
    assert any("stopped" in line for line in a.log)
    key_text = key_file.read_text().split()[-1]
    assert not any(key_text in line for line in a.log + b.log)


def test_a_wrong_key_file_fails_with_exit_4(agent_process, key_file, tmp_path, cli) -> None:
    from vfmig.engine.keys import create_key

    a_dir = tmp_path / "A"
    a_dir.mkdir()
    a = agent_process(key_file, a_dir)
    other = tmp_path / "other.key"
    create_key(other)
    src = f"sim:a,size=1MiB,state-dir=a@{a.address}"
    dst = f"sim:b,size=1MiB,state-dir=b@{a.address}"
    result = cli("migrate", "--key-file", str(other), src, dst)
    assert result.status == 4
    assert "authentication failed" in result.stderr
    assert "hint: check that both sides use the same key file" in result.stderr


def test_an_agent_refuses_a_key_file_others_can_read(key_file, cli) -> None:
    key_file.chmod(0o644)
    result = cli("agent", "--listen", "127.0.0.1:0", "--key-file", str(key_file))
    assert result.status == 2
    assert "readable by others" in result.stderr


def test_remote_devices_need_a_key_file(cli) -> None:
    result = cli("migrate", "sim:a@127.0.0.1:7300", "sim:b@127.0.0.1:7301")
    assert result.status == 2
    assert "--key-file" in result.stderr


def test_an_unreachable_agent_is_reported_in_the_json_envelope(cli, key_file) -> None:
    result = cli(
        "migrate", "--json", "--key-file", str(key_file), "sim:a@127.0.0.1:1", "sim:b@127.0.0.1:1"
    )
    assert result.status == 4
    envelope = json.loads(result.stdout)
    assert envelope["ok"] is False
    assert envelope["result"] is None
    assert "cannot connect to the agent" in envelope["error"]["message"]
    assert "vfmig agent --listen 127.0.0.1:1" in envelope["error"]["hint"]
