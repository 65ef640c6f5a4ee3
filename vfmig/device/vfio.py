"""The kernel backend: a real VFIO device, opened through a cdev + iommufd or a group + container.

Theory of operation
-------------------
``open_vfio_device(spec)`` turns ``vfio:ID`` into an open :class:`VfioDevice`:

1. **Find** the device in sysfs (:mod:`vfmig.device.sysfs`): a PCI address
   (``0000:3b:00.1``, or ``3b:00.1`` for domain 0000), an mdev UUID, or a sysfs device
   path. It must be bound to a VFIO driver (vfio-pci, a variant driver, or an mdev
   driver); otherwise the error names its driver and how to rebind it.
2. **Open** it by one of the two kernel paths:

   * *cdev + iommufd* (preferred when the device has ``vfio-dev/vfioN`` and both
     ``/dev/vfio/devices/vfioN`` and ``/dev/iommu`` exist): open the cdev, open
     ``/dev/iommu``, ``VFIO_DEVICE_BIND_IOMMUFD`` (with ``BIND_FLAG_TOKEN`` and the VF
     token when one is given), ``IOMMU_IOAS_ALLOC``, ``VFIO_DEVICE_ATTACH_IOMMUFD_PT``
     to that IOAS. Preferred because it is the kernel's direction (the legacy container
     can be configured out, ``VFIO_CONTAINER=n``), it needs no whole-group fd, and each
     device gets its own fd without group bookkeeping. Debian's 6.12 has no IOMMUFD, so
     this path is only exercised against the fake :class:`~vfmig.device.kernel.Kernel`.
   * *group + container* (measured on 6.12): open ``/dev/vfio/vfio``, check
     ``GET_API_VERSION`` and ``CHECK_EXTENSION(TYPE1v2)``, open ``/dev/vfio/N``, check
     ``GET_STATUS`` is VIABLE, ``SET_CONTAINER``, ``SET_IOMMU(TYPE1v2)``, then
     ``GET_DEVICE_FD`` with the device name (plus ``" vf_token=<uuid>"``). A group fd is
     exclusive, so devices of one group opened by this process share one group and its
     container (reference counted); only the first device sets the IOMMU.

   The spec option ``iommu=cdev`` or ``iommu=group`` forces one path.
3. **Read the migration flags** (``FEATURE MIGRATION GET``): ENOTTY means the driver has
   no migration support, usually plain vfio-pci instead of the variant driver.

Every errno met on the way becomes one :class:`OpenError` subclass with a one-line
message and a hint (busy, permission, group not viable, VF token, ...). Nothing here
changes the device's migration state; a device found in a leftover state stays there.

:class:`VfioDevice` implements the kernel-exact primitives of
:class:`~vfmig.device.backend.MigrationDevice` with ``VFIO_DEVICE_FEATURE`` and
``VFIO_DEVICE_RESET`` and caches the last state it knows (from its own GETs and SETs).
:class:`VfioDataSession` wraps a data fd: reads go through one ``readv`` straight into the
caller's buffer; ENOMSG/EAGAIN, and a 0-byte read while the device is in PRE_COPY or
PRE_COPY_P2P (mtty returns 0 instead of ENOMSG), mean "nothing now" (None); 0 elsewhere
is the end of the stream.

Everything is synchronous and goes through the injected Kernel facade.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import errno as _errno
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from vfmig.core import fsm
from vfmig.core.errors import DataError, DeviceError, errno_name
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.core.spec import vfio_options
from vfmig.device import _uapi as uapi
from vfmig.device import sysfs
from vfmig.device.backend import DataSession, Direction, MigrationDevice, PrecopyInfo
from vfmig.device.debugfs import DebugfsReader
from vfmig.device.kernel import REAL_KERNEL
from vfmig.device.sysfs import HostPaths, SysfsDevice

if TYPE_CHECKING:
    import uuid
    from ctypes import _CData

    from vfmig.core.spec import DeviceSpec
    from vfmig.device.kernel import Kernel

#: Flags every VFIO node is opened with.
_OPEN_FLAGS: Final = os.O_RDWR | os.O_CLOEXEC

CONTAINER_NODE: Final = "/dev/vfio/vfio"
IOMMUFD_NODE: Final = "/dev/iommu"

#: The operation each feature is PROBEd with (PROBE only accepts ops the feature has).
PROBE_OPS: Final[dict[uapi.FeatureId, int]] = {
    uapi.FeatureId.PCI_VF_TOKEN: uapi.FEATURE_SET,
    uapi.FeatureId.MIGRATION: uapi.FEATURE_GET,
    uapi.FeatureId.MIG_DEVICE_STATE: uapi.FEATURE_SET,
    uapi.FeatureId.LOW_POWER_ENTRY: uapi.FEATURE_SET,
    uapi.FeatureId.LOW_POWER_ENTRY_WITH_WAKEUP: uapi.FEATURE_SET,
    uapi.FeatureId.LOW_POWER_EXIT: uapi.FEATURE_SET,
    uapi.FeatureId.DMA_LOGGING_START: uapi.FEATURE_SET,
    uapi.FeatureId.DMA_LOGGING_STOP: uapi.FEATURE_SET,
    uapi.FeatureId.DMA_LOGGING_REPORT: uapi.FEATURE_GET,
    uapi.FeatureId.MIG_DATA_SIZE: uapi.FEATURE_GET,
    uapi.FeatureId.BUS_MASTER: uapi.FEATURE_SET,
    uapi.FeatureId.DMA_BUF: uapi.FEATURE_GET,
    uapi.FeatureId.MIG_PRECOPY_INFOv2: uapi.FEATURE_SET,
    uapi.FeatureId.ZPCI_ERROR: uapi.FEATURE_GET,
}

#: The answer :meth:`VfioDevice.probe_features` gives for a feature the device has.
SUPPORTED: Final = "supported"


# --- errors ------------------------------------------------------------------------------


class OpenError(DeviceError):
    """A VFIO device could not be opened; the message says why, the hint how to fix it."""

    def __init__(
        self, device: str, message: str, *, errno: int | None = None, hint: str | None = None
    ) -> None:
        super().__init__(device, "open", message, errno=errno, hint=hint)


class NoSuchDevice(OpenError):
    """No PCI function or mdev by that id."""


class NotVfioDevice(OpenError):
    """The device exists but is not bound to a VFIO driver."""


class VfioUnavailable(OpenError):
    """The host's VFIO is not usable: no module, no IOMMU group, no container support."""


