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
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from vfmig.cli.context import Environment
from vfmig.cli.main import main
from vfmig.core.fsm import DeviceState
from vfmig.core.phases import MachineConfig
from vfmig.core.spec import parse_spec
from vfmig.device.open import open_device
from vfmig.device.sim import release_hangs
from vfmig.engine.agent import Agent, AgentConfig, serve_tcp
from vfmig.engine.bus import EventBus, Record, Ring, Subscription
from vfmig.engine.keys import create_key, load_key
from vfmig.engine.link import connect
from vfmig.engine.orchestrator import (
    LOCAL,
    Endpoint,
    Orchestrator,
    OrchestratorConfig,
    RunReport,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from vfmig.core.model import Action
    from vfmig.engine.local import LocalAgent


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

    def state(self, name: str) -> DeviceState | None:
        """The device's state as its simulated debugfs shows it (None: never opened)."""
        path = self.root / name / "debugfs" / "vfio" / name / "migration" / "state"
        if not path.exists():
            return None
        return DeviceState[path.read_text().strip()]

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
def b_sims(tmp_path: Path) -> Sims:
    """Devices for a second agent, with a --sim-dir of its own."""
    root = tmp_path / "b-sims"
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


def signal_in_precopy(argv: list[str], sig: int, cwd: Path) -> Result:
    """``vfmig ARGV`` as a process, sent ``sig`` once it prints that precopy began."""
    command = [sys.executable, "-m", "vfmig", *argv]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            if "phase precopy" in line:
                break
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=60)
    return Result(process.returncode, stdout, stderr)


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
        stderr = self.process.stderr
        if stderr is not None and not stderr.closed:
            self.log += stderr.read().splitlines()
            stderr.close()
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


class Cuttable(trio.abc.Stream):
    """A stream the test can cut like a pulled cable: both ends see the link lost."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.transport_stream = inner

    async def cut(self) -> None:
        await trio.aclose_forcefully(self.inner)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class RunningAgent:
    agent: Agent
    address: str
    sims: Sims
    log: list[str]


@dataclass
class Cluster:
    """Agents over loopback TCP in this test's process, and orchestrators driving them.

    ``await cluster.agent(sims)`` starts an agent whose --sim-dir is ``sims.root``;
    ``await cluster.migrate(pairs)`` runs one migration and returns its report. Every
    control link the orchestrators open is :class:`Cuttable` (``cluster.cut_orchestrator()``).
    """

    nursery: trio.Nursery
    key: bytes
    tmp: Path
    agents: list[RunningAgent] = field(default_factory=list)
    links: list[Cuttable] = field(default_factory=list)
    bus: EventBus | None = None
    seen: Subscription | None = None
    #: TLS for the orchestrators' control links (None: plain TCP).
    client_ssl: ssl.SSLContext | None = None

    async def agent(self, sims: Sims, **config: object) -> RunningAgent:
        log: list[str] = []
        options: dict[str, object] = {"grace": 0.05, "step_timeout": 10.0, **config}
        name = f"agent{len(self.agents)}"
        agent = Agent(
            AgentConfig(name=name, key=self.key, sim_dir=sims.root, log=log.append, **options)  # type: ignore[arg-type]
        )
        await self.nursery.start(agent.run)
        control, _ = await self.nursery.start(serve_tcp, agent, "127.0.0.1", 0)
        running = RunningAgent(agent, f"127.0.0.1:{control}", sims, log)
        self.agents.append(running)
        return running

    async def _connect(
        self, address: str, key: bytes | None
    ) -> tuple[trio.abc.Stream, bytes | None]:
        stream = Cuttable(await connect(address, ssl_context=self.client_ssl))
        self.links.append(stream)
        return stream, key

    async def cut_orchestrator(self) -> None:
        """Every orchestrator link dies at once (as if its process was killed)."""
        for link in self.links:
            await link.cut()

    async def migrate(
        self,
        pairs: list[tuple[str, str]],
        *,
        machine: MachineConfig | None = None,
        key: bytes | None = None,
        trace: Callable[[Action], Awaitable[None]] | None = None,
        local: LocalAgent | None = None,
    ) -> RunReport:
        specs = [(parse_spec(a), parse_spec(b)) for a, b in pairs]
        use = self.key if key is None else key
        endpoints = {
            spec.address: Endpoint(
                host=spec.address,
                connect=lambda address=spec.address: self._connect(address, use),
            )
            for pair in specs
            for spec in pair
            if spec.address is not None
        }
        if local is not None:
            endpoints[LOCAL] = local.endpoint()
        self.bus = EventBus()
        self.seen = self.bus.subscribe(Ring(1 << 16))
        config = OrchestratorConfig(machine=machine or MachineConfig(step_timeout_ns=10**10))
        orchestrator = Orchestrator(specs, endpoints, self.bus, config, trace=trace)
        with trio.fail_after(60):
            report = await orchestrator.run()
        self.bus.close()
        return report

    async def events(self) -> list[object]:
        """The events the last run published, in order."""
        assert self.seen is not None
        return [item.event async for item in self.seen if isinstance(item, Record)]

    async def settle(self) -> None:
        """Wait until every agent holds no device and serves no orchestrator (runs closed,
        fallbacks done)."""
        with trio.fail_after(30):
            for running in self.agents:
                await running.agent.wait_idle()


@pytest.fixture
async def cluster(nursery: trio.Nursery, key_file: Path, tmp_path: Path) -> Cluster:
    return Cluster(nursery, load_key(key_file), tmp_path)


@dataclass(frozen=True)
class Certificates:
    """A test CA and one certificate for 127.0.0.1 (server and client use)."""

    ca: Path
    cert: Path
    key: Path

    def server(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory, prerequisite: object) -> Certificates:
    """Made with the openssl command (skipped without it, outside CI)."""
    if shutil.which("openssl") is None:
        assert callable(prerequisite)
        prerequisite("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=vfmig test CA")  # fmt: skip
    openssl("req", *ec, "-keyout", "agent.key", "-out", "agent.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    sign = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "ext.cnf"]
    openssl("x509", "-req", "-in", "agent.csr", *sign, "-out", "agent.pem", "-days", "2")
    return Certificates(d / "ca.pem", d / "agent.pem", d / "agent.key")


def _diagnose(path: Path) -> dict[str, Any]:
    result = run_cli("journal", "diagnose", "--json", str(path))
    envelope = json.loads(result.stdout)
    assert envelope["ok"], envelope
    diagnosis: dict[str, Any] = envelope["result"]
    return diagnosis


@pytest.fixture
def diagnose() -> Callable[[Path], dict[str, Any]]:
    """``diagnose(journal)``: what ``vfmig journal diagnose --json`` finds in it."""
    return _diagnose
