"""vfmig.device._uapi against the kernel's own headers, compiled with gcc (ADR 0007).

Two C programs are generated from what the Python module defines -- every struct (each
field's offset, size and signedness, and the struct size), every ioctl number, feature id and
constant, and the uAPI values of ``fsm.DeviceState``/``fsm.MigrationFlags`` -- so nothing is
hand-picked here:

* program A includes Linux 6.12's ``vfio.h`` and ``iommufd.h`` by explicit path (the system's
  ``/usr/include/linux/vfio.h`` may be older and lack PRE_COPY; the program refuses to compile
  unless ``VFIO_MIGRATION_PRE_COPY`` is defined) and checks every item 6.12 has;
* program B compiles :data:`UPSTREAM_TEXT`, the upstream definitions of the items the module
  lists in ``_uapi.SINCE`` as newer than 6.12, and checks those.

Items in ``SINCE`` must really be absent from 6.12, and every ``SINCE`` entry must be used.
"""

from __future__ import annotations

import ctypes
import enum
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.core import fsm
from vfmig.device import _uapi as uapi

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from pathlib import Path

#: Upstream header text for what Linux 6.12 lacks, quoted from (1) ``torvalds/linux``
#: ``include/uapi/linux/vfio.h`` at 02256acf1e81 ("vfio: uapi: fix comment typo"): the grown
#: bind/attach/detach structs (BIND token: Message-ID
#: 0-v2-470f044801ef+a887e-vfio_token_jgg@nvidia.com; PASID: ad744ed5dd8b) and DMA_BUF;
#: (2) d7140b5dde45 "vfio: Define uAPI for re-init initial bytes during the PRE_COPY phase"
#: (7.1), patch Message-ID 20260224082019.25772-2-yishaih@nvidia.com of the series
#: 20260224082019.25772-1-yishaih@nvidia.com -- the stored 02256acf1e81 text predates it;
#: (3) the posted s390 series defining VFIO_DEVICE_FEATURE_ZPCI_ERROR as 13 (in no tree yet).
UPSTREAM_TEXT = """
struct vfio_device_bind_iommufd {
	__u32		argsz;
	__u32		flags;
#define VFIO_DEVICE_BIND_FLAG_TOKEN (1 << 0)
	__s32		iommufd;
	__u32		out_devid;
	__aligned_u64	token_uuid_ptr;
};

struct vfio_device_attach_iommufd_pt {
	__u32	argsz;
	__u32	flags;
#define VFIO_DEVICE_ATTACH_PASID	(1 << 0)
	__u32	pt_id;
	__u32	pasid;
};

struct vfio_device_detach_iommufd_pt {
	__u32	argsz;
	__u32	flags;
#define VFIO_DEVICE_DETACH_PASID	(1 << 0)
	__u32	pasid;
};

#define VFIO_DEVICE_FEATURE_DMA_BUF 11

/* d7140b5dde45 */
#define VFIO_PRECOPY_INFO_REINIT (1 << 0) /* output - new initial data is present */
#define VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2  12

/* posted s390 zPCI error series (2026) */
#define VFIO_DEVICE_FEATURE_ZPCI_ERROR 13
"""

STRUCTS: list[type[uapi.Struct]] = [
    obj
    for obj in vars(uapi).values()
    if isinstance(obj, type) and issubclass(obj, uapi.Struct) and obj is not uapi.Struct
]


@dataclass(frozen=True, slots=True)
class Probe:
    """One number the C compiler must agree on: ``key`` is printed with the value of ``expr``."""

    key: str
    expr: str
    expected: int


def field_probes(struct: type[uapi.Struct], fields: Iterable[str]) -> Iterator[Probe]:
    c_struct = f"struct {struct._c_name_}"
    member = f"((({c_struct} *)0)->{{}})"
    for name in fields:
        descriptor = getattr(struct, name)
        ctype = dict(struct._fields_)[name]
        yield Probe(
            f"offsetof {c_struct}.{name}", f"offsetof({c_struct}, {name})", descriptor.offset
        )
        yield Probe(f"sizeof {c_struct}.{name}", f"sizeof{member.format(name)}", descriptor.size)
        signed = int(ctype(-1).value < 0)
        yield Probe(
            f"signed {c_struct}.{name}",
            f"((__typeof__{member.format(name)})-1 < 0)",
            signed,
        )


def newer_fields(struct: type[uapi.Struct]) -> list[str]:
    return [f for f in struct.field_names() if f"{struct._c_name_}.{f}" in uapi.SINCE]


