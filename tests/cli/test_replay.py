"""``vfmig replay``: the timeline of a journal, its filters, seeking and the JSON form."""

from __future__ import annotations

import errno
import io
import json
from typing import TYPE_CHECKING

import pytest

from vfmig.cli.context import Environment
from vfmig.cli.main import main
from vfmig.core.model import destination, source
from vfmig.journal import synthetic
from vfmig.journal.codec import DeviceInfo, JournalHeader
from vfmig.journal.writer import JournalWriter

if TYPE_CHECKING:
    from pathlib import Path

S = 1_000_000_000


def vfmig(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), Environment(stdout=out, stderr=err, stdout_isatty=False))
    return status, out.getvalue(), err.getvalue()


def journal_of(path: Path, scenario: synthetic.Scenario, **options: int) -> Path:
    header = JournalHeader(
        host="orchestrator",
        role="orchestrator",
        run_id="r1",
        kernel="6.12",
        start_wall_ns=1_764_000_000 * S,
        start_mono_ns=0,
        devices=(
            DeviceInfo(id=source(0), spec="sim:a0,size=64MiB"),
            DeviceInfo(id=destination(0), spec="sim:b0"),
        ),
    )
    clock = [0]
    with JournalWriter.create(
        path, header, mono_clock=lambda: clock[0], wall_clock=lambda: clock[0], **options
    ) as writer:
        for o in synthetic.run(scenario):
            clock[0] = o.at_ns
            writer.append(o.event, at_ns=o.at_ns, origin=o.host)
    return path


REJECTED = synthetic.Scenario(
    faults=synthetic.Faults(set_fail={(destination(0), "RESUMING>STOP"): errno.EINVAL})
)


@pytest.fixture
def rejected(tmp_path: Path) -> Path:
    return journal_of(tmp_path / "r.vfj", REJECTED, frame_bytes=1024, snapshot_interval_ns=S // 200)


def test_timeline_and_summary(rejected: Path) -> None:
    status, out, err = vfmig("replay", str(rejected))
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].endswith(
        "run r1, orchestrator on orchestrator, started 2025-11-24 16:00:00.000 UTC"
    )
    assert "  src0 = sim:a0,size=64MiB" in lines
    assert any(line.endswith("orchestrator phase precopy") for line in lines)
    assert any("hostB        dst0 RUNNING -> RESUMING (RUNNING>RESUMING)" in line for line in lines)
    assert any("decision downtime: estimated stop-copy time" in line for line in lines)
    assert any("ERROR dst0 [resume] RESUMING>STOP" in line for line in lines)
    assert any("stopcopy took 56.0 MiB in" in line for line in lines)
    assert "failed in 43 ms" in lines
    assert any(line.startswith("src0 sim:a0 ") and "64.0 MiB" in line for line in lines)
    assert not any("journal:" in line for line in lines)


def test_device_and_phase_filters(rejected: Path) -> None:
    _, out, _ = vfmig("replay", str(rejected), "--device", "src0")
    assert "src0 RUNNING -> PRE_COPY" in out
    assert "dst0 RUNNING -> RESUMING" not in out
    assert "phase precopy" in out  # phases stay, for context
    _, out, _ = vfmig("replay", str(rejected), "--phase", "rollback")
    timeline = [line for line in out.splitlines() if line.startswith(" ") and "s  " in line]
    assert any("dst0 RESUMING -> RUNNING (reset)" in line for line in timeline)
    assert not any("RUNNING>PRE_COPY" in line for line in timeline)


def test_time_window_seeks_from_a_snapshot(rejected: Path) -> None:
    _, whole, _ = vfmig("replay", str(rejected), "--json")
    _, window, _ = vfmig("replay", str(rejected), "--since", "40ms", "--until", "42ms", "--json")
    full = json.loads(whole)["result"]
    part = json.loads(window)["result"]
    expected = [i for i in full["timeline"] if 40_000_000 <= i["t_ns"] <= 42_000_000]
    assert part["timeline"] == expected
    assert expected
    # the summary folded from the snapshot matches the whole run's up to the window's end
    assert part["summary"]["devices"] == full["summary"]["devices"]


def test_json_envelope(rejected: Path) -> None:
    status, out, _ = vfmig("replay", str(rejected), "--json")
    assert status == 0
    doc = json.loads(out)
    assert doc["command"] == "replay"
    result = doc["result"]
    assert result["header"]["run_id"] == "r1"
    assert result["summary"]["outcome"] == "failed"
    assert result["status"]["intact"]
    first = result["timeline"][0]
    assert first["event"] == {
        "type": "PhaseChanged",
        "tag": 12,
        "fields": {"phase": "preflight", "previous": None},
    }
    assert first["host"] == "orchestrator"


def test_a_cut_journal_is_replayed_up_to_its_damage(rejected: Path, tmp_path: Path) -> None:
    data = rejected.read_bytes()
    cut = tmp_path / "cut.vfj"
    cut.write_bytes(data[: len(data) * 2 // 3])
    status, out, _ = vfmig("replay", str(cut))
    assert status == 0
    assert "journal: cut short at byte" in out
    assert "unfinished in" in out


def test_bad_arguments(rejected: Path, tmp_path: Path) -> None:
    assert vfmig("replay", str(rejected), "--device", "gpu0")[0] == 2
    status, _, err = vfmig("replay", str(rejected), "--since", "soon")
    assert status == 2
    assert "--since" in err
    status, _, err = vfmig("replay", str(tmp_path / "missing.vfj"))
    assert status == 1
    assert "cannot open journal" in err
