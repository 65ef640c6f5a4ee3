"""The simulated device beyond the conformance suite: content, stream format, faults, state-dir."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
import zlib
from typing import TYPE_CHECKING

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from vfmig.core.errors import DataError, DeviceError, SpecError, StateChangeError
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.core.spec import DeviceSpec, Options, parse_spec, sim_options
from vfmig.device import sim_stream
from vfmig.device.backend import PrecopyInfo
from vfmig.device.debugfs import Availability
from vfmig.device.open import open_device
from vfmig.device.sim import DEFAULT_SIZE, SimDevice, _nonzero_runs, name_seed, release_hangs
from vfmig.device.sim_content import (
    BLOCK_SIZE,
    PAGE_SIZE,
    GeneratedPages,
    dirty_page,
    realistic_state,
)
from vfmig.device.sim_stream import (
    END_NO_CRC,
    END_PAYLOAD,
    END_SIZE,
    HEADER_SIZE,
    RECORD,
    SavingStream,
    StreamLoader,
    encode_header,
    full_length,
    initial_length,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from vfmig.device.backend import DataSession

S = DeviceState
F = MigrationFlags
MiB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> Iterator[Callable[..., SimDevice]]:
    """``sim(spec_text, sleep=...)``: a SimDevice on the test's fake clock, closed afterwards."""
    opened: list[SimDevice] = []

    def make(text: str, *, sleep: Callable[[float], None] | None = None) -> SimDevice:
        spec = parse_spec(text)
        extra = {"sleep": sleep} if sleep is not None else {}
        device = SimDevice(spec.name, sim_options(spec), clock=clock, **extra)
        opened.append(device)
        return device

    yield make
    release_hangs()
    for device in opened:
        device.close()


def read_some(session: DataSession, size: int = MiB) -> bytes:
    buffer = bytearray(size)
    count = session.readinto(buffer)
    return bytes(buffer[: count or 0])


def drain(session: DataSession) -> bytes:
    out = bytearray()
    while chunk := read_some(session):
        out += chunk
    return bytes(out)


