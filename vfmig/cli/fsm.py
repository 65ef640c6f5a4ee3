"""``vfmig fsm``: the kernel's migration state machine, as data or explained for a person."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from vfmig.core import fsm
from vfmig.core.errors import errno_name
from vfmig.core.fsm import DeviceState, MigrationFlags

if TYPE_CHECKING:
    import argparse

    from vfmig.cli.context import Environment


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "fsm",
        help="the kernel's migration state machine",
        description="Print the kernel's VFIO migration v2 next-step table for every flag set.",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="one object per (flags, from, to): the kernel's path and errno, and vfmig's refusal",
    )
    parser.set_defaults(run=run)


def table() -> list[dict[str, Any]]:
    """Every (flag set, from, to) with the kernel's answer and vfmig's own refusal."""
    rows: list[dict[str, Any]] = []
    for flags in fsm.FLAG_SETS:
        names = [f.name for f in MigrationFlags if f in flags]
        for cur in DeviceState:
            for new in DeviceState:
                kernel = fsm.path(cur, new, flags)
                rows.append(
                    {
                        "flags": names,
                        "from": cur.name,
                        "to": new.name,
                        "path": [s.name for s in kernel.states],
                        "errno": None if kernel.errno is None else errno_name(kernel.errno),
                        "vfmig_refusal": fsm.vfmig_refusal(cur, new, flags),
                    }
                )
    return rows


def run(args: argparse.Namespace, env: Environment) -> int:
    rows = table()
    if args.json:
        json.dump(rows, env.stdout, indent=1)
        env.stdout.write("\n")
        return 0
    for row in rows:
        path = " > ".join(row["path"]) or ("-" if row["errno"] is None else row["errno"])
        env.print(f"{'+'.join(row['flags']):24} {row['from']:>12} -> {row['to']:<12} {path}")
    return 0
