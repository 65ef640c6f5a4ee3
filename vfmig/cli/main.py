"""``vfmig`` entry point: argparse, dispatch to one module per subcommand, errors to exit codes.

Each subcommand module has ``add_parser(subparsers)`` and ``run(args, env) -> int``.
A :class:`~vfmig.core.errors.VfmigError` becomes one line on stderr (plus its hint) and the
exit status of its class; anything else is a bug, shown as one line unless ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import sys
import traceback
from typing import TYPE_CHECKING

from vfmig import __version__
from vfmig.cli.context import Environment
from vfmig.core.errors import ExitStatus, VfmigError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType

#: Command name -> the module that defines it (``add_parser`` and ``run``). Only the module
#: of the command being run is imported, so ``vfmig fsm`` never loads the engine or the
#: journal: start-up time matters on slow machines (the kernel tier runs under TCG).
COMMANDS: dict[str, str] = {
    "fsm": "vfmig.cli.fsm",
    "list": "vfmig.cli.devices",
    "inspect": "vfmig.cli.inspect",
    "doctor": "vfmig.cli.doctor",
    "migrate": "vfmig.cli.migrate",
    "agent": "vfmig.cli.agent",
    "keygen": "vfmig.cli.keygen",
    "recover": "vfmig.cli.recover",
    "save": "vfmig.cli.save_load",
    "load": "vfmig.cli.save_load",
    "replay": "vfmig.cli.replay",
    "journal": "vfmig.cli.journal",
}


def _modules(command: str | None) -> list[ModuleType]:
    """The module of ``command``, or every command module (for help and usage errors)."""
    names = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    return [importlib.import_module(name) for name in names]


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``: the first word that is not a top-level option."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that command's module is loaded and registered."""
    parser = argparse.ArgumentParser(
        prog="vfmig",
        description="Live migration of VFIO devices without a VM.",
        epilog="Exit status: 0 ok, 1 failed, 2 usage, 3 device, 4 peer, 5 in doubt, "
        "6 device hung, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"vfmig {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _modules(command):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None, env: Environment | None = None) -> int:
    env = env or Environment()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
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


def cli() -> None:
    """The ``vfmig`` command: :func:`main`, then exit without a last garbage collection.

    The interpreter's shutdown collects every object of every loaded module (~40 ms of a
    ``vfmig migrate``, an eighth of its fixed cost); frozen, they are only released. Not
    in :func:`main`, which tests call in-process.
    """
    status = main()
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":  # pragma: no cover
    cli()
