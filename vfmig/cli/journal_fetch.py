"""``vfmig journal fetch AGENT RUN``: copy a finished journal from an agent's host.

Theory of operation
-------------------
A run an agent hosts (the thin ``vfmig migrate``, ADR 0010) is journaled on that agent's
host, as every agent's own side of a run is. This command asks the agent for the newest journal
``--role`` wrote for RUN (``fetch_journal``, docs/protocol.md §6), up to 960 KiB per
answer, over the blocking control link of :mod:`vfmig.cli.agent_client` (no trio). The
agent serves finished journals only: it waits for a hosted run's merge, and a run still in
progress is refused as busy.

The bytes go into a hidden file beside the target (mode 0600, as every journal), which must
then read as a journal of RUN (its header parses and names the run; the size is the one
announced) before it is renamed into place: into the local journal store under the agent's
name for it, so ``@last``, ``vfmig replay`` and ``vfmig journal`` treat it as any other
journal there, or to ``-o PATH`` (a new file). A journal whose frames are damaged or which
was never closed (its run's process died) is still copied, as it is, and said so: it is the
record of what happened. An interrupted or failed fetch leaves no file behind.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Final

from vfmig.cli.agent_client import (
    AgentClient,
    Refused,
    RequestFailed,
    connect,
    interrupts,
)
from vfmig.cli.link_options import client_tls
from vfmig.core.errors import ExitStatus, JournalError, PeerError, UsageError
from vfmig.journal import parts
from vfmig.journal.store import JournalStore

if TYPE_CHECKING:
    import argparse
    import ssl
    from collections.abc import Iterator
    from pathlib import Path
    from typing import IO

    from vfmig.cli.context import Environment

#: Error codes of ``fetch_journal`` -> exit status (anything else: FAILED).
_EXIT: Final = {
    "bad_params": ExitStatus.USAGE,
    "unknown_method": ExitStatus.PEER,
}
_HINTS: Final = {
    "not_found": "the run id is in what 'vfmig migrate' printed (--json: result.run); "
    "--role agent fetches an agent's own side of a run",
    "busy": "fetch it once the run has ended",
    "unknown_method": "the agent predates 'vfmig journal fetch': upgrade it",
}


def run(args: argparse.Namespace, env: Environment) -> int:
    from vfmig.engine.keys import load_key

    key = load_key(args.key_file)
    tls = client_tls(args)
    if args.output is not None and args.output.exists():
        raise UsageError(f"{args.output} exists: give -o a new path")
    path, info = fetch(
        args.agent, args.run_id, role=args.role, key=key, tls=tls, output=args.output
    )
    if args.json:
        env.emit_json("journal fetch", {"path": str(path), **info})
        return int(ExitStatus.OK)
    state = "intact" if info["intact"] else "NOT intact (see 'vfmig journal verify')"
    env.print(
        f"fetched the {args.role} journal of run {args.run_id} from {args.agent}: "
        f"{info['bytes']} bytes, {info['records']} records, {state}"
    )
    env.print(f"journal: {path}")
    return int(ExitStatus.OK)


def fetch(
    address: str,
    run_id: str,
    *,
    role: str,
    key: bytes,
    tls: ssl.SSLContext | None,
    output: Path | None,
) -> tuple[Path, dict[str, Any]]:
    """Copy ``role``'s journal of ``run_id`` from the agent at ``address`` into the journal
    store (or ``output``); returns where it is and what it holds."""
    peer = f"agent {address}"
    hint = f"check that the agent runs there (vfmig agent --listen {address})"
    with interrupts() as interrupted, connect(address, tls, hint=hint) as sock:
        client = AgentClient(sock, peer, key, name="vfmig journal fetch", lost_hint=None)
        client.handshake(interrupted)
        found = copy_journal(client, run_id, role, output, JournalStore(), interrupted)
        client.close()
    return found


def copy_journal(
    client: AgentClient,
    run_id: str,
    role: str,
    output: Path | None,
    store: JournalStore,
    interrupted: list[str],
    *,
    check: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Copy ``role``'s journal of ``run_id`` over ``client``'s link to ``output``, or into
    ``store`` under the agent's name for it; where it is and what it holds (with ``check``,
    once read through as a journal of ``run_id``; without, its size only)."""
    params: dict[str, Any] = {"run": run_id, "offset": 0, "role": role}
    first = part = _ask(client, params, interrupted)
    target = output if output is not None else store.place(first.name)
    with _staged(target) as (staged, out):
        while True:
            for piece in part.pieces:
                out.write(piece)
            params["offset"] += sum(len(piece) for piece in part.pieces)
            if part.done:
                break
            if not part.pieces or params["offset"] >= first.size:
                raise PeerError(
                    client.peer, f"the agent's parts do not add up to {first.size} bytes"
                )
            part = _ask(client, params, interrupted)
            if (part.name, part.size) != (first.name, first.size):
                raise PeerError(
                    client.peer,
                    "the journal changed on the agent's host while it was fetched",
                    hint="fetch it again",
                )
        out.flush()
        os.fsync(out.fileno())
        if params["offset"] != first.size:
            raise PeerError(client.peer, f"got {params['offset']} bytes of {first.size}")
        info = _check(staged, run_id) if check else {"bytes": first.size}
        os.replace(staged, target)
    return target, {"run": run_id, "role": role, "name": first.name, **info}


def _ask(client: AgentClient, params: dict[str, Any], interrupted: list[str]) -> parts.Part:
    try:
        value = client.call("fetch_journal", params, interrupted)
    except RequestFailed as exc:
        raise Refused(exc.code, f"{client.peer}: {exc.message}", _EXIT, _HINTS) from None
    try:
        return parts.from_wire(value)
    except parts.PartError:
        raise PeerError(
            client.peer, "the answer is not a journal's part (another version?)"
        ) from None


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[tuple[Path, IO[bytes]]]:
    """A new hidden file beside ``target`` (mode 0600), gone at the end unless renamed."""
    staged = target.with_name(f".{target.name}.fetch")
    with contextlib.suppress(FileNotFoundError):
        staged.unlink()  # left by a fetch that was killed
    try:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise JournalError(f"cannot write {staged}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            yield staged, out
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()


def _check(path: Path, run_id: str) -> dict[str, Any]:
    """What the journal at ``path`` holds; JournalError unless it is one of ``run_id``."""
    from vfmig.journal.reader import JournalReader

    try:
        with JournalReader(path) as reader:
            for _ in reader.entries():
                pass
            header, status = reader.header, reader.status
    except JournalError as exc:
        raise JournalError(f"the agent sent no journal: {exc.message}") from None
    if header.run_id != run_id:
        raise JournalError(f"the agent sent the journal of run {header.run_id}, not {run_id}")
    return {
        "host": header.host,
        "bytes": path.stat().st_size,
        "records": status.records,
        "intact": status.intact,
        "closed": status.closed,
    }
