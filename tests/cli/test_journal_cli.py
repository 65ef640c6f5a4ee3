"""``vfmig journal verify|info|merge|export|diagnose`` on journals of synthetic runs."""

from __future__ import annotations

import errno
import io
import json
from typing import TYPE_CHECKING

import pytest

from vfmig.cli.context import Environment
from vfmig.cli.main import main
from vfmig.core.model import destination, source
from vfmig.journal import store, synthetic
from vfmig.journal.codec import DeviceInfo, JournalHeader
from vfmig.journal.reader import JournalReader
from vfmig.journal.writer import JournalWriter

if TYPE_CHECKING:
    from pathlib import Path

S = 1_000_000_000


def vfmig(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), Environment(stdout=out, stderr=err, stdout_isatty=False))
    return status, out.getvalue(), err.getvalue()


def write(
    path: Path,
    observations: list[synthetic.Observation],
    *,
    host: str = "orchestrator",
    skew: int = 0,
    data: bool = False,
) -> Path:
    header = JournalHeader(
        host=host,
        role="agent" if host != "orchestrator" else "orchestrator",
        run_id="r1",
        kernel="6.12",
        start_wall_ns=1_764_000_000 * S,
        start_mono_ns=skew,
        devices=(
            DeviceInfo(id=source(0), spec="sim:a0"),
            DeviceInfo(id=destination(0), spec="sim:b0"),
        ),
        data=data,
    )
    clock = [skew]
    with JournalWriter.create(
        path, header, mono_clock=lambda: clock[0], wall_clock=lambda: clock[0], frame_bytes=1024
    ) as writer:
        for o in observations:
            clock[0] = o.at_ns + skew
            writer.append(o.event, at_ns=o.at_ns + skew, origin=o.host)
        if data:
            writer.append_data(source(0), 0, b"\x01\x02\x03")
    return path


@pytest.fixture(scope="module")
def run_rejected() -> list[synthetic.Observation]:
    faults = synthetic.Faults(set_fail={(destination(0), "RESUMING>STOP"): errno.EINVAL})
    return list(synthetic.run(synthetic.Scenario(faults=faults)))


@pytest.fixture
def rejected(tmp_path: Path, run_rejected: list[synthetic.Observation]) -> Path:
    return write(tmp_path / "r.vfj", run_rejected)


def test_verify_intact(rejected: Path) -> None:
    status, out, _ = vfmig("journal", "verify", str(rejected))
    assert status == 0
    assert "intact" in out
    assert "closed by its writer" in out