class GroupNotViable(OpenError):
    """Another device of the IOMMU group is bound to a host driver."""


class DeviceBusy(OpenError):
    """The group or device is held by another process (EBUSY)."""


class AccessDenied(OpenError):
    """No permission on a VFIO node (EACCES/EPERM)."""


class VfTokenError(OpenError):
    """The VF token is missing, wrong, or given where none is used."""


class MigrationNotSupported(OpenError):
    """The driver has no migration support (ENOTTY on FEATURE MIGRATION)."""


# --- the data session --------------------------------------------------------------------


class VfioDataSession(DataSession):
    """A migration data fd returned by a SET of MIG_DEVICE_STATE."""

    def __init__(self, device: VfioDevice, fd: int, direction: Direction) -> None:
        self._device = device
        self._kernel = device.kernel
        self._fd = fd
        self.direction = direction
        self._offset = 0

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def offset(self) -> int:
        """Bytes read or written so far."""
        return self._offset

    def _check_open(self, step: str) -> int:
        if self._fd < 0:
            raise DataError(
                self._device.name,
                step,
                errno=_errno.EBADF,
                offset=self._offset,
                message="the data session is closed",
            )
        return self._fd

    def readinto(self, buffer: bytearray | memoryview) -> int | None:
        fd = self._check_open("read")
        try:
            n = self._kernel.readv(fd, [buffer])
        except OSError as exc:
            if exc.errno in (_errno.ENOMSG, _errno.EAGAIN):
                return None
            raise DataError(
                self._device.name, "read", errno=exc.errno, offset=self._offset
            ) from exc
        if n == 0 and self._device.cached_state in fsm.PRECOPY_STATES:
            return None  # mtty answers 0 instead of ENOMSG in PRE_COPY: never an end there
        self._offset += n
        return n

    def write(self, data: bytes | bytearray | memoryview) -> int:
        fd = self._check_open("write")
        try:
            n = self._kernel.write(fd, data)
        except OSError as exc:
            raise DataError(
                self._device.name, "write", errno=exc.errno, offset=self._offset
            ) from exc
        self._offset += n
        return n

    def precopy_info(self) -> PrecopyInfo:
        fd = self._check_open("VFIO_MIG_GET_PRECOPY_INFO")
        v2 = self._device.enable_precopy_info_v2()
        info = uapi.PrecopyInfo.new()
        try:
            self._kernel.ioctl(fd, uapi.DataFdIoctl.MIG_GET_PRECOPY_INFO, info)
        except OSError as exc:
            raise DataError(
                self._device.name, "VFIO_MIG_GET_PRECOPY_INFO", errno=exc.errno, offset=self._offset
            ) from exc
        return PrecopyInfo(
            initial_bytes=info.initial_bytes,
            dirty_bytes=info.dirty_bytes,
            reinit=v2 and bool(info.flags & uapi.PRECOPY_INFO_REINIT),
        )

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            _close_quietly(self._kernel, fd)


