"""The kernel's own ``vfio_mig_get_next_state()``, compiled with gcc, against ``fsm.path()``.

The function and its two static tables are cut out of Debian's ``drivers/vfio/vfio_main.c``
by text (its signature to the matching closing brace, plus its ``EXPORT_SYMBOL_GPL`` line)
and compiled into ``vfio_fsm_harness.c`` with a handful of shims and the enum and flag
values of the same source's ``include/uapi/linux/vfio.h`` (the system's header is older and
lacks PRE_COPY). The harness drives it as drivers do, ``while (cur != new)`` one step at a
time, for every flag set x current state x target 0..8 and prints each outcome; every loop
is capped, so a request on which the kernel would spin forever is reported as HANG.

The skip loop gained a guard in 2026 ("vfio: prevent infinite loop in
vfio_mig_get_next_state() on blocked arc"): without it STOP_COPY -> PRE_COPY* never returns.
``fsm.path()`` models the fixed function. Whatever the source holds, the tests build both
variants from it (guard removed, guard present) to show the harness tells them apart, and
say which one the Debian source is.

Needs the ``kernel_source`` fixture and gcc: skipped locally without them, failed under CI.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vfmig.core import fsm
from vfmig.core.fsm import DeviceState, MigrationFlags

if TYPE_CHECKING:
    from collections.abc import Callable

HARNESS = "vfio_fsm_harness.c"
FUNCTION = "vfio_mig_get_next_state"
#: The guard the 2026 fix put into the skip loop, as it reads in the fixed source.
FIX_GUARD = "*next_fsm != VFIO_DEVICE_STATE_ERROR &&"
FIX_GUARD_RE = re.compile(r"\*next_fsm\s*!=\s*VFIO_DEVICE_STATE_ERROR\s*&&\s*")
#: First stable 6.12 release with the fix (vfio-migration.md §2).
FIRST_FIXED_6_12 = (6, 12, 96)
TARGETS = range(fsm.NUM_STATES + 1)  # 0..8: one beyond the last state

Key = tuple[int, int, int]  # (flags, cur, new)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One line of the harness: what the drivers' loop ended with, and the steps taken."""

    result: str  # OK, EINVAL, E<n> or HANG
    warnings: int  # WARN_ON()s that fired
    steps: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class KernelSource:
    version: str  # the Debian package version, e.g. 6.12.117-1~deb12u1
    uapi_header: Path
    function: str  # the extracted text, tables included

    @property
    def upstream(self) -> tuple[int, ...]:
        match = re.match(r"(\d+)\.(\d+)\.(\d+)", self.version)
        assert match, f"unexpected kernel source version {self.version!r}"
        return tuple(int(part) for part in match.groups())


# --- cutting the function out of vfio_main.c ---------------------------------------------


