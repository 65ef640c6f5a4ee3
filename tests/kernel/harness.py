"""Real-kernel test tier, host side: boot Debian's 6.12 kernel under QEMU and run pytest in it.

Theory of operation
-------------------
The tier needs a kernel with the ``mtty`` sample driver and a ``vfio.ko`` built
with ``CONFIG_VFIO_DEBUGFS``. Nothing is installed on the host for it except
ordinary tools (QEMU, busybox-static, kmod, a compiler): the kernel comes from
Debian's packages, fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x`` into the project's cache, so running the tests never puts a
kernel on the machine nor upgrades its udev.

Steps, each skipped when its result is already in the cache
(``$VFMIG_CACHE/kernel-tier`` or ``.cache/kernel-tier``):

1. **Host tools.** Missing Debian packages are installed with apt when running
   as root; otherwise the tier is *unavailable* and the message gives the exact
   command. virtme-ng (pinned in pyproject's ``kernel`` extra) is pip-installed
   into the virtualenv running this script.
2. **Kernel packages.** The pinned build (``PINNED_VERSION``) or, when it has
   left the archive, the newest 6.12 build apt knows (said so on stderr):
   image, headers, headers-common and kbuild, unpacked into one tree
   ``<kver>/root``. Unpacked side by side, the headers' relative symlinks into
   ``-common`` and kbuild resolve inside the cache; absolute symlinks are made
   relative and the headers Makefile's absolute ``include`` is made relative.
3. **Modules.** ``mtty.ko`` and a debugfs ``vfio.ko`` are built out of tree from
   ``linux-source-6.12`` (``kernel-source.sh``) against those headers. The
   rebuilt ``vfio.ko`` must export exactly the stock ``Module.symvers`` CRCs, so
   the stock ``vfio_iommu_type1.ko`` and ``mdev.ko`` load on top of it.
4. **Boot.** virtme-ng boots the unpacked kernel (it finds the modules next to
   the image and links them at ``/lib/modules/<kver>`` in the guest) with the
   host's root read-only over 9p and one read-write run directory. TCG unless
   ``kvm_intel``/``kvm_amd`` is loaded. The guest runs ``guest-setup.sh``:
   modules, three mtty mdevs, debugfs, then pytest against this checkout.
5. **Result.** The guest writes pytest's log, its exit status and its kernel
   log into the run directory; the exit status is read from there, never from
   the console (without udev on the host virtme cannot hand it back). QEMU's
   output goes through a pipe into ``console.log`` (QEMU truncates a redirected
   stdout file).

Exit status: 0 guest tests passed, 1 they failed, 3 the tier cannot run here
(message and hint say why and what to run), 4 setup or boot failed.
``--result FILE`` writes the outcome as JSON for ``test_vm_tier.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import fcntl
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from vfmig.core.errors import VfmigError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
GUEST_SCRIPT = HERE / "guest-setup.sh"
KERNEL_SOURCE_SCRIPT = HERE / "kernel-source.sh"

#: The Debian build the tier was measured on (docs/kernel-tier.md); override with
#: ``VFMIG_KERNEL_VERSION``. bookworm-security drops old builds: see :func:`choose_kernel`.
PINNED_VERSION = "6.12.117-1~deb12u1"
FLAVOUR = "amd64"
#: ``6.12.117-1~deb12u1`` -> ABI ``6.12.117+deb12`` (Debian's naming of its 6.12 backport).
_VERSION_RE = re.compile(r"^(?P<upstream>6\.12\.\d+)-\d+~(?P<dist>deb\d+)u\d+$")
_IMAGE_RE = re.compile(rf"^linux-image-(?P<abi>6\.12\.(?P<patch>\d+)\+deb\d+)-{FLAVOUR}-unsigned$")

#: Debian packages the tier needs on the host (checked with dpkg-query). The compiler, the
#: ``gcc-N`` the headers package depends on, is added to these (:func:`compiler_package`).
HOST_PACKAGES: tuple[str, ...] = (
    "qemu-system-x86",
    "busybox-static",  # virtme-ng's initramfs loads the 9p modules with it
    "kmod",  # depmod (virtme-ng runs it on the unpacked modules), modprobe in the guest
    "xz-utils",  # Debian's modules are .ko.xz
    "make",
    "pahole",  # the kernel has DEBUG_INFO_BTF_MODULES: kbuild runs it on every .ko
    "binutils",  # virtme-ng reads the kernel version out of the image with strings
    "libelf1",  # kbuild's objtool and modpost link it
)

#: Out-of-tree builds: module -> (source files from linux-source-6.12, Kbuild text).
MODULES: dict[str, tuple[tuple[str, ...], str]] = {
    "mtty": (("samples/vfio-mdev/mtty.c",), "obj-m := mtty.o\n"),
    "vfio": (
        tuple(
            f"drivers/vfio/{name}"
            for name in ("vfio_main.c", "group.c", "container.c", "virqfd.c", "debugfs.c", "vfio.h")
        ),
        # drivers/vfio/Makefile for Debian's config (GROUP, CONTAINER, VIRQFD on; no IOMMUFD,
        # no DEVICE_CDEV) plus debugfs. debug_root in struct vfio_device depends on DEBUG_FS
        # (on), not VFIO_DEBUGFS, so the struct layout and the exported CRCs are unchanged.
        "obj-m := vfio.o\n"
        "vfio-y := vfio_main.o group.o container.o virqfd.o debugfs.o\n"
        "ccflags-y := -DCONFIG_VFIO_DEBUGFS=1\n",
    ),
}

#: The whole guest run (boot, setup, pytest, power-off), seconds. A warm run takes 2-5 min
#: under TCG depending on the load; the bound only stops a hung guest.
DEFAULT_TIMEOUT = 1200.0
#: The guest's pytest run: the tier's own tests and the device conformance suite (on mtty).
DEFAULT_PYTEST_ARGS = ("tests/kernel", "tests/device/test_conformance.py", "-v")
_KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\]")
_SUMMARY_LINE = re.compile(
    r"^=*\s*(?P<body>(?:(?:\d+ \w+(?:, )?)+(?: collected)?|no tests ran) in [\d.]+s\b.*?)\s*=*$"
)


class Exit(enum.IntEnum):
    """The harness's exit status (2 is argparse's, for bad arguments)."""

    PASSED = 0
    FAILED = 1
    UNAVAILABLE = 3
    ERROR = 4


class TierUnavailable(VfmigError):
    """The tier cannot run on this machine (not root, no apt, no network...); the hint says why."""


class TierError(VfmigError):
    """Setting up or booting the guest failed."""


def cache_root() -> Path:
    """``$VFMIG_CACHE/kernel-tier`` or ``.cache/kernel-tier`` (as tests/conftest.py's cache_dir)."""
    return Path(os.environ.get("VFMIG_CACHE", REPO / ".cache")) / "kernel-tier"


def log(message: str) -> None:
    print(f"kernel tier: {message}", file=sys.stderr, flush=True)


def run(
    cmd: Sequence[str | Path], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, output captured (never raises on a non-zero exit)."""
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def which(command: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (depmod lives there)."""
    path = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin"
    return shutil.which(command, path=path)


def is_root() -> bool:
    return os.geteuid() == 0


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """One tier run at a time per cache (engineers and CI may share a machine)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another kernel-tier run to finish ({lock_path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# -- 1. host tools -------------------------------------------------------------------------------


def check_platform() -> None:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise TierUnavailable(
            f"the kernel tier needs an x86-64 Linux host, not {sys.platform}/{platform.machine()}",
            hint="run it on Debian 12 (x86-64)",
        )
    missing = [
        tool for tool in ("apt-get", "apt-cache", "dpkg-deb", "dpkg-query") if not which(tool)
    ]
    if missing:
        raise TierUnavailable(
            f"the kernel tier fetches Debian's 6.12 kernel with apt; missing: {', '.join(missing)}",
            hint="run it on Debian 12 (x86-64)",
        )


def apt_show(package: str) -> dict[str, str] | None:
    """The fields of ``name`` or ``name=version`` in apt's lists (candidate version), or None."""
    result = run(["apt-cache", "show", "--no-all-versions", package])
    if result.returncode != 0 or not result.stdout.strip():
        return None
    fields: dict[str, str] = {}
    for line in result.stdout.splitlines():
        if line[:1].strip() and ":" in line:
            key, _, value = line.partition(":")
            fields.setdefault(key, value.strip())
    return fields


def ensure_apt_lists() -> None:
    if apt_show("linux-source-6.12") is not None:
        return
    if not is_root():
        raise TierUnavailable(
            "apt knows no linux-source-6.12 package", hint="run: sudo apt-get update"
        )
    log("apt knows no linux-source-6.12; running apt-get update")
    run(["apt-get", "update", "-qq"])
    if apt_show("linux-source-6.12") is None:
        raise TierUnavailable(
            "apt has no linux-source-6.12 even after apt-get update",
            hint="the tier needs Debian's 6.12 kernel packages (Debian 12 with bookworm-security)",
        )


def installed_packages(packages: Sequence[str]) -> set[str]:
    result = run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *packages])
    return {
        name
        for name, _, status in (line.partition(" ") for line in result.stdout.splitlines())
        if status.strip() == "installed"
    }


