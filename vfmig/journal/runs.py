"""An agent's own journals: one per run it serves, written beside the orchestrator's.

Theory of operation
-------------------
An agent (``vfmig agent --journal-dir DIR``, or the default store) keeps its side of every
run, so a host that lost its orchestrator still has a record. :class:`RunJournals` is
handed every event the agent notifies an orchestrator of (:meth:`RunJournals.notice`:
ioctls, chunks sent and received, stream ends, switchover acks), which it stamps and
queues for the run's recorder task; that writes them to ``<store>/<time>Z-agent-<run
id>.vfj`` in batches as the orchestrator's journal is written
(in a worker thread, with the same batch sizes and intervals, a second lost at most on
``kill -9``). The queue is bounded: at :data:`QUEUE` waiting records the agent waits for
the disk (lossless). No bus: an event costs an append, not a publication and a task
switch (~7 us instead of ~35 us: under 1 % of an agent's CPU at one event per 2 MiB).
Record times are this process's trio clock, which the header's ``start_mono_ns`` shares;
``vfmig journal merge`` puts them on the orchestrator's clock from chunk pairs. Each
record's origin is ``host`` (the agent's name for itself).

With ``data=True`` (or for one run, :meth:`RunJournals.capture`: the orchestrator asks at
``open_device``) a run's destination stream is captured too: :meth:`RunJournals.tap`
gives the device thread a callable that appends the decoded bytes as DATA records
(``JournalWriter.append_data`` is thread-safe and writes frames of at most 1 MiB, so
memory stays bounded). The journal of a run is created at its first notice and closed by
:meth:`RunJournals.end` (the run's devices are closed) or when :meth:`RunJournals.run`
is cancelled (the agent stops). :meth:`RunJournals.closed` ends a run's journal and names
its file, for the ``journal`` RPC that hands it to the run's orchestrator to merge.

In local mode the in-process agent's events are already on the orchestrator's bus, so
``vfmig migrate --journal-data`` gives it a :class:`DataCapture` instead: the same
interface (:class:`AgentJournal`), which only taps the received stream straight into the
run's journal.
"""

from __future__ import annotations

import platform
import time
from functools import partial
from typing import TYPE_CHECKING, Protocol

import trio

from vfmig import __version__
from vfmig.core.errors import JournalError
from vfmig.core.model import source
from vfmig.engine.bus import Record
from vfmig.journal.codec import DeviceInfo, JournalHeader
from vfmig.journal.recorder import (
    BATCH_INTERVAL,
    BATCH_RECORDS,
    CLOSE_TIMEOUT,
    FLUSH_INTERVAL,
    bus_clock,
    finish_journal,
    write_batch,
)
from vfmig.journal.writer import DURABLE

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from vfmig.core.events import Event
    from vfmig.core.model import DeviceId
    from vfmig.journal.store import JournalStore
    from vfmig.journal.writer import JournalWriter

#: Bounded subscription of each run's recorder (a slow disk slows the agent, loses nothing).
QUEUE: int = 1024


def _appender(writer: JournalWriter, dev: DeviceId) -> Callable[[int, memoryview], None]:
    """Data records of the stream ``dev`` receives, filed under its pair's source (a stream
    is the source's: ``vfmig load --device src<N>``)."""
    stream = source(dev.index)

    def append(offset: int, raw: memoryview) -> None:
        writer.append_data(stream, offset, raw)

    return append


class AgentJournal(Protocol):
    """What an agent calls (``AgentConfig.journal``)."""

    async def notice(
        self, run_id: str, devices: Sequence[tuple[DeviceId, str]], event: Event
    ) -> None: ...

    def tap(self, run_id: str, dev: DeviceId) -> Callable[[int, memoryview], None] | None: ...

    def capture(self, run_id: str) -> None: ...

    async def end(self, run_id: str) -> None: ...

    async def closed(self, run_id: str) -> Path: ...


class DataCapture:
    """Local mode's agent journal: the received stream into ``writer`` (the run's journal),
    events not at all (the orchestrator's bus has them)."""

    def __init__(self, writer: JournalWriter) -> None:
        self.writer = writer

    async def notice(
        self, run_id: str, devices: Sequence[tuple[DeviceId, str]], event: Event
    ) -> None:
        return None

    def tap(self, run_id: str, dev: DeviceId) -> Callable[[int, memoryview], None] | None:
        return _appender(self.writer, dev)

    def capture(self, run_id: str) -> None:
        return None  # every received stream is captured

    async def end(self, run_id: str) -> None:
        return None

    async def closed(self, run_id: str) -> Path:
        raise JournalError("an in-process agent keeps no journal of its own")


