"""The kernel backend against a fake Kernel: both open paths, vf tokens, errors, data fds.

The fake models /dev/vfio/vfio, groups, device fds with the FEATURE ioctls, data fds, cdevs
and /dev/iommu. It decodes the ctypes buffers it is handed exactly as the kernel would read
them, and follows the kernel's rules (feature flag checks, the FSM path, data fd lifetime);
sysfs is a real tree under tmp_path read through RealKernel's filesystem queries.
"""

from __future__ import annotations

import ctypes
import errno
import os
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.core import fsm
from vfmig.core.errors import DataError, RequestRefused, StateChangeError
from vfmig.core.fsm import ArcEffect, DeviceState, MigrationFlags
from vfmig.core.spec import parse_spec
from vfmig.device import _uapi as uapi
from vfmig.device import vfio
from vfmig.device.backend import Direction
from vfmig.device.kernel import RealKernel
from vfmig.device.sysfs import HostPaths, SysfsDevice, find

if TYPE_CHECKING:
    from pathlib import Path

S = DeviceState
ALL_FLAGS = MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY
GET, SET = uapi.FEATURE_GET, uapi.FEATURE_SET
F = uapi.FeatureId
MIGRATION_FEATURES = {
    F.MIGRATION: GET,
    F.MIG_DEVICE_STATE: GET | SET,
    F.MIG_DATA_SIZE: GET,
    F.DMA_LOGGING_START: SET,
    F.DMA_LOGGING_STOP: SET,
    F.DMA_LOGGING_REPORT: GET,
}
PCI_CORE_FEATURES = {
    F.PCI_VF_TOKEN: SET,
    F.LOW_POWER_ENTRY: SET,
    F.LOW_POWER_ENTRY_WITH_WAKEUP: SET,
    F.LOW_POWER_EXIT: SET,
}
TOKEN = uuid.UUID("bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3")
OTHER_TOKEN = uuid.UUID("00000000-0000-4000-8000-000000000001")
MDEV = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"


def oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


# --- the fake kernel ---------------------------------------------------------------------


@dataclass(eq=False)
class FakeDevice:
    name: str
    flags: MigrationFlags = ALL_FLAGS
    features: dict[uapi.FeatureId, int] = field(
        default_factory=lambda: {**MIGRATION_FEATURES, **PCI_CORE_FEATURES}
    )
    state: DeviceState = S.RUNNING
    #: A VF whose PF is bound to vfio-pci: this token is required.
    token: uuid.UUID | None = None
    #: vfio-pci matches names with its own match op (vf_token=...); mdevs compare names only.
    pci: bool = True
    precopy_data: bytes = b"I" * 24
    stop_copy_data: bytes = b"S" * 72
    dirty_bytes: int = 0
    zero_in_precopy: bool = False  #: mtty: 0 instead of ENOMSG when precopy has nothing
    eagain: bool = False  #: the next read gives EAGAIN (O_NONBLOCK, nothing yet)
    busy: bool = False
    reinit_pending: bool = False
    v2_enabled: bool = False
    v2_sets: int = 0
    resets: int = 0
    #: The next SET fails with this errno, leaving the device in that state.
    fail_next_set: tuple[int, DeviceState] | None = None
    session: FakeDataFd | None = None
    written: bytearray = field(default_factory=bytearray)


@dataclass(eq=False)
class FakeDataFd:
    device: FakeDevice
    direction: Direction
    pos: int = 0
    open_in_kernel: bool = True


@dataclass(eq=False)
class FakeContainer:
    groups: list[FakeGroup] = field(default_factory=list)
    iommu: int | None = None


@dataclass(eq=False)
class FakeGroup:
    number: str
    devices: list[str]
    viable: bool = True
    container: FakeContainer | None = None
    open: bool = False


@dataclass(eq=False)
class FakeDeviceFd:
    device: FakeDevice
    cdev: bool
    bound: bool = False
    ioas: int | None = None


@dataclass(eq=False)
class FakeIommufd:
    ioas: set[int] = field(default_factory=set)
    next_id: int = 1


