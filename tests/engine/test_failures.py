"""The failure matrix, through ``vfmig migrate``: every arc of a run failing, entering ERROR or
hanging, and every kind of stream fault. Each case checks both devices' final states
(docs/failure-policy.md), the bytes, the exit status and what the message names."""

from __future__ import annotations

import hashlib
import signal

import pytest

from vfmig.core.fsm import DeviceState

from .conftest import signal_in_precopy

S = DeviceState
RU, ST, SC, RS = S.RUNNING, S.STOP, S.STOP_COPY, S.RESUMING

#: Each single arc a one-pair precopy run takes, the device it belongs to, the request
#: (arc) the error names, and where both devices end when it fails before anything else:
#: (source, destination, exit status).
PRECOPY_ARCS = [
    ("dst", "RUNNING>RUNNING_P2P", "setup", "RUNNING>RESUMING", (RU, RU, 1)),
    ("dst", "RUNNING_P2P>STOP", "setup", "RUNNING>RESUMING", (RU, RU, 1)),
    ("dst", "STOP>RESUMING", "setup", "RUNNING>RESUMING", (RU, RU, 1)),
    ("src", "RUNNING>PRE_COPY", "setup", "RUNNING>PRE_COPY", (RU, RU, 1)),
    ("src", "PRE_COPY>PRE_COPY_P2P", "switchover", "PRE_COPY>STOP_COPY", (RU, RU, 1)),
    ("src", "PRE_COPY_P2P>STOP_COPY", "switchover", "PRE_COPY>STOP_COPY", (RU, RU, 1)),
    ("dst", "RESUMING>STOP", "resume", "RESUMING>STOP", (RU, RU, 1)),
    ("dst", "STOP>RUNNING_P2P", "commit", "STOP>RUNNING", (ST, ST, 1)),
    ("dst", "RUNNING_P2P>RUNNING", "commit", "STOP>RUNNING", (ST, ST, 1)),
    ("src", "STOP_COPY>STOP", "commit", "STOP_COPY>STOP", (SC, RU, 0)),
]

#: The arcs only a stop-copy run takes (the source stops from RUNNING).
STOP_COPY_ARCS = [
    ("src", "RUNNING>RUNNING_P2P", "switchover", "RUNNING>STOP_COPY", (RU, RU, 1)),
    ("src", "RUNNING_P2P>STOP", "switchover", "RUNNING>STOP_COPY", (RU, RU, 1)),
    ("src", "STOP>STOP_COPY", "switchover", "RUNNING>STOP_COPY", (RU, RU, 1)),
]

ERRNOS = ["EINVAL", "EIO", "ENOMEM", "EBUSY"]

SIZE = 1 << 20


def pair(sims, *, src: dict[str, str] | None = None, dst: dict[str, str] | None = None):
    return (
        sims.spec("a", size=SIZE, **(src or {})),
        sims.spec("b", size=SIZE, image=False, dump=True, **(dst or {})),
    )


def check_bytes(sims, dst_state: DeviceState) -> None:
    """A destination that runs holds the source's image; one that does not never loaded it.
    The source's own state is never lost."""
    if dst_state is RU and sims.dump("b") is not None:
        assert sims.dump("b") == sims.image("a")
    image = hashlib.blake2b(sims.image("a"), digest_size=32).hexdigest()
    assert sims.content("a") == image


def expect(result, status: int, *texts: str) -> None:
    assert result.status == status, result.stdout + result.stderr
    for text in texts:
        assert text in result.stderr, f"{text!r} not in:\n{result.stderr}"