def write_all(session: DataSession, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[session.write(view) :]


def file_digest(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, lambda: hashlib.blake2b(digest_size=32)).hexdigest()


# --- content -------------------------------------------------------------------------------


def test_realistic_state_is_deterministic_at_any_alignment() -> None:
    whole = realistic_state(7, 0, 3 * BLOCK_SIZE)
    assert len(whole) == 3 * BLOCK_SIZE
    assert realistic_state(7, 0, 3 * BLOCK_SIZE) == whole
    assert realistic_state(7, 1000, 5000) == whole[1000:6000]
    assert realistic_state(7, BLOCK_SIZE - 10, 20) == whole[BLOCK_SIZE - 10 : BLOCK_SIZE + 10]
    assert realistic_state(8, 0, BLOCK_SIZE) != whole[:BLOCK_SIZE]
    assert realistic_state(7, 5, 0) == b""


def test_realistic_state_mixes_page_classes() -> None:
    data = realistic_state(3, 0, 16 * MiB)
    pages = [data[i : i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]
    zero = sum(page == bytes(PAGE_SIZE) for page in pages) / len(pages)
    assert 0.37 < zero < 0.43
    assert len(set(pages)) == len(pages) - sum(page == bytes(PAGE_SIZE) for page in pages) + 1


def test_realistic_state_compresses_about_3_4x() -> None:
    data = realistic_state(11, 0, 8 * MiB)
    compressor = zstandard.ZstdCompressor(level=1)
    compressed = sum(len(compressor.compress(data[i : i + MiB])) for i in range(0, len(data), MiB))
    assert 3.1 < len(data) / compressed < 3.7


@pytest.mark.parametrize("kind", ["realistic", "random", "zero"])
def test_dirty_pages_change_with_every_generation(kind: str) -> None:
    original = GeneratedPages(kind, 5, 10 * PAGE_SIZE).read(4, 1)  # type: ignore[arg-type]
    generations = [dirty_page(kind, 5, 4, gen) for gen in (1, 2, 3)]  # type: ignore[arg-type]
    assert all(len(page) == PAGE_SIZE for page in generations)
    assert len({original, *generations}) == 4
    assert dirty_page(kind, 5, 4, 2) == generations[1]  # type: ignore[arg-type]


def test_generated_pages_trim_the_last_page() -> None:
    pages = GeneratedPages("random", 1, 2 * PAGE_SIZE + 10)
    assert pages.pages == 3
    assert len(pages.read(0, 3)) == 2 * PAGE_SIZE + 10
    assert pages.read(2, 1) == pages.read(0, 3)[2 * PAGE_SIZE :]


def test_zero_and_random_content() -> None:
    assert GeneratedPages("zero", 1, MiB).read(0, 256) == bytes(MiB)
    data = GeneratedPages("random", 1, MiB).read(0, 256)
    assert len(zstandard.ZstdCompressor(level=1).compress(data)) > 0.98 * len(data)


# --- the stream format ---------------------------------------------------------------------


def _stream(size: int, seed: int = 1) -> bytes:
    pages = GeneratedPages("realistic", seed, size)
    stream = SavingStream(size, "src", pages.read)
    out = bytearray()
    while chunk := stream.read(MiB, final=True):
        out += chunk
    return bytes(out)


class _Sink:
    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def __call__(self, offset: int, chunk: memoryview) -> None:
        self.data[offset : offset + len(chunk)] = chunk


def test_stream_layout() -> None:
    size = 2 * BLOCK_SIZE + 100
    data = _stream(size)
    assert len(data) == full_length(size) == initial_length(size) + RECORD.size + 24
    assert data.startswith(b"VFMIGSIM")
    assert RECORD.unpack_from(data, HEADER_SIZE) == (sim_stream.TYPE_PAGES, BLOCK_SIZE, 0)
    end = RECORD.unpack_from(data, len(data) - RECORD.size - END_PAYLOAD.size)
    assert end == (sim_stream.TYPE_END, END_PAYLOAD.size, 0)
    records, length, crc, _ = END_PAYLOAD.unpack_from(data, len(data) - END_PAYLOAD.size)
    body = data[: len(data) - RECORD.size - END_PAYLOAD.size]
    assert (records, length, crc) == (3, len(body), zlib.crc32(body))


def test_loader_accepts_every_split_of_the_stream() -> None:
    size = PAGE_SIZE + 300
    data = _stream(size)
    want = GeneratedPages("realistic", 1, size).read(0, 2)
    for cut in range(len(data) + 1):
        sink = _Sink(size)
        loader = StreamLoader(size, sink)
        loader.feed(memoryview(data[:cut]))
        loader.feed(memoryview(data[cut:]))
        loader.finish()
        assert sink.data == want, cut
    assert loader.source == "src"


def test_loader_accepts_one_byte_writes() -> None:
    size = 3 * PAGE_SIZE
    data = _stream(size)
    sink = _Sink(size)
    loader = StreamLoader(size, sink)
    for index in range(len(data)):
        loader.feed(memoryview(data)[index : index + 1])
    loader.finish()
    assert sink.data == GeneratedPages("realistic", 1, size).read(0, 3)


def os_error(call: Callable[[], object]) -> OSError:
    """The OSError ``call`` raises (the stream layer answers with errnos, as a driver)."""
    try:
        call()
    except OSError as exc:
        return exc
    raise AssertionError("no OSError raised")


def _patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


SIZE = 2 * PAGE_SIZE


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        pytest.param(lambda d: _patched(d, 0, b"NOTASIM!"), errno.EFAULT, id="magic"),
        pytest.param(lambda d: _patched(d, 20, b"\xff"), errno.EFAULT, id="header-crc"),
        pytest.param(
            lambda d: encode_header(SIZE + PAGE_SIZE, "x") + d[HEADER_SIZE:],
            errno.EFAULT,
            id="other-state-size",
        ),
        pytest.param(
            lambda d: _patched(d, HEADER_SIZE, RECORD.pack(9, PAGE_SIZE, 0)),
            errno.EINVAL,
            id="unknown-record",
        ),
        pytest.param(
            lambda d: _patched(d, HEADER_SIZE, RECORD.pack(1, PAGE_SIZE, 1)),
            errno.EINVAL,
            id="unaligned",
        ),
        pytest.param(
            lambda d: _patched(d, HEADER_SIZE, RECORD.pack(1, PAGE_SIZE, PAGE_SIZE)),
            errno.EINVAL,
            id="skips-ahead",
        ),
        pytest.param(
            lambda d: _patched(d, HEADER_SIZE, RECORD.pack(1, 3 * PAGE_SIZE, 0)),
            errno.ENOMEM,
            id="past-the-end",
        ),
        pytest.param(
            lambda d: _patched(d, HEADER_SIZE, RECORD.pack(1, 100, 0)),
            errno.EINVAL,
            id="not-whole-pages",
        ),
        pytest.param(lambda d: d + b"\0", errno.ENOMEM, id="data-after-end"),
    ],
)
def test_loader_refuses_at_the_write_that_proves_it(
    damage: Callable[[bytes], bytes], code: int
) -> None:
    loader = StreamLoader(SIZE, _Sink(SIZE))
    first = os_error(lambda: loader.feed(memoryview(damage(_stream(SIZE)))))
    assert first.errno == code
    assert os_error(lambda: loader.feed(memoryview(b"more"))) is first
    assert os_error(loader.finish).errno == errno.EINVAL


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: d[:-1], id="truncated"),
        pytest.param(lambda d: d[: HEADER_SIZE + 100], id="mid-record"),
        pytest.param(lambda d: b"", id="empty"),
        pytest.param(lambda d: _patched(d, HEADER_SIZE + 50, b"\x00\x01"), id="payload-flip"),
        pytest.param(lambda d: d[:-4] + b"\0\0\0\1", id="end-flip"),
    ],
)
def test_loader_refuses_a_bad_stream_at_finish(damage: Callable[[bytes], bytes]) -> None:
    loader = StreamLoader(SIZE, _Sink(SIZE))
    loader.feed(memoryview(damage(_stream(SIZE))))
    assert os_error(loader.finish).errno == errno.EINVAL