class FakeKernel(RealKernel):
    """Models the VFIO fd world; filesystem queries go to the real (tmp_path) tree."""

    def __init__(self, host: HostPaths) -> None:
        self.host = host
        self.devices: dict[str, FakeDevice] = {}
        self.groups: dict[str, FakeGroup] = {}
        self.cdevs: dict[str, str] = {}  # vfioN -> device name
        self.iommufd = True
        self.container_node = True
        self.api_version = 0
        self.type1v2 = True
        self.cdev_token = True  #: BIND_IOMMUFD knows BIND_FLAG_TOKEN (2025+)
        self.node_errors: dict[str, int] = {}
        self.fds: dict[int, object] = {}
        self.next_fd = 100
        self.log: list[str] = []
        self.device_names: list[str] = []  #: every GET_DEVICE_FD argument

    # -- set-up --
    def add_device(self, dev: FakeDevice, group: str, cdev: str | None = None) -> FakeDevice:
        self.devices[dev.name] = dev
        self.groups.setdefault(group, FakeGroup(group, [])).devices.append(dev.name)
        if cdev is not None:
            self.cdevs[cdev] = dev.name
        return dev

    def nodes(self) -> set[str]:
        nodes = {f"/dev/vfio/{g}" for g in self.groups}
        nodes |= {f"/dev/vfio/devices/{c}" for c in self.cdevs}
        if self.container_node:
            nodes.add("/dev/vfio/vfio")
        if self.iommufd:
            nodes.add("/dev/iommu")
        return nodes

    def _new_fd(self, obj: object) -> int:
        fd = self.next_fd
        self.next_fd += 1
        self.fds[fd] = obj
        return fd

    def _get(self, fd: int) -> object:
        if fd not in self.fds:
            raise oserror(errno.EBADF)
        return self.fds[fd]

    def kind(self, fd: int) -> str:
        return type(self.fds[fd]).__name__.removeprefix("Fake").lower()

    # -- filesystem queries: /dev is modelled, the rest is the tmp tree --
    def exists(self, path: str | os.PathLike[str]) -> bool:
        text = os.fspath(path)
        if text.startswith(str(self.host.dev) + "/"):
            return self.host.canonical_dev(text) in self.nodes()
        return super().exists(path)

    # -- fd calls --
    def open(self, path: str | os.PathLike[str], flags: int) -> int:
        node = self.host.canonical_dev(os.fspath(path))
        self.log.append(f"open {node}")
        assert flags & os.O_CLOEXEC
        if node in self.node_errors:
            raise oserror(self.node_errors[node])
        if node not in self.nodes():
            raise oserror(errno.ENOENT)
        if node == "/dev/vfio/vfio":
            return self._new_fd(FakeContainer())
        if node == "/dev/iommu":
            return self._new_fd(FakeIommufd())
        if node.startswith("/dev/vfio/devices/"):
            dev = self.devices[self.cdevs[node.rsplit("/", 1)[1]]]
            return self._new_fd(FakeDeviceFd(dev, cdev=True))
        group = self.groups[node.rsplit("/", 1)[1]]
        if group.open:
            raise oserror(errno.EBUSY)
        group.open = True
        return self._new_fd(group)

    def close(self, fd: int) -> None:
        obj = self._get(fd)
        self.log.append(f"close {self.kind(fd)}")
        del self.fds[fd]
        if isinstance(obj, FakeGroup):
            obj.open = False
            if obj.container is not None:
                obj.container.groups.remove(obj)
                obj.container = None
        elif isinstance(obj, FakeDataFd) and obj.device.session is obj:
            obj.device.session = None

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        obj = self._get(fd)
        handlers: dict[type, tuple[type[Any], Any]] = {
            FakeContainer: (uapi.ContainerIoctl, self._container_ioctl),
            FakeGroup: (uapi.GroupIoctl, self._group_ioctl),
            FakeDeviceFd: (uapi.DeviceIoctl, self._device_ioctl),
            FakeDataFd: (uapi.DataFdIoctl, self._data_ioctl),
            FakeIommufd: (uapi.IommufdIoctl, self._iommufd_ioctl),
        }
        family, handler = handlers[type(obj)]
        self.log.append(f"ioctl {self.kind(fd)} {uapi.ioctl_name(family, request)}")
        try:
            family(request)
        except ValueError:
            raise oserror(errno.ENOTTY) from None
        result: int = handler(obj, family(request), arg)
        return result

    def _container_ioctl(self, c: FakeContainer, request: uapi.ContainerIoctl, arg: int) -> int:
        if request is uapi.ContainerIoctl.GET_API_VERSION:
            return self.api_version
        if request is uapi.ContainerIoctl.CHECK_EXTENSION:
            return int(arg == uapi.VFIO_TYPE1v2_IOMMU and self.type1v2)
        if not c.groups or c.iommu is not None:  # SET_IOMMU: needs a group, only once
            raise oserror(errno.EINVAL)
        c.iommu = arg
        return 0

    def _group_ioctl(self, g: FakeGroup, request: uapi.GroupIoctl, arg: Any) -> int:
        if request is uapi.GroupIoctl.GET_STATUS:
            status = uapi.GroupStatus.from_buffer(arg)
            assert status.argsz == ctypes.sizeof(uapi.GroupStatus)
            status.flags = (uapi.GROUP_FLAGS_VIABLE if g.viable else 0) | (
                uapi.GROUP_FLAGS_CONTAINER_SET if g.container else 0
            )
            return 0
        if request is uapi.GroupIoctl.SET_CONTAINER:
            container = self._get(ctypes.c_int32.from_buffer(arg).value)
            if not g.viable or g.container is not None or not isinstance(container, FakeContainer):
                raise oserror(errno.EINVAL if g.container is None else errno.EBUSY)
            g.container = container
            container.groups.append(g)
            return 0
        assert request is uapi.GroupIoctl.GET_DEVICE_FD
        if g.container is None or g.container.iommu is None:
            raise oserror(errno.EINVAL)
        text = ctypes.string_at(ctypes.addressof(arg)).decode()
        self.device_names.append(text)
        name, _, rest = text.partition(" ")
        given = uuid.UUID(rest.removeprefix("vf_token=")) if rest else None
        if name not in g.devices or (rest and not self.devices[name].pci):
            raise oserror(errno.ENODEV)  # mdevs compare the whole string to their name
        dev = self.devices[name]
        self._check_token(dev, given)
        if dev.busy:
            raise oserror(errno.EBUSY)
        return self._new_fd(FakeDeviceFd(dev, cdev=False, bound=True))

    @staticmethod
    def _check_token(dev: FakeDevice, given: uuid.UUID | None) -> None:
        if dev.token is None:
            if given is not None:
                raise oserror(errno.EINVAL)
        elif given != dev.token:
            raise oserror(errno.EACCES)

    def _iommufd_ioctl(self, i: FakeIommufd, request: uapi.IommufdIoctl, arg: Any) -> int:
        if request is uapi.IommufdIoctl.IOAS_ALLOC:
            alloc = uapi.IommuIoasAlloc.from_buffer(arg)
            assert alloc.size == ctypes.sizeof(uapi.IommuIoasAlloc)
            alloc.out_ioas_id = i.next_id
            i.ioas.add(i.next_id)
            i.next_id += 1
            return 0
        destroy = uapi.IommuDestroy.from_buffer(arg)
        if destroy.id not in i.ioas:
            raise oserror(errno.ENOENT)
        i.ioas.remove(destroy.id)
        return 0

    def _device_ioctl(self, d: FakeDeviceFd, request: uapi.DeviceIoctl, arg: Any) -> int:
        dev = d.device
        if request is uapi.DeviceIoctl.BIND_IOMMUFD:
            if not d.cdev or d.bound:
                raise oserror(errno.EINVAL)
            bind = uapi.DeviceBindIommufd.from_buffer(arg)
            valid = uapi.BIND_FLAG_TOKEN if self.cdev_token else 0
            if bind.argsz < 16 or bind.flags & ~valid:
                raise oserror(errno.EINVAL)
            if not isinstance(self.fds.get(bind.iommufd), FakeIommufd):
                raise oserror(errno.EBADF)
            given = None
            if bind.flags & uapi.BIND_FLAG_TOKEN:
                assert bind.argsz == 24
                given = uuid.UUID(bytes=ctypes.string_at(bind.token_uuid_ptr, 16))
            self._check_token(dev, given)
            if dev.busy:
                raise oserror(errno.EBUSY)
            d.bound = True
            bind.out_devid = 1
            return 0
        if not d.bound:
            raise oserror(errno.EINVAL)  # a cdev fd is blocked until BIND_IOMMUFD
        if request is uapi.DeviceIoctl.ATTACH_IOMMUFD_PT:
            attach = uapi.DeviceAttachIommufdPt.from_buffer(arg)
            iommufds = [o for o in self.fds.values() if isinstance(o, FakeIommufd)]
            if not any(attach.pt_id in i.ioas for i in iommufds):
                raise oserror(errno.ENOENT)
            d.ioas = attach.pt_id
            return 0
        if request is uapi.DeviceIoctl.RESET:
            dev.resets += 1
            dev.state = S.RUNNING
            self._end_session(dev)
            return 0
        assert request is uapi.DeviceIoctl.FEATURE
        return self._feature(dev, arg)

    def _feature(self, dev: FakeDevice, arg: Any) -> int:
        hdr = uapi.DeviceFeature.from_buffer(arg)
        flags = hdr.flags
        if hdr.argsz < 8 or flags & ~(uapi.FEATURE_MASK | GET | SET | uapi.FEATURE_PROBE):
            raise oserror(errno.EINVAL)
        if not flags & uapi.FEATURE_PROBE and flags & GET and flags & SET:
            raise oserror(errno.EINVAL)
        feature = flags & uapi.FEATURE_MASK
        ops = dev.features.get(uapi.FeatureId(feature)) if feature in set(F) else None
        if ops is None:
            raise oserror(errno.ENOTTY)
        if flags & (GET | SET) & ~ops:
            raise oserror(errno.EINVAL)
        if flags & uapi.FEATURE_PROBE:
            return 0
        if feature == F.MIGRATION:
            uapi.FeatureMigration.from_buffer(arg, 8).flags = int(dev.flags)
        elif feature == F.MIG_DATA_SIZE:
            size = len(dev.precopy_data) + len(dev.stop_copy_data)
            uapi.FeatureMigDataSize.from_buffer(arg, 8).stop_copy_length = size
        elif feature == F.MIG_PRECOPY_INFOv2:
            dev.v2_enabled = True
            dev.v2_sets += 1
        elif feature == F.MIG_DEVICE_STATE:
            payload = uapi.FeatureMigState.from_buffer(arg, 8)
            if flags & GET:
                payload.device_state = dev.state
            else:
                payload.data_fd = self._set_state(dev, payload.device_state)
        return 0

    def _set_state(self, dev: FakeDevice, target: int) -> int:
        kernel_path = fsm.path(dev.state, target, dev.flags)
        if kernel_path.errno is not None:
            raise oserror(kernel_path.errno)
        if dev.fail_next_set is not None:
            code, after = dev.fail_next_set
            dev.fail_next_set = None
            if dev.session is not None and not fsm.session_survives(dev.state, after):
                self._end_session(dev)
            dev.state = after
            raise oserror(code)
        new_fd = -1
        for arc in kernel_path.arcs:
            if arc.effect is ArcEffect.ENDS:
                self._end_session(dev)
            elif arc.effect in (ArcEffect.OPENS_SAVING, ArcEffect.OPENS_RESUMING):
                direction = (
                    Direction.SAVING if arc.effect is ArcEffect.OPENS_SAVING else Direction.RESUMING
                )
                dev.session = FakeDataFd(dev, direction)
                new_fd = self._new_fd(dev.session)
            dev.state = arc.dst
        return new_fd

    @staticmethod
    def _end_session(dev: FakeDevice) -> None:
        if dev.session is not None:
            dev.session.open_in_kernel = False
            dev.session = None

    def _data_ioctl(self, f: FakeDataFd, request: uapi.DataFdIoctl, arg: Any) -> int:
        assert request is uapi.DataFdIoctl.MIG_GET_PRECOPY_INFO
        if f.direction is Direction.RESUMING:
            raise oserror(errno.ENOTTY)
        info = uapi.PrecopyInfo.from_buffer(arg)
        if info.argsz < 24 or f.device.state not in fsm.PRECOPY_STATES:
            raise oserror(errno.EINVAL)
        dev = f.device
        info.initial_bytes = max(0, len(dev.precopy_data) - f.pos)
        info.dirty_bytes = dev.dirty_bytes
        if dev.v2_enabled:
            info.flags = uapi.PRECOPY_INFO_REINIT if dev.reinit_pending else 0
            dev.reinit_pending = False
        return 0  # without the v2 opt-in flags are echoed untouched (old drivers)

    def readv(self, fd: int, buffers: Any) -> int:
        f = self._get(fd)
        assert isinstance(f, FakeDataFd)
        if not f.open_in_kernel:
            raise oserror(errno.ENODEV)
        if f.direction is Direction.RESUMING:
            raise oserror(errno.EBADF)
        dev = f.device
        if dev.eagain:
            dev.eagain = False
            raise oserror(errno.EAGAIN)
        stream = dev.precopy_data
        if dev.state is S.STOP_COPY:
            stream += dev.stop_copy_data
        chunk = stream[f.pos : f.pos + len(buffers[0])]
        if not chunk and dev.state in fsm.PRECOPY_STATES and not dev.zero_in_precopy:
            raise oserror(errno.ENOMSG)
        buffers[0][: len(chunk)] = chunk
        f.pos += len(chunk)
        return len(chunk)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        f = self._get(fd)
        assert isinstance(f, FakeDataFd)
        if not f.open_in_kernel:
            raise oserror(errno.ENODEV)
        if f.direction is Direction.SAVING:
            raise oserror(errno.EBADF)
        if len(f.device.written) + len(data) > 96:
            raise oserror(errno.ENOMEM)
        f.device.written += data
        return len(data)


