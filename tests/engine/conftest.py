"""Fixtures of the engine tests: simulated devices on disk, agents in this process and as processes.

Trio mode is enabled here only (never globally: the TUI tests run Textual's asyncio):
every ``async def`` test in this directory runs under pytest-trio.

Devices are ``sim:`` devices with a ``state-dir``, so their state survives the process
that drove them: a test reads a device's final state from its simulated debugfs file and
its bytes from ``dump=`` after the run, exactly as a person would.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vfmig.cli.context import Environment
from vfmig.cli.main import main
from vfmig.core.fsm import DeviceState
from vfmig.device.open import open_device
from vfmig.device.sim import release_hangs
from vfmig.engine.keys import create_key

if TYPE_CHECKING:
    from collections.abc import Iterator


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        function = getattr(item, "function", None)
        if item.path.is_relative_to(here) and inspect.iscoroutinefunction(function):
            item.add_marker(pytest.mark.trio)


@pytest.fixture(autouse=True)
def _release_hangs() -> Iterator[None]:
    """A test that hangs a simulated arc lets it go at the end (the thread then exits)."""
    yield
    release_hangs()


def image_bytes(size: int, seed: int) -> bytes:
    """Recognisable, partly compressible content: per KiB, 512 pseudo-random bytes and zeros."""
    out = bytearray()
    block = 0
    while len(out) < size:
        digest = hashlib.shake_128(f"{seed}:{block}".encode()).digest(512)
        out += digest + bytes(512)
        block += 1
    return bytes(out[:size])


@dataclass
class Sims:
    """Simulated devices under one directory.

    ``spec(name, ...)`` writes an image for the device (unless ``image=False``) and returns
    its spec; with ``relative`` the file options are names inside the directory, as an
    agent with ``--sim-dir`` wants them.
    """

    root: Path
    relative: bool = False
    specs: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> str:
        return name if self.relative else str(self.root / name)

    def spec(
        self,
        name: str,
        *,
        size: int = 2 << 20,
        image: bool = True,
        dump: bool = False,
        at: str | None = None,
        **options: str,
    ) -> str:
        parts = [f"sim:{name}", f"state-dir={self.path(name)}"]
        if image:
            (self.root / f"{name}.img").write_bytes(image_bytes(size, len(self.specs) + 1))
            parts.append(f"image={self.path(name + '.img')}")
        else:
            parts.append(f"size={size}")
        if dump:
            parts.append(f"dump={self.path(name + '.dump')}")
        parts += [f"{key.replace('_', '-')}={value}" for key, value in options.items()]
        local = ",".join(parts)
        self.specs[name] = local
        return local + (f"@{at}" if at else "")

    def state(self, name: str) -> DeviceState:
        """The device's state as its simulated debugfs shows it."""
        text = (self.root / name / "debugfs" / "vfio" / name / "migration" / "state").read_text()
        return DeviceState[text.strip()]

    def image(self, name: str) -> bytes:
        return (self.root / f"{name}.img").read_bytes()

    def dump(self, name: str) -> bytes | None:
        path = self.root / f"{name}.dump"
        return path.read_bytes() if path.exists() else None

    def dump_digest(self, name: str) -> str | None:
        """blake2b of the dump, comparable with :meth:`content`."""
        data = self.dump(name)
        return None if data is None else hashlib.blake2b(data, digest_size=32).hexdigest()

    def content(self, name: str) -> str:
        """blake2b of the device's current content (it must not be open elsewhere)."""
        spec = self.specs[name]
        if self.relative:
            spec = re.sub(r"(state-dir|image|dump)=([^,]+)", rf"\1={self.root}/\2", spec)
        with open_device(spec) as device:
            assert hasattr(device, "content_digest")
            return str(device.content_digest())


@pytest.fixture
def sims(tmp_path: Path) -> Sims:
    root = tmp_path / "sims"
    root.mkdir()
    return Sims(root)


@pytest.fixture
def remote_sims(tmp_path: Path) -> Sims:
    """Devices for an agent whose --sim-dir is this directory."""
    root = tmp_path / "agent-sims"
    root.mkdir()
    return Sims(root, relative=True)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "vfmig.key"
    create_key(path)
    return path


@dataclass(frozen=True)
class Result:
    status: int
    stdout: str
    stderr: str


def run_cli(*argv: str) -> Result:
    """``vfmig ARGV`` in this process, with captured streams (not a terminal)."""
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), Environment(stdout=out, stderr=err, stdout_isatty=False))
    return Result(status, out.getvalue(), err.getvalue())


@pytest.fixture
def cli() -> object:
    """``cli(*argv) -> Result``: run a vfmig command in this process."""
    return run_cli


@dataclass
class AgentProcess:
    """A ``vfmig agent`` process; ``address`` is where it listens."""

    process: subprocess.Popen[str]
    address: str
    log: list[str]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        assert self.process.stderr is not None
        self.log += self.process.stderr.read().splitlines()
        return self.process.returncode


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[object]:
    """``agent_process(key_file, sim_dir, *extra) -> AgentProcess``: a real agent over TCP."""
    started: list[AgentProcess] = []

    def start(key: Path, sim_dir: Path, *extra: str) -> AgentProcess:
        command = [sys.executable, "-m", "vfmig", "agent", "--listen", "127.0.0.1:0"]
        command += ["--key-file", str(key), "--sim-dir", str(sim_dir), "--grace", "0.2", *extra]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        process = subprocess.Popen(
            command, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env
        )
        assert process.stderr is not None
        log: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            log.append(line.rstrip())
            found = re.search(r"listening on (\S+):(\d+) ", line)
            if found:
                agent = AgentProcess(process, f"{found[1]}:{found[2]}", log)
                started.append(agent)
                return agent
        process.kill()
        raise AssertionError("the agent did not start:\n" + "\n".join(log))

    yield start
    for agent in started:
        agent.stop()