# --- how the device fd was obtained ------------------------------------------------------


def _close_quietly(kernel: Kernel, fd: int) -> None:
    """close(2) that never raises: a VFIO fd's close cannot fail in a way a caller could fix."""
    with contextlib.suppress(OSError):
        kernel.close(fd)


@dataclass(eq=False)
class _SharedGroup:
    """A group fd and its container, shared by the devices of that group this process opened."""

    kernel: Kernel
    node: str
    group_fd: int
    container_fd: int
    users: int = 1


_groups_lock = threading.Lock()
#: Open groups by (id of the Kernel, canonical node). An entry keeps its Kernel alive, so the
#: id is not reused while the entry exists.
_groups: dict[tuple[int, str], _SharedGroup] = {}


class _Access(abc.ABC):
    """The fds besides the device fd that keep the device open, released in order on close."""

    description: str

    @abc.abstractmethod
    def release(self) -> None:
        """Close them (idempotent; never raises)."""


class _GroupAccess(_Access):
    def __init__(self, group: _SharedGroup) -> None:
        self._group: _SharedGroup | None = group
        self.description = f"group {group.node} (container {CONTAINER_NODE}, TYPE1v2)"

    def release(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            _release_group(group)


@dataclass(eq=False)
class _CdevAccess(_Access):
    kernel: Kernel
    iommufd: int
    ioas_id: int
    node: str
    description: str = field(init=False)

    def __post_init__(self) -> None:
        self.description = f"cdev {self.node} (iommufd {IOMMUFD_NODE}, IOAS {self.ioas_id})"

    def release(self) -> None:
        fd, self.iommufd = self.iommufd, -1
        if fd < 0:
            return
        with contextlib.suppress(OSError):  # closing the iommufd below frees the IOAS anyway
            self.kernel.ioctl(fd, uapi.IommufdIoctl.DESTROY, uapi.IommuDestroy.new(id=self.ioas_id))
        _close_quietly(self.kernel, fd)


def _release_group(group: _SharedGroup) -> None:
    with _groups_lock:
        group.users -= 1
        if group.users > 0:
            return
        _groups.pop((id(group.kernel), group.node), None)
    _close_quietly(group.kernel, group.group_fd)
    _close_quietly(group.kernel, group.container_fd)


# --- the device --------------------------------------------------------------------------


class VfioDevice(MigrationDevice):
    """An open VFIO device with migration support."""

    kind = "vfio"

    def __init__(
        self,
        *,
        kernel: Kernel,
        device_fd: int,
        sysfs_device: SysfsDevice,
        access: _Access,
        host: HostPaths,
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.name = sysfs_device.name
        self.sysfs = sysfs_device
        self.host = host
        self._fd = device_fd
        self._access = access
        self._cached_state: DeviceState | None = None
        self._precopy_v2: bool | None = None
        self.flags = MigrationFlags(0)

    @property
    def access(self) -> str:
        """How the device was opened: the cdev or group node and what backs it."""
        return self._access.description

    @property
    def cached_state(self) -> DeviceState | None:
        """The last state this process saw (GET, successful SET, reset); None if unknown."""
        return self._cached_state

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _feature(self, request: uapi.FeatureRequest[Any]) -> None:
        self._ioctl(uapi.DeviceIoctl.FEATURE, request.buffer)

    def _ioctl(self, request: int, arg: _CData | int = 0) -> int:
        if self._fd < 0:
            raise OSError(_errno.EBADF, "device closed")
        return self.kernel.ioctl(self._fd, request, arg)

    def read_migration_flags(self) -> MigrationFlags:
        """FEATURE MIGRATION GET (raises OSError)."""
        request = uapi.feature_request(
            uapi.FeatureId.MIGRATION, uapi.FEATURE_GET, uapi.FeatureMigration()
        )
        self._feature(request)
        known = MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY
        return MigrationFlags(request.payload.flags & known)

    # --- MigrationDevice primitives ---

    def _get_state(self) -> DeviceState:
        request = uapi.feature_request(
            uapi.FeatureId.MIG_DEVICE_STATE, uapi.FEATURE_GET, uapi.FeatureMigState(data_fd=-1)
        )
        self._cached_state = None
        self._feature(request)
        value = request.payload.device_state
        if not 0 <= value < fsm.NUM_STATES:
            raise OSError(_errno.EPROTO, f"the kernel reported device state {value}")
        self._cached_state = DeviceState(value)
        return self._cached_state

    def _set_state(self, target: int) -> DataSession | None:
        request = uapi.feature_request(
            uapi.FeatureId.MIG_DEVICE_STATE,
            uapi.FEATURE_SET,
            uapi.FeatureMigState(device_state=target, data_fd=-1),
        )
        self._cached_state = None  # a failed SET may leave the device anywhere on the path
        self._feature(request)
        self._cached_state = DeviceState(target)
        data_fd = request.payload.data_fd
        if data_fd < 0:
            return None
        direction = Direction.RESUMING if target == DeviceState.RESUMING else Direction.SAVING
        return VfioDataSession(self, data_fd, direction)

    def _reset(self) -> None:
        self._cached_state = None
        self._ioctl(uapi.DeviceIoctl.RESET)
        self._cached_state = DeviceState.RUNNING

    def _data_size(self) -> int:
        request = uapi.feature_request(
            uapi.FeatureId.MIG_DATA_SIZE, uapi.FEATURE_GET, uapi.FeatureMigDataSize()
        )
        self._feature(request)
        return int(request.payload.stop_copy_length)

    def _close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            _close_quietly(self.kernel, fd)
            self._access.release()

    @property
    def debugfs(self) -> DebugfsReader:
        return DebugfsReader(self.name, self.host.debugfs)

    # --- beyond the MigrationDevice interface ---

    def probe_feature(self, feature: uapi.FeatureId) -> str:
        """PROBE one feature: ``supported`` or the kernel's errno name (ENOTTY, EINVAL, ...)."""
        try:
            self._feature(uapi.feature_request(feature, uapi.FEATURE_PROBE | PROBE_OPS[feature]))
        except OSError as exc:
            return errno_name(exc.errno)
        return SUPPORTED

    def probe_features(self) -> dict[str, str]:
        """PROBE every device feature vfmig knows: feature name -> ``supported`` or errno name.

        A PROBE never changes the device (the kernel returns before acting on it).
        """
        return {feature.name: self.probe_feature(feature) for feature in uapi.FeatureId}

    def enable_precopy_info_v2(self) -> bool:
        """Opt in to MIG_PRECOPY_INFOv2 (REINIT reports) once, if the driver has it."""
        if self._precopy_v2 is None:
            feature = uapi.FeatureId.MIG_PRECOPY_INFOv2
            enabled = self.probe_feature(feature) == SUPPORTED
            if enabled:
                try:
                    self._feature(uapi.feature_request(feature, uapi.FEATURE_SET))
                except OSError:
                    enabled = False
            self._precopy_v2 = enabled
        return self._precopy_v2


# --- opening -----------------------------------------------------------------------------


def _looked_in(ident: str, host: HostPaths) -> str:
    return " and ".join(str(p) for p in sysfs.candidate_paths(ident, host))


def _bind_hint(dev: SysfsDevice) -> str:
    base = f"/sys/bus/pci/devices/{dev.name}"
    return (
        f"bind it to its migration driver (for example mlx5_vfio_pci) or to vfio-pci: "
        f"echo vfio-pci > {base}/driver_override; "
        + (f"echo {dev.name} > {base}/driver/unbind; " if dev.driver else "")
        + f"echo {dev.name} > /sys/bus/pci/drivers_probe"
    )


def _check_bound(dev: SysfsDevice, ident: str) -> None:
    if dev.bus not in ("pci", "mdev"):
        raise NotVfioDevice(
            ident,
            f"{dev.path} is a {dev.bus} device; vfmig opens PCI functions and mdevs",
        )
    if dev.is_vfio:
        return
    if dev.bus == "mdev":
        raise NotVfioDevice(
            dev.name,
            "the mdev is not bound to a driver",
            hint="load its parent's mdev driver (for example modprobe mtty)",
        )
    raise NotVfioDevice(
        dev.name,
        f"not bound to a vfio driver (driver: {dev.driver or 'none'})",
        hint=_bind_hint(dev),
    )


class _Opener:
    """One attempt to open one device; knows what to clean up if a step fails."""

    def __init__(self, dev: SysfsDevice, kernel: Kernel, host: HostPaths) -> None:
        self.dev = dev
        self.kernel = kernel
        self.host = host
        self.name = dev.name

    # errno -> error, for every node this opener opens
    def node_error(self, exc: OSError, node: str, what: str) -> OpenError:
        code = exc.errno
        if code in (_errno.EACCES, _errno.EPERM):
            return AccessDenied(
                self.name,
                f"no permission to open {node} ({what})",
                errno=code,
                hint=f"run as root, or give this user read-write access to {node}",
            )
        if code == _errno.EBUSY:
            return self.busy(f"{node} is open in another process", code)
        if code == _errno.ENOENT:
            return VfioUnavailable(
                self.name,
                f"{node} does not exist ({what})",
                errno=code,
                hint=_missing_node_hint(node),
            )
        return OpenError(self.name, f"cannot open {node} ({what})", errno=code)

    def busy(self, message: str, code: int | None = _errno.EBUSY) -> DeviceBusy:
        holders = sysfs.scan_holders(self.host, self.kernel).held(self.dev)
        who = f": held by {', '.join(str(h) for h in holders.holders)}" if holders.holders else ""
        return DeviceBusy(
            self.name,
            f"device busy: {message}{who}",
            errno=code,
            hint="another process (for example QEMU) holds the device or its group; stop it "
            "or migrate from that process",
        )

    def not_viable(self, code: int | None = None) -> GroupNotViable:
        group = self.dev.iommu_group or "?"
        members = sysfs.group_members(group, self.host, self.kernel)
        others = [m for m in members if m.name != self.name]
        blocking = [m for m in others if not m.keeps_group_viable]
        listed = ", ".join(str(m) for m in others) or "none readable"
        return GroupNotViable(
            self.name,
            f"IOMMU group {group} is not viable; its other devices: {listed}",
            errno=code,
            hint="bind every device of the group to vfio-pci or unbind it"
            + (f" ({', '.join(m.name for m in blocking)})" if blocking else ""),
        )

    def token_error(self, code: int, token: uuid.UUID | None) -> VfTokenError:
        pf = f"PF {self.dev.physfn}" if self.dev.physfn else "the PF"
        if code == _errno.EACCES:
            if token is None:
                return VfTokenError(
                    self.name,
                    f"a VF token is required: {pf} is bound to vfio-pci",
                    errno=code,
                    hint="add vf-token=<uuid> to the spec: the token the PF's user set",
                )
            return VfTokenError(
                self.name,
                f"the VF token does not match the one {pf} set",
                errno=code,
                hint="use the token the PF's user set (VFIO_DEVICE_FEATURE_PCI_VF_TOKEN)",
            )
        return VfTokenError(
            self.name,
            "the kernel refused the VF token: this device uses none",
            errno=code,
            hint="drop vf-token from the spec (only VFs whose PF is bound to vfio-pci use one)",
        )

    def open_node(self, node: str, what: str) -> int:
        try:
            return self.kernel.open(self.host.dev_node(node), _OPEN_FLAGS)
        except OSError as exc:
            raise self.node_error(exc, node, what) from exc

    # --- the two paths ---

    def cdev_available(self) -> bool:
        node = self.dev.cdev_node
        return (
            node is not None
            and self.kernel.exists(self.host.dev_node(node))
            and self.kernel.exists(self.host.dev_node(IOMMUFD_NODE))
        )

    def open_cdev(self, token: uuid.UUID | None) -> tuple[int, _Access]:
        node = self.dev.cdev_node
        assert node is not None  # cdev_available() was checked
        device_fd = self.open_node(node, "the device's VFIO cdev")
        iommufd = -1
        try:
            iommufd = self.open_node(IOMMUFD_NODE, "iommufd")
            if token is None:
                bind = uapi.DeviceBindIommufd.new(iommufd=iommufd)
            else:
                bind = uapi.DeviceBindIommufd.with_token(iommufd, token)
            try:
                self.kernel.ioctl(device_fd, uapi.DeviceIoctl.BIND_IOMMUFD, bind)
            except OSError as exc:
                raise self.bind_error(exc, token) from exc
            alloc = uapi.IommuIoasAlloc.new()
            try:
                self.kernel.ioctl(iommufd, uapi.IommufdIoctl.IOAS_ALLOC, alloc)
            except OSError as exc:
                raise OpenError(self.name, "IOMMU_IOAS_ALLOC failed", errno=exc.errno) from exc
            attach = uapi.DeviceAttachIommufdPt.new(pt_id=alloc.out_ioas_id)
            try:
                self.kernel.ioctl(device_fd, uapi.DeviceIoctl.ATTACH_IOMMUFD_PT, attach)
            except OSError as exc:
                raise OpenError(
                    self.name, f"attaching to IOAS {alloc.out_ioas_id} failed", errno=exc.errno
                ) from exc
        except BaseException:
            _close_quietly(self.kernel, device_fd)
            if iommufd >= 0:
                _close_quietly(self.kernel, iommufd)
            raise
        return device_fd, _CdevAccess(self.kernel, iommufd, alloc.out_ioas_id, node)

    def bind_error(self, exc: OSError, token: uuid.UUID | None) -> OpenError:
        code = exc.errno
        if code == _errno.EACCES or (code == _errno.EINVAL and token is not None):
            return self.token_error(code, token)
        if code == _errno.EBUSY:
            return self.busy("VFIO_DEVICE_BIND_IOMMUFD: the device is open elsewhere or resetting")
        if code == _errno.EPERM:
            members = sysfs.group_members(self.dev.iommu_group or "", self.host, self.kernel)
            if any(not m.keeps_group_viable for m in members if m.name != self.name):
                return self.not_viable(code)
            return AccessDenied(
                self.name,
                "VFIO_DEVICE_BIND_IOMMUFD refused",
                errno=code,
                hint="run as root (a no-IOMMU device needs CAP_SYS_RAWIO)",
            )
        return OpenError(self.name, "VFIO_DEVICE_BIND_IOMMUFD failed", errno=code)

    def open_group(self, token: uuid.UUID | None) -> tuple[int, _Access]:
        group_nr = self.dev.iommu_group
        if group_nr is None:
            raise VfioUnavailable(
                self.name,
                "the device has no IOMMU group",
                hint="enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command "
                "line) and load vfio_iommu_type1",
            )
        group = self.acquire_group(f"/dev/vfio/{group_nr}")
        name = self.name if token is None else f"{self.name} vf_token={token}"
        try:
            device_fd = self.kernel.ioctl(
                group.group_fd,
                uapi.GroupIoctl.GET_DEVICE_FD,
                ctypes.create_string_buffer(name.encode()),
            )
        except OSError as exc:
            _release_group(group)
            raise self.get_device_fd_error(exc, token) from exc
        return device_fd, _GroupAccess(group)

    def get_device_fd_error(self, exc: OSError, token: uuid.UUID | None) -> OpenError:
        code = exc.errno
        if code == _errno.EACCES or (code == _errno.EINVAL and token is not None):
            return self.token_error(code, token)
        if code == _errno.EBUSY:
            return self.busy("VFIO_GROUP_GET_DEVICE_FD: the device is open elsewhere")
        if code == _errno.ENODEV and token is not None and self.dev.bus == "mdev":
            return self.token_error(_errno.EINVAL, token)
        return OpenError(self.name, "VFIO_GROUP_GET_DEVICE_FD failed", errno=code)

    def acquire_group(self, node: str) -> _SharedGroup:
        key = (id(self.kernel), node)
        with _groups_lock:
            shared = _groups.get(key)
            if shared is not None:
                shared.users += 1  # the container is set already: no second SET_IOMMU
                return shared
            shared = self.setup_group(node)
            _groups[key] = shared
            return shared

    def setup_group(self, node: str) -> _SharedGroup:
        container = self.open_node(CONTAINER_NODE, "the VFIO container")
        group_fd = -1
        try:
            version = self.container_ioctl(container, uapi.ContainerIoctl.GET_API_VERSION)
            if version != uapi.VFIO_API_VERSION:
                raise VfioUnavailable(
                    self.name,
                    f"VFIO API version {version}, vfmig speaks {uapi.VFIO_API_VERSION}",
                )
            if not self.container_ioctl(
                container, uapi.ContainerIoctl.CHECK_EXTENSION, uapi.VFIO_TYPE1v2_IOMMU
            ):
                raise VfioUnavailable(
                    self.name,
                    "the VFIO container has no TYPE1v2 IOMMU",
                    hint="modprobe vfio_iommu_type1 (and enable the IOMMU)",
                )
            group_fd = self.open_node(node, "the device's IOMMU group")
            status = uapi.GroupStatus.new()
            self.group_ioctl(group_fd, uapi.GroupIoctl.GET_STATUS, status)
            if not status.flags & uapi.GROUP_FLAGS_VIABLE:
                raise self.not_viable()
            self.group_ioctl(group_fd, uapi.GroupIoctl.SET_CONTAINER, ctypes.c_int32(container))
            self.container_ioctl(container, uapi.ContainerIoctl.SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        except BaseException:
            if group_fd >= 0:
                _close_quietly(self.kernel, group_fd)
            _close_quietly(self.kernel, container)
            raise
        return _SharedGroup(self.kernel, node, group_fd, container)

    def container_ioctl(self, fd: int, request: uapi.ContainerIoctl, arg: int = 0) -> int:
        try:
            return self.kernel.ioctl(fd, request, arg)
        except OSError as exc:
            raise OpenError(
                self.name, f"{uapi.c_name(request)} on {CONTAINER_NODE} failed", errno=exc.errno
            ) from exc

    def group_ioctl(self, fd: int, request: uapi.GroupIoctl, arg: _CData) -> None:
        try:
            self.kernel.ioctl(fd, request, arg)
        except OSError as exc:
            if exc.errno == _errno.EBUSY:
                raise self.busy(f"{uapi.c_name(request)} refused", exc.errno) from exc
            raise OpenError(self.name, f"{uapi.c_name(request)} failed", errno=exc.errno) from exc

    # --- all together ---

    def open(
        self, *, token: uuid.UUID | None, iommu: Literal["cdev", "group"] | None
    ) -> VfioDevice:
        if iommu == "cdev" and not self.cdev_available():
            raise VfioUnavailable(
                self.name,
                "iommu=cdev, but the device has no VFIO cdev or /dev/iommu is missing",
                hint="needs a kernel with VFIO_DEVICE_CDEV and IOMMUFD; drop iommu=cdev",
            )
        use_cdev = iommu != "group" and self.cdev_available()
        device_fd, access = self.open_cdev(token) if use_cdev else self.open_group(token)
        device = VfioDevice(
            kernel=self.kernel,
            device_fd=device_fd,
            sysfs_device=self.dev,
            access=access,
            host=self.host,
        )
        try:
            device.flags = device.read_migration_flags()
        except OSError as exc:
            device.close()
            if exc.errno == _errno.ENOTTY:
                raise MigrationNotSupported(
                    self.name,
                    f"migration not supported by driver {self.dev.driver or '?'}",
                    errno=exc.errno,
                    hint="the device is probably bound to plain vfio-pci instead of its "
                    "variant driver (for example mlx5_vfio_pci); rebind it to that driver",
                ) from exc
            raise OpenError(
                self.name, "VFIO_DEVICE_FEATURE MIGRATION GET failed", errno=exc.errno
            ) from exc
        return device


def _missing_node_hint(node: str) -> str:
    if node == CONTAINER_NODE:
        return "modprobe vfio vfio_iommu_type1 (the kernel needs VFIO_CONTAINER)"
    if node == IOMMUFD_NODE:
        return "modprobe iommufd, or open through the group (iommu=group)"
    return "the device's VFIO driver is not bound or udev has not created the node yet"


def open_sysfs_device(
    dev: SysfsDevice,
    *,
    kernel: Kernel | None = None,
    host: HostPaths | None = None,
    vf_token: uuid.UUID | None = None,
    iommu: Literal["cdev", "group"] | None = None,
) -> VfioDevice:
    """Open a device already found in sysfs (``vfmig list --probe`` uses this).

    ``iommu`` forces the cdev or the group path; by default the cdev is preferred.
    """
    _check_bound(dev, dev.name)
    opener = _Opener(dev, kernel or REAL_KERNEL, host or HostPaths())
    return opener.open(token=vf_token, iommu=iommu)


def open_vfio_device(
    spec: DeviceSpec, *, kernel: Kernel | None = None, host: HostPaths | None = None
) -> VfioDevice:
    """Open the device a ``vfio:ID[,vf-token=UUID][,iommu=cdev|group]`` spec names."""
    options = vfio_options(spec)
    kernel = kernel or REAL_KERNEL
    host = host or HostPaths()
    ident = spec.name
    dev = sysfs.find(ident, host, kernel)
    if dev is None:
        raise NoSuchDevice(
            ident,
            f"no such device (looked in {_looked_in(ident, host)})",
            hint="give a PCI address (0000:3b:00.1), an mdev UUID or a sysfs device path; "
            "'vfmig list' shows this host's VFIO devices",
        )
    return open_sysfs_device(
        dev,
        kernel=kernel,
        host=host,
        vf_token=options.vf_token,
        iommu=options.iommu,
    )
