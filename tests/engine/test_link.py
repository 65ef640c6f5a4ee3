"""Link: a protocol Connection over a trio stream (here trio's in-memory stream pairs)."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from vfmig.core.errors import PeerError
from vfmig.core.events import ChunkReceived, StreamEnded, from_record
from vfmig.core.model import DeviceId
from vfmig.engine import wire
from vfmig.engine.agent import ControlSession
from vfmig.engine.link import Link, LinkClosed, RpcError, with_link
from vfmig.protocol import (
    Config,
    Connection,
    ErrorResponse,
    Notification,
    Request,
    Response,
    Role,
)

KEY = b"sixteen byte key and then some"


async def ignore(event) -> None:
    await trio.lowlevel.checkpoint()


def pair(left_key=KEY, right_key=KEY, **config):
    a, b = trio.testing.memory_stream_pair()
    orchestrator = Link(
        a, Connection(Role.ORCHESTRATOR, Config(key=left_key, **config), name="orch"), peer="agent"
    )
    agent = Link(
        b, Connection(Role.AGENT, Config(key=right_key, **config), name="agent"), peer="orch"
    )
    return orchestrator, agent


async def answer_everything(agent: Link):
    async def handle(event) -> None:
        if isinstance(event, Request):
            if event.method == "get_state":
                await agent.send(Response(id=event.id, result=2))
            else:
                await agent.send(
                    ErrorResponse(id=event.id, code="refused", message="no", errno=22, device="d")
                )

    return handle


async def test_requests_get_their_answers(nursery) -> None:
    orchestrator, agent = pair()
    nursery.start_soon(agent.run, await answer_everything(agent))
    with trio.fail_after(10):
        await nursery.start(orchestrator.run, ignore)
        assert await orchestrator.request("get_state", {"device": "d"}) == 2
        with pytest.raises(RpcError) as caught:
            await orchestrator.request("reset", {"device": "d"})
        assert (caught.value.code, caught.value.errno, caught.value.device) == ("refused", 22, "d")
        await orchestrator.aclose("done")
        await agent.finished.wait()
    assert orchestrator.failure is None
    assert agent.failure is None
    with pytest.raises(LinkClosed):
        await orchestrator.request("get_state", {"device": "d"})


async def test_a_wrong_key_fails_the_handshake_on_both_sides(nursery) -> None:
    orchestrator, agent = pair(right_key=b"another sixteen byte key!")

    async def run(link: Link) -> None:
        with pytest.raises(PeerError, match="authentication failed"):
            await link.run(ignore)

    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(run, orchestrator)
            inner.start_soon(run, agent)
    assert orchestrator.session is None


async def test_a_silent_peer_times_the_handshake_out(autojump_clock) -> None:
    a, _b = trio.testing.memory_stream_pair()
    link = Link(a, Connection(Role.ORCHESTRATOR, Config(key=KEY), name="orch"), peer="agent")
    with trio.fail_after(60), pytest.raises(PeerError, match="handshake") as caught:
        await link.run(ignore)
    assert caught.value.code == "handshake_timeout"


async def test_a_lost_transport_fails_the_requests_waiting_on_it(nursery) -> None:
    orchestrator, agent = pair()

    async def never_answer(event) -> None:
        await trio.lowlevel.checkpoint()

    nursery.start_soon(agent.run, never_answer)

    async def run_orchestrator(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with pytest.raises(PeerError, match="without a Goodbye"):
            await orchestrator.run(ignore, task_status=task_status)

    with trio.fail_after(10):
        await nursery.start(run_orchestrator)
        async with trio.open_nursery() as inner:

            async def ask() -> None:
                with pytest.raises(PeerError, match="without a Goodbye"):
                    await orchestrator.request("get_state", {"device": "d"})

            inner.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            await agent.abort()


async def test_a_peer_that_stops_reading_fails_the_write(autojump_clock) -> None:
    a, _b = trio.testing.lockstep_stream_pair()
    conn = Connection(Role.ORCHESTRATOR, Config(key=None), name="orch")
    link = Link(a, conn, peer="agent", send_timeout=5)
    with trio.fail_after(60), pytest.raises(PeerError, match="stopped reading"):
        await link.run(ignore)  # the Hello never goes out
    assert conn.state.value == "error"  # send_failed(): a half frame may be on the wire


async def test_with_link_returns_the_body_result_and_closes_cleanly(nursery) -> None:
    orchestrator, agent = pair()
    nursery.start_soon(agent.run, await answer_everything(agent))

    async def body() -> int:
        value = await orchestrator.request("get_state", {"device": "d"})
        assert isinstance(value, int)
        return value

    with trio.fail_after(10):
        assert await with_link(orchestrator, ignore, body) == 2
        await agent.finished.wait()
    assert agent.failure is None


async def test_with_link_cancels_the_body_when_the_link_fails(nursery) -> None:
    orchestrator, agent = pair()

    async def handle(event) -> None:
        await agent.abort()

    nursery.start_soon(agent.run, handle)

    async def body() -> None:
        await orchestrator.send(Request(id=99, method="status", params={}))
        await trio.sleep_forever()

    with trio.fail_after(10), pytest.raises(PeerError):
        await with_link(orchestrator, ignore, body)


async def test_chunk_notices_fold_into_few_frames_in_order(nursery) -> None:
    dev = DeviceId.parse("dst0")
    frames: list[dict] = []
    done = trio.Event()

    async def collect(event) -> None:
        if isinstance(event, Notification):
            frames.append(event.payload)
            items = wire.batch_items(event.payload) if "batch" in event.payload else [event.payload]
            if any("event" in item and item["event"][0] == StreamEnded.TAG for item in items):
                done.set()

    orchestrator, agent = pair()
    nursery.start_soon(agent.run, ignore)
    await nursery.start(orchestrator.run, collect)
    session = ControlSession(agent, "orch")
    session.subscribed = True
    nursery.start_soon(session.pump)
    sent = [
        wire.event_notice(
            "r", ChunkReceived(device=dev, seq=i, offset=i, raw=1, wire=1, final=False)
        )
        for i in range(40)
    ]
    sent.append(wire.event_notice("r", StreamEnded(device=dev, total=40, digest_ok=True)))
    with trio.fail_after(10):
        for payload in sent:
            await session.notify(payload)
        await done.wait()
    received = [i for f in frames for i in (wire.batch_items(f) if "batch" in f else [f])]
    assert received[-1] == sent[-1]  # the stream's end comes last, after every chunk
    chunks = [from_record(item["event"]) for item in received[:-1]]
    assert all(isinstance(c, ChunkReceived) and not c.final for c in chunks)
    # Folded (wire.coalesce), in order: each record picks up where the previous ended.
    assert [c.seq for c in chunks] == list(itertools.accumulate([0] + [c.chunks for c in chunks]))[
        :-1
    ]
    assert sum(c.chunks for c in chunks) == sum(c.raw for c in chunks) == 40
    assert len(frames) < len(sent) / 4  # batched: a frame per few notices at most
    assert [wire.deferrable(p) for p in sent] == [True] * 40 + [False]
    final = wire.event_notice(
        "r", ChunkReceived(device=dev, seq=40, offset=40, raw=0, wire=0, final=True)
    )
    assert not wire.deferrable(final)
    folded = ChunkReceived(device=dev, seq=0, offset=0, raw=3, wire=2, final=False, chunks=3)
    assert wire.deferrable(wire.event_notice("r", folded))  # may fold again
