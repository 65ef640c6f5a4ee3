"""Pre-flight checks of a host and its VFIO devices (``vfmig doctor``): pass, warn, fail or n/a.

Theory of operation
-------------------
A check is one question with one answer: :class:`Check` (an id, a title, a
:class:`Status`, one line of detail and, unless it passed, a hint). ``fail`` means a
migration with this host or device cannot work as it is; ``warn`` means it can, with a
limitation or a known problem vfmig works around; ``n/a`` means the question does not
apply here, with the reason.

:func:`check_host` asks about the host: the kernel release and the known kernel bugs of
that release, the VFIO modules, the two ways of opening a device (group + container,
cdev + iommufd), debugfs and privileges. :func:`check_device` asks about one device:
does it exist, is it bound to a driver that can migrate it, is its IOMMU group viable, can
this user open its node, does it need a VF token, does another process hold it, its
migration flags and state, and whether DMA dirty tracking works.

Everything is read from sysfs, ``/dev``, ``/proc``, debugfs, the kernel's config and
``modules.alias`` (through :mod:`vfmig.device.sysfs` and the injected
:class:`~vfmig.device.kernel.Kernel`), rooted in a :class:`DoctorHost`, so tests run on a
fake tree. **Nothing opens a device unless asked** (``probe=True``): opening a vfio-pci
device resets the function, and a device parked in STOP may hold the only copy of a
migrated state (a source whose run is in doubt). Without a probe, flags and state come
from debugfs when it has them (the state since 6.8, the flags since 6.18). A probe opens
only a device that no process holds, as far as ``/proc`` can tell (root), and then only
reads: GET of the flags and the state, PROBE of the DMA logging features, and one
DMA_LOGGING_REPORT of one page -- the only way to learn whether this kernel can report
dirty pages at all (EOPNOTSUPP without ``CONFIG_IOMMUFD_DRIVER``). The REPORT reads and
clears the bits of a log that is not running on an idle device: it changes nothing. It
sends no SET and no reset. The probe runs in a daemon thread and is abandoned after a
timeout, so a driver stuck on its lock cannot hang the doctor.

The kernel's config (``/proc/config.gz``, ``/boot/config-<release>``, or the headers'
``.config``) only explains why something is missing; what the running system shows
always decides.
"""

from __future__ import annotations

import enum
import errno as _errno
import fnmatch
import gzip
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from vfmig.core.errors import DeviceError, errno_name
from vfmig.core.fsm import DeviceState, MigrationFlags, flag_names
from vfmig.device import sysfs
from vfmig.device.abandon import Abandoned, call_abandonable
from vfmig.device.debugfs import Availability, DebugfsReader
from vfmig.device.kernel import REAL_KERNEL
from vfmig.device.sysfs import HostPaths, SysfsDevice

if TYPE_CHECKING:
    import uuid
    from collections.abc import Callable, Mapping, Sequence

    from vfmig.device.kernel import Kernel
    from vfmig.device.vfio import VfioDevice


