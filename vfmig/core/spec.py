"""Device specs: ``KIND:NAME[,key=value]...[@HOST:PORT]``, parsed, validated and rendered back.

Theory of operation
-------------------
A spec names one device: its *kind* (``vfio`` or ``sim``), its *name* (a PCI address, an
mdev UUID, a sysfs path, or a simulated device's name), options as ``key=value`` pairs in
the order given, and optionally the agent that owns it (``@HOST:PORT``; IPv6 hosts in
brackets, ``@[::1]:7001``). Parsing is two passes over the text after ``KIND:``:

1. A scan that knows where values start (the name, and after the first ``=`` of each
   option). Only there does a quote (``'`` or ``"``) open a quoted value, which runs to
   the matching quote; a doubled quote inside stands for one (``'it''s'``). Outside quotes
   the scan records every ``,`` and ``@``. The **last** unquoted ``@`` separates the agent
   address, so quoted values may hold ``,`` ``=`` ``@`` and names may hold ``@``.
2. A split of the text before that ``@`` at the recorded commas into the name and the
   options, each value unquoted.

Then the options are checked for the kind (:func:`sim_options`, :func:`vfio_options`),
which also turns them into typed records the backends use. Every failure is one
:class:`~vfmig.core.errors.SpecError` whose message names the offending part.

``str(spec)`` renders the canonical form: values quoted only when they must be, ``'``
preferred, IPv6 hosts bracketed. It parses back to an equal spec (a property test checks
this), so specs can be stored in journals and shown to people as text.

Pure: stdlib only.
"""

from __future__ import annotations

import errno as _errno
import ipaddress
import itertools
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, TypeVar

from vfmig.core import fsm
from vfmig.core.errors import SpecError
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.core.units import SIZE_EXAMPLES, TiB, format_size, parse_duration, parse_rate, parse_size

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

KINDS: Final = ("vfio", "sim")

GRAMMAR: Final = "KIND:NAME[,key=value]...[@HOST:PORT]"
_HINT: Final = f"a device spec is {GRAMMAR}, e.g. sim:demo,size=64MiB or vfio:0000:3b:00.1"