def ensure_host_packages(wanted: Sequence[str]) -> None:
    """Install the Debian packages in ``wanted`` that are missing (as root), or say what to run."""
    missing = sorted(set(wanted) - installed_packages(wanted))
    if not missing:
        return
    command = "apt-get install --no-install-recommends " + " ".join(missing)
    if not is_root():
        raise TierUnavailable(
            f"missing host packages: {', '.join(missing)}", hint=f"run: sudo {command}"
        )
    log(f"installing {', '.join(missing)} with apt")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    result = run(install, env=env)
    if result.returncode != 0:  # stale lists give 404s: refresh once
        run(["apt-get", "update", "-qq"], env=env)
        result = run(install, env=env)
    if result.returncode != 0:
        raise TierUnavailable(
            f"'{command}' failed: {tail(result.stderr, 3)}", hint=f"run: {command}"
        )


def virtme_requirement() -> str:
    """virtme-ng's pin, from the ``kernel`` extra in pyproject.toml (one place to change it)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in project["optional-dependencies"].get("kernel", []):
        if isinstance(requirement, str) and requirement.startswith("virtme-ng=="):
            return requirement
    raise TierError(
        "pyproject.toml's 'kernel' extra pins no virtme-ng",
        hint='add kernel = ["virtme-ng==<version>"] to [project.optional-dependencies]',
    )


def ensure_virtme() -> Path:
    """``vng`` from the running virtualenv, pip-installing the pinned virtme-ng if needed."""
    requirement = virtme_requirement()
    wanted = requirement.partition("==")[2]
    vng = Path(sys.prefix) / "bin" / "vng"
    try:
        have: str | None = importlib.metadata.version("virtme-ng")
    except importlib.metadata.PackageNotFoundError:
        have = None
    if have == wanted and vng.is_file():
        return vng
    if sys.prefix == sys.base_prefix:
        raise TierUnavailable(
            f"virtme-ng {wanted} is not installed and {sys.executable} is not a virtualenv",
            hint="run: make test-kernel (it uses the project's .venv)",
        )
    log(f"installing {requirement} into {sys.prefix}")
    result = run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                  requirement])  # fmt: skip
    if result.returncode != 0 or not vng.is_file():
        raise TierUnavailable(
            f"pip could not install {requirement}: {tail(result.stderr, 3)}",
            hint=f"run: {sys.executable} -m pip install '{requirement}'",
        )
    return vng


# -- 2. kernel packages --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kernel:
    """One Debian 6.12 build: its package version and ABI name."""

    version: str  #: Debian package version, e.g. ``6.12.117-1~deb12u1``
    abi: str  #: e.g. ``6.12.117+deb12``
    pinned: bool  #: False when the pinned build had left the archive

    @property
    def kver(self) -> str:
        """``uname -r`` of the guest, e.g. ``6.12.117+deb12-amd64``."""
        return f"{self.abi}-{FLAVOUR}"

    @property
    def image_package(self) -> str:
        return f"linux-image-{self.kver}-unsigned"

    @property
    def headers_package(self) -> str:
        return f"linux-headers-{self.kver}"

    def packages(self) -> list[str]:
        """``name=version`` of everything unpacked into the kernel tree."""
        names = [
            self.image_package,
            self.headers_package,
            f"linux-headers-{self.abi}-common",
            f"linux-kbuild-{self.abi}",  # the headers' scripts/ and tools/ (modpost, objtool)
        ]
        return [f"{name}={self.version}" for name in names]


def pinned_kernel() -> Kernel:
    """The pinned build (``VFMIG_KERNEL_VERSION`` or :data:`PINNED_VERSION`)."""
    wanted = os.environ.get("VFMIG_KERNEL_VERSION", PINNED_VERSION)
    match = _VERSION_RE.match(wanted)
    if match is None:
        raise TierError(
            f"VFMIG_KERNEL_VERSION={wanted!r} is not a Debian 6.12 backport version",
            hint=f"use a version such as {PINNED_VERSION}",
        )
    return Kernel(wanted, f"{match['upstream']}+{match['dist']}", pinned=True)


def choose_kernel(tier: Path) -> Kernel:
    """The pinned build if cached or apt still has it, else the newest 6.12 build apt knows."""
    pinned = pinned_kernel()
    if tree_complete(tier / pinned.kver / "root", pinned):
        return pinned  # no need to ask apt (0.5 s a question)
    ensure_apt_lists()
    if apt_show(f"{pinned.image_package}={pinned.version}") is not None:
        return pinned
    newest = newest_kernel()
    if newest is None:
        raise TierUnavailable(
            f"apt has neither {pinned.image_package} {pinned.version} nor any other 6.12 build",
            hint="run: apt-get update (the tier needs Debian 12 with bookworm-security)",
        )
    log(f"the pinned build {pinned.version} has left the archive; using the newest 6.12 "
        f"build, {newest.version}")  # fmt: skip
    return newest


def newest_kernel() -> Kernel | None:
    pattern = rf"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-{FLAVOUR}-unsigned$"
    result = run(["apt-cache", "search", "--names-only", pattern])
    found: list[tuple[int, str, str]] = []
    for line in result.stdout.splitlines():
        match = _IMAGE_RE.match(line.partition(" - ")[0].strip())
        if match:
            found.append((int(match["patch"]), match[0], match["abi"]))
    for _, name, abi in sorted(found, reverse=True):
        fields = apt_show(name)
        if fields and "Version" in fields:
            return Kernel(fields["Version"], abi, pinned=False)
    return None


def compiler_package(kernel: Kernel, base: Path) -> str:
    """The ``gcc-N`` the kernel was built with (out-of-tree modules must use the same).

    Read from the headers package's dependencies once, then from ``base/compiler``.
    """
    cached = base / "compiler"
    if cached.is_file():
        return cached.read_text().strip()
    fields = apt_show(f"{kernel.headers_package}={kernel.version}") or {}
    match = re.search(r"\bgcc-\d+\b", fields.get("Depends", ""))
    if match is None:
        return "gcc"
    base.mkdir(parents=True, exist_ok=True)
    cached.write_text(f"{match[0]}\n")
    return match[0]


#: Written last into an unpacked kernel tree: the tree is whole.
TREE_MARKER = ".vfmig-complete"


def headers_dir(root: Path, kernel: Kernel) -> Path:
    return root / "usr" / "src" / f"linux-headers-{kernel.kver}"


def ensure_kernel_tree(kernel: Kernel, base: Path) -> Path:
    """Image, modules, headers and kbuild of ``kernel`` unpacked (not installed) under ``base``."""
    root = base / "root"
    if tree_complete(root, kernel):
        return root
    debs = base / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    debs.mkdir(parents=True)
    log(f"downloading Linux {kernel.kver} ({kernel.version}) with apt-get download")
    result = run(["apt-get", "download", "-q", *kernel.packages()], cwd=debs)
    if result.returncode != 0:
        raise TierUnavailable(
            f"apt-get download of the {kernel.version} kernel packages failed: "
            f"{tail(result.stderr, 2)}",
            hint="check the network to the Debian archive and run: apt-get update",
        )
    root.mkdir()
    for deb in sorted(debs.glob("*.deb")):
        result = run(["dpkg-deb", "-x", deb, root])
        if result.returncode != 0:
            raise TierError(f"dpkg-deb -x {deb.name} failed: {tail(result.stderr, 2)}")
    fix_up_tree(root, kernel)
    shutil.rmtree(debs)
    (root / TREE_MARKER).write_text(f"{kernel.version}\n")
    return root


def tree_complete(root: Path, kernel: Kernel) -> bool:
    marker = root / TREE_MARKER
    return marker.is_file() and marker.read_text().strip() == kernel.version


def fix_up_tree(root: Path, kernel: Kernel) -> None:
    """Make the unpacked tree self-contained: no path in it may lead out to the host's /.

    Packages assume installation at /: ``/lib/modules/<kver>/{build,source}`` are
    absolute symlinks, and the headers' Makefile includes ``-common``'s by absolute
    path. Both become relative, so they resolve inside the cache wherever it is.
    """
    for link in [path for path in root.rglob("*") if path.is_symlink()]:
        target = os.readlink(link)
        if target.startswith("/"):
            link.unlink()
            link.symlink_to(os.path.relpath(root / target.lstrip("/"), link.parent))
    makefile = headers_dir(root, kernel) / "Makefile"
    text = makefile.read_text()
    # make runs with -C <headers dir>, so the include is relative to that directory.
    fixed = re.sub(r"^include /usr/src/(\S+)$", r"include ../\1", text, flags=re.MULTILINE)
    if fixed == text:
        raise TierError(f"{makefile}: no 'include /usr/src/...' line to make relative")
    makefile.write_text(fixed)


# -- 3. modules ----------------------------------------------------------------------------------


def ensure_source(kernel: Kernel, tier: Path) -> Path:
    """linux-source-6.12 files of ``kernel.version``, shared with the ``kernel_source`` fixture."""
    env = {**os.environ, "VFMIG_KERNEL_SOURCE_VERSION": kernel.version}
    # The fixture's copy first; a copy of another version (e.g. the fixture fell back to a
    # newer build) leaves it alone and fetches ours beside the kernel tree.
    for dest in (tier.parent / "kernel", tier / kernel.kver / "source"):
        result = run(["bash", KERNEL_SOURCE_SCRIPT, dest], env=env)
        if result.returncode != 0:
            raise TierUnavailable(
                f"kernel-source.sh could not fetch linux-source-6.12 {kernel.version}: "
                f"{tail(result.stderr, 2)}",
                hint=f"run: bash tests/kernel/kernel-source.sh {dest}",
            )
        source = dest / "linux-source-6.12"
        if (source / "VERSION").read_text().strip() == kernel.version:
            return source
    raise TierError(
        f"kernel-source.sh did not deliver linux-source-6.12 {kernel.version}",
        hint=f"remove {tier / kernel.kver / 'source'} and retry",
    )


def exported_crcs(symvers: Path, module: str | None = None) -> dict[str, tuple[str, str]]:
    """``symbol -> (crc, export kind)`` from a Module.symvers, for one module or all."""
    crcs: dict[str, tuple[str, str]] = {}
    for line in symvers.read_text().splitlines():
        crc, symbol, owner, kind = [*line.split("\t"), "", "", ""][:4]
        if module is None or owner == module:
            crcs[symbol] = (crc, kind)
    return crcs


def check_crcs(stock_symvers: Path, built_symvers: Path) -> int:
    """The rebuilt vfio.ko must export what the stock one does, CRC for CRC."""
    stock = exported_crcs(stock_symvers, "drivers/vfio/vfio")
    built = exported_crcs(built_symvers)
    if not stock or stock != built:
        differ = sorted(
            name for name in stock.keys() | built.keys() if stock.get(name) != built.get(name)
        )
        raise TierError(
            f"the debugfs vfio.ko does not export the stock vfio.ko's symbols and CRCs "
            f"({len(differ)} differ: {', '.join(differ[:5]) or 'stock list empty'})",
            hint="the stock vfio_iommu_type1.ko and mdev.ko would not load on it",
        )
    return len(stock)


def ensure_modules(kernel: Kernel, root: Path, source: Path, base: Path) -> dict[str, Path]:
    """Build (or reuse) every module in :data:`MODULES`; ``name -> .ko``."""
    headers = headers_dir(root, kernel)
    built: dict[str, Path] = {}
    for name, (files, kbuild) in MODULES.items():
        build = base / "modules" / name
        ko = build / f"{name}.ko"
        recipe = json.dumps({"version": kernel.version, "files": files, "kbuild": kbuild})
        marker = build / ".vfmig-recipe"
        if not (ko.is_file() and marker.is_file() and marker.read_text() == recipe):
            shutil.rmtree(build, ignore_errors=True)
            build.mkdir(parents=True)
            for file in files:
                shutil.copy2(source / file, build / Path(file).name)
            (build / "Kbuild").write_text(kbuild)
            log(f"building {name}.ko against {headers.name}")
            jobs = f"-j{os.cpu_count() or 1}"
            result = run(["make", "-C", headers, f"M={build}", jobs, "modules"])
            (build / "build.log").write_text(result.stdout + result.stderr)
            if result.returncode != 0 or not ko.is_file():
                raise TierError(
                    f"building {name}.ko failed:\n{tail(result.stdout + result.stderr)}",
                    hint=f"full log: {build / 'build.log'}",
                )
            if name == "vfio":
                count = check_crcs(headers / "Module.symvers", build / "Module.symvers")
                log(f"vfio.ko: all {count} exported CRCs equal the stock Module.symvers")
            marker.write_text(recipe)
        built[name] = ko
    return built


# -- 4. boot -------------------------------------------------------------------------------------


def use_kvm() -> bool:
    """KVM only with kvm_intel/kvm_amd loaded (kvm_pvm hosts abort with -cpu host); else TCG."""
    forced = os.environ.get("VFMIG_KERNEL_ACCEL", "").lower()
    if forced in ("kvm", "tcg"):
        return forced == "kvm"
    vendor = any(Path("/sys/module", name).is_dir() for name in ("kvm_intel", "kvm_amd"))
    return vendor and os.access("/dev/kvm", os.R_OK | os.W_OK)


def write_guest_config(
    rundir: Path, kernel: Kernel, modules: dict[str, Path], pytest_args: Sequence[str]
) -> None:
    """``config.env``, sourced by guest-setup.sh: the guest's whole brief."""
    values = {
        "REPO": str(REPO),
        "KVER": kernel.kver,
        "VFIO_KO": str(modules["vfio"]),
        "MTTY_KO": str(modules["mtty"]),
        "CI": os.environ.get("CI", ""),
    }
    lines = [f"{key}={shlex.quote(value)}" for key, value in values.items()]
    lines.append(f"PYTEST_ARGS=({' '.join(shlex.quote(arg) for arg in pytest_args)})")
    (rundir / "config.env").write_text("\n".join(lines) + "\n")


