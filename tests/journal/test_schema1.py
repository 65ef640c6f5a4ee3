"""A journal written by the first schema stays readable, whatever vfmig becomes.

``data/schema1-rejected.vfj`` was written once, by schema 1 (vfmig 0.1.0), from a
synthetic run in which the destination rejected the stream at RESUMING>STOP; it holds
event records of every kind that run produces, snapshots, ORIGIN changes between hosts,
two raw data records and the closing record. Never regenerate it: it stands for the
journals users already have. A change that breaks this test breaks their journals
(docs/journal.md, "Evolution").
"""

from __future__ import annotations

import errno
import hashlib
from collections import Counter
from pathlib import Path

from vfmig.core.diagnose import Diagnoser
from vfmig.core.events import ErrorRaised
from vfmig.core.fsm import DeviceState
from vfmig.core.model import Cause, Outcome, Phase, destination, source
from vfmig.core.view import RunView, from_snapshot, reduce
from vfmig.journal.codec import DataRecord, EventRecord, SnapshotRecord
from vfmig.journal.reader import JournalReader

JOURNAL = Path(__file__).parent / "data" / "schema1-rejected.vfj"


def test_header() -> None:
    with JournalReader(JOURNAL) as reader:
        h = reader.header
    assert h.schema_version == 1
    assert (h.role, h.run_id, h.host, h.vfmig) == (
        "orchestrator",
        "schema1",
        "orchestrator",
        "0.1.0",
    )
    assert h.kernel == "6.12.117+deb12-amd64"
    assert h.start_wall_ns == 1_764_000_000 * 10**9
    assert h.data
    assert [(str(d.id), d.spec, d.identity, int(d.flags)) for d in h.devices] == [
        ("src0", "sim:a0,size=4MiB", "hostA:sim:a0", 7),
        ("dst0", "sim:b0,size=4MiB", "hostB:sim:b0", 7),
    ]


def test_records() -> None:
    with JournalReader(JOURNAL) as reader:
        entries = list(reader.entries())
        status = reader.status
    assert status.intact
    assert (status.frames, status.last_seq) == (15, entries[-1].seq)
    events = [e for e in entries if isinstance(e, EventRecord)]
    assert Counter(type(e.event).__name__ for e in events) == {
        "ChunkReceived": 4,
        "ChunkSent": 4,
        "DataSizeSampled": 1,
        "DebugfsSampled": 9,
        "DecisionMade": 4,
        "DeviceOpened": 2,
        "ErrorRaised": 1,
        "IoctlCompleted": 8,
        "PhaseChanged": 8,
        "PrecopySampled": 1,
        "RunFinished": 1,
        "StateChanged": 6,
        "StreamEnded": 1,
        "StreamStarted": 2,
        "SwitchoverAcked": 1,
    }
    assert {e.origin for e in events} == {"orchestrator", "hostA", "hostB"}
    error = next(e.event for e in events if isinstance(e.event, ErrorRaised))
    assert (error.device, error.phase, error.step, error.errno, error.cause) == (
        destination(0),
        Phase.RESUME,
        "RESUMING>STOP",
        errno.EINVAL,
        Cause.STREAM_REJECTED,
    )


def test_fold_snapshots_and_diagnosis() -> None:
    model = RunView()
    diagnoser = Diagnoser()
    snapshots = 0
    with JournalReader(JOURNAL) as reader:
        for entry in reader.entries():
            if isinstance(entry, SnapshotRecord):
                snapshots += 1
                assert from_snapshot(entry.state) == model
            elif isinstance(entry, EventRecord):
                model = reduce(model, entry)
                diagnoser.feed(entry)
    assert snapshots == 4
    assert model.finished is not None
    assert model.finished.outcome is Outcome.FAILED
    assert model.device(source(0)).state is DeviceState.RUNNING
    assert model.device(destination(0)).state is DeviceState.RUNNING
    assert model.summary.devices[source(0)].raw_bytes == 4 << 20
    result = diagnoser.result()
    assert result.cause == "stream-rejected"
    assert result.before is not None
    assert result.before.ioctl is DeviceState.RESUMING


def test_data() -> None:
    with JournalReader(JOURNAL) as reader:
        pieces = list(reader.data(source(0)))
    assert [(p.offset, len(p.data)) for p in pieces] == [(0, 3000), (3000, 2000)]
    assert all(isinstance(p, DataRecord) for p in pieces)
    digest = hashlib.blake2b(b"".join(p.data for p in pieces), digest_size=32).hexdigest()
    assert digest == "937570847648c5d65c5e88df97625d77f4743503045a61c23b1059c26a4f0856"
