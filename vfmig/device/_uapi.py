"""ctypes binding of the VFIO and iommufd uAPI that vfmig uses: structs, ioctl numbers, flags.

Provenance
----------
Hand-transcribed (ADR 0007) from the Linux 6.12 headers ``include/uapi/linux/vfio.h`` and
``include/uapi/linux/iommufd.h`` as shipped in Debian's ``linux-source-6.12`` package,
version 6.12.117-1~deb12u1. Items newer than 6.12 are listed in :data:`SINCE` with their
source; they were transcribed from the upstream header text:

* ``torvalds/linux`` ``include/uapi/linux/vfio.h`` at 02256acf1e81 ("vfio: uapi: fix comment
  typo", 7.1 merge window): ``VFIO_DEVICE_FEATURE_DMA_BUF`` (11), the vf_token of
  ``VFIO_DEVICE_BIND_IOMMUFD`` (``VFIO_DEVICE_BIND_FLAG_TOKEN``, ``token_uuid_ptr``; the struct
  grew 16 -> 24 bytes; patch Message-ID 0-v2-470f044801ef+a887e-vfio_token_jgg@nvidia.com)
  and the PASID of ``VFIO_DEVICE_[AT|DE]TACH_IOMMUFD_PT`` (ad744ed5dd8b, 6.15);
* d7140b5dde45 ("vfio: Define uAPI for re-init initial bytes during the PRE_COPY phase", 7.1;
  series Message-ID 20260224082019.25772-1-yishaih@nvidia.com): ``VFIO_PRECOPY_INFO_REINIT``
  and ``VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`` (12). The stored 02256acf1e81 text predates
  it; the values come from the patch text (Message-ID 20260224082019.25772-2-yishaih@nvidia.com);
* ``VFIO_DEVICE_FEATURE_ZPCI_ERROR`` (13) is the id of the posted s390 series (2026); it is
  in no released header yet and vfmig only ever PROBEs it.

``tests/device/test_uapi_layout.py`` compiles a C program against the 6.12 headers and checks
every size, offset, ioctl number and constant here; newer items are checked against the
upstream text quoted in that test. Nothing here uses the v1 migration region,
``VFIO_DEVICE_STATE_V1_*`` or ``VFIO_TYPE1_NESTING_IOMMU`` (removed upstream).

Theory of operation
-------------------
Every VFIO and iommufd ioctl is ``_IO(';', nr)``: no size or direction is encoded, the
argument is a struct whose first u32 (``argsz``, or ``size`` for iommufd) tells the kernel how
much the caller passed. Numbers are computed by :func:`_IOC` with the layout of the running
architecture (``_IOC_NONE`` is 1 on powerpc, mips, sparc and alpha). The same number means
different things on different fd types (17 is FEATURE on a device fd, DIRTY_PAGES on a
container), so there is one ``IntEnum`` per fd family and never one across families;
:func:`ioctl_name` turns a number back into the kernel's name for journals.

Structs derive from :class:`Struct` (``asdict()``, a repr without padding and reserved fields,
``new()`` that fills ``argsz``/``size``). ``VFIO_DEVICE_FEATURE`` takes a header followed by a
feature-specific payload: :func:`feature_request` is the one place that builds that composite,
sets ``argsz`` and the flags, checks the payload type against :data:`FEATURE_PAYLOAD`, and
returns a :class:`FeatureRequest` whose ``buffer`` goes to ``ioctl`` and whose ``payload`` reads
back what the kernel wrote. Pointers inside payloads (DMA logging ranges and bitmap, the bind
token) point at buffers the struct keeps alive (``_refs``) for as long as it is referenced.
Migration states and flags are :class:`vfmig.core.fsm.DeviceState` and
:class:`vfmig.core.fsm.MigrationFlags`, not duplicated here.

Published names
---------------
ioctl families (``IntEnum`` of request numbers): :class:`ContainerIoctl`, :class:`GroupIoctl`,
:class:`DeviceIoctl`, :class:`DataFdIoctl`, :class:`IommufdIoctl`; :func:`ioctl_name`,
:func:`c_name`, :data:`C_PREFIX`.

Device features: :class:`FeatureId`, :data:`FEATURE_GET`, :data:`FEATURE_SET`,
:data:`FEATURE_PROBE`, :data:`FEATURE_MASK`, :data:`FEATURE_PAYLOAD`, :data:`PROBE_ONLY`,
:func:`feature_request`, :class:`FeatureRequest`.

Structs: :class:`Struct`, :class:`GroupStatus`, :class:`DeviceInfo`, :class:`RegionInfo`,
:class:`IrqInfo`, :class:`DeviceFeature` (header), :class:`FeatureMigration`,
:class:`FeatureMigState`, :class:`FeatureMigDataSize`, :class:`FeatureDmaLoggingControl`,
:class:`FeatureDmaLoggingRange`, :class:`FeatureDmaLoggingReport`, :class:`PrecopyInfo`,
:class:`DeviceBindIommufd`, :class:`DeviceAttachIommufdPt`, :class:`DeviceDetachIommufdPt`,
:class:`IommuIoasAlloc`, :class:`IommuDestroy`.

Constants: :data:`VFIO_API_VERSION`, :data:`VFIO_TYPE1_IOMMU`, :data:`VFIO_TYPE1v2_IOMMU`,
:data:`VFIO_NOIOMMU_IOMMU`, :data:`GROUP_FLAGS_VIABLE`, :data:`GROUP_FLAGS_CONTAINER_SET`,
:data:`DEVICE_FLAGS_RESET`, :data:`DEVICE_FLAGS_PCI`, :data:`DEVICE_FLAGS_PLATFORM`,
:data:`DEVICE_FLAGS_AMBA`, :data:`DEVICE_FLAGS_CCW`, :data:`DEVICE_FLAGS_AP`,
:data:`DEVICE_FLAGS_FSL_MC`, :data:`DEVICE_FLAGS_CAPS`, :data:`DEVICE_FLAGS_CDX`,
:data:`REGION_INFO_FLAG_READ`, :data:`REGION_INFO_FLAG_WRITE`, :data:`REGION_INFO_FLAG_MMAP`,
:data:`REGION_INFO_FLAG_CAPS`, :data:`IRQ_INFO_EVENTFD`, :data:`IRQ_INFO_MASKABLE`,
:data:`IRQ_INFO_AUTOMASKED`, :data:`IRQ_INFO_NORESIZE`, :data:`BIND_FLAG_TOKEN`,
:data:`ATTACH_FLAG_PASID`, :data:`DETACH_FLAG_PASID`, :data:`PRECOPY_INFO_REINIT`,
:data:`VFIO_TYPE`, :data:`VFIO_BASE`, :data:`IOMMUFD_TYPE`, :data:`IOMMUFD_CMD_BASE`;
:data:`CONSTANTS` (Python name -> kernel name), :data:`SINCE` (items newer than 6.12).

ioctl encoding: :class:`IocLayout`, :func:`ioc_layout`, :data:`IOC`, :func:`_IOC`, :func:`_IO`.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, Self, TypeVar, cast, overload

if TYPE_CHECKING:
    import uuid
    from collections.abc import Sequence

__all__ = [
    "ATTACH_FLAG_PASID",
    "BIND_FLAG_TOKEN",
    "CONSTANTS",
    "C_PREFIX",
    "DETACH_FLAG_PASID",
    "DEVICE_FLAGS_AMBA",
    "DEVICE_FLAGS_AP",
    "DEVICE_FLAGS_CAPS",
    "DEVICE_FLAGS_CCW",
    "DEVICE_FLAGS_CDX",
    "DEVICE_FLAGS_FSL_MC",
    "DEVICE_FLAGS_PCI",
    "DEVICE_FLAGS_PLATFORM",
    "DEVICE_FLAGS_RESET",
    "FEATURE_GET",
    "FEATURE_MASK",
    "FEATURE_PAYLOAD",
    "FEATURE_PROBE",
    "FEATURE_SET",
    "GROUP_FLAGS_CONTAINER_SET",
    "GROUP_FLAGS_VIABLE",
    "IOC",
    "IOMMUFD_CMD_BASE",
    "IOMMUFD_TYPE",
    "IRQ_INFO_AUTOMASKED",
    "IRQ_INFO_EVENTFD",
    "IRQ_INFO_MASKABLE",
    "IRQ_INFO_NORESIZE",
    "PRECOPY_INFO_REINIT",
    "PROBE_ONLY",
    "REGION_INFO_FLAG_CAPS",
    "REGION_INFO_FLAG_MMAP",
    "REGION_INFO_FLAG_READ",
    "REGION_INFO_FLAG_WRITE",
    "SINCE",
    "VFIO_API_VERSION",
    "VFIO_BASE",
    "VFIO_NOIOMMU_IOMMU",
    "VFIO_TYPE",
    "VFIO_TYPE1_IOMMU",
    "_IO",
    "_IOC",
    "ContainerIoctl",
    "DataFdIoctl",
    "DeviceAttachIommufdPt",
    "DeviceBindIommufd",
    "DeviceDetachIommufdPt",
    "DeviceFeature",
    "DeviceInfo",
    "DeviceIoctl",
    "FeatureDmaLoggingControl",
    "FeatureDmaLoggingRange",
    "FeatureDmaLoggingReport",
    "FeatureId",
    "FeatureMigDataSize",
    "FeatureMigState",
    "FeatureMigration",
    "FeatureRequest",
    "GroupIoctl",
    "GroupStatus",
    "IocLayout",
    "IommuDestroy",
    "IommuIoasAlloc",
    "IommufdIoctl",
    "IrqInfo",
    "PrecopyInfo",
    "RegionInfo",
    "Struct",
    "VFIO_TYPE1v2_IOMMU",
    "c_name",
    "feature_request",
    "ioc_layout",
    "ioctl_name",
]

# --- ioctl number encoding -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IocLayout:
    """One architecture's ``_IOC`` encoding (``include/uapi/asm-generic/ioctl.h`` + arch overrides).

    Layout, low bits first: nr (8), type (8), size (``size_bits``), direction (``dir_bits``).
    """

    size_bits: int
    dir_bits: int
    none: int
    read: int
    write: int
    nr_bits: int = 8
    type_bits: int = 8

    @property
    def type_shift(self) -> int:
        return self.nr_bits

    @property
    def size_shift(self) -> int:
        return self.nr_bits + self.type_bits

    @property
    def dir_shift(self) -> int:
        return self.size_shift + self.size_bits


#: asm-generic: x86, arm, arm64, riscv, s390, loongarch, ...
_GENERIC = IocLayout(size_bits=14, dir_bits=2, none=0, read=2, write=1)
#: arch/{powerpc,mips,sparc,alpha}/include/uapi/asm/ioctl.h: 13 size bits, 3 direction bits,
#: ``_IOC_NONE`` = 1. (sparc lets size overflow into the NONE bit; vfmig encodes no sizes.)
_THREE_DIR_BITS = IocLayout(size_bits=13, dir_bits=3, none=1, read=2, write=4)
#: arch/parisc/include/uapi/asm/ioctl.h: generic widths, READ and WRITE swapped.
_PARISC = IocLayout(size_bits=14, dir_bits=2, none=0, read=1, write=2)


def ioc_layout(machine: str) -> IocLayout:
    """The ``_IOC`` layout for a ``platform.machine()`` / ``uname -m`` string."""
    if machine.startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
        return _THREE_DIR_BITS
    if machine.startswith("parisc"):
        return _PARISC
    return _GENERIC


#: The layout of the machine vfmig runs on.
IOC: Final = ioc_layout(platform.machine())


def _IOC(direction: int, type_: int, nr: int, size: int, layout: IocLayout = IOC) -> int:
    """``_IOC(dir, type, nr, size)`` of ``<asm/ioctl.h>``, for ``layout``."""
    if not (
        0 <= direction < 1 << layout.dir_bits
        and 0 <= type_ < 1 << layout.type_bits
        and 0 <= nr < 1 << layout.nr_bits
        and 0 <= size < 1 << layout.size_bits
    ):
        raise ValueError(
            f"_IOC field out of range: dir={direction} type={type_} nr={nr} size={size}"
        )
    return (
        direction << layout.dir_shift | type_ << layout.type_shift | nr | size << layout.size_shift
    )


def _IO(type_: int, nr: int, layout: IocLayout = IOC) -> int:
    """``_IO(type, nr)``: no direction, no size -- how every VFIO and iommufd ioctl is defined."""
    return _IOC(layout.none, type_, nr, 0, layout)


#: ``VFIO_TYPE`` (``';'``) and ``VFIO_BASE``: VFIO ioctls are ``_IO(VFIO_TYPE, VFIO_BASE + n)``.
VFIO_TYPE: Final = ord(";")
VFIO_BASE: Final = 100
#: ``IOMMUFD_TYPE`` and ``IOMMUFD_CMD_BASE``: iommufd ioctls are ``_IO(';', 0x80 + n)``.
IOMMUFD_TYPE: Final = ord(";")
IOMMUFD_CMD_BASE: Final = 0x80


def _vfio(n: int) -> int:
    return _IO(VFIO_TYPE, VFIO_BASE + n)


def _iommufd(n: int) -> int:
    return _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + n)


# --- one enum per fd family ------------------------------------------------------------------


class ContainerIoctl(enum.IntEnum):
    """ioctls on the container fd (``/dev/vfio/vfio``). Kernel name: ``VFIO_`` + member name."""

    GET_API_VERSION = _vfio(0)
    CHECK_EXTENSION = _vfio(1)
    SET_IOMMU = _vfio(2)


class GroupIoctl(enum.IntEnum):
    """ioctls on a group fd (``/dev/vfio/<N>``). Kernel name: ``VFIO_GROUP_`` + member name."""

    GET_STATUS = _vfio(3)
    SET_CONTAINER = _vfio(4)
    UNSET_CONTAINER = _vfio(5)
    GET_DEVICE_FD = _vfio(6)


class DeviceIoctl(enum.IntEnum):
    """ioctls on a device fd. Kernel name: ``VFIO_DEVICE_`` + member name.

    ``BIND_IOMMUFD`` and ``[AT|DE]TACH_IOMMUFD_PT`` exist on cdev fds
    (``/dev/vfio/devices/vfioN``) only.
    """

    GET_INFO = _vfio(7)
    GET_REGION_INFO = _vfio(8)
    GET_IRQ_INFO = _vfio(9)
    RESET = _vfio(11)
    FEATURE = _vfio(17)
    BIND_IOMMUFD = _vfio(18)
    ATTACH_IOMMUFD_PT = _vfio(19)
    DETACH_IOMMUFD_PT = _vfio(20)


class DataFdIoctl(enum.IntEnum):
    """ioctls on a migration data fd. Kernel name: ``VFIO_`` + member name."""

    MIG_GET_PRECOPY_INFO = _vfio(21)


class IommufdIoctl(enum.IntEnum):
    """ioctls on an iommufd (``/dev/iommu``). Kernel name: ``IOMMU_`` + member name."""

    DESTROY = _iommufd(0)
    IOAS_ALLOC = _iommufd(1)


class FeatureId(enum.IntEnum):
    """``VFIO_DEVICE_FEATURE_*`` ids (flags bits 0-15). Kernel name: that prefix + member name."""

    PCI_VF_TOKEN = 0
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    LOW_POWER_ENTRY = 3
    LOW_POWER_ENTRY_WITH_WAKEUP = 4
    LOW_POWER_EXIT = 5
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8
    MIG_DATA_SIZE = 9
    BUS_MASTER = 10
    DMA_BUF = 11
    MIG_PRECOPY_INFOv2 = 12
    ZPCI_ERROR = 13


#: The kernel's name of a member is this prefix + the member name.
C_PREFIX: Final[dict[type[enum.IntEnum], str]] = {
    ContainerIoctl: "VFIO_",
    GroupIoctl: "VFIO_GROUP_",
    DeviceIoctl: "VFIO_DEVICE_",
    DataFdIoctl: "VFIO_",
    IommufdIoctl: "IOMMU_",
    FeatureId: "VFIO_DEVICE_FEATURE_",
}


def c_name(member: enum.IntEnum) -> str:
    """The kernel's name of a member: ``c_name(DeviceIoctl.RESET)`` = ``VFIO_DEVICE_RESET``."""
    return C_PREFIX[type(member)] + member.name