def code_mask(text: str) -> str:
    """``text`` with comments and string/char literals blanked (same length): code only."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        if text.startswith("/*", i):
            end = text.index("*/", i + 2) + 2
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
        elif text[i] in "\"'":
            end = i + 1
            while text[end] != text[i]:
                end += 2 if text[end] == "\\" else 1
            end += 1
        else:
            i += 1
            continue
        for j in range(i, end):
            if out[j] != "\n":
                out[j] = " "
        i = end
    return "".join(out)


def matching(code: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket matching the one at ``start``."""
    depth = 0
    for i in range(start, len(code)):
        if code[i] == open_:
            depth += 1
        elif code[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    raise AssertionError(f"unbalanced {open_}{close} from offset {start}")


def extract_function(text: str, name: str) -> str:
    """The definition of ``name`` (return type to closing brace) and its EXPORT line."""
    code = code_mask(text)
    signature = re.search(rf"^[a-z][\w ]*\b{name}\(", code, re.MULTILINE)
    assert signature, f"no definition of {name}() found"
    body = code.index("{", matching(code, signature.end() - 1, "(", ")"))
    end = matching(code, body, "{", "}")
    export = re.compile(rf"\s*EXPORT_SYMBOL(_GPL)?\({name}\);").match(code, end)
    if export:
        end = export.end()
    return text[signature.start() : end] + "\n"


def skip_loops(function: str) -> list[str]:
    """Every ``while`` statement of the function: its condition and its body."""
    code = code_mask(function)
    loops = []
    for match in re.finditer(r"\bwhile\s*\(", code):
        after = matching(code, match.end() - 1, "(", ")")
        stmt_end = code.index(";", after) + 1
        if code[after:].lstrip().startswith("{"):
            stmt_end = matching(code, code.index("{", after), "{", "}")
        loops.append(function[match.start() : stmt_end])
    return loops


def has_fix(function: str) -> bool:
    """Whether the skip loop stops on the ERROR sentinel (the 2026 fix)."""
    (loop,) = skip_loops(function)
    return "VFIO_DEVICE_STATE_ERROR" in code_mask(loop)


def without_fix(function: str) -> str:
    (loop,) = skip_loops(function)
    return function.replace(loop, FIX_GUARD_RE.sub("", loop))


def with_fix(function: str) -> str:
    unfixed = without_fix(function)
    (loop,) = skip_loops(unfixed)
    return unfixed.replace(loop, re.sub(r"^while\s*\(", f"while ({FIX_GUARD} ", loop))


# --- compiling and running ---------------------------------------------------------------


def run_harness(source: KernelSource, function: str, workdir: Path) -> dict[Key, Outcome]:
    workdir.mkdir()
    (workdir / "vfio_next_state.c").write_text(function)
    exe = workdir / "harness"
    compiled = subprocess.run(
        [
            "gcc",
            "-std=gnu11",
            "-O1",
            "-Wall",
            "-Wextra",
            f'-DVFIO_UAPI_H="{source.uapi_header}"',
            "-I",
            str(workdir),
            "-o",
            str(exe),
            str(Path(__file__).with_name(HARNESS)),
        ],
        capture_output=True,
        text=True,
    )
    assert compiled.returncode == 0, (
        f"Debian {source.version}: the extracted {FUNCTION}() does not compile:\n{compiled.stderr}"
    )
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True)
    outcomes: dict[Key, Outcome] = {}
    for line in ran.stdout.splitlines():
        flags, cur, new, result, warnings, *steps = line.split()
        key = (int(flags), int(cur), int(new))
        assert key not in outcomes, f"harness printed {key} twice"
        outcomes[key] = Outcome(result, int(warnings), tuple(int(s) for s in steps))
    return outcomes


@pytest.fixture(scope="module")
def source(kernel_source: Path, prerequisite: Callable[[str], None]) -> KernelSource:
    if shutil.which("gcc") is None:
        prerequisite("gcc is needed to compile the kernel's vfio_mig_get_next_state()")
    version_file = kernel_source / "VERSION"
    version = version_file.read_text().strip() if version_file.exists() else "unknown"
    text = (kernel_source / "drivers" / "vfio" / "vfio_main.c").read_text()
    return KernelSource(
        version=version,
        uapi_header=kernel_source / "include" / "uapi" / "linux" / "vfio.h",
        function=extract_function(text, FUNCTION),
    )


@pytest.fixture(scope="module")
def outcomes(
    source: KernelSource, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[Key, Outcome]]:
    """The harness's outcomes for the source as it is and for both variants of the fix."""
    root = tmp_path_factory.mktemp("vfio_fsm")
    return {
        "as is": run_harness(source, source.function, root / "as_is"),
        "fixed": run_harness(source, with_fix(source.function), root / "fixed"),
        "unfixed": run_harness(source, without_fix(source.function), root / "unfixed"),
    }


def expected(flags: MigrationFlags, cur: DeviceState, new: int) -> Outcome:
    """What fsm.path() predicts for the fixed kernel, in the harness's terms."""
    result = fsm.path(cur, new, flags)
    warned = cur != new and not fsm.supports(cur, flags)  # WARN_ON: invalid current state
    if result.errno is None:
        return Outcome("OK", 0, tuple(int(s) for s in result.states))
    return Outcome("EINVAL", int(warned), ())