# --- the sysfs side ----------------------------------------------------------------------


class Host:
    """A tmp_path host: sysfs entries for devices plus the fake kernel behind /dev."""

    def __init__(self, root: Path) -> None:
        self.paths = HostPaths.under(root)
        self.kernel = FakeKernel(self.paths)

    def _link(self, link: Path, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link)

    def pci(
        self,
        address: str,
        *,
        driver: str = "vfio-pci",
        group: str,
        cdev: str | None = None,
        physfn: str | None = None,
        fake: FakeDevice | None = None,
    ) -> FakeDevice:
        sys = self.paths.sys
        real = sys / "devices" / "pci0000:00" / address
        real.mkdir(parents=True)
        self._link(real / "subsystem", sys / "bus" / "pci")
        self._link(real / "driver", sys / "bus" / "pci" / "drivers" / driver)
        self._link(real / "iommu_group", sys / "kernel" / "iommu_groups" / group)
        (sys / "kernel" / "iommu_groups" / group / "devices").mkdir(parents=True, exist_ok=True)
        os.symlink(real, sys / "kernel" / "iommu_groups" / group / "devices" / address)
        if cdev is not None:
            (real / "vfio-dev" / cdev).mkdir(parents=True)
        if physfn is not None:
            os.symlink(real.parent / physfn, real / "physfn")
        (sys / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)
        os.symlink(real, sys / "bus" / "pci" / "devices" / address)
        return self.kernel.add_device(fake or FakeDevice(address), group, cdev)

    def mdev(self, name: str, *, group: str) -> FakeDevice:
        sys = self.paths.sys
        real = sys / "devices" / "virtual" / "mtty" / "mtty" / name
        real.mkdir(parents=True)
        self._link(real / "subsystem", sys / "bus" / "mdev")
        self._link(real / "driver", sys / "bus" / "mdev" / "drivers" / "mtty")
        self._link(real / "iommu_group", sys / "kernel" / "iommu_groups" / group)
        (sys / "bus" / "mdev" / "devices").mkdir(parents=True, exist_ok=True)
        os.symlink(real, sys / "bus" / "mdev" / "devices" / name)
        features = dict(MIGRATION_FEATURES.items())
        return self.kernel.add_device(
            FakeDevice(name, features=features, pci=False, zero_in_precopy=True), group
        )

    def sysfs(self, name: str) -> SysfsDevice:
        dev = find(name, self.paths, self.kernel)
        assert dev is not None
        return dev

    def open(self, name: str, **options: Any) -> vfio.VfioDevice:
        return vfio.open_sysfs_device(
            self.sysfs(name), kernel=self.kernel, host=self.paths, **options
        )


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def ioctls(kernel: FakeKernel) -> list[str]:
    return [
        entry for entry in kernel.log if not entry.startswith("ioctl device VFIO_DEVICE_FEATURE")
    ]


