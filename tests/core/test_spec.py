"""The device spec grammar: parsing, per-kind validation, canonical rendering, round trips."""

from __future__ import annotations

import errno
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfmig.core.errors import ExitStatus, SpecError
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.core.spec import (
    ArcFailure,
    DeviceSpec,
    Options,
    StreamFault,
    parse_errno,
    parse_spec,
    parse_state,
    sim_options,
    vfio_options,
)
from vfmig.core.units import KiB, MiB

S = DeviceState
F = MigrationFlags


def test_minimal_sim() -> None:
    spec = parse_spec("sim:demo")
    assert spec == DeviceSpec("sim", "demo")
    assert not spec.remote
    assert spec.address is None
    assert str(spec) == "sim:demo"


def test_options_keep_order_and_are_reachable() -> None:
    spec = parse_spec("sim:x,size=4MiB,flags=stop-copy+p2p,seed=7")
    assert spec.options.keys() == ("size", "flags", "seed")
    assert list(spec.options) == [("size", "4MiB"), ("flags", "stop-copy+p2p"), ("seed", "7")]
    assert spec.option("size") == "4MiB"
    assert spec.options.get("seed") == "7"
    assert spec.option("image") is None
    assert spec.options.get("image", "none") == "none"
    assert "flags" in spec.options
    assert "dump" not in spec.options
    assert len(spec.options) == 3


def test_options_refuse_duplicate_keys_when_built_directly() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Options((("size", "1"), ("size", "2")))


def test_spec_is_immutable_and_hashable() -> None:
    spec = parse_spec("sim:x,size=1k")
    with pytest.raises(AttributeError):
        spec.name = "y"  # type: ignore[misc]
    assert hash(spec) == hash(parse_spec("sim:x,size=1k"))


def test_vfio_pci_address_keeps_its_colons() -> None:
    spec = parse_spec("vfio:0000:3b:00.1")
    assert (spec.kind, spec.name) == ("vfio", "0000:3b:00.1")


def test_vfio_nonexistent_parses() -> None:
    assert parse_spec("vfio:nonexistent").name == "nonexistent"


def test_vfio_options() -> None:
    token = uuid.uuid4()
    spec = parse_spec(f"vfio:0000:04:10.0,vf-token={token},iommu=group")
    options = vfio_options(spec)
    assert options.vf_token == token
    assert options.iommu == "group"
    assert vfio_options(parse_spec("vfio:x")).iommu is None


@pytest.mark.parametrize(
    ("text", "host", "port", "address"),
    [
        ("sim:x@localhost:7001", "localhost", 7001, "localhost:7001"),
        ("sim:x@10.0.0.2:1", "10.0.0.2", 1, "10.0.0.2:1"),
        ("sim:x@[::1]:7001", "::1", 7001, "[::1]:7001"),
        ("sim:x,size=1k@[fe80::1]:65535", "fe80::1", 65535, "[fe80::1]:65535"),
        ("vfio:0000:3b:00.1@agent-b:7001", "agent-b", 7001, "agent-b:7001"),
    ],
)
def test_agent_address(text: str, host: str, port: int, address: str) -> None:
    spec = parse_spec(text)
    assert (spec.host, spec.port, spec.address) == (host, port, address)
    assert spec.remote
    assert str(spec) == text


def test_last_at_separates_the_address() -> None:
    spec = parse_spec("vfio:a@b@host:7")
    assert (spec.name, spec.host, spec.port) == ("a@b", "host", 7)
    assert str(spec) == "vfio:'a@b'@host:7"


def test_quoted_values_hold_separators() -> None:
    spec = parse_spec("sim:x,image='a,b=c@d',dump=\"it's\"@h:9")
    assert spec.option("image") == "a,b=c@d"
    assert spec.option("dump") == "it's"
    assert (spec.host, spec.port) == ("h", 9)