def vng_command(vng: Path, image: Path, rundir: Path, *, kvm: bool) -> list[str]:
    command = [
        str(vng),
        "--verbose",  # the console is where the guest's output goes when the host has no udev
        "--run", str(image),
        "--cpus", str(min(2, os.cpu_count() or 1)),
        "--memory", os.environ.get("VFMIG_KERNEL_MEMORY", "1G"),
        "--rwdir", str(rundir),
        "--force-9p",  # QEMU 7.2's C virtiofsd is found but fails: 3 s of retries per export
        "--user", "root",  # the guest loads modules, whoever runs the harness on the host
        "--exec", f"bash {shlex.quote(str(GUEST_SCRIPT))} {shlex.quote(str(rundir))}",
    ]  # fmt: skip
    if not kvm:
        command.append("--disable-kvm")
    return command


def boot(command: list[str], rundir: Path, *, timeout: float, echo: bool) -> bool:
    """Run the guest; its console goes to ``console.log``. False if it had to be killed."""
    env = {**os.environ, "PATH": f"{Path(command[0]).parent}:{os.environ.get('PATH', '')}"}
    killed = threading.Event()
    with (rundir / "console.log").open("w", encoding="utf-8") as console:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,  # a pipe, not a file: QEMU truncates a redirected file
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout ends QEMU too
        )

        def kill() -> None:
            killed.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        try:
            stream: IO[bytes] | None = proc.stdout
            assert stream is not None
            for raw in stream:
                line = raw.decode("utf-8", errors="replace")
                console.write(line)
                if echo and not _KERNEL_LINE.match(line):
                    sys.stderr.write(line)
                    sys.stderr.flush()
        finally:
            watchdog.cancel()
            proc.wait()
    return not killed.is_set()


