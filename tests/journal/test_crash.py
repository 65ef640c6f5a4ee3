"""kill -9 of a process in the middle of writing a journal loses at most the last second.

The writer runs in a child process on a virtual clock (1 ms per record) and reports, after
every append, the time of the record it appended. The parent kills it with SIGKILL at some
point; what the journal holds is then compared with what the child had appended -- on the
child's clock, so the test does not depend on how fast this machine is.
"""

from __future__ import annotations

import io
import signal
import struct
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from vfmig.cli.context import Environment
from vfmig.cli.main import main
from vfmig.journal.codec import EventRecord
from vfmig.journal.reader import JournalReader

if TYPE_CHECKING:
    from pathlib import Path

S = 1_000_000_000

CHILD = """
import os, struct, sys
from pathlib import Path
from vfmig.core import events as ev
from vfmig.core.model import source
from vfmig.journal.codec import JournalHeader
from vfmig.journal.writer import JournalWriter

path, progress = sys.argv[1], sys.argv[2]
clock = [0]
header = JournalHeader(
    host="h", role="agent", run_id="crash", kernel="k", start_wall_ns=0, start_mono_ns=0
)
writer = JournalWriter.create(
    Path(path), header, mono_clock=lambda: clock[0], wall_clock=lambda: clock[0]
)
fd = os.open(progress, os.O_WRONLY | os.O_CREAT, 0o600)
i = 0
while True:
    clock[0] += 1_000_000
    writer.append(ev.DataSizeSampled(device=source(0), size=i), at_ns=clock[0])
    os.pwrite(fd, struct.pack("<q", clock[0]), 0)
    i += 1
"""


def progress_of(path: Path) -> int:
    data = path.read_bytes() if path.exists() else b""
    return struct.unpack("<q", data)[0] if len(data) == 8 else 0


def test_kill_9_loses_at_most_the_last_second(tmp_path: Path) -> None:
    journal = tmp_path / "crash.vfj"
    progress = tmp_path / "progress"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(journal), str(progress)])
    try:
        deadline = time.monotonic() + 120
        while progress_of(progress) < 5 * S + S // 2:
            assert child.poll() is None, "the writer died on its own"
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    appended = progress_of(progress)  # the last record the child had appended (or later)

    with JournalReader(journal) as reader:
        sizes = [e.event.size for e in reader.entries() if isinstance(e, EventRecord)]
        status = reader.status
    assert sizes == list(range(len(sizes)))  # a gap-free prefix of what was appended
    assert status.last_at_ns is not None
    assert status.last_at_ns >= appended - S - 1_000_000  # at most the last second is lost
    assert not status.closed
    assert status.damage is None or status.damage.truncated

    out, err = io.StringIO(), io.StringIO()
    code = main(["journal", "verify", str(journal)], Environment(stdout=out, stderr=err))
    assert code == 1
    assert (
        f"good up to record {status.last_seq} at +{status.last_at_ns / S:.3f} s" in out.getvalue()
    )