class _RunJournal:
    """One run's journal: records waiting for the recorder task, and its end."""

    def __init__(self, writer: JournalWriter, host: str) -> None:
        self.writer = writer
        self.host = host
        self.waiting: list[Record] = []  #: oldest first (``seq`` unused: the writer numbers)
        self.due = trio.Event()  #: the recorder should write now (a batch, durable, the end)
        self.room = trio.Event()  #: set when the recorder took the waiting records
        self.ending = False
        self.done = trio.Event()

    async def add(self, event: Event) -> None:
        self.waiting.append(Record(0, int(trio.current_time() * 1e9), self.host, event))
        if len(self.waiting) >= BATCH_RECORDS or isinstance(event, DURABLE):
            self.due.set()
        while len(self.waiting) >= QUEUE and not self.done.is_set():
            self.due.set()  # a slow disk slows the agent down; nothing is dropped
            self.room = trio.Event()
            await self.room.wait()

    def take(self) -> list[Record]:
        batch, self.waiting = self.waiting, []
        self.due = trio.Event()
        self.room.set()
        return batch


class RunJournals:
    """Journals of the runs one agent serves; start with ``await nursery.start(j.run)``."""

    def __init__(
        self,
        store: JournalStore,
        *,
        host: str,
        data: bool = False,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.store = store
        self.host = host
        self.data = data
        self._log = log
        self._runs: dict[str, _RunJournal] = {}
        self._failed: dict[str, str] = {}  #: run id -> why its journal could not be created
        self._capture: set[str] = set()  #: runs whose streams are captured without ``data``
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the recorder tasks; when cancelled, every open journal is closed."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def notice(
        self, run_id: str, devices: Sequence[tuple[DeviceId, str]], event: Event
    ) -> None:
        """Journal ``event``, one the agent notified its orchestrator of (progress and
        facts are not events)."""
        journal = await self._journal(run_id, devices)
        if journal is not None:
            await journal.add(event)

    def tap(self, run_id: str, dev: DeviceId) -> Callable[[int, memoryview], None] | None:
        """With data capture on and ``run_id``'s journal open: ``tap(offset, raw)`` appends
        stream bytes as DATA records; call it from the device's thread."""
        journal = self._runs.get(run_id)
        if not (self.data or run_id in self._capture) or journal is None:
            return None
        return _appender(journal.writer, dev)

    def capture(self, run_id: str) -> None:
        """Capture ``run_id``'s received streams although ``data`` is off (call it before the
        run's first notice: the journal's header says whether it holds data)."""
        self._capture.add(run_id)

    async def end(self, run_id: str) -> None:
        """The run is over here: close its journal (waits for the last records to be written)."""
        journal = self._runs.get(run_id)
        if journal is None:
            return
        journal.ending = True
        journal.due.set()
        with trio.move_on_after(30):
            await journal.done.wait()

    async def closed(self, run_id: str) -> Path:
        """The file of ``run_id``'s journal, ended first (JournalError if there is none)."""
        journal = self._runs.get(run_id)
        if journal is None:
            why = self._failed.get(run_id, "this agent journaled nothing of it")
            raise JournalError(f"no journal of run {run_id}: {why}")
        await self.end(run_id)
        if not journal.done.is_set():
            raise JournalError(f"the journal of run {run_id} is still being written")
        return journal.writer.path

    async def _journal(
        self, run_id: str, devices: Sequence[tuple[DeviceId, str]]
    ) -> _RunJournal | None:
        journal = self._runs.get(run_id)
        if journal is not None or run_id in self._failed or self._nursery is None:
            return journal
        header = JournalHeader(
            host=self.host,
            role="agent",
            run_id=run_id,
            kernel=platform.release(),
            start_wall_ns=time.time_ns(),
            start_mono_ns=int(trio.current_time() * 1e9),
            devices=tuple(DeviceInfo(id=dev, spec=spec) for dev, spec in devices),
            data=self.data or run_id in self._capture,
            vfmig=__version__,
        )
        try:
            create = partial(self.store.create, header, mono_clock=bus_clock())
            writer = await trio.to_thread.run_sync(create)
        except JournalError as exc:
            self._failed[run_id] = exc.message  # the migration goes on without this journal
            self._log(f"run {run_id}: not journaled: {exc.message}")
            return None
        journal = self._runs[run_id] = _RunJournal(writer, self.host)
        self._log(f"run {run_id}: journal {writer.path}")
        await self._nursery.start(self._record, journal)
        return journal

    async def _record(
        self, journal: _RunJournal, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Write what waits every BATCH_INTERVAL while records come (FLUSH_INTERVAL when
        quiet, so the writer can close an aging frame), at once when a batch is full or a
        record is durable; close the journal at the end (or when cancelled)."""
        writer = journal.writer
        last_at: int | None = None
        task_status.started()
        try:
            while not journal.ending:
                with trio.move_on_after(BATCH_INTERVAL if journal.waiting else FLUSH_INTERVAL):
                    await journal.due.wait()
                batch = journal.take()
                if batch:
                    last_at = batch[-1].at_ns
                await trio.to_thread.run_sync(write_batch, writer, batch)
        except JournalError as exc:
            self._log(f"journal {writer.path}: {exc.message}")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                batch = journal.take()
                last_at = batch[-1].at_ns if batch else last_at
                try:
                    await trio.to_thread.run_sync(finish_journal, writer, batch, last_at)
                except JournalError as exc:
                    self._log(f"journal {writer.path}: {exc.message}")
            journal.done.set()
            journal.room.set()
