"""The agent's ledger (vfmig.engine.ledger): what it writes, how, and how it reads back."""

from __future__ import annotations

import json
import stat
from typing import TYPE_CHECKING

import pytest

from vfmig.core.model import Role
from vfmig.core.spec import parse_spec
from vfmig.engine import ledger as lg
from vfmig.engine.ledger import Ledger, LedgerDevice, LedgerError, LedgerState

if TYPE_CHECKING:
    from pathlib import Path

SRC = LedgerDevice("sim:a", "sim:a,state-dir=a", Role.SOURCE, ("src0",))
DST = LedgerDevice("sim:b", "sim:b,state-dir=b", Role.DESTINATION, ("dst0",))
DST2 = LedgerDevice("sim:c", "sim:c,state-dir=c", Role.DESTINATION, ("dst0",))


async def test_changes_are_written_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "agent.ledger"
    logged: list[str] = []
    ledger = Ledger(path, logged.append)
    await ledger.open_device("r1", SRC)
    await ledger.open_device("r1", DST)
    await ledger.stopcopy("r1", "sim:a", "127.0.0.1:7301")
    await ledger.open_device("r2", DST2)
    await ledger.verdict("r2", True)
    back = lg.load(path, logged.append)
    assert back.runs == {
        "r1": (
            LedgerDevice(
                "sim:a", "sim:a,state-dir=a", Role.SOURCE, ("src0",), "127.0.0.1:7301", True
            ),
            DST,
        ),
        "r2": (DST2,),
    }
    assert back.verdicts == {"r2": True}
    # released: the entry goes, the verdict stays; one device kept in doubt stays
    await ledger.keep_only("r2", set(), None)
    await ledger.keep_only("r1", {"sim:a"}, None)
    back = lg.load(path, logged.append)
    assert set(back.runs) == {"r1"}
    assert [d.handle for d in back.runs["r1"]] == ["sim:a"]
    assert back.verdicts == {"r2": True}
    assert Ledger(path, logged.append).committed("r2") is True
    assert logged == []


async def test_the_file_is_private_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "agent.ledger"
    await Ledger(path, print).open_device("r1", SRC)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_no_secret_is_written(tmp_path: Path) -> None:
    token = "4e0d5a7c-41c1-4d8e-9d55-5a6a0e6e9c11"
    spec = parse_spec(f"vfio:0000:3b:00.1,vf-token={token},iommu=cdev")
    public = lg.public_spec(spec)
    assert token not in public
    assert parse_spec(public).option("iommu") == "cdev"
    path = tmp_path / "agent.ledger"
    device = LedgerDevice("vfio:0000:3b:00.1", public, Role.SOURCE, ("src0",))
    await Ledger(path, print).open_device("r1", device)
    assert token not in path.read_text()


async def test_a_torn_write_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "agent.ledger"
    await Ledger(path, print).open_device("r1", SRC)
    torn = tmp_path / ".agent.ledger.tmp"  # a crash between the write and the rename
    torn.write_bytes(lg.encode(LedgerState({"r9": (DST,)}))[:40])
    logged: list[str] = []
    assert lg.load(path, logged.append).runs == {"r1": (SRC,)}
    assert not torn.exists()
    assert logged == []


@pytest.mark.parametrize(
    "content",
    [b"\x00garbage", b'{"version": 99, "runs": {}, "verdicts": []}', b'{"version": 1}'],
    ids=["not-json", "other-version", "incomplete"],
)
def test_a_corrupt_ledger_is_kept_aside_and_the_agent_starts_empty(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "agent.ledger"
    path.write_bytes(content)
    logged: list[str] = []
    assert lg.load(path, logged.append) == LedgerState()
    assert (tmp_path / "agent.ledger.corrupt").read_bytes() == content
    assert not path.exists()
    assert len(logged) == 1
    assert "unreadable" in logged[0]
    assert "vfmig recover" in logged[0]


def test_decode_names_what_is_wrong() -> None:
    document = {"version": 1, "runs": {"r1": [{"handle": 3}]}, "verdicts": []}
    with pytest.raises(LedgerError, match="malformed"):
        lg.decode(json.dumps(document).encode())


async def test_verdicts_are_bounded_but_a_run_in_flight_keeps_its_own(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "agent.ledger", print)
    await ledger.open_device("first", SRC)
    await ledger.verdict("first", True)
    for i in range(lg.KEEP_VERDICTS + 10):
        ledger.state.verdicts[f"old{i}"] = False
    await ledger.keep_only("last", set(), False)
    verdicts = lg.load(ledger.path, print).verdicts
    assert len(verdicts) == lg.KEEP_VERDICTS
    assert verdicts["first"] is True  # its devices are still held
    assert verdicts["last"] is False
    assert "old0" not in verdicts


async def test_a_ledger_that_cannot_be_written_is_logged_once(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    logged: list[str] = []
    ledger = Ledger(tmp_path / "file" / "agent.ledger", logged.append)
    await ledger.open_device("r1", SRC)
    await ledger.open_device("r1", DST)
    assert len(logged) == 2
    assert "cannot read it" in logged[0]
    assert "cannot write it" in logged[1]


def test_the_default_name_follows_the_listen_address(tmp_path: Path) -> None:
    assert lg.default_path(tmp_path, "127.0.0.1", 7300).name == "agent-127.0.0.1-7300.ledger"
    assert lg.default_path(tmp_path, "::1", 7300).name == "agent-__1-7300.ledger"


async def test_a_device_opened_again_leaves_its_older_run(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "agent.ledger", print)
    await ledger.open_device("old", SRC)
    await ledger.open_device("old", DST)
    await ledger.open_device("new", SRC)  # brought back by hand, then migrated again
    assert lg.load(ledger.path, print).runs == {"old": (DST,), "new": (SRC,)}
    await ledger.open_device("newer", DST)
    assert lg.load(ledger.path, print).runs == {"new": (SRC,), "newer": (DST,)}
