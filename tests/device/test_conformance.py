"""How every migratable device behaves, whatever backs it (the conformance suite).

The cases use only the :class:`~vfmig.device.backend.MigrationDevice` interface: the
policy methods (``set_state``, ``set_state_unchecked``, ``reset``, ...) and, where a case
is about what the *kernel* does to a data fd the policy would have closed, the
kernel-exact primitives ``_set_state`` and ``_reset`` that every backend implements. The
fixtures (tests/device/conftest.py) decide the backend: ``sim:`` here, real mtty devices
in the kernel tier. Case names are stable; the kernel tier's results are compared by name.

Where real drivers are known to depart from the uAPI text, the case names the quirk from
:data:`QUIRKS`, and a backend that declares it skips the case with the reason.
"""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING, Any, Final

import pytest

from vfmig.core import fsm
from vfmig.core.errors import DataError, DeviceError, RequestRefused, StateChangeError
from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.device.backend import Direction
from vfmig.device.debugfs import Availability

if TYPE_CHECKING:
    from collections.abc import Callable

    from vfmig.device.backend import DataSession, MigrationDevice

    MakeDevice = Callable[..., MigrationDevice]
    MakePair = Callable[[MigrationFlags], tuple[MigrationDevice, MigrationDevice]]

S = DeviceState
F = MigrationFlags
ALL = F.STOP_COPY | F.P2P | F.PRE_COPY
WITH_PRECOPY = [flags for flags in fsm.FLAG_SETS if F.PRE_COPY in flags]

#: Known departures of real drivers from the uAPI text (name -> what the driver does).
QUIRKS: Final = {
    "precopy-read-returns-0": (
        "mtty returns 0 instead of ENOMSG when nothing is pending in PRE_COPY; "
        "readinto() reports both as None, so no case depends on it"
    ),
    "no-dirty-bytes": "mtty never reports dirty_bytes (its state does not change in precopy)",
}

CHUNK = 1 << 20


def flag_id(flags: MigrationFlags) -> str:
    return fsm.flag_names(flags).replace("STOP_COPY", "SC").replace("PRE_COPY", "PC")


def skip_for(quirks: frozenset[str], quirk: str) -> None:
    assert quirk in QUIRKS, quirk
    if quirk in quirks:
        pytest.skip(f"quirk {quirk}: {QUIRKS[quirk]}")


def reach(device: MigrationDevice, state: DeviceState) -> DataSession | None:
    """Bring the device from RUNNING to ``state`` by requests vfmig allows."""
    if device.get_state() is not S.RUNNING:
        device.reset()
    if state is S.RUNNING:
        return None
    return device.set_state(state)


def check_debugfs(device: MigrationDevice, state: DeviceState) -> None:
    """Where the device has a readable migration debugfs, it agrees with GET."""
    reader = device.debugfs
    if reader is not None and reader.availability() is Availability.OK:
        assert reader.read_state().state is state


def drain(session: DataSession) -> bytes:
    """Read until the device has nothing now (precopy) or the stream ends (stop-copy)."""
    data = bytearray()
    buffer = bytearray(CHUNK)
    while True:
        count = session.readinto(buffer)
        if not count:
            return bytes(data)
        data += buffer[:count]


