"""``vfmig fsm``: the kernel's migration state machine, as data or explained for a person.

    vfmig fsm [--flags F]              one grid per flag set: the steps of every request
    vfmig fsm --json [--flags F]       every (flags, from, to) as a bare JSON list (the
                                       format fixed by the issue: no envelope, 256 objects)
    vfmig fsm --dot [--flags F]        Graphviz of the single arcs a driver executes
    vfmig fsm path FROM TO [--flags F] [--json]
                                       one request explained: its arcs, what each does to
                                       the data fd, and why the kernel or vfmig refuses it

Everything is computed from :mod:`vfmig.core.fsm`; nothing touches a device. States are
accepted as uAPI names (any case, ``VFIO_DEVICE_STATE_`` prefix optional, ``-`` for ``_``),
the abbreviations of the kernel table (ST, RU, SC, RS, RP, PC, PP, ER) or numbers; flags as
``stop-copy+p2p+pre-copy`` or ``STOP_COPY+P2P+PRE_COPY`` (default: all three).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from vfmig.core import fsm
from vfmig.core.errors import UsageError, errno_name
from vfmig.core.fsm import ArcEffect, DeviceState, MigrationFlags

if TYPE_CHECKING:
    from vfmig.cli.context import Environment

#: The abbreviations of the kernel table as vfio-migration.md §2 prints it.
ABBREVIATIONS: dict[DeviceState, str] = {
    DeviceState.ERROR: "ER",
    DeviceState.STOP: "ST",
    DeviceState.RUNNING: "RU",
    DeviceState.STOP_COPY: "SC",
    DeviceState.RESUMING: "RS",
    DeviceState.RUNNING_P2P: "RP",
    DeviceState.PRE_COPY: "PC",
    DeviceState.PRE_COPY_P2P: "PP",
}
ALL_FLAGS = fsm.FLAG_SETS[-1]
#: ``device_state`` is a ``__u32`` in the uAPI: the largest target a SET can carry.
U32_MAX = 2**32 - 1

STATE_HINT = (
    "states: ERROR STOP RUNNING STOP_COPY RESUMING RUNNING_P2P PRE_COPY PRE_COPY_P2P "
    "(any case), ST RU SC RS RP PC PP ER, or 0-7"
)
FLAGS_HINT = "flags: stop-copy, p2p, pre-copy joined by '+', e.g. --flags stop-copy+p2p"

FD_WORDS = {
    ArcEffect.NONE: "no data fd",
    ArcEffect.OPENS_SAVING: "opens a saving data fd",
    ArcEffect.OPENS_RESUMING: "opens a resuming data fd",
    ArcEffect.CONTINUES: "keeps the saving data fd",
    ArcEffect.ENDS: "closes the data fd",
}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "fsm",
        help="the kernel's migration state machine",
        usage="vfmig fsm [-h] [--json | --dot] [--flags FLAGS] [path FROM TO [--json]]",
        description="The kernel's VFIO migration v2 state machine: every request's path for "
        "every flag set (a grid, --json or --dot), or one request explained (fsm path).",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--json",
        action="store_true",
        help="one object per (flags, from, to): the kernel's path and errno, and vfmig's refusal",
    )
    output.add_argument(
        "--dot", action="store_true", help="Graphviz of the single arcs for one flag set"
    )
    parser.add_argument(
        "--flags",
        metavar="FLAGS",
        help="the device's migration flags, e.g. stop-copy+p2p (default: every flag set; "
        "stop-copy+p2p+pre-copy for --dot)",
    )
    parser.set_defaults(run=run, fsm_command=None)
    commands = parser.add_subparsers(dest="fsm_command", metavar="{path}")
    explain = commands.add_parser(
        "path",
        help="explain one request",
        description="Explain one SET of the device state: the arcs the kernel walks, what "
        "each does to the data fd, whether the SET returns one, and why it is refused.",
        epilog=STATE_HINT + "; " + FLAGS_HINT,
    )
    explain.add_argument("from_state", metavar="FROM", help="the state the device is in")
    explain.add_argument("to_state", metavar="TO", help="the requested state (any u32)")
    # SUPPRESS: when absent here, an option given before 'path' is kept.
    explain.add_argument(
        "--flags",
        metavar="FLAGS",
        default=argparse.SUPPRESS,
        help="the device's migration flags (default: stop-copy+p2p+pre-copy)",
    )
    explain.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="the explanation in vfmig's versioned JSON envelope",
    )


# --- input -------------------------------------------------------------------------------


def parse_state(text: str, *, role: str, beyond: bool = False) -> int:
    """A state by name, abbreviation or number; ``beyond`` admits any u32 (a SET's target)."""
    word = text.strip()
    if word.isdigit():
        value = int(word)
        limit = U32_MAX if beyond else fsm.NUM_STATES - 1
        if value > limit:
            raise UsageError(
                f"{role} state {text!r} is out of range (0-{limit})",
                hint=STATE_HINT if not beyond else None,
            )
        return DeviceState(value) if value < fsm.NUM_STATES else value
    name = word.upper().replace("-", "_").removeprefix("VFIO_DEVICE_STATE_")
    if name in DeviceState.__members__:
        return DeviceState[name]
    for state, abbreviation in ABBREVIATIONS.items():
        if name == abbreviation:
            return state
    raise UsageError(f"unknown {role} state {text!r}", hint=STATE_HINT)


def parse_flags(text: str | None) -> MigrationFlags:
    """``stop-copy+p2p`` style (also ``STOP_COPY``, ``VFIO_MIGRATION_P2P``, ``,`` or ``|``)."""
    if text is None:
        return ALL_FLAGS
    flags = MigrationFlags(0)
    for part in text.replace(",", "+").replace("|", "+").split("+"):
        name = part.strip().upper().replace("-", "_").removeprefix("VFIO_MIGRATION_")
        if not name:
            raise UsageError(f"an empty migration flag in {text!r}", hint=FLAGS_HINT)
        if name not in MigrationFlags.__members__:
            raise UsageError(
                f"unknown migration flag {part.strip()!r} in {text!r}", hint=FLAGS_HINT
            )
        flags |= MigrationFlags[name]
    if MigrationFlags.STOP_COPY not in flags:
        raise UsageError(
            f"flags {text!r} lack stop-copy, which every migratable device has",
            hint=f"did you mean --flags stop-copy+{text}?",
        )
    return flags


def flag_list(flags: MigrationFlags) -> list[str]:
    return [f.name for f in MigrationFlags if f in flags and f.name is not None]


def state_name(state: int) -> str:
    return DeviceState(state).name if 0 <= state < fsm.NUM_STATES else str(state)


# --- vfmig fsm [--json | --dot] ----------------------------------------------------------


def table(flag_sets: tuple[MigrationFlags, ...] = fsm.FLAG_SETS) -> list[dict[str, Any]]:
    """Every (flag set, from, to) with the kernel's answer and vfmig's own refusal."""
    rows: list[dict[str, Any]] = []
    for flags in flag_sets:
        names = flag_list(flags)
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


def cell(cur: DeviceState, new: DeviceState, flags: MigrationFlags) -> str:
    """One grid cell: the steps (``RP>ST>SC``), ``*`` if the SET returns a new data fd."""
    if cur == new:
        return "="
    result = fsm.plan(cur, new, flags)
    if result.kernel.errno is not None:
        blocked = (cur, new) in fsm.VFMIG_REFUSALS and fsm.supports(new, flags)
        return "blocked" if blocked else "-"
    steps = ">".join(ABBREVIATIONS[s] for s in result.kernel.states)
    return steps + ("*" if result.opens is not None else "")


GRID_LEGEND = """\
Every SET of the device state, per device flag set: row = current state, column = target.
A cell lists the states the kernel steps through (the last one is the target);
* the SET returns a new data fd; = already there (succeeds, no step);
- EINVAL (ERROR, or a state the device lacks); blocked: EINVAL since the 2026 fix,
  a kernel that never returns before it. vfmig refuses every - and blocked request.
ST STOP  RU RUNNING  SC STOP_COPY  RS RESUMING  RP RUNNING_P2P  PC PRE_COPY
PP PRE_COPY_P2P  ER ERROR"""


def grid(flags: MigrationFlags) -> list[str]:
    cells = {(c, n): cell(c, n, flags) for c in DeviceState for n in DeviceState}
    widths = {n: max(len(cells[(c, n)]) for c in DeviceState) + 2 for n in DeviceState}
    lines = [
        f"flags {fsm.flag_names(flags)}",
        ("from\\to " + "".join(f"{ABBREVIATIONS[n]:<{widths[n]}}" for n in DeviceState)).rstrip(),
    ]
    for cur in DeviceState:
        row = "".join(f"{cells[(cur, new)]:<{widths[new]}}" for new in DeviceState)
        lines.append(f"{ABBREVIATIONS[cur]:<8}{row}".rstrip())
    return lines


def dot(flags: MigrationFlags) -> str:
    """Graphviz of the single arcs of ``flags`` (from the table), blocked arcs in red."""
    states = [s for s in DeviceState if fsm.supports(s, flags)]
    lines = [
        f"// vfmig fsm --dot --flags {fsm.flag_names(flags)}: generated from vfmig.core.fsm",
        "digraph vfio_migration {",
        f'  label="VFIO migration v2 arcs, device flags {fsm.flag_names(flags)}";',
        "  labelloc=t;",
        "  node [shape=box, style=rounded];",
    ]
    saving = [s for s in states if s in fsm.SAVING_STATES]
    lines.append('  subgraph cluster_saving { label="saving data fd"; style=dashed;')
    lines.extend(f"    {s.name};" for s in saving)
    lines.append("  }")
    lines.extend(f"  {s.name};" for s in states if s not in fsm.SAVING_STATES)
    style: dict[ArcEffect, str] = {
        ArcEffect.OPENS_SAVING: ", color=darkgreen, style=bold",
        ArcEffect.OPENS_RESUMING: ", color=blue, style=bold",
        ArcEffect.CONTINUES: ", color=darkgreen",
        ArcEffect.ENDS: ", style=dashed",
    }
    for arc in fsm.driver_arcs(flags):
        edge = f"  {arc.src.name} -> {arc.dst.name}"
        if arc.effect is ArcEffect.NONE:
            lines.append(f"{edge};")
        else:
            label = FD_WORDS[arc.effect].replace(" data", "")
            lines.append(f'{edge} [label="{label}"{style[arc.effect]}];')
    for src, dst in fsm.VFMIG_REFUSALS:
        if fsm.supports(src, flags) and fsm.supports(dst, flags):
            lines.append(
                f'  {src.name} -> {dst.name} [label="blocked: EINVAL, hangs unfixed kernels", '
                "color=red, fontcolor=red, style=dotted, constraint=false];"
            )
    lines.append("}")
    return "\n".join(lines)


# --- vfmig fsm path ----------------------------------------------------------------------


def explain(cur: DeviceState, new: int, flags: MigrationFlags) -> dict[str, Any]:
    """One request as data: the result of ``fsm path --json``."""
    result = fsm.plan(cur, new, flags)
    opens = {ArcEffect.OPENS_SAVING: "saving", ArcEffect.OPENS_RESUMING: "resuming"}
    return {
        "flags": flag_list(flags),
        "from": cur.name,
        "to": state_name(new),
        "path": [s.name for s in result.kernel.states],
        "arcs": [
            {"from": a.src.name, "to": a.dst.name, "data_fd": a.effect.name.lower()}
            for a in result.kernel.arcs
        ],
        "returns_data_fd": None if result.opens is None else opens[result.opens],
        "errno": None if result.kernel.errno is None else errno_name(result.kernel.errno),
        "kernel_reason": fsm.kernel_refusal(cur, new, flags),
        "vfmig_refusal": result.refusal,
    }


def explain_text(cur: DeviceState, new: int, flags: MigrationFlags) -> list[str]:
    """One request for a person: the kernel's arcs and data fd, or its refusal; vfmig's."""
    result = fsm.plan(cur, new, flags)
    arcs = result.kernel.arcs
    lines = [f"{cur.name} -> {state_name(new)} on a device with {fsm.flag_names(flags)}"]
    if result.kernel.errno is not None:
        lines.append(
            f"kernel: {errno_name(result.kernel.errno)}, the device stays in {cur.name}: "
            f"{fsm.kernel_refusal(cur, new, flags)}"
        )
    elif not arcs:
        lines.append("kernel: already there: the SET succeeds without a step (data_fd -1)")
    else:
        fd = {
            ArcEffect.OPENS_SAVING: "returns a new saving data fd",
            ArcEffect.OPENS_RESUMING: "returns a new resuming data fd",
            None: "returns no data fd (data_fd -1)",
        }[result.opens]
        count = "1 arc" if len(arcs) == 1 else f"{len(arcs)} arcs"
        lines.append(f"kernel: {count}, then the SET {fd}")
        labels = [f"{a.src.name} > {a.dst.name}" for a in arcs]
        width = max(len(label) for label in labels)
        lines.extend(
            f"  {i}. {label:<{width}}  {FD_WORDS[a.effect]}"
            for i, (label, a) in enumerate(zip(labels, arcs, strict=True), 1)
        )
        if len(arcs) > 1:
            lines.append(
                "  if the SET fails, the device may be at any state on this path: "
                "read it back (GET)"
            )
    verdict = "allows it" if result.allowed else f"refuses it: {result.refusal}"
    lines.append(f"vfmig: {verdict}")
    return lines


def run_path(args: argparse.Namespace, env: Environment) -> int:
    as_json: bool = args.json
    try:
        flags = parse_flags(args.flags)
        cur = DeviceState(parse_state(args.from_state, role="current"))
        new = parse_state(args.to_state, role="target", beyond=True)
    except UsageError as exc:
        if as_json:
            error = {"type": type(exc).__name__, "message": str(exc), "hint": exc.hint}
            env.emit_json("fsm path", None, error=error)
        raise
    if as_json:
        env.emit_json("fsm path", explain(cur, new, flags))
    else:
        for line in explain_text(cur, new, flags):
            env.print(line)
    return 0


def run(args: argparse.Namespace, env: Environment) -> int:
    if args.fsm_command == "path":
        if args.dot:
            raise UsageError("--dot draws every arc; it does not go with 'fsm path'")
        return run_path(args, env)
    if args.dot:
        env.print(dot(parse_flags(args.flags)))
        return 0
    flag_sets = fsm.FLAG_SETS if args.flags is None else (parse_flags(args.flags),)
    if args.json:
        json.dump(table(flag_sets), env.stdout, indent=1)
        env.stdout.write("\n")
        return 0
    env.print(GRID_LEGEND)
    for flags in flag_sets:
        env.print()
        for line in grid(flags):
            env.print(line)
    return 0