def ioctl_name(family: type[enum.IntEnum], request: int) -> str:
    """The kernel's name of ``request`` on an fd of ``family``, for journals.

    Unknown numbers come back as ``<prefix>?0x3b7f`` so a journal still shows what was sent.
    """
    try:
        return c_name(family(request))
    except ValueError:
        return f"{C_PREFIX[family]}?{request:#x}"


# --- constants ---------------------------------------------------------------------------------

VFIO_API_VERSION: Final = 0

#: ``VFIO_CHECK_EXTENSION`` / ``VFIO_SET_IOMMU`` arguments.
VFIO_TYPE1_IOMMU: Final = 1
VFIO_TYPE1v2_IOMMU: Final = 3
VFIO_NOIOMMU_IOMMU: Final = 8

#: ``struct vfio_group_status.flags``.
GROUP_FLAGS_VIABLE: Final = 1 << 0
GROUP_FLAGS_CONTAINER_SET: Final = 1 << 1

#: ``struct vfio_device_info.flags``.
DEVICE_FLAGS_RESET: Final = 1 << 0
DEVICE_FLAGS_PCI: Final = 1 << 1
DEVICE_FLAGS_PLATFORM: Final = 1 << 2
DEVICE_FLAGS_AMBA: Final = 1 << 3
DEVICE_FLAGS_CCW: Final = 1 << 4
DEVICE_FLAGS_AP: Final = 1 << 5
DEVICE_FLAGS_FSL_MC: Final = 1 << 6
DEVICE_FLAGS_CAPS: Final = 1 << 7
DEVICE_FLAGS_CDX: Final = 1 << 8