def enum_items() -> Iterator[tuple[str, int]]:
    for family in uapi.C_PREFIX:
        for member in family:
            yield uapi.c_name(member), int(member)
    for python_name, kernel_name in uapi.CONSTANTS.items():
        yield kernel_name, getattr(uapi, python_name)
    for state in fsm.DeviceState:
        yield f"VFIO_DEVICE_STATE_{state.name}", int(state)
    yield "VFIO_DEVICE_STATE_NR", fsm.NUM_STATES
    for flag in fsm.MigrationFlags:
        assert flag.name is not None
        yield f"VFIO_MIGRATION_{flag.name}", int(flag)


def kernel_612_probes() -> list[Probe]:
    """Everything the module defines that Linux 6.12 has, as the 6.12 headers spell it."""
    probes: list[Probe] = []
    for struct in STRUCTS:
        newer = newer_fields(struct)
        old = [f for f in struct.field_names() if f not in newer]
        probes += field_probes(struct, old)
        # A struct that grew must have grown at its end: 6.12's size is where the new part starts.
        size = getattr(struct, newer[0]).offset if newer else ctypes.sizeof(struct)
        probes.append(
            Probe(f"sizeof struct {struct._c_name_}", f"sizeof(struct {struct._c_name_})", size)
        )
    probes += (Probe(f"value {n}", n, v) for n, v in enum_items() if n not in uapi.SINCE)
    # The host's <asm/ioctl.h>, against the layout the module chose from platform.machine().
    layout = uapi.IOC
    for c_field, value in (
        ("_IOC_NONE", layout.none),
        ("_IOC_READ", layout.read),
        ("_IOC_WRITE", layout.write),
        ("_IOC_SIZEBITS", layout.size_bits),
        ("_IOC_DIRBITS", layout.dir_bits),
        ("_IOC_DIRSHIFT", layout.dir_shift),
    ):
        probes.append(Probe(f"ioctl.h {c_field}", c_field, value))
    for c_dir, direction in (
        ("_IOC_READ", layout.read),
        ("_IOC_WRITE", layout.write),
        ("_IOC_READ|_IOC_WRITE", layout.read | layout.write),
    ):
        probes.append(
            Probe(
                f"ioctl.h _IOC({c_dir}, 'f', 1, 8)",
                f"_IOC({c_dir}, 'f', 1, 8)",
                uapi._IOC(direction, ord("f"), 1, 8),
            )
        )
    return probes


def upstream_probes() -> list[Probe]:
    """Everything newer than 6.12, as :data:`UPSTREAM_TEXT` spells it."""
    probes: list[Probe] = []
    for struct in STRUCTS:
        if newer_fields(struct):
            probes += field_probes(struct, struct.field_names())
            probes.append(
                Probe(
                    f"sizeof struct {struct._c_name_}",
                    f"sizeof(struct {struct._c_name_})",
                    ctypes.sizeof(struct),
                )
            )
    probes += (Probe(f"value {n}", n, v) for n, v in enum_items() if n in uapi.SINCE)
    return probes