# --- opening: the group path -------------------------------------------------------------


def test_group_path_sequence_and_close_order(host: Host) -> None:
    host.pci("0000:3b:00.2", group="13")
    device = host.open("0000:3b:00.2")
    assert device.flags == ALL_FLAGS
    assert device.kind == "vfio"
    assert device.name == "0000:3b:00.2"
    assert device.access == "group /dev/vfio/13 (container /dev/vfio/vfio, TYPE1v2)"
    assert host.kernel.log == [
        "open /dev/vfio/vfio",
        "ioctl container VFIO_GET_API_VERSION",
        "ioctl container VFIO_CHECK_EXTENSION",
        "open /dev/vfio/13",
        "ioctl group VFIO_GROUP_GET_STATUS",
        "ioctl group VFIO_GROUP_SET_CONTAINER",
        "ioctl container VFIO_SET_IOMMU",
        "ioctl group VFIO_GROUP_GET_DEVICE_FD",
        "ioctl devicefd VFIO_DEVICE_FEATURE",
    ]
    host.kernel.log.clear()
    device.close()
    device.close()  # idempotent
    assert host.kernel.log == ["close devicefd", "close group", "close container"]
    assert host.kernel.fds == {}


def test_two_devices_of_one_group_share_it_and_set_the_iommu_once(host: Host) -> None:
    host.pci("0000:3b:00.0", group="7")
    host.pci("0000:3b:00.1", group="7")
    first = host.open("0000:3b:00.0")
    host.kernel.log.clear()
    second = host.open("0000:3b:00.1")
    assert host.kernel.log == [
        "ioctl group VFIO_GROUP_GET_DEVICE_FD",
        "ioctl devicefd VFIO_DEVICE_FEATURE",
    ]
    first.close()
    assert host.kernel.groups["7"].open
    assert second.get_state() is S.RUNNING
    second.close()
    assert not host.kernel.groups["7"].open
    assert host.kernel.fds == {}