def test_saving_stream_counts_initial_and_dirty_bytes() -> None:
    size = 3 * BLOCK_SIZE
    stream = SavingStream(size, "s", GeneratedPages("zero", 1, size).read)
    assert stream.initial_bytes == initial_length(size)
    assert stream.remaining() == full_length(size)
    stream.mark_dirty(0)  # not sent yet: nothing to re-send
    assert stream.dirty_bytes == 0
    first = stream.read(100, final=False)
    assert first is not None
    assert len(first) == HEADER_SIZE  # one queued chunk at a time
    assert stream.initial_bytes == initial_length(size) - HEADER_SIZE
    while stream.initial_bytes:
        stream.read(MiB, final=False)
    assert stream.read(MiB, final=False) is None
    for page in (0, 1, 2, 700):
        stream.mark_dirty(page)
    stream.mark_dirty(1)
    assert stream.dirty_bytes == 4 * PAGE_SIZE
    chunk = stream.read(RECORD.size, final=False)
    assert chunk is not None
    assert RECORD.unpack(chunk) == (sim_stream.TYPE_PAGES, 3 * PAGE_SIZE, 0)
    assert stream.dirty_bytes == 4 * PAGE_SIZE  # three pages queued, one still marked
    stream.read(MiB, final=False)
    assert stream.dirty_bytes == PAGE_SIZE
    chunk = stream.read(RECORD.size, final=False)
    assert chunk is not None
    assert RECORD.unpack(chunk) == (sim_stream.TYPE_PAGES, PAGE_SIZE, 700 * PAGE_SIZE)
    stream.read(MiB, final=False)
    assert stream.dirty_bytes == 0
    assert not stream.ended
    assert stream.read(MiB, final=True)  # END
    assert stream.ended
    assert stream.read(MiB, final=True) == b""


# --- the device ----------------------------------------------------------------------------


def test_defaults_and_debugfs(sim: Callable[..., SimDevice]) -> None:
    device = sim("sim:plain")
    assert device.kind == "sim"
    assert device.flags == F.STOP_COPY | F.P2P | F.PRE_COPY
    assert device.size == DEFAULT_SIZE
    assert device.seed == name_seed("plain")
    assert device.get_state() is S.RUNNING
    assert device.data_size() == full_length(DEFAULT_SIZE)
    reader = device.debugfs
    assert reader.availability() is Availability.OK
    assert reader.features() == frozenset({"stop-copy", "p2p", "pre-copy"})
    device.set_state(S.STOP)
    assert reader.read_state().raw == "STOP"
    root = reader.root
    device.close()
    assert not root.exists()  # the private tree goes with the device


def test_features_follow_the_flags(sim: Callable[..., SimDevice]) -> None:
    device = sim("sim:f,flags=stop-copy+pre-copy")
    assert device.flags == F.STOP_COPY | F.PRE_COPY
    assert device.debugfs.features() == frozenset({"stop-copy", "pre-copy"})


def test_set_walks_the_kernel_path(sim: Callable[..., SimDevice]) -> None:
    device = sim("sim:walk,flags=stop-copy+p2p,hang=RUNNING_P2P>STOP")
    # The hang proves the walk passes RUNNING_P2P>STOP on RUNNING>STOP_COPY; here it is
    # released at once by a helper thread.
    done = threading.Event()
    outcome: list[BaseException] = []

    def request() -> None:
        try:
            device.set_state(S.STOP_COPY)
        except BaseException as exc:
            outcome.append(exc)
        done.set()

    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    thread.join(0.02)
    assert thread.is_alive()  # hung on the arc
    release_hangs()
    assert done.wait(5)
    assert isinstance(outcome[0], StateChangeError)
    assert outcome[0].errno == errno.EINTR
    assert outcome[0].state_after == S.RUNNING_P2P


def test_a_hung_arc_holds_the_device_lock(sim: Callable[..., SimDevice]) -> None:
    device = sim("sim:hung,hang=STOP>RESUMING")
    device.set_state(S.STOP)
    errors: list[int] = []

    def run(call: Callable[[], object]) -> threading.Thread:
        def target() -> None:
            try:
                call()
            except OSError as exc:
                errors.append(exc.errno or 0)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread

    setter = run(lambda: device._set_state(S.RESUMING))
    setter.join(0.02)
    assert setter.is_alive()
    states: list[DeviceState] = []
    getter = run(lambda: states.append(device._get_state()))
    getter.join(0.02)
    assert getter.is_alive()  # GET waits for the state mutex, as on the kernel
    assert device.debugfs.read_state().state is S.STOP
    device.close()  # does not wait for the hung arc
    release_hangs()
    setter.join(5)
    getter.join(5)
    assert not setter.is_alive()
    assert not getter.is_alive()
    assert states == []  # the device was closed under it
    assert sorted(errors) == sorted([errno.EINTR, errno.EBADF])


@pytest.mark.parametrize("target", [S.PRE_COPY, S.PRE_COPY_P2P])
def test_blocked_arcs_answer_einval_like_a_fixed_kernel(
    sim: Callable[..., SimDevice], target: DeviceState
) -> None:
    device = sim("sim:blocked,size=8KiB")
    session = device._set_state(S.STOP_COPY)
    assert session is not None
    with pytest.raises(OSError, match="no step from STOP_COPY") as info:
        device._set_state(target)  # below the policy layer, which never sends it
    assert info.value.errno == errno.EINVAL
    assert device._get_state() is S.STOP_COPY
    assert session.readinto(bytearray(16)) == 16  # the session is untouched


