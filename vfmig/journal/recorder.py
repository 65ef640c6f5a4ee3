"""The recorder task: the engine bus's lossless subscriber that writes the run's journal.

Theory of operation
-------------------
:func:`record` reads a :class:`~vfmig.engine.bus.Lossless` subscription and appends every
record to a :class:`~vfmig.journal.writer.JournalWriter` with the record's own time
(``at_ns``, the bus clock) and origin (the host that observed it). The writer compresses
and writes whole frames, which may take milliseconds, so it never runs on the event loop:
records are gathered into a batch and each batch is handed to a worker thread. A batch is
written when it is :data:`BATCH_INTERVAL` old, holds :data:`BATCH_RECORDS` records, or
holds a phase change, the commit point, an error or the run's end (which the writer also
syncs to disk). While a batch is being written nothing is received: the subscription's
bounded queue fills and the bus's ``publish`` waits -- backpressure, never a lost record.
When the bus is quiet the task still wakes up every :data:`FLUSH_INTERVAL` to let the
writer close a frame that has become a second old, so a crash or ``kill -9`` loses at most
about a second of records.

When the bus closes, the last batch is written and the journal closed (its closing record
stamped with the last record's time), also when the task is cancelled (shielded, bounded).

The header's ``start_mono_ns`` must be read from the bus's clock (``trio.current_time()``
for the default bus), so that record times and the start share one clock. This is the only
module of :mod:`vfmig.journal` that imports trio.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

import trio

from vfmig.core.errors import JournalError
from vfmig.engine.bus import Record
from vfmig.journal.writer import DURABLE

if TYPE_CHECKING:
    from collections.abc import Callable

    from vfmig.engine.bus import Lagged, Subscription
    from vfmig.journal.writer import JournalWriter

#: A batch is written once its first record is this old (seconds).
BATCH_INTERVAL: Final = 0.05
#: ... or once it holds this many records.
BATCH_RECORDS: Final = 256
#: A quiet bus still wakes the task this often, so the writer can close an aging frame.
FLUSH_INTERVAL: Final = 0.25
#: How long the final write and close may take once the task is cancelled.
CLOSE_TIMEOUT: Final = 10.0


class Written:
    """How far the recorder has written (and, for the durable kinds, synced): the commit
    hook of ``vfmig migrate`` waits here until the commit point is on disk."""

    def __init__(self) -> None:
        self.seq = -1
        self.ended = False
        self._changed = trio.Event()

    def advance(self, seq: int) -> None:
        self.seq = max(self.seq, seq)
        self._changed.set()
        self._changed = trio.Event()

    def end(self) -> None:
        self.ended = True
        self._changed.set()

    async def wait(self, seq: int) -> bool:
        """Wait until record ``seq`` is written; False if the recorder ended without it."""
        while self.seq < seq:
            if self.ended:
                return False
            await self._changed.wait()
        return True


def bus_clock() -> Callable[[], int]:
    """The trio clock (the default bus's) in nanoseconds, readable from any thread: give it
    to the writer (``mono_clock=``) so that the records it stamps itself (data, closing)
    share the clock of the bus's records. Call it inside ``trio.run``."""
    offset = int(trio.current_time() * 1e9) - time.perf_counter_ns()

    def now() -> int:
        return time.perf_counter_ns() + offset

    return now


def write_batch(writer: JournalWriter, batch: list[Record]) -> None:
    """Append ``batch`` (in a worker thread), closing the frame if it has aged."""
    for r in batch:
        writer.append(r.event, at_ns=r.at_ns, origin=r.origin)
    writer.maybe_flush()


async def record(
    subscription: Subscription,
    writer: JournalWriter,
    *,
    written: Written | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Journal every record of ``subscription`` (lossless) until the bus closes; then close
    ``writer``; ``written`` follows each batch once it is written. Raises
    :class:`~vfmig.journal.codec.JournalError` if the journal cannot be
    written (the run should stop: it cannot be recorded)."""
    batch: list[Record] = []
    first_at: float | None = None
    last_at_ns: int | None = None
    task_status.started()
    try:
        ended = False
        while not ended:
            now = trio.current_time()
            wait = FLUSH_INTERVAL if first_at is None else max(first_at + BATCH_INTERVAL - now, 0)
            items: list[Record | Lagged] = []
            with trio.move_on_after(wait):
                try:
                    items.append(await subscription.receive())
                except trio.EndOfChannel:
                    break
            # Take what else is waiting in the same wake-up (a wake-up per record costs
            # more than the record), up to a durable one, which is written at once.
            while items and len(batch) + len(items) < BATCH_RECORDS and not _durable(items[-1]):
                try:
                    items.append(subscription.receive_nowait())
                except trio.WouldBlock:
                    break
                except trio.EndOfChannel:
                    ended = True
                    break
            for item in items:
                if not isinstance(item, Record):
                    raise JournalError(
                        "the journal's bus subscription dropped records",
                        hint="the recorder needs a Lossless subscription",
                    )
                batch.append(item)
                last_at_ns = item.at_ns
            if items and first_at is None:
                first_at = trio.current_time()
            due = first_at is not None and trio.current_time() - first_at >= BATCH_INTERVAL
            if not items or due or len(batch) >= BATCH_RECORDS or _durable(batch[-1]):
                await trio.to_thread.run_sync(write_batch, writer, batch)
                if written is not None and batch:
                    written.advance(batch[-1].seq)
                batch, first_at = [], None
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            pending, batch = batch, []
            await trio.to_thread.run_sync(finish_journal, writer, pending, last_at_ns)
            if written is not None and pending:
                written.advance(pending[-1].seq)
        if written is not None:
            written.end()


def _durable(item: Record | Lagged) -> bool:
    return isinstance(item, Record) and isinstance(item.event, DURABLE)


def finish_journal(writer: JournalWriter, batch: list[Record], last_at_ns: int | None) -> None:
    """Append the last ``batch`` and close the journal (in a worker thread)."""
    try:
        write_batch(writer, batch)
    finally:
        writer.close(at_ns=last_at_ns)
