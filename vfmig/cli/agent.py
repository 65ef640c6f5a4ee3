"""``vfmig agent``: serve this host's devices to orchestrators (``vfmig migrate ...@HOST:PORT``).

The agent listens on loopback unless ``--listen`` names another address, authenticates
every peer with the shared key (``--key-file``; the file must be private to its owner),
optionally over TLS, and opens only what ``--allow`` lists (every device if it is not
given). Simulated devices' files (image=, dump=, state-dir=) are confined to
``--sim-dir``. It logs one line per significant event to stderr, never the key.
SIGTERM or Ctrl-C stops it gracefully: every migration it still serves is brought to
rest by the failure policy first.

The agent journals its side of every run (its ioctls, the chunks it sent or received, what
a fallback did) into ``--journal-dir`` (default: the journal store), one journal per run,
so a host that lost its orchestrator still has a record; ``--journal-data`` adds the
streams it receives (``vfmig load`` re-drives them).

With ``--orchestrate`` it also hosts whole migrations for thin clients (``vfmig migrate``
on this machine, or ``--via`` from anywhere: :mod:`vfmig.engine.hosted`), journaled into
the same directory as ``vfmig migrate`` would journal them (the orchestrator's journal,
merged with the agents'), and copied back to the client.
Peers with the key can copy the finished journals of that directory (``vfmig journal
fetch``); with ``--no-journal`` and without ``--orchestrate`` it serves none.

It keeps a ledger of the runs it serves in ``--state-file`` (default: ``agent-HOST-PORT.ledger``
beside the journal store), so that, restarted after a crash, it first brings back the
devices it was migrating and still knows its commit verdicts (:mod:`vfmig.engine.ledger`).

trio and the engine are imported only when the command runs.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from typing import TYPE_CHECKING

from vfmig.core.errors import UsageError

if TYPE_CHECKING:
    import argparse

    from vfmig.cli.context import Environment
    from vfmig.engine.agent import AgentConfig
    from vfmig.journal.runs import RunJournals

#: Where an agent listens when --listen is not given (loopback only).
DEFAULT_LISTEN = "127.0.0.1:7300"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from pathlib import Path

    parser = sub.add_parser(
        "agent",
        help="serve this host's devices to vfmig migrate (authenticated, loopback by default)",
        description="Run the per-host agent: it opens this host's devices for orchestrators "
        "that know the shared key, streams device data directly to the peer agent, and "
        "brings its devices back by the failure policy if it loses its orchestrator.",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"control address (default {DEFAULT_LISTEN}; port 0 picks one); data streams "
        "use a second port on the same host",
    )
    parser.add_argument(
        "--key-file", type=Path, required=True, metavar="PATH", help="shared key (vfmig keygen)"
    )
    parser.add_argument("--tls-cert", type=Path, metavar="PATH", help="server certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, metavar="PATH", help="its private key (PEM)")
    parser.add_argument(
        "--tls-ca",
        type=Path,
        metavar="PATH",
        help="CA for peers: require their client certificates, verify peer agents",
    )
    parser.add_argument(
        "--sim-dir",
        type=Path,
        metavar="DIR",
        help="directory for simulated devices' image=, dump= and state-dir= files",
    )
    parser.add_argument(
        "--allow",
        nargs="+",
        metavar="DEVICE",
        help="devices this agent may open, as KIND:NAME (default: any)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="wait this long after losing an orchestrator before falling back (default 2)",
    )
    parser.add_argument(
        "--journal-dir",
        type=Path,
        metavar="DIR",
        help="journal each run into DIR (default: the journal store)",
    )
    parser.add_argument(
        "--journal-data",
        action="store_true",
        help="journal the device streams this agent receives too",
    )
    parser.add_argument(
        "--no-journal", action="store_true", help="do not journal (the orchestrator still does)"
    )
    parser.add_argument(
        "--keep-journals",
        type=int,
        default=None,
        metavar="N",
        help="keep the newest N journals of the directory (default 20)",
    )
    parser.add_argument(
        "--orchestrate",
        action="store_true",
        help="also host whole migrations for 'vfmig migrate' (run on this machine with this "
        "agent's device as the first source, or with --via): this agent then connects to "
        "the agents a client names, with its own key and TLS settings; their journals go "
        "into --journal-dir and back to the client",
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        metavar="PATH",
        help="the ledger of the runs this agent serves, read back on restart (default: "
        "agent-HOST-PORT.ledger in the journal store's directory; none with port 0)",
    )
    parser.set_defaults(run=run)


def _tls(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    cert, key, ca = args.tls_cert, args.tls_key, args.tls_ca
    if cert is None and key is None and ca is None:
        return None, None
    if cert is None or key is None:
        raise UsageError("an agent with TLS needs --tls-cert and --tls-key")
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(str(cert), str(key))
        client = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
        client.load_cert_chain(str(cert), str(key))
        if ca is not None:
            server.load_verify_locations(cafile=str(ca))
            server.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the TLS files: {exc}") from None
    return server, client


def run(args: argparse.Namespace, env: Environment) -> int:
    from vfmig.core.spec import split_address
    from vfmig.engine.keys import load_key

    try:
        host, port = split_address(args.listen)
    except ValueError:
        raise UsageError(
            f"--listen {args.listen!r} is not HOST:PORT", hint=f"e.g. --listen {DEFAULT_LISTEN}"
        ) from None
    key = load_key(args.key_file)
    sim_dir = args.sim_dir
    if sim_dir is not None and not sim_dir.is_dir():
        raise UsageError(f"--sim-dir {sim_dir} is not a directory")
    if not args.grace >= 0:
        raise UsageError("--grace must be zero or more seconds")
    if args.keep_journals is not None and args.keep_journals < 1:
        raise UsageError("--keep-journals must be 1 or more")
    if args.no_journal and (args.journal_dir or args.journal_data):
        raise UsageError("--no-journal goes with neither --journal-dir nor --journal-data")
    server_tls, client_tls = _tls(args)

    import trio

    from vfmig.cli.agent_client import this_machine
    from vfmig.engine.agent import AgentConfig
    from vfmig.engine.ledger import Ledger, default_path
    from vfmig.journal.runs import RunJournals
    from vfmig.journal.store import DEFAULT_KEEP, JournalStore, default_dir

    def log(line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"{stamp} vfmig agent: {line}", file=env.stderr, flush=True)

    journals = None
    store = JournalStore(args.journal_dir, keep=args.keep_journals or DEFAULT_KEEP)
    if not args.no_journal:
        journals = RunJournals(store, host=socket.gethostname(), data=args.journal_data, log=log)
    ledger = None
    if args.state_file is not None or port != 0:
        ledger = Ledger(args.state_file or default_path(default_dir(), host, port), log)
    else:  # another address at each start: it would be shared, and nobody could ask it
        log("no ledger (--listen port 0 without --state-file): a restart recovers nothing")
    config = AgentConfig(
        name=f"agent on {socket.gethostname()}",
        key=key,
        sim_dir=sim_dir,
        allow=frozenset(args.allow) if args.allow else None,
        grace=args.grace,
        server_ssl=server_tls,
        client_ssl=client_tls,
        log=log,
        journal=journals,
        ledger=ledger,
        host_runs=store if args.orchestrate else None,
        journal_store=store if journals is not None or args.orchestrate else None,
        machine=this_machine(),
    )
    try:
        trio.run(_serve, config, journals, host, port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    return 0


async def _serve(config: AgentConfig, journals: RunJournals | None, host: str, port: int) -> None:
    import signal

    import trio

    from vfmig.engine.agent import Agent, serve_tcp

    agent = Agent(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            if journals is not None:
                await nursery.start(journals.run)
            await nursery.start(agent.run)
            await agent.recover()
            control, data = await nursery.start(serve_tcp, agent, host, port)
            shown = f"[{host}]" if ":" in host else host
            agent.log(f"listening on {shown}:{control} (data port {data}), pid {os.getpid()}")
            async for number in signals:
                agent.log(f"{signal.Signals(number).name}: stopping")
                break
            await agent.shutdown()
            nursery.cancel_scope.cancel()
    agent.log("stopped")