def test_doubled_quote_inside_quotes() -> None:
    spec = parse_spec("sim:x,image='it''s \"both\"'")
    assert spec.option("image") == 'it\'s "both"'
    assert str(spec) == "sim:x,image='it''s \"both\"'"


def test_canonical_rendering_quotes_only_when_needed() -> None:
    spec = DeviceSpec(
        "sim",
        "x",
        Options((("image", "plain/path.bin"), ("dump", "with space"), ("state-dir", "it's"))),
    )
    assert str(spec) == "sim:x,image=plain/path.bin,dump='with space',state-dir=\"it's\""
    assert parse_spec(str(spec)) == spec


def test_quoted_name() -> None:
    spec = parse_spec("vfio:'/sys/bus/pci/devices/0000:3b:00.1'")
    assert spec.name == "/sys/bus/pci/devices/0000:3b:00.1"
    assert str(spec) == "vfio:/sys/bus/pci/devices/0000:3b:00.1"


def test_spec_error_is_a_usage_error_with_a_hint() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec("bogus:1")
    assert info.value.exit_status is ExitStatus.USAGE
    assert info.value.hint is not None
    assert "KIND:NAME" in info.value.hint


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus:1", "unknown device kind 'bogus' (expected vfio or sim)"),
        ("SIM:x", "unknown device kind 'SIM'"),
        (":x", "the device kind before ':' is missing"),
        ("demo", "'demo' is not a device spec: no ':' after the kind"),
        ("sim:", "'sim:': the device name is empty"),
        ("sim:,size=1k", "the device name is empty"),
        ("sim:''", "the device name is empty"),
        ("sim:size=4MiB", "'size=4MiB' is an option where the device name goes"),
        ("sim:x,size=banana", "size='banana' is not a size (e.g. 4096, 64KiB, 64MiB, 1GiB)"),
        ("sim:x,size=0", "size='0' is out of range"),
        ("sim:x,size=2TiB", "size='2TiB' is out of range"),
        (
            "sim:x,flags=warp",
            "flags='warp': unknown flag 'warp' (expected stop-copy, p2p, pre-copy",
        ),
        ("sim:x,flags=p2p+pre-copy", "lacks stop-copy"),
        ("sim:x,flags=stop-copy+stop-copy", "'stop-copy' is given twice"),
        ("sim:x,colour=red", "unknown option 'colour' for sim (expected one of: size, flags"),
        ("vfio:x,size=1k", "unknown option 'size' for vfio (expected one of: vf-token, iommu)"),
        ("sim:x,size=1k,size=2k", "duplicate option 'size'"),
        ("sim:x,size", "option 'size' has no value (expected key=value)"),
        ("sim:x,=1k", "option '=1k': '' is not an option name"),
        ("sim:x,Size=1k", "option 'Size=1k': 'Size' is not an option name"),
        ("sim:x,,size=1k", "empty option (two commas, or a trailing comma)"),
        ("sim:x,", "empty option"),
        ("sim:x,image='abc", "unbalanced ' in \"image='abc\""),
        ('sim:x,image="abc', "unbalanced \" in 'image=\"abc'"),
        ("sim:'abc", "unbalanced ' in \"'abc\""),
        ("sim:x,image=ab'c", "stray ' in \"image=ab'c\": quote the whole value"),
        ("sim:x,image='a'b", "unexpected 'b' after the quoted value in \"image='a'b\""),
        ("sim:x,image=a b", "'image=a b' holds whitespace or control characters: quote the value"),
        ("vfio:a\tb", "'a\\tb' holds whitespace or control characters"),
        ("sim:x,image=", "image='' is not a path"),
        ("sim:x@", "agent address '' has no port"),
        ("sim:x@host", "agent address 'host' has no port"),
        ("sim:x,image=a@b", "agent address 'b' has no port"),
        ("sim:x@host:0", "agent address 'host:0': port '0' is not a number 1-65535"),
        ("sim:x@host:65536", "port '65536' is not a number 1-65535"),
        ("sim:x@host:http", "port 'http' is not a number 1-65535"),
        ("sim:x@:7001", "agent address ':7001': '' is not a host name or address"),
        ("sim:x@h/st:7001", "'h/st' is not a host name or address"),
        ("sim:x@::1:7001", "put an IPv6 host in brackets, e.g. [::1]:7001"),
        ("sim:x@[::1]7001", "agent address '[::1]7001' is not [IPV6]:PORT"),
        ("sim:x@[nope]:1", "'nope' is not an IPv6 address"),
        ("sim:x@h:1,size=1k", "port '1,size=1k' is not a number"),
        ("sim:a/b", "sim name 'a/b': use letters, digits and _ . : -"),
        ("sim:..", "sim name '..'"),
        ("vfio:x,vf-token=zz", "vf-token='zz' is not a UUID"),
        ("vfio:x,iommu=magic", "iommu='magic': expected cdev or group"),
        ("sim:x,seed=pi", "seed='pi' is not a seed"),
        ("sim:x,seed=-1", "seed='-1' is out of range"),
        ("sim:x,content=noise", "content='noise' is not a content kind"),
        ("sim:x,read-delay=5", "read-delay='5' is not a duration"),
        ("sim:x,dirty-rate=fast", "dirty-rate='fast' is not a rate"),
        ("sim:x,fail=RUNNING-PRE_COPY:EIO", "'RUNNING-PRE_COPY' is not an arc (expected FROM>TO"),
        ("sim:x,fail=RUNNING>PRE_COPY", "'RUNNING>PRE_COPY' is not FROM>TO:ERRNO"),
        ("sim:x,fail=RUNNING>PRE_COPY:EWHAT", "'EWHAT' is not an errno"),
        ("sim:x,fail=RUNNING>SPINNING:EIO", "'SPINNING' is not a migration state"),
        (
            "sim:x,fail=RUNNING>STOP_COPY:EIO",
            "RUNNING>STOP_COPY is not a single arc of a device with flags "
            "stop-copy+p2p+pre-copy (arcs from RUNNING: PRE_COPY, RUNNING_P2P)",
        ),
        (
            "sim:x,flags=stop-copy,hang=RUNNING>PRE_COPY",
            "hang='RUNNING>PRE_COPY': RUNNING>PRE_COPY is not a single arc of a device "
            "with flags stop-copy (arcs from RUNNING: STOP)",
        ),
        ("sim:x,error=STOP_COPY>PRE_COPY", "STOP_COPY>PRE_COPY is not a single arc"),
        ("sim:x,error=ERROR>STOP", "arcs from ERROR: none"),
        ("sim:x,hang=STOP>RESUMING+STOP>RESUMING", "'STOP>RESUMING+STOP>RESUMING' names an arc"),
        (
            "sim:x,fail=STOP>RESUMING:EIO,error=STOP>RESUMING",
            "arc STOP>RESUMING is given twice (fail= and error=)",
        ),
        ("sim:x,read-error=1MiB", "'1MiB' is not OFFSET:ERRNO"),
        ("sim:x,write-error=far:EIO", "'far' is not a byte offset"),
        ("sim:x,truncate=lots", "truncate='lots' is not a byte offset"),
    ],
)
def test_errors_name_the_offending_part(text: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_sim_defaults() -> None:
    options = sim_options(parse_spec("sim:x"))
    assert options.size is None
    assert options.flags == F.STOP_COPY | F.P2P | F.PRE_COPY
    assert options.content == "realistic"
    assert options.dirty_rate == 0
    assert options.read_delay == 0
    assert options.seed is None
    assert (options.image, options.dump, options.state_dir) == (None, None, None)
    assert options.fail == ()
    assert options.error == options.hang == frozenset()
    assert options.read_error is options.write_error is None
    assert options.truncate is options.corrupt is None


def test_sim_options_typed() -> None:
    spec = parse_spec(
        "sim:x,size=64k,flags=stop-copy+pre-copy,image=in.bin,dump=out.bin,state-dir=st,"
        "dirty-rate=1MiB/s,seed=0x2a,content=zero,read-delay=1ms,"
        "fail=RUNNING>PRE_COPY:EIO+pre-copy>running:22,error=STOP>RESUMING,"
        "hang=STOP>STOP_COPY+RUNNING>STOP,read-error=1MiB:EIO,write-error=4096:ENOSPC,"
        "truncate=100,corrupt=1k"
    )
    options = sim_options(spec)
    assert options.size == 64 * KiB
    assert options.flags == F.STOP_COPY | F.PRE_COPY
    assert (options.image, options.dump, options.state_dir) == ("in.bin", "out.bin", "st")
    assert options.dirty_rate == MiB
    assert options.seed == 42
    assert options.content == "zero"
    assert options.read_delay == pytest.approx(0.001)
    assert options.fail == (
        ArcFailure(S.RUNNING, S.PRE_COPY, errno.EIO),
        ArcFailure(S.PRE_COPY, S.RUNNING, errno.EINVAL),
    )
    assert options.fail_errno(S.PRE_COPY, S.RUNNING) == errno.EINVAL
    assert options.fail_errno(S.RUNNING, S.STOP) is None
    assert options.error == {(S.STOP, S.RESUMING)}
    assert options.hang == {(S.STOP, S.STOP_COPY), (S.RUNNING, S.STOP)}
    assert options.read_error == StreamFault(MiB, errno.EIO)
    assert options.write_error == StreamFault(4096, errno.ENOSPC)
    assert (options.truncate, options.corrupt) == (100, KiB)


def test_parse_state_spellings() -> None:
    assert parse_state("stop-copy") is S.STOP_COPY
    assert parse_state("PRE_COPY_P2P") is S.PRE_COPY_P2P
    assert parse_state(" running ") is S.RUNNING


def test_parse_errno() -> None:
    assert parse_errno("ENOMEM") == errno.ENOMEM
    assert parse_errno("5") == errno.EIO
    for bad in ("eio", "E2BIGGER", "99999", "errorcode"):
        with pytest.raises(ValueError, match="is not an errno"):
            parse_errno(bad)


# --- round trips ---------------------------------------------------------------------------

_printable = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=12
).filter(str.isprintable)
_tricky = st.sampled_from(["a,b", "k=v", "x@y", "it's", 'say "hi"', "'\"", "a b", "@", "=,'"])
_values = st.one_of(_printable, _tricky)
_hosts = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
_ports = st.integers(min_value=1, max_value=65535)


