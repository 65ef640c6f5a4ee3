"""In the guest: raw ioctls (vfmig.device._uapi, no backend code) on each mtty mdev.

Opens each device the group/container way and checks what the kernel reports for
it: migration flags STOP_COPY|P2P|PRE_COPY (0x7), state RUNNING, and mtty's
MIG_DATA_SIZE of 24 + 36 bytes per port (docs: vfio-migration.md section 10).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.device import _uapi as uapi
from vfmig.device.debugfs import DebugfsReader

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.kernel

#: mtty's stream: a 24-byte header, then 36 bytes per port (samples/vfio-mdev/mtty.c).
MTTY_HEADER_BYTES = 24
MTTY_PORT_BYTES = 36


def ioctl(fd: int, request: int, arg: ctypes.Structure | ctypes.c_int | ctypes.Array[Any]) -> int:
    """``ioctl(2)`` with a mutable argument the kernel writes into; returns its result."""
    result: int = fcntl.ioctl(fd, request, arg, True)
    return result


@contextlib.contextmanager
def opened(uuid: str) -> Iterator[int]:
    """A device fd for mdev ``uuid``, through its group and a fresh TYPE1v2 container."""
    group_number = (Path("/sys/bus/mdev/devices") / uuid / "iommu_group").resolve().name
    with contextlib.ExitStack() as stack:
        container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
        stack.callback(os.close, container)
        assert fcntl.ioctl(container, uapi.ContainerIoctl.GET_API_VERSION) == uapi.VFIO_API_VERSION
        assert fcntl.ioctl(container, uapi.ContainerIoctl.CHECK_EXTENSION, uapi.VFIO_TYPE1v2_IOMMU)
        group = os.open(f"/dev/vfio/{group_number}", os.O_RDWR | os.O_CLOEXEC)
        stack.callback(os.close, group)
        status = uapi.GroupStatus.new()
        ioctl(group, uapi.GroupIoctl.GET_STATUS, status)
        assert status.flags & uapi.GROUP_FLAGS_VIABLE, status
        ioctl(group, uapi.GroupIoctl.SET_CONTAINER, ctypes.c_int(container))
        fcntl.ioctl(container, uapi.ContainerIoctl.SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        name = ctypes.create_string_buffer(uuid.encode())
        device = ioctl(group, uapi.GroupIoctl.GET_DEVICE_FD, name)
        stack.callback(os.close, device)
        yield device


def get(device: int, feature: uapi.FeatureId, payload: uapi.Struct) -> Any:
    request = uapi.feature_request(feature, uapi.FEATURE_GET, payload)
    assert ioctl(device, uapi.DeviceIoctl.FEATURE, request.buffer) == 0
    return request.payload


def test_migration_feature_and_state(guest: dict[str, Any], mdev: tuple[str, str]) -> None:
    uuid, kind = mdev
    ports = int(kind.rpartition("-")[2])
    with opened(uuid) as device:
        probe = uapi.feature_request(
            uapi.FeatureId.MIGRATION, uapi.FEATURE_PROBE | uapi.FEATURE_GET
        )
        assert ioctl(device, uapi.DeviceIoctl.FEATURE, probe.buffer) == 0

        flags = get(device, uapi.FeatureId.MIGRATION, uapi.FeatureMigration()).flags
        assert MigrationFlags(flags) == (
            MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY
        )
        assert flags == 0x7

        state = get(device, uapi.FeatureId.MIG_DEVICE_STATE, uapi.FeatureMigState())
        assert DeviceState(state.device_state) is DeviceState.RUNNING
        assert state.data_fd == -1

        size = get(device, uapi.FeatureId.MIG_DATA_SIZE, uapi.FeatureMigDataSize())
        assert size.stop_copy_length == MTTY_HEADER_BYTES + MTTY_PORT_BYTES * ports

    # debugfs and GET agree (the state file takes the same driver mutex).
    reading = DebugfsReader(uuid, root=Path(guest["debugfs"])).read_state()
    assert reading.state is DeviceState.RUNNING, reading