def test_failed_arc_stays_in_from(sim: Callable[..., SimDevice]) -> None:
    device = sim("sim:f,fail=STOP>STOP_COPY:ENOSPC")
    with pytest.raises(StateChangeError) as info:
        device.set_state(S.STOP_COPY)
    assert info.value.errno == errno.ENOSPC
    assert info.value.state_after == S.STOP
    assert device.debugfs.read_state().state is S.STOP
    assert device.set_state(S.RESUMING) is not None  # other arcs are fine


def test_error_arc_enters_error(sim: Callable[..., SimDevice]) -> None:
    device = sim("sim:e,error=PRE_COPY>PRE_COPY_P2P")
    session = device.set_state(S.PRE_COPY)
    assert session is not None
    with pytest.raises(StateChangeError) as info:
        device.set_state(S.STOP_COPY)
    assert (info.value.errno, info.value.state_after) == (errno.EIO, S.ERROR)
    assert device.debugfs.read_state().state is S.ERROR
    assert device.session is None
    # A SET in ERROR: vfmig refuses it, the kernel answers EINVAL, ERROR -> ERROR is a no-op.
    with pytest.raises(StateChangeError) as again:
        device.set_state_unchecked(S.RUNNING)
    assert (again.value.errno, again.value.state_after) == (errno.EINVAL, S.ERROR)
    assert device.set_state_unchecked(S.ERROR) is None
    device.reset()
    assert device.get_state() is S.RUNNING


def test_read_error_and_offsets(sim: Callable[..., SimDevice]) -> None:
    device = sim("sim:r,size=64KiB,read-error=100:EIO")
    session = device.set_state(S.STOP_COPY)
    assert session is not None
    assert len(read_some(session)) == 100  # a short read up to the fault
    with pytest.raises(DataError) as info:
        read_some(session)
    assert (info.value.errno, info.value.offset) == (errno.EIO, 100)
    assert "at offset 100" in str(info.value)


def test_truncate_ends_the_stream_early(sim: Callable[..., SimDevice]) -> None:
    source = sim("sim:t,size=64KiB,truncate=1000")
    destination = sim("sim:d,size=64KiB")
    saving = source.set_state(S.PRE_COPY)
    assert saving is not None
    assert len(drain(saving)) == 1000
    assert saving.readinto(bytearray(10)) is None  # in precopy: nothing now
    source.set_state(S.STOP_COPY)
    assert saving.readinto(bytearray(10)) == 0
    resuming = destination.set_state(S.RESUMING)
    assert resuming is not None
    write_all(resuming, _stream(64 << 10)[:1000])
    with pytest.raises(StateChangeError) as info:
        destination.set_state(S.STOP)
    assert (info.value.errno, info.value.state_after) == (errno.EINVAL, S.RESUMING)


def test_corrupt_stream_is_refused_by_the_destination(sim: Callable[..., SimDevice]) -> None:
    source = sim("sim:c,size=64KiB,corrupt=5000")
    destination = sim("sim:d,size=64KiB")
    clean = sim("sim:c,size=64KiB")
    corrupted = drain(_saving(source))
    original = drain(_saving(clean))
    assert len(corrupted) == len(original)
    assert [i for i, (a, b) in enumerate(zip(corrupted, original, strict=True)) if a != b] == [5000]
    resuming = destination.set_state(S.RESUMING)
    assert resuming is not None
    write_all(resuming, corrupted)
    with pytest.raises(StateChangeError) as info:
        destination.set_state(S.STOP)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("source_check", ["crc32", "none"])
@pytest.mark.parametrize("destination_check", ["crc32", "none"])
def test_checksum_none_skips_the_crc_on_either_side(
    sim: Callable[..., SimDevice], source_check: str, destination_check: str
) -> None:
    source = sim(f"sim:s,size=64KiB,checksum={source_check}")
    destination = sim(f"sim:d,size=64KiB,checksum={destination_check}")
    stream = drain(_saving(source))
    end = stream[-END_PAYLOAD.size :]
    assert END_PAYLOAD.unpack(end)[2:] == (
        (0, END_NO_CRC) if source_check == "none" else (zlib.crc32(stream[:-END_SIZE]), 0)
    )
    resuming = destination.set_state(S.RESUMING)
    assert resuming is not None
    write_all(resuming, stream)
    destination.set_state(S.STOP)
    assert destination.content_digest() == source.content_digest()


@pytest.mark.parametrize("checked", [True, False])
def test_a_corrupt_page_passes_only_unchecked(sim: Callable[..., SimDevice], checked: bool) -> None:
    check = "crc32" if checked else "none"
    source = sim(f"sim:c,size=64KiB,corrupt=5000,checksum={check}")
    destination = sim("sim:d,size=64KiB")
    resuming = destination.set_state(S.RESUMING)
    assert resuming is not None
    write_all(resuming, drain(_saving(source)))
    if checked:
        with pytest.raises(StateChangeError) as info:
            destination.set_state(S.STOP)
        assert info.value.errno == errno.EINVAL
    else:  # structure only: the flipped state byte goes through (the protocol's digest
        # is what catches damage on the wire)
        destination.set_state(S.STOP)
        assert destination.content_digest() != source.content_digest()


