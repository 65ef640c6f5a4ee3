"""Losing the orchestrator or an agent in each phase, just before and just after the commit
point: the agents fall back on their own by the failure policy (second table of
docs/failure-policy.md), and there are never two running copies of a device."""

from __future__ import annotations

import pytest
import trio

from vfmig.core.events import CommitPointPassed, PhaseChanged
from vfmig.core.fsm import DeviceState
from vfmig.core.model import Emit, Outcome, Phase

S = DeviceState
RU, ST = S.RUNNING, S.STOP


def at_phase(phase: Phase):
    def match(action) -> bool:
        return (
            isinstance(action, Emit)
            and isinstance(action.event, PhaseChanged)
            and action.event.phase is phase
        )

    match.__name__ = phase.value
    return match


def after_commit(action) -> bool:
    return isinstance(action, Emit) and isinstance(action.event, CommitPointPassed)


def once(when, then):
    """A trace hook that runs ``then()`` before the first action ``when`` matches."""
    fired = []

    async def trace(action) -> None:
        if not fired and when(action):
            fired.append(action)
            await then()

    return trace


async def two_agents(cluster, sims, a_config=None, b_config=None):
    a_root, b_root = sims.root.parent / "A", sims.root.parent / "B"
    a_root.mkdir()
    b_root.mkdir()
    a = await cluster.agent(type(sims)(a_root, relative=True), **(a_config or {}))
    b = await cluster.agent(type(sims)(b_root, relative=True), **(b_config or {}))
    src = a.sims.spec("a", size=2 << 20, at=a.address)
    dst = b.sims.spec("b", size=2 << 20, image=False, dump=True, at=b.address)
    return a, b, (src, dst)


ORCHESTRATOR_LOST = [
    (at_phase(Phase.PREFLIGHT), (None, None)),  # cut before anything was opened
    (at_phase(Phase.SETUP), (RU, RU)),  # opened, untouched
    (at_phase(Phase.PRECOPY), (RU, RU)),  # destination reset, source back to RUNNING
    (at_phase(Phase.SWITCHOVER), (RU, RU)),
    (at_phase(Phase.STOPCOPY), (RU, RU)),
    (at_phase(Phase.RESUME), (RU, RU)),  # the destination's agent says: not committed
    (at_phase(Phase.COMMIT), (RU, RU)),  # just before: no agent heard the Commit
    (after_commit, (ST, RU)),  # just after: the destination runs, the source stays stopped
]


@pytest.mark.parametrize(
    ("when", "end"), ORCHESTRATOR_LOST, ids=[w.__name__ for w, _ in ORCHESTRATOR_LOST]
)
async def test_the_orchestrator_vanishes(cluster, sims, when, end) -> None:
    a, b, pair = await two_agents(cluster, sims)
    await cluster.migrate([pair], trace=once(when, cluster.cut_orchestrator))
    await cluster.settle()
    assert (a.sims.state("a"), b.sims.state("b")) == end
    if end[1] is RU and end[0] is ST:
        assert b.sims.dump("b") == a.sims.image("a")
        assert any("committed" in line for line in a.log)
    else:
        assert b.sims.dump("b") is None
    if end != (None, None):
        assert any("lost the orchestrator" in line for line in a.log + b.log)


async def test_in_doubt_when_the_destination_cannot_tell(cluster, sims) -> None:
    """Orchestrator lost after the stream ended, the destination's agent undecided for
    longer than the source's agent asks: the source stays stopped (in doubt)."""
    a, b, pair = await two_agents(cluster, sims, {"ask_peer_for": 0.3}, {"grace": 30.0})
    await cluster.migrate([pair], trace=once(at_phase(Phase.RESUME), cluster.cut_orchestrator))
    with trio.fail_after(30):
        await a.agent.wait_idle()
    assert a.sims.state("a") is ST
    assert any("in-doubt" in line for line in a.log)
    assert b.sims.state("b") in (S.RESUMING, ST)  # untouched by anyone yet (its grace runs)


SOURCE_AGENT_LOST = [
    (at_phase(Phase.PRECOPY), (RU, RU), Outcome.PEER_LOST),
    (at_phase(Phase.STOPCOPY), (RU, RU), Outcome.PEER_LOST),
    (at_phase(Phase.RESUME), (RU, RU), Outcome.PEER_LOST),
    (at_phase(Phase.COMMIT), (ST, RU), Outcome.COMPLETED),
    (after_commit, (ST, RU), Outcome.COMPLETED),
]