@pytest.mark.parametrize("errno", ERRNOS)
@pytest.mark.parametrize(
    ("side", "arc", "phase", "asked", "end"),
    PRECOPY_ARCS,
    ids=[f"{side}-{arc}" for side, arc, *_ in PRECOPY_ARCS],
)
def test_an_arc_fails(sims, cli, side, arc, phase, asked, end, errno) -> None:
    fault = {"fail": f"{arc}:{errno}"}
    src, dst = pair(
        sims, src=fault if side == "src" else None, dst=fault if side == "dst" else None
    )
    result = cli("migrate", src, dst)
    src_end, dst_end, status = end
    device = "src0 (sim:a" if side == "src" else "dst0 (sim:b"
    expect(result, status, device, f"{phase}: {asked}", f"({errno})")
    assert (sims.state("a"), sims.state("b")) == (src_end, dst_end)
    check_bytes(sims, dst_end)
    if status == 0:
        assert sims.dump("b") == sims.image("a")
    else:
        assert sims.dump("b") is None


@pytest.mark.parametrize(
    ("side", "arc", "phase", "asked", "end"),
    STOP_COPY_ARCS,
    ids=[arc for _, arc, *_ in STOP_COPY_ARCS],
)
def test_an_arc_of_a_stop_copy_run_fails(sims, cli, side, arc, phase, asked, end) -> None:
    src, dst = pair(sims, src={"fail": f"{arc}:EIO"})
    result = cli("migrate", "--no-precopy", src, dst)
    expect(result, 1, "src0 (sim:a", f"{phase}: {asked}", "(EIO)")
    assert (sims.state("a"), sims.state("b")) == end[:2]
    check_bytes(sims, RU)
    assert sims.dump("b") is None


#: Arcs that put the device in ERROR, and where both devices end.
ERROR_ARCS = [
    ("dst", "STOP>RESUMING", (RU, RU, 1)),
    ("src", "RUNNING>PRE_COPY", (RU, RU, 1)),
    ("src", "PRE_COPY_P2P>STOP_COPY", (RU, RU, 1)),
    ("dst", "RESUMING>STOP", (RU, RU, 1)),
    # After the commit point a source is never reset (it would run): it stays in ERROR.
    ("src", "STOP_COPY>STOP", (S.ERROR, RU, 0)),
]


@pytest.mark.parametrize(("side", "arc", "end"), ERROR_ARCS, ids=[a for _, a, _ in ERROR_ARCS])
def test_a_step_enters_error(sims, cli, side, arc, end) -> None:
    fault = {"error": arc}
    src, dst = pair(
        sims, src=fault if side == "src" else None, dst=fault if side == "dst" else None
    )
    result = cli("migrate", src, dst)
    src_end, dst_end, status = end
    expect(result, status, "state read back afterwards: ERROR", "(EIO)")
    assert (sims.state("a"), sims.state("b")) == (src_end, dst_end)
    if status == 0:
        assert sims.dump("b") == sims.image("a")
    else:
        check_bytes(sims, dst_end)
        assert sims.dump("b") is None


#: Arcs that hang; the hung device stays where it was, the other follows the policy.
HANG_ARCS = [
    ("dst", "STOP>RESUMING", (RU, ST)),
    ("src", "RUNNING>PRE_COPY", (RU, RU)),
    ("src", "PRE_COPY_P2P>STOP_COPY", (S.PRE_COPY_P2P, RU)),
    ("dst", "RESUMING>STOP", (RU, RS)),
    ("dst", "STOP>RUNNING_P2P", (ST, ST)),
    ("src", "STOP_COPY>STOP", (SC, RU)),
]


@pytest.mark.parametrize(("side", "arc", "end"), HANG_ARCS, ids=[a for _, a, _ in HANG_ARCS])
def test_a_step_hangs(sims, cli, side, arc, end) -> None:
    fault = {"hang": arc}
    src, dst = pair(
        sims, src=fault if side == "src" else None, dst=fault if side == "dst" else None
    )
    result = cli("migrate", "--timeout", "0.5", src, dst)
    device = "src0 (sim:a" if side == "src" else "dst0 (sim:b"
    expect(result, 6, device, "the device did not return from a step")
    assert (sims.state("a"), sims.state("b")) == end
    assert sims.dump("b") is None or sims.dump("b") == sims.image("a")