def test_group_path_with_vf_token(host: Host) -> None:
    host.pci("0000:3b:00.0", group="1", driver="vfio-pci")
    host.pci(
        "0000:3b:00.1",
        group="2",
        physfn="0000:3b:00.0",
        fake=FakeDevice("0000:3b:00.1", token=TOKEN),
    )
    with pytest.raises(vfio.VfTokenError) as missing:
        host.open("0000:3b:00.1")
    assert missing.value.errno == errno.EACCES
    assert "VF token is required: PF 0000:3b:00.0 is bound to vfio-pci" in str(missing.value)
    assert missing.value.hint is not None
    assert "vf-token=" in missing.value.hint
    with pytest.raises(vfio.VfTokenError, match="does not match"):
        host.open("0000:3b:00.1", vf_token=OTHER_TOKEN)
    assert host.kernel.fds == {}  # every failed attempt cleaned up
    device = host.open("0000:3b:00.1", vf_token=TOKEN)
    assert device.flags == ALL_FLAGS
    device.close()


def test_token_given_where_none_is_used(host: Host) -> None:
    host.pci("0000:3b:00.2", group="13")
    host.mdev(MDEV, group="20")
    with pytest.raises(vfio.VfTokenError, match="uses none") as pci:
        host.open("0000:3b:00.2", vf_token=TOKEN)
    assert pci.value.errno == errno.EINVAL
    with pytest.raises(vfio.VfTokenError, match="uses none"):
        host.open(MDEV, vf_token=TOKEN)
    assert host.kernel.fds == {}


def test_mdev_through_its_group(host: Host) -> None:
    host.mdev(MDEV, group="20")
    with host.open(MDEV) as device:
        assert device.name == MDEV
        assert device.access.startswith("group /dev/vfio/20")


# --- opening: the cdev path --------------------------------------------------------------


def test_cdev_path_sequence_and_close_order(host: Host) -> None:
    host.pci("0000:3b:00.1", driver="mlx5_vfio_pci", group="12", cdev="vfio0")
    device = host.open("0000:3b:00.1")
    assert device.access == "cdev /dev/vfio/devices/vfio0 (iommufd /dev/iommu, IOAS 1)"
    assert host.kernel.log == [
        "open /dev/vfio/devices/vfio0",
        "open /dev/iommu",
        "ioctl devicefd VFIO_DEVICE_BIND_IOMMUFD",
        "ioctl iommufd IOMMU_IOAS_ALLOC",
        "ioctl devicefd VFIO_DEVICE_ATTACH_IOMMUFD_PT",
        "ioctl devicefd VFIO_DEVICE_FEATURE",
    ]
    fd_objects = list(host.kernel.fds.values())
    devfd = next(o for o in fd_objects if isinstance(o, FakeDeviceFd))
    assert devfd.bound
    assert devfd.ioas == 1
    host.kernel.log.clear()
    device.close()
    assert host.kernel.log == ["close devicefd", "ioctl iommufd IOMMU_DESTROY", "close iommufd"]
    assert host.kernel.fds == {}


def test_cdev_needs_both_nodes_else_group(host: Host) -> None:
    host.pci("0000:3b:00.1", group="12", cdev="vfio0")
    host.kernel.iommufd = False
    with host.open("0000:3b:00.1") as device:
        assert device.access.startswith("group /dev/vfio/12")
    with pytest.raises(vfio.VfioUnavailable, match="iommu=cdev"):
        host.open("0000:3b:00.1", iommu="cdev")


def test_iommu_option_forces_the_group_path(host: Host) -> None:
    host.pci("0000:3b:00.1", group="12", cdev="vfio0")
    with host.open("0000:3b:00.1", iommu="group") as device:
        assert device.access.startswith("group ")
    with host.open("0000:3b:00.1", iommu="cdev") as device:
        assert device.access.startswith("cdev ")


def test_cdev_path_with_vf_token(host: Host) -> None:
    fake = FakeDevice("0000:3b:00.1", token=TOKEN)
    host.pci("0000:3b:00.1", group="12", cdev="vfio0", physfn="0000:3b:00.0", fake=fake)
    with pytest.raises(vfio.VfTokenError, match="required") as missing:
        host.open("0000:3b:00.1")
    assert missing.value.errno == errno.EACCES
    with pytest.raises(vfio.VfTokenError, match="does not match"):
        host.open("0000:3b:00.1", vf_token=OTHER_TOKEN)
    with host.open("0000:3b:00.1", vf_token=TOKEN) as device:
        assert device.access.startswith("cdev ")
    assert host.kernel.fds == {}


def test_cdev_token_on_a_kernel_without_token_support(host: Host) -> None:
    fake = FakeDevice("0000:3b:00.1", token=TOKEN)
    host.pci("0000:3b:00.1", group="12", cdev="vfio0", fake=fake)
    host.kernel.cdev_token = False
    with pytest.raises(vfio.VfTokenError) as refused:
        host.open("0000:3b:00.1", vf_token=TOKEN)
    assert refused.value.errno == errno.EINVAL
    assert host.kernel.fds == {}


def test_cdev_bind_busy_names_the_holder(host: Host) -> None:
    fake = FakeDevice("0000:3b:00.1", busy=True)
    host.pci("0000:3b:00.1", group="12", cdev="vfio0", fake=fake)
    fd_dir = host.paths.proc / "4242" / "fd"
    fd_dir.mkdir(parents=True)
    (host.paths.proc / "4242" / "comm").write_text("qemu-system-x86\n")
    os.symlink("/dev/vfio/12", fd_dir / "9")
    with pytest.raises(vfio.DeviceBusy) as busy:
        host.open("0000:3b:00.1")
    assert busy.value.errno == errno.EBUSY
    assert "held by pid 4242 (qemu-system-x86)" in str(busy.value)
    assert busy.value.hint is not None
    assert "QEMU" in busy.value.hint
    assert host.kernel.fds == {}