def write_all(session: DataSession, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[session.write(view) :]


def read_errno(session: DataSession) -> int | None:
    with pytest.raises(DataError) as info:
        session.readinto(bytearray(64))
    return info.value.errno


# --- the arc matrix ----------------------------------------------------------------------


def _matrix() -> list[Any]:
    cases = []
    for flags in fsm.FLAG_SETS:
        for cur in DeviceState:
            if not fsm.supports(cur, flags):
                continue  # ERROR and states the flags lack cannot be reached by requests
            for target in range(fsm.NUM_STATES + 1):
                name = DeviceState(target).name if target < fsm.NUM_STATES else str(target)
                cases.append(
                    pytest.param(flags, cur, target, id=f"{flag_id(flags)}-{cur.name}>{name}")
                )
    return cases


@pytest.mark.parametrize(("flags", "cur", "target"), _matrix())
def test_arc(
    make_device: MakeDevice,
    monkeypatch: pytest.MonkeyPatch,
    flags: MigrationFlags,
    cur: DeviceState,
    target: int,
) -> None:
    """Every request from every reachable state: the kernel's answer, state and data fd."""
    device = make_device(flags)
    before = reach(device, cur)
    assert device.get_state() is cur
    assert device.session is before

    if 0 <= target < fsm.NUM_STATES and (cur, DeviceState(target)) in fsm.VFMIG_REFUSALS:

        def must_not_run(target: int) -> None:
            raise AssertionError("a blocked arc reached the device")

        monkeypatch.setattr(device, "_set_state", must_not_run)
        with pytest.raises(RequestRefused):
            device.set_state_unchecked(target)
        monkeypatch.undo()
        assert device.get_state() is cur
        assert device.session is before
        return

    kernel = fsm.path(cur, target, flags)
    # Leaving RESUMING validates the stream, and none was written: every driver refuses.
    refused = kernel.errno is not None or (cur is S.RESUMING and target != cur)
    if refused:
        with pytest.raises(StateChangeError) as info:
            device.set_state_unchecked(target)
        assert info.value.errno == errno.EINVAL
        assert info.value.state_after == cur
        assert device.get_state() is cur
        check_debugfs(device, cur)
        assert device.session is before
        return

    new = device.set_state_unchecked(target)
    assert device.get_state() == target
    check_debugfs(device, DeviceState(target))
    opens = fsm.plan(cur, target, flags).opens
    if opens is None:
        assert new is None
        if fsm.session_survives(cur, DeviceState(target)) and before is not None:
            assert device.session is before
        else:
            assert device.session is None
    else:
        assert new is not None
        assert device.session is new
        expected = Direction.SAVING if opens is fsm.ArcEffect.OPENS_SAVING else Direction.RESUMING
        assert new.direction is expected
    if before is not None and device.session is not before:
        assert before.closed


# --- the data fd ---------------------------------------------------------------------------


@pytest.mark.parametrize("flags", WITH_PRECOPY, ids=flag_id)
def test_precopy_to_stop_copy_reuses_the_session(
    make_device: MakeDevice, flags: MigrationFlags
) -> None:
    device = make_device(flags)
    session = device.set_state(S.PRE_COPY)
    assert session is not None
    initial = drain(session)
    assert initial
    assert device.set_state(S.STOP_COPY) is None
    assert device.session is session
    rest = drain(session)
    assert rest
    assert session.readinto(bytearray(CHUNK)) == 0  # the end stays the end


@pytest.mark.parametrize("flags", fsm.FLAG_SETS, ids=flag_id)
def test_stop_copy_stream_ends_with_eof(make_device: MakeDevice, flags: MigrationFlags) -> None:
    device = make_device(flags)
    session = device.set_state(S.STOP_COPY)
    assert session is not None
    assert session.direction is Direction.SAVING
    assert drain(session)
    assert session.readinto(bytearray(CHUNK)) == 0


@pytest.mark.parametrize(
    ("how", "flags"),
    [
        pytest.param("leave-precopy", ALL, id="leave-precopy"),
        pytest.param("leave-stop-copy", F.STOP_COPY, id="leave-stop-copy"),
        pytest.param("reset", F.STOP_COPY, id="reset"),
    ],
)
def test_reads_after_the_session_ends_give_enodev(
    make_device: MakeDevice, how: str, flags: MigrationFlags
) -> None:
    device = make_device(flags)
    session = device._set_state(S.PRE_COPY if how == "leave-precopy" else S.STOP_COPY)
    assert session is not None
    try:
        assert session.readinto(bytearray(16))
        if how == "reset":
            device._reset()
        else:
            device._set_state(S.RUNNING if how == "leave-precopy" else S.STOP)
        assert read_errno(session) == errno.ENODEV
    finally:
        session.close()


def test_writes_after_the_session_ends_give_enodev(make_device: MakeDevice) -> None:
    device = make_device(F.STOP_COPY)
    session = device._set_state(S.RESUMING)
    assert session is not None
    try:
        device._reset()
        with pytest.raises(DataError) as info:
            session.write(b"\0" * 16)
        assert info.value.errno == errno.ENODEV
    finally:
        session.close()


@pytest.mark.parametrize("direction", list(Direction), ids=lambda d: d.value)
def test_wrong_direction_gives_ebadf(make_device: MakeDevice, direction: Direction) -> None:
    device = make_device(F.STOP_COPY)
    if direction is Direction.SAVING:
        session = device.set_state(S.STOP_COPY)
        assert session is not None
        with pytest.raises(DataError) as info:
            session.write(b"\0" * 16)
    else:
        session = device.set_state(S.RESUMING)
        assert session is not None
        with pytest.raises(DataError) as info:
            session.readinto(bytearray(16))
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("flags", WITH_PRECOPY, ids=flag_id)
def test_drained_precopy_reads_nothing_now(make_device: MakeDevice, flags: MigrationFlags) -> None:
    device = make_device(flags)
    session = device.set_state(S.PRE_COPY)
    assert session is not None
    drain(session)
    assert session.readinto(bytearray(CHUNK)) is None
    assert session.readinto(bytearray(CHUNK)) is None  # "nothing now" is never the end
    assert device.get_state() is S.PRE_COPY


@pytest.mark.parametrize("flags", WITH_PRECOPY, ids=flag_id)
def test_precopy_info_counts_initial_bytes_down(
    make_device: MakeDevice, flags: MigrationFlags
) -> None:
    device = make_device(flags)
    session = device.set_state(S.PRE_COPY)
    assert session is not None
    first = session.precopy_info()
    assert first.initial_bytes > 0
    assert device.precopy_info() == first
    count = session.readinto(bytearray(min(16, first.initial_bytes)))
    assert count
    assert session.precopy_info().initial_bytes == first.initial_bytes - count
    drain(session)
    assert session.precopy_info().initial_bytes == 0


def test_precopy_info_reports_dirty_bytes(make_device: MakeDevice, quirks: frozenset[str]) -> None:
    skip_for(quirks, "no-dirty-bytes")
    device = make_device(ALL, dirty=True)
    session = device.set_state(S.PRE_COPY)
    assert session is not None
    while session.precopy_info().initial_bytes:
        session.readinto(bytearray(CHUNK))
    # The device keeps running in precopy: it dirties what was already sent.
    time.sleep(0.002)
    info = session.precopy_info()
    assert info.dirty_bytes > 0, info


@pytest.mark.parametrize("flags", WITH_PRECOPY, ids=flag_id)
def test_precopy_info_outside_precopy_is_einval(
    make_device: MakeDevice, flags: MigrationFlags
) -> None:
    device = make_device(flags)
    with pytest.raises(DeviceError) as info:
        device.precopy_info()  # no session at all
    assert info.value.errno == errno.EINVAL
    session = device.set_state(S.STOP_COPY)
    assert session is not None
    with pytest.raises(DeviceError) as info:
        session.precopy_info()
    assert info.value.errno == errno.EINVAL


def test_precopy_info_on_a_resuming_fd_is_enotty(make_device: MakeDevice) -> None:
    device = make_device(ALL)
    session = device.set_state(S.RESUMING)
    assert session is not None
    with pytest.raises(DeviceError) as info:
        session.precopy_info()
    assert info.value.errno == errno.ENOTTY


# --- reset, data size, failures ------------------------------------------------------------


def _reachable() -> list[Any]:
    return [
        pytest.param(flags, state, id=f"{flag_id(flags)}-{state.name}")
        for flags in fsm.FLAG_SETS
        for state in DeviceState
        if fsm.supports(state, flags)
    ]


@pytest.mark.parametrize(("flags", "state"), _reachable())
def test_reset_from_every_state(
    make_device: MakeDevice, flags: MigrationFlags, state: DeviceState
) -> None:
    device = make_device(flags)
    session = device._set_state(state)
    try:
        assert device.get_state() is state
        device._reset()
        assert device.get_state() is S.RUNNING
        check_debugfs(device, S.RUNNING)
        if session is not None:
            if session.direction is Direction.SAVING:
                assert read_errno(session) == errno.ENODEV
            else:
                with pytest.raises(DataError) as info:
                    session.write(b"\0")
                assert info.value.errno == errno.ENODEV
    finally:
        if session is not None:
            session.close()
    device.reset()  # the policy layer drops what it knew
    assert device.session is None
    assert device.get_state() is S.RUNNING


@pytest.mark.parametrize(("flags", "state"), _reachable())
def test_data_size_in_every_state(
    make_device: MakeDevice, flags: MigrationFlags, state: DeviceState
) -> None:
    device = make_device(flags)
    reach(device, state)
    assert device.data_size() > 0


@pytest.mark.parametrize(
    ("target", "src", "dst", "after"),
    [
        pytest.param(S.STOP_COPY, S.RUNNING, S.RUNNING_P2P, S.RUNNING, id="first-arc"),
        pytest.param(S.STOP_COPY, S.STOP, S.STOP_COPY, S.STOP, id="last-arc"),
        pytest.param(S.RESUMING, S.RUNNING_P2P, S.STOP, S.RUNNING_P2P, id="middle-arc"),
    ],
)
def test_failed_set_reads_back_the_last_good_step(
    make_failing_device: Callable[..., MigrationDevice],
    target: DeviceState,
    src: DeviceState,
    dst: DeviceState,
    after: DeviceState,
) -> None:
    device = make_failing_device(ALL, src, dst, errno.EIO)
    with pytest.raises(StateChangeError) as info:
        device.set_state(target)
    assert info.value.errno == errno.EIO
    assert info.value.state_before == S.RUNNING
    assert info.value.state_after == after
    assert device.get_state() is after
    check_debugfs(device, after)
    assert device.session is None


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        pytest.param(S.PRE_COPY, S.PRE_COPY_P2P, id="PRE_COPY>PRE_COPY_P2P"),
        pytest.param(S.PRE_COPY_P2P, S.STOP_COPY, id="PRE_COPY_P2P>STOP_COPY"),
    ],
)
def test_failed_set_inside_the_saving_group_keeps_the_session(
    make_failing_device: Callable[..., MigrationDevice], src: DeviceState, dst: DeviceState
) -> None:
    device = make_failing_device(ALL, src, dst, errno.EIO)
    session = device.set_state(S.PRE_COPY)
    assert session is not None
    with pytest.raises(StateChangeError) as info:
        device.set_state(S.STOP_COPY)
    assert info.value.state_after == src
    assert device.session is session
    assert session.readinto(bytearray(16))


