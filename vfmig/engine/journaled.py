"""One migration run with its journal: what ``vfmig migrate`` and an orchestrating agent share.

Theory of operation
-------------------
A run is an :class:`~vfmig.engine.orchestrator.Orchestrator` on a bus of its own, with:

* a recorder subscribed (lossless) before the first event, so the journal holds every
  event, the agents' included, each stamped on the bus's clock as it arrives;
* a commit hook that lets the agents be told to commit only once the commit point is on
  disk (or after :data:`COMMIT_JOURNAL_TIMEOUT`, with a warning);
* when agents take part, a collector that fetches their own journals of the run as it
  ends and merges them in afterwards, outside any downtime (:mod:`vfmig.journal.collect`);
  an agent hosting the run merges once its client has the answer.

Where the run is driven from is the caller's choice -- the ``vfmig migrate`` process, or
an agent hosting it for a thin client (:mod:`vfmig.engine.hosted`, ADR 0010) -- and so is
how it is watched and stopped: each *watcher* gets a ring subscription of its own (a slow
watcher skips records, it never slows the run) and is awaited until the bus closes; each
*controller* gets the orchestrator, to abort it on a signal or a client's request, and is
cancelled when the run is over. :func:`report_result` is the run's report as data: the
``--json`` result, and a hosted run's answer.
"""

from __future__ import annotations

import platform
import socket
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import trio

from vfmig import __version__
from vfmig.core.errors import errno_name
from vfmig.core.model import by_device
from vfmig.engine.bus import EventBus, Lossless, Ring
from vfmig.engine.link import connect
from vfmig.engine.orchestrator import LOCAL, Endpoint, Orchestrator, OrchestratorConfig
from vfmig.journal.codec import DeviceInfo, JournalHeader
from vfmig.journal.collect import Collector
from vfmig.journal.recorder import Written, bus_clock, record

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from vfmig.core.options import RunOptions
    from vfmig.core.spec import DeviceSpec
    from vfmig.engine.bus import Record, Subscription
    from vfmig.engine.orchestrator import RunReport
    from vfmig.journal.writer import JournalWriter

#: How long the commit waits for the journal to hold the commit point on disk.
COMMIT_JOURNAL_TIMEOUT: Final = 10.0
#: Records a watcher may fall behind before it skips some.
WATCH_CAPACITY: Final = 4096


async def run_journaled(
    pairs: Sequence[tuple[DeviceSpec, DeviceSpec]],
    endpoints: Mapping[str, Endpoint],
    options: RunOptions,
    writer: JournalWriter,
    *,
    run_id: str,
    warn: Callable[[str], None],
    watchers: Sequence[Callable[[Subscription], Awaitable[None]]] = (),
    controllers: Sequence[Callable[[Orchestrator], Awaitable[None]]] = (),
    defer_merge: Callable[[Callable[[], object]], None] | None = None,
) -> RunReport:
    """Drive one run journaled into ``writer`` (closed when this returns); raises what the
    orchestrator raises (a VfmigError: the run could not start or lost its footing).

    The agents' journals are merged in before this returns, unless ``defer_merge`` takes
    the merge (a blocking function) to run later: the journal at its path is whole before
    the merge and after it (the merge renames a new file over it)."""
    config = OrchestratorConfig(
        machine=options.machine_config(),
        compress_level=options.compress_level,
        journal_data=options.journal_data,
    )
    bus = EventBus()
    written = Written()
    recorded = trio.Event()

    async def recorder(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await record(
                bus.subscribe(Lossless(1024)), writer, written=written, task_status=task_status
            )
        finally:
            recorded.set()

    async def commit_point_on_disk(commit: Record) -> None:
        with trio.move_on_after(COMMIT_JOURNAL_TIMEOUT):
            if await written.wait(commit.seq):
                return
        warn(f"the commit point is not on disk in {writer.path}; committing")

    agents = [host for host in endpoints if host != LOCAL]
    collector = Collector(run_id, writer.path, agents, warn=warn) if agents else None
    failure: Exception | None = None
    report: RunReport | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder)
        orchestrator = Orchestrator(
            pairs,
            endpoints,
            bus,
            config,
            run_id=run_id,
            commit_hook=commit_point_on_disk,
            end_hook=collector,
        )
        for control in controllers:
            nursery.start_soon(control, orchestrator)
        watched: list[trio.Event] = []
        for watch in watchers:
            done = trio.Event()
            watched.append(done)
            nursery.start_soon(_watch, watch, bus.subscribe(Ring(WATCH_CAPACITY)), done)
        try:
            report = await orchestrator.run()
        except Exception as exc:  # re-raised outside the nursery (a VfmigError)
            failure = exc
        bus.close()
        for done in watched:
            await done.wait()
        await recorded.wait()  # the journal is written and closed
        nursery.cancel_scope.cancel()
    if collector is not None:  # the agents' journals, fetched at the end of the run
        if defer_merge is not None:
            defer_merge(collector.merge)
        else:
            await trio.to_thread.run_sync(collector.merge)
    if failure is not None:
        raise failure
    assert report is not None
    return report