def test_cdev_bind_eperm_on_a_group_with_a_host_driver(host: Host) -> None:
    host.pci("0000:3b:00.0", driver="ixgbe", group="12")
    host.pci("0000:3b:00.1", group="12", cdev="vfio0")

    def refuse(obj: FakeDeviceFd, request: uapi.DeviceIoctl, arg: Any) -> int:
        if request is uapi.DeviceIoctl.BIND_IOMMUFD:
            raise oserror(errno.EPERM)
        return FakeKernel._device_ioctl(host.kernel, obj, request, arg)

    host.kernel._device_ioctl = refuse  # type: ignore[method-assign]
    with pytest.raises(vfio.GroupNotViable, match=r"0000:3b:00.0 \(ixgbe\)"):
        host.open("0000:3b:00.1")


# --- opening: errors ---------------------------------------------------------------------


def test_no_such_device_names_the_id_and_where_it_looked(host: Host) -> None:
    with pytest.raises(vfio.NoSuchDevice) as err:
        vfio.open_vfio_device(parse_spec("vfio:nonexistent"), kernel=host.kernel, host=host.paths)
    text = str(err.value)
    assert text.startswith("nonexistent: open: no such device (looked in ")
    assert str(host.paths.sys / "bus/pci/devices/nonexistent") in text
    assert str(host.paths.sys / "bus/mdev/devices/nonexistent") in text
    assert err.value.hint is not None
    assert "vfmig list" in err.value.hint
    assert err.value.exit_status == 3


def test_not_bound_to_vfio_says_which_driver_and_how_to_bind(host: Host) -> None:
    host.pci("0000:5e:00.0", driver="ixgbe", group="30")
    with pytest.raises(vfio.NotVfioDevice) as err:
        host.open("0000:5e:00.0")
    assert "not bound to a vfio driver (driver: ixgbe)" in str(err.value)
    hint = err.value.hint or ""
    assert "driver_override" in hint
    assert "drivers_probe" in hint
    assert "driver/unbind" in hint
    assert host.kernel.log == []  # nothing was opened


def test_group_not_viable_lists_the_other_devices(host: Host) -> None:
    host.pci("0000:3b:00.2", group="13")
    host.pci("0000:5e:00.0", driver="ixgbe", group="13")
    host.kernel.groups["13"].viable = False
    with pytest.raises(vfio.GroupNotViable) as err:
        host.open("0000:3b:00.2")
    assert "IOMMU group 13 is not viable; its other devices: 0000:5e:00.0 (ixgbe)" in str(err.value)
    assert "0000:5e:00.0" in (err.value.hint or "")
    assert host.kernel.fds == {}


def test_group_held_by_another_process(host: Host) -> None:
    host.pci("0000:3b:00.2", group="13")
    host.kernel.groups["13"].open = True  # someone else holds /dev/vfio/13
    with pytest.raises(vfio.DeviceBusy, match=r"/dev/vfio/13 is open in another process"):
        host.open("0000:3b:00.2")
    assert host.kernel.fds == {}


def test_get_device_fd_busy(host: Host) -> None:
    host.pci("0000:3b:00.2", group="13", fake=FakeDevice("0000:3b:00.2", busy=True))
    with pytest.raises(vfio.DeviceBusy, match="GET_DEVICE_FD"):
        host.open("0000:3b:00.2")
    assert host.kernel.fds == {}


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM])
def test_permission_denied(host: Host, code: int) -> None:
    host.pci("0000:3b:00.2", group="13")
    host.kernel.node_errors["/dev/vfio/13"] = code
    with pytest.raises(vfio.AccessDenied) as err:
        host.open("0000:3b:00.2")
    assert err.value.errno == code
    assert "no permission to open /dev/vfio/13" in str(err.value)
    assert "run as root" in (err.value.hint or "")
    assert "/dev/vfio/13" in (err.value.hint or "")
    assert host.kernel.fds == {}


def test_migration_not_supported(host: Host) -> None:
    host.pci("0000:3b:00.2", group="13", fake=FakeDevice("0000:3b:00.2", features={}))
    with pytest.raises(vfio.MigrationNotSupported) as err:
        host.open("0000:3b:00.2")
    assert err.value.errno == errno.ENOTTY
    assert "migration not supported by driver vfio-pci" in str(err.value)
    assert "variant driver" in (err.value.hint or "")
    assert host.kernel.fds == {}


def test_no_container_no_type1v2_no_group(host: Host) -> None:
    host.pci("0000:3b:00.2", group="13")
    host.kernel.type1v2 = False
    with pytest.raises(vfio.VfioUnavailable, match="no TYPE1v2"):
        host.open("0000:3b:00.2")
    host.kernel.type1v2 = True
    host.kernel.container_node = False
    with pytest.raises(vfio.VfioUnavailable, match="/dev/vfio/vfio does not exist") as err:
        host.open("0000:3b:00.2")
    assert "modprobe vfio" in (err.value.hint or "")
    host.kernel.container_node = True
    host.kernel.api_version = 1
    with pytest.raises(vfio.VfioUnavailable, match="API version 1"):
        host.open("0000:3b:00.2")
    assert host.kernel.fds == {}


# --- the device --------------------------------------------------------------------------


