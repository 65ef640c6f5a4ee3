"""The event bus: one stream of records, many subscribers, each with its own delivery policy.

Theory of operation
-------------------
Whatever happens in a run -- the phase machine's decisions and the agents' observations --
is published once as a :class:`Record` (a sequence number, the orchestrator's monotonic
time, where it came from, and the :class:`~vfmig.core.events.Event`). Subscribers do not
share a queue (trio#987: cloned channels compete); each gets its own, chosen by policy
(style.md §6, after tokio's broadcast):

* :class:`Lossless` -- a bounded queue; a full queue makes :meth:`EventBus.publish` wait.
  For the journal, which must see everything and may slow the run down rather than lose.
* :class:`Ring` -- the newest ``capacity`` records; when the subscriber falls behind, the
  oldest are dropped and it receives one :class:`Lagged` telling how many. For displays.
* :class:`Latest` -- only the newest record per key (``key(event)``), in the order keys
  were last updated. For gauges that only ever show the current value.

Lossy subscribers never slow the publisher down. :meth:`EventBus.close` ends every
subscription once it has drained what it holds.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable

    from vfmig.core.events import Event

#: Where an event came from when the orchestrator itself produced it.
ORCHESTRATOR: Final = "orchestrator"


@dataclass(frozen=True, slots=True)
class Record:
    """One published event: ``seq`` gap-free per bus, ``at_ns`` on the orchestrator's clock."""

    seq: int
    at_ns: int
    origin: str
    event: Event


@dataclass(frozen=True, slots=True)
class Lagged:
    """A ring subscriber fell behind: ``missed`` records were dropped before the next one."""

    missed: int


@dataclass(frozen=True, slots=True)
class Lossless:
    capacity: int = 1024


@dataclass(frozen=True, slots=True)
class Ring:
    capacity: int = 1024


@dataclass(frozen=True, slots=True)
class Latest:
    key: Callable[[Event], Hashable]


Policy = Lossless | Ring | Latest


class Subscription:
    """What one subscriber reads: ``async for item in subscription`` (Record or Lagged)."""

    def __init__(self, bus: EventBus, policy: Policy) -> None:
        self._bus = bus
        self.policy = policy
        self._send: trio.MemorySendChannel[Record] | None = None
        self._receive: trio.MemoryReceiveChannel[Record] | None = None
        if isinstance(policy, Lossless):
            if policy.capacity < 1:
                raise ValueError("a lossless subscription needs a capacity of at least 1")
            self._send, self._receive = trio.open_memory_channel[Record](policy.capacity)
        elif isinstance(policy, Ring) and policy.capacity < 1:
            raise ValueError("a ring subscription needs a capacity of at least 1")
        self._ring: collections.deque[Record] = collections.deque()
        self._latest: dict[Hashable, Record] = {}
        self._missed = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False

    async def _offer(self, record: Record) -> None:
        if self._send is not None:
            try:
                await self._send.send(record)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._bus._drop(self)
            return
        if isinstance(self.policy, Ring):
            if len(self._ring) >= self.policy.capacity:
                self._ring.popleft()
                self._missed += 1
            self._ring.append(record)
        elif isinstance(self.policy, Latest):
            key = self.policy.key(record.event)
            self._latest.pop(key, None)
            self._latest[key] = record
        self._lot.unpark_all()

    def _end(self) -> None:
        self._closed = True
        if self._send is not None:
            self._send.close()
        self._lot.unpark_all()

    async def receive(self) -> Record | Lagged:
        """The next item; raises trio.EndOfChannel once the bus closed and all was read."""
        if self._receive is not None:
            return await self._receive.receive()
        while True:
            try:
                return self.receive_nowait()
            except trio.WouldBlock:
                await self._lot.park()

    def receive_nowait(self) -> Record | Lagged:
        """The next item if one is waiting, else trio.WouldBlock; trio.EndOfChannel once
        the bus closed and all was read."""
        if self._receive is not None:
            return self._receive.receive_nowait()
        if self._missed:
            missed, self._missed = self._missed, 0
            return Lagged(missed)
        if self._ring:
            return self._ring.popleft()
        if self._latest:
            key = next(iter(self._latest))
            return self._latest.pop(key)
        if self._closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Record | Lagged:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving; the bus forgets this subscription."""
        if self._receive is not None:
            self._receive.close()
        self._bus._drop(self)


class EventBus:
    """Publish events to every subscription, each under its own policy."""

    def __init__(self, clock: Callable[[], float] = trio.current_time) -> None:
        self._clock = clock
        self._subscriptions: list[Subscription] = []
        self._seq = itertools.count()
        self._turn = trio.Lock()
        self._closed = False

    def subscribe(self, policy: Policy) -> Subscription:
        if self._closed:
            raise RuntimeError("the bus is closed")
        subscription = Subscription(self, policy)
        self._subscriptions.append(subscription)
        return subscription

    async def publish(self, event: Event, *, origin: str = ORCHESTRATOR) -> Record:
        """Stamp ``event`` and hand it to every subscriber (lossless ones may make this wait).

        Publishers take turns (a fair lock), so every subscriber sees records in ``seq``
        order even when several tasks publish at once.
        """
        async with self._turn:
            record = Record(next(self._seq), int(self._clock() * 1e9), origin, event)
            for subscription in tuple(self._subscriptions):
                await subscription._offer(record)
        return record

    def close(self) -> None:
        """End every subscription (each still yields what it holds)."""
        self._closed = True
        for subscription in self._subscriptions:
            subscription._end()
        self._subscriptions.clear()

    def _drop(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