def c_program(preamble: str, probes: Iterable[Probe], absent: Iterable[str] = ()) -> str:
    lines = [preamble, "int main(void) {"]
    lines += (f'    printf("%s=%lld\\n", "{p.key}", (long long)({p.expr}));' for p in probes)
    for macro in absent:
        lines += [
            f"#ifdef {macro}",
            f'    printf("defined {macro}=1\\n");',
            "#else",
            f'    printf("defined {macro}=0\\n");',
            "#endif",
        ]
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def compile_and_run(
    tmp_path_factory: pytest.TempPathFactory, prerequisite: Callable[[str], None]
) -> Callable[[str, str], dict[str, int]]:
    gcc = shutil.which("gcc")
    if gcc is None:
        prerequisite("gcc is not installed (apt-get install gcc)")
    assert gcc is not None
    work = tmp_path_factory.mktemp("uapi")

    def run(name: str, source: str) -> dict[str, int]:
        src = work / f"{name}.c"
        exe = work / name
        src.write_text(source)
        built = subprocess.run(
            [gcc, "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)],
            capture_output=True,
            text=True,
        )
        assert built.returncode == 0, f"gcc failed on {src}:\n{built.stderr}"
        out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
        return {key: int(value) for key, value in (line.split("=") for line in out.splitlines())}

    return run


def mismatches(got: dict[str, int], expected: dict[str, int]) -> dict[str, tuple[int | None, ...]]:
    """``{key: (C value, Python value)}`` wherever they differ (None: missing on that side)."""
    keys = got.keys() | expected.keys()
    return {k: (got.get(k), expected.get(k)) for k in sorted(keys) if got.get(k) != expected.get(k)}


def header(kernel_source: Path, name: str) -> Path:
    path = kernel_source / "include" / "uapi" / "linux" / name
    assert path.is_file(), f"{path} missing from the kernel source cache"
    return path


def preamble_612(kernel_source: Path) -> str:
    vfio_h = header(kernel_source, "vfio.h")
    iommufd_h = header(kernel_source, "iommufd.h")
    return "\n".join(
        [
            "#include <stddef.h>",
            "#include <stdio.h>",
            # Raw source headers: headers_install would strip this kernel-only annotation.
            "#define __user",
            # By path, so the 6.12 text wins over the system's linux/vfio.h (6.1 on Debian 12).
            f'#include "{vfio_h}"',
            f'#include "{iommufd_h}"',
            "#ifndef VFIO_MIGRATION_PRE_COPY",
            '#error "this vfio.h predates PRE_COPY: not the 6.12 header"',
            "#endif",
        ]
    )


def test_against_linux_612_headers(
    kernel_source: Path, compile_and_run: Callable[[str, str], dict[str, int]]
) -> None:
    probes = kernel_612_probes()
    macros = sorted(k for k in uapi.SINCE if "." not in k)
    got = compile_and_run("uapi612", c_program(preamble_612(kernel_source), probes, macros))
    expected = {p.key: p.expected for p in probes} | {f"defined {m}": 0 for m in macros}
    assert mismatches(got, expected) == {}


def test_every_published_struct_is_checked() -> None:
    published = [getattr(uapi, n) for n in uapi.__all__]
    assert set(STRUCTS) == {
        s for s in published if isinstance(s, type) and issubclass(s, uapi.Struct)
    } - {uapi.Struct}
    assert all(s._c_name_ for s in STRUCTS)


def test_newer_items_against_upstream_text(
    compile_and_run: Callable[[str, str], dict[str, int]],
) -> None:
    probes = upstream_probes()
    preamble = "#include <stddef.h>\n#include <stdio.h>\n#include <linux/types.h>\n" + UPSTREAM_TEXT
    got = compile_and_run("upstream", c_program(preamble, probes))
    assert mismatches(got, {p.key: p.expected for p in probes}) == {}


def test_since_table_is_used_and_matches_the_upstream_text() -> None:
    used = {n for n, _ in enum_items() if n in uapi.SINCE}
    used |= {f"{s._c_name_}.{f}" for s in STRUCTS for f in newer_fields(s)}
    assert used == set(uapi.SINCE)
    quoted = set(re.findall(r"#define (\w+)", UPSTREAM_TEXT))
    quoted |= {
        f"{struct}.{field}"
        for struct, body in re.findall(r"struct (\w+) \{(.*?)\};", UPSTREAM_TEXT, re.S)
        for field in re.findall(r"^\t__\w+\t+(\w+);", body, re.M)
    }
    assert set(uapi.SINCE) <= quoted


def test_every_612_feature_id_is_known(kernel_source: Path) -> None:
    text = header(kernel_source, "vfio.h").read_text()
    ops = {"MASK", "GET", "SET", "PROBE", "CLEAR_MASTER", "SET_MASTER"}
    ids = {
        name: int(value)
        for name, value in re.findall(r"#define VFIO_DEVICE_FEATURE_(\w+)\s+\(?(\d+)\)?", text)
        if name not in ops
    }
    assert ids == {m.name: int(m) for m in uapi.FeatureId if uapi.c_name(m) not in uapi.SINCE}


def test_u64_fields_are_naturally_aligned() -> None:
    # ctypes aligns c_uint64 to 4 on i386 where __aligned_u64 is 8: harmless only if every u64
    # already sits on a multiple of 8 and the struct size is one.
    for struct in STRUCTS:
        u64 = [f for f, t in struct._fields_ if t is ctypes.c_uint64]
        assert all(getattr(struct, f).offset % 8 == 0 for f in u64), struct
        if u64:
            assert ctypes.sizeof(struct) % 8 == 0, struct


def test_field_annotations_match_fields() -> None:
    for struct in STRUCTS:
        annotated = set(struct.__annotations__) - {"_c_name_"}
        assert annotated == {f for f in struct.field_names() if not f.startswith("__")}, struct


def test_no_v1_migration_or_nesting_names() -> None:
    names = [n for n, _ in enum_items()] + dir(uapi) + list(uapi.CONSTANTS)
    bad = [n for n in names if re.search(r"V1|NESTING|DEPRECATED|MIGRATION_INFO", n)]
    assert bad == []


def test_docstring_lists_every_published_name() -> None:
    assert uapi.__doc__ is not None
    missing = [n for n in uapi.__all__ if f"`{n}`" not in uapi.__doc__]
    assert missing == []


# --- ioctl encoding ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("machine", "feature", "getflags"),
    [
        # VFIO_DEVICE_FEATURE = _IO(';', 117); FS_IOC_GETFLAGS = _IOR('f', 1, long), 64-bit long.
        ("x86_64", 0x3B75, 0x80086601),
        ("aarch64", 0x3B75, 0x80086601),
        ("riscv64", 0x3B75, 0x80086601),
        ("s390x", 0x3B75, 0x80086601),
        ("ppc64le", 0x20003B75, 0x40086601),
        ("mips64", 0x20003B75, 0x40086601),
        ("sparc64", 0x20003B75, 0x40086601),
        ("alpha", 0x20003B75, 0x40086601),
        ("parisc64", 0x3B75, 0x40086601),
    ],
)
def test_ioc_per_architecture(machine: str, feature: int, getflags: int) -> None:
    layout = uapi.ioc_layout(machine)
    assert uapi._IO(ord(";"), 117, layout) == feature
    assert uapi._IOC(layout.read, ord("f"), 1, 8, layout) == getflags


