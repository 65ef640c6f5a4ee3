"""EventBus: one record stream, a policy per subscriber."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel
import trio.testing

from vfmig.core.events import DataSizeSampled, PhaseChanged
from vfmig.core.model import Phase, source
from vfmig.engine.bus import EventBus, Lagged, Latest, Lossless, Record, Ring


def size(n: int) -> DataSizeSampled:
    return DataSizeSampled(device=source(n % 2), size=n)


async def drain(subscription) -> list[object]:
    return [item async for item in subscription]


async def test_lossless_sees_everything_in_order_and_holds_the_publisher_back() -> None:
    bus = EventBus()
    sub = bus.subscribe(Lossless(capacity=1))
    published = []

    async def publish() -> None:
        for n in range(3):
            await bus.publish(size(n))
            published.append(n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish)
        await trio.testing.wait_all_tasks_blocked()
        assert published == [0]  # the second waits for room
        first = await sub.receive()
        await trio.testing.wait_all_tasks_blocked()
        rest = [await sub.receive(), await sub.receive()]
    bus.close()
    records = [first, *rest]
    assert all(isinstance(r, Record) for r in records)
    assert [r.event.size for r in records] == [0, 1, 2]
    assert [r.seq for r in records] == [0, 1, 2]
    assert await drain(sub) == []


async def test_a_ring_keeps_the_newest_and_says_how_many_it_dropped() -> None:
    bus = EventBus()
    sub = bus.subscribe(Ring(capacity=2))
    for n in range(5):
        await bus.publish(size(n))
    bus.close()
    items = await drain(sub)
    assert items[0] == Lagged(3)
    assert [r.event.size for r in items[1:]] == [3, 4]


async def test_latest_keeps_one_record_per_key() -> None:
    bus = EventBus()
    sub = bus.subscribe(Latest(key=lambda e: getattr(e, "device", None)))
    for n in range(5):
        await bus.publish(size(n))
    await bus.publish(PhaseChanged(phase=Phase.SETUP, previous=None))
    bus.close()
    items = await drain(sub)
    assert [r.event for r in items] == [
        size(3),
        size(4),
        PhaseChanged(phase=Phase.SETUP, previous=None),
    ]


async def test_a_lossy_subscriber_never_blocks_the_publisher() -> None:
    bus = EventBus()
    bus.subscribe(Ring(capacity=1))
    bus.subscribe(Latest(key=lambda e: None))
    with trio.fail_after(10):
        for n in range(100):
            await bus.publish(size(n))  # nobody reads; nothing waits


async def test_a_closed_subscription_is_forgotten() -> None:
    bus = EventBus()
    sub = bus.subscribe(Lossless(capacity=1))
    sub.close()
    with trio.fail_after(10):
        for n in range(3):
            await bus.publish(size(n))  # would block if the subscription were still fed


def test_capacities_must_be_positive() -> None:
    bus = EventBus()
    with pytest.raises(ValueError, match="capacity"):
        bus.subscribe(Lossless(capacity=0))
    with pytest.raises(ValueError, match="capacity"):
        bus.subscribe(Ring(capacity=0))


async def test_concurrent_publishers_are_seen_in_seq_order() -> None:
    bus = EventBus()
    slow = bus.subscribe(Lossless(capacity=1))
    ring = bus.subscribe(Ring(capacity=100))

    async def publish(base: int) -> None:
        for n in range(base, base + 5):
            await bus.publish(size(n))

    async def read(into: list[int]) -> None:
        async for item in slow:
            assert isinstance(item, Record)
            into.append(item.seq)
            await trio.lowlevel.checkpoint()

    seen: list[int] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, seen)
            async with trio.open_nursery() as publishers:
                publishers.start_soon(publish, 0)
                publishers.start_soon(publish, 100)
            bus.close()
    assert seen == list(range(10))
    assert [r.seq for r in await drain(ring)] == list(range(10))


@pytest.mark.parametrize(
    "policy", [Lossless(capacity=8), Ring(capacity=8), Latest(key=lambda e: e.size)]
)
async def test_receive_nowait_takes_what_waits_and_never_blocks(policy) -> None:
    bus = EventBus()
    sub = bus.subscribe(policy)
    with pytest.raises(trio.WouldBlock):
        sub.receive_nowait()
    for n in range(3):
        await bus.publish(size(n))
    taken = [sub.receive_nowait() for _ in range(3)]
    assert [r.event.size for r in taken if isinstance(r, Record)] == [0, 1, 2]
    with pytest.raises(trio.WouldBlock):
        sub.receive_nowait()
    bus.close()
    with pytest.raises(trio.EndOfChannel):
        sub.receive_nowait()
