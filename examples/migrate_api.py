"""Run a live migration from Python: the engine behind ``vfmig migrate``, in local mode.

The pieces ``vfmig migrate`` puts together, without the command line:

* a :class:`~vfmig.engine.local.LocalAgent`: the agent that owns this host's devices,
  running inside this process (reached over socketpairs, with the same protocol,
  compression and flow control as a remote ``vfmig agent``);
* an :class:`~vfmig.engine.orchestrator.Orchestrator` that runs the phase machine for the
  pairs of device specs and publishes every event on an
  :class:`~vfmig.engine.bus.EventBus`;
* a subscriber of that bus: here it prints the phase changes and the decisions, and adds
  up the bytes itself.

The source is a simulated device with realistic content that dirties 8 MiB/s while it
runs, so precopy has to converge; the destination dumps its resumed state to a file, which
is then compared with the source's state.

Run:  python examples/migrate_api.py [--size 64MiB]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import trio

from vfmig.core.events import ChunkSent, DecisionMade, PhaseChanged
from vfmig.core.spec import parse_spec
from vfmig.device.open import open_device
from vfmig.device.sim import SimDevice
from vfmig.engine.agent import AgentConfig
from vfmig.engine.bus import EventBus, Lossless, Record, Subscription
from vfmig.engine.local import LocalAgent
from vfmig.engine.orchestrator import LOCAL, Orchestrator, OrchestratorConfig, RunReport


async def watch(subscription: Subscription, sent: list[int]) -> None:
    """Print what the run decides as it happens; count the source's stream bytes."""
    start: int | None = None
    async for item in subscription:
        if not isinstance(item, Record):
            continue  # a Lagged notice: a Lossless subscription never gets one
        start = item.at_ns if start is None else start
        event, seconds = item.event, (item.at_ns - start) / 1e9
        if isinstance(event, PhaseChanged):
            print(f"  {seconds:6.3f} s  phase {event.phase.value}")
        elif isinstance(event, DecisionMade):
            print(f"  {seconds:6.3f} s  {event.rule}: {event.text}")
        elif isinstance(event, ChunkSent):
            sent[0] += event.raw


async def migrate(source: str, destination: str) -> tuple[RunReport, int]:
    bus = EventBus()
    sent = [0]
    async with trio.open_nursery() as nursery:
        local = LocalAgent(AgentConfig(name="example", key=None))  # in-process links only
        await nursery.start(local.run)
        pairs = [(parse_spec(source), parse_spec(destination))]
        orchestrator = Orchestrator(pairs, {LOCAL: local.endpoint()}, bus, OrchestratorConfig())
        watching = bus.subscribe(Lossless())
        done = trio.Event()

        async def watcher() -> None:
            await watch(watching, sent)
            done.set()

        nursery.start_soon(watcher)
        report = await orchestrator.run()
        bus.close()  # the watcher drains what it holds, then its loop ends
        await done.wait()
        nursery.cancel_scope.cancel()  # stops the local agent
    return report, sent[0]


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64MiB", help="state size (default 64MiB)")
    size = parser.parse_args().size
    with tempfile.TemporaryDirectory(prefix="vfmig-example-") as tmp:
        state_dir, dump = Path(tmp) / "source", Path(tmp) / "destination.bin"
        source = f"sim:source,size={size},content=realistic,state-dir={state_dir}"
        destination = f"sim:destination,size={size},dump={dump}"
        print(f"migrating {source}")
        report, sent = trio.run(migrate, f"{source},dirty-rate=8MiB", destination)
        print(f"{report.summary} ({sent} stream bytes)")
        # The source is left stopped, with its state: compare it with the destination's.
        with open_device(source) as device:
            assert isinstance(device, SimDevice)
            state, expected = device.get_state().name, device.content_digest()
        same = dump.exists() and file_digest(dump) == expected
        print(f"source left in {state}; destination state equals it: {'yes' if same else 'NO'}")
        return 0 if same and report.outcome.value == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