def test_ioc_rejects_out_of_range_fields() -> None:
    with pytest.raises(ValueError, match="out of range"):
        uapi._IOC(0, ord(";"), 256, 0)
    with pytest.raises(ValueError, match="out of range"):
        uapi._IOC(0, ord(";"), 1, 1 << uapi.IOC.size_bits)


def test_ioctl_numbers_collide_across_families_only() -> None:
    # One enum per fd family: within a family numbers are unique, across families they are not.
    for family in uapi.C_PREFIX:
        values = [int(m) for m in family]
        assert len(values) == len(set(values)), family
    assert uapi.ioctl_name(uapi.DeviceIoctl, int(uapi.DeviceIoctl.FEATURE)) == "VFIO_DEVICE_FEATURE"
    assert uapi.ioctl_name(uapi.DataFdIoctl, 0x3B79) == "VFIO_MIG_GET_PRECOPY_INFO"
    assert uapi.ioctl_name(uapi.IommufdIoctl, int(uapi.IommufdIoctl.DESTROY)) == "IOMMU_DESTROY"
    assert uapi.ioctl_name(uapi.ContainerIoctl, int(uapi.DeviceIoctl.FEATURE)) == (
        f"VFIO_?{int(uapi.DeviceIoctl.FEATURE):#x}"
    )


# --- structs and feature requests ------------------------------------------------------------


def test_new_sets_argsz_or_size() -> None:
    assert uapi.PrecopyInfo.new().argsz == 24
    assert uapi.DeviceBindIommufd.new(iommufd=3).asdict() == {
        "argsz": 24,
        "flags": 0,
        "iommufd": 3,
        "out_devid": 0,
        "token_uuid_ptr": 0,
    }
    assert uapi.IommuDestroy.new(id=7).size == 8
    with pytest.raises(TypeError, match="no argsz"):
        uapi.FeatureMigState.new()


def test_repr_hides_padding_and_reserved() -> None:
    assert repr(uapi.DeviceInfo.new(flags=3)) == (
        "DeviceInfo(argsz=24, flags=3, num_regions=0, num_irqs=0, cap_offset=0)"
    )
    control = uapi.FeatureDmaLoggingControl(page_size=4096, num_ranges=0)
    assert repr(control) == "FeatureDmaLoggingControl(page_size=4096, num_ranges=0, ranges=0)"


def kernel_writes(request: uapi.FeatureRequest[Any], data: bytes) -> None:
    """What the kernel's copy_to_user() does to the argument (payload part only)."""
    ctypes.memmove(ctypes.addressof(request.buffer) + 8, data, len(data))


def test_mig_state_set_reads_back_the_data_fd() -> None:
    payload = uapi.FeatureMigState(device_state=fsm.DeviceState.STOP_COPY, data_fd=-1)
    request = uapi.feature_request(uapi.FeatureId.MIG_DEVICE_STATE, uapi.FEATURE_SET, payload)
    assert request.argsz == 16
    assert request.flags == int(uapi.FeatureId.MIG_DEVICE_STATE) | uapi.FEATURE_SET
    assert bytes(request.buffer)[:8] == (16).to_bytes(4, "little") + request.flags.to_bytes(
        4, "little"
    )
    kernel_writes(request, (3).to_bytes(4, "little") + (42).to_bytes(4, "little", signed=True))
    assert request.payload.data_fd == 42
    assert payload.data_fd == -1  # the caller's struct was copied, not aliased