# -- 5. result -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a tier run produced; written as JSON by ``--result``."""

    exit: int = Exit.ERROR
    outcome: str = "error"  #: passed, failed, unavailable or error
    message: str = ""
    hint: str = ""
    summary: str = ""  #: pytest's closing line in the guest
    failures: list[str] = field(default_factory=list)  #: FAILED/ERROR lines of the guest run
    kernel: str = ""  #: ``<kver> (<Debian version>)``
    build: str = ""  #: "pinned", or why another build was taken
    accel: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    run_dir: str = ""


def pytest_summary(text: str) -> str:
    """pytest's closing line ("3 passed, 1 skipped in 4.20s"), or '' if it never got there."""
    for line in reversed(text.splitlines()):
        match = _SUMMARY_LINE.match(line.strip())
        if match:
            return match["body"]
    return ""


def guest_timings(rundir: Path) -> dict[str, float]:
    """Guest uptimes written by guest-setup.sh: ``name seconds`` lines."""
    path = rundir / "uptime"
    if not path.is_file():
        return {}
    marks = dict(line.split() for line in path.read_text().splitlines() if line.count(" ") == 1)
    return {name: float(value) for name, value in marks.items()}


def collect(outcome: Outcome, rundir: Path, *, finished: bool, timeout: float) -> None:
    """Fill ``outcome`` from the files the guest left in ``rundir``."""
    log_path, status_path = rundir / "pytest.log", rundir / "status"
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    outcome.summary = pytest_summary(text)
    outcome.failures = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    marks = guest_timings(rundir)
    if {"start", "ready"} <= marks.keys():
        outcome.timings["guest_boot"] = marks["start"]
        outcome.timings["guest_setup"] = round(marks["ready"] - marks["start"], 2)
    if {"ready", "done"} <= marks.keys():
        outcome.timings["guest_pytest"] = round(marks["done"] - marks["ready"], 2)
    setup_error = rundir / "setup-error"
    if setup_error.is_file():
        raise TierError(
            f"guest setup failed: {setup_error.read_text().strip()}",
            hint=f"guest kernel log: {rundir / 'dmesg.txt'}; console: {rundir / 'console.log'}",
        )
    if not status_path.is_file():
        why = f"killed after {timeout:g} s" if not finished else "it ended without a result"
        console = (rundir / "console.log").read_text(errors="replace")
        raise TierError(
            f"the guest did not finish the tests ({why}); console tail:\n{tail(console, 20)}",
            hint=f"full console: {rundir / 'console.log'}",
        )
    status = int(status_path.read_text())
    outcome.exit = Exit.PASSED if status == 0 else Exit.FAILED
    outcome.outcome = "passed" if status == 0 else "failed"
    outcome.message = f"guest pytest exit {status}: {outcome.summary or 'no summary line'}"