def test_unknown_end_flags_are_malformed(sim: Callable[..., SimDevice]) -> None:
    stream = bytearray(drain(_saving(sim("sim:s,size=64KiB"))))
    stream[-4:] = (2).to_bytes(4, "little")
    destination = sim("sim:d,size=64KiB")
    resuming = destination.set_state(S.RESUMING)
    assert resuming is not None
    write_all(resuming, bytes(stream))
    with pytest.raises(StateChangeError) as info:
        destination.set_state(S.STOP)
    assert info.value.errno == errno.EINVAL


def _saving(device: SimDevice) -> DataSession:
    session = device.set_state(S.STOP_COPY)
    assert session is not None
    return session


def test_write_error_after_a_short_write(sim: Callable[..., SimDevice]) -> None:
    device = sim("sim:w,size=64KiB,write-error=100:ENOSPC")
    session = device.set_state(S.RESUMING)
    assert session is not None
    assert session.write(_stream(64 << 10)[:300]) == 100
    with pytest.raises(DataError) as info:
        session.write(b"\0" * 10)
    assert (info.value.errno, info.value.offset) == (errno.ENOSPC, 100)


def test_foreign_stream_fails_the_first_write(sim: Callable[..., SimDevice]) -> None:
    device = sim("sim:small,size=8KiB")
    session = device.set_state(S.RESUMING)
    assert session is not None
    stream = _stream(64 << 10)
    assert session.write(stream[:10]) == 10  # not yet proven
    with pytest.raises(DataError) as info:
        session.write(stream[10:HEADER_SIZE])
    assert info.value.errno == errno.EFAULT
    with pytest.raises(StateChangeError) as stop:
        device.set_state(S.STOP)
    assert (stop.value.errno, stop.value.state_after) == (errno.EINVAL, S.RESUMING)


def test_read_delay_sleeps_per_read(sim: Callable[..., SimDevice]) -> None:
    naps: list[float] = []
    device = sim("sim:slow,size=8KiB,read-delay=1ms", sleep=naps.append)
    session = device.set_state(S.STOP_COPY)
    assert session is not None
    drain(session)
    assert naps == [0.001] * len(naps)
    assert len(naps) == 2  # one read for the stream, one for the end


def test_dirty_rate_follows_the_clock(sim: Callable[..., SimDevice], clock: FakeClock) -> None:
    device = sim("sim:d,size=1MiB,dirty-rate=64KiB/s")
    digest = device.content_digest()
    clock.now += 0.01  # 655 bytes: not a page yet
    assert device.content_digest() == digest
    clock.now += 1
    changed = device.content_digest()
    assert changed != digest
    device.set_state(S.STOP)
    clock.now += 10
    assert device.content_digest() == changed  # a stopped device changes nothing


def test_precopy_dirty_bytes_grow_and_fall(sim: Callable[..., SimDevice], clock: FakeClock) -> None:
    device = sim("sim:p,size=4MiB,dirty-rate=1MiB/s")
    session = device.set_state(S.PRE_COPY)
    assert session is not None
    assert session.precopy_info().dirty_bytes == 0
    while session.precopy_info().initial_bytes:
        assert read_some(session)
    clock.now += 0.25  # 64 pages dirtied, some of them twice
    dirty = session.precopy_info().dirty_bytes
    assert 0 < dirty <= 64 * PAGE_SIZE
    read_some(session, 2 * PAGE_SIZE)
    assert session.precopy_info().dirty_bytes < dirty
    drain(session)
    assert session.precopy_info() == PrecopyInfo(0, 0)
    before = device.data_size()
    clock.now += 0.25
    assert device.data_size() > before


def _migrate(
    source: SimDevice, destination: SimDevice, clock: FakeClock, *, rounds: int
) -> tuple[int, int]:
    """Precopy ``rounds`` times with the clock running, then stop-copy; returns byte counts."""
    resuming = destination.set_state(S.RESUMING)
    saving = source.set_state(S.PRE_COPY)
    assert resuming is not None
    assert saving is not None
    precopy = 0
    for _ in range(rounds):
        clock.now += 0.05
        chunk = read_some(saving)
        precopy += len(chunk)
        write_all(resuming, chunk)
    assert source.set_state(S.STOP_COPY) is None
    rest = drain(saving)
    write_all(resuming, rest)
    destination.set_state(S.STOP)
    destination.set_state(S.RUNNING)
    source.set_state(S.STOP)
    return precopy, len(rest)


def test_migration_with_dirty_pages_dumps_the_source_state(
    sim: Callable[..., SimDevice], clock: FakeClock, tmp_path: Path
) -> None:
    source = sim("sim:src,size=3MiB,dirty-rate=2MiB/s")
    destination = sim(f"sim:dst,size=3MiB,dump={tmp_path}/dump.bin")
    precopy, stop_copy = _migrate(source, destination, clock, rounds=12)
    assert precopy > 3 * MiB  # the initial state and re-sent dirty pages
    assert stop_copy > 0
    source.snapshot_to(tmp_path / "source.bin")
    assert (tmp_path / "dump.bin").read_bytes() == (tmp_path / "source.bin").read_bytes()
    assert destination.content_digest() == source.content_digest()
    assert not (tmp_path / "dump.bin.partial").exists()


