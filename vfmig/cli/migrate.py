"""``vfmig migrate SRC DST [SRC DST ...]``: migrate devices' state, live, source to destination.

Each pair's spec names a device here (``sim:a``, ``vfio:0000:3b:00.1``) or on the host of an
agent (``...@HOST:PORT``, reached with ``--key-file``). Devices of this host are served by
agent code inside this process over an in-process link; device data always flows directly
from the source's agent to the destination's. The run follows the phase machine
(:mod:`vfmig.core.phases`) and the failure policy (docs/failure-policy.md): on a failure
or Ctrl-C before the commit point every device is brought back, after it the commit is
finished. The exit status is the outcome's (0 completed, 1 failed, 2 usage, 3 refused,
4 peer lost, 5 in doubt, 6 hung, 130 interrupted).

Every run is journaled (docs/journal.md): into ``--journal PATH``, or else the journal
store (the newest ``--keep-journals`` kept). The recorder subscribes to the run's bus
before the first event, so the journal holds every event, the agents' included (each with
its origin, stamped on this process's clock as it arrives). The commit point is on disk
before any agent is told to commit. With ``--journal-data`` the in-process agent also
writes each stream it receives into the journal as it writes it to the device, and each
remote agent is asked to capture the streams its destinations receive into its own
journal of the run. After the run (its devices closed, outside any downtime) each remote
agent's journal is fetched and merged in (:mod:`vfmig.journal.collect`): the run's journal
becomes one timeline on this host's clock, the agents' own records in place of the
copies, and the streams they captured with them.

When every device is on an agent, the first source's agent is asked to run all of this
(``--via HOST:PORT`` names another); one started with ``--orchestrate`` on this machine
does, and the command is its thin client (:mod:`vfmig.cli.via`, ADR 0010): it imports
neither trio nor the engine, and copies the run's journal here once the agent has merged
it. Otherwise (or with ``--no-via``) the command runs the migration itself.

This module starts fast: trio and the engine are imported only when the command runs, and
textual never.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from vfmig.cli.link_options import add_link_arguments, client_tls
from vfmig.core.errors import UsageError, VfmigError
from vfmig.core.spec import parse_spec

if TYPE_CHECKING:
    import argparse
    import ssl
    from collections.abc import Callable

    from vfmig.cli.context import Environment
    from vfmig.cli.progress import ProgressDisplay
    from vfmig.core.options import RunOptions
    from vfmig.core.spec import DeviceSpec
    from vfmig.engine.bus import Subscription
    from vfmig.engine.orchestrator import Orchestrator, RunReport
    from vfmig.journal.writer import JournalWriter

#: Step timeout (seconds) when --timeout is not given.
DEFAULT_STEP_TIMEOUT = 30.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from pathlib import Path

    parser = sub.add_parser(
        "migrate",
        help="migrate devices from sources to destinations (live, with precopy)",
        description="Migrate each SRC device's state to its DST device: precopy while the "
        "source runs (when both have PRE_COPY), stop-copy, then resume the destination. "
        "A spec with @HOST:PORT names a device of the agent there (vfmig agent); device "
        "data flows directly between agents. On failure or Ctrl-C before the commit point "
        "every device is brought back.",
    )
    parser.add_argument(
        "devices",
        nargs="+",
        metavar="SRC DST",
        help="device specs in pairs: KIND:NAME[,key=value]...[@HOST:PORT]",
    )
    add_link_arguments(parser, key_required=False)
    parser.add_argument(
        "--downtime-limit",
        type=_positive,
        default=300.0,
        metavar="MS",
        help="switch over once the stop-copy transfer is estimated within this (default 300)",
    )
    parser.add_argument(
        "--max-precopy",
        type=_positive,
        default=120.0,
        metavar="SECONDS",
        help="switch over after this much precopy at the latest (default 120)",
    )
    parser.add_argument("--no-precopy", action="store_true", help="stop-copy only")
    parser.add_argument(
        "--allow-no-p2p",
        action="store_true",
        help="allow a multi-device run although a device lacks P2P",
    )
    parser.add_argument(
        "--compress-level",
        type=_level,
        default=-1,
        metavar="N",
        help="zstd level for device data, -7..22, or 'none' (default -1)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_STEP_TIMEOUT,
        metavar="SECONDS",
        help="a device step (ioctl, data read or write) taking longer counts as hung "
        f"(default {DEFAULT_STEP_TIMEOUT:g})",
    )
    parser.add_argument(
        "--journal",
        type=Path,
        metavar="PATH",
        help="journal the run into PATH (a new file; default: the journal store)",
    )
    parser.add_argument(
        "--journal-data",
        action="store_true",
        help="journal the device streams too (an agent captures its destinations' streams, "
        "merged in after the run; vfmig load re-drives them)",
    )
    parser.add_argument(
        "--keep-journals",
        type=_count,
        default=None,
        metavar="N",
        help="the journal store keeps the newest N journals (default 20)",
    )
    hosting = parser.add_mutually_exclusive_group()
    hosting.add_argument(
        "--via",
        metavar="HOST:PORT",
        help="have the agent there run the migration (vfmig agent --orchestrate): this "
        "command then only asks, shows and copies the journal; every device must be on an "
        "agent (default: the first source's agent, if it orchestrates on this machine)",
    )
    hosting.add_argument(
        "--no-via",
        action="store_true",
        help="run the migration in this command even when the source's agent would",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON envelope")
    parser.set_defaults(run=run)


def _count(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def _positive(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _level(text: str) -> int | None:
    import argparse

    if text == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a zstd level or 'none'") from None
    from vfmig.core.options import MAX_LEVEL, MIN_LEVEL

    if not MIN_LEVEL <= value <= MAX_LEVEL:
        raise argparse.ArgumentTypeError(f"{value} is outside {MIN_LEVEL}..{MAX_LEVEL}")
    return value


def pairs_of(texts: list[str]) -> list[tuple[DeviceSpec, DeviceSpec]]:
    """SRC DST SRC DST ... as parsed pairs (UsageError for an odd count)."""
    if len(texts) % 2:
        raise UsageError(
            f"devices come in pairs, SRC DST, but {len(texts)} were given",
            hint="vfmig migrate sim:a sim:b  (add @HOST:PORT for a device of an agent)",
        )
    specs = [parse_spec(text) for text in texts]
    return list(zip(specs[::2], specs[1::2], strict=True))


def run(args: argparse.Namespace, env: Environment) -> int:
    pairs = pairs_of(args.devices)
    options = _options(args)
    remote = any(spec.remote for pair in pairs for spec in pair)
    key: bytes | None = None
    if args.key_file is not None:
        from vfmig.engine.keys import load_key

        key = load_key(args.key_file)
    elif remote:
        raise UsageError(
            "devices of agents (@HOST:PORT) need the shared key: --key-file PATH",
            hint="create one with 'vfmig keygen PATH' and give the same file to every agent",
        )
    tls = client_tls(args)
    if args.journal is not None and args.keep_journals is not None:
        raise UsageError("--keep-journals is for the journal store: not with --journal PATH")
    if args.journal is not None and args.journal.exists():  # checked again at creation
        raise UsageError(f"{args.journal} exists: journals are never overwritten")
    journal: list[str] = []  # the run's journal, once created
    try:
        result_summary = None
        host = args.via or hosting_agent(pairs, args.no_via)
        if host is not None:
            result_summary = _via(args, env, host, pairs, options, key, tls, journal)
        if result_summary is None:
            import trio

            result_summary = trio.run(_migrate, args, env, pairs, options, key, tls, journal)
    except VfmigError as exc:
        if not args.json:
            raise
        error = {"outcome": None, "message": exc.message, "hint": exc.hint}
        if journal:
            error["journal"] = journal[0]
        env.emit_json("migrate", None, error=error)
        return int(exc.exit_status)
    return _finish(env, *result_summary, args)


def hosting_agent(pairs: list[tuple[DeviceSpec, DeviceSpec]], refused: bool) -> str | None:
    """The agent to ask to host the run: the first source's, when every device is on an
    agent; None if ``refused`` (--no-via). It hosts it only if it runs on this machine
    (:mod:`vfmig.cli.via`)."""
    addresses = [spec.address for pair in pairs for spec in pair]
    if refused or None in addresses:
        return None
    return addresses[0]


def _via(
    args: argparse.Namespace,
    env: Environment,
    host: str,
    pairs: list[tuple[DeviceSpec, DeviceSpec]],
    options: RunOptions,
    key: bytes | None,
    tls: ssl.SSLContext | None,
    journal: list[str],
) -> tuple[dict[str, Any], Callable[[], None] | None] | None:
    """The run, hosted by the agent at ``host`` (:mod:`vfmig.cli.via`): asked with
    ``--via``, or else probed (None: it will not host it)."""
    from vfmig.cli.via import HostedRunError, NoHost, run_via

    here = [str(spec) for pair in pairs for spec in pair if not spec.remote]
    if here:
        raise UsageError(
            f"--via runs the migration on an agent: every device needs its @HOST:PORT "
            f"({here[0]} has none)"
        )
    assert key is not None  # remote devices need it
    try:
        return run_via(
            host,
            env,
            args.devices,
            options,
            key=key,
            tls=tls,
            json=args.json,
            journal=args.journal,
            keep=args.keep_journals,
            probe=args.via is None,
        )
    except NoHost:
        return None
    except HostedRunError as exc:
        if exc.journal is not None:
            journal.append(exc.journal)
        raise


def _options(args: argparse.Namespace) -> RunOptions:
    from vfmig.core.options import RunOptions

    return RunOptions(
        downtime_limit_ms=args.downtime_limit,
        max_precopy_s=args.max_precopy,
        precopy=not args.no_precopy,
        allow_no_p2p=args.allow_no_p2p,
        compress_level=args.compress_level,
        step_timeout_s=args.timeout,
        journal_data=args.journal_data,
    )


def _finish(
    env: Environment,
    result: dict[str, Any],
    summary: Callable[[], None] | None,
    args: argparse.Namespace,
) -> int:
    """Say how the run ended (``result`` as :func:`~vfmig.engine.journaled.report_result`
    gives it, with its journal); ``summary`` prints the display's summary first."""
    if args.json:
        env.emit_json("migrate", result, error=_json_error(result))
    else:
        if summary is not None:
            summary()
        _print_errors(env, result)
        if "hosted_by" in result:
            env.print(f"hosted by the agent at {result['hosted_by']}")
        host = result.get("journal_host")  # left on the hosting agent's host
        env.print(f"journal: {f'{host}:' if host else ''}{result['journal']}")
        if host is not None and host != socket.gethostname():
            env.print(f"  copy it here: {_fetch_command(args, result)}")
    return int(result["exit_status"])


