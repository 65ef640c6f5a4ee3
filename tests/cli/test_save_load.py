"""``vfmig save`` and ``vfmig load`` on simulated devices: state out to a file and back in."""

from __future__ import annotations

import hashlib
import io
import stat
import tracemalloc
from typing import TYPE_CHECKING

import pytest

from vfmig.cli.context import Environment
from vfmig.cli.main import main
from vfmig.core import events as ev
from vfmig.core.fsm import DeviceState
from vfmig.device.open import open_device
from vfmig.journal.codec import EventRecord
from vfmig.journal.reader import JournalReader

if TYPE_CHECKING:
    from pathlib import Path


def vfmig(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), Environment(stdout=out, stderr=err, stdout_isatty=False))
    return status, out.getvalue(), err.getvalue()


def events(path: Path) -> list[ev.Event]:
    with JournalReader(path) as reader:
        found = [e.event for e in reader.entries() if isinstance(e, EventRecord)]
        assert reader.status.intact
    return found


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def reopen(spec: str) -> tuple[DeviceState, str]:
    with open_device(spec) as device:
        return device.get_state(), device.content_digest()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "options",
    ["size=3MiB", "size=3MiB,dirty-rate=64MiB/s", "size=3MiB,flags=stop-copy", "size=5000"],
)
def test_save_then_load_gives_the_same_state(tmp_path: Path, options: str) -> None:
    source = f"sim:src,{options},seed=7,state-dir={tmp_path / 'src'}"
    saved = tmp_path / "state.vfj"
    status, out, err = vfmig("save", source, str(saved))
    assert (status, err) == (0, "")
    assert "the device is STOP" in out
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    state, digest = reopen(source)
    assert state is DeviceState.STOP  # saved: the device stays stopped

    dump = tmp_path / "dst.bin"
    target = f"sim:dst,{options},seed=99,dump={dump}"
    status, out, err = vfmig("load", str(saved), target, "--journal", str(tmp_path / "load.vfj"))
    assert (status, err) == (0, "")
    assert "is RUNNING" in out
    assert file_digest(dump) == digest

    kinds = {type(e) for e in events(saved)}
    assert ev.ChunkSent in kinds
    assert (ev.PrecopySampled in kinds) == ("stop-copy" not in options)
    loaded = events(tmp_path / "load.vfj")
    assert isinstance(loaded[-1], ev.RunFinished)
    assert loaded[-1].outcome.value == "completed"
    assert [e.after for e in loaded if isinstance(e, ev.StateChanged)] == [
        DeviceState.RESUMING,
        DeviceState.STOP,
        DeviceState.RUNNING,
    ]


def test_save_with_resume_runs_the_device_again(tmp_path: Path) -> None:
    source = f"sim:src,size=1MiB,state-dir={tmp_path / 'src'}"
    status, out, _ = vfmig("save", source, str(tmp_path / "s.vfj"), "--resume", "--no-precopy")
    assert status == 0
    assert "the device is RUNNING" in out
    assert reopen(source)[0] is DeviceState.RUNNING
    steps = [e.step for e in events(tmp_path / "s.vfj") if isinstance(e, ev.StateChanged)]
    assert steps == ["RUNNING>STOP_COPY", "STOP_COPY>STOP", "STOP>RUNNING"]


def test_save_journals_every_ioctl_and_state(tmp_path: Path) -> None:
    status, _, _ = vfmig("save", "sim:src,size=2MiB", str(tmp_path / "s.vfj"), "--json")
    assert status == 0
    found = events(tmp_path / "s.vfj")
    ioctls = [e for e in found if isinstance(e, ev.IoctlCompleted)]
    assert [dict(e.args).get("device_state") for e in ioctls if ("set", 1) in e.args] == [
        int(DeviceState.PRE_COPY),
        int(DeviceState.STOP_COPY),
        int(DeviceState.STOP),
    ]
    debugfs = [e.state for e in found if isinstance(e, ev.DebugfsSampled)]
    assert debugfs[-1] is DeviceState.STOP
    with JournalReader(tmp_path / "s.vfj") as reader:
        assert reader.header.role == "save"
        assert reader.header.data
        pieces = list(reader.data(reader.header.devices[0].id))
    assert sum(len(p.data) for p in pieces) == next(
        e.offset for e in found if isinstance(e, ev.ChunkSent) and e.final
    )


