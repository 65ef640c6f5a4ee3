"""The thin ``vfmig migrate``: a client of the run an agent hosts (ADR 0010).

Theory of operation
-------------------
When every device is on an agent, ``vfmig migrate`` asks one agent (the first source's, or
the one ``--via`` names) to run the migration, and waits for the answer; the agent drives
the very run ``vfmig migrate`` drives in its own process (:mod:`vfmig.engine.hosted`).
This side imports neither trio nor the engine -- the start-up a short migration otherwise
pays for before its first byte: a blocking control link (:mod:`vfmig.cli.agent_client`)
carries the ``migrate`` request, the run's events as they come (the progress display on a
terminal, periodic lines otherwise, nothing with ``--json``: then the events are not even
asked for), and the answer. Asked without ``--via`` (a *probe*), the agent must say
(``status``) that it orchestrates and runs on this machine -- only then does every device
address mean the same to it as to this command (a port forwarded to another host's agent
looks like loopback here) -- and any failure before it took the request is
:class:`NoHost`: the command then runs the migration itself.

Once the answer is in, the run's journal is copied on the same link (``fetch_journal``:
the agent answers once it has merged the agents' journals into it) into ``--journal`` or
this host's store, so the run's journal is where a run in the command would have put it.
A copy that fails leaves it on the agent's host, with a warning; the outcome stands.

Signals: SIGINT and SIGTERM only note their name (the wait for the agent looks every
0.1 s), so a frame is never cut in half; the loop then sends ``abort`` and goes on waiting
while the agent rolls the run back, and the answer carries the interrupted outcome (one
more signal changes nothing: the rollback is under way). Losing the
agent ends the command with exit status 4; the agent, having lost its client, aborts the
run the same way (the commit, once passed, is finished).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Final

from vfmig.cli.agent_client import (
    AgentClient,
    Refused,
    RequestFailed,
    connect,
    interrupts,
    never,
    this_machine,
)
from vfmig.core.errors import ExitStatus, PeerError, VfmigError
from vfmig.protocol import ErrorResponse, Notification, Response

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable
    from pathlib import Path

    from vfmig.cli.context import Environment
    from vfmig.cli.progress import ProgressDisplay
    from vfmig.core.options import RunOptions
    from vfmig.protocol import Value

#: ErrorResponse codes -> exit status (anything else: FAILED). An agent that does not
#: orchestrate (or predates hosted runs) answers unknown_method.
_EXIT: Final = {
    "bad_params": ExitStatus.USAGE,
    "refused": ExitStatus.PEER,
    "unknown_method": ExitStatus.PEER,
}
_HINTS: Final = {"unknown_method": "start the agent with --orchestrate (vfmig agent --help)"}
#: What a result must hold for this command to print it.
_RESULT_SHAPE: Final = {
    "run": str,
    "outcome": str,
    "exit_status": int,
    "summary": str,
    "errors": list,
    "journal": str,
}


class NoHost(Exception):
    """A probe found no agent to host the run: it does not orchestrate, runs on another
    machine, or could not be reached or authenticated (``vfmig migrate`` then runs the
    migration itself, and reports any failure as it does)."""


def run_via(
    address: str,
    env: Environment,
    devices: list[str],
    options: RunOptions,
    *,
    key: bytes,
    tls: ssl.SSLContext | None,
    json: bool,
    journal: Path | None,
    keep: int | None,
    probe: bool = False,
) -> tuple[dict[str, Any], Callable[[], None] | None]:
    """Have the agent at ``address`` run the migration of ``devices`` (SRC DST ..., each on
    an agent), then copy the run's journal here (to ``journal``, or the store that keeps
    ``keep``); returns the answer's result and what prints the summary (None if nothing
    was shown), as ``vfmig migrate`` ends every run. With ``probe``, an agent that does not
    take the request raises :class:`NoHost`."""
    peer = f"agent {address}"
    hint = f"check that the agent runs there (vfmig agent --listen {address} --orchestrate)"
    sent = False
    try:
        with interrupts() as interrupted, connect(address, tls, hint=hint) as sock:
            client = AgentClient(sock, peer, key, name="vfmig migrate", lost_hint=_LOST_HINT)
            client.handshake(interrupted)
            if probe and not _hosts_here(client, interrupted):
                client.close()
                raise NoHost
            params: dict[str, Value] = {
                "devices": list(devices),
                "options": options.to_wire(),
                "progress": not json,
            }
            migrate = client.request("migrate", params)
            sent = True
            shown = _Display(env, devices) if not json else None
            answer = _wait(client, migrate, env, shown, interrupted)
            copy = partial(_copy_journal, client, env, journal, keep, interrupted)
            try:
                result, closer = _answer(answer, shown, peer)
            except HostedRunError as exc:
                if exc.run is not None and exc.journal is not None:
                    exc.journal = copy(exc.run) or exc.journal
                raise
            result["hosted_by"] = address
            copied = copy(result["run"])
            if copied is not None:
                result["journal"] = copied
                result.pop("journal_host", None)
            client.close()
            return result, closer
    except PeerError:
        if probe and not sent:
            raise NoHost from None
        raise


def _hosts_here(client: AgentClient, interrupted: list[str]) -> bool:
    """Whether the agent would host the run and runs on this machine, so that every device
    address means the same to it as to this command (``status``; an agent that predates
    either answer does not)."""
    try:
        status = client.call("status", {}, interrupted)
    except RequestFailed:
        return False
    if not isinstance(status, dict) or status.get("orchestrates") is not True:
        return False
    here = this_machine()
    return here is not None and status.get("machine") == here


def _wait(
    client: AgentClient,
    migrate: int,
    env: Environment,
    shown: _Display | None,
    interrupted: list[str],
) -> Response | ErrorResponse:
    """The answer to the ``migrate`` request, the run's events shown meanwhile; the first
    interrupt asks the agent to roll the run back."""
    aborting = False
    while True:
        if interrupted and not aborting:
            aborting = True
            name = interrupted[0]
            print(f"vfmig: {name}: rolling the run back (the agent does it)", file=env.stderr)
            client.request("abort", {"signal": name})
        wake = never if aborting else lambda: bool(interrupted)
        for event in client.receive(wake=wake):  # in order: an answer before a Goodbye
            if isinstance(event, Notification) and shown is not None:
                shown.handle(event.payload)
            elif isinstance(event, Response | ErrorResponse) and event.id == migrate:
                return event
            client.check(event)


def _copy_journal(
    client: AgentClient,
    env: Environment,
    journal: Path | None,
    keep: int | None,
    interrupted: list[str],
    run_id: str,
) -> str | None:
    """Copy the hosted run's journal here (``journal``, or the store): its path, or None
    with a warning if it stays on the agent's host. The copy is not read through: the agent
    that ran the run wrote it, and the link authenticates every byte (reading it would
    load the journal's codec, ~50 ms of a short run)."""
    from vfmig.cli.journal_fetch import copy_journal
    from vfmig.journal.store import DEFAULT_KEEP, JournalStore

    interrupted.clear()  # the signal that stopped the run does not stop the copy
    store = JournalStore(keep=keep or DEFAULT_KEEP)
    try:
        path, _ = copy_journal(
            client, run_id, "orchestrator", journal, store, interrupted, check=False
        )
        if journal is None:
            store.rotate()
    except (VfmigError, KeyboardInterrupt) as exc:
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        print(
            f"vfmig: warning: the run's journal stays on the agent's host: {why}", file=env.stderr
        )
        return None
    return str(path)


def _answer(
    event: Response | ErrorResponse, shown: _Display | None, peer: str
) -> tuple[dict[str, Any], Callable[[], None] | None]:
    if isinstance(event, ErrorResponse):
        raise Refused(event.code, event.message, _EXIT, _HINTS)
    answer = event.result if isinstance(event.result, dict) else {}
    error = answer.get("error")
    if isinstance(error, dict):
        raise HostedRunError(error)
    result = answer.get("result")
    if not isinstance(result, dict) or not all(
        isinstance(result.get(name), kind) for name, kind in _RESULT_SHAPE.items()
    ):
        raise PeerError(peer, "the answer to migrate is not a run's result (another version?)")
    if shown is None:
        return result, None
    return result, shown.closer(answer.get("summary"))


class HostedRunError(VfmigError):
    """The hosted run could not go on (an agent it needs unreachable, say)."""

    def __init__(self, error: dict[str, Value]) -> None:
        message, hint = error.get("message"), error.get("hint")
        super().__init__(str(message), hint=hint if isinstance(hint, str) else None)
        status = error.get("exit_status")
        self.exit_status = ExitStatus.FAILED
        if isinstance(status, int) and status in set(ExitStatus):
            self.exit_status = ExitStatus(status)
        journal, host, run = error.get("journal"), error.get("journal_host"), error.get("run")
        self.journal: str | None = None  #: where the run's journal is (here, once copied)
        if isinstance(journal, str) and isinstance(host, str):
            self.journal = f"{host}:{journal}"
        self.run = run if isinstance(run, str) else None


class _Display:
    """The progress display, fed the run's event notices (created at the first event)."""

    def __init__(self, env: Environment, devices: list[str]) -> None:
        from vfmig.core.model import by_device

        self._env = env
        self._names = by_device(zip(devices[::2], devices[1::2], strict=True))
        self._display: ProgressDisplay | None = None

    def handle(self, payload: dict[str, Value]) -> None:
        from vfmig.cli.progress import ProgressDisplay
        from vfmig.engine import wire

        try:
            items = wire.batch_items(payload) if "batch" in payload else [payload]
            notices = [wire.parse_notice(item) for item in items]
        except wire.WireError:
            return  # a newer agent's notice: not for this display
        for notice in notices:
            if notice.event is None:
                continue
            if self._display is None:
                env = self._env
                self._display = ProgressDisplay(env, live=env.stdout_isatty, names=self._names)
            self._display.handle(notice.event)

    def closer(self, summary: Value) -> Callable[[], None] | None:
        """What prints the run's summary at the end (None if nothing was shown)."""
        display = self._display
        if display is None:
            return None
        from vfmig.engine import wire

        try:
            parsed = wire.parse_summary(summary)
        except wire.WireError:
            parsed = None  # the display's own, from the events it saw
        return lambda: display.close(parsed)


_LOST_HINT: Final = (
    "the failure policy brings the run's devices back either way: an agent that loses its "
    "client aborts the run (finished after the commit point); if the agent itself stopped, "
    "the other agents fall back alone and it does for its own devices when it restarts. "
    "See its log, and the run's journal on its host"
)
