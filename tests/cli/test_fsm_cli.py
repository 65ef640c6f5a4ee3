"""``vfmig fsm``: the bare JSON list, the grids, the Graphviz arcs and ``fsm path``.

Expected answers are re-derived here from vfio-migration.md §2 (table, skip loop, drivers'
loop) and §3 (which arcs open a data fd), without vfmig.core.fsm, so the command is checked
against the document rather than against the code it prints.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.cli.context import Environment
from vfmig.cli.main import main

if TYPE_CHECKING:
    from pathlib import Path

STATES = ["ERROR", "STOP", "RUNNING", "STOP_COPY", "RESUMING", "RUNNING_P2P", "PRE_COPY"]
STATES.append("PRE_COPY_P2P")
ABBREV = dict(zip(["ER", "ST", "RU", "SC", "RS", "RP", "PC", "PP"], STATES, strict=True))
FLAG_SETS = [
    ["STOP_COPY"],
    ["STOP_COPY", "P2P"],
    ["STOP_COPY", "PRE_COPY"],
    ["STOP_COPY", "P2P", "PRE_COPY"],
]
NEEDS = {
    "STOP": {"STOP_COPY"},
    "RUNNING": {"STOP_COPY"},
    "STOP_COPY": {"STOP_COPY"},
    "RESUMING": {"STOP_COPY"},
    "RUNNING_P2P": {"STOP_COPY", "P2P"},
    "PRE_COPY": {"STOP_COPY", "PRE_COPY"},
    "PRE_COPY_P2P": {"STOP_COPY", "P2P", "PRE_COPY"},
}
DOC_TABLE = """
     ST RU SC RS RP PC PP
  ST =  RP SC RS RP RP RP
  RU RP =  RP RP RP PC RP
  SC ST ST =  ST ST ER ER
  RS ST ST ST =  ST ST ST
  RP ST RU ST ST =  RU PP
  PC RU RU PP RU RU =  PP
  PP RP RP SC RP RP PC =
