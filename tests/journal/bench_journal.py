"""Journal benchmark (not a test): size per GiB migrated, writer CPU per record, data rate.

Run: ``.venv/bin/python tests/journal/bench_journal.py``. The event stream is a synthetic
1 GiB precopy migration in 1 MiB chunks (:mod:`vfmig.journal.synthetic`: the phase machine
driven by a scripted engine), so it has the engine's mix of records: chunks sent and
received, precopy and MIG_DATA_SIZE samples, ioctls, state changes, debugfs samples,
phases and decisions. CPU is process time, median of several rounds (the machine is
shared). Figures go in docs/journal.md.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from vfmig.core.model import source
from vfmig.device.sim_content import realistic_state
from vfmig.journal import codec, synthetic
from vfmig.journal.codec import JournalHeader
from vfmig.journal.reader import JournalReader
from vfmig.journal.writer import JournalWriter

GIB = 1 << 30
MIB = 1 << 20
ROUNDS = 7


def header(*, data: bool = False) -> JournalHeader:
    return JournalHeader(
        host="bench",
        role="orchestrator",
        run_id="bench",
        kernel="",
        start_wall_ns=0,
        start_mono_ns=0,
        data=data,
    )


def write_events(path: Path, observations: list[synthetic.Observation], **options: int) -> float:
    """Process seconds to write ``observations`` (file included)."""
    path.unlink(missing_ok=True)
    start = time.process_time()
    with JournalWriter.create(path, header(), **options) as writer:
        for o in observations:
            writer.append(o.event, at_ns=o.at_ns, origin=o.host)
    return time.process_time() - start


def read_events(path: Path) -> float:
    start = time.process_time()
    with JournalReader(path) as reader:
        for _ in reader.entries():
            pass
    return time.process_time() - start


def main() -> None:
    scenario = synthetic.Scenario(size=GIB, initial=768 * MIB, chunk=MIB, rate=2 * GIB)
    observations = list(synthetic.run(scenario))
    n = len(observations)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.vfj"
        print(f"synthetic 1 GiB migration, 1 MiB chunks: {n} events")
        for level in (1, 3):
            cpu = [write_events(path, observations, level=level) for _ in range(ROUNDS)]
            size = path.stat().st_size
            with JournalReader(path) as reader:
                records = sum(1 for _ in reader.entries())
                frames = sum(1 for _ in reader.frames())
            read = statistics.median(read_events(path) for _ in range(ROUNDS))
            cost = statistics.median(cpu) / n
            print(
                f"zstd level {level}: journal {size / 1024:.1f} KiB per GiB migrated "
                f"({size / n:.1f} bytes per event, {records} records, {frames} frames); "
                f"writer {cost * 1e6:.1f} us CPU per event; "
                f"reader {read / n * 1e6:.1f} us per event"
            )
        # where the writer's time goes: packing alone, and the view fold for snapshots
        from vfmig.core.events import to_record
        from vfmig.core.view import RunView, reduce

        def pack_only() -> float:
            start = time.process_time()
            for i, o in enumerate(observations):
                codec.pack(i, o.at_ns, o.at_ns, to_record(o.event))
            return time.process_time() - start

        def fold_only() -> float:
            start = time.process_time()
            model = RunView()
            for i, o in enumerate(observations):
                model = reduce(
                    model,
                    codec.EventRecord(seq=i, at_ns=o.at_ns, wall_ns=0, origin="", event=o.event),
                )
            return time.process_time() - start

        pack = statistics.median(pack_only() for _ in range(ROUNDS)) / n
        fold = statistics.median(fold_only() for _ in range(ROUNDS)) / n
        print(f"of which: to_record + msgpack {pack * 1e6:.1f} us, view fold {fold * 1e6:.1f} us")

        # --journal-data: raw device data, 64 MiB of realistic content in 1 MiB records
        chunks = [realistic_state(7, off, MIB) for off in range(0, 64 * MIB, MIB)]
        for level in (1, 3):
            times = []
            for _ in range(3):
                path.unlink(missing_ok=True)
                start = time.perf_counter()
                with JournalWriter.create(path, header(data=True), level=level) as writer:
                    for i, chunk in enumerate(chunks):
                        writer.append_data(source(0), i * MIB, chunk)
                times.append(time.perf_counter() - start)
            rate = 64 * MIB / statistics.median(times) / MIB
            ratio = 64 * MIB / path.stat().st_size
            print(
                f"data records, zstd level {level}: {rate:.0f} MiB/s written, {ratio:.2f}x smaller"
            )


if __name__ == "__main__":
    main()