def all_keys() -> list[tuple[MigrationFlags, DeviceState, int]]:
    return [(f, c, n) for f in fsm.FLAG_SETS for c in DeviceState for n in TARGETS]


def describe(key: Key) -> str:
    flags, cur, new = key
    target = DeviceState(new).name if new < fsm.NUM_STATES else str(new)
    return f"[{fsm.flag_names(MigrationFlags(flags))}] {DeviceState(cur).name}->{target}"


# --- the tests ---------------------------------------------------------------------------


def test_the_function_is_cut_out_whole(source: KernelSource) -> None:
    text = source.function
    assert text.startswith(f"int {FUNCTION}(struct vfio_device *device,"), source.version
    assert text.rstrip().endswith(f"EXPORT_SYMBOL_GPL({FUNCTION});"), source.version
    assert "static const u8 vfio_from_fsm_table" in text, source.version
    assert "static const unsigned int state_flags_table" in text, source.version
    assert len(skip_loops(text)) == 1, f"Debian {source.version}: the harness caps one loop"


def test_the_kernel_function_agrees_with_path_everywhere(
    source: KernelSource, outcomes: dict[str, dict[Key, Outcome]]
) -> None:
    """Every (flags, from, to) with targets 0..8: same steps, same errno, same WARN_ON."""
    kernel = outcomes["as is"]
    fixed = has_fix(source.function)
    assert len(kernel) == len(all_keys()) == 4 * 8 * 9
    mismatches = []
    for flags, cur, new in all_keys():
        key = (int(flags), int(cur), new)
        want = expected(flags, cur, new)
        if not fixed and (cur, new) in fsm.VFMIG_REFUSALS and fsm.supports(new, flags):
            want = Outcome("HANG", 0, ())
        if kernel[key] != want:
            mismatches.append(f"{describe(key)}: kernel {kernel[key]}, vfmig {want}")
    counts = {r: sum(o.result == r for o in kernel.values()) for r in ("OK", "EINVAL", "HANG")}
    print(f"Debian {source.version} {FUNCTION}() vs fsm.path(): {len(kernel)} requests, {counts}")
    assert not mismatches, (
        f"Debian {source.version}: {len(mismatches)} of {len(kernel)} requests differ from "
        "fsm.path():\n" + "\n".join(mismatches[:20])
    )


def test_the_fixed_function_is_what_path_models(
    source: KernelSource, outcomes: dict[str, dict[Key, Outcome]]
) -> None:
    fixed = outcomes["fixed"]
    for flags, cur, new in all_keys():
        key = (int(flags), int(cur), new)
        assert fixed[key] == expected(flags, cur, new), (
            f"Debian {source.version} with the fix: {describe(key)}"
        )


def test_the_harness_catches_the_hang_of_unfixed_kernels(
    source: KernelSource, outcomes: dict[str, dict[Key, Outcome]]
) -> None:
    """Without the guard, exactly the blocked arcs to a state the device has spin forever."""
    unfixed, fixed = outcomes["unfixed"], outcomes["fixed"]
    hangs = {key for key, outcome in unfixed.items() if outcome.result == "HANG"}
    blocked = {
        (int(f), int(cur), int(new))
        for f in fsm.FLAG_SETS
        for cur, new in fsm.VFMIG_REFUSALS
        if fsm.supports(new, f)
    }
    assert hangs == blocked, f"Debian {source.version} without the fix"
    assert blocked == {(5, 3, 6), (7, 3, 6), (7, 3, 7)}
    for key in set(unfixed) - hangs:
        assert unfixed[key] == fixed[key], f"Debian {source.version}: {describe(key)}"