class Status(enum.Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    NA = "n/a"


@dataclass(frozen=True, slots=True)
class Check:
    """One question about the host or a device, and its answer."""

    id: str  #: stable name (``module:vfio``, ``migration``), for scripts reading ``--json``
    title: str  #: short label for people
    status: Status
    detail: str  #: one line: what was found
    hint: str | None = None  #: how to fix it (warn and fail), or what to do next


def _default_access(path: Path) -> bool:
    return os.access(path, os.R_OK | os.W_OK)


@dataclass(frozen=True, slots=True)
class DoctorHost:
    """Where the host's files are, and who is asking (everything the checks read)."""

    paths: HostPaths = field(default_factory=HostPaths)
    kernel: Kernel = REAL_KERNEL
    release: str = field(default_factory=lambda: os.uname().release)
    euid: int = field(default_factory=os.geteuid)
    boot: Path = Path("/boot")
    modules: Path = Path("/lib/modules")
    #: Whether this process may read and write a device node.
    access: Callable[[Path], bool] = _default_access

    @classmethod
    def under(cls, root: Path, *, release: str, euid: int, kernel: Kernel) -> DoctorHost:
        """A host laid out below ``root`` as on a normal one (a fake tree, for tests)."""
        return cls(
            paths=HostPaths.under(root),
            kernel=kernel,
            release=release,
            euid=euid,
            boot=root / "boot",
            modules=root / "lib" / "modules",
        )


# --- the kernel: release, known bugs, config ------------------------------------------------


def parse_release(release: str) -> tuple[int, int, int] | None:
    """``6.12.117+deb12-amd64`` -> ``(6, 12, 117)``; ``7.1-rc2`` -> ``(7, 1, 0)``; else None."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


@dataclass(frozen=True, slots=True)
class KernelBug:
    """A migration bug of some kernel releases, and what vfmig does about it."""

    id: str
    title: str
    introduced: tuple[int, int]  #: first release with the bug
    fixed: tuple[int, int] | None  #: first mainline release with the fix (None: not fixed)
    stable: Mapping[tuple[int, int], int]  #: stable series -> first fixed patch level
    effect: str
    answer: str  #: what vfmig does about it
    fix: str  #: the fix and the releases that have it

    def why_not(self, version: tuple[int, int, int]) -> str:
        """Why ``version`` is not affected (it is not: :meth:`affects` said so)."""
        series = version[:2]
        if series < self.introduced:
            return f"the bug came with {'.'.join(map(str, self.introduced))}"
        if self.fixed is not None and series >= self.fixed:
            return f"fixed in {'.'.join(map(str, self.fixed))}"
        return f"fixed in {series[0]}.{series[1]}.{self.stable[series]}"

    def affects(self, version: tuple[int, int, int]) -> bool:
        series = version[:2]
        if series < self.introduced or (self.fixed is not None and series >= self.fixed):
            return False
        patch = self.stable.get(series)
        return patch is None or version[2] < patch


#: vfio-migration.md section 2: the next-step lookup spins on the ERROR sentinel.
BLOCKED_ARC_LOOP: Final = KernelBug(
    id="blocked-arc-loop",
    title="STOP_COPY>PRE_COPY loop",
    introduced=(6, 2),
    fixed=(7, 1),
    stable={(6, 12): 96, (6, 18): 39},
    effect="a SET from STOP_COPY to PRE_COPY or PRE_COPY_P2P never returns (a soft lockup "
    "holding the driver's state mutex)",
    answer="vfmig never requests these arcs",
    fix="'vfio: prevent infinite loop in vfio_mig_get_next_state() on blocked arc', in 7.1, "
    "6.12.96 and 6.18.39",
)

#: vfio-migration.md section 11, measured on 6.12.117; mtty has had migration since 6.7.
MTTY_RESUMING_REOPEN: Final = KernelBug(
    id="mtty-resuming-reopen",
    title="mtty RESUMING oops",
    introduced=(6, 7),
    fixed=None,
    stable={},
    effect="an mtty device closed in RESUMING oopses the kernel on its next state change "
    "out of RESUMING (NULL dereference in mtty_set_state; the device then hangs)",
    answer="vfmig resets a device found in RESUMING before any other state change "
    "('vfmig recover' does); other tools such as QEMU do not",
    fix="none known (measured on 6.12.117)",
)


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """The running kernel's build options, from one of the places a distribution keeps them."""

    source: Path
    values: Mapping[str, str]

    def get(self, option: str) -> str:
        """``y``, ``m``, or ``n`` (not set or absent)."""
        return self.values.get(option, "n")

    def describe(self, option: str) -> str:
        value = self.get(option)
        return f"{option}={value}" if value != "n" else f"{option} is not set"


_CONFIG_LINE = re.compile(r"^(CONFIG_\w+)=(.*)$|^# (CONFIG_\w+) is not set$")


def read_kernel_config(host: DoctorHost) -> KernelConfig | None:
    """The running kernel's config: ``/proc/config.gz``, ``/boot/config-R``, the headers'."""
    candidates = (
        host.paths.proc / "config.gz",
        host.boot / f"config-{host.release}",
        host.modules / host.release / "build" / ".config",
    )
    for path in candidates:
        try:
            data = path.read_bytes()
            if path.suffix == ".gz":
                data = gzip.decompress(data)
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        values: dict[str, str] = {}
        for line in data.decode("utf-8", "replace").splitlines():
            match = _CONFIG_LINE.match(line)
            if match is None:
                continue
            if match[1] is not None:
                values[match[1]] = match[2].strip('"')
            else:
                values[match[3]] = "n"
        return KernelConfig(path, values)
    return None


def _configured(config: KernelConfig | None, *options: str) -> str:
    """``' (CONFIG_A is not set, CONFIG_B=m in /boot/config-R)'``, or ``''`` without a config."""
    if config is None:
        return ""
    return f" ({', '.join(config.describe(o) for o in options)} in {config.source})"


def _load_hint(config: KernelConfig | None, option: str, modprobe: str) -> str:
    """How to get a missing module: ``modprobe``, unless the kernel is built without it."""
    if config is not None and config.get(option) == "n":
        return f"this kernel is built without {option}: boot one built with it"
    return modprobe


# --- host checks -------------------------------------------------------------------------


def _module_loaded(host: DoctorHost, name: str) -> bool:
    return host.kernel.is_dir(host.paths.sys / "module" / name)


def _variant_drivers(host: DoctorHost) -> list[str]:
    """The vfio-pci variant drivers registered on the PCI bus (``mlx5_vfio_pci``, ...)."""
    try:
        drivers = host.kernel.listdir(host.paths.sys / "bus" / "pci" / "drivers")
    except OSError:
        return []
    return [d for d in drivers if sysfs.is_vfio_pci_driver(d) and not _is_plain_vfio_pci(d)]


def _is_plain_vfio_pci(driver: str | None) -> bool:
    return driver in (sysfs.VFIO_PCI_DRIVER, "vfio_pci")


def _group_path(host: DoctorHost) -> bool:
    return host.kernel.exists(host.paths.dev_node("/dev/vfio/vfio"))


def _cdev_path(host: DoctorHost) -> bool:
    return host.kernel.exists(host.paths.dev_node("/dev/iommu")) and host.kernel.is_dir(
        host.paths.dev_node("/dev/vfio/devices")
    )


def _check_kernel(host: DoctorHost, version: tuple[int, int, int] | None) -> Check:
    title = "kernel"
    if version is None:
        return Check(
            "kernel",
            title,
            Status.WARN,
            f"Linux {host.release}: cannot read a version from the release",
            "the known-bug checks below cannot tell whether they apply",
        )
    if version[:2] < (5, 18):
        return Check(
            "kernel",
            title,
            Status.FAIL,
            f"Linux {host.release}: VFIO migration v2 needs 5.18 or later",
            "boot a newer kernel (6.2+ for PRE_COPY)",
        )
    if version[:2] < (6, 2):
        return Check(
            "kernel",
            title,
            Status.WARN,
            f"Linux {host.release}: no PRE_COPY before 6.2 (stop-copy only: longer downtime)",
            "boot 6.2 or later for precopy",
        )
    return Check("kernel", title, Status.PASS, f"Linux {host.release}")


def _check_bug(bug: KernelBug, version: tuple[int, int, int] | None, release: str) -> Check:
    ident = f"bug:{bug.id}"
    if version is None:
        return Check(
            ident,
            bug.title,
            Status.WARN,
            f"cannot tell for release {release}: {bug.effect}",
            f"{bug.answer}; fix: {bug.fix}",
        )
    if not bug.affects(version):
        return Check(ident, bug.title, Status.PASS, f"not affected: {bug.why_not(version)}")
    vendor = " (vendor kernels may carry it under another version)" if bug.fixed else ""
    return Check(
        ident,
        bug.title,
        Status.WARN,
        f"{release} is affected by version: {bug.effect}",
        f"{bug.answer}; fix: {bug.fix}{vendor}",
    )


def _check_mtty_bug(host: DoctorHost, version: tuple[int, int, int] | None) -> Check:
    bug = MTTY_RESUMING_REOPEN
    if not _module_loaded(host, "mtty"):
        return Check(f"bug:{bug.id}", bug.title, Status.NA, "the mtty sample driver is not loaded")
    return _check_bug(bug, version, host.release)


def check_host(host: DoctorHost, devices: Sequence[SysfsDevice] = ()) -> list[Check]:
    """The host's checks; ``devices`` are the devices asked about (they decide what applies)."""
    version = parse_release(host.release)
    config = read_kernel_config(host)
    return [
        _check_kernel(host, version),
        _check_bug(BLOCKED_ARC_LOOP, version, host.release),
        _check_mtty_bug(host, version),
        *_check_modules(host, devices, config),
        _check_group_path(host),
        _check_cdev_path(host, config),
        _check_debugfs(host, config),
        _check_privileges(host),
    ]


def _check_modules(
    host: DoctorHost, devices: Sequence[SysfsDevice], config: KernelConfig | None
) -> list[Check]:
    checks: list[Check] = []
    if _module_loaded(host, "vfio"):
        checks.append(Check("module:vfio", "vfio", Status.PASS, "loaded"))
    else:
        checks.append(
            Check(
                "module:vfio",
                "vfio",
                Status.FAIL,
                "not loaded" + _configured(config, "CONFIG_VFIO"),
                _load_hint(
                    config, "CONFIG_VFIO", "modprobe vfio-pci (it loads vfio), or modprobe vfio"
                ),
            )
        )
    if _module_loaded(host, "vfio_iommu_type1"):
        checks.append(Check("module:vfio_iommu_type1", "vfio_iommu_type1", Status.PASS, "loaded"))
    elif _cdev_path(host):
        checks.append(
            Check(
                "module:vfio_iommu_type1",
                "vfio_iommu_type1",
                Status.NA,
                "not loaded; the cdev path (/dev/iommu) does without it",
            )
        )
    else:
        checks.append(
            Check(
                "module:vfio_iommu_type1",
                "vfio_iommu_type1",
                Status.FAIL,
                "not loaded, and there is no iommufd: no way to set up a device's DMA"
                + _configured(config, "CONFIG_VFIO_IOMMU_TYPE1"),
                _load_hint(config, "CONFIG_VFIO_IOMMU_TYPE1", "modprobe vfio_iommu_type1"),
            )
        )
    pci_wanted = not devices or any(d.bus == "pci" for d in devices)
    variants = _variant_drivers(host)
    vfio_pci = _module_loaded(host, "vfio_pci") or host.kernel.is_dir(
        host.paths.sys / "bus" / "pci" / "drivers" / sysfs.VFIO_PCI_DRIVER
    )
    if vfio_pci:
        shown = f"; variant drivers: {', '.join(variants)}" if variants else "; no variant driver"
        checks.append(Check("module:vfio_pci", "vfio_pci", Status.PASS, "loaded" + shown))
    elif not pci_wanted:
        checks.append(
            Check("module:vfio_pci", "vfio_pci", Status.NA, "not loaded; no PCI device checked")
        )
    else:
        checks.append(
            Check(
                "module:vfio_pci",
                "vfio_pci",
                Status.WARN,
                "not loaded: no PCI function can be used through VFIO"
                + _configured(config, "CONFIG_VFIO_PCI"),
                _load_hint(
                    config,
                    "CONFIG_VFIO_PCI",
                    "modprobe vfio-pci, and the variant driver of your device (e.g. mlx5_vfio_pci)",
                ),
            )
        )
    if _module_loaded(host, "mdev") or host.kernel.is_dir(host.paths.sys / "bus" / "mdev"):
        checks.append(Check("module:mdev", "mdev", Status.PASS, "loaded"))
    else:
        checks.append(
            Check(
                "module:mdev",
                "mdev",
                Status.NA,
                "not loaded: only mediated devices (mtty, vGPUs) need it",
            )
        )
    return checks


def _check_group_path(host: DoctorHost) -> Check:
    title = "group path"
    if _group_path(host):
        return Check("group-path", title, Status.PASS, "/dev/vfio/vfio exists (group + container)")
    if _cdev_path(host):
        return Check(
            "group-path", title, Status.NA, "no /dev/vfio/vfio; devices open through their cdev"
        )
    return Check(
        "group-path",
        title,
        Status.FAIL,
        "no /dev/vfio/vfio and no /dev/iommu: no way to open a VFIO device",
        "modprobe vfio vfio_iommu_type1 (or use a kernel with IOMMUFD and VFIO_DEVICE_CDEV)",
    )


def _check_cdev_path(host: DoctorHost, config: KernelConfig | None) -> Check:
    title = "cdev path"
    if _cdev_path(host):
        return Check("cdev-path", title, Status.PASS, "/dev/iommu and /dev/vfio/devices/ exist")
    options = ("CONFIG_IOMMUFD", "CONFIG_VFIO_DEVICE_CDEV")
    if config is not None and all(config.get(o) == "n" for o in options[1:]):
        why = "this kernel is built without it" + _configured(config, *options)
    elif not host.kernel.exists(host.paths.dev_node("/dev/iommu")):
        why = "no /dev/iommu (modprobe iommufd, if the kernel has it)" + _configured(
            config, *options
        )
    else:
        why = "no /dev/vfio/devices/" + _configured(config, *options)
    fallback = (
        "vfmig opens devices through their group"
        if _group_path(host)
        else "and there is no group path either"
    )
    return Check("cdev-path", title, Status.NA, f"{why}; {fallback}")


def _check_debugfs(host: DoctorHost, config: KernelConfig | None) -> Check:
    title = "debugfs"
    root = host.paths.debugfs
    # The reader answers for one device; NO_DEVICE (no such device) means vfio/ is there.
    availability = DebugfsReader("", root).availability()
    if availability in (Availability.OK, Availability.NO_DEVICE):
        return Check("debugfs", title, Status.PASS, f"{root}/vfio/ shows devices' states")
    if availability is Availability.NO_VFIO:
        return Check(
            "debugfs",
            title,
            Status.WARN,
            f"{root} has no vfio/: the vfio module is built without CONFIG_VFIO_DEBUGFS"
            + _configured(config, "CONFIG_VFIO_DEBUGFS")
            + "; vfmig works without it but cannot show the kernel's own view of a state",
            "use a vfio.ko built with CONFIG_VFIO_DEBUGFS=y (6.8+; Debian's 6.12 lacks it: "
            "docs/kernel-tier.md shows an out-of-tree build)",
        )
    if availability is Availability.NO_PERMISSION:
        return Check(
            "debugfs",
            title,
            Status.WARN,
            f"{root} is not readable by this user",
            "run as root to see devices' states in debugfs",
        )
    return Check(
        "debugfs",
        title,
        Status.WARN,
        f"debugfs is not mounted at {root}",
        f"mount -t debugfs none {root}",
    )


def _check_privileges(host: DoctorHost) -> Check:
    if host.euid == 0:
        return Check("privileges", "privileges", Status.PASS, "running as root")
    return Check(
        "privileges",
        "privileges",
        Status.WARN,
        f"not root (uid {host.euid}): other processes' fds and debugfs are unreadable",
        "run as root for complete answers; device access is checked per device",
    )


# --- device checks -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Probe:
    """What opening an idle device told (``opened`` False: ``error`` says why it did not open)."""

    opened: bool
    via: str | None = None  #: how it was opened (group or cdev node)
    error: DeviceError | None = None
    flags: MigrationFlags | None = None
    state: DeviceState | None = None
    state_error: str | None = None
    #: PROBE answers for DMA_LOGGING_START/STOP/REPORT: ``supported`` or an errno name.
    dma_logging: Mapping[str, str] = field(default_factory=dict)
    #: errno of a one-page DMA_LOGGING_REPORT (0: it worked), None when not tried.
    report_errno: int | None = None


class ProbeTimeout(Exception):
    """The device did not answer within the probe's timeout."""


def run_probe(
    dev: SysfsDevice, host: DoctorHost, *, vf_token: uuid.UUID | None, timeout: float
) -> Probe:
    """Open ``dev`` and read what it tells (see the module docstring); never a SET or reset.

    Raises :class:`ProbeTimeout` if the device does not answer within ``timeout`` seconds
    (the thread doing it is abandoned).
    """
    try:
        return call_abandonable(
            lambda: _probe(dev, host, vf_token), timeout, f"doctor probe of {dev.name}"
        )
    except Abandoned:
        raise ProbeTimeout(f"no answer within {timeout:g} s") from None


def _probe(dev: SysfsDevice, host: DoctorHost, vf_token: uuid.UUID | None) -> Probe:
    from vfmig.device.vfio import open_sysfs_device  # the ctypes uAPI only when probing

    try:
        device = open_sysfs_device(dev, kernel=host.kernel, host=host.paths, vf_token=vf_token)
    except DeviceError as exc:
        return Probe(opened=False, error=exc)
    with device:
        try:
            state: DeviceState | None = device.get_state()
            state_error = None
        except DeviceError as exc:
            state, state_error = None, exc.reason + f" ({errno_name(exc.errno)})"
        logging = _dma_logging_probes(device)
        report = _report_errno(device) if _all_supported(logging) else None
        return Probe(
            opened=True,
            via=device.access,
            flags=device.flags,
            state=state,
            state_error=state_error,
            dma_logging=logging,
            report_errno=report,
        )


_DMA_LOGGING: Final = ("DMA_LOGGING_START", "DMA_LOGGING_STOP", "DMA_LOGGING_REPORT")


def _dma_logging_probes(device: VfioDevice) -> dict[str, str]:
    from vfmig.device import _uapi as uapi

    return {name: device.probe_feature(uapi.FeatureId[name]) for name in _DMA_LOGGING}


def _all_supported(answers: Mapping[str, str]) -> bool:
    from vfmig.device.vfio import SUPPORTED

    return bool(answers) and all(answer == SUPPORTED for answer in answers.values())


def _report_errno(device: VfioDevice) -> int:
    """errno of a DMA_LOGGING_REPORT of one page at IOVA 0 (0 when it succeeds)."""
    from vfmig.device import _uapi as uapi

    request = uapi.feature_request(
        uapi.FeatureId.DMA_LOGGING_REPORT,
        uapi.FEATURE_GET,
        uapi.FeatureDmaLoggingReport.for_range(0, 4096, 4096),
    )
    try:
        # VfioDevice offers PROBEs but no REPORT: its one FEATURE ioctl helper is private.
        device._feature(request)
    except OSError as exc:
        return exc.errno if exc.errno is not None else _errno.EIO
    return 0


@dataclass(frozen=True, slots=True)
class _Migration:
    """What is known of a device's migration support, and from where."""

    supported: bool | None
    flags: MigrationFlags | None = None
    source: str = ""  #: ``debugfs``, ``probe``, or ``driver`` (plain vfio-pci never migrates)
    dirty_tracking: bool | None = None  #: from debugfs ``features`` (6.18+)


def check_device(
    ident: str,
    host: DoctorHost,
    *,
    vf_token: uuid.UUID | None = None,
    probe: bool = False,
    timeout: float = 10.0,
) -> list[Check]:
    """The checks of the device ``ident`` names (PCI address, mdev UUID or sysfs path)."""
    dev = sysfs.find(ident, host.paths, host.kernel)
    if dev is None:
        looked = " and ".join(str(p) for p in sysfs.candidate_paths(ident, host.paths))
        return [
            Check(
                "device",
                "device",
                Status.FAIL,
                f"no such device {ident} (looked in {looked})",
                "give a PCI address (0000:3b:00.1), an mdev UUID or a sysfs device path; "
                "'vfmig list' shows this host's VFIO devices",
            )
        ]
    held = sysfs.scan_holders(host.paths, host.kernel).held(dev)
    debugfs = sysfs.debugfs_migration(dev.name, host.paths)
    checks = [_check_exists(dev)]
    probed: Probe | None = None
    open_check: Check | None = None
    if probe:
        probed, open_check = _probe_check(dev, host, held, vf_token, timeout)
    migration = _migration(dev, debugfs, probed)
    checks += [
        _check_driver(dev, host, migration),
        _check_group(dev, host),
        _check_access(dev, host),
        _check_cdev(dev, host),
        _check_vf_token(dev, host, vf_token),
        _check_busy(dev, held),
    ]
    if open_check is not None:
        checks.append(open_check)
    checks += [
        _check_migration(migration),
        _check_state(dev, debugfs, probed),
        _check_dirty_tracking(dev, migration, probed),
    ]
    return checks


def _check_exists(dev: SysfsDevice) -> Check:
    if dev.bus == "mdev":
        what = f"mdev of type {dev.description} (parent {dev.parent})"
    elif dev.bus == "pci":
        what = f"PCI function {dev.description}" + (f", VF of {dev.physfn}" if dev.physfn else "")
    else:
        what = f"a {dev.bus} device"
    return Check("device", "device", Status.PASS, f"{dev.name}: {what}")


def _migration(
    dev: SysfsDevice, debugfs: sysfs.DebugfsMigration, probed: Probe | None
) -> _Migration:
    if probed is not None and probed.opened:
        return _Migration(True, probed.flags, "probe", debugfs.dirty_tracking)
    if probed is not None and _not_migratable(probed.error):
        return _Migration(False, source="probe")
    if debugfs.supported is not None:
        return _Migration(debugfs.supported, debugfs.flags, "debugfs", debugfs.dirty_tracking)
    if dev.bus == "pci" and _is_plain_vfio_pci(dev.driver):
        return _Migration(False, source="driver")  # vfio-pci itself has no migration ops
    return _Migration(None)


def _not_migratable(error: DeviceError | None) -> bool:
    from vfmig.device.vfio import MigrationNotSupported

    return isinstance(error, MigrationNotSupported)


def _variant_for(dev: SysfsDevice, host: DoctorHost) -> list[str]:
    """Variant drivers of this kernel that claim the device (``modules.alias``: ``vfio_pci:``)."""
    try:
        modalias = host.kernel.read_text(dev.path / "modalias").strip()
        aliases = (host.modules / host.release / "modules.alias").read_text()
    except OSError:
        return []
    wanted = "vfio_" + modalias
    found: list[str] = []
    for line in aliases.splitlines():
        parts = line.split()
        if (
            len(parts) == 3
            and parts[0] == "alias"
            and parts[1].startswith("vfio_pci:")
            and fnmatch.fnmatchcase(wanted, parts[1])
            and parts[2] not in found
        ):
            found.append(parts[2])
    return found


def _bind_hint(dev: SysfsDevice, driver: str) -> str:
    base = f"/sys/bus/pci/devices/{dev.name}"
    unbind = f"echo {dev.name} > {base}/driver/unbind; " if dev.driver else ""
    return (
        f"modprobe {driver}; echo {driver} > {base}/driver_override; {unbind}"
        f"echo {dev.name} > /sys/bus/pci/drivers_probe"
    )


def _check_driver(dev: SysfsDevice, host: DoctorHost, migration: _Migration) -> Check:
    title = "driver"
    if dev.bus == "mdev":
        if dev.driver is None:
            return Check(
                "driver",
                title,
                Status.FAIL,
                "the mdev is not bound to a driver",
                "load its parent's mdev driver (for example modprobe mtty)",
            )
        what = f"{dev.driver} (mdev parent {dev.parent})"
        if migration.supported is False:
            return Check(
                "driver",
                title,
                Status.FAIL,
                f"{what}: the driver has no migration support for it",
                "use an mdev type whose parent driver supports migration",
            )
        if migration.supported is None:
            return Check(
                "driver",
                title,
                Status.WARN,
                f"{what}: whether it supports migration is not known (see migration)",
                "rerun with --probe",
            )
        return Check("driver", title, Status.PASS, f"{what}, with migration support")
    if dev.bus != "pci":
        return Check(
            "driver", title, Status.FAIL, f"a {dev.bus} device: vfmig opens PCI functions and mdevs"
        )
    variants = _variant_for(dev, host)
    suggestion = variants[0] if variants else "<vendor>_vfio_pci"
    if _is_plain_vfio_pci(dev.driver):
        known = (
            f"its variant driver here is {', '.join(variants)}"
            if variants
            else "no variant driver of this kernel claims it (modules.alias): it may not "
            "support migration at all"
        )
        return Check(
            "driver",
            title,
            Status.FAIL,
            f"bound to plain vfio-pci, which cannot migrate; {known}",
            "bind the variant driver: " + _bind_hint(dev, suggestion),
        )
    if not sysfs.is_vfio_pci_driver(dev.driver):
        return Check(
            "driver",
            title,
            Status.FAIL,
            f"bound to {dev.driver or 'no driver'}, not to VFIO",
            "bind its migration variant driver: " + _bind_hint(dev, suggestion),
        )
    if migration.supported is False:
        return Check(
            "driver",
            title,
            Status.FAIL,
            f"{dev.driver}: the variant driver offers no migration for this device",
            "check the device's firmware and its migration capability (e.g. mlx5: "
            "devlink port function set ... migratable enable)",
        )
    return Check("driver", title, Status.PASS, f"{dev.driver} (a vfio-pci variant driver)")


def _check_group(dev: SysfsDevice, host: DoctorHost) -> Check:
    title = "IOMMU group"
    if dev.iommu_group is None:
        return Check(
            "iommu-group",
            title,
            Status.FAIL,
            "the device has no IOMMU group",
            "enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line)",
        )
    members = sysfs.group_members(dev.iommu_group, host.paths, host.kernel)
    others = [m for m in members if m.name != dev.name]
    blocking = [m for m in others if not m.keeps_group_viable]
    if blocking:
        return Check(
            "iommu-group",
            title,
            Status.FAIL,
            f"group {dev.iommu_group} is not viable: {', '.join(map(str, blocking))}",
            "bind every device of the group to vfio-pci or unbind it",
        )
    shared = f", shared with {', '.join(map(str, others))}" if others else ""
    return Check("iommu-group", title, Status.PASS, f"group {dev.iommu_group}, viable{shared}")


def _check_access(dev: SysfsDevice, host: DoctorHost) -> Check:
    title = "access"
    if (
        dev.cdev_node is not None
        and _cdev_path(host)
        and host.kernel.exists(host.paths.dev_node(dev.cdev_node))
    ):
        nodes = [dev.cdev_node, "/dev/iommu"]
    elif dev.group_node is not None:
        nodes = [dev.group_node, "/dev/vfio/vfio"]
    else:
        return Check("access", title, Status.NA, "no node to open (no IOMMU group)")
    missing = [n for n in nodes if not host.kernel.exists(host.paths.dev_node(n))]
    if missing:
        return Check(
            "access",
            title,
            Status.FAIL,
            f"{', '.join(missing)} missing",
            "the device's VFIO driver is not bound, or udev has not created the node yet",
        )
    denied = [n for n in nodes if not host.access(host.paths.dev_node(n))]
    if denied:
        return Check(
            "access",
            title,
            Status.FAIL,
            f"no read-write access to {', '.join(denied)} for uid {host.euid}",
            "run as root, or give this user access to " + ", ".join(denied),
        )
    return Check("access", title, Status.PASS, f"read-write access to {', '.join(nodes)}")


def _check_cdev(dev: SysfsDevice, host: DoctorHost) -> Check:
    title = "cdev"
    if dev.cdev_node is None:
        return Check("cdev", title, Status.NA, "the device has no VFIO cdev (vfio-dev/) in sysfs")
    if not host.kernel.exists(host.paths.dev_node(dev.cdev_node)):
        return Check(
            "cdev",
            title,
            Status.NA,
            f"no {dev.cdev_node} (kernel without VFIO_DEVICE_CDEV?); it opens through its group",
        )
    if not _cdev_path(host):
        return Check("cdev", title, Status.NA, f"{dev.cdev_node} exists, but no /dev/iommu")
    return Check("cdev", title, Status.PASS, f"{dev.cdev_node} with /dev/iommu (preferred)")


def _check_vf_token(dev: SysfsDevice, host: DoctorHost, vf_token: uuid.UUID | None) -> Check:
    title = "VF token"
    if dev.physfn is None:
        return Check("vf-token", title, Status.NA, "not an SR-IOV VF")
    pf = sysfs.find(dev.physfn, host.paths, host.kernel)
    pf_driver = pf.driver if pf is not None else None
    if not sysfs.is_vfio_pci_driver(pf_driver):
        return Check(
            "vf-token",
            title,
            Status.PASS,
            f"none needed: PF {dev.physfn} is bound to {pf_driver or 'no driver'}",
        )
    if vf_token is not None:
        return Check(
            "vf-token", title, Status.PASS, f"PF {dev.physfn} is on {pf_driver}; a token is given"
        )
    return Check(
        "vf-token",
        title,
        Status.WARN,
        f"PF {dev.physfn} is bound to {pf_driver}: opening this VF needs its VF token",
        f"give vfio:{dev.name},vf-token=<uuid> with the token the PF's user set",
    )


def _check_busy(dev: SysfsDevice, held: sysfs.Held) -> Check:
    title = "in use"
    if held.status == "yes":
        return Check(
            "busy",
            title,
            Status.FAIL,
            f"held by {', '.join(map(str, held.holders))}",
            "a device in use (by QEMU, another vfmig) cannot be opened: stop that process, "
            "or migrate from it",
        )
    if held.status == "unknown":
        return Check(
            "busy",
            title,
            Status.WARN,
            "cannot tell: other processes' fds are unreadable",
            "run as root",
        )
    nodes = " or ".join(n for n in (dev.group_node, dev.cdev_node) if n is not None)
    return Check("busy", title, Status.PASS, f"no process holds {nodes or 'it'}")


def _probe_check(
    dev: SysfsDevice,
    host: DoctorHost,
    held: sysfs.Held,
    vf_token: uuid.UUID | None,
    timeout: float,
) -> tuple[Probe | None, Check]:
    title = "probe"
    if held.status != "no":
        why = "it is held by another process" if held.status == "yes" else "its holders are unknown"
        return None, Check("open", title, Status.NA, f"not opened: {why}")
    if not dev.is_vfio:
        return None, Check("open", title, Status.NA, "not opened: not bound to a VFIO driver")
    try:
        probed = run_probe(dev, host, vf_token=vf_token, timeout=timeout)
    except ProbeTimeout as exc:
        return None, Check(
            "open",
            title,
            Status.FAIL,
            f"opening or reading it: {exc}; the driver may be stuck on its lock",
            "check the kernel log (dmesg) for an oops of the device's driver",
        )
    if probed.error is not None and not _not_migratable(probed.error):
        return probed, Check("open", title, Status.FAIL, str(probed.error), probed.error.hint)
    if not probed.opened:
        return probed, Check("open", title, Status.PASS, "opened; it has no migration support")
    return probed, Check("open", title, Status.PASS, f"opened via {probed.via}; read only")


def _check_migration(migration: _Migration) -> Check:
    title = "migration"
    if migration.supported is False:
        where = {
            "probe": "the driver answers ENOTTY to VFIO_DEVICE_FEATURE_MIGRATION",
            "debugfs": "debugfs has no migration/ directory for it",
            "driver": "plain vfio-pci has no migration support",
        }[migration.source]
        return Check("migration", title, Status.FAIL, f"not supported: {where}", "see driver")
    if migration.supported is None:
        return Check(
            "migration",
            title,
            Status.WARN,
            "not known without opening the device (debugfs does not show it)",
            "rerun with --probe (opening a vfio-pci device resets the function)",
        )
    if migration.flags is None:
        return Check(
            "migration",
            title,
            Status.PASS,
            "supported (debugfs shows its migration state); flags need Linux 6.18's debugfs "
            "or --probe",
        )
    flags = migration.flags
    shown = f"{flag_names(flags)} ({migration.source})"
    if MigrationFlags.STOP_COPY not in flags:
        return Check(
            "migration",
            title,
            Status.FAIL,
            f"{shown}: no STOP_COPY, which every migration needs",
            "see driver",
        )
    if MigrationFlags.PRE_COPY not in flags:
        return Check(
            "migration",
            title,
            Status.WARN,
            f"{shown}: no PRE_COPY, so all state moves while the device is stopped",
            "expect a downtime as long as the whole transfer",
        )
    note = "" if MigrationFlags.P2P in flags else "; no P2P: multi-device runs need --allow-no-p2p"
    return Check("migration", title, Status.PASS, shown + note)


def _check_state(dev: SysfsDevice, debugfs: sysfs.DebugfsMigration, probed: Probe | None) -> Check:
    title = "state"
    by_debugfs = debugfs.state if debugfs.supported else None
    by_ioctl = probed.state if probed is not None else None
    if probed is not None and probed.opened and by_ioctl is None:
        return Check(
            "state",
            title,
            Status.FAIL,
            f"GET of the state failed: {probed.state_error}",
            "check the kernel log; 'vfmig recover' resets a device in a bad state",
        )
    if by_ioctl is not None:
        state, source = by_ioctl, "ioctl"
        if by_debugfs is not None and by_debugfs != by_ioctl.name:
            source += f"; debugfs says {by_debugfs}"
    elif by_debugfs is not None and by_debugfs in DeviceState.__members__:
        state, source = DeviceState[by_debugfs], "debugfs"
    elif by_debugfs == "timeout":
        return Check(
            "state",
            title,
            Status.FAIL,
            "reading the debugfs state timed out: the driver is stuck on its lock",
            "check the kernel log (dmesg) for an oops of the device's driver",
        )
    elif by_debugfs is not None:
        return Check(
            "state", title, Status.WARN, f"debugfs state unreadable: {by_debugfs}", "try --probe"
        )
    else:
        return Check(
            "state",
            title,
            Status.NA,
            "not known: debugfs does not show it and the device was not probed",
        )
    shown = f"{state.name} ({source})"
    if state is DeviceState.RUNNING:
        return Check("state", title, Status.PASS, shown)
    if state is DeviceState.STOP:
        return Check(
            "state",
            title,
            Status.WARN,
            f"{shown}: usable as a destination only (a stopped source may hold a migrated state)",
            f"if its state is no longer needed: vfmig recover vfio:{dev.name}",
        )
    return Check(
        "state",
        title,
        Status.FAIL,
        f"{shown}: left in a migration state by an earlier run; migrate refuses it",
        f"vfmig recover vfio:{dev.name}",
    )


def _check_dirty_tracking(dev: SysfsDevice, migration: _Migration, probed: Probe | None) -> Check:
    title = "dirty tracking"
    why_needed = "a VMM migrating the memory this device writes needs it; vfmig does not"
    if migration.dirty_tracking:
        return Check("dirty-tracking", title, Status.PASS, "the driver tracks DMA (debugfs)")
    if migration.supported is False:
        return Check("dirty-tracking", title, Status.NA, "the device cannot migrate")
    if probed is None or not probed.opened:
        if migration.dirty_tracking is False:
            return Check(
                "dirty-tracking",
                title,
                Status.WARN,
                f"debugfs lists no dirty-tracking for it ({why_needed})",
                "IOMMU dirty tracking needs the cdev path (iommufd)",
            )
        return Check(
            "dirty-tracking", title, Status.NA, "not known without opening the device (--probe)"
        )
    answers = probed.dma_logging
    if not _all_supported(answers):
        shown = ", ".join(f"{n.removeprefix('DMA_LOGGING_')} {a}" for n, a in answers.items())
        return Check(
            "dirty-tracking",
            title,
            Status.WARN,
            f"no DMA logging in the driver (PROBE: {shown}); {why_needed}",
            "IOMMU dirty tracking needs the cdev path (iommufd) and a capable IOMMU",
        )
    dummy = dev.driver == "mtty"
    dummy_note = "; mtty's DMA logging ops are dummies anyway" if dummy else ""
    report = probed.report_errno
    if report == _errno.EOPNOTSUPP:
        return Check(
            "dirty-tracking",
            title,
            Status.WARN,
            "the driver has DMA logging, but DMA_LOGGING_REPORT answers EOPNOTSUPP: the "
            f"kernel is built without CONFIG_IOMMUFD_DRIVER{dummy_note} ({why_needed})",
            "a kernel with CONFIG_IOMMUFD_DRIVER=y; QEMU needs "
            "x-device-dirty-page-tracking=off on such a host",
        )
    if report not in (0, _errno.EINVAL):  # EINVAL: logging not started, as on an idle device
        return Check(
            "dirty-tracking",
            title,
            Status.WARN,
            f"DMA_LOGGING_REPORT answers {errno_name(report)} ({why_needed})",
        )
    if dummy:
        return Check(
            "dirty-tracking",
            title,
            Status.WARN,
            f"DMA logging answers, but mtty's ops are dummies: it tracks nothing ({why_needed})",
        )
    return Check("dirty-tracking", title, Status.PASS, "DMA logging: START, STOP and REPORT")