def test_failed_set_leaving_the_saving_group_drops_the_session(
    make_failing_device: Callable[..., MigrationDevice],
) -> None:
    device = make_failing_device(ALL, S.STOP, S.RESUMING, errno.ENOMEM)
    session = device.set_state(S.STOP_COPY)
    assert session is not None
    with pytest.raises(StateChangeError) as info:
        device.set_state(S.RESUMING)
    assert (info.value.errno, info.value.state_after) == (errno.ENOMEM, S.STOP)
    assert device.session is None
    assert session.closed


def test_short_stream_keeps_resuming_until_reset(make_pair: MakePair) -> None:
    source, destination = make_pair(F.STOP_COPY)
    saving = source.set_state(S.STOP_COPY)
    resuming = destination.set_state(S.RESUMING)
    assert saving is not None
    assert resuming is not None
    stream = drain(saving)
    write_all(resuming, stream[: len(stream) // 2])
    with pytest.raises(StateChangeError) as info:
        destination.set_state(S.RUNNING)
    assert (info.value.errno, info.value.state_after) == (errno.EINVAL, S.RESUMING)
    assert destination.session is resuming
    destination.reset()
    assert destination.get_state() is S.RUNNING


# --- the round trip ------------------------------------------------------------------------


@pytest.mark.parametrize("flags", fsm.FLAG_SETS, ids=flag_id)
def test_save_resume_round_trip(
    make_pair: MakePair,
    content_digest: Callable[[MigrationDevice], str],
    flags: MigrationFlags,
) -> None:
    source, destination = make_pair(flags)
    resuming = destination.set_state(S.RESUMING)
    assert resuming is not None
    if F.PRE_COPY in flags:
        saving = source.set_state(S.PRE_COPY)
        assert saving is not None
        write_all(resuming, drain(saving))
        assert source.set_state(S.STOP_COPY) is None
    else:
        saving = source.set_state(S.STOP_COPY)
        assert saving is not None
    write_all(resuming, drain(saving))
    assert destination.set_state(S.STOP) is None
    assert resuming.closed
    destination.set_state(S.RUNNING)
    source.set_state(S.STOP)
    assert content_digest(destination) == content_digest(source)
