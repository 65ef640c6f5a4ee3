from __future__ import annotations

from vfmig.cli.main import cli

cli()
