"""What a subcommand gets besides its arguments: the streams and the terminal facts (injectable)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import IO, Any

from vfmig import __version__

#: Version of the ``--json`` envelope; bumped when a field changes meaning or disappears.
JSON_SCHEMA = 1


@dataclass(frozen=True, slots=True)
class Environment:
    """Streams and terminal facts; tests pass ``io.StringIO`` streams."""

    stdout: IO[str] = field(default_factory=lambda: sys.stdout)
    stderr: IO[str] = field(default_factory=lambda: sys.stderr)
    stdout_isatty: bool = field(default_factory=lambda: sys.stdout.isatty())

    def print(self, *parts: object) -> None:
        print(*parts, file=self.stdout)

    def emit_json(self, command: str, result: Any, *, error: dict[str, Any] | None = None) -> None:
        """Print the versioned ``--json`` envelope."""
        envelope = {
            "vfmig": __version__,
            "schema": JSON_SCHEMA,
            "command": command,
            "ok": error is None,
            "result": result,
            "error": error,
        }
        json.dump(envelope, self.stdout, indent=2)
        self.stdout.write("\n")