#: ``struct vfio_region_info.flags``.
REGION_INFO_FLAG_READ: Final = 1 << 0
REGION_INFO_FLAG_WRITE: Final = 1 << 1
REGION_INFO_FLAG_MMAP: Final = 1 << 2
REGION_INFO_FLAG_CAPS: Final = 1 << 3

#: ``struct vfio_irq_info.flags``.
IRQ_INFO_EVENTFD: Final = 1 << 0
IRQ_INFO_MASKABLE: Final = 1 << 1
IRQ_INFO_AUTOMASKED: Final = 1 << 2
IRQ_INFO_NORESIZE: Final = 1 << 3

#: ``struct vfio_device_feature.flags``: feature id mask and the three operations.
FEATURE_MASK: Final = 0xFFFF
FEATURE_GET: Final = 1 << 16
FEATURE_SET: Final = 1 << 17
FEATURE_PROBE: Final = 1 << 18

#: ``struct vfio_device_bind_iommufd.flags``: ``token_uuid_ptr`` is valid (newer than 6.12).
BIND_FLAG_TOKEN: Final = 1 << 0
#: ``struct vfio_device_[at|de]tach_iommufd_pt.flags``: ``pasid`` is valid (newer than 6.12).
ATTACH_FLAG_PASID: Final = 1 << 0
DETACH_FLAG_PASID: Final = 1 << 0

