"""What journaling costs the agents (CPU) and the disk (bytes per GiB). Not a test.

Two ``vfmig agent`` processes on loopback; ``vfmig migrate --no-precopy`` moves ``--size``
bytes of realistic content (``content=realistic``) from a device of the first to one of
the second, ``--rounds`` times with the agents journaling (``--journal-dir``) and as many
without (``--no-journal``), alternating. Each agent's CPU time (user + system, from
``/proc/<pid>/stat``) is read before and after every migration; the agents serve only
that migration meanwhile. Printed: each round, the median CPU seconds of both agents
together per mode, their ratio, and the size of the journals written per GiB migrated
(orchestrator's and agents', no ``--journal-data``). Then, since a whole migration's CPU
varies more between rounds than journaling costs, the agent's recording path alone:
``RunJournals.notice`` fed ``ChunkReceived`` notices in this process, CPU per event.

    .venv/bin/python tests/journal/bench_recording.py --size 512MiB --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vfmig.core.units import parse_size

VFMIG = [sys.executable, "-m", "vfmig"]
TICKS = os.sysconf("SC_CLK_TCK")
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def start_agent(key: Path, sim_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    command = [*VFMIG, "agent", "--listen", "127.0.0.1:0", "--key-file", str(key)]
    command += ["--sim-dir", str(sim_dir), *extra]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=ENV)
    assert process.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"listening on (\S+):(\d+) ", process.stderr.readline())
        if found:
            return process, f"{found[1]}:{found[2]}"
    process.kill()
    raise SystemExit("an agent did not start")


def one_round(work: Path, key: Path, size: int, journal: bool, n: int) -> tuple[float, int]:
    """CPU seconds of both agents for one migration, and bytes of journal written."""
    a_dir, b_dir, journals = work / f"A{n}", work / f"B{n}", work / f"J{n}"
    for d in (a_dir, b_dir, journals):
        d.mkdir()
    extra = ("--journal-dir", str(journals)) if journal else ("--no-journal",)
    agents = [start_agent(key, a_dir, *extra), start_agent(key, b_dir, *extra)]
    try:
        src = f"sim:s,size={size},content=realistic,state-dir=s@{agents[0][1]}"
        dst = f"sim:d,size={size},state-dir=d@{agents[1][1]}"
        before = [cpu_seconds(p.pid) for p, _ in agents]
        orchestrator = journals / "run.vfj" if journal else work / f"run{n}.vfj"
        command = [*VFMIG, "migrate", "--json", "--no-precopy", "--key-file", str(key)]
        command += ["--journal", str(orchestrator), src, dst]
        result = subprocess.run(command, capture_output=True, text=True, env=ENV, check=False)
        envelope = json.loads(result.stdout)
        if result.returncode != 0:
            raise SystemExit(f"migration failed: {envelope['error']}")
        after = [cpu_seconds(p.pid) for p, _ in agents]
    finally:
        for process, _ in agents:
            process.terminate()
            process.wait(timeout=30)
    written = sum(p.stat().st_size for p in journals.glob("*.vfj"))
    return sum(after) - sum(before), written


def recording_path(events: int) -> float:
    """CPU seconds per event of an agent's journal (parse, bus, recorder, writer, close)."""
    import trio

    from vfmig.core.events import ChunkReceived
    from vfmig.core.model import destination
    from vfmig.journal.runs import RunJournals
    from vfmig.journal.store import JournalStore

    spent: list[float] = []

    async def drive(directory: Path) -> None:
        journals = RunJournals(JournalStore(directory), host="bench")
        devices = [(destination(0), "sim:b")]
        notices = [
            ChunkReceived(
                device=destination(0), seq=i, offset=i * MiB, raw=MiB, wire=MiB // 3, final=False
            )
            for i in range(events + 1)
        ]
        async with trio.open_nursery() as nursery:
            await nursery.start(journals.run)
            await journals.notice("run", devices, notices[0])  # creates the journal
            start = time.process_time()  # every thread: the writer's included
            for notice in notices[1:]:
                await journals.notice("run", devices, notice)
            await journals.end("run")
            spent.append(time.process_time() - start)
            nursery.cancel_scope.cancel()

    with tempfile.TemporaryDirectory() as tmp:
        trio.run(drive, Path(tmp))
    return spent[0] / events


MiB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="512MiB")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key = work / "key"
        subprocess.run([*VFMIG, "keygen", str(key)], check=True, env=ENV, capture_output=True)
        cpu: dict[bool, list[float]] = {True: [], False: []}
        sizes: list[int] = []
        n = 0
        for r in range(args.rounds):
            for journal in (r % 2 == 0, r % 2 != 0):
                seconds, written = one_round(work, key, size, journal, n)
                n += 1
                cpu[journal].append(seconds)
                if journal:
                    sizes.append(written)
                mode = "journal" if journal else "no journal"
                print(f"round {r} {mode:10}: agents' CPU {seconds:.2f} s, journals {written} B")
    on, off = statistics.median(cpu[True]), statistics.median(cpu[False])
    per_gib = statistics.median(sizes) * (1 << 30) / size
    print(f"median agents' CPU: journal {on:.3f} s, none {off:.3f} s: {100 * (on / off - 1):+.2f}%")
    print(f"journal size per GiB migrated (orchestrator + both agents): {per_gib / 1024:.1f} KiB")
    per_event = statistics.median(recording_path(2048) for _ in range(3))
    events = size // MiB
    print(
        f"agent recording path: {per_event * 1e6:.1f} us CPU per event; "
        f"{events} chunks: {per_event * events * 1e3:.1f} ms per agent"
    )


if __name__ == "__main__":
    main()
