"""``vfmig keygen PATH [--force]``: create the shared key that agents and orchestrators use.

The file is created with mode 0600 from the start and never overwritten without
``--force`` (:func:`vfmig.engine.keys.create_key`). The key is not printed: copy the file
to every host that takes part (``scp -p`` keeps the mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    from vfmig.cli.context import Environment


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "keygen",
        help="create a key file for agents and orchestrators (mode 0600)",
        description="Write a new random key (256 bits) to a file readable by its owner "
        "only. Every agent and orchestrator of a migration uses the same key (--key-file). "
        "The key is never printed.",
    )
    parser.add_argument("path", metavar="PATH", type=Path, help="the key file to create")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing key file (atomically)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, env: Environment) -> int:
    # Imported here: 'vfmig' itself must never load the engine package (it may pull in trio).
    from vfmig.engine.keys import KEY_BYTES, create_key

    path: Path = args.path
    create_key(path, force=args.force)
    env.print(f"wrote a new {KEY_BYTES * 8}-bit key to {path} (mode 0600)")
    env.print("copy it to every host of the migration, keeping it private (scp -p)")
    return 0