#: ``struct vfio_precopy_info.flags`` output, only after SET of MIG_PRECOPY_INFOv2 (7.1).
PRECOPY_INFO_REINIT: Final = 1 << 0

#: Python name -> kernel name of every plain constant above.
CONSTANTS: Final[dict[str, str]] = {
    "VFIO_TYPE": "VFIO_TYPE",
    "VFIO_BASE": "VFIO_BASE",
    "IOMMUFD_TYPE": "IOMMUFD_TYPE",
    "IOMMUFD_CMD_BASE": "IOMMUFD_CMD_BASE",
    "VFIO_API_VERSION": "VFIO_API_VERSION",
    "VFIO_TYPE1_IOMMU": "VFIO_TYPE1_IOMMU",
    "VFIO_TYPE1v2_IOMMU": "VFIO_TYPE1v2_IOMMU",
    "VFIO_NOIOMMU_IOMMU": "VFIO_NOIOMMU_IOMMU",
    **{
        name: "VFIO_" + name
        for name in (
            "GROUP_FLAGS_VIABLE",
            "GROUP_FLAGS_CONTAINER_SET",
            "DEVICE_FLAGS_RESET",
            "DEVICE_FLAGS_PCI",
            "DEVICE_FLAGS_PLATFORM",
            "DEVICE_FLAGS_AMBA",
            "DEVICE_FLAGS_CCW",
            "DEVICE_FLAGS_AP",
            "DEVICE_FLAGS_FSL_MC",
            "DEVICE_FLAGS_CAPS",
            "DEVICE_FLAGS_CDX",
            "REGION_INFO_FLAG_READ",
            "REGION_INFO_FLAG_WRITE",
            "REGION_INFO_FLAG_MMAP",
            "REGION_INFO_FLAG_CAPS",
            "IRQ_INFO_EVENTFD",
            "IRQ_INFO_MASKABLE",
            "IRQ_INFO_AUTOMASKED",
            "IRQ_INFO_NORESIZE",
            "PRECOPY_INFO_REINIT",
        )
    },
    **{
        name: "VFIO_DEVICE_" + name
        for name in (
            "FEATURE_MASK",
            "FEATURE_GET",
            "FEATURE_SET",
            "FEATURE_PROBE",
            "BIND_FLAG_TOKEN",
        )
    },
    "ATTACH_FLAG_PASID": "VFIO_DEVICE_ATTACH_PASID",
    "DETACH_FLAG_PASID": "VFIO_DEVICE_DETACH_PASID",
}