def test_a_failed_save_recovers_the_device_and_keeps_its_journal(tmp_path: Path) -> None:
    source = f"sim:src,size=2MiB,fail=PRE_COPY>PRE_COPY_P2P:EIO,state-dir={tmp_path / 'src'}"
    target = tmp_path / "s.vfj"
    status, out, err = vfmig("save", source, str(target))
    assert status == 3
    assert "PRE_COPY>STOP_COPY" in err
    assert not target.exists()
    assert not list(tmp_path.glob(".s.vfj.*"))
    failed = tmp_path / "s.vfj.failed"
    assert str(failed) in out
    assert reopen(source)[0] is DeviceState.RUNNING
    status, out, _ = vfmig("journal", "diagnose", str(failed))
    assert status == 1
    assert "a state change failed" in out
    assert "src0, phase switchover, step PRE_COPY>STOP_COPY, EIO" in out


def test_a_read_error_during_save_recovers_the_device(tmp_path: Path) -> None:
    source = f"sim:src,size=2MiB,read-error=1500000:EIO,state-dir={tmp_path / 'src'}"
    status, _, err = vfmig("save", source, str(tmp_path / "s.vfj"), "--no-precopy")
    assert status == 3
    assert "read at offset 1500000" in err
    assert reopen(source)[0] is DeviceState.RUNNING
    found = events(tmp_path / "s.vfj.failed")
    assert any(isinstance(e, ev.ErrorRaised) and e.cause.value == "read-failed" for e in found)


def test_save_refuses_an_existing_file_and_a_leftover_state(tmp_path: Path) -> None:
    target = tmp_path / "s.vfj"
    target.write_text("precious")
    status, _, err = vfmig("save", "sim:src,size=1MiB", str(target))
    assert status == 2
    assert "already exists" in err
    assert target.read_text() == "precious"
    status, _, _ = vfmig("save", "sim:src,size=1MiB", str(target), "--force")
    assert status == 0
    last = events(target)[-1]
    assert isinstance(last, ev.RunFinished)
    assert last.outcome.value == "completed"

    state_dir = tmp_path / "left"
    spec = f"sim:left,size=1MiB,state-dir={state_dir}"
    with open_device(spec) as device:
        device.set_state(DeviceState.STOP)
    status, _, err = vfmig("save", spec, str(tmp_path / "l.vfj"))
    assert status == 3
    assert "found in STOP, expected RUNNING" in err
    assert reopen(spec)[0] is DeviceState.STOP  # refused: nothing was changed


def test_loading_into_a_smaller_device_is_refused_and_reset(tmp_path: Path) -> None:
    saved = tmp_path / "s.vfj"
    assert vfmig("save", "sim:src,size=2MiB", str(saved))[0] == 0
    target = f"sim:small,size=1MiB,state-dir={tmp_path / 'small'}"
    journal = tmp_path / "load.vfj"
    status, _, err = vfmig("load", str(saved), target, "--journal", str(journal))
    assert status == 3
    assert "write at offset 0: Bad address (EFAULT)" in err
    assert reopen(target)[0] is DeviceState.RUNNING  # reset, never SET out of RESUMING
    found = events(journal)
    steps = [e.step for e in found if isinstance(e, ev.StateChanged)]
    assert steps == ["RUNNING>RESUMING", "reset"]
    status, out, _ = vfmig("journal", "diagnose", str(journal))
    assert status == 1
    assert "stream size mismatch between device types" in out


def test_a_corrupt_stream_is_rejected_at_validation_and_reset(tmp_path: Path) -> None:
    saved = tmp_path / "s.vfj"
    assert vfmig("save", "sim:src,size=1MiB,corrupt=70000", str(saved))[0] == 0
    target = f"sim:dst,size=1MiB,state-dir={tmp_path / 'dst'}"
    journal = tmp_path / "load.vfj"
    status, _, err = vfmig("load", str(saved), target, "--journal", str(journal))
    assert status == 3
    assert "RESUMING>STOP" in err
    assert reopen(target)[0] is DeviceState.RUNNING
    status, out, _ = vfmig("journal", "diagnose", str(journal))
    assert "the destination rejected the stream at RESUMING>STOP" in out