def test_verify_a_cut_journal(rejected: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.vfj"
    cut.write_bytes(rejected.read_bytes()[:-7])
    status, out, _ = vfmig("journal", "verify", str(cut))
    assert status == 1
    assert "NOT intact" in out
    assert "cut short at byte" in out
    assert "good up to record" in out
    status, out, _ = vfmig("journal", "verify", str(cut), "--json")
    doc = json.loads(out)
    assert status == 1
    assert not doc["ok"]
    assert doc["result"]["damage"]["truncated"]
    assert doc["error"]["message"].startswith("cut short at byte")


def test_verify_a_corrupt_journal_reports_what_lies_past_the_damage(
    rejected: Path, tmp_path: Path
) -> None:
    with JournalReader(rejected) as reader:
        frames = list(reader.frames())
    victim = frames[3].offset + 50
    data = bytearray(rejected.read_bytes())
    data[victim] ^= 0xFF
    bad = tmp_path / "bad.vfj"
    bad.write_bytes(bytes(data))
    status, out, _ = vfmig("journal", "verify", str(bad))
    assert status == 1
    assert f"damaged at byte {frames[3].offset}" in out
    assert f"past the damage, {len(frames) - 4} frame(s) still check" in out


def test_verify_an_unclosed_journal(
    tmp_path: Path, run_rejected: list[synthetic.Observation]
) -> None:
    path = tmp_path / "open.vfj"
    header = JournalHeader(
        host="h", role="agent", run_id="r", kernel="k", start_wall_ns=0, start_mono_ns=0
    )
    writer = JournalWriter.create(path, header)
    for o in run_rejected[:20]:
        writer.append(o.event)
    writer.flush()
    status, out, _ = vfmig("journal", "verify", str(path))
    assert status == 1
    assert "ends without its closing record" in out
    writer.close()
    assert vfmig("journal", "verify", str(path))[0] == 0


def test_info(rejected: Path) -> None:
    status, out, _ = vfmig("journal", "info", str(rejected))
    assert status == 0
    assert "run       r1: orchestrator on orchestrator, kernel 6.12" in out
    assert "device    src0 sim:a0" in out
    assert "outcome failed" in out
    assert "ChunkSent 64" in out
    status, out, _ = vfmig("journal", "info", str(rejected), "--json")
    result = json.loads(out)["result"]
    assert result["events"]["ErrorRaised"] == 1
    assert result["outcome"] == "failed"
    assert result["header"]["devices"][1]["id"] == "dst0"


def test_export(tmp_path: Path, run_rejected: list[synthetic.Observation]) -> None:
    path = write(tmp_path / "d.vfj", run_rejected, data=True)
    status, out, _ = vfmig("journal", "export", str(path), "--json", "--data")
    assert status == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["type"] == "header"
    assert lines[0]["data"]
    events = [x for x in lines if "fields" in x]
    assert len(events) == len(run_rejected)
    assert events[0]["fields"] == {"phase": "preflight", "previous": None}
    data = [x for x in lines if x["type"] == "data"]
    assert data == [
        {
            "seq": data[0]["seq"],
            "at_ns": data[0]["at_ns"],
            "wall_ns": data[0]["wall_ns"],
            "origin": "orchestrator",
            "type": "data",
            "device": "src0",
            "offset": 0,
            "length": 3,
            "hex": "010203",
        }
    ]
    assert lines[-1]["type"] == "closed"
    assert [x["seq"] for x in lines[1:]] == sorted(x["seq"] for x in lines[1:])
    out_file = tmp_path / "export.jsonl"
    assert vfmig("journal", "export", str(path), "--json", "-o", str(out_file))[0] == 0
    assert "hex" not in out_file.read_text()
    status, _, err = vfmig("journal", "export", str(path), "--json", "-o", str(out_file))
    assert status == 1
    assert "cannot create" in err
    with pytest.raises(SystemExit) as info:  # argparse: a format must be named
        vfmig("journal", "export", str(path))
    assert info.value.code == 2


def test_diagnose(rejected: Path) -> None:
    status, out, _ = vfmig("journal", "diagnose", str(rejected))
    assert status == 1
    assert "verdict: the destination rejected the stream at RESUMING>STOP (outcome failed)" in out
    assert "first failure: dst0, phase resume, step RESUMING>STOP, EINVAL" in out
    assert "state before: RESUMING by ioctl, RESUMING by debugfs" in out
    status, out, _ = vfmig("journal", "diagnose", str(rejected), "--json")
    result = json.loads(out)["result"]
    assert result["cause"] == "stream-rejected"
    assert result["errno"] == errno.EINVAL
    assert result["before"] == {"ioctl": "RESUMING", "debugfs": "RESUMING"}


def test_diagnose_a_completed_run(tmp_path: Path) -> None:
    path = write(tmp_path / "ok.vfj", list(synthetic.run(synthetic.Scenario(size=4 << 20))))
    status, out, _ = vfmig("journal", "diagnose", str(path))
    assert status == 0
    assert "verdict: the run completed" in out


def test_merge(tmp_path: Path, run_rejected: list[synthetic.Observation]) -> None:
    on_a = [o for o in run_rejected if o.host != synthetic.DESTINATION_HOST]
    on_b = [o for o in run_rejected if o.host == synthetic.DESTINATION_HOST]
    a = write(tmp_path / "a.vfj", on_a, host="hostA")
    b = write(tmp_path / "b.vfj", on_b, host="hostB", skew=2 * S)
    out_path = tmp_path / "m.vfj"
    status, out, _ = vfmig("journal", "merge", str(a), str(b), "-o", str(out_path))
    assert status == 0
    assert "hostB (agent), offset -2.000" in out
    assert "(chunk pairs, 64 chunk pairs)" in out
    assert f"wrote {len(run_rejected)} records" in out
    assert vfmig("journal", "verify", str(out_path))[0] == 0
    status, out, _ = vfmig("journal", "diagnose", str(out_path))
    assert "the destination rejected the stream" in out
    assert vfmig("journal", "merge", str(a), "-o", str(tmp_path / "x.vfj"))[0] == 2


def test_at_last_reads_the_newest_journal_of_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_rejected: list[synthetic.Observation]
) -> None:
    monkeypatch.setattr(store, "default_dir", lambda: tmp_path / "store")
    status, _, err = vfmig("journal", "info", "@last")
    assert status == 1
    assert "no journal in" in err
    (tmp_path / "store").mkdir()
    write(tmp_path / "store" / "20260101T000000.000000Z-orchestrator-r1.vfj", run_rejected)
    status, out, _ = vfmig("journal", "verify", "@last")
    assert status == 0
    assert "20260101T000000.000000Z-orchestrator-r1.vfj: intact" in out