_TOKEN = "2025, vf_token for cdev (Message-ID 0-v2-470f044801ef+a887e-vfio_token_jgg@nvidia.com)"
_PASID = "6.15, ad744ed5dd8b 'vfio: VFIO_DEVICE_[AT|DE]TACH_IOMMUFD_PT support pasid'"
_DMA_BUF = (
    "6.19, vfio-pci dma-buf export (Message-ID 20251120-dmabuf-vfio-v9-0-d7f71607f371@nvidia.com)"
)
_REINIT = "7.1, d7140b5dde45 (Message-ID 20260224082019.25772-1-yishaih@nvidia.com)"

#: Kernel items this module defines that Linux 6.12 lacks: kernel name (``struct.field`` for
#: struct fields) -> where it comes from. A kernel older than that answers EINVAL/ENOTTY.
SINCE: Final[dict[str, str]] = {
    "VFIO_DEVICE_FEATURE_DMA_BUF": _DMA_BUF,
    "VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2": _REINIT,
    "VFIO_PRECOPY_INFO_REINIT": _REINIT,
    "VFIO_DEVICE_FEATURE_ZPCI_ERROR": "posted s390 zPCI error series (2026), in no release yet",
    "VFIO_DEVICE_BIND_FLAG_TOKEN": _TOKEN,
    "vfio_device_bind_iommufd.token_uuid_ptr": _TOKEN,
    "VFIO_DEVICE_ATTACH_PASID": _PASID,
    "vfio_device_attach_iommufd_pt.pasid": _PASID,
    "VFIO_DEVICE_DETACH_PASID": _PASID,
    "vfio_device_detach_iommufd_pt.pasid": _PASID,
}

# --- structs -----------------------------------------------------------------------------------

_u32 = ctypes.c_uint32
_s32 = ctypes.c_int32
#: ``__aligned_u64``. ctypes aligns c_uint64 to 4 on i386, but every u64 transcribed here sits
#: at an offset that is a multiple of 8 in a struct whose size is a multiple of 8 (checked by
#: the layout test), so the layout is the kernel's on i386 too.
_u64 = ctypes.c_uint64

#: Field names that :meth:`Struct.__repr__` and :meth:`Struct.asdict` leave out.
_HIDDEN: Final = frozenset({"pad", "reserved", "__reserved"})


class Struct(ctypes.Structure):
    """A uAPI struct. ``_c_name_`` is the kernel's ``struct`` name (without ``struct``)."""

    _c_name_: ClassVar[str] = ""
    #: Buffers that pointer-valued fields point at, kept alive with the struct.
    _refs: tuple[object, ...] = ()

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(field[0] for field in cls._fields_)

    @classmethod
    def new(cls, **fields: Any) -> Self:
        """An instance with the leading ``argsz`` (VFIO) or ``size`` (iommufd) set to its size."""
        first = cls.field_names()[0]
        if first not in ("argsz", "size"):
            raise TypeError(f"{cls.__name__} has no argsz/size field")
        return cls(**{first: ctypes.sizeof(cls), **fields})

    def asdict(self) -> dict[str, Any]:
        """Field values without padding and reserved fields; nested structs become dicts."""
        out: dict[str, Any] = {}
        for name in self.field_names():
            if name in _HIDDEN:
                continue
            value = getattr(self, name)
            out[name] = value.asdict() if isinstance(value, Struct) else value
        return out

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.asdict().items())
        return f"{type(self).__name__}({fields})"