def test_load_refuses_incomplete_or_foreign_journals(tmp_path: Path) -> None:
    saved = tmp_path / "s.vfj"
    assert vfmig("save", "sim:src,size=3MiB", str(saved), "--no-precopy")[0] == 0
    data = saved.read_bytes()
    cut = tmp_path / "cut.vfj"
    cut.write_bytes(data[: len(data) // 2])
    status, _, err = vfmig("load", str(cut), "sim:dst,size=3MiB", "--journal", str(tmp_path / "j1"))
    assert status == 1
    assert "damaged" in err
    status, _, err = vfmig(
        "load", str(saved), "sim:dst", "--device", "dst0", "--journal", str(tmp_path / "j2")
    )
    assert status == 2
    assert "src<N>" in err
    load_journal = tmp_path / "j3"
    assert vfmig("load", str(saved), "sim:dst,size=3MiB", "--journal", str(load_journal))[0] == 0
    status, _, err = vfmig("load", str(load_journal), "sim:x", "--journal", str(tmp_path / "j4"))
    assert status == 1
    assert "holds no device data" in err


def test_save_and_load_memory_stays_bounded(tmp_path: Path) -> None:
    """64 MiB of state through save and load; Python allocations stay near the 1 MiB chunks."""
    saved = tmp_path / "big.vfj"
    tracemalloc.start()
    try:
        assert vfmig("save", "sim:big,size=64MiB,content=random", str(saved), "--json")[0] == 0
        _, save_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        journal = tmp_path / "load.vfj"
        target = "sim:dst,size=64MiB"
        assert vfmig("load", str(saved), target, "--journal", str(journal), "--json")[0] == 0
        _, load_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert saved.stat().st_size > 60 << 20  # incompressible content: the file holds it all
    assert save_peak < 16 << 20
    assert load_peak < 16 << 20


def test_load_redrives_a_failed_migrations_recorded_stream(tmp_path: Path) -> None:
    """A migration journaled with --journal-data holds each source's stream; load picks one."""
    from vfmig.core.errors import ExitStatus
    from vfmig.core.model import Cause, Outcome, Phase, destination, source
    from vfmig.journal.codec import DeviceInfo, JournalHeader
    from vfmig.journal.writer import JournalWriter

    streams = {}
    for i in (0, 1):
        saved = tmp_path / f"s{i}.vfj"
        spec = f"sim:src{i},size={i + 1}MiB,seed={i},state-dir={tmp_path / f'src{i}'}"
        assert vfmig("save", spec, str(saved), "--no-precopy")[0] == 0
        with JournalReader(saved) as reader:
            streams[i] = [(p.offset, p.data) for p in reader.data(source(0))]
        streams[i + 10] = reopen(spec)[1]  # the content the stream carries
    header = JournalHeader(
        host="orchestrator",
        role="orchestrator",
        run_id="failed-run",
        kernel="6.12",
        start_wall_ns=0,
        start_mono_ns=0,
        data=True,
        devices=tuple(
            DeviceInfo(id=d(i), spec=f"sim:{d(i)}") for i in (0, 1) for d in (source, destination)
        ),
    )
    journal = tmp_path / "migration.vfj"
    with JournalWriter.create(journal, header) as writer:
        writer.append(ev.PhaseChanged(phase=Phase.STOPCOPY, previous=None))
        for i in (0, 1):
            seq = 0
            for offset, data in streams[i]:
                writer.append_data(source(i), offset, data, origin="hostA")
                chunk = ev.ChunkSent(
                    device=source(i), seq=seq, offset=offset, raw=len(data), wire=1, final=False
                )
                writer.append(chunk, origin="hostA")
                seq += 1
            end = streams[i][-1][0] + len(streams[i][-1][1])
            final = ev.ChunkSent(device=source(i), seq=seq, offset=end, raw=0, wire=0, final=True)
            writer.append(final, origin="hostA")
        writer.append(
            ev.ErrorRaised(
                device=destination(1),
                phase=Phase.RESUME,
                step="RESUMING>STOP",
                errno=22,
                cause=Cause.STREAM_REJECTED,
                message="rejected",
                hint=None,
            )
        )
        writer.append(ev.RunFinished(outcome=Outcome.FAILED, exit_status=1, summary="failed"))
    spare = f"sim:spare,size=2MiB,dump={tmp_path / 'spare.bin'}"
    status, _, err = vfmig("load", str(journal), spare, "--journal", str(tmp_path / "l0"))
    assert status == int(ExitStatus.USAGE)
    assert "holds 2 source devices" in err
    status, out, err = vfmig(
        "load", str(journal), spare, "--device", "src1", "--journal", str(tmp_path / "l1")
    )
    assert (status, err) == (0, "")
    assert "loading src1's stream (2.0 MiB)" in out
    assert file_digest(tmp_path / "spare.bin") == streams[11]
