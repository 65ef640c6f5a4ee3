"""End-to-end benchmark of ``vfmig migrate`` against ``zstd | socat`` (``make bench``). Not a test.

Both sides move the same bytes over loopback on the same machine in the same run:

* **vfmig:** two agents (``vfmig agent --listen 127.0.0.1:PORT --key-file K --sim-dir D``)
  and one ``vfmig migrate 'sim:src,image=state.bin,...@127.0.0.1:P1'
  'sim:dst,dump=...@127.0.0.1:P2' --key-file K --no-precopy`` per round: a simulated
  device whose state is ``--size`` bytes of realistic, partly compressible content
  (``content=realistic``, ~3.4x with zstd -1; ``--content random`` for incompressible
  data), read from the same file the peer reads, stop-copied into a destination whose
  resumed state is dumped to a file. Both simulated devices run with ``checksum=none``
  (``--sim-checksum crc32`` to keep it): the simulated driver's CRC-32 of the stream is a
  device's cost (~0.13 CPU-s per 512 MiB and side) that the peer, moving a file, does not
  pay; vfmig's keyed stream digest still covers every byte.
* **peer:** the same state, as a file, through
  ``zstd -1 -T1 | socat -u -b 1048576 - TCP:127.0.0.1:PORT`` into
  ``socat -u -b 1048576 TCP-LISTEN:PORT,reuseaddr - | zstd -d > file``.

Rounds alternate which side goes first. Each round's result is checked (the dumped or
received file must equal the source state) outside the timed region, and dirty pages are
written back (``sync``) before each side's turn. Printed: every
round, both medians, their ratio, the median CPU seconds (user + system) of each process
of either side (the agents' from /proc between the round's start and end), and the peak
RSS (VmHWM) of each agent and of the migrate command. Times are wall-clock of the whole
command, process start-up included; vfmig's own run time (``total_ms`` of ``vfmig migrate
--json``: without the interpreter's start-up) is shown next to it.

The source agent runs with ``--orchestrate``, so each round's ``vfmig migrate`` has it run
the migration (the thin client of ADR 0010, as it is by default with such agents) and
copies the run's journal here; ``--in-command`` starts the agents without it, and the
command orchestrates the run itself. ``--journal-cost``, ``--against`` and
``--compare-in-command`` replace the peer by a second set of vfmig agents
(without journals; another installation's) and pair the rounds.

Until ``vfmig migrate`` and ``vfmig agent`` exist, only the peer half runs (and says so).
Needs ``socat`` and ``zstd`` (Debian: ``apt-get install socat zstd``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from vfmig.core.spec import CHECKSUMS, parse_spec, sim_options
from vfmig.core.units import parse_size
from vfmig.device.sim import SimDevice

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

K = TypeVar("K")

MiB = 1 << 20
#: How long an agent or a listener may take to start listening.
LISTEN_TIMEOUT_S = 30.0
#: How long one transfer may take before the benchmark gives up on it.
ROUND_TIMEOUT_S = 600.0
VFMIG = Path(sys.executable).with_name("vfmig")
#: vfmig's processes run as installed, with their bytecode cached: an inherited
#: PYTHONDONTWRITEBYTECODE would make every ``vfmig migrate`` compile its modules again
#: (~0.15 s of each round's time on a 2-core machine), which the peer's binaries never pay.
VFMIG_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


class BenchError(Exception):
    """A setup problem or a failed round: printed as one line, exit status 1."""


@dataclass(frozen=True, slots=True)
class Run:
    seconds: float
    #: ru_maxrss of the measured process (the last one of a pipeline); Linux keeps the
    #: spawning process's RSS in it across exec, so it is at least this benchmark's own.
    peak_rss_kib: int
    run_seconds: float | None = None  #: the run's own time, as ``vfmig migrate --json`` says
    #: CPU seconds (user + system) of each process of the side, in :data:`ROLES` order.
    cpu: tuple[float, ...] = ()


#: The processes whose CPU time each side reports.
ROLES: dict[str, tuple[str, ...]] = {
    "peer": ("sending zstd|socat", "receiving socat|zstd"),
    "vfmig": ("source agent", "destination agent", "vfmig migrate"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, without connecting (an accept is precious)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def wait_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + LISTEN_TIMEOUT_S
    while not listening(port):
        if process.poll() is not None:
            raise BenchError(f"{what} exited with status {process.returncode} before listening")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} does not listen on port {port} after {LISTEN_TIMEOUT_S} s")
        time.sleep(0.01)


def wait_measured(process: subprocess.Popen[bytes], what: str) -> Run:
    """Wait for ``process`` with wait4 (its own peak RSS); BenchError if it fails."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise BenchError(f"{what} failed with status {process.returncode}")
    return Run(seconds=0.0, peak_rss_kib=usage.ru_maxrss, cpu=(usage.ru_utime + usage.ru_stime,))


