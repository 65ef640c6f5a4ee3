"""``vfmig recover``: text and JSON reports, failures, a hung device, a crash in another process."""

from __future__ import annotations

import errno
import io
import json
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import pytest

from vfmig.cli import recover
from vfmig.cli.context import Environment
from vfmig.cli.main import build_parser, main
from vfmig.core.errors import DeviceError
from vfmig.core.fsm import DeviceState
from vfmig.core.spec import sim_options
from vfmig.device.open import open_device
from vfmig.device.sim import SimDevice, release_hangs

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from vfmig.core.spec import DeviceSpec
    from vfmig.device.backend import MigrationDevice


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), Environment(stdout=out, stderr=err, stdout_isatty=False))
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def spec(tmp_path: Path) -> str:
    return f"sim:dev,size=128KiB,state-dir={tmp_path / 'state'}"


def leave_in(spec: str, *states: DeviceState) -> None:
    with open_device(spec) as device:
        for state in states:
            device.set_state(state)


def test_nothing_to_do(spec: str) -> None:
    status, out, err = run("recover", spec)
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        f"recovering {spec}",
        "  GET: RUNNING",
        "nothing to do: the device is RUNNING",
    ]


def test_stop_copy_reports_each_step(spec: str) -> None:
    leave_in(spec, DeviceState.PRE_COPY, DeviceState.STOP_COPY)
    status, out, _ = run("recover", spec)
    assert status == 0
    assert out.splitlines() == [
        f"recovering {spec}",
        "  GET: STOP_COPY",
        "  SET STOP_COPY>STOP: ok, now STOP",
        "  SET STOP>RUNNING_P2P: ok, now RUNNING_P2P",
        "  SET RUNNING_P2P>RUNNING: ok, now RUNNING",
        "  GET: RUNNING -- checking the result",
        "recovered: STOP_COPY -> RUNNING by the FSM",
    ]
    assert run("recover", spec)[1].splitlines()[-1] == "nothing to do: the device is RUNNING"


def test_json_envelope_for_a_device_found_in_resuming(spec: str) -> None:
    leave_in(spec, DeviceState.RESUMING)
    status, out, _ = run("recover", "--json", spec)
    assert status == 0
    envelope = json.loads(out)
    assert (envelope["command"], envelope["ok"], envelope["error"]) == ("recover", True, None)
    result = envelope["result"]
    assert {k: result[k] for k in ("spec", "device", "found", "final", "outcome", "methods")} == {
        "spec": spec,
        "device": "dev",
        "found": "RESUMING",
        "final": "RUNNING",
        "outcome": "recovered",
        "methods": ["reset"],
    }
    assert [(s["method"], s["request"], s["after"], s["ok"]) for s in result["steps"]] == [
        ("read", "GET", "RESUMING", True),
        ("reset", "reset", "RUNNING", True),
        ("read", "GET", "RUNNING", True),
    ]


def test_failed_set_then_reset_in_json(spec: str) -> None:
    leave_in(spec, DeviceState.STOP)
    status, out, _ = run("recover", "--json", spec + ",fail=STOP>RUNNING_P2P:EBUSY")
    assert status == 0
    result = json.loads(out)["result"]
    failed = result["steps"][1]
    assert failed == {
        "method": "fsm",
        "request": "STOP>RUNNING_P2P",
        "before": "STOP",
        "after": "STOP",
        "ok": False,
        "errno": "EBUSY",
        "note": "Device or resource busy",
    }
    assert result["methods"] == ["reset"]


def test_a_busy_device_is_one_error_line(spec: str) -> None:
    with open_device(spec):  # another process holds it
        status, out, err = run("recover", spec)
    assert status == 3
    assert out == ""
    lines = err.splitlines()
    assert lines[0].startswith("vfmig: error: dev: open: device busy")
    assert lines[1].startswith("hint: ")