_QUOTES: Final = "'\""
#: A value that needs no quotes: printable, no whitespace, none of , = @ ' ".
_BARE: Final = re.compile(r"[^\s,=@'\"]+")
_KEY: Final = re.compile(r"[a-z][a-z0-9-]*")
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True, slots=True)
class Options:
    """The ``key=value`` options of a spec, in the order given; keys are unique."""

    items: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        keys = [key for key, _ in self.items]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate option keys in {keys}")

    def get(self, key: str, default: str | None = None) -> str | None:
        for k, value in self.items:
            if k == key:
                return value
        return default

    def keys(self) -> tuple[str, ...]:
        return tuple(key for key, _ in self.items)

    def __contains__(self, key: object) -> bool:
        return any(k == key for k, _ in self.items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One parsed device spec. ``host``/``port`` are set together, for a remote agent's device."""

    kind: str
    name: str
    options: Options = field(default_factory=Options)
    host: str | None = None
    port: int | None = None

    def option(self, key: str) -> str | None:
        """The value of option ``key``, or None if the spec does not give it."""
        return self.options.get(key)

    @property
    def remote(self) -> bool:
        """Whether the device belongs to an agent (``@HOST:PORT``) rather than this host."""
        return self.host is not None

    @property
    def address(self) -> str | None:
        """``HOST:PORT`` of the owning agent (IPv6 bracketed), or None for a local device."""
        if self.host is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        text = f"{self.kind}:{_render(self.name)}"
        for key, value in self.options:
            text += f",{key}={_render(value)}"
        if self.address is not None:
            text += f"@{self.address}"
        return text


def _render(value: str) -> str:
    if _BARE.fullmatch(value) and value.isprintable():
        return value
    quote = "'" if "'" not in value or '"' in value else '"'
    return quote + value.replace(quote, quote * 2) + quote


# --- parsing -------------------------------------------------------------------------------


def parse_spec(text: str) -> DeviceSpec:
    """Parse and validate ``text``; raise :class:`SpecError` naming the offending part."""
    spec = _parse_syntax(text)
    _VALIDATORS[spec.kind](spec)
    return spec


def _error(message: str) -> SpecError:
    return SpecError(message, hint=_HINT)


def _parse_syntax(text: str) -> DeviceSpec:
    kind, sep, rest = text.partition(":")
    if not sep:
        raise _error(f"{text!r} is not a device spec: no ':' after the kind")
    if kind not in KINDS:
        if not kind:
            raise _error(f"{text!r}: the device kind before ':' is missing (vfio or sim)")
        raise _error(f"unknown device kind {kind!r} (expected vfio or sim)")
    commas, ats = _scan(rest)
    host: str | None = None
    port: int | None = None
    if ats:
        host, port = _parse_address(rest[ats[-1] + 1 :])
        rest = rest[: ats[-1]]
        commas = [c for c in commas if c < ats[-1]]
    bounds = [-1, *commas, len(rest)]
    parts = [rest[a + 1 : b] for a, b in itertools.pairwise(bounds)]
    name = _value(parts[0], parts[0])
    if not name:
        raise _error(f"{text!r}: the device name is empty")
    if parts[0][0] not in _QUOTES and "=" in parts[0]:
        raise _error(f"{parts[0]!r} is an option where the device name goes ({GRAMMAR})")
    items: list[tuple[str, str]] = []
    for part in parts[1:]:
        key, eq, raw = part.partition("=")
        if not eq:
            if not part:
                raise _error(f"{text!r}: empty option (two commas, or a trailing comma)")
            raise _error(f"option {part!r} has no value (expected key=value)")
        if not _KEY.fullmatch(key):
            raise _error(f"option {part!r}: {key!r} is not an option name")
        if any(key == k for k, _ in items):
            raise _error(f"duplicate option {key!r} (give each option once)")
        items.append((key, _value(raw, part)))
    return DeviceSpec(kind, name, Options(tuple(items)), host, port)


def _scan(rest: str) -> tuple[list[int], list[int]]:
    """Positions of the unquoted commas and ``@`` in ``rest``; checks the quoting."""
    commas: list[int] = []
    ats: list[int] = []
    value_start = True  # the name starts right after "KIND:"
    in_key = False
    i = 0
    start = 0  # where the current part began, for messages
    while i < len(rest):
        c = rest[i]
        if value_start and c in _QUOTES:
            end = _closing_quote(rest, i)
            if end is None:
                raise _error(f"unbalanced {c} in {rest[start:]!r}")
            i = end + 1
            if i < len(rest) and rest[i] not in ",@":
                raise _error(f"unexpected {rest[i:]!r} after the quoted value in {rest[start:]!r}")
            value_start = False
            continue
        value_start = False
        if c == ",":
            commas.append(i)
            in_key = True
            start = i + 1
        elif c == "@":
            ats.append(i)
        elif c in _QUOTES:
            part = rest[start:].split(",", 1)[0]
            raise _error(f"stray {c} in {part!r}: quote the whole value")
        elif c == "=" and in_key:
            in_key = False
            value_start = True
        i += 1
    return commas, ats


def _closing_quote(text: str, opening: int) -> int | None:
    quote = text[opening]
    i = opening + 1
    while True:
        i = text.find(quote, i)
        if i < 0:
            return None
        if text[i + 1 : i + 2] != quote:
            return i
        i += 2


def _value(raw: str, part: str) -> str:
    if raw and raw[0] in _QUOTES:
        quote = raw[0]
        return raw[1:-1].replace(quote * 2, quote)
    if not raw.isprintable() or any(c.isspace() for c in raw):
        raise _error(f"{part!r} holds whitespace or control characters: quote the value")
    return raw


def split_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ValueError otherwise."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_address(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise _error(f"agent address {text!r} is not [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _error(f"agent address {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise _error(
                f"agent address {text!r} has no port (HOST:PORT follows the last '@'; "
                "quote values that hold '@')"
            )
        if ":" in host:
            raise _error(f"agent address {text!r}: put an IPv6 host in brackets, e.g. [::1]:7001")
        if not _HOSTNAME.fullmatch(host):
            raise _error(f"agent address {text!r}: {host!r} is not a host name or address")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _error(f"agent address {text!r}: port {port_text!r} is not a number 1-65535")
    return host, int(port_text)


# --- per-kind options ----------------------------------------------------------------------

ContentKind = Literal["realistic", "random", "zero"]
CONTENT_KINDS: Final[tuple[ContentKind, ...]] = ("realistic", "random", "zero")
Checksum = Literal["crc32", "none"]
CHECKSUMS: Final[tuple[Checksum, ...]] = ("crc32", "none")

#: Spellings of the migration flags in ``flags=``, in uAPI bit order.
FLAG_NAMES: Final = {
    "stop-copy": MigrationFlags.STOP_COPY,
    "p2p": MigrationFlags.P2P,
    "pre-copy": MigrationFlags.PRE_COPY,
}
ALL_FLAGS: Final = MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY

#: Largest simulated state: its dirty bookkeeping takes 1/1024 of it once pages are dirtied.
MAX_SIM_SIZE: Final = TiB


class ArcFailure(NamedTuple):
    """``fail=FROM>TO:ERRNO``: that arc fails with ``errno``, the device stays in ``src``."""

    src: DeviceState
    dst: DeviceState
    errno: int


class StreamFault(NamedTuple):
    """``read-error=``/``write-error=OFFSET:ERRNO``: the data fd fails at that stream offset."""

    offset: int
    errno: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SimOptions:
    """The typed options of a ``sim:`` spec (see docs/device-spec.md for each one)."""

    size: int | None = None
    flags: MigrationFlags = ALL_FLAGS
    image: str | None = None
    dump: str | None = None
    state_dir: str | None = None
    dirty_rate: int = 0
    seed: int | None = None
    content: ContentKind = "realistic"
    checksum: Checksum = "crc32"
    read_delay: float = 0.0
    fail: tuple[ArcFailure, ...] = ()
    error: frozenset[tuple[DeviceState, DeviceState]] = frozenset()
    hang: frozenset[tuple[DeviceState, DeviceState]] = frozenset()
    read_error: StreamFault | None = None
    write_error: StreamFault | None = None
    truncate: int | None = None
    corrupt: int | None = None

    def fail_errno(self, src: DeviceState, dst: DeviceState) -> int | None:
        for failure in self.fail:
            if (failure.src, failure.dst) == (src, dst):
                return failure.errno
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class VfioOptions:
    """The typed options of a ``vfio:`` spec."""

    vf_token: uuid.UUID | None = None
    iommu: Literal["cdev", "group"] | None = None


def sim_options(spec: DeviceSpec) -> SimOptions:
    """Check a ``sim:`` spec's name and options; SpecError names the first bad one."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*", spec.name):
        raise _error(
            f"sim name {spec.name!r}: use letters, digits and _ . : - "
            "(it names a directory of the simulated debugfs)"
        )
    fields: dict[str, Any] = {}
    for key, value in spec.options:
        if key not in _SIM_PARSERS:
            raise _error(
                f"unknown option {key!r} for sim (expected one of: {', '.join(_SIM_PARSERS)})"
            )
        try:
            fields[key.replace("-", "_")] = _SIM_PARSERS[key](value)
        except ValueError as exc:
            raise _error(f"{key}={exc}") from None
    options = SimOptions(**fields)
    arcs = _arcs(options.flags)
    seen: dict[tuple[DeviceState, DeviceState], str] = {}
    faults = [("fail", (f.src, f.dst)) for f in options.fail]
    faults += [("error", arc) for arc in sorted(options.error)]
    faults += [("hang", arc) for arc in sorted(options.hang)]
    for key, (src, dst) in faults:
        if (src, dst) not in arcs:
            raise _error(
                f"{key}={spec.option(key)!r}: {src.name}>{dst.name} is not a single arc "
                f"of a device with flags {_flag_text(options.flags)} (arcs from {src.name}: "
                f"{', '.join(sorted(d.name for s, d in arcs if s is src)) or 'none'})"
            )
        if (src, dst) in seen:
            raise _error(f"arc {src.name}>{dst.name} is given twice ({seen[src, dst]}= and {key}=)")
        seen[src, dst] = key
    return options


def vfio_options(spec: DeviceSpec) -> VfioOptions:
    """Check a ``vfio:`` spec's options (``vf-token=UUID``, ``iommu=cdev|group``)."""
    token: uuid.UUID | None = None
    iommu: Literal["cdev", "group"] | None = None
    for key, value in spec.options:
        if key == "vf-token":
            try:
                token = uuid.UUID(value)
            except ValueError:
                raise _error(f"vf-token={value!r} is not a UUID") from None
        elif key == "iommu":
            if value == "cdev":
                iommu = "cdev"
            elif value == "group":
                iommu = "group"
            else:
                raise _error(f"iommu={value!r}: expected cdev or group")
        else:
            raise _error(f"unknown option {key!r} for vfio (expected one of: vf-token, iommu)")
    return VfioOptions(vf_token=token, iommu=iommu)


_VALIDATORS: Final[dict[str, Callable[[DeviceSpec], object]]] = {
    "sim": sim_options,
    "vfio": vfio_options,
}


def _size(text: str) -> int:
    size = parse_size(text)
    if not 1 <= size <= MAX_SIM_SIZE:
        raise ValueError(f"{text!r} is out of range (1 byte to {format_size(MAX_SIM_SIZE)})")
    return size


def _offset(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a byte offset ({SIZE_EXAMPLES})") from None


def _flags(text: str) -> MigrationFlags:
    flags = MigrationFlags(0)
    for name in text.split("+"):
        flag = FLAG_NAMES.get(name)
        if flag is None:
            raise ValueError(
                f"{text!r}: unknown flag {name!r} (expected {', '.join(FLAG_NAMES)}, joined by '+')"
            )
        if flag in flags:
            raise ValueError(f"{text!r}: {name!r} is given twice")
        flags |= flag
    if MigrationFlags.STOP_COPY not in flags:
        raise ValueError(f"{text!r} lacks stop-copy, which every migratable device has")
    return flags


def _flag_text(flags: MigrationFlags) -> str:
    return "+".join(name for name, flag in FLAG_NAMES.items() if flag in flags)


def _path(text: str) -> str:
    if not text:
        raise ValueError("'' is not a path")
    return text


def _seed(text: str) -> int:
    try:
        seed = int(text, 0)
    except ValueError:
        raise ValueError(f"{text!r} is not a seed (an integer, e.g. 7 or 0x2a)") from None
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"{text!r} is out of range (0 to 2**64-1)")
    return seed


_Choice = TypeVar("_Choice", bound=str)


def _one_of(choices: tuple[_Choice, ...], what: str) -> Callable[[str], _Choice]:
    def parse(text: str) -> _Choice:
        for choice in choices:
            if text == choice:
                return choice
        raise ValueError(f"{text!r} is not {what} (expected {', '.join(choices)})")

    return parse


def parse_state(text: str) -> DeviceState:
    """A migration state by uAPI name, case-insensitive, ``-`` for ``_`` (``stop-copy``)."""
    try:
        state = DeviceState[text.strip().upper().replace("-", "_")]
    except KeyError:
        raise ValueError(
            f"{text!r} is not a migration state (expected {', '.join(s.name for s in DeviceState)})"
        ) from None
    return state


def parse_errno(text: str) -> int:
    """An errno by name (``EIO``) or number (``5``)."""
    if text.isdigit():
        code = int(text)
        if code in _errno.errorcode:
            return code
    elif text.isupper() and isinstance(getattr(_errno, text, None), int):
        code = getattr(_errno, text)
        assert isinstance(code, int)
        return code
    raise ValueError(f"{text!r} is not an errno (a name such as EIO or ENOMEM, or its number)")


def _arc(text: str) -> tuple[DeviceState, DeviceState]:
    src, sep, dst = text.partition(">")
    if not sep:
        raise ValueError(f"{text!r} is not an arc (expected FROM>TO, e.g. RUNNING>PRE_COPY)")
    return parse_state(src), parse_state(dst)


def _arc_set(text: str) -> frozenset[tuple[DeviceState, DeviceState]]:
    arcs = [_arc(item) for item in text.split("+")]
    if len(set(arcs)) != len(arcs):
        raise ValueError(f"{text!r} names an arc twice")
    return frozenset(arcs)


def _failure_list(text: str) -> tuple[ArcFailure, ...]:
    failures = []
    for item in text.split("+"):
        arc, sep, code = item.rpartition(":")
        if not sep:
            raise ValueError(f"{item!r} is not FROM>TO:ERRNO (e.g. RUNNING>PRE_COPY:EIO)")
        src, dst = _arc(arc)
        failures.append(ArcFailure(src, dst, parse_errno(code)))
    return tuple(failures)


def _stream_fault(text: str) -> StreamFault:
    offset, sep, code = text.rpartition(":")
    if not sep:
        raise ValueError(f"{text!r} is not OFFSET:ERRNO (e.g. 1MiB:EIO)")
    return StreamFault(_offset(offset), parse_errno(code))


_SIM_PARSERS: Final[dict[str, Callable[[str], object]]] = {
    "size": _size,
    "flags": _flags,
    "image": _path,
    "dump": _path,
    "state-dir": _path,
    "dirty-rate": parse_rate,
    "seed": _seed,
    "content": _one_of(CONTENT_KINDS, "a content kind"),
    "checksum": _one_of(CHECKSUMS, "a stream checksum"),
    "read-delay": parse_duration,
    "fail": _failure_list,
    "error": _arc_set,
    "hang": _arc_set,
    "read-error": _stream_fault,
    "write-error": _stream_fault,
    "truncate": _offset,
    "corrupt": _offset,
}


def _arcs(flags: MigrationFlags) -> frozenset[tuple[DeviceState, DeviceState]]:
    """Every single arc a device with ``flags`` can take (for any request)."""
    arcs = set()
    for cur in DeviceState:
        for new in DeviceState:
            if cur != new:
                step = fsm.next_state(cur, new, flags)
                if step is not None:
                    arcs.add((cur, step))
    return frozenset(arcs)