def file_digest(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "blake2b").hexdigest()


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise BenchError(f"no VmHWM in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])


# --- the peer: zstd | socat --------------------------------------------------------------


#: ``--pin``: the CPU of the sending side (source agent, ``vfmig migrate``, ``zstd | socat``)
#: and of the receiving side (destination agent, ``socat | zstd -d``), as two hosts would be.
Pin = tuple[int, int] | None


def pinned(command: list[str], pin: Pin, sending: bool) -> list[str]:
    """``command`` run on its side's CPU (``taskset -c``), or as it is without ``pin``."""
    if pin is None:
        return command
    return ["taskset", "-c", str(pin[0] if sending else pin[1]), *command]


def peer_round(state: Path, received: Path, logs: Path, pin: Pin = None) -> Run:
    port = free_port()
    log = open(logs / "peer.log", "wb")  # noqa: SIM115 -- closed below
    started: list[subprocess.Popen[bytes]] = []
    try:
        receive = f"socat -u -b 1048576 TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1 - "
        receive += f"| zstd -d -q -f -o '{received}'"
        receiver = subprocess.Popen(
            pinned(["sh", "-c", receive], pin, sending=False), stdout=subprocess.DEVNULL, stderr=log
        )
        started.append(receiver)
        wait_listening(port, receiver, "the peer's receiving socat")
        send = f"zstd -1 -T1 -q -c '{state}' | socat -u -b 1048576 - TCP:127.0.0.1:{port}"
        start = time.perf_counter()
        sender = subprocess.Popen(
            pinned(["sh", "-c", send], pin, sending=True), stdout=subprocess.DEVNULL, stderr=log
        )
        started.append(sender)
        sent = wait_measured(sender, "the peer's sending zstd | socat")
        done = wait_measured(receiver, "the peer's receiving socat | zstd -d")
        seconds = time.perf_counter() - start
    finally:
        for process in started:
            if process.returncode is None:
                process.kill()
                process.wait()
        log.close()
    if file_digest(received) != file_digest(state):
        raise BenchError("the peer's received file differs from the state")
    received.unlink()
    return Run(seconds=seconds, peak_rss_kib=done.peak_rss_kib, cpu=sent.cpu + done.cpu)


# --- vfmig: two agents and a migrate per round -------------------------------------------


@dataclass
class Agents:
    key: Path
    source_port: int
    destination_port: int
    source_dir: Path
    destination_dir: Path
    processes: list[subprocess.Popen[bytes]]
    vfmig: Path  #: the command the agents run, and the rounds' ``vfmig migrate``
    #: The source agent orchestrates (``--orchestrate``): it hosts the rounds' runs.
    orchestrate: bool = True


@contextlib.contextmanager
def agents(
    work: Path,
    name: str = "",
    *,
    journal: bool = True,
    pin: Pin = None,
    vfmig: Path = VFMIG,
    orchestrate: bool = True,
) -> Iterator[Agents]:
    """A source and a destination agent of the ``vfmig`` command (``name`` prefixes their
    files), each journaling its runs into a directory of its own unless ``journal`` is off
    (``--no-journal``); with ``orchestrate`` the source agent hosts the rounds' runs."""
    key = work / "vfmig.key"
    if not key.exists():
        command = [str(vfmig), "keygen", str(key)]
        subprocess.run(command, check=True, capture_output=True, env=VFMIG_ENV)
    ports = free_port(), free_port()
    dirs = work / f"{name}source-agent", work / f"{name}destination-agent"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for role, port, directory in zip(("source", "destination"), ports, dirs, strict=True):
            directory.mkdir()
            log = open(work / f"{name}{role}-agent.log", "wb")  # noqa: SIM115 -- the agent holds it
            command = [str(vfmig), "agent", "--listen", f"127.0.0.1:{port}"]
            command += ["--key-file", str(key), "--sim-dir", str(directory)]
            command += ["--state-file", str(work / f"{name}{role}-agent.ledger")]
            if journal:
                command += ["--journal-dir", str(work / f"{name}{role}-journals")]
            else:
                command += ["--no-journal"]
            if orchestrate and role == "source":
                command += ["--orchestrate"]
            command = pinned(command, pin, sending=role == "source")
            processes.append(subprocess.Popen(command, stdout=log, stderr=log, env=VFMIG_ENV))
            log.close()
            wait_listening(port, processes[-1], f"the {role} agent")
        yield Agents(key, ports[0], ports[1], dirs[0], dirs[1], processes, vfmig, orchestrate)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def vfmig_round(
    setup: Agents, size: int, checksum: str, state: Path, logs: Path, pin: Pin = None
) -> Run:
    dump = setup.destination_dir / "dump.bin"
    command = [
        str(setup.vfmig),
        "migrate",
        f"sim:src,image=state.bin,checksum={checksum}@127.0.0.1:{setup.source_port}",
        f"sim:dst,size={size},checksum={checksum},dump=dump.bin@127.0.0.1:{setup.destination_port}",
        "--key-file",
        str(setup.key),
        "--no-precopy",
        "--json",
    ]
    out, err = logs / "migrate.json", logs / "migrate.log"
    agents_before = [cpu_seconds(process.pid) for process in setup.processes]
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(
            pinned(command, pin, sending=True), stdout=stdout, stderr=stderr, env=VFMIG_ENV
        )
        try:
            done = wait_measured(process, "vfmig migrate")
        except BenchError as exc:
            raise BenchError(f"{exc}:\n{tail(err)}") from None
        seconds = time.perf_counter() - start
    agents_cpu = tuple(
        cpu_seconds(process.pid) - before
        for process, before in zip(setup.processes, agents_before, strict=True)
    )
    if not dump.exists() or file_digest(dump) != file_digest(state):
        raise BenchError("the destination's dump differs from the source state")
    dump.unlink()
    total_ms = json.loads(out.read_text()).get("result", {}).get("total_ms")
    run_seconds = total_ms / 1000 if isinstance(total_ms, int | float) else None
    return Run(
        seconds=seconds,
        peak_rss_kib=done.peak_rss_kib,
        run_seconds=run_seconds,
        cpu=agents_cpu + done.cpu,
    )


def engine_available() -> str | None:
    """None when ``vfmig migrate`` and ``vfmig agent`` exist, else why not."""
    for command in ("migrate", "agent"):
        result = subprocess.run([str(VFMIG), command, "--help"], capture_output=True, env=VFMIG_ENV)
        if result.returncode != 0:
            return f"'vfmig {command}' is not available yet"
    return None


# --- the run ---------------------------------------------------------------------------------


def rate(size: int, seconds: float) -> str:
    return f"{size / seconds / MiB:7.1f} MiB/s"


def write_state(source_spec: str, path: Path) -> None:
    """The source device's state, as the peer sends it (streamed in 1 MiB blocks)."""
    spec = parse_spec(f"sim:src,{source_spec}")
    device = SimDevice(spec.name, sim_options(spec))
    try:
        device.snapshot_to(path)
    finally:
        device.close()


def compressed_size(state: Path) -> int:
    with open(state, "rb") as source:
        zstd = subprocess.Popen(
            ["zstd", "-1", "-T1", "-q", "-c"], stdin=source, stdout=subprocess.PIPE
        )
        assert zstd.stdout is not None
        total = 0
        while chunk := zstd.stdout.read(MiB):
            total += len(chunk)
        if zstd.wait() != 0:
            raise BenchError("zstd failed on the state file")
    return total


def cpu_medians(side: str, runs: Sequence[Run]) -> str:
    """Median CPU seconds of each of a side's processes, and of their sum."""
    per_role = [
        statistics.median(run.cpu[index] for run in runs) for index in range(len(ROLES[side]))
    ]
    total = statistics.median(sum(run.cpu) for run in runs)
    parts = ", ".join(f"{role} {cpu:.2f}" for role, cpu in zip(ROLES[side], per_role, strict=True))
    return f"{parts}; total {total:.2f} CPU-s"


def alternating_rounds(
    variants: Mapping[K, dict[str, Any]],
    figure: Callable[[K, Run], str],
    work: Path,
    size: int,
    args: argparse.Namespace,
    state: Path,
    out: IO[str],
) -> dict[K, list[Run]]:
    """``args.rounds`` rounds of one run on each of two sets of agents (``agents(work,
    **variants[key])``), which goes first swapping every round; ``figure`` says what a
    run is worth printing."""
    keys = list(variants)
    runs: dict[K, list[Run]] = {key: [] for key in keys}
    with contextlib.ExitStack() as stack:
        setups = {
            key: stack.enter_context(
                agents(work, **{"orchestrate": not args.in_command, **variants[key]})
            )
            for key in keys
        }
        for setup in setups.values():
            os.link(state, setup.source_dir / "state.bin")
        for number in range(args.rounds):
            order = keys if number % 2 == 0 else keys[::-1]
            for key in order:
                os.sync()
                runs[key].append(vfmig_round(setups[key], size, args.sim_checksum, state, work))
            figures = ", ".join(figure(key, runs[key][-1]) for key in order)
            print(f"round {number + 1}: {figures}", file=out)
    return runs


def journal_cost(
    work: Path, size: int, args: argparse.Namespace, state: Path, out: IO[str]
) -> None:
    """The agents' CPU seconds with and without their journals, rounds alternating."""
    runs = alternating_rounds(
        {
            True: {"name": "journaled-", "journal": True},
            False: {"name": "unjournaled-", "journal": False},
        },
        lambda j, run: (
            f"{'with' if j else 'without'} journals, agents' CPU-s "
            f"{run.cpu[0]:.2f}+{run.cpu[1]:.2f}"
        ),
        work,
        size,
        args,
        state,
        out,
    )
    medians = {j: statistics.median(sum(run.cpu[:2]) for run in runs[j]) for j in runs}
    print(
        f"agents' CPU (median of source + destination): with their journals "
        f"{medians[True]:.3f} s, without {medians[False]:.3f} s: the journals cost "
        f"{(medians[True] / medians[False] - 1) * 100:+.1f} %",
        file=out,
    )
    diffs = [sum(a.cpu[:2]) - sum(b.cpu[:2]) for a, b in zip(runs[True], runs[False], strict=True)]
    print_paired(diffs, medians[False], out)


def print_paired(diffs: Sequence[float], base: float, out: IO[str]) -> None:
    """The mean of per-round differences (seconds) with its standard error, also as a share
    of ``base``. Each round's two runs are neighbours in time: their difference cancels the
    drift of a shared machine better than the medians do."""
    if len(diffs) > 1:
        mean = statistics.fmean(diffs)
        error = statistics.stdev(diffs) / len(diffs) ** 0.5
        print(
            f"paired by round: {mean * 1000:+.0f} ms +- {error * 1000:.0f} ms (standard error) "
            f"per run = {mean / base * 100:+.1f} +- {error / base * 100:.1f} %",
            file=out,
        )


def against(work: Path, size: int, args: argparse.Namespace, state: Path, out: IO[str]) -> None:
    """This vfmig against another way (``--against``: another installation's vfmig;
    ``--compare-in-command``: this one orchestrating in the command), rounds alternating:
    the way to measure a change on a machine whose speed drifts between invocations."""
    if args.compare_in_command:
        ways = {
            "this": {"name": "hosted-", "orchestrate": True},
            "command": {"name": "command-", "orchestrate": False},
        }
        shown = {
            "this": "run hosted by the source agent",
            "command": "orchestrator in vfmig migrate",
        }
    else:
        other = Path(args.against).resolve()
        ways = {
            "this": {"name": "this-", "vfmig": VFMIG},
            "other": {"name": "other-", "vfmig": other},
        }
        shown = {"this": str(VFMIG), "other": str(other)}
    runs = alternating_rounds(
        ways,
        lambda way, run: f"{way} {run.seconds:.2f} s ({sum(run.cpu):.2f} CPU-s)",
        work,
        size,
        args,
        state,
        out,
    )
    for way in ways:
        seconds = statistics.median(run.seconds for run in runs[way])
        print(f"median {way} ({shown[way]}): {seconds:6.2f} s {rate(size, seconds)}", file=out)
        print(f"  CPU (median): {cpu_medians('vfmig', runs[way])}", file=out)
    this, other_way = ways
    base = statistics.median(run.seconds for run in runs[other_way])
    diffs = [a.seconds - b.seconds for a, b in zip(runs[this], runs[other_way], strict=True)]
    print(f"{this} minus {other_way}, wall time:", file=out)
    print_paired(diffs, base, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512MiB", help="state size (default 512MiB)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per side (default 5)")
    parser.add_argument("--seed", type=int, default=1, help="content seed (default 1)")
    parser.add_argument(
        "--content",
        choices=("realistic", "random"),
        default="realistic",
        help="realistic (~3.4x with zstd -1, the default) or random (incompressible) state",
    )
    parser.add_argument(
        "--sim-checksum",
        choices=CHECKSUMS,
        default="none",
        help="the simulated devices' stream checksum (default none: see above)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="one CPU per side, as two hosts would be: the source agent, vfmig migrate and "
        "the sending zstd|socat on the first, the destination agent and the receiving "
        "socat|zstd on the second",
    )
    parser.add_argument(
        "--journal-cost",
        action="store_true",
        help="instead of the peer: rounds alternating between agents that journal their "
        "runs and agents that do not (--no-journal); prints the agents' median CPU seconds "
        "of each and the journals' share",
    )
    parser.add_argument(
        "--against",
        metavar="VFMIG",
        help="instead of the peer: rounds alternating between this vfmig and another "
        "installation's vfmig command (a venv's bin/vfmig, say that of the commit before a "
        "change); prints both medians and their difference paired by round",
    )
    parser.add_argument(
        "--in-command",
        action="store_true",
        help="start the agents without --orchestrate: every round's vfmig migrate runs the "
        "migration itself instead of having the source agent host it (ADR 0010)",
    )
    parser.add_argument(
        "--compare-in-command",
        action="store_true",
        help="instead of the peer: rounds alternating between runs the source agent hosts "
        "and runs vfmig migrate orchestrates itself; prints both medians and their "
        "difference paired by round",
    )
    args = parser.parse_args(argv)
    if sum(map(bool, (args.against, args.journal_cost, args.compare_in_command))) > 1:
        raise BenchError(
            "--against, --journal-cost and --compare-in-command are different benchmarks: "
            "one at a time"
        )
    if args.against and not os.access(args.against, os.X_OK):
        raise BenchError(f"--against {args.against}: not an executable vfmig command")
    size = parse_size(args.size)
    pin: Pin = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2 or shutil.which("taskset") is None:
            raise BenchError("--pin needs two CPUs and taskset (util-linux)")
        pin = (cpus[0], cpus[1])
    missing = [tool for tool in ("socat", "zstd") if shutil.which(tool) is None]
    if missing:
        raise BenchError(f"missing {' and '.join(missing)}: apt-get install {' '.join(missing)}")
    source_spec = f"size={size},content={args.content},seed={args.seed}"
    without_engine = engine_available()
    out: IO[str] = sys.stdout
    with tempfile.TemporaryDirectory(prefix="vfmig-bench-") as tmp:
        work = Path(tmp)
        state = work / "state.bin"
        write_state(source_spec, state)
        wire = compressed_size(state)
        print(
            f"state: {size / MiB:.0f} MiB {args.content} (seed {args.seed}); zstd -1 makes it "
            f"{wire / MiB:.1f} MiB ({size / wire:.2f}x); {args.rounds} rounds per side; "
            f"simulated devices with checksum={args.sim_checksum}"
            + (f"; sending side on CPU {pin[0]}, receiving side on CPU {pin[1]}" if pin else ""),
            file=out,
        )
        if args.journal_cost or args.against or args.compare_in_command:
            if without_engine:
                raise BenchError(without_engine)
            (journal_cost if args.journal_cost else against)(work, size, args, state, out)
            return 0
        peer: list[Run] = []
        ours: list[Run] = []
        hwm: tuple[int, int] | None = None
        with contextlib.ExitStack() as stack:
            setup = (
                None
                if without_engine
                else stack.enter_context(agents(work, pin=pin, orchestrate=not args.in_command))
            )
            if setup is not None:  # the source device reads the peer's file (no copy)
                os.link(state, setup.source_dir / "state.bin")
            for number in range(args.rounds):
                order = ("vfmig", "peer") if number % 2 == 0 else ("peer", "vfmig")
                figures = []
                for side in order:
                    # Neither side pays for writing back the other's (or the state's) file.
                    os.sync()
                    if side == "peer":
                        peer.append(peer_round(state, work / "received.bin", work, pin))
                        figures.append(f"zstd|socat {peer[-1].seconds:6.2f} s")
                    elif setup is not None:
                        ours.append(vfmig_round(setup, size, args.sim_checksum, state, work, pin))
                        run = ours[-1].run_seconds
                        inner = f" (run {run:.2f} s)" if run is not None else ""
                        figures.append(f"vfmig {ours[-1].seconds:6.2f} s{inner}")
                print(f"round {number + 1}: " + ", ".join(figures), file=out)
            if setup is not None:
                hwm = vm_hwm_kib(setup.processes[0].pid), vm_hwm_kib(setup.processes[1].pid)
        peer_s = statistics.median(run.seconds for run in peer)
        print(f"median zstd -1 | socat: {peer_s:6.2f} s {rate(size, peer_s)}", file=out)
        print(f"  CPU (median): {cpu_medians('peer', peer)}", file=out)
        if without_engine:
            print(f"vfmig not measured: {without_engine}", file=out)
            return 0
        ours_s = statistics.median(run.seconds for run in ours)
        print(f"median vfmig migrate:   {ours_s:6.2f} s {rate(size, ours_s)}", file=out)
        print(f"  CPU (median): {cpu_medians('vfmig', ours)}", file=out)
        measured = [run.run_seconds for run in ours if run.run_seconds is not None]
        if measured:
            run_s = statistics.median(measured)
            print(
                f"  of which the run itself (without start-up): {run_s:6.2f} s {rate(size, run_s)}",
                file=out,
            )
        print(
            f"vfmig takes {ours_s / peer_s:.2f}x the time of zstd | socat "
            f"({peer_s / ours_s * 100:.0f} % of its throughput)",
            file=out,
        )
        # A round's two runs are neighbours in time: their ratio shrugs off the drift of a
        # shared machine between rounds, which the ratio of the medians does not.
        ratios = sorted(a.seconds / b.seconds for a, b in zip(ours, peer, strict=True))
        print(
            f"  paired by round: median {statistics.median(ratios):.2f}x, "
            f"from {ratios[0]:.2f}x to {ratios[-1]:.2f}x",
            file=out,
        )
        assert hwm is not None
        migrate_rss = max(run.peak_rss_kib for run in ours)
        print(
            f"peak RSS: source agent {hwm[0] / 1024:.0f} MiB, destination agent "
            f"{hwm[1] / 1024:.0f} MiB, vfmig migrate {migrate_rss / 1024:.0f} MiB (ru_maxrss: "
            f"at least this benchmark's own {vm_hwm_kib(os.getpid()) / 1024:.0f} MiB)",
            file=out,
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