def test_a_data_read_hangs(sims, cli) -> None:
    src, dst = pair(sims, src={"read_delay": "3s"})
    result = cli("migrate", "--timeout", "0.5", src, dst)
    expect(result, 6, "src0 (sim:a", "did not return from a step")
    # The read holds the device: it is named even when a query queued behind it (precopy
    # info, data size) is the request that timed out (the agent's answer names the culprit).
    assert "precopy: data read" in result.stderr, result.stderr
    assert sims.state("b") is RU  # reset
    assert sims.dump("b") is None


@pytest.mark.parametrize("precopy", [True, False], ids=["precopy", "stop-copy"])
@pytest.mark.parametrize("errno", ["EIO", "ENODEV"])
def test_a_read_error_stops_the_stream(sims, cli, precopy, errno) -> None:
    src, dst = pair(sims, src={"read_error": f"512KiB:{errno}"})
    result = cli("migrate", *([] if precopy else ["--no-precopy"]), src, dst)
    phase = "precopy" if precopy else "stopcopy"
    expect(result, 1, "src0 (sim:a", f"{phase}: data read at offset 524288", f"({errno})")
    assert (sims.state("a"), sims.state("b")) == (RU, RU)
    check_bytes(sims, RU)
    assert sims.dump("b") is None


@pytest.mark.parametrize("precopy", [True, False], ids=["precopy", "stop-copy"])
@pytest.mark.parametrize("errno", ["ENOMEM", "EFAULT", "EINVAL"])
def test_a_write_error_stops_the_stream_at_once(sims, cli, precopy, errno) -> None:
    src, dst = pair(sims, dst={"write_error": f"512KiB:{errno}"})
    result = cli("migrate", *([] if precopy else ["--no-precopy"]), src, dst)
    phase = "precopy" if precopy else "stopcopy"
    expect(result, 1, "dst0 (sim:b", f"{phase}: data write at offset 524288", f"({errno})")
    assert (sims.state("a"), sims.state("b")) == (RU, RU)
    check_bytes(sims, RU)
    assert sims.dump("b") is None


@pytest.mark.parametrize(
    ("fault", "cause"),
    [({"truncate": "300KiB"}, "stream-rejected"), ({"corrupt": "100"}, "stream-rejected")],
    ids=["truncated", "corrupt"],
)
def test_a_damaged_stream_is_rejected_by_the_destination(sims, cli, fault, cause) -> None:
    src, dst = pair(sims, src=fault)
    result = cli("migrate", "--no-precopy", src, dst)
    expect(result, 1, "dst0 (sim:b", "resume: RESUMING>STOP", "rejected the migration data")
    assert (sims.state("a"), sims.state("b")) == (RU, RU)
    check_bytes(sims, RU)
    assert sims.dump("b") is None


def test_devices_of_different_sizes_fail_cleanly(sims, cli) -> None:
    src = sims.spec("a", size=SIZE)
    dst = sims.spec("b", size=2 * SIZE, image=False, dump=True)
    result = cli("migrate", src, dst)
    expect(result, 1, "dst0 (sim:b", "data write at offset 0", "(EFAULT)", "different types")
    assert (sims.state("a"), sims.state("b")) == (RU, RU)
    assert sims.dump("b") is None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_rolls_back_and_exits_130(sims, sig, tmp_path) -> None:
    # 2 MiB reads 40 ms apart: precopy of 64 MiB takes 1.3 s
    src = sims.spec("a", size=64 << 20, image=False, read_delay="40ms")
    dst = sims.spec("b", size=64 << 20, image=False, dump=True)
    result = signal_in_precopy(["migrate", src, dst], sig, tmp_path)
    stdout, stderr = result.stdout, result.stderr
    assert result.status == 130, stdout + stderr
    assert "vfmig: error: precopy: interrupted: the run is rolled back" in stderr
    assert f"({sig.name}: interrupted by the user)" in stderr
    assert "phase rollback" in stdout
    assert (sims.state("a"), sims.state("b")) == (RU, RU)
    assert sims.dump("b") is None