"""
SAVING = {"PRE_COPY", "PRE_COPY_P2P", "STOP_COPY"}
HAS_FD = SAVING | {"RESUMING"}
KEYS = ["flags", "from", "to", "path", "errno", "vfmig_refusal"]


def doc_table() -> dict[tuple[str, str], str]:
    header, *rows = DOC_TABLE.split("\n")[1:-1]
    table = {}
    for row in rows:
        cur, *cells = row.split()
        for new, step in zip(header.split(), cells, strict=True):
            table[(ABBREV[cur], ABBREV[new])] = ABBREV[cur] if step == "=" else ABBREV[step]
    return table


TABLE = doc_table()


def derive(flags: list[str], cur: str, new: str) -> list[str] | None:
    """The states a SET walks (§2), or None for EINVAL."""

    def has(state: str) -> bool:
        return state in NEEDS and NEEDS[state] <= set(flags)

    if cur == new:
        return []
    if not has(cur) or not has(new):
        return None
    steps, here = [], cur
    while here != new:
        step = TABLE[(here, new)]
        while step != "ERROR" and not has(step):
            step = TABLE[(step, new)]
        if step == "ERROR":
            return None
        steps.append(step)
        here = step
    return steps


def returns_fd(cur: str, steps: list[str]) -> bool:
    """§3: the SET returns an fd when its last arc enters the saving group or RESUMING."""
    before = [cur, *steps][-2]
    return bool(steps) and steps[-1] in HAS_FD and before not in HAS_FD


def vfmig(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), Environment(stdout=out, stderr=err, stdout_isatty=False))
    return status, out.getvalue(), err.getvalue()


# --- vfmig fsm --json --------------------------------------------------------------------


def test_json_is_the_bare_list_of_256_objects() -> None:
    status, out, err = vfmig("fsm", "--json")
    assert (status, err) == (0, "")
    rows: list[dict[str, Any]] = json.loads(out)
    assert isinstance(rows, list)
    assert len(rows) == 256
    order = [(f, c, n) for f in FLAG_SETS for c in STATES for n in STATES]
    assert [(r["flags"], r["from"], r["to"]) for r in rows] == order
    for row in rows:
        assert list(row) == KEYS, row
        steps = derive(row["flags"], row["from"], row["to"])
        where = f"{row['flags']} {row['from']}->{row['to']}"
        if steps is None:
            assert (row["path"], row["errno"]) == ([], "EINVAL"), where
            assert isinstance(row["vfmig_refusal"], str), where
            assert row["vfmig_refusal"], where
        else:
            assert (row["path"], row["errno"], row["vfmig_refusal"]) == (steps, None, None), where
    blocked = [
        r
        for r in rows
        if TABLE.get((r["from"], r["to"])) == "ERROR" and NEEDS[r["to"]] <= set(r["flags"])
    ]
    assert len(blocked) == 3  # STOP_COPY -> PRE_COPY (2 flag sets), -> PRE_COPY_P2P (1)
    for row in blocked:
        assert "blocked arc" in row["vfmig_refusal"]


def test_the_issue_example_object() -> None:
    rows = json.loads(vfmig("fsm", "--json")[1])
    assert {
        "flags": ["STOP_COPY", "P2P"],
        "from": "RUNNING",
        "to": "RESUMING",
        "path": ["RUNNING_P2P", "STOP", "RESUMING"],
        "errno": None,
        "vfmig_refusal": None,
    } in rows


def test_json_for_one_flag_set() -> None:
    status, out, _ = vfmig("fsm", "--json", "--flags", "stop-copy+pre-copy")
    rows = json.loads(out)
    assert status == 0
    assert len(rows) == 64
    assert all(r["flags"] == ["STOP_COPY", "PRE_COPY"] for r in rows)


def test_json_from_a_real_process(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vfmig", "fsm", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout) == json.loads(vfmig("fsm", "--json")[1])


# --- grids and Graphviz ------------------------------------------------------------------


def parse_grids(out: str) -> dict[str, dict[tuple[str, str], str]]:
    grids: dict[str, dict[tuple[str, str], str]] = {}
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("flags "):
            columns = lines[i + 1].split()[1:]
            cells = {}
            for row in lines[i + 2 : i + 10]:
                cur, *values = row.split()
                for new, value in zip(columns, values, strict=True):
                    cells[(ABBREV[cur], ABBREV[new])] = value
            grids[line.removeprefix("flags ")] = cells
    return grids


def expected_cell(flags: list[str], cur: str, new: str) -> str:
    steps = derive(flags, cur, new)
    if cur == new:
        return "="
    if steps is None:
        blocked = TABLE.get((cur, new)) == "ERROR" and NEEDS[new] <= set(flags)
        return "blocked" if blocked else "-"
    names = {v: k for k, v in ABBREV.items()}
    return ">".join(names[s] for s in steps) + ("*" if returns_fd(cur, steps) else "")


def test_grid_per_flag_set() -> None:
    status, out, err = vfmig("fsm")
    assert (status, err) == (0, "")
    grids = parse_grids(out)
    assert list(grids) == ["+".join(f) for f in FLAG_SETS]
    for flags in FLAG_SETS:
        cells = grids["+".join(flags)]
        for cur in STATES:
            for new in STATES:
                want = expected_cell(flags, cur, new)
                assert cells[(cur, new)] == want, f"{flags} {cur}->{new}"
    every = grids["STOP_COPY+P2P+PRE_COPY"]
    assert every[("RUNNING", "STOP_COPY")] == "RP>ST>SC*"
    assert every[("PRE_COPY", "STOP_COPY")] == "PP>SC"
    assert every[("STOP_COPY", "PRE_COPY")] == "blocked"
    assert "blocked" in out.split("flags ")[0]  # the legend explains every mark


def test_grid_for_one_flag_set() -> None:
    _, out, _ = vfmig("fsm", "--flags", "STOP_COPY")
    assert list(parse_grids(out)) == ["STOP_COPY"]


def dot_edges(out: str) -> dict[tuple[str, str], str]:
    edges = {}
    for m in re.finditer(r"^  (\w+) -> (\w+)( \[.*\])?;$", out, re.MULTILINE):
        edges[(m[1], m[2])] = m[3] or ""
    return edges


@pytest.mark.parametrize("flags", FLAG_SETS, ids="+".join)
def test_dot_draws_the_single_arcs(flags: list[str]) -> None:
    status, out, _ = vfmig("fsm", "--dot", "--flags", "+".join(flags))
    assert status == 0
    assert out.splitlines()[1] == "digraph vfio_migration {"
    assert out.rstrip().endswith("}")
    assert out.count("{") == out.count("}")
    arcs = set()
    for cur in STATES:
        for new in STATES:
            steps = derive(flags, cur, new) or []
            arcs |= set(zip([cur, *steps], steps, strict=False))
    edges = dot_edges(out)
    blocked = {k for k, attrs in edges.items() if "blocked" in attrs}
    assert set(edges) - blocked == arcs
    if "PRE_COPY" in flags:
        expect = {("STOP_COPY", "PRE_COPY")}
        if "P2P" in flags:
            expect.add(("STOP_COPY", "PRE_COPY_P2P"))
        assert blocked == expect
    else:
        assert blocked == set()
    for (src, dst), attrs in edges.items():
        if (src, dst) in blocked:
            continue
        opens = dst in HAS_FD and src not in HAS_FD
        assert ("opens" in attrs) is opens, (src, dst)
        assert ("closes" in attrs) is (src in HAS_FD and dst not in HAS_FD), (src, dst)
    assert ("PRE_COPY" in out) is ("PRE_COPY" in flags)


def test_dot_defaults_to_every_flag() -> None:
    assert vfmig("fsm", "--dot")[1] == vfmig("fsm", "--dot", "--flags", "stop-copy+p2p+pre-copy")[1]


# --- vfmig fsm path ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["running", "stop_copy"],
            [
                "RUNNING -> STOP_COPY on a device with STOP_COPY+P2P+PRE_COPY",
                "kernel: 3 arcs, then the SET returns a new saving data fd",
                "1. RUNNING > RUNNING_P2P  no data fd",
                "3. STOP > STOP_COPY       opens a saving data fd",
                "read it back",
                "vfmig: allows it",
            ],
        ),
        (
            ["PRE_COPY", "STOP_COPY"],
            [
                "returns no data fd (data_fd -1)",
                "1. PRE_COPY > PRE_COPY_P2P   keeps the saving data fd",
                "2. PRE_COPY_P2P > STOP_COPY  keeps the saving data fd",
            ],
        ),
        (["PC", "SC", "--flags", "stop-copy+pre-copy"], ["1. PRE_COPY > STOP_COPY  keeps"]),
        (
            ["RU", "RS"],
            ["returns a new resuming data fd", "3. STOP > RESUMING        opens a resuming"],
        ),
        (["PC", "RU"], ["1 arc,", "closes the data fd"]),
        (
            ["STOP_COPY", "PRE_COPY"],
            [
                "kernel: EINVAL, the device stays in STOP_COPY",
                "blocked arc",
                "vfmig: refuses it:",
                "loop forever",
            ],
        ),
        (["SC", "PP", "--flags", "stop-copy+pre-copy"], ["PRE_COPY_P2P needs P2P", "lacks P2P"]),
        (["ERROR", "STOP"], ["ERROR is not a valid current state", "only a reset"]),
        (["STOP", "ERROR"], ["ERROR cannot be requested"]),
        (["STOP", "8"], ["STOP -> 8 on", "8 is out of range", "8 is not a migration state"]),
        (["ERROR", "ERROR"], ["already there", "vfmig: allows it"]),
    ],
)
def test_path_explains_a_request(argv: list[str], says: list[str]) -> None:
    status, out, err = vfmig("fsm", "path", *argv)
    assert (status, err) == (0, "")
    for text in says:
        assert text in out, f"{text!r} not in:\n{out}"


def test_path_json_envelope() -> None:
    status, out, _ = vfmig("fsm", "path", "RU", "SC", "--json")
    envelope = json.loads(out)
    assert status == 0
    assert (envelope["command"], envelope["ok"], envelope["error"]) == ("fsm path", True, None)
    assert isinstance(envelope["schema"], int)
    assert envelope["result"] == {
        "flags": ["STOP_COPY", "P2P", "PRE_COPY"],
        "from": "RUNNING",
        "to": "STOP_COPY",
        "path": ["RUNNING_P2P", "STOP", "STOP_COPY"],
        "arcs": [
            {"from": "RUNNING", "to": "RUNNING_P2P", "data_fd": "none"},
            {"from": "RUNNING_P2P", "to": "STOP", "data_fd": "none"},
            {"from": "STOP", "to": "STOP_COPY", "data_fd": "opens_saving"},
        ],
        "returns_data_fd": "saving",
        "errno": None,
        "kernel_reason": None,
        "vfmig_refusal": None,
    }
    refused = json.loads(vfmig("fsm", "path", "SC", "PC", "--json")[1])["result"]
    assert (refused["errno"], refused["path"], refused["arcs"]) == ("EINVAL", [], [])
    assert "blocked arc" in refused["kernel_reason"]
    assert "blocked arc" in refused["vfmig_refusal"]
    beyond = json.loads(vfmig("fsm", "path", "RU", "4294967295", "--json")[1])["result"]
    assert (beyond["to"], beyond["errno"]) == ("4294967295", "EINVAL")


@pytest.mark.parametrize(
    "spelling",
    [
        ["RUNNING", "STOP_COPY", "--flags", "stop-copy+p2p"],
        ["running", "stop-copy", "--flags", "STOP_COPY+P2P"],
        ["Running", "Stop_Copy", "--flags", "p2p,stop-copy"],
        [
            "VFIO_DEVICE_STATE_RUNNING",
            "3",
            "--flags",
            "VFIO_MIGRATION_STOP_COPY|VFIO_MIGRATION_P2P",
        ],
        ["2", "sc", "--flags", "stop-copy+p2p+p2p"],
    ],
)
def test_path_accepts_names_numbers_and_flag_spellings(spelling: list[str]) -> None:
    reference = vfmig("fsm", "path", "RU", "SC", "--flags", "stop-copy+p2p")
    assert reference[0] == 0
    assert vfmig("fsm", "path", *spelling) == reference


def test_options_before_or_after_path() -> None:
    after = vfmig("fsm", "path", "RU", "SC", "--json", "--flags", "stop-copy")
    before = vfmig("fsm", "--json", "--flags", "stop-copy", "path", "RU", "SC")
    assert after == before
    assert json.loads(after[1])["result"]["path"] == ["STOP", "STOP_COPY"]


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fsm", "path", "RUN", "SC"], "unknown current state 'RUN'"),
        (["fsm", "path", "RU", "nowhere"], "unknown target state 'nowhere'"),
        (["fsm", "path", "8", "SC"], "current state '8' is out of range (0-7)"),
        (["fsm", "path", "RU", "4294967296"], "target state '4294967296' is out of range"),
        (["fsm", "path", "RU", "-1"], "unknown target state '-1'"),
        (["fsm", "path", "RU", "SC", "--flags", "p2p"], "lack stop-copy"),
        (["fsm", "path", "RU", "SC", "--flags", "turbo"], "unknown migration flag 'turbo'"),
        (["fsm", "--flags", "stop-copy+"], "an empty migration flag"),
        (["fsm", "--json", "--flags", "x"], "unknown migration flag 'x'"),
        (["fsm", "--dot", "--flags", ""], "an empty migration flag"),
        (["fsm", "--dot", "path", "RU", "SC"], "--dot draws every arc"),
    ],
)
def test_bad_input_is_a_usage_error(argv: list[str], message: str) -> None:
    status, out, err = vfmig(*argv)
    assert status == 2
    assert out == ""
    first, *rest = err.splitlines()
    assert first.startswith("vfmig: error: ")
    assert message in first
    assert all(line.startswith("hint: ") for line in rest)
    assert len(rest) <= 1
    assert "Traceback" not in err


def test_bad_input_with_json_reports_in_the_envelope_too() -> None:
    status, out, err = vfmig("fsm", "path", "RU", "warp", "--json")
    assert status == 2
    envelope = json.loads(out)
    assert (envelope["ok"], envelope["result"]) == (False, None)
    assert envelope["error"]["type"] == "UsageError"
    assert "unknown target state 'warp'" in envelope["error"]["message"]
    assert err.startswith("vfmig: error: unknown target state 'warp'")


def test_json_and_dot_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        vfmig("fsm", "--json", "--dot")
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
