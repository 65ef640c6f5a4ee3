"""Runs an agent hosts for a thin ``vfmig migrate`` (``vfmig agent --orchestrate``).

Theory of operation
-------------------
The thin ``vfmig migrate`` (ADR 0010: by default on the source agent's machine, or with
``--via HOST:PORT``) imports no trio and no engine: it asks the agent to run the
migration (``migrate``: the device specs and the
:class:`~vfmig.core.options.RunOptions`) and waits for the answer. The agent then runs the
very run ``vfmig migrate`` runs in its own process (:func:`~vfmig.engine.journaled.
run_journaled`): the same orchestrator, phase machine, journal and merge. It reaches each
device's agent, itself included, at the spec's ``@HOST:PORT`` over TCP, with its own key
and TLS settings, so device data still flows directly from agent to agent.

While the run goes on, its events go back to the client as Notifications on the client's
control link when it asked for them (``progress``): event notices as any agent sends its
orchestrator, chunk progress folded by the session's pump. The forwarder never waits: when
a slow client's queue is full its notices are dropped, so the run, and its end, are never
held back by a client that stopped reading. The answer holds the run's report
(:func:`~vfmig.engine.journaled.report_result`), its summary for the client's display, and
where its journal is: in this agent's journal store. The agents' journals are merged into
it right after the answer is sent (24-54 ms of a 512 MiB run), so that the outcome
reaches the client first; the file at that path is a whole journal before the merge and
after it, and a ``fetch_journal`` of the run -- the client's copy, or ``vfmig journal
fetch`` -- waits for the merge.

Ownership: the client owns its run. Its ``abort`` (Ctrl-C, SIGTERM) and the loss of its
control link both abort the run -- before the commit point every device is brought back,
after it the commit is finished, exactly as a signal does in ``vfmig migrate``. One run
per client link at a time. Hosting is off unless the agent is started with
``--orchestrate``: it makes the agent connect to addresses a client names (an
authenticated client, but one the operator chose to let do so).
"""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Final

import trio

