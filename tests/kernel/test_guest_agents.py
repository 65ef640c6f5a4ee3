"""In the guest: two ``vfmig agent`` processes over loopback migrate an mtty device.

``vfmig keygen`` writes the shared key (run in this process, to save a Python start-up);
one agent serves the source mdev, the other the destination, each on a port it picks
(``--listen 127.0.0.1:0``, read back from its log); ``vfmig migrate
'vfio:SRC@127.0.0.1:P1' 'vfio:DST@127.0.0.1:P2' --key-file K`` drives them, and the device
data flows between the agents. SIGTERM then stops both cleanly.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.core.errors import ExitStatus
from vfmig.core.fsm import DeviceState
from vfmig.device.debugfs import DebugfsReader

if TYPE_CHECKING:
    from collections.abc import Callable

    Cli = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.kernel

#: How long an agent may take to start listening (trio's import alone is ~10 s under TCG).
START_S = 180.0
LISTENING = re.compile(r"vfmig agent: listening on 127\.0\.0\.1:(\d+) \(data port \d+\)")


class Agent:
    """A ``vfmig agent`` subprocess whose log is collected by a thread (the pipe never fills)."""

    def __init__(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            match = LISTENING.search(line)
            if match is not None:
                self.port = int(match[1])
                self._listening.set()
        self._listening.set()  # the agent exited: stop waiting

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_listening(self) -> int:
        assert self._listening.wait(START_S), f"agent not listening after {START_S} s:\n{self.log}"
        assert self.port is not None, f"agent exited ({self.process.poll()}):\n{self.log}"
        return self.port

    def stop(self) -> int:
        """SIGTERM, then the exit status (SIGKILL if it does not stop within a minute)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        self._reader.join(timeout=10)
        assert self.process.stderr is not None
        self.process.stderr.close()
        return status


def test_two_agents_migrate_an_mtty_device(
    guest: dict[str, Any],
    uart: Any,
    vfmig_argv: list[str],
    vfmig_cli: Cli,
    vfmig_main: Callable[..., tuple[int, str, str]],
    at_rest: list[str],
    tmp_path: Path,
) -> None:
    source, destination = at_rest[0], at_rest[1]
    root = Path(guest["debugfs"])
    with uart.open(source) as src, uart.open(destination) as dst:
        for port in range(2):
            uart.set_scr(src, port, 0xA0 + port)
            uart.set_scr(dst, port, 0x0A + port)
        uart.fill_fifo(src, 1, b"agent")
        uart.fill_fifo(dst, 1, b"")

    key = tmp_path / "key"
    made, _, err = vfmig_main("keygen", str(key))
    assert made == ExitStatus.OK, err
    assert key.stat().st_mode & 0o777 == 0o600

    agents = [
        Agent(
            [
                *vfmig_argv,
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--key-file",
                str(key),
                "--allow",
                f"vfio:{uuid}",
            ]
        )
        for uuid in (source, destination)
    ]
    try:
        ports = [agent.wait_listening() for agent in agents]
        result = vfmig_cli(
            "migrate",
            f"vfio:{source}@127.0.0.1:{ports[0]}",
            f"vfio:{destination}@127.0.0.1:{ports[1]}",
            "--key-file",
            str(key),
        )
        logs = "\n".join(agent.log for agent in agents)
        assert result.returncode == ExitStatus.OK, f"{result.stdout}{result.stderr}\n{logs}"
        assert DebugfsReader(source, root).read_state().state is DeviceState.STOP
        assert DebugfsReader(destination, root).read_state().state is DeviceState.RUNNING
    finally:
        statuses = [agent.stop() for agent in agents]
    for agent, status in zip(agents, statuses, strict=True):
        assert status == 0, agent.log
        assert agent.lines[-1].endswith("vfmig agent: stopped"), agent.log
        assert any(line.endswith("SIGTERM: stopping") for line in agent.lines), agent.log

    with uart.open(source) as src, uart.open(destination) as dst:
        assert dst.get_state() is DeviceState.RUNNING
        assert [uart.scr(dst, port) for port in range(2)] == [0xA0, 0xA1]
        assert uart.drain_fifo(dst, 1) == b"agent"
        assert uart.drain_fifo(src, 1) == b"agent"