def test_json_reports_an_open_error_in_the_envelope(spec: str) -> None:
    with open_device(spec):
        status, out, _ = run("recover", "--json", spec)
    assert status == 3
    envelope = json.loads(out)
    assert envelope["ok"] is False
    assert envelope["result"] is None
    assert envelope["error"]["type"] == "DeviceError"
    assert "device busy" in envelope["error"]["message"]


def test_bad_timeout_and_bad_spec_are_usage_errors(spec: str) -> None:
    status, _, err = run("recover", "--timeout", "soon", spec)
    assert status == 2
    assert "--timeout 'soon' is not a duration" in err
    assert run("recover", "--timeout", "0", spec)[0] == 2
    assert run("recover", "sim:dev,colour=blue")[0] == 2


@pytest.fixture
def _hangs_released() -> Iterator[None]:
    yield
    release_hangs()


@pytest.mark.usefixtures("_hangs_released")
def test_a_hung_device_exits_6_naming_the_last_step(spec: str) -> None:
    leave_in(spec, DeviceState.STOP)
    status, out, err = run("recover", "--timeout", "300ms", spec + ",hang=RUNNING_P2P>RUNNING")
    assert status == 6
    assert out.splitlines()[-1] == "  SET STOP>RUNNING_P2P: ok, now RUNNING_P2P"
    assert err.splitlines() == [
        "vfmig: error: dev: recover: no answer from the device within 0.3 s; the last step "
        "that returned: SET STOP>RUNNING_P2P: ok, now RUNNING_P2P",
        "hint: the driver may be stuck holding its lock: check the host's kernel log",
    ]


class ResetFails(SimDevice):
    """A simulated device whose VFIO_DEVICE_RESET fails (the sim's own reset never does)."""

    def _reset(self) -> None:
        raise OSError(errno.EIO, "injected reset failure")


def opener(spec: DeviceSpec) -> MigrationDevice:
    return ResetFails(spec.name, sim_options(spec))


@pytest.mark.parametrize("as_json", [False, True])
def test_a_device_that_stays_broken_fails_with_status_3(spec: str, as_json: bool) -> None:
    leave_in(spec, DeviceState.RESUMING)
    out, err = io.StringIO(), io.StringIO()
    args = build_parser().parse_args(["recover", *(["--json"] if as_json else []), spec])
    with pytest.raises(DeviceError) as caught:
        recover.run(args, Environment(stdout=out, stderr=err), opener=opener)
    assert str(caught.value) == (
        "dev: recover: the device is not RUNNING after recovery (state: RESUMING)"
    )
    assert caught.value.exit_status == 3
    if as_json:
        envelope = json.loads(out.getvalue())
        assert envelope["ok"] is False
        assert envelope["error"]["message"] == str(caught.value)
        assert envelope["result"]["outcome"] == "failed"
        assert envelope["result"]["steps"][1]["errno"] == "EIO"
    else:
        assert out.getvalue().splitlines()[2:] == [
            "  reset: failed: a device found in RESUMING is always reset first (stepping out "
            "of a reopened RESUMING oopses mtty); Input/output error (EIO), now unknown",
            "  GET: RESUMING -- after the failed reset",
        ]


def test_recovers_a_device_whose_process_crashed_mid_stop_copy(spec: str, tmp_path: Path) -> None:
    crash = textwrap.dedent(
        f"""
        import os
        from vfmig.core.fsm import DeviceState
        from vfmig.device.open import open_device
        device = open_device({spec!r})
        device.set_state(DeviceState.PRE_COPY)
        session = device.set_state(DeviceState.STOP_COPY) or device.session
        session.readinto(bytearray(8192))
        os._exit(9)
        """
    )
    assert subprocess.run([sys.executable, "-c", crash], cwd=tmp_path).returncode == 9
    status, out, _ = run("recover", spec)
    assert status == 0
    assert out.splitlines()[1] == "  GET: STOP_COPY"
    assert out.splitlines()[-1] == "recovered: STOP_COPY -> RUNNING by the FSM"