class GroupStatus(Struct):
    """``struct vfio_group_status`` (``VFIO_GROUP_GET_STATUS``)."""

    _c_name_ = "vfio_group_status"
    argsz: int
    flags: int


GroupStatus._fields_ = [("argsz", _u32), ("flags", _u32)]


class DeviceInfo(Struct):
    """``struct vfio_device_info`` (``VFIO_DEVICE_GET_INFO``); flags are ``DEVICE_FLAGS_*``."""

    _c_name_ = "vfio_device_info"
    argsz: int
    flags: int
    num_regions: int
    num_irqs: int
    cap_offset: int
    pad: int


DeviceInfo._fields_ = [
    ("argsz", _u32),
    ("flags", _u32),
    ("num_regions", _u32),
    ("num_irqs", _u32),
    ("cap_offset", _u32),
    ("pad", _u32),
]


class RegionInfo(Struct):
    """``struct vfio_region_info`` (``VFIO_DEVICE_GET_REGION_INFO``)."""

    _c_name_ = "vfio_region_info"
    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int


RegionInfo._fields_ = [
    ("argsz", _u32),
    ("flags", _u32),
    ("index", _u32),
    ("cap_offset", _u32),
    ("size", _u64),
    ("offset", _u64),
]


class IrqInfo(Struct):
    """``struct vfio_irq_info`` (``VFIO_DEVICE_GET_IRQ_INFO``)."""

    _c_name_ = "vfio_irq_info"
    argsz: int
    flags: int
    index: int
    count: int


IrqInfo._fields_ = [("argsz", _u32), ("flags", _u32), ("index", _u32), ("count", _u32)]


class DeviceFeature(Struct):
    """``struct vfio_device_feature``: the 8-byte header before every feature payload."""

    _c_name_ = "vfio_device_feature"
    argsz: int
    flags: int


DeviceFeature._fields_ = [("argsz", _u32), ("flags", _u32)]


class FeatureMigration(Struct):
    """``struct vfio_device_feature_migration`` (GET): ``flags`` are ``fsm.MigrationFlags``."""

    _c_name_ = "vfio_device_feature_migration"
    flags: int


FeatureMigration._fields_ = [("flags", _u64)]


class FeatureMigState(Struct):
    """``struct vfio_device_feature_mig_state``: ``fsm.DeviceState`` value and the new data fd."""

    _c_name_ = "vfio_device_feature_mig_state"
    device_state: int
    data_fd: int


FeatureMigState._fields_ = [("device_state", _u32), ("data_fd", _s32)]


class FeatureMigDataSize(Struct):
    """``struct vfio_device_feature_mig_data_size`` (GET, any state)."""

    _c_name_ = "vfio_device_feature_mig_data_size"
    stop_copy_length: int


FeatureMigDataSize._fields_ = [("stop_copy_length", _u64)]


class FeatureDmaLoggingRange(Struct):
    """``struct vfio_device_feature_dma_logging_range``: one IOVA range to log."""

    _c_name_ = "vfio_device_feature_dma_logging_range"
    iova: int
    length: int


FeatureDmaLoggingRange._fields_ = [("iova", _u64), ("length", _u64)]


class FeatureDmaLoggingControl(Struct):
    """``struct vfio_device_feature_dma_logging_control`` (SET of DMA_LOGGING_START).

    ``ranges`` is a user pointer to ``num_ranges`` :class:`FeatureDmaLoggingRange`; build it
    with :meth:`start`, which keeps the array alive. The driver may rewrite ``page_size``.
    """

    _c_name_ = "vfio_device_feature_dma_logging_control"
    page_size: int
    num_ranges: int
    ranges: int

    @classmethod
    def start(cls, page_size: int, ranges: Sequence[tuple[int, int]]) -> Self:
        """A control block for ``(iova, length)`` ranges (the kernel takes 1..PAGE_SIZE/16)."""
        array = (FeatureDmaLoggingRange * len(ranges))(
            *(FeatureDmaLoggingRange(iova=iova, length=length) for iova, length in ranges)
        )
        control = cls(page_size=page_size, num_ranges=len(ranges), ranges=ctypes.addressof(array))
        control._refs = (array,)
        return control

    def range_list(self) -> list[tuple[int, int]]:
        """The ``(iova, length)`` ranges ``ranges`` points at (empty if it points nowhere)."""
        if not self.ranges or not self.num_ranges:
            return []
        array = (FeatureDmaLoggingRange * self.num_ranges).from_address(self.ranges)
        return [(r.iova, r.length) for r in array]


FeatureDmaLoggingControl._fields_ = [
    ("page_size", _u64),
    ("num_ranges", _u32),
    ("__reserved", _u32),
    ("ranges", _u64),
]


