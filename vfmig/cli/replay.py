"""``vfmig replay JOURNAL``: a recorded run as a readable timeline, then its summary.

Records are folded through :func:`vfmig.core.view.reduce`, the reducer the live display
uses, and each one is told by :func:`vfmig.core.view.timeline`: phases (with the previous
phase's bytes and throughput), every device's state changes, debugfs disagreeing with the
ioctl state, failed ioctls, decisions with their reasons, errors with hints, the end.
Times are seconds since the journal's start, then the host that observed the record.

Filters: ``--device D`` keeps what concerns that device (phases stay, for context);
``--phase P`` what happened during that phase; ``--since``/``--until`` a time window
(durations from the start: ``2.5s``, ``800ms``). ``--since`` starts from the journal's
last snapshot before that time instead of folding from the first record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vfmig.cli.journal import (
    event_json,
    header_json,
    open_journal,
    status_json,
    status_lines,
    summary_json,
    wall_text,
)
from vfmig.core.errors import UsageError
from vfmig.core.events import PhaseChanged
from vfmig.core.model import DeviceId, Phase
from vfmig.core.units import DURATION_EXAMPLES, parse_duration
from vfmig.core.view import RunView, concerns, from_snapshot, reduce, timeline
from vfmig.journal.codec import EventRecord, SnapshotRecord

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator

    from vfmig.cli.context import Environment
    from vfmig.journal.reader import JournalReader

NS_PER_S = 1_000_000_000


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "replay",
        help="show a recorded run as a timeline",
        description="Show a journal (a path, or @last for the newest in the default store) "
        "as a timeline: phases, state changes of every device, decisions, errors, "
        "throughput; then the run's summary.",
    )
    parser.add_argument("journal", metavar="JOURNAL")
    parser.add_argument("--device", metavar="D", help="only what concerns src<N> or dst<N>")
    parser.add_argument(
        "--phase", metavar="P", choices=[p.value for p in Phase], help="only during this phase"
    )
    parser.add_argument("--since", metavar="T", help="from T after the start (e.g. 2.5s)")
    parser.add_argument("--until", metavar="T", help="up to T after the start")
    parser.add_argument("--json", action="store_true", help="print a JSON envelope")
    parser.set_defaults(run=run)


def _offset_ns(option: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{option} {exc}", hint=DURATION_EXAMPLES) from None
    return int(seconds * NS_PER_S)


def _fold_from(
    reader: JournalReader, since_abs: int | None
) -> Iterator[tuple[RunView, EventRecord]]:
    """(model before, record) for every event record, starting at the last snapshot before
    ``since_abs`` when there is a usable one."""
    start = reader.snapshot_before(since_abs) if since_abs is not None else None
    model = RunView()
    for entry in reader.entries(start):
        if isinstance(entry, SnapshotRecord) and start is not None and model.records == 0:
            try:
                model = from_snapshot(entry.state)
            except ValueError:
                yield from _fold_from(reader, None)  # not usable: fold from the start
                return
        elif isinstance(entry, EventRecord):
            yield model, entry
            model = reduce(model, entry)


def run(args: argparse.Namespace, env: Environment) -> int:
    device = None
    if args.device is not None:
        try:
            device = DeviceId.parse(args.device)
        except ValueError as exc:
            raise UsageError(f"--device: {exc}") from None
    phase = Phase(args.phase) if args.phase else None
    since = _offset_ns("--since", args.since)
    until = _offset_ns("--until", args.until)
    items: list[dict[str, Any]] = []
    with open_journal(args.journal) as reader:
        h = reader.header
        start = h.start_mono_ns
        if not args.json:
            started = wall_text(h.start_wall_ns)
            env.print(f"{reader.path}: run {h.run_id}, {h.role} on {h.host}, started {started}")
            for d in h.devices:
                env.print(f"  {d.id} = {d.spec}")
        model = RunView()
        for before, record in _fold_from(reader, None if since is None else start + since):
            model = reduce(before, record)
            at = record.at_ns - start
            if until is not None and at > until:
                model = before
                break
            if since is not None and at < since:
                continue
            event = record.event
            during = event.phase if isinstance(event, PhaseChanged) else before.phase
            if phase is not None and during is not phase:
                continue
            if device is not None and not (
                isinstance(event, PhaseChanged) or concerns(event, device)
            ):
                continue
            lines = timeline(before, record)
            if not lines:
                continue
            if args.json:
                items.append(
                    {
                        "t_ns": at,
                        "seq": record.seq,
                        "wall_ns": record.wall_ns,
                        "host": record.origin,
                        "lines": lines,
                        "event": event_json(event),
                    }
                )
            else:
                for line in lines:
                    env.print(f"{at / NS_PER_S:10.3f}s  {record.origin:<12} {line}")
        status = reader.status
        problems = status_lines(status, start)
    if args.json:
        result = {
            "header": header_json(h),
            "timeline": items,
            "summary": summary_json(model.summary),
            "status": status_json(status),
            "problems": problems,
        }
        env.emit_json("replay", result)
        return 0
    _print_summary(env, model, {str(d.id): d.spec for d in h.devices})
    for line in problems:
        env.print(f"journal: {line}")
    return 0


def _print_summary(env: Environment, model: RunView, names: dict[str, str]) -> None:
    from rich.console import Console

    from vfmig.cli.progress import PLAIN_WIDTH, render_summary, short_name

    console = Console(
        file=env.stdout,
        force_terminal=False,
        no_color=True,
        highlight=False,
        emoji=False,
        width=PLAIN_WIDTH,
    )
    env.print("")

    def name(dev: DeviceId) -> str:
        spec = names.get(str(dev))
        return f"{dev} {short_name(spec)}" if spec else str(dev)

    for piece in render_summary(model.summary, name, ascii=True):
        console.print(piece, markup=False, highlight=False)