@pytest.mark.parametrize("content", ["realistic", "random", "zero"])
@pytest.mark.parametrize("dirtied", [2, 400])  # a few pages, or (nearly surely) every one
def test_read_pages_is_the_original_with_each_dirtied_page_rewritten(
    sim: Callable[..., SimDevice], content: str, dirtied: int
) -> None:
    size = 6 * PAGE_SIZE + 1000  # a short last page
    device = sim(f"sim:d,size={size},content={content}")
    with device.lock:
        device._dirty(dirtied)
        gens = device._gens
        assert gens is not None
        for first, count in [(0, 7), (2, 3), (6, 1), (5, 2), (3, 1)]:
            expected = b""
            for page in range(first, first + count):
                original = device._base.read(page, 1)  # type: ignore[union-attr]
                rewritten = dirty_page(device._dirty_kind, device.seed, page, gens[page])
                expected += rewritten[: len(original)] if gens[page] else original
            assert device.read_pages(first, count) == expected
    if dirtied > 100:
        assert all(gens)  # the all-rewritten path ran


def test_dropping_a_dirty_record_is_detected(
    sim: Callable[..., SimDevice], clock: FakeClock
) -> None:
    source = sim("sim:src,size=1MiB,dirty-rate=1MiB/s")
    destination = sim("sim:dst,size=1MiB")
    resuming = destination.set_state(S.RESUMING)
    saving = source.set_state(S.PRE_COPY)
    assert resuming is not None
    assert saving is not None
    while saving.precopy_info().initial_bytes:
        write_all(resuming, read_some(saving))
    clock.now += 0.1
    assert saving.precopy_info().dirty_bytes
    read_some(saving)  # dirty pages, lost on the way
    source.set_state(S.STOP_COPY)
    write_all(resuming, drain(saving))
    with pytest.raises(StateChangeError) as info:
        destination.set_state(S.STOP)
    assert info.value.errno == errno.EINVAL


def test_dump_waits_for_running_and_reset_skips_it(
    sim: Callable[..., SimDevice], clock: FakeClock, tmp_path: Path
) -> None:
    dump = tmp_path / "out.bin"
    source = sim("sim:s,size=64KiB")
    destination = sim(f"sim:d,size=64KiB,dump={dump}")
    stream = drain(_saving(source))
    resuming = destination.set_state(S.RESUMING)
    assert resuming is not None
    write_all(resuming, stream)
    destination.set_state(S.STOP)
    assert not dump.exists()
    destination.reset()
    assert not dump.exists()
    resuming = destination.set_state(S.RESUMING)
    assert resuming is not None
    write_all(resuming, stream)
    destination.set_state(S.RUNNING_P2P)
    assert not dump.exists()
    destination.set_state(S.RUNNING)
    assert file_digest(dump) == source.content_digest()


def test_image_is_streamed_and_sets_the_size(sim: Callable[..., SimDevice], tmp_path: Path) -> None:
    image = tmp_path / "image.bin"
    image.write_bytes(os.urandom(3 * PAGE_SIZE + 5))
    source = sim(f"sim:img,image={image}")
    assert source.size == 3 * PAGE_SIZE + 5
    destination = sim(f"sim:d,size={3 * PAGE_SIZE + 5},dump={tmp_path}/dump.bin")
    resuming = destination.set_state(S.RESUMING)
    assert resuming is not None
    write_all(resuming, drain(_saving(source)))
    destination.set_state(S.RUNNING)
    assert (tmp_path / "dump.bin").read_bytes() == image.read_bytes()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("image={tmp}/missing.bin", "image={tmp}/missing.bin: No such file or directory"),
        ("image={tmp}/empty.bin", "image={tmp}/empty.bin is empty"),
        ("image={tmp}/four.bin,size=8KiB", "holds 4KiB but size= says 8KiB"),
        ("dump={tmp}/no/such/dir/out.bin", "the directory does not exist"),
    ],
)
def test_open_errors(
    sim: Callable[..., SimDevice], tmp_path: Path, options: str, message: str
) -> None:
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "four.bin").write_bytes(bytes(4096))
    with pytest.raises(DeviceError) as info:
        sim(f"sim:bad,{options.format(tmp=tmp_path)}")
    assert message.format(tmp=tmp_path) in str(info.value)


# --- state-dir -----------------------------------------------------------------------------


def test_state_dir_keeps_the_state_but_not_the_session(
    sim: Callable[..., SimDevice], tmp_path: Path
) -> None:
    spec = f"sim:kept,size=64KiB,state-dir={tmp_path}/st"
    device = sim(spec)
    assert device.debugfs.root == tmp_path / "st" / "debugfs"
    session = device.set_state(S.PRE_COPY)
    assert session is not None
    device.close()
    reopened = sim(spec)
    assert reopened.get_state() is S.PRE_COPY
    assert reopened.session is None
    assert reopened.debugfs.read_state().state is S.PRE_COPY
    assert reopened._set_state(S.STOP_COPY) is None  # no session to continue
    reopened.set_state(S.STOP)
    reopened.set_state(S.RUNNING)