@st.composite
def _specs(draw: st.DrawFn) -> DeviceSpec:
    kind = draw(st.sampled_from(["sim", "vfio"]))
    if kind == "sim":
        name = draw(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,10}", fullmatch=True))
        keys = draw(
            st.lists(st.sampled_from(["image", "dump", "state-dir"]), unique=True, max_size=3)
        )
        items = [(key, draw(_values)) for key in keys]
        if draw(st.booleans()):
            items.append(("size", draw(st.sampled_from(["4096", "64KiB", "1G", "3k"]))))
        if draw(st.booleans()):
            items.append(("fail", "RUNNING>PRE_COPY:EIO+STOP>RESUMING:ENOMEM"))
    else:
        name = draw(_values)
        items = [("vf-token", str(draw(st.uuids())))] if draw(st.booleans()) else []
    host = port = None
    if draw(st.booleans()):
        host, port = draw(_hosts), draw(_ports)
    return DeviceSpec(kind, name, Options(tuple(items)), host, port)


@given(_specs())
def test_str_round_trips(spec: DeviceSpec) -> None:
    text = str(spec)
    assert parse_spec(text) == spec
    assert str(parse_spec(text)) == text


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_spec_error(text: str) -> None:
    error: SpecError | None = None
    try:
        spec = parse_spec(text)
    except SpecError as exc:
        error = exc
    if error is not None:
        assert "\n" not in str(error)
    else:
        assert parse_spec(str(spec)) == spec