async def _watch(
    watch: Callable[[Subscription], Awaitable[None]], subscription: Subscription, done: trio.Event
) -> None:
    try:
        await watch(subscription)
    finally:
        done.set()


def orchestrator_header(
    pairs: list[tuple[DeviceSpec, DeviceSpec]], run_id: str, *, data: bool
) -> tuple[JournalHeader, Callable[[], int]]:
    """The header of an orchestrator's journal of a run, and the clock of its records (the
    bus's: call it inside ``trio.run``)."""
    devices = [DeviceInfo(id=dev, spec=str(spec)) for dev, spec in by_device(pairs).items()]
    header = JournalHeader(
        host=socket.gethostname(),
        role="orchestrator",
        run_id=run_id,
        kernel=platform.release(),
        start_wall_ns=time.time_ns(),
        start_mono_ns=int(trio.current_time() * 1e9),
        devices=tuple(devices),
        data=data,
        vfmig=__version__,
    )
    return header, bus_clock()


def agent_endpoints(
    pairs: Sequence[tuple[DeviceSpec, DeviceSpec]], *, key: bytes | None, tls: ssl.SSLContext | None
) -> dict[str, Endpoint]:
    """How to reach the agent of every ``@HOST:PORT`` the pairs name: TCP (TLS with
    ``tls``), links authenticated with ``key``."""

    async def dial(address: str) -> tuple[trio.abc.Stream, bytes | None]:
        return await connect(address, ssl_context=tls), key

    addresses = dict.fromkeys(spec.address for pair in pairs for spec in pair if spec.address)
    return {a: Endpoint(host=a, connect=partial(dial, a)) for a in addresses if a is not None}


def report_result(report: RunReport) -> dict[str, Any]:
    """The run's report as plain data (``vfmig migrate --json``'s result)."""
    from vfmig.core.events import summarize

    summary = summarize(report.tally)
    downtime = summary.downtime
    return {
        "run": report.run,
        "outcome": report.outcome.value,
        "exit_status": int(report.outcome.exit_status),
        "summary": report.summary,
        "devices": {str(dev): name for dev, name in report.names.items()},
        "bytes": {
            str(dev): {"raw": t.raw_bytes, "wire": t.wire_bytes}
            for dev, t in summary.devices.items()
        },
        "total_ms": summary.total_ns / 1e6,
        "downtime_ms": None if downtime is None else downtime.total_ns / 1e6,
        "errors": [
            {
                "device": None if e.device is None else str(e.device),
                "spec": None if e.device is None else report.names[e.device],
                "phase": e.phase.value,
                "step": e.step,
                "errno": e.errno,
                "errno_name": None if e.errno is None else errno_name(e.errno),
                "cause": e.cause.value,
                "message": e.message,
                "hint": e.hint,
            }
            for e in report.errors
        ],
    }