def test_state_dir_survives_a_crash(tmp_path: Path) -> None:
    spec = f"sim:crash,size=64KiB,state-dir={tmp_path}/st"
    code = (
        "import os, sys\n"
        "from vfmig.device.open import open_device\n"
        "from vfmig.core.fsm import DeviceState\n"
        "device = open_device(sys.argv[1])\n"
        "device.set_state(DeviceState.STOP_COPY)\n"
        "os._exit(7)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True)
    assert result.returncode == 7, result.stderr
    with open_device(spec) as device:
        assert device.get_state() is S.STOP_COPY
        assert device.session is None
        device.set_state(S.STOP)
    with open_device(spec) as device:
        assert device.get_state() is S.STOP


def test_state_dir_is_exclusive(sim: Callable[..., SimDevice], tmp_path: Path) -> None:
    spec = f"sim:busy,state-dir={tmp_path}/st"
    sim(spec)
    with pytest.raises(DeviceError) as info:
        sim(spec)
    assert info.value.errno == errno.EBUSY
    assert "device busy" in str(info.value)
    assert info.value.hint is not None


def test_state_dir_refuses_another_device(sim: Callable[..., SimDevice], tmp_path: Path) -> None:
    sim(f"sim:one,size=64KiB,state-dir={tmp_path}/st").close()
    with pytest.raises(DeviceError, match="belongs to another device \\('one', 64KiB"):
        sim(f"sim:one,size=128KiB,state-dir={tmp_path}/st")


def test_state_dir_damaged(sim: Callable[..., SimDevice], tmp_path: Path) -> None:
    sim(f"sim:one,state-dir={tmp_path}/st").close()
    meta = tmp_path / "st" / "device.json"
    meta.write_text(meta.read_text()[:20])
    with pytest.raises(DeviceError, match="is damaged") as info:
        sim(f"sim:one,state-dir={tmp_path}/st")
    assert info.value.hint == "delete the directory to start from a fresh device"


def test_state_dir_keeps_resumed_content_and_dirty_pages(
    sim: Callable[..., SimDevice], clock: FakeClock, tmp_path: Path
) -> None:
    spec = f"sim:dst,size=256KiB,dirty-rate=64KiB/s,state-dir={tmp_path}/st"
    source = sim("sim:src,size=256KiB")
    destination = sim(spec)
    _migrate(source, destination, clock, rounds=0)
    assert destination.content_digest() == source.content_digest()
    clock.now += 1  # the destination runs and dirties its new state
    digest = destination.content_digest()
    assert digest != source.content_digest()
    destination.close()
    assert json.loads((tmp_path / "st" / "device.json").read_text())["content_file"]
    reopened = sim(spec)
    assert reopened.content_digest() == digest


# --- open_device ---------------------------------------------------------------------------


def test_open_device_parses_strings() -> None:
    with open_device("sim:o,size=8KiB,flags=stop-copy") as device:
        assert isinstance(device, SimDevice)
        assert (device.name, device.size, device.flags) == ("o", 8192, F.STOP_COPY)


def test_open_device_refuses_remote_specs() -> None:
    with pytest.raises(SpecError, match="belongs to the agent at \\[::1\\]:7001"):
        open_device("sim:x@[::1]:7001")


def test_open_device_refuses_unknown_kinds() -> None:
    with pytest.raises(SpecError, match="unknown device kind 'bogus'"):
        open_device(DeviceSpec("bogus", "x"))


def test_open_device_validates_built_specs() -> None:
    with pytest.raises(SpecError, match="unknown option 'colour'"):
        open_device(DeviceSpec("sim", "x", Options((("colour", "red"),))))


def test_open_device_dispatches_vfio(monkeypatch: pytest.MonkeyPatch) -> None:
    import vfmig.device.vfio

    seen: list[DeviceSpec] = []

    def fake_open(spec: DeviceSpec) -> SimDevice:
        seen.append(spec)
        raise DeviceError(spec.name, "open", "no such device")

    monkeypatch.setattr(vfmig.device.vfio, "open_vfio_device", fake_open)
    with pytest.raises(DeviceError, match="no such device"):
        open_device("vfio:nonexistent")
    assert seen == [parse_spec("vfio:nonexistent")]
    with pytest.raises(SpecError, match="vf-token='x' is not a UUID"):
        open_device(DeviceSpec("vfio", "x", Options((("vf-token", "x"),))))


def test_sim_dir_confines_paths(tmp_path: Path) -> None:
    root = tmp_path / "agent"
    root.mkdir()
    (root / "in.bin").write_bytes(bytes(PAGE_SIZE))
    with open_device("sim:c,image=in.bin,dump=out.bin,state-dir=st", sim_dir=root) as device:
        assert isinstance(device, SimDevice)
        assert device.options.image == str(root / "in.bin")
        assert device.options.dump == str(root / "out.bin")
        assert device.debugfs.root == root / "st" / "debugfs"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("dump=/etc/passwd", "dump='/etc/passwd': this agent takes only names inside"),
        ("image=../secret", "image='../secret': this agent takes only names inside"),
        ("state-dir=a/../../b", "state-dir='a/../../b': this agent takes only names"),
        ("dump=link/out.bin", "dump='link/out.bin' leads out of this agent's sim directory"),
    ],
)
def test_sim_dir_refuses_escapes(tmp_path: Path, option: str, message: str) -> None:
    root = tmp_path / "agent"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(SpecError) as info:
        open_device(f"sim:c,{option}", sim_dir=root)
    assert message in str(info.value)


def test_without_sim_dir_paths_are_used_as_given(tmp_path: Path) -> None:
    with open_device(f"sim:c,state-dir={tmp_path}/anywhere") as device:
        assert isinstance(device, SimDevice)
        assert device.debugfs.root == tmp_path / "anywhere" / "debugfs"