def run_tier(outcome: Outcome, pytest_args: Sequence[str], *, timeout: float, echo: bool) -> None:
    tier = cache_root()
    timings = outcome.timings
    with exclusive(tier / ".lock"):
        clock = time.monotonic()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.monotonic()
            timings[name] = round(now - clock, 2)
            clock = now

        check_platform()
        kernel = choose_kernel(tier)
        outcome.kernel = f"{kernel.kver} ({kernel.version})"
        outcome.build = "pinned" if kernel.pinned else f"pinned {pinned_kernel().version} is gone"
        base = tier / kernel.kver
        ensure_host_packages([*HOST_PACKAGES, compiler_package(kernel, base)])
        vng = ensure_virtme()
        lap("host_tools")
        root = ensure_kernel_tree(kernel, base)
        lap("kernel_packages")
        source = ensure_source(kernel, tier)
        lap("kernel_source")
        modules = ensure_modules(kernel, root, source, base)
        lap("modules")

        rundir = tier / "run"
        shutil.rmtree(rundir, ignore_errors=True)
        rundir.mkdir(parents=True)
        outcome.run_dir = str(rundir)
        write_guest_config(rundir, kernel, modules, pytest_args)
        kvm = use_kvm()
        outcome.accel = "kvm" if kvm else "tcg"
        image = root / "boot" / f"vmlinuz-{kernel.kver}"
        log(f"booting {kernel.kver} under QEMU ({outcome.accel}); console: {rundir}/console.log")
        finished = boot(
            vng_command(vng, image, rundir, kvm=kvm), rundir, timeout=timeout, echo=echo
        )
        lap("guest")
        collect(outcome, rundir, finished=finished, timeout=timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Boot Debian's 6.12 kernel with mtty mdevs under QEMU and run pytest in it.",
        epilog="Arguments after '--' replace the guest's pytest arguments "
        f"(default: {' '.join(DEFAULT_PYTEST_ARGS)}).",
    )
    parser.add_argument(
        "-k", dest="keyword", help="only guest tests matching this pytest -k expression"
    )
    parser.add_argument("--result", type=Path, help="write the outcome as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="do not echo the guest's output")
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("VFMIG_KERNEL_TIMEOUT", DEFAULT_TIMEOUT)),
        help="seconds the guest may take before QEMU is killed (default %(default)g)",
    )
    parser.add_argument("pytest_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    outcome = Outcome()
    try:
        pytest_args = list(args.pytest_args or DEFAULT_PYTEST_ARGS)
        if args.keyword:
            pytest_args += ["-k", args.keyword]
        run_tier(outcome, pytest_args, timeout=args.timeout, echo=not args.quiet)
    except TierUnavailable as exc:
        outcome.exit, outcome.outcome = Exit.UNAVAILABLE, "unavailable"
        outcome.message, outcome.hint = exc.message, exc.hint or ""
    except TierError as exc:
        outcome.exit, outcome.outcome = Exit.ERROR, "error"
        outcome.message, outcome.hint = exc.message, exc.hint or ""
    outcome.timings["total"] = round(time.monotonic() - started, 2)
    report(outcome)
    if args.result is not None:
        args.result.write_text(json.dumps(asdict(outcome), indent=2) + "\n")
    return int(outcome.exit)


def report(outcome: Outcome) -> None:
    log(f"{outcome.outcome}: {outcome.message}")
    for line in outcome.failures:
        log(f"  {line}")
    if outcome.hint:
        log(f"  hint: {outcome.hint}")
    if outcome.kernel:
        times = ", ".join(f"{name} {value:g} s" for name, value in outcome.timings.items())
        log(f"Linux {outcome.kernel} ({outcome.build}), {outcome.accel or 'not booted'}; {times}")


if __name__ == "__main__":
    sys.exit(main())
