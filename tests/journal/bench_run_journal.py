"""What one journal for a remote run costs after the run: fetching the agents' journals and
merging them (``vfmig migrate`` with remote agents). Not a test.

Two ``vfmig agent`` processes on loopback, each journaling into its own directory;
``vfmig migrate --no-precopy --journal PATH`` runs in this process and moves ``--size``
bytes of realistic content (``content=realistic``) from a device of the first agent to one
of the second, ``--rounds`` times, with and without ``--journal-data``. The fetch (the
orchestrator's end hook, :class:`vfmig.journal.collect.Collector`) and the merge
(``Collector.merge``) are timed by wrapping them. Printed per round: both times, the run's
own time (``total_ms``), the sizes of the orchestrator's journal before the merge, of the
agents' journals and of the merged journal.

    .venv/bin/python tests/journal/bench_run_journal.py --size 512MiB --rounds 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vfmig.cli.context import Environment
from vfmig.cli.main import main as vfmig_main
from vfmig.core.units import parse_size
from vfmig.journal import collect

if TYPE_CHECKING:
    from collections.abc import Mapping

    from vfmig.engine.link import Link
    from vfmig.journal.merge import MergeReport

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
timings: dict[str, float] = {}
sizes: dict[str, int] = {}

_fetch = collect.Collector.__call__
_merge = collect.Collector.merge


async def timed_fetch(self: collect.Collector, links: Mapping[str, Link]) -> None:
    start = time.perf_counter()
    await _fetch(self, links)
    timings["fetch"] = time.perf_counter() - start


def timed_merge(self: collect.Collector) -> MergeReport | None:
    sizes["orchestrator"] = self.journal.stat().st_size
    sizes["agents"] = sum(s.path.stat().st_size for s in self.sides.values() if s.path)
    start = time.perf_counter()
    report = _merge(self)
    timings["merge"] = time.perf_counter() - start
    sizes["merged"] = self.journal.stat().st_size
    return report


def start_agent(key: Path, sim_dir: Path, journal_dir: Path) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "vfmig", "agent", "--listen", "127.0.0.1:0"]
    command += ["--key-file", str(key), "--sim-dir", str(sim_dir)]
    command += ["--journal-dir", str(journal_dir), "--keep-journals", "2"]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env=ENV, cwd=sim_dir
    )  # not from the repository's root: its vfmig/ would shadow the installed package
    assert process.stderr is not None
    for line in process.stderr:
        found = re.search(r"listening on (\S+):(\d+) ", line)
        if found:
            return process, f"{found[1]}:{found[2]}"
    raise SystemExit(f"an agent did not start: {process.wait()}")


def migrate(argv: list[str]) -> dict[str, Any]:
    out, err = io.StringIO(), io.StringIO()
    status = vfmig_main(argv, Environment(stdout=out, stderr=err, stdout_isatty=False))
    if status != 0:
        raise SystemExit(f"migrate failed ({status}): {err.getvalue()}")
    result: dict[str, Any] = json.loads(out.getvalue())["result"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("512MiB"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    collect.Collector.__call__ = timed_fetch  # type: ignore[method-assign]
    collect.Collector.merge = timed_merge  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="vfmig-bench-") as tmp:
        work = Path(tmp)
        key = work / "key"
        keygen = [sys.executable, "-m", "vfmig", "keygen", str(key)]
        subprocess.run(keygen, check=True, env=ENV, cwd=work, capture_output=True)
        dirs = [work / d for d in ("A", "B", "JA", "JB")]
        for d in dirs:
            d.mkdir()
        a, a_address = start_agent(key, dirs[0], dirs[2])
        b, b_address = start_agent(key, dirs[1], dirs[3])
        results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        try:
            for n in range(args.rounds):
                for data in (False, True):
                    path = work / f"run-{n}-{data}.vfj"
                    argv = ["migrate", "--json", "--no-precopy", "--journal", str(path)]
                    argv += ["--key-file", str(key)] + (["--journal-data"] if data else [])
                    src = f"sim:src,size={args.size},content=realistic@{a_address}"
                    dst = f"sim:dst,size={args.size}@{b_address}"
                    run = migrate([*argv, src, dst])
                    row = {**timings, "run": run["total_ms"] / 1000}
                    results[data].append(row)
                    print(
                        f"round {n} data={data!s:5}: run {row['run']:.2f} s, fetch "
                        f"{row['fetch'] * 1000:.0f} ms, merge {row['merge'] * 1000:.0f} ms; "
                        f"journals: orchestrator {sizes['orchestrator'] / 1024:.0f} KiB, "
                        f"agents {sizes['agents'] / 1024:.0f} KiB, merged "
                        f"{sizes['merged'] / 1024:.0f} KiB"
                    )
                    path.unlink()
        finally:
            for process in (a, b):
                process.terminate()
                process.wait(timeout=20)
    for data, rows in results.items():
        fetch = statistics.median(r["fetch"] for r in rows)
        merge = statistics.median(r["merge"] for r in rows)
        print(
            f"median {'with' if data else 'without'} --journal-data: fetch {fetch * 1000:.0f} ms "
            f"+ merge {merge * 1000:.0f} ms = {(fetch + merge) * 1000:.0f} ms after the run"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
