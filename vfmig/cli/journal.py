"""``vfmig journal verify|info|merge|export|diagnose|fetch``: look after flight-recorder journals.

A JOURNAL argument is a path, or ``@last`` for the newest journal of the default store
(``$XDG_STATE_HOME/vfmig``, ``/var/lib/vfmig`` for root). Exit statuses: ``verify`` 0 for
an intact journal and 1 for a damaged, cut-short or unclosed one; ``diagnose`` 0 when the
run completed and 1 otherwise; the others 0 unless the journal cannot be read.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import socket
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from vfmig.cli.link_options import add_link_arguments
from vfmig.core.diagnose import Diagnoser
from vfmig.core.errors import ExitStatus, JournalError, UsageError
from vfmig.core.events import Event, Summary, to_record
from vfmig.core.view import format_bytes
from vfmig.journal import parts
from vfmig.journal.codec import (
    ClosedRecord,
    DataRecord,
    EventRecord,
    JournalHeader,
    SnapshotRecord,
)
from vfmig.journal.merge import merge
from vfmig.journal.reader import JournalReader, ReadStatus
from vfmig.journal.store import JournalStore

if TYPE_CHECKING:
    import argparse

    from vfmig.cli.context import Environment
    from vfmig.core.diagnose import Diagnosis

LAST = "@last"


# --- helpers shared with vfmig replay and vfmig load ------------------------------------------


def journal_path(text: str) -> Path:
    """A JOURNAL argument: a path, or ``@last`` (the newest journal of the default store)."""
    if text == LAST:
        return JournalStore().latest()
    return Path(text)


def open_journal(text: str) -> JournalReader:
    return JournalReader(journal_path(text))


def wall_text(wall_ns: int) -> str:
    when = _dt.datetime.fromtimestamp(wall_ns / 1e9, tz=_dt.UTC)
    return f"{when:%Y-%m-%d %H:%M:%S.%f}"[:-3] + " UTC"


def header_json(h: JournalHeader) -> dict[str, Any]:
    return {
        "schema_version": h.schema_version,
        "vfmig": h.vfmig,
        "host": h.host,
        "role": h.role,
        "run_id": h.run_id,
        "kernel": h.kernel,
        "start_wall_ns": h.start_wall_ns,
        "start_mono_ns": h.start_mono_ns,
        "data": h.data,
        "devices": [
            {"id": str(d.id), "spec": d.spec, "identity": d.identity, "flags": int(d.flags)}
            for d in h.devices
        ],
        "merged_from": [dict(m) for m in h.merged_from],
    }


def event_json(event: Event) -> dict[str, Any]:
    """``{"type", "tag", "fields"}``: field values as the journal holds them."""
    names = [f.name for f in dataclasses.fields(event)]
    record = to_record(event)
    return {
        "type": type(event).__name__,
        "tag": record[0],
        "fields": dict(zip(names, record[1:], strict=True)),
    }


def summary_json(summary: Summary) -> dict[str, Any]:
    def transfer(t: Any) -> dict[str, Any]:
        return {
            "time_ns": t.time_ns,
            "raw_bytes": t.raw_bytes,
            "wire_bytes": t.wire_bytes,
            "throughput": t.throughput,
            "ratio": t.ratio,
        }

    downtime = summary.downtime
    return {
        "outcome": summary.outcome.value if summary.outcome else None,
        "total_ns": summary.total_ns,
        "devices": {str(d): transfer(t) for d, t in summary.devices.items()},
        "phases": {p.value: transfer(t) for p, t in summary.phases.items()},
        "downtime": (
            {f.name: getattr(downtime, f.name) for f in dataclasses.fields(downtime)}
            | {"total_ns": downtime.total_ns}
            if downtime is not None
            else None
        ),
    }


def status_json(status: ReadStatus) -> dict[str, Any]:
    damage = status.damage
    return {
        "intact": status.intact,
        "closed": status.closed,
        "frames": status.frames,
        "records": status.records,
        "last_seq": status.last_seq,
        "last_at_ns": status.last_at_ns,
        "last_wall_ns": status.last_wall_ns,
        "gaps": [{"expected": a, "found": b} for a, b in status.gaps],
        "damage": (
            {"offset": damage.offset, "reason": damage.reason, "truncated": damage.truncated}
            if damage
            else None
        ),
    }


def status_lines(status: ReadStatus, start_mono_ns: int) -> list[str]:
    """What is wrong with a journal, in words; empty for an intact one."""
    if status.last_seq is None:
        good = "no record is readable"
    else:
        at = (status.last_at_ns or 0) - start_mono_ns
        wall = wall_text(status.last_wall_ns or 0)
        good = f"good up to record {status.last_seq} at +{at / 1e9:.3f} s ({wall})"
    lines = []
    damage = status.damage
    if damage is not None:
        kind = "cut short" if damage.truncated else "damaged"
        lines.append(f"{kind} at byte {damage.offset}: {damage.reason}; {good}")
    for expected, found in status.gaps:
        lines.append(f"records {expected}..{found - 1} are missing (a frame was lost)")
    if damage is None and not status.closed:
        lines.append(
            f"ends without its closing record: the writer stopped (crash, kill, power loss) "
            f"or is still writing; {good}"
        )
    return lines


# --- the commands ------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "journal",
        help="verify, describe, merge, export or diagnose a flight-recorder journal",
        description="Work with vfmig's journals (docs/journal.md). JOURNAL is a path or "
        "@last, the newest journal of the default store.",
    )
    commands = parser.add_subparsers(dest="journal_command", metavar="ACTION", required=True)

    verify = commands.add_parser(
        "verify",
        help="check integrity, truncation and gaps (exit 1 when damaged)",
        description="Read every frame and record; say up to which record and time the "
        "journal is good. Exit 0 when intact and closed, 1 otherwise.",
    )
    verify.add_argument("journal", metavar="JOURNAL")
    verify.add_argument("--json", action="store_true", help="print a JSON envelope")
    verify.set_defaults(run=run_verify)

    info = commands.add_parser("info", help="the header, devices, counts and outcome")
    info.add_argument("journal", metavar="JOURNAL")
    info.add_argument("--json", action="store_true", help="print a JSON envelope")
    info.set_defaults(run=run_info)

    merge_ = commands.add_parser(
        "merge",
        help="merge journals of several hosts into one, on the first one's clock",
        description="Merge journals (agents', orchestrator's) into one; clock offsets "
        "between hosts come from paired chunk sends and receives.",
    )
    merge_.add_argument("inputs", metavar="JOURNAL", nargs="+")
    merge_.add_argument("-o", "--output", metavar="OUT", required=True, type=Path)
    merge_.add_argument("--json", action="store_true", help="print a JSON envelope")
    merge_.set_defaults(run=run_merge)

    export = commands.add_parser(
        "export",
        help="every record as JSON Lines",
        description="Write the header, then one JSON object per record (JSON Lines). Data "
        "records show their device, offset and length; --data adds the bytes as hex.",
    )
    export.add_argument("journal", metavar="JOURNAL")
    fmt = export.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--json", action="store_true", help="JSON Lines")
    export.add_argument("--data", action="store_true", help="include raw data bytes (hex)")
    export.add_argument("-o", "--output", metavar="FILE", type=Path, help="default: stdout")
    export.set_defaults(run=run_export)

    diagnose = commands.add_parser(
        "diagnose",
        help="what went wrong, where, and the likely cause",
        description="The first failure (device, phase, arc, errno), the device's state "
        "before and after by ioctl and by debugfs, and the likely cause from the table of "
        "known causes. Exit 0 when the run completed, 1 otherwise.",
    )
    diagnose.add_argument("journal", metavar="JOURNAL")
    diagnose.add_argument("--json", action="store_true", help="print a JSON envelope")
    diagnose.set_defaults(run=run_diagnose)

    fetch = commands.add_parser(
        "fetch",
        help="copy a finished journal from an agent's host",
        description="Copy the journal of run RUN from the agent at AGENT (HOST:PORT) into "
        "the journal store, under the agent's name for it, or to -o PATH: the journal of a "
        "run the agent hosted (for vfmig migrate; merged), or with --role agent the "
        "agent's own side of a run. The copy is checked before it takes its place.",
    )
    fetch.add_argument("agent", metavar="AGENT", help="the agent's HOST:PORT")
    fetch.add_argument("run_id", metavar="RUN", help="the run id (vfmig migrate prints it)")
    fetch.add_argument(
        "--role",
        choices=parts.ROLES,
        default=parts.ROLES[0],
        help="whose journal of the run (default orchestrator)",
    )
    fetch.add_argument("-o", "--output", metavar="PATH", type=Path, help="default: the store")
    add_link_arguments(fetch, key_required=True)
    fetch.add_argument("--json", action="store_true", help="print a JSON envelope")
    fetch.set_defaults(run=run_fetch)


def run_fetch(args: argparse.Namespace, env: Environment) -> int:
    from vfmig.cli import journal_fetch

    return journal_fetch.run(args, env)


def _scan(reader: JournalReader) -> dict[str, Any]:
    counts: dict[str, int] = {}
    data: dict[str, int] = {}
    snapshots = 0
    diagnoser = Diagnoser()
    for entry in reader.entries():
        if isinstance(entry, EventRecord):
            name = type(entry.event).__name__
            counts[name] = counts.get(name, 0) + 1
            diagnoser.feed(entry)
        elif isinstance(entry, DataRecord):
            key = str(entry.device)
            data[key] = data.get(key, 0) + len(entry.data)
        elif isinstance(entry, SnapshotRecord):
            snapshots += 1
    model = diagnoser.model
    return {
        "events": dict(sorted(counts.items())),
        "data_bytes": data,
        "snapshots": snapshots,
        "outcome": model.finished.outcome.value if model.finished else None,
        "summary": summary_json(model.summary),
        "duration_ns": model.summary.total_ns,
    }


def run_verify(args: argparse.Namespace, env: Environment) -> int:
    with open_journal(args.journal) as reader:
        for _ in reader.entries():
            pass
        status = reader.status
        recovered = None
        if status.damage is not None and not status.damage.truncated:
            recovered = reader.resync(status.damage.offset)
        problems = status_lines(status, reader.header.start_mono_ns)
        path = reader.path
        size = reader.size
    if recovered is not None and recovered[0]:
        frames, records, first, last = recovered
        problems.append(
            f"past the damage, {frames} frame(s) still check ({records} records, seq "
            f"{first}..{last}): 'vfmig journal export' cannot reach them"
        )
    ok = status.intact
    if args.json:
        result = status_json(status) | {"path": str(path), "bytes": size, "problems": problems}
        error = None if ok else {"type": "JournalDamaged", "message": problems[0], "hint": None}
        env.emit_json("journal verify", result, error=error)
    elif ok:
        env.print(
            f"{path}: intact: {status.records} records in {status.frames} frames, "
            f"closed by its writer"
        )
    else:
        env.print(f"{path}: NOT intact")
        for line in problems:
            env.print(f"  {line}")
    return int(ExitStatus.OK if ok else ExitStatus.FAILED)


def run_info(args: argparse.Namespace, env: Environment) -> int:
    with open_journal(args.journal) as reader:
        h = reader.header
        scan = _scan(reader)
        status = reader.status
        path, size = reader.path, reader.size
    if args.json:
        result = {
            "path": str(path),
            "bytes": size,
            "header": header_json(h),
            "status": status_json(status),
        } | scan
        env.emit_json("journal info", result)
        return 0
    env.print(
        f"journal   {path} ({format_bytes(size)}, schema {h.schema_version}, vfmig {h.vfmig})"
    )
    env.print(f"run       {h.run_id}: {h.role} on {h.host}, kernel {h.kernel}")
    env.print(f"started   {wall_text(h.start_wall_ns)}")
    for d in h.devices:
        identity = f" ({d.identity})" if d.identity else ""
        env.print(f"device    {d.id} {d.spec}{identity}")
    for m in h.merged_from:
        env.print(
            f"merged    {m.get('file')}: {m.get('role')} on {m.get('host')}, offset "
            f"{int(m.get('offset_ns', 0)) / 1e9:+.6f} s by {m.get('method')} "
            f"({m.get('pairs')} pairs)"
        )
    env.print(
        f"records   {status.records} in {status.frames} frames, {scan['snapshots']} snapshots"
    )
    env.print(
        f"duration  {scan['duration_ns'] / 1e9:.3f} s, outcome {scan['outcome'] or 'not recorded'}"
    )
    for dev, n in scan["data_bytes"].items():
        env.print(f"data      {dev}: {format_bytes(n)} of raw device data")
    env.print("events    " + ", ".join(f"{k} {v}" for k, v in scan["events"].items()))
    for line in status_lines(status, h.start_mono_ns):
        env.print(f"warning   {line}")
    return 0


def run_merge(args: argparse.Namespace, env: Environment) -> int:
    if len(args.inputs) < 2:
        raise UsageError("journal merge needs at least two journals")
    report = merge([journal_path(p) for p in args.inputs], args.output, host=socket.gethostname())
    if args.json:
        result = {
            "output": str(report.output),
            "records": report.records,
            "inputs": [
                {
                    "path": str(i.path),
                    "host": i.host,
                    "role": i.role,
                    "offset_ns": i.offset_ns,
                    "method": i.method,
                    "pairs": i.pairs,
                    "records": i.records,
                    "closed": i.closed,
                    "damage": i.damage.reason if i.damage else None,
                }
                for i in report.inputs
            ],
        }
        env.emit_json("journal merge", result)
        return 0
    for i in report.inputs:
        how = f"{i.method}, {i.pairs} chunk pairs" if i.method == "chunk pairs" else i.method
        env.print(f"{i.path}: {i.host} ({i.role}), offset {i.offset_ns / 1e9:+.6f} s ({how})")
        if i.damage is not None:
            env.print(f"  read up to its damage: {i.damage.reason}")
        elif not i.closed:
            env.print("  ends without its closing record")
    env.print(f"wrote {report.records} records to {report.output}")
    return 0


def run_export(args: argparse.Namespace, env: Environment) -> int:
    with open_journal(args.journal) as reader:
        out: IO[str]
        if args.output is not None:
            try:
                out = open(args.output, "x", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise JournalError(f"cannot create {args.output}: {exc.strerror}") from None
        else:
            out = env.stdout
        try:
            _export(reader, out, with_data=args.data)
        finally:
            if args.output is not None:
                out.close()
        problems = status_lines(reader.status, reader.header.start_mono_ns)
    for line in problems:
        print(f"vfmig: warning: {line}", file=env.stderr)
    return 0


def _export(reader: JournalReader, out: Any, *, with_data: bool) -> None:
    def line(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj, separators=(",", ":")) + "\n")

    line({"type": "header"} | header_json(reader.header))
    for entry in reader.entries():
        base = {
            "seq": entry.seq,
            "at_ns": entry.at_ns,
            "wall_ns": entry.wall_ns,
            "origin": entry.origin,
        }
        if isinstance(entry, EventRecord):
            line(base | event_json(entry.event))
        elif isinstance(entry, DataRecord):
            data = {"device": str(entry.device), "offset": entry.offset, "length": len(entry.data)}
            if with_data:
                data["hex"] = entry.data.hex()
            line(base | {"type": "data"} | data)
        elif isinstance(entry, SnapshotRecord):
            line(base | {"type": "snapshot"})
        elif isinstance(entry, ClosedRecord):
            line(base | {"type": "closed", "records": entry.records})


def diagnosis_json(d: Diagnosis) -> dict[str, Any]:
    def seen(s: Any) -> dict[str, Any] | None:
        if s is None:
            return None
        return {"ioctl": s.ioctl.name if s.ioctl is not None else None, "debugfs": s.debugfs}

    return {
        "cause": d.cause,
        "title": d.known.title,
        "explanation": d.explanation,
        "hint": d.hint,
        "outcome": d.outcome.value if d.outcome else None,
        "device": str(d.device) if d.device else None,
        "phase": d.phase.value if d.phase else None,
        "step": d.step,
        "errno": d.errno,
        "error_cause": d.error_cause.value if d.error_cause else None,
        "message": d.message,
        "seq": d.seq,
        "at_ns": d.at_ns,
        "before": seen(d.before),
        "after": seen(d.after),
        "evidence": list(d.evidence),
        "errors_total": d.errors_total,
    }


def run_diagnose(args: argparse.Namespace, env: Environment) -> int:
    with open_journal(args.journal) as reader:
        diagnoser = Diagnoser()
        for entry in reader.entries():
            if isinstance(entry, EventRecord):
                diagnoser.feed(entry)
        result = diagnoser.result()
        problems = status_lines(reader.status, reader.header.start_mono_ns)
        start = reader.header.start_mono_ns
        path = reader.path
    if args.json:
        env.emit_json("journal diagnose", diagnosis_json(result) | {"journal": problems})
    else:
        env.print(f"{path}:")
        for line in result.lines(start):
            env.print(f"  {line}")
        for line in problems:
            env.print(f"  journal: {line}")
    return int(ExitStatus.FAILED if result.failed else ExitStatus.OK)