def test_the_debian_source_has_the_2026_fix(
    source: KernelSource, outcomes: dict[str, dict[Key, Outcome]]
) -> None:
    """Debian 6.12.117 (>= 6.12.96) holds the fix: STOP_COPY -> PRE_COPY is EINVAL, no hang.

    The text of the skip loop and the compiled behaviour must agree either way; the version
    says which way is expected.
    """
    fixed = has_fix(source.function)
    (loop,) = skip_loops(source.function)
    verdict = outcomes["as is"][
        (int(fsm.FLAG_SETS[-1]), DeviceState.STOP_COPY, DeviceState.PRE_COPY)
    ]
    what = "EINVAL (fixed)" if fixed else "HANG (unfixed)"
    assert verdict.result == ("EINVAL" if fixed else "HANG"), (
        f"Debian {source.version}: the skip loop reads {'fixed' if fixed else 'unfixed'} "
        f"but the compiled function gives {verdict.result} for STOP_COPY->PRE_COPY:\n{loop}"
    )
    assert fixed is (source.upstream >= FIRST_FIXED_6_12), (
        f"Debian {source.version}: expected the fix from 6.12.96 on; the source gives {what}:\n"
        f"{loop}"
    )


def test_the_kernel_tables_are_transcribed_line_by_line(source: KernelSource) -> None:
    """vfio_from_fsm_table and state_flags_table parsed from the source, entry by entry."""
    code = code_mask(source.function)
    table_start = code.index("vfio_from_fsm_table[VFIO_DEVICE_NUM_STATES]")
    table = code[table_start : matching(code, code.index("{", table_start), "{", "}")]
    parsed: dict[DeviceState, dict[DeviceState, DeviceState]] = {}
    row: dict[DeviceState, DeviceState] = {}
    for line in table.splitlines():
        if m := re.match(r"\s*\[VFIO_DEVICE_STATE_(\w+)\] = \{", line):
            row = parsed.setdefault(DeviceState[m[1]], {})
        elif m := re.match(r"\s*\[VFIO_DEVICE_STATE_(\w+)\] = VFIO_DEVICE_STATE_(\w+),", line):
            row[DeviceState[m[1]]] = DeviceState[m[2]]
    assert parsed == fsm.KERNEL_TABLE, f"Debian {source.version}"

    flags_start = code.index("state_flags_table[VFIO_DEVICE_NUM_STATES]")
    flags_table = code[flags_start : code.index("};", flags_start)]
    required: dict[DeviceState, MigrationFlags | None] = {}
    for m in re.finditer(r"\[VFIO_DEVICE_STATE_(\w+)\]\s*=\s*([^,]+),", flags_table):
        value = " ".join(m[2].split())
        names = [p.strip().removeprefix("VFIO_MIGRATION_") for p in value.split("|")]
        required[DeviceState[m[1]]] = (
            None if value == "~0U" else MigrationFlags(sum(MigrationFlags[name] for name in names))
        )
    assert required == fsm.REQUIRED_FLAGS, f"Debian {source.version}"


def comment_list(function: str, start: str, stop: str) -> set[tuple[DeviceState, ...]]:
    """The ``A -> B -> C`` lines of the function's comment between two phrases."""
    section = function[function.index(start) : function.index(stop)]
    found = set()
    for m in re.finditer(r"^\s*\*\s+([A-Z_0-9]+(?: -> [A-Z_0-9]+)+)\s*$", section, re.MULTILINE):
        found.add(tuple(DeviceState[name] for name in m[1].split(" -> ")))
    return found


def test_the_kernel_comment_lists_the_same_combination_arcs(source: KernelSource) -> None:
    """The comment's multi-step paths "if all optional features are supported", and its
    blocked transitions, against path() and VFMIG_REFUSALS."""
    every = fsm.FLAG_SETS[-1]
    combinations = comment_list(
        source.function, "will step through multiple states", "The following transitions"
    )
    ours = set()
    for cur in DeviceState:
        for new in DeviceState:
            result = fsm.path(cur, new, every)
            if len(result.arcs) > 1:
                ours.add((cur, *result.states))
    assert combinations == ours, f"Debian {source.version}"
    assert len(ours) == 25
    blocked = comment_list(source.function, "The following transitions", "static const u8")
    assert blocked == set(fsm.VFMIG_REFUSALS), f"Debian {source.version}"