def test_leftover_state_is_reported_not_changed(host: Host) -> None:
    host.mdev(MDEV, group="20").state = S.PRE_COPY
    with host.open(MDEV) as device:
        assert device.get_state() is S.PRE_COPY
        assert device.cached_state is S.PRE_COPY
        assert device.session is None
    assert host.kernel.devices[MDEV].state is S.PRE_COPY


def test_precopy_then_stop_copy_stream(host: Host) -> None:
    fake = host.pci("0000:3b:00.2", group="13")
    with host.open("0000:3b:00.2") as device:
        session = device.set_state(S.PRE_COPY)
        assert session is not None
        assert session.direction is Direction.SAVING
        assert device.data_size() == 96
        info = session.precopy_info()
        assert (info.initial_bytes, info.dirty_bytes, info.reinit) == (24, 0, False)
        big = bytearray(64)
        view = memoryview(big)[8:]
        assert session.readinto(view) == 24
        assert big[8:32] == b"I" * 24  # straight into the caller's buffer
        assert session.readinto(view) is None  # ENOMSG: nothing now
        fake.eagain = True
        assert session.readinto(view) is None  # EAGAIN: nothing now
        assert device.set_state(S.STOP_COPY) is None  # same session goes on
        assert device.session is session
        got = bytearray()
        while (n := session.readinto(view)) != 0:
            assert n is not None
            got += view[:n]
        assert bytes(got) == b"S" * 72
        assert session.offset == 96  # type: ignore[attr-defined]
        device.set_state(S.STOP)
        assert session.closed
        assert device.session is None
    assert host.kernel.fds == {}


def test_mtty_zero_read_in_precopy_is_nothing_now(host: Host) -> None:
    host.mdev(MDEV, group="20")
    with host.open(MDEV) as device:
        session = device.set_state(S.PRE_COPY)
        assert session is not None
        buf = bytearray(100)
        assert session.readinto(buf) == 24
        assert session.readinto(buf) is None  # 0 in PRE_COPY: mtty's "nothing now"
        device.set_state(S.PRE_COPY_P2P)
        assert session.readinto(buf) is None
        device.set_state(S.STOP_COPY)
        assert session.readinto(buf) == 72
        assert session.readinto(buf) == 0  # 0 in STOP_COPY: the end


def test_resuming_writes_and_write_error_offset(host: Host) -> None:
    fake = host.pci("0000:3b:00.2", group="13")
    with host.open("0000:3b:00.2") as device:
        session = device.set_state(S.RESUMING)
        assert session is not None
        assert session.direction is Direction.RESUMING
        assert session.write(b"a" * 10) == 10
        assert session.write(memoryview(b"b" * 40)) == 40
        with pytest.raises(DataError) as err:
            session.write(b"c" * 50)
        assert err.value.errno == errno.ENOMEM
        assert err.value.offset == 50
        assert "write at offset 50" in str(err.value)
        with pytest.raises(DataError) as wrong_way:
            session.readinto(bytearray(8))
        assert wrong_way.value.errno == errno.EBADF
        with pytest.raises(DataError) as no_info:
            session.precopy_info()
        assert no_info.value.errno == errno.ENOTTY
        assert bytes(fake.written) == b"a" * 10 + b"b" * 40


def test_read_after_reset_is_a_data_error_with_offset(host: Host) -> None:
    host.pci("0000:3b:00.2", group="13")
    with host.open("0000:3b:00.2") as device:
        session = device.set_state(S.PRE_COPY)
        assert session is not None
        assert session.readinto(bytearray(10)) == 10
        fd = session.fd  # type: ignore[attr-defined]
        host.kernel.fds[fd].open_in_kernel = False  # type: ignore[attr-defined]
        with pytest.raises(DataError) as err:
            session.readinto(bytearray(10))
        assert err.value.errno == errno.ENODEV
        assert err.value.offset == 10


def test_precopy_info_v2_is_enabled_once_and_reports_reinit(host: Host) -> None:
    features = {**MIGRATION_FEATURES, F.MIG_PRECOPY_INFOv2: SET}
    fake = host.pci(
        "0000:3b:00.2",
        group="13",
        fake=FakeDevice("0000:3b:00.2", features=features, dirty_bytes=5),
    )
    with host.open("0000:3b:00.2") as device:
        session = device.set_state(S.PRE_COPY)
        assert session is not None
        assert fake.v2_sets == 0  # opening and entering PRE_COPY do not opt in
        first = session.precopy_info()
        assert (first.initial_bytes, first.dirty_bytes, first.reinit) == (24, 5, False)
        fake.reinit_pending = True
        assert session.precopy_info().reinit
        assert not session.precopy_info().reinit
        assert fake.v2_sets == 1


def test_precopy_info_outside_precopy_is_a_data_error(host: Host) -> None:
    host.pci("0000:3b:00.2", group="13")
    with host.open("0000:3b:00.2") as device:
        session = device.set_state(S.PRE_COPY)
        assert session is not None
        device.set_state(S.STOP_COPY)
        with pytest.raises(DataError) as err:
            session.precopy_info()
        assert err.value.errno == errno.EINVAL


def test_failed_set_reads_back_and_drops_a_dead_session(host: Host) -> None:
    fake = host.pci("0000:3b:00.2", group="13")
    with host.open("0000:3b:00.2") as device:
        session = device.set_state(S.PRE_COPY)
        assert session is not None
        fake.fail_next_set = (errno.EIO, S.RUNNING)
        with pytest.raises(StateChangeError) as err:
            device.set_state(S.STOP_COPY)
        assert err.value.errno == errno.EIO
        assert err.value.state_before == S.PRE_COPY
        assert err.value.state_after == S.RUNNING
        assert device.cached_state is S.RUNNING
        assert session.closed
        assert device.session is None


