"""The conformance suite's backend for mtty devices, inside the kernel-tier guest.

tests/device/test_conformance.py states how every migratable device behaves; its
conftest runs it against the backend a Python file's ``make_backend(directory)`` returns
when ``VFMIG_CONFORMANCE_BACKEND`` names that file. guest-setup.sh names this one, so in
the guest the same suite runs against real mtty mdevs through the kernel backend
(:mod:`vfmig.device.vfio`, group + container path).

mtty's departures from the uAPI text are declared as quirks (names from
``test_conformance.QUIRKS``): it returns 0 instead of ENOMSG when nothing is pending in
PRE_COPY, and never reports dirty bytes. It has all three migration flags and cannot
inject arc failures, so cases for other flag sets and fault injection skip.

mtty keeps its UART and migration state across close and reopen, and a device closed in
RESUMING oopses on its next state change unless it is reset first (vfio-migration.md
section 11): every device handed out is reset unless it is found in RUNNING.
``VFIO_DEVICE_RESET`` does not clear the UART registers, so a pair gets fresh scratch-register
values on each port, different on the two devices; the digest reads them back, so a round
trip only compares equal if the state really moved.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.core.spec import parse_spec
from vfmig.device import _uapi as uapi
from vfmig.device.vfio import VfioDevice, open_vfio_device

if TYPE_CHECKING:
    from vfmig.device.backend import MigrationDevice

ALL = MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY
#: UART scratch register: read and written with no side effect (mtty.c handle_bar_*).
UART_SCR = 7


class MttyBackend:
    """Hands out the guest's mtty mdevs: the first mtty-2 alone, or both mtty-2 as a pair."""

    name = "mtty"
    flag_sets = (ALL,)
    quirks = frozenset({"precopy-read-returns-0", "no-dirty-bytes"})

    def __init__(self, mdevs: list[tuple[str, str]]) -> None:
        pairs = [uuid for uuid, kind in mdevs if kind == "mtty-2"]
        assert len(pairs) >= 2, mdevs
        self.source, self.destination = pairs[:2]
        self.ports = {uuid: int(kind.rpartition("-")[2]) for uuid, kind in mdevs}

    def _open(self, uuid: str) -> VfioDevice:
        device = open_vfio_device(parse_spec(f"vfio:{uuid},iommu=group"))
        if device.get_state() is not DeviceState.RUNNING:
            device.reset()  # never a state change first on a device left in RESUMING
        assert device.flags == ALL, device.flags
        return device

    def device(self, flags: MigrationFlags, *, dirty: bool = False) -> MigrationDevice:
        assert flags == ALL, flags
        if dirty:
            pytest.skip("mtty devices never dirty their state (quirk no-dirty-bytes)")
        return self._open(self.source)

    def pair(self, flags: MigrationFlags) -> tuple[MigrationDevice, MigrationDevice]:
        assert flags == ALL, flags
        source = self._open(self.source)
        try:
            destination = self._open(self.destination)
        except BaseException:
            source.close()
            raise
        for port in range(self.ports[self.source]):
            value = secrets.randbelow(256)
            write_byte(source, port, UART_SCR, value)
            write_byte(destination, port, UART_SCR, value ^ 0xFF)
        assert self.content_digest(source) != self.content_digest(destination)
        return source, destination

    def content_digest(self, device: MigrationDevice) -> str:
        assert isinstance(device, VfioDevice)
        scratch = bytes(
            read_byte(device, port, UART_SCR) for port in range(self.ports[device.name])
        )
        return hashlib.sha256(scratch).hexdigest()

    def failing_device(
        self, flags: MigrationFlags, src: DeviceState, dst: DeviceState, errno: int
    ) -> MigrationDevice | None:
        return None  # a real driver cannot be told to fail an arc


def _register(device: VfioDevice, port: int, register: int) -> tuple[int, int]:
    """The device fd and the file offset of ``register`` of ``port`` (port N is BAR N)."""
    fd = device._fd  # the backend has no public fd; region I/O is beyond MigrationDevice
    info = uapi.RegionInfo.new(index=port)
    device.kernel.ioctl(fd, uapi.DeviceIoctl.GET_REGION_INFO, info)
    assert info.size > register, info
    return fd, info.offset + register


def write_byte(device: MigrationDevice, port: int, register: int, value: int) -> None:
    assert isinstance(device, VfioDevice)
    fd, offset = _register(device, port, register)
    assert os.pwrite(fd, bytes([value]), offset) == 1


def read_byte(device: VfioDevice, port: int, register: int) -> int:
    fd, offset = _register(device, port, register)
    data = os.pread(fd, 1, offset)
    assert len(data) == 1, data
    return data[0]


def make_backend(directory: Path) -> MttyBackend:
    """The entry point tests/device/conftest.py calls (``directory`` is unused: no files)."""
    guest = json.loads(Path(os.environ["VFMIG_KERNEL_GUEST"]).read_text())
    return MttyBackend([(m["uuid"], m["type"]) for m in guest["mdevs"]])