def _fetch_command(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """The ``vfmig journal fetch`` that copies the journal of a run an agent hosted."""
    import shlex

    words = ["vfmig", "journal", "fetch", result["hosted_by"], result["run"]]
    words += ["--key-file", str(args.key_file)]
    for option in ("tls_cert", "tls_key", "tls_ca"):
        if getattr(args, option) is not None:
            words += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return shlex.join(words)


def _open_journal(
    args: argparse.Namespace, pairs: list[tuple[DeviceSpec, DeviceSpec]], run_id: str
) -> JournalWriter:
    """The run's journal writer (``--journal PATH`` or the store), on the bus's clock."""
    from vfmig.engine.journaled import orchestrator_header
    from vfmig.journal.store import DEFAULT_KEEP, JournalStore
    from vfmig.journal.writer import JournalWriter

    header, clock = orchestrator_header(pairs, run_id, data=bool(args.journal_data))
    if args.journal is not None:
        return JournalWriter.create(args.journal, header, mono_clock=clock)
    store = JournalStore(keep=args.keep_journals or DEFAULT_KEEP)
    return store.create(header, mono_clock=clock)


async def _migrate(
    args: argparse.Namespace,
    env: Environment,
    pairs: list[tuple[DeviceSpec, DeviceSpec]],
    options: RunOptions,
    key: bytes | None,
    tls: ssl.SSLContext | None,
    journal: list[str],
) -> tuple[dict[str, Any], Callable[[], None] | None]:
    import secrets
    import signal
    from functools import partial

    import trio

    from vfmig.core.events import summarize
    from vfmig.core.model import by_device
    from vfmig.engine.journaled import agent_endpoints, report_result, run_journaled
    from vfmig.engine.orchestrator import LOCAL
    from vfmig.journal.runs import DataCapture

    run_id = secrets.token_hex(8)
    writer = _open_journal(args, pairs, run_id)  # the header is synced: a few ms
    journal.append(str(writer.path))

    endpoints = agent_endpoints(pairs, key=key, tls=tls)

    def warn(line: str) -> None:
        print(f"vfmig: warning: {line}", file=env.stderr)

    names = {dev: str(spec) for dev, spec in by_device(pairs).items()}
    shown: list[ProgressDisplay] = []  # created at the first event: none if nothing happened
    watchers = []
    if not args.json:
        from vfmig.cli.progress import ProgressDisplay  # rich: not for --json

        make = partial(ProgressDisplay, env, live=env.stdout_isatty, names=names)
        watchers.append(partial(_show, make, shown))
    report: RunReport | None = None
    failure: Exception | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            if any(not spec.remote for pair in pairs for spec in pair):
                # Device backends are loaded only when this process serves devices.
                from vfmig.engine.agent import AgentConfig
                from vfmig.engine.local import LocalAgent

                capture = DataCapture(writer) if args.journal_data else None
                local = LocalAgent(
                    AgentConfig(
                        name="local",
                        key=key,
                        step_timeout=options.step_timeout_s,
                        client_ssl=tls,
                        journal=capture,
                    )
                )
                await nursery.start(local.run)
                endpoints[LOCAL] = local.endpoint()
            try:
                report = await run_journaled(
                    pairs,
                    endpoints,
                    options,
                    writer,
                    run_id=run_id,
                    warn=warn,
                    watchers=watchers,
                    controllers=[partial(_on_signals, signals)],
                )
            except Exception as exc:  # re-raised outside the nursery (a VfmigError)
                failure = exc
            nursery.cancel_scope.cancel()
    if failure is not None:
        for display in shown:
            display.close(None)
        raise failure
    assert report is not None
    tally = report.tally
    summary = (lambda: shown[0].close(summarize(tally))) if shown else None
    return {**report_result(report), "journal": journal[0]}, summary


async def _on_signals(signals: Any, orchestrator: Orchestrator) -> None:
    import signal

    async for number in signals:
        name = signal.Signals(number).name
        await orchestrator.abort("interrupted by the user", name)


async def _show(
    make: Callable[[], ProgressDisplay], shown: list[ProgressDisplay], subscription: Subscription
) -> None:
    """Feed the display until the bus closes (lagging, it skips records: the summary at the
    end comes from the orchestrator's complete tally)."""
    from vfmig.engine.bus import Record

    async for item in subscription:
        if isinstance(item, Record):
            if not shown:
                shown.append(make())
            shown[0].handle(item.event, at_ns=item.at_ns)


def _print_errors(env: Environment, result: dict[str, Any]) -> None:
    """One line per error a failed run met (device, phase, step, errno, explanation)."""
    errors = result["errors"]
    if result["outcome"] == "completed" and not errors:
        return
    for error in errors:
        who = f"{error['device']} ({error['spec']}): " if error["device"] else ""
        code = f" ({error['errno_name']})" if error["errno"] is not None else ""
        where = error["phase"]
        if error["step"] != where:
            where += f": {error['step']}"
        print(f"vfmig: error: {who}{where}: {error['message']}{code}", file=env.stderr)
        if error["hint"]:
            print(f"hint: {error['hint']}", file=env.stderr)
    if errors:  # the summary would repeat the first of them: the outcome says enough
        many = f" ({len(errors)} errors)" if len(errors) > 1 else ""
        print(f"vfmig: {result['outcome']}{many}", file=env.stderr)
    else:
        print(f"vfmig: {result['summary']}", file=env.stderr)


def _json_error(result: dict[str, Any]) -> dict[str, Any] | None:
    if result["outcome"] == "completed":
        return None
    return {"outcome": result["outcome"], "message": result["summary"]}
