"""``vfmig`` entry point: argparse, dispatch to one module per subcommand, errors to exit codes.

Each subcommand module has ``add_parser(subparsers)`` and ``run(args, env) -> int``.
A :class:`~vfmig.core.errors.VfmigError` becomes one line on stderr (plus its hint) and the
exit status of its class; anything else is a bug, shown as one line unless ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from typing import TYPE_CHECKING

from vfmig import __version__
from vfmig.cli import (
    agent,
    devices,
    doctor,
    fsm,
    inspect,
    journal,
    keygen,
    migrate,
    recover,
    replay,
    save_load,
)
from vfmig.cli.context import Environment
from vfmig.core.errors import ExitStatus, VfmigError

if TYPE_CHECKING:
    from collections.abc import Sequence

SUBCOMMANDS = (
    fsm,
    devices,
    inspect,
    migrate,
    agent,
    keygen,
    recover,
    replay,
    journal,
    doctor,
    save_load,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfmig",
        description="Live migration of VFIO devices without a VM.",
        epilog="Exit status: 0 ok, 1 failed, 2 usage, 3 device, 4 peer, 5 in doubt, "
        "6 device hung, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"vfmig {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None, env: Environment | None = None) -> int:
    env = env or Environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.run(args, env)
    except VfmigError as exc:
        if args.debug:
            traceback.print_exc(file=env.stderr)
        print(f"vfmig: error: {exc}", file=env.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=env.stderr)
        return int(exc.exit_status)
    except KeyboardInterrupt:
        print("vfmig: interrupted", file=env.stderr)
        return int(ExitStatus.INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`vfmig fsm --json | head`): not an error worth a message.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, sys.stdout.fileno())
        return int(ExitStatus.OK)
    except Exception as exc:  # a bug: say so in one line, full story with --debug
        if args.debug:
            traceback.print_exc(file=env.stderr)
        print(
            f"vfmig: internal error: {type(exc).__name__}: {exc} (rerun with --debug)",
            file=env.stderr,
        )
        return int(ExitStatus.FAILED)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