@pytest.mark.parametrize(
    ("feature", "payload_type"),
    [
        (f, t)
        for f, t in uapi.FEATURE_PAYLOAD.items()
        if isinstance(t, type) and issubclass(t, uapi.Struct)
    ],
)
def test_every_payload_feature_builds_header_plus_payload(
    feature: uapi.FeatureId, payload_type: type[uapi.Struct]
) -> None:
    request = uapi.feature_request(feature, uapi.FEATURE_GET, payload_type())
    assert request.argsz == 8 + ctypes.sizeof(payload_type)
    assert type(request.buffer).payload.offset == 8
    assert isinstance(request.payload, payload_type)


def test_probe_and_payloadless_requests() -> None:
    probe = uapi.feature_request(uapi.FeatureId.ZPCI_ERROR, uapi.FEATURE_PROBE | uapi.FEATURE_GET)
    assert (probe.argsz, probe.flags) == (8, 13 | uapi.FEATURE_PROBE | uapi.FEATURE_GET)
    stop = uapi.feature_request(uapi.FeatureId.DMA_LOGGING_STOP, uapi.FEATURE_SET)
    assert (stop.argsz, stop.flags) == (8, 7 | uapi.FEATURE_SET)
    assert repr(stop) == "FeatureRequest(SET VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, argsz=8)"
    with pytest.raises(ValueError, match="no payload"):
        _ = stop.payload


@pytest.mark.parametrize(
    ("feature", "op", "payload", "error"),
    [
        (uapi.FeatureId.MIGRATION, uapi.FEATURE_GET | uapi.FEATURE_SET, None, ValueError),
        (uapi.FeatureId.MIGRATION, 0, None, ValueError),
        (uapi.FeatureId.MIGRATION, uapi.FEATURE_PROBE, uapi.FeatureMigration(), TypeError),
        (uapi.FeatureId.MIGRATION, uapi.FEATURE_GET, uapi.FeatureMigDataSize(), TypeError),
        (uapi.FeatureId.MIGRATION, uapi.FEATURE_GET, None, TypeError),
        (uapi.FeatureId.DMA_LOGGING_STOP, uapi.FEATURE_SET, uapi.FeatureMigration(), TypeError),
        (uapi.FeatureId.DMA_BUF, uapi.FEATURE_GET, None, ValueError),
    ],
)
def test_feature_request_misuse(
    feature: uapi.FeatureId, op: int, payload: uapi.Struct | None, error: type[Exception]
) -> None:
    with pytest.raises(error):
        uapi.feature_request(feature, op, payload)


def test_dma_logging_start_carries_its_ranges() -> None:
    ranges = [(0, 1 << 20), (1 << 30, 1 << 21), (1 << 40, 4096)]
    control = uapi.FeatureDmaLoggingControl.start(4096, ranges)
    request = uapi.feature_request(uapi.FeatureId.DMA_LOGGING_START, uapi.FEATURE_SET, control)
    del control  # the request keeps the range array alive
    assert request.argsz == 8 + 24
    assert request.payload.num_ranges == 3
    assert request.payload.range_list() == ranges
    assert uapi.FeatureDmaLoggingControl().range_list() == []


def test_dma_logging_report_bitmap() -> None:
    report = uapi.FeatureDmaLoggingReport.for_range(0x10000, 130 * 4096, 4096)
    words = (ctypes.c_uint64 * 3).from_address(report.bitmap)
    assert list(words) == [0, 0, 0]
    words[0] = 1 << 5  # what the kernel sets for pages 5, 64 and 129
    words[1] = 1
    words[2] = 1 << 1
    assert report.dirty_pages() == [5, 64, 129]
    with pytest.raises(ValueError, match="no bitmap"):
        uapi.FeatureDmaLoggingReport(length=4096, page_size=4096).dirty_pages()


def test_bind_with_token_points_at_the_uuid() -> None:
    token = uuid.UUID("bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3")
    bind = uapi.DeviceBindIommufd.with_token(5, token)
    assert (bind.argsz, bind.flags, bind.iommufd) == (24, uapi.BIND_FLAG_TOKEN, 5)
    assert ctypes.string_at(bind.token_uuid_ptr, 16) == token.bytes


def test_c_names_follow_the_kernel() -> None:
    assert (
        uapi.c_name(uapi.FeatureId.MIG_PRECOPY_INFOv2) == "VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2"
    )
    assert uapi.c_name(uapi.GroupIoctl.GET_DEVICE_FD) == "VFIO_GROUP_GET_DEVICE_FD"
    assert isinstance(uapi.FeatureId.MIGRATION, enum.IntEnum)