class FeatureDmaLoggingReport(Struct):
    """``struct vfio_device_feature_dma_logging_report`` (GET of DMA_LOGGING_REPORT).

    ``bitmap`` is a user pointer to u64 words, one bit per ``page_size`` of IOVA; the kernel
    only sets bits. :meth:`for_range` allocates it zeroed and keeps it alive.
    """

    _c_name_ = "vfio_device_feature_dma_logging_report"
    iova: int
    length: int
    page_size: int
    bitmap: int

    @classmethod
    def for_range(cls, iova: int, length: int, page_size: int) -> Self:
        pages = -(-length // page_size)
        words = (_u64 * max(1, -(-pages // 64)))()
        report = cls(iova=iova, length=length, page_size=page_size, bitmap=ctypes.addressof(words))
        report._refs = (words,)
        return report

    def dirty_pages(self) -> list[int]:
        """Indexes (from ``iova``, in ``page_size`` units) of the pages the report marked dirty."""
        if not self._refs or not self.bitmap:
            raise ValueError("this report has no bitmap of its own (build it with for_range)")
        pages = -(-self.length // self.page_size)
        words = (_u64 * max(1, -(-pages // 64))).from_address(self.bitmap)
        return [
            page
            for page in range(pages)
            if int(words[page // 64]) >> (page % 64) & 1  # bitmap[n/64] bit n%64
        ]


FeatureDmaLoggingReport._fields_ = [
    ("iova", _u64),
    ("length", _u64),
    ("page_size", _u64),
    ("bitmap", _u64),
]


class PrecopyInfo(Struct):
    """``struct vfio_precopy_info`` (``VFIO_MIG_GET_PRECOPY_INFO`` on a saving data fd).

    ``flags & PRECOPY_INFO_REINIT`` means new initial data only after the MIG_PRECOPY_INFOv2
    opt-in; without it old drivers echo whatever ``flags`` held, so send it zeroed.
    """

    _c_name_ = "vfio_precopy_info"
    argsz: int
    flags: int
    initial_bytes: int
    dirty_bytes: int


PrecopyInfo._fields_ = [
    ("argsz", _u32),
    ("flags", _u32),
    ("initial_bytes", _u64),
    ("dirty_bytes", _u64),
]


class DeviceBindIommufd(Struct):
    """``struct vfio_device_bind_iommufd`` as of 2025: 24 bytes (6.12: 16, no token).

    An ``argsz`` of 24 with ``flags`` 0 is accepted by 6.12 too (it reads only the first 16).
    """

    _c_name_ = "vfio_device_bind_iommufd"
    argsz: int
    flags: int
    iommufd: int
    out_devid: int
    token_uuid_ptr: int

    @classmethod
    def with_token(cls, iommufd: int, token: uuid.UUID) -> Self:
        """A bind request carrying a VF token (``BIND_FLAG_TOKEN``); the UUID is kept alive."""
        raw = (ctypes.c_uint8 * 16).from_buffer_copy(token.bytes)
        bind = cls.new(iommufd=iommufd, flags=BIND_FLAG_TOKEN, token_uuid_ptr=ctypes.addressof(raw))
        bind._refs = (raw,)
        return bind


DeviceBindIommufd._fields_ = [
    ("argsz", _u32),
    ("flags", _u32),
    ("iommufd", _s32),
    ("out_devid", _u32),
    ("token_uuid_ptr", _u64),
]


class DeviceAttachIommufdPt(Struct):
    """``struct vfio_device_attach_iommufd_pt``: 16 bytes with ``pasid`` (6.12: 12)."""

    _c_name_ = "vfio_device_attach_iommufd_pt"
    argsz: int
    flags: int
    pt_id: int
    pasid: int


DeviceAttachIommufdPt._fields_ = [
    ("argsz", _u32),
    ("flags", _u32),
    ("pt_id", _u32),
    ("pasid", _u32),
]


class DeviceDetachIommufdPt(Struct):
    """``struct vfio_device_detach_iommufd_pt``: 12 bytes with ``pasid`` (6.12: 8)."""

    _c_name_ = "vfio_device_detach_iommufd_pt"
    argsz: int
    flags: int
    pasid: int


DeviceDetachIommufdPt._fields_ = [("argsz", _u32), ("flags", _u32), ("pasid", _u32)]


class IommuIoasAlloc(Struct):
    """``struct iommu_ioas_alloc`` (``IOMMU_IOAS_ALLOC``)."""

    _c_name_ = "iommu_ioas_alloc"
    size: int
    flags: int
    out_ioas_id: int


IommuIoasAlloc._fields_ = [("size", _u32), ("flags", _u32), ("out_ioas_id", _u32)]


class IommuDestroy(Struct):
    """``struct iommu_destroy`` (``IOMMU_DESTROY``)."""

    _c_name_ = "iommu_destroy"
    size: int
    id: int


IommuDestroy._fields_ = [("size", _u32), ("id", _u32)]


# --- device features ---------------------------------------------------------------------------


class _ProbeOnly(enum.Enum):
    PROBE_ONLY = "probe only"


PROBE_ONLY: Final = _ProbeOnly.PROBE_ONLY

#: The payload of each feature for GET/SET: a :class:`Struct` type, None for a feature with no
#: payload (SET only), or :data:`PROBE_ONLY` for features vfmig may only PROBE (a GET of
#: DMA_BUF creates a dma-buf fd, low power and bus master change the device, the VF token is
#: the PF owner's business, ZPCI_ERROR's id is not settled upstream).
FEATURE_PAYLOAD: Final[dict[FeatureId, type[Struct] | _ProbeOnly | None]] = {
    FeatureId.PCI_VF_TOKEN: PROBE_ONLY,
    FeatureId.MIGRATION: FeatureMigration,
    FeatureId.MIG_DEVICE_STATE: FeatureMigState,
    FeatureId.LOW_POWER_ENTRY: PROBE_ONLY,
    FeatureId.LOW_POWER_ENTRY_WITH_WAKEUP: PROBE_ONLY,
    FeatureId.LOW_POWER_EXIT: PROBE_ONLY,
    FeatureId.DMA_LOGGING_START: FeatureDmaLoggingControl,
    FeatureId.DMA_LOGGING_STOP: None,
    FeatureId.DMA_LOGGING_REPORT: FeatureDmaLoggingReport,
    FeatureId.MIG_DATA_SIZE: FeatureMigDataSize,
    FeatureId.BUS_MASTER: PROBE_ONLY,
    FeatureId.DMA_BUF: PROBE_ONLY,
    FeatureId.MIG_PRECOPY_INFOv2: None,
    FeatureId.ZPCI_ERROR: PROBE_ONLY,
}

_P = TypeVar("_P", bound=Struct)

_OPS: Final = frozenset(
    {
        FEATURE_GET,
        FEATURE_SET,
        FEATURE_PROBE,
        FEATURE_PROBE | FEATURE_GET,
        FEATURE_PROBE | FEATURE_SET,
    }
)


@functools.cache
def _composite(payload: type[Struct]) -> type[Struct]:
    """``struct { struct vfio_device_feature hdr; <payload> payload; }``, one type per payload."""
    name = payload.__name__ + "Request"
    doc = f"``struct vfio_device_feature`` + {payload.__name__}."
    composite = cast("type[Struct]", type(name, (Struct,), {"__doc__": doc}))
    composite._fields_ = [("hdr", DeviceFeature), ("payload", payload)]
    return composite


@dataclass(frozen=True, slots=True)
class FeatureRequest(Generic[_P]):
    """A ready ``VFIO_DEVICE_FEATURE`` argument: ``fcntl.ioctl(fd, DeviceIoctl.FEATURE, r.buffer)``.

    ``payload`` is a live view into ``buffer``: read it after the ioctl for what the kernel
    wrote (the new ``data_fd`` of a SET of MIG_DEVICE_STATE, the flags of MIGRATION, ...).
    """

    feature: FeatureId
    flags: int
    buffer: Struct
    _source: Struct | None = None  # keeps buffers the payload points at alive

    @property
    def argsz(self) -> int:
        return ctypes.sizeof(self.buffer)

    @property
    def payload(self) -> _P:
        if isinstance(self.buffer, DeviceFeature):
            raise ValueError(f"{c_name(self.feature)} request carries no payload")
        value: _P = self.buffer.payload
        return value

    def __repr__(self) -> str:
        ops = "|".join(
            name
            for bit, name in ((FEATURE_PROBE, "PROBE"), (FEATURE_GET, "GET"), (FEATURE_SET, "SET"))
            if self.flags & bit
        )
        shown = "" if isinstance(self.buffer, DeviceFeature) else f", {self.buffer.payload!r}"
        return f"FeatureRequest({ops} {c_name(self.feature)}, argsz={self.argsz}{shown})"


@overload
def feature_request(feature: FeatureId, op: int, payload: None = None) -> FeatureRequest[Any]: ...
@overload
def feature_request(feature: FeatureId, op: int, payload: _P) -> FeatureRequest[_P]: ...
def feature_request(
    feature: FeatureId, op: int, payload: Struct | None = None
) -> FeatureRequest[Any]:
    """Build the ``VFIO_DEVICE_FEATURE`` argument for ``op`` (FEATURE_GET/SET/PROBE[|GET/SET]).

    ``argsz`` = 8 + payload size; ``flags`` = feature id | op. A PROBE carries no payload; a GET
    or SET carries exactly the feature's :data:`FEATURE_PAYLOAD` type (for a GET its contents
    are what the kernel overwrites). Misuse is a programming error: ``ValueError``/``TypeError``.
    """
    if op not in _OPS:
        raise ValueError(f"bad feature op {op:#x}: GET and SET are exclusive unless PROBE")
    expected = FEATURE_PAYLOAD[feature]
    if op & FEATURE_PROBE:
        if payload is not None:
            raise TypeError("a PROBE carries no payload")
    elif expected is PROBE_ONLY:
        raise ValueError(f"vfmig only probes {c_name(feature)}")
    elif expected is None:
        if payload is not None:
            raise TypeError(f"{c_name(feature)} takes no payload")
    elif type(payload) is not expected:
        raise TypeError(f"{c_name(feature)} takes a {expected.__name__}, not {payload!r}")
    flags = int(feature) | op
    if payload is None:
        return FeatureRequest(feature, flags, DeviceFeature.new(flags=flags))
    buffer = _composite(type(payload))()
    buffer.hdr.argsz = ctypes.sizeof(buffer)
    buffer.hdr.flags = flags
    buffer.payload = payload
    return FeatureRequest(feature, flags, buffer, payload)
