"""``vfmig migrate`` in local mode: both devices served by agent code inside the command."""

from __future__ import annotations

import json

import pytest

from vfmig.core.fsm import DeviceState

S = DeviceState


def test_precopy_moves_the_bytes_and_leaves_rest_states(sims, cli) -> None:
    src = sims.spec("a", size=3 << 20)
    dst = sims.spec("b", size=3 << 20, image=False, dump=True)
    result = cli("migrate", src, dst)
    assert result.status == 0, result.stderr
    assert (sims.state("a"), sims.state("b")) == (S.STOP, S.RUNNING)
    assert sims.dump("b") == sims.image("a")
    assert "phase precopy" in result.stdout
    assert "completed" in result.stdout
    assert result.stderr == ""


def test_precopy_with_a_dirtying_source_sends_the_final_content(sims, cli) -> None:
    src = sims.spec("a", size=4 << 20, dirty_rate="8MiB/s")
    dst = sims.spec("b", size=4 << 20, image=False, dump=True)
    result = cli("migrate", src, dst)
    assert result.status == 0, result.stderr
    assert (sims.state("a"), sims.state("b")) == (S.STOP, S.RUNNING)
    dumped = sims.dump("b")
    assert dumped is not None
    assert dumped != sims.image("a")  # pages were dirtied meanwhile
    assert sims.dump_digest("b") == sims.content("a")


def test_stop_copy_only(sims, cli) -> None:
    src = sims.spec("a", size=1 << 20)
    dst = sims.spec("b", size=1 << 20, image=False, dump=True)
    result = cli("migrate", "--no-precopy", src, dst)
    assert result.status == 0, result.stderr
    assert "phase precopy" not in result.stdout
    assert (sims.state("a"), sims.state("b")) == (S.STOP, S.RUNNING)
    assert sims.dump("b") == sims.image("a")


def test_several_pairs_in_one_run(sims, cli) -> None:
    argv = []
    for i in range(3):
        size = (i + 1) << 20
        argv += [
            sims.spec(f"s{i}", size=size),
            sims.spec(f"d{i}", size=size, image=False, dump=True),
        ]
    result = cli("migrate", *argv)
    assert result.status == 0, result.stderr
    for i in range(3):
        assert (sims.state(f"s{i}"), sims.state(f"d{i}")) == (S.STOP, S.RUNNING)
        assert sims.dump(f"d{i}") == sims.image(f"s{i}")
    assert "P2P staging" in result.stdout


def test_uncompressed_json(sims, cli) -> None:
    src = sims.spec("a", size=1 << 20)
    dst = sims.spec("b", size=1 << 20, image=False, dump=True)
    result = cli("migrate", "--json", "--compress-level", "none", src, dst)
    assert result.status == 0, result.stderr
    envelope = json.loads(result.stdout)
    assert envelope["ok"] is True
    assert envelope["result"]["outcome"] == "completed"
    moved = envelope["result"]["bytes"]["src0"]
    assert moved["raw"] == moved["wire"] > 1 << 20
    assert sims.dump("b") == sims.image("a")


def test_write_error_rolls_back(sims, cli) -> None:
    src = sims.spec("a", size=3 << 20)
    dst = sims.spec("b", size=3 << 20, image=False, dump=True, write_error="1MiB:ENOMEM")
    result = cli("migrate", src, dst)
    assert result.status == 1
    assert (sims.state("a"), sims.state("b")) == (S.RUNNING, S.RUNNING)
    assert sims.dump("b") is None
    assert "dst0 (sim:b" in result.stderr
    assert "precopy: data write at offset 1048576" in result.stderr
    assert "(ENOMEM)" in result.stderr


def test_same_device_on_both_sides_is_refused(sims, cli) -> None:
    src = sims.spec("a")
    result = cli("migrate", src, src)
    assert result.status == 2
    assert "the same device is named twice" in result.stderr
    assert sims.state("a") is S.RUNNING


def test_odd_device_count_is_a_usage_error(sims, cli) -> None:
    result = cli("migrate", sims.spec("a"))
    assert result.status == 2
    assert "devices come in pairs" in result.stderr


@pytest.mark.parametrize("leftover", ["RESUMING", "STOP_COPY"])
def test_a_leftover_source_is_refused(sims, cli, leftover) -> None:
    src = sims.spec("a")
    dst = sims.spec("b", image=False)
    from vfmig.device.open import open_device

    with open_device(src) as device:
        if leftover == "RESUMING":
            device.set_state(S.STOP)
        device.set_state(S[leftover])
    result = cli("migrate", src, dst)
    assert result.status == 3
    assert "left over from an earlier run" in result.stderr
    assert (sims.state("a"), sims.state("b")) == (S[leftover], S.RUNNING)


def test_memory_does_not_grow_with_the_state_size(sims, tmp_path) -> None:
    """A 384 MiB state moves through a process that never holds more than a few windows."""
    import os
    import subprocess
    import sys

    size = 384 << 20
    src = sims.spec("a", size=size, image=False, content="random")
    dst = sims.spec("b", size=size, image=False)
    code = (
        "import sys\n"
        "from vfmig.cli.main import main\n"
        "status = main(['migrate', '--json', sys.argv[1], sys.argv[2]])\n"
        # VmHWM, not ru_maxrss: the latter keeps the (v)forking pytest's RSS across exec
        "peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
        "print('PEAK', peak, file=sys.stderr)\n"
        "sys.exit(status)\n"
    )
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(
        [sys.executable, "-c", code, src, dst],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stderr.split("PEAK")[-1])
    assert peak_kib < 160 << 10, f"peak RSS {peak_kib >> 10} MiB for a {size >> 20} MiB state"
    assert (sims.state("a"), sims.state("b")) == (S.STOP, S.RUNNING)