DESTINATION_AGENT_LOST = [
    (at_phase(Phase.SETUP), (RU, RU), Outcome.PEER_LOST),
    (at_phase(Phase.PRECOPY), (RU, RU), Outcome.PEER_LOST),
    (at_phase(Phase.STOPCOPY), (RU, RU), Outcome.PEER_LOST),
    (at_phase(Phase.RESUME), (RU, RU), Outcome.PEER_LOST),
    (at_phase(Phase.COMMIT), (ST, RU), Outcome.IN_DOUBT),  # reset by its agent: no Commit
    (after_commit, (ST, RU), Outcome.IN_DOUBT),  # started by its agent: it had the Commit
]


@pytest.mark.parametrize(
    ("when", "end", "outcome"),
    SOURCE_AGENT_LOST,
    ids=[w.__name__ for w, _, _ in SOURCE_AGENT_LOST],
)
async def test_the_source_agent_vanishes(cluster, sims, when, end, outcome) -> None:
    a, b, pair = await two_agents(cluster, sims)
    report = await cluster.migrate([pair], trace=once(when, a.agent.abort_connections))
    await cluster.settle()
    assert report.outcome is outcome
    assert any(e.cause.value == "peer-lost" for e in report.errors)
    assert (a.sims.state("a"), b.sims.state("b")) == end
    if outcome is Outcome.COMPLETED:
        assert b.sims.dump("b") == a.sims.image("a")
    else:
        assert b.sims.dump("b") is None


@pytest.mark.parametrize(
    ("when", "end", "outcome"),
    DESTINATION_AGENT_LOST,
    ids=[w.__name__ for w, _, _ in DESTINATION_AGENT_LOST],
)
async def test_the_destination_agent_vanishes(cluster, sims, when, end, outcome) -> None:
    a, b, pair = await two_agents(cluster, sims)
    report = await cluster.migrate([pair], trace=once(when, b.agent.abort_connections))
    await cluster.settle()
    assert report.outcome is outcome
    assert (a.sims.state("a"), b.sims.state("b")) == end
    if outcome is Outcome.IN_DOUBT:
        assert any(e.cause.value == "in-doubt" for e in report.errors)
    if when is after_commit:
        assert b.sims.dump("b") == a.sims.image("a")
    else:
        assert b.sims.dump("b") is None


async def test_an_abort_after_the_commit_point_completes(cluster, sims) -> None:
    a, b, pair = await two_agents(cluster, sims)
    orchestrators = []

    async def abort() -> None:
        await orchestrators[0].abort("test", "SIGINT")

    from vfmig.core.spec import parse_spec
    from vfmig.engine.bus import EventBus
    from vfmig.engine.link import connect
    from vfmig.engine.orchestrator import Endpoint, Orchestrator

    specs = [(parse_spec(pair[0]), parse_spec(pair[1]))]

    async def dial(address):
        return await connect(address), cluster.key

    endpoints = {
        s.address: Endpoint(host=s.address, connect=lambda x=s.address: dial(x)) for s in specs[0]
    }
    orchestrator = Orchestrator(specs, endpoints, EventBus(), trace=once(after_commit, abort))
    orchestrators.append(orchestrator)
    with trio.fail_after(30):
        report = await orchestrator.run()
    assert report.outcome is Outcome.COMPLETED
    await cluster.settle()
    assert (a.sims.state("a"), b.sims.state("b")) == (ST, RU)
    assert b.sims.dump("b") == a.sims.image("a")


async def test_an_agent_shutting_down_brings_its_devices_back_first(cluster, sims) -> None:
    """SIGTERM on the source's agent mid-precopy: it says Goodbye to the orchestrator and
    brings its source back to RUNNING; the orchestrator rolls the destination back."""
    a, b, pair = await two_agents(cluster, sims)

    async def shut_down() -> None:
        cluster.nursery.start_soon(a.agent.shutdown)

    report = await cluster.migrate([pair], trace=once(at_phase(Phase.PRECOPY), shut_down))
    await cluster.settle()
    assert report.outcome is Outcome.PEER_LOST
    assert (a.sims.state("a"), b.sims.state("b")) == (RU, RU)
    assert b.sims.dump("b") is None
    assert any("peer-lost" in line for line in a.log)