def test_failed_set_keeps_a_session_that_survived(host: Host) -> None:
    fake = host.pci("0000:3b:00.2", group="13")
    with host.open("0000:3b:00.2") as device:
        session = device.set_state(S.PRE_COPY)
        fake.fail_next_set = (errno.EIO, S.PRE_COPY_P2P)
        with pytest.raises(StateChangeError) as err:
            device.set_state(S.STOP_COPY)
        assert err.value.state_after == S.PRE_COPY_P2P
        assert device.session is session


def test_refused_requests_never_reach_the_kernel(host: Host) -> None:
    host.pci("0000:3b:00.2", group="13")
    with host.open("0000:3b:00.2") as device:
        device.set_state(S.STOP_COPY)
        host.kernel.log.clear()
        with pytest.raises(RequestRefused):
            device.set_state(S.PRE_COPY)
        assert host.kernel.log == ["ioctl devicefd VFIO_DEVICE_FEATURE"]  # the GET only


def test_reset_returns_to_running_and_closes_the_session(host: Host) -> None:
    fake = host.pci("0000:3b:00.2", group="13")
    with host.open("0000:3b:00.2") as device:
        session = device.set_state(S.RESUMING)
        assert session is not None
        device.reset()
        assert fake.resets == 1
        assert fake.state is S.RUNNING
        assert device.cached_state is S.RUNNING
        assert session.closed
        assert device.session is None
        assert not any(isinstance(o, FakeDataFd) for o in host.kernel.fds.values())


def test_closing_the_device_closes_its_session(host: Host) -> None:
    host.pci("0000:3b:00.2", group="13")
    device = host.open("0000:3b:00.2")
    session = device.set_state(S.PRE_COPY)
    assert session is not None
    device.close()
    assert session.closed
    assert host.kernel.fds == {}
    with pytest.raises(DataError, match="closed"):
        session.readinto(bytearray(1))


def test_probe_features_answers_per_feature_without_changing_state(host: Host) -> None:
    host.pci("0000:3b:00.2", group="13")
    host.mdev(MDEV, group="20")
    with host.open("0000:3b:00.2") as device:
        device.set_state(S.PRE_COPY)
        answers = device.probe_features()
        assert device.get_state() is S.PRE_COPY
    assert list(answers) == [f.name for f in F]
    supported = {name for name, answer in answers.items() if answer == vfio.SUPPORTED}
    assert supported == {f.name for f in (*MIGRATION_FEATURES, *PCI_CORE_FEATURES)}
    assert answers["DMA_BUF"] == "ENOTTY"
    assert answers["MIG_PRECOPY_INFOv2"] == "ENOTTY"
    with host.open(MDEV) as mdev:
        mdev_answers = mdev.probe_features()
    assert mdev_answers["LOW_POWER_ENTRY"] == "ENOTTY"
    assert mdev_answers["DMA_LOGGING_REPORT"] == vfio.SUPPORTED


def test_probe_reports_einval_for_an_op_the_feature_lacks(host: Host) -> None:
    features = {**MIGRATION_FEATURES, F.DMA_BUF: SET}  # the probe asks for GET
    host.pci("0000:3b:00.2", group="13", fake=FakeDevice("0000:3b:00.2", features=features))
    with host.open("0000:3b:00.2") as device:
        assert device.probe_feature(F.DMA_BUF) == "EINVAL"


def test_debugfs_reader_is_rooted_in_the_host_debugfs(host: Host) -> None:
    host.pci("0000:3b:00.2", group="13")
    with host.open("0000:3b:00.2") as device:
        assert device.debugfs.root == host.paths.debugfs
        assert device.debugfs.device_name == "0000:3b:00.2"


def test_every_state_reachable_through_the_fake_matches_the_fsm(host: Host) -> None:
    fake = host.pci("0000:3b:00.2", group="13")
    with host.open("0000:3b:00.2") as device:
        for target in (S.STOP, S.RESUMING, S.STOP, S.RUNNING_P2P, S.PRE_COPY_P2P, S.STOP_COPY):
            device.set_state(target)
            assert fake.state is target
            assert device.get_state() is target
            assert device.cached_state is target


def test_open_vfio_device_from_a_spec_with_options(host: Host) -> None:
    fake = FakeDevice("0000:3b:00.1", token=TOKEN)
    host.pci("0000:3b:00.1", group="12", cdev="vfio0", physfn="0000:3b:00.0", fake=fake)
    spec = parse_spec(f"vfio:3b:00.1,vf-token={TOKEN},iommu=group")
    with vfio.open_vfio_device(spec, kernel=host.kernel, host=host.paths) as device:
        assert device.name == "0000:3b:00.1"
        assert device.access.startswith("group /dev/vfio/12")
    assert f"0000:3b:00.1 vf_token={TOKEN}" in host.kernel.device_names
    by_path = parse_spec("vfio:/sys/bus/pci/devices/0000:3b:00.1,vf-token=" + str(TOKEN))
    with vfio.open_vfio_device(by_path, kernel=host.kernel, host=host.paths) as device:
        assert device.access.startswith("cdev ")


def test_devices_opened_without_a_kernel_share_the_process_kernel_and_group(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    host.pci("0000:3b:00.0", group="7")
    host.pci("0000:3b:00.1", group="7")
    monkeypatch.setattr(vfio, "REAL_KERNEL", host.kernel)  # stands in for this process's kernel
    first = vfio.open_sysfs_device(host.sysfs("0000:3b:00.0"), host=host.paths)
    second = vfio.open_sysfs_device(host.sysfs("0000:3b:00.1"), host=host.paths)
    assert first.kernel is second.kernel is host.kernel
    assert host.kernel.log.count("open /dev/vfio/7") == 1
    assert host.kernel.log.count("ioctl container VFIO_SET_IOMMU") == 1
    first.close()
    second.close()
    assert host.kernel.fds == {}
