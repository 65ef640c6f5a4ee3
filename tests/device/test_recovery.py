"""``recover(device)``: a device left in any state by a crashed process comes back to RUNNING.

The leftover states are made the way a real crash makes them: an earlier opener of a
``sim:`` device with ``state-dir=`` drives it and goes away (in one test, a separate
process that dies with ``os._exit``); recovery then opens the same spec afresh. A spy
device around the sim records every primitive call, so the tests check the exact
ioctls sent -- above all that nothing but a reset ever touches a device found in RESUMING.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import pytest

from vfmig.core.fsm import DeviceState, MigrationFlags
from vfmig.device.backend import DataSession, MigrationDevice
from vfmig.device.open import open_device
from vfmig.device.recovery import Method, Outcome, Step, recover

if TYPE_CHECKING:
    from pathlib import Path

    from vfmig.device.debugfs import DebugfsReader

S = DeviceState
ALL = "stop-copy+p2p+pre-copy"


class Spy(MigrationDevice):
    """A device that passes every primitive to ``inner`` and records it; faults on demand."""

    def __init__(
        self,
        inner: MigrationDevice,
        *,
        get_errno: int | None = None,
        reset_errno: int | None = None,
        state_override: DeviceState | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.kind = inner.kind
        self.name = inner.name
        self.flags = inner.flags
        self.calls: list[str] = []
        self.get_errno = get_errno
        self.reset_errno = reset_errno
        self.state_override = state_override

    def _get_state(self) -> DeviceState:
        self.calls.append("GET")
        if self.get_errno is not None:
            raise OSError(self.get_errno, "injected GET failure")
        if self.state_override is not None:
            return self.state_override
        return self.inner._get_state()

    def _set_state(self, target: int) -> DataSession | None:
        self.calls.append(f"SET {DeviceState(target).name}")
        return self.inner._set_state(target)

    def _reset(self) -> None:
        self.calls.append("RESET")
        if self.reset_errno is not None:
            raise OSError(self.reset_errno, "injected reset failure")
        self.state_override = None
        self.inner._reset()

    def _data_size(self) -> int:
        return self.inner._data_size()

    def _close(self) -> None:
        self.inner.close()

    @property
    def debugfs(self) -> DebugfsReader | None:
        return self.inner.debugfs


def spec(tmp_path: Path, flags: str = ALL, extra: str = "") -> str:
    return f"sim:left,size=256KiB,flags={flags},state-dir={tmp_path / 'state'}{extra}"


def leave_in(tmp_path: Path, state: DeviceState, flags: str = ALL) -> None:
    """An earlier run that took the device to ``state`` and went away."""
    if state is S.ERROR:
        with open_device(spec(tmp_path, flags, ",error=RUNNING>PRE_COPY")) as device:
            with pytest.raises(Exception, match="EIO"):
                device.set_state(S.PRE_COPY)
            assert device.get_state() is S.ERROR
        return
    with open_device(spec(tmp_path, flags)) as device:
        if state is S.STOP_COPY and MigrationFlags.PRE_COPY in device.flags:
            device.set_state(S.PRE_COPY)  # the usual way in: precopy, then stop-copy
        device.set_state(state)


def state_on_reopen(tmp_path: Path, flags: str = ALL) -> tuple[DeviceState, str | None]:
    """The state a later opener finds, by ioctl and by the (simulated) debugfs file."""
    with open_device(spec(tmp_path, flags)) as device:
        reading = device.debugfs.read_state() if device.debugfs is not None else None
        text = reading.state.name if reading is not None and reading.state is not None else None
        return device.get_state(), text


#: What recovery sends for a device found in each state (all three flags): GETs, SETs, resets.
EXPECTED = {
    S.RUNNING: ["GET"],
    S.PRE_COPY: ["GET", "GET", "SET RUNNING", "GET"],
    S.PRE_COPY_P2P: ["GET", "GET", "SET RUNNING_P2P", "GET", "SET RUNNING", "GET"],
    S.STOP_COPY: [
        *("GET", "GET", "SET STOP", "GET", "SET RUNNING_P2P", "GET", "SET RUNNING", "GET")
    ],
    S.STOP: ["GET", "GET", "SET RUNNING_P2P", "GET", "SET RUNNING", "GET"],
    S.RUNNING_P2P: ["GET", "GET", "SET RUNNING", "GET"],
    S.RESUMING: ["GET", "RESET", "GET"],
    S.ERROR: ["GET", "RESET", "GET"],
}


@pytest.mark.parametrize("state", list(EXPECTED), ids=lambda s: s.name)
def test_every_leftover_state_comes_back_to_running(tmp_path: Path, state: DeviceState) -> None:
    leave_in(tmp_path, state)
    assert state_on_reopen(tmp_path) == (state, state.name)
    seen: list[Step] = []
    with Spy(open_device(spec(tmp_path))) as device:
        report = recover(device, observer=seen.append)
        calls = device.calls
    assert calls == EXPECTED[state]
    assert report.found is state
    assert report.final is S.RUNNING
    assert report.ok
    assert list(report.steps) == seen
    assert state_on_reopen(tmp_path) == (S.RUNNING, "RUNNING")
    if state is S.RUNNING:
        assert report.outcome is Outcome.NOTHING_TO_DO
        assert report.methods == ()
    else:
        assert report.outcome is Outcome.RECOVERED
        reset = state in (S.RESUMING, S.ERROR)
        assert report.methods == ((Method.RESET,) if reset else (Method.FSM,))


def test_stop_copy_leaves_through_stop_and_each_arc_is_a_step(tmp_path: Path) -> None:
    leave_in(tmp_path, S.STOP_COPY)
    with open_device(spec(tmp_path)) as device:
        report = recover(device)
    assert [step.describe() for step in report.steps] == [
        "GET: STOP_COPY",
        "SET STOP_COPY>STOP: ok, now STOP",
        "SET STOP>RUNNING_P2P: ok, now RUNNING_P2P",
        "SET RUNNING_P2P>RUNNING: ok, now RUNNING",
        "GET: RUNNING -- checking the result",
    ]


def test_without_p2p_the_path_skips_the_p2p_states(tmp_path: Path) -> None:
    flags = "stop-copy"
    leave_in(tmp_path, S.STOP_COPY, flags)
    with Spy(open_device(spec(tmp_path, flags))) as device:
        report = recover(device)
        calls = device.calls
    assert calls == ["GET", "GET", "SET STOP", "GET", "SET RUNNING", "GET"]
    assert [step.request for step in report.steps if step.method is Method.FSM] == [
        "STOP_COPY>STOP",
        "STOP>RUNNING",
    ]
    assert report.ok


def test_resuming_is_reset_even_when_a_stream_was_half_written(tmp_path: Path) -> None:
    with open_device("sim:left,size=256KiB") as source, open_device(spec(tmp_path)) as device:
        saving = source.set_state(S.STOP_COPY)
        resuming = device.set_state(S.RESUMING)
        assert saving is not None
        assert resuming is not None
        chunk = bytearray(4096)
        assert saving.readinto(chunk) == len(chunk)
        assert resuming.write(chunk) == len(chunk)  # a stream cut short by the crash
    with Spy(open_device(spec(tmp_path))) as device:
        report = recover(device)
        calls = device.calls
    assert not any(call.startswith("SET") for call in calls)
    assert calls == ["GET", "RESET", "GET"]
    assert "always reset first" in report.steps[1].note
    assert report.ok


def test_a_failed_set_is_read_back_and_falls_back_to_reset(tmp_path: Path) -> None:
    leave_in(tmp_path, S.STOP_COPY)
    with Spy(open_device(spec(tmp_path, extra=",fail=STOP_COPY>STOP:EIO"))) as device:
        report = recover(device)
        calls = device.calls
    # GET (found), GET (vetting), SET fails, GET (read back), RESET, GET (check)
    assert calls == ["GET", "GET", "SET STOP", "GET", "RESET", "GET"]
    failed = report.steps[1]
    assert (failed.method, failed.request, failed.ok) == (Method.FSM, "STOP_COPY>STOP", False)
    assert (failed.errno, failed.after) == (errno.EIO, S.STOP_COPY)
    assert failed.describe() == (
        "SET STOP_COPY>STOP: failed: Input/output error (EIO), now STOP_COPY"
    )
    assert report.steps[2].describe() == "reset: ok, now RUNNING -- the SET STOP_COPY>STOP failed"
    assert report.methods == (Method.RESET,)
    assert report.ok


def test_a_set_that_drops_the_device_into_error_is_reset(tmp_path: Path) -> None:
    leave_in(tmp_path, S.PRE_COPY_P2P)
    with open_device(spec(tmp_path, extra=",error=RUNNING_P2P>RUNNING")) as device:
        report = recover(device)
    fsm_steps = [step for step in report.steps if step.method is Method.FSM]
    assert [step.ok for step in fsm_steps] == [True, False]
    assert fsm_steps[1].after is S.ERROR
    assert report.methods == (Method.FSM, Method.RESET)
    assert report.ok
    assert state_on_reopen(tmp_path) == (S.RUNNING, "RUNNING")


def test_an_unreadable_state_is_reset(tmp_path: Path) -> None:
    leave_in(tmp_path, S.RESUMING)
    with Spy(open_device(spec(tmp_path)), get_errno=errno.EIO) as device:
        report = recover(device)
        calls = device.calls
    assert calls == ["GET", "RESET", "GET"]
    assert report.found is None
    assert report.steps[0].describe() == "GET: failed: Input/output error (EIO), now unknown"
    assert not report.ok  # the GET still fails after the reset: nobody can say it runs
    assert report.outcome is Outcome.FAILED


def test_a_state_the_flags_do_not_allow_is_reset(tmp_path: Path) -> None:
    with Spy(open_device(spec(tmp_path, "stop-copy")), state_override=S.PRE_COPY_P2P) as device:
        report = recover(device)
        calls = device.calls
    assert calls == ["GET", "RESET", "GET"]
    assert "not a state this device's flags allow" in report.steps[1].note
    assert report.ok


def test_a_failed_reset_is_reported_not_raised(tmp_path: Path) -> None:
    leave_in(tmp_path, S.ERROR)
    with Spy(open_device(spec(tmp_path)), reset_errno=errno.EBUSY) as device:
        report = recover(device)
    assert [step.method for step in report.steps] == [Method.READ, Method.RESET, Method.READ]
    assert report.steps[1].errno == errno.EBUSY
    assert (report.found, report.final, report.ok) == (S.ERROR, S.ERROR, False)
    assert report.outcome is Outcome.FAILED
    assert report.methods == ()


def test_recovers_after_a_process_that_died_in_precopy(tmp_path: Path) -> None:
    crash = textwrap.dedent(
        f"""
        import os
        from vfmig.core.fsm import DeviceState
        from vfmig.device.open import open_device
        device = open_device({spec(tmp_path)!r})
        session = device.set_state(DeviceState.PRE_COPY)
        session.readinto(bytearray(4096))
        os._exit(0)  # no close, no cleanup: the process just dies
        """
    )
    subprocess.run([sys.executable, "-c", crash], check=True, cwd=tmp_path)
    with open_device(spec(tmp_path)) as device:
        report = recover(device)
    assert report.found is S.PRE_COPY
    assert [step.request for step in report.steps if step.method is Method.FSM] == [
        "PRE_COPY>RUNNING"
    ]
    assert report.ok
