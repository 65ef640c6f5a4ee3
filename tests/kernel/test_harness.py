"""On the host, fast: the pieces of harness.py that need no apt, no build and no QEMU."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from types import ModuleType

KVER = "6.12.117+deb12-amd64"


def symvers(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A Module.symvers with ``(crc, symbol, module)`` rows."""
    lines = [f"{crc}\t{symbol}\t{module}\tEXPORT_SYMBOL_GPL\t" for crc, symbol, module in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pinned_kernel_names_every_package(
    harness: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VFMIG_KERNEL_VERSION", raising=False)
    kernel = harness.pinned_kernel()
    assert (kernel.version, kernel.abi, kernel.kver) == (
        "6.12.117-1~deb12u1",
        "6.12.117+deb12",
        KVER,
    )
    assert kernel.packages() == [
        f"linux-image-{KVER}-unsigned=6.12.117-1~deb12u1",
        f"linux-headers-{KVER}=6.12.117-1~deb12u1",
        "linux-headers-6.12.117+deb12-common=6.12.117-1~deb12u1",
        "linux-kbuild-6.12.117+deb12=6.12.117-1~deb12u1",
    ]


def test_pinned_kernel_from_the_environment(
    harness: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VFMIG_KERNEL_VERSION", "6.12.115-2~deb12u1")
    assert harness.pinned_kernel().kver == "6.12.115+deb12-amd64"
    monkeypatch.setenv("VFMIG_KERNEL_VERSION", "6.1.0-28")
    with pytest.raises(harness.TierError, match=r"not a Debian 6\.12 backport version"):
        harness.pinned_kernel()


@pytest.mark.parametrize(
    ("line", "summary"),
    [
        ("======== 23 passed, 1 skipped in 2.62s ========", "23 passed, 1 skipped in 2.62s"),
        ("3 failed, 20 passed in 7.28s", "3 failed, 20 passed in 7.28s"),
        (
            "=== 1 failed, 1 passed, 2 warnings in 0.51s (0:00:00) ===",
            "1 failed, 1 passed, 2 warnings in 0.51s (0:00:00)",
        ),
        ("==== no tests ran in 0.01s ====", "no tests ran in 0.01s"),
        ("307 tests collected in 12.10s", "307 tests collected in 12.10s"),
        ("tests/kernel/test_guest_uapi.py::test_x PASSED [ 83%]", ""),
    ],
)
def test_pytest_summary(harness: ModuleType, line: str, summary: str) -> None:
    assert harness.pytest_summary(f"collected 2 items\n{line}\nafter\n") == summary


def test_crc_check_accepts_identical_exports(harness: ModuleType, tmp_path: Path) -> None:
    stock = symvers(
        tmp_path / "stock",
        [("0x1", "vfio_a", "drivers/vfio/vfio"), ("0x2", "vfio_b", "drivers/vfio/vfio"),
         ("0x9", "other", "drivers/vfio/mdev/mdev")],
    )  # fmt: skip
    built = symvers(
        tmp_path / "built", [("0x2", "vfio_b", "/x/vfio"), ("0x1", "vfio_a", "/x/vfio")]
    )
    assert harness.check_crcs(stock, built) == 2


@pytest.mark.parametrize(
    "built_rows",
    [
        [("0x1", "vfio_a", "/x/vfio"), ("0x3", "vfio_b", "/x/vfio")],  # a CRC changed
        [("0x1", "vfio_a", "/x/vfio")],  # an export missing
        [("0x1", "vfio_a", "/x/vfio"), ("0x2", "vfio_b", "/x/vfio"), ("0x4", "new", "/x/vfio")],
    ],
)
def test_crc_check_refuses_any_difference(
    harness: ModuleType, tmp_path: Path, built_rows: list[tuple[str, str, str]]
) -> None:
    stock = symvers(
        tmp_path / "stock",
        [("0x1", "vfio_a", "drivers/vfio/vfio"), ("0x2", "vfio_b", "drivers/vfio/vfio")],
    )
    built = symvers(tmp_path / "built", built_rows)
    with pytest.raises(harness.TierError, match="does not export the stock"):
        harness.check_crcs(stock, built)


def test_crc_check_refuses_an_empty_stock_list(harness: ModuleType, tmp_path: Path) -> None:
    stock = symvers(tmp_path / "stock", [("0x9", "other", "drivers/vfio/mdev/mdev")])
    built = symvers(tmp_path / "built", [])
    with pytest.raises(harness.TierError, match="stock list empty"):
        harness.check_crcs(stock, built)


def test_fixed_up_tree_resolves_inside_itself(harness: ModuleType, tmp_path: Path) -> None:
    """Absolute links become relative; make -C <headers> finds -common's Makefile in the tree."""
    root = tmp_path / "cache" / "root"
    headers = root / "usr/src" / f"linux-headers-{KVER}"
    common = root / "usr/src/linux-headers-6.12.117+deb12-common"
    modules = root / "lib/modules" / KVER
    for directory in (headers, common, modules):
        directory.mkdir(parents=True)
    (headers / "Makefile").write_text(f"include /usr/src/{common.name}/Makefile\n")
    (common / "Makefile").write_text("where:\n\t@echo common Makefile in $(CURDIR)\n")
    (modules / "build").symlink_to(f"/usr/src/{headers.name}")
    (modules / "dangling").symlink_to("/nowhere/at/all")
    (modules / "relative").symlink_to("../../../usr/src")

    harness.fix_up_tree(root, harness.pinned_kernel())

    assert os.readlink(modules / "build") == f"../../../usr/src/{headers.name}"
    assert (modules / "build").resolve() == headers.resolve()
    assert os.readlink(modules / "dangling") == "../../../nowhere/at/all"
    assert os.readlink(modules / "relative") == "../../../usr/src"
    made = subprocess.run(
        ["make", "-s", "-C", str(modules / "build"), "where"], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == f"common Makefile in {headers.resolve()}"


def test_fix_up_refuses_a_headers_makefile_it_does_not_know(
    harness: ModuleType, tmp_path: Path
) -> None:
    headers = tmp_path / "usr/src" / f"linux-headers-{KVER}"
    headers.mkdir(parents=True)
    (headers / "Makefile").write_text("include ../somewhere/Makefile\n")
    with pytest.raises(harness.TierError, match="no 'include /usr/src/"):
        harness.fix_up_tree(tmp_path, harness.pinned_kernel())


def test_guest_config_survives_bash_quoting(harness: ModuleType, tmp_path: Path) -> None:
    modules = {"vfio": tmp_path / "a dir/vfio.ko", "mtty": tmp_path / "it's/mtty.ko"}
    args = ["tests/kernel", "-k", "uapi and not 'x y'"]
    harness.write_guest_config(tmp_path, harness.pinned_kernel(), modules, args)
    script = 'source "$1/config.env"; printf "%s\\n" "$KVER" "$MTTY_KO" "${PYTEST_ARGS[@]}"'
    shown = subprocess.run(
        ["bash", "-c", script, "-", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert shown == [KVER, str(modules["mtty"]), *args]


@pytest.mark.parametrize(("accel", "kvm"), [("tcg", False), ("kvm", True), ("TCG", False)])
def test_accelerator_can_be_forced(
    harness: ModuleType, monkeypatch: pytest.MonkeyPatch, accel: str, kvm: bool
) -> None:
    monkeypatch.setenv("VFMIG_KERNEL_ACCEL", accel)
    assert harness.use_kvm() is kvm
    command = harness.vng_command(Path("/v/vng"), Path("/k/vmlinuz"), Path("/r"), kvm=kvm)
    assert ("--disable-kvm" in command) is not kvm
    assert "--force-9p" in command
    assert command[command.index("--rwdir") + 1] == "/r"


def write_run(rundir: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (rundir / name).write_text(text)


def test_collect_reads_the_guest_result(harness: ModuleType, tmp_path: Path) -> None:
    write_run(
        tmp_path,
        {
            "status": "1\n",
            "uptime": "start 5.0\nready 6.5\ndone 17.25\n",
            "pytest.log": "FAILED tests/kernel/test_guest_uapi.py::test_x[mtty-1#2] - boom\n"
            "=== 1 failed, 22 passed in 7.28s ===\n",
        },
    )
    outcome = harness.Outcome()
    harness.collect(outcome, tmp_path, finished=True, timeout=60)
    assert (outcome.exit, outcome.outcome) == (harness.Exit.FAILED, "failed")
    assert outcome.message == "guest pytest exit 1: 1 failed, 22 passed in 7.28s"
    assert outcome.failures == ["FAILED tests/kernel/test_guest_uapi.py::test_x[mtty-1#2] - boom"]
    assert outcome.timings == {"guest_boot": 5.0, "guest_setup": 1.5, "guest_pytest": 10.75}


def test_collect_without_a_status_is_an_error_with_the_console(
    harness: ModuleType, tmp_path: Path
) -> None:
    write_run(tmp_path, {"console.log": "[    1.0] boot\nKernel panic - not syncing\n"})
    with pytest.raises(harness.TierError, match="killed after 60 s") as caught:
        harness.collect(harness.Outcome(), tmp_path, finished=False, timeout=60)
    assert "Kernel panic - not syncing" in caught.value.message


def test_collect_reports_a_failed_guest_setup(harness: ModuleType, tmp_path: Path) -> None:
    write_run(tmp_path, {"setup-error": "insmod /x/vfio.ko\n"})
    with pytest.raises(harness.TierError, match=r"guest setup failed: insmod /x/vfio\.ko"):
        harness.collect(harness.Outcome(), tmp_path, finished=True, timeout=60)