# --- memory --------------------------------------------------------------------------------


@pytest.mark.slow
def test_memory_does_not_grow_with_the_state(tmp_path: Path) -> None:
    """A 256 MiB migration with precopy and dirtying stays within a small, fixed RSS."""
    code = (
        "import sys\n"
        "from vfmig.core.fsm import DeviceState as S\n"
        "from vfmig.core.spec import parse_spec, sim_options\n"
        "from vfmig.device.sim import SimDevice\n"
        "t = [0.0]\n"
        "def dev(text):\n"
        "    spec = parse_spec(text)\n"
        "    return SimDevice(spec.name, sim_options(spec), clock=lambda: t[0])\n"
        "src = dev('sim:src,size=256MiB,dirty-rate=64MiB/s')\n"
        "dst = dev('sim:dst,size=256MiB,state-dir=' + sys.argv[1])\n"
        "buf = bytearray(1 << 20)\n"
        "r = dst.set_state(S.RESUMING); s = src.set_state(S.PRE_COPY)\n"
        "def copy():\n"
        "    n = s.readinto(buf)\n"
        "    if n: r.write(memoryview(buf)[:n])\n"
        "    return n\n"
        "while s.precopy_info().initial_bytes:\n"
        "    t[0] += 0.01; copy()\n"
        "src.set_state(S.STOP_COPY)\n"
        "while copy(): pass\n"
        "dst.set_state(S.RUNNING)\n"
        "assert dst.content_digest() == src.content_digest()\n"
        # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork and exec.
        "status = open('/proc/self/status').read()\n"
        "print(status.split('VmHWM:')[1].split()[0])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "dst")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    peak_mib = int(result.stdout) / 1024
    assert peak_mib < 100, f"peak RSS {peak_mib:.0f} MiB"


def test_probe_features_answers_like_a_driver_without_dirty_tracking() -> None:
    from vfmig.device.open import open_device

    with open_device("sim:probe") as device:
        answers = device.probe_features()  # type: ignore[attr-defined]
        state = device.get_state()
    assert answers["MIGRATION"] == answers["MIG_DEVICE_STATE"] == "supported"
    assert answers["MIG_DATA_SIZE"] == "supported"
    assert answers["DMA_LOGGING_START"] == "ENOTTY"
    assert answers["DMA_BUF"] == "ENOTTY"
    assert state.name == "RUNNING"


@settings(max_examples=300, deadline=None)
@given(
    offset=st.integers(0, 3 * PAGE_SIZE),
    pages=st.lists(st.sampled_from([b"\0", b"\1", b"z"]), max_size=6),
    tail=st.integers(0, PAGE_SIZE - 1),
)
def test_nonzero_runs_leave_out_exactly_the_whole_zero_pages(
    offset: int, pages: list[bytes], tail: int
) -> None:
    data = b"".join(fill * PAGE_SIZE for fill in pages) + b"\7" * tail
    data = data[: len(data) - offset % PAGE_SIZE] if offset % PAGE_SIZE else data
    runs = _nonzero_runs(offset, memoryview(data))
    rebuilt = bytearray(len(data))  # the holes read as zeros
    for at, run in runs:
        rebuilt[at - offset : at - offset + len(run)] = run
    assert rebuilt == data
    for at, run in runs:  # no whole, aligned zero page is written
        start = -at % PAGE_SIZE
        for page in range(start, len(run) - PAGE_SIZE + 1, PAGE_SIZE):
            assert bytes(run[page : page + PAGE_SIZE]) != bytes(PAGE_SIZE)


def test_a_resumed_realistic_state_is_stored_sparse(
    sim: Callable[..., SimDevice], tmp_path: Path
) -> None:
    source = sim("sim:s,size=8MiB")
    destination = sim(f"sim:d,size=8MiB,dump={tmp_path}/dump.bin")
    resuming = destination.set_state(S.RESUMING)
    assert resuming is not None
    write_all(resuming, drain(_saving(source)))
    destination.set_state(S.STOP)
    destination.set_state(S.RUNNING)
    source.snapshot_to(tmp_path / "source.bin")
    dump = tmp_path / "dump.bin"
    assert dump.read_bytes() == (tmp_path / "source.bin").read_bytes()
    assert dump.stat().st_blocks * 512 < 0.8 * (8 << 20)  # ~40 % zero pages are holes


def test_an_older_dump_goes_when_resuming_begins(
    sim: Callable[..., SimDevice], tmp_path: Path
) -> None:
    """Not in the step to RUNNING: replacing a large file there costs downtime (ext4
    flushes a file renamed over another; freeing the old one's blocks takes time too)."""
    dump = tmp_path / "dump.bin"
    dump.write_bytes(b"an older run's dump")
    source = sim("sim:s,size=1MiB")
    destination = sim(f"sim:d,size=1MiB,dump={dump}")
    resuming = destination.set_state(S.RESUMING)
    assert resuming is not None
    assert not dump.exists()
    write_all(resuming, drain(_saving(source)))
    destination.set_state(S.STOP)
    assert not dump.exists()  # written when the device next runs
    destination.set_state(S.RUNNING)
    source.snapshot_to(tmp_path / "source.bin")
    assert dump.read_bytes() == (tmp_path / "source.bin").read_bytes()
