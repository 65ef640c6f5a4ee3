"""One journal for a run with remote agents: fetch each agent's own journal, merge them in.

Theory of operation
-------------------
During a run the orchestrator's journal records every agent event as a copy, stamped on
its own clock when the notice arrives. Each agent also journals its side itself
(:mod:`vfmig.journal.runs`): the originals, on its own clock, and with ``--journal-data``
the stream its destinations received -- device data the orchestrator never carries during
a migration.

:class:`Collector` is the orchestrator's end hook (:class:`vfmig.engine.orchestrator.
Orchestrator`, ``end_hook``): once every device of the run is closed, before the links say
Goodbye, it asks each remote agent still connected for its journal of the run (the
``journal`` RPC, docs/protocol.md §6), at most 960 KiB per answer, and writes it to a file
beside the run's journal (mode 0600, named ``.<journal>.<n>.part``). Every request has a
deadline (:data:`FETCH_TIMEOUT`): an agent that stops answering costs that much, never a
hang. The agents are fetched concurrently.

:meth:`Collector.merge` then (the orchestrator's journal closed) rewrites the run's
journal as one timeline with :func:`vfmig.journal.merge.merge_run` -- into a temporary
file, fsynced, renamed over the journal -- and removes the fetched files. An agent whose
journal could not be had keeps the orchestrator's copies of its events; the merged header
and one warning line per agent say why. Nothing here changes a migration's outcome.
Memory stays bounded: one answer in flight per agent, merging reads frame by frame.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Final

import trio

from vfmig.core.errors import JournalError, PeerError
from vfmig.engine.link import RpcError
from vfmig.journal import parts
from vfmig.journal.merge import AgentSide, merge_run

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from pathlib import Path
    from typing import IO

    from vfmig.engine.link import Link
    from vfmig.journal.merge import MergeReport

#: Longest wait for one answer of the ``journal`` RPC (seconds).
FETCH_TIMEOUT: Final = 10.0


class Collector:
    """Fetch the agents' journals of ``run_id`` (the hosts ``remote``) beside ``journal``."""

    def __init__(
        self,
        run_id: str,
        journal: Path,
        remote: Iterable[str],
        *,
        warn: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.run_id = run_id
        self.journal = journal
        self.remote = sorted(remote)
        self._warn = warn
        self.sides: dict[str, AgentSide] = {}

    def _part(self, n: int) -> Path:
        return self.journal.with_name(f".{self.journal.name}.{n}.part")

    async def __call__(self, links: Mapping[str, Link]) -> None:
        """The end hook: fetch every remote agent's journal over its link (if still up)."""
        async with trio.open_nursery() as nursery:
            for n, address in enumerate(self.remote):
                link = links.get(address)
                if link is None:
                    self.sides[address] = AgentSide(address, None, "its link was lost")
                    continue
                nursery.start_soon(self._fetch_one, address, link, self._part(n))

    async def _fetch_one(self, address: str, link: Link, path: Path) -> None:
        try:
            name = await fetch(link, self.run_id, path)
        except (PeerError, RpcError, JournalError) as exc:
            reason = exc.reason if isinstance(exc, RpcError) else exc.message
            self.sides[address] = AgentSide(address, None, reason)
        except OSError as exc:
            reason = f"cannot write {path}: {exc.strerror}"
            self.sides[address] = AgentSide(address, None, reason)
        except trio.TooSlowError:
            reason = f"it did not answer within {FETCH_TIMEOUT:g} s"
            self.sides[address] = AgentSide(address, None, reason)
        else:
            self.sides[address] = AgentSide(address, path, name=name)

    def merge(self) -> MergeReport | None:
        """Rewrite the (closed) run's journal as one timeline with the fetched journals
        (blocking: call it in a thread); warn once per agent left out whose events the
        journal holds. None if the merge failed: the run's journal is then left as it was."""
        sides = [self.sides.get(a, AgentSide(a, None, "not fetched")) for a in self.remote]
        merging = self.journal.with_name(f".{self.journal.name}.merging")
        try:
            with contextlib.suppress(FileNotFoundError):
                merging.unlink()  # left by a merge that was killed
            report = merge_run(self.journal, sides, merging)
            os.replace(merging, self.journal)
            _sync_directory(self.journal.parent)
        except (JournalError, OSError) as exc:
            why = exc.message if isinstance(exc, JournalError) else str(exc)
            self._warn(f"the agents' journals are not merged into {self.journal}: {why}")
            report = None
            with contextlib.suppress(FileNotFoundError):
                merging.unlink()
        finally:
            for n in range(len(self.remote)):  # fetched or cut short
                with contextlib.suppress(FileNotFoundError):
                    self._part(n).unlink()
        for side in sides:
            copies = report.copies.get(side.address, 0) if report is not None else None
            if side.path is None and copies != 0:
                held = "its events" if copies is None else f"its {copies} records"
                self._warn(
                    f"the journal of agent {side.address} is not merged ({side.error}): "
                    f"{held} are as this host received them"
                )
        return report


async def fetch(link: Link, run_id: str, path: Path) -> str:
    """Copy the agent's journal of ``run_id`` into the new file ``path`` (mode 0600);
    returns its name on the agent's host. Each answer must come within FETCH_TIMEOUT
    (trio.TooSlowError)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        offset = 0
        while True:
            with trio.fail_after(FETCH_TIMEOUT):
                answer = await link.request("journal", {"run": run_id, "offset": offset})
            try:
                part = parts.from_wire(answer)
            except parts.PartError as exc:
                raise JournalError(f"the agent's journal answer is malformed: {exc}") from None
            await trio.to_thread.run_sync(_write, out, part.pieces)
            offset += sum(len(p) for p in part.pieces)
            if part.done:
                return part.name
            if not part.pieces:
                raise JournalError(f"the agent's journal stopped at byte {offset} of {part.size}")


def _write(out: IO[bytes], pieces: list[bytes]) -> None:
    out.writelines(pieces)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