from vfmig.core.errors import UsageError, VfmigError
from vfmig.core.events import summarize
from vfmig.core.options import RunOptions
from vfmig.core.spec import parse_spec
from vfmig.engine import wire
from vfmig.engine.journaled import (
    agent_endpoints,
    orchestrator_header,
    report_result,
    run_journaled,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from vfmig.core.spec import DeviceSpec
    from vfmig.engine.agent import Agent, ControlSession
    from vfmig.engine.bus import Subscription
    from vfmig.engine.orchestrator import Orchestrator
    from vfmig.journal.store import JournalStore
    from vfmig.protocol import Value

#: The reason a run is aborted with when its client's link is lost.
CLIENT_LOST: Final = "the client of the run left (vfmig migrate)"
#: How long a fetch of a run's journal waits for its merge (seconds).
SETTLE_WAIT: Final = 30.0


class HostedError(VfmigError):
    """A ``migrate`` request the agent cannot take (answered as ``bad_params``)."""


@dataclass(eq=False, slots=True)
class _Hosted:
    run_id: str
    orchestrator: Orchestrator | None = None
    #: An abort that came before the orchestrator existed: (reason, signal).
    pending: tuple[str, str | None] | None = None


class HostedRuns:
    """The runs ``agent`` hosts, their journals in ``store``."""

    def __init__(self, agent: Agent, store: JournalStore) -> None:
        self._agent = agent
        self._store = store
        self._runs: dict[ControlSession, _Hosted] = {}
        #: Journal merges waiting for their run's answer to be sent, by client session.
        self._merges: dict[ControlSession, tuple[str, list[Callable[[], object]]]] = {}
        #: Journal merges in progress (``Agent.wait_idle`` waits for them).
        self.merging = 0
        #: Runs over whose journal is not merged yet: set once it is.
        self._unsettled: dict[str, trio.Event] = {}

    async def migrate(self, session: ControlSession, params: dict[str, Value]) -> Value:
        """Run the migration ``params`` describe for ``session``'s client; the answer is the
        run's report, or the error that kept it from running (``error``)."""
        if session in self._runs:
            raise HostedError("a run of this client is in progress on this link")
        pairs = _pairs(params.get("devices"))
        try:
            options = RunOptions.from_wire(params.get("options") or {})
        except (TypeError, ValueError) as exc:
            raise HostedError(f"bad run options: {exc}") from None
        session.subscribed = params.get("progress") is True
        hosted = self._runs[session] = _Hosted(secrets.token_hex(8))
        agent = self._agent
        try:
            return await self._run(session, hosted, pairs, options)
        finally:
            del self._runs[session]
            agent.log(f"run {hosted.run_id} of client {session.peer}: over")

    async def abort(self, session: ControlSession, reason: str, signal: str | None) -> Value:
        """Abort the run ``session``'s client asked for (nothing if it has none)."""
        hosted = self._runs.get(session)
        if hosted is None:
            return False
        self._agent.log(f"run {hosted.run_id}: {reason}; aborting")
        if hosted.orchestrator is None:
            hosted.pending = (reason, signal)
        else:
            await hosted.orchestrator.abort(reason, signal)
        return True

    def running(self, run_id: str) -> bool:
        return any(hosted.run_id == run_id for hosted in self._runs.values())

    async def settled(self, run_id: str) -> bool:
        """Wait up to :data:`SETTLE_WAIT` for ``run_id``'s journal merge, if one is due;
        whether the journal is final now."""
        event = self._unsettled.get(run_id)
        if event is not None:
            with trio.move_on_after(SETTLE_WAIT):
                await event.wait()
        return event is None or event.is_set()

    def answered(self, session: ControlSession) -> None:
        """An answer to ``session``'s ``migrate`` is sent: once it was the run's own (no
        run of that session goes on), merge the run's journal."""
        if session in self._runs or session not in self._merges:  # a refused request
            return
        run_id, merges = self._merges.pop(session)
        self.merging += 1
        self._agent.nursery.start_soon(self._merge, run_id, merges)

    async def _merge(self, run_id: str, merges: list[Callable[[], object]]) -> None:
        try:
            for merge in merges:
                await trio.to_thread.run_sync(merge)
                self._agent.log(f"run {run_id}: the agents' journals are merged into its journal")
        finally:
            self.merging -= 1
            self._unsettled.pop(run_id, trio.Event()).set()
            self._agent.changed()

    def session_ended(self, session: ControlSession) -> None:
        if session in self._runs:
            self._agent.nursery.start_soon(self.abort, session, CLIENT_LOST, None)

    async def _run(
        self,
        session: ControlSession,
        hosted: _Hosted,
        pairs: list[tuple[DeviceSpec, DeviceSpec]],
        options: RunOptions,
    ) -> Value:
        agent = self._agent
        run_id = hosted.run_id
        header, clock = orchestrator_header(pairs, run_id, data=options.journal_data)
        writer = await trio.to_thread.run_sync(
            partial(self._store.create, header, mono_clock=clock)
        )
        where = {"journal": str(writer.path), "journal_host": socket.gethostname()}
        agent.log(f"run {run_id} for client {session.peer}: {len(pairs)} pair(s), {writer.path}")
        config = agent.config
        endpoints = agent_endpoints(pairs, key=config.key, tls=config.client_ssl)

        async def forward(subscription: Subscription) -> None:
            from vfmig.engine.bus import Record

            async for item in subscription:
                if isinstance(item, Record):
                    session.offer(wire.event_notice(run_id, item.event))

        async def control(orchestrator: Orchestrator) -> None:
            hosted.orchestrator = orchestrator
            if hosted.pending is not None:
                await orchestrator.abort(*hosted.pending)

        merges: list[Callable[[], object]] = []
        self._merges[session] = (run_id, merges)
        self._unsettled[run_id] = trio.Event()
        try:
            report = await run_journaled(
                pairs,
                endpoints,
                options,
                writer,
                run_id=run_id,
                warn=lambda line: agent.log(f"run {run_id}: warning: {line}"),
                watchers=[forward],
                controllers=[control],
                defer_merge=merges.append,  # once the client has the answer
            )
        except VfmigError as exc:
            agent.log(f"run {run_id}: {exc.message}")
            error: dict[str, Value] = {
                "run": run_id,
                "message": exc.message,
                "hint": exc.hint,
                "exit_status": int(exc.exit_status),
                **where,
            }
            return {"result": None, "error": error}
        agent.log(f"run {run_id}: {report.summary}")
        result = {**report_result(report), **where}
        return {"result": result, "summary": wire.summary_result(summarize(report.tally))}


def _pairs(value: object) -> list[tuple[DeviceSpec, DeviceSpec]]:
    """The ``devices`` parameter: SRC DST ... specs, every one on an agent (``@HOST:PORT``)."""
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise HostedError("devices must be a list of device specs, SRC DST ...")
    if len(value) % 2:
        raise HostedError(f"devices come in pairs, SRC DST, but {len(value)} were given")
    specs = []
    for text in value:
        try:
            spec = parse_spec(text)
        except UsageError as exc:
            raise HostedError(exc.message) from None
        if spec.address is None:
            raise HostedError(f"{text}: a hosted run names every device with @HOST:PORT")
        specs.append(spec)
    return list(zip(specs[::2], specs[1::2], strict=True))
