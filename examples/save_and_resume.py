"""Save a simulated device's state with stop-copy and resume it into another, by hand.

This drives the kernel's migration state machine through the MigrationDevice API, the
way the engine does underneath (without agents, network or precopy):

    source:       RUNNING -> STOP_COPY (a saving data fd)  ... read to end of stream
    destination:  RUNNING -> RESUMING  (a resuming data fd) ... write every byte
    destination:  RESUMING -> ... -> RUNNING  (RESUMING -> STOP checks the stream)
    source:       STOP_COPY -> STOP

and checks that the destination now holds exactly the source's state. Memory stays at one
1 MiB buffer whatever the state size.

Run:  python examples/save_and_resume.py [--size 64MiB]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from vfmig.core.fsm import DeviceState
from vfmig.core.units import parse_size
from vfmig.device.open import open_device
from vfmig.device.sim import SimDevice

if TYPE_CHECKING:
    from vfmig.device.backend import MigrationDevice

CHUNK = 1 << 20


def copy_stream(source: MigrationDevice, destination: MigrationDevice) -> int:
    """Stop the source, stream its state into the destination; returns the stream length."""
    saving = source.set_state(DeviceState.STOP_COPY)  # RUNNING_P2P, STOP, STOP_COPY
    resuming = destination.set_state(DeviceState.RESUMING)  # RUNNING_P2P, STOP, RESUMING
    if saving is None or resuming is None:
        raise RuntimeError("both arcs open a data session")
    buffer = bytearray(CHUNK)
    total = 0
    while True:
        count = saving.readinto(buffer)
        if count == 0:  # end of stream (in STOP_COPY; None would mean "nothing now")
            break
        assert count is not None
        view = memoryview(buffer)[:count]
        while view:  # a driver may take part of a write
            view = view[resuming.write(view) :]
        total += count
    destination.set_state(DeviceState.RUNNING)  # RESUMING -> STOP validates the stream
    source.set_state(DeviceState.STOP)  # the source keeps its state, stopped
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64MiB", help="state size (default 64MiB)")
    size = parse_size(parser.parse_args().size)
    spec = f"size={size},content=realistic"
    with (
        open_device(f"sim:source,{spec},seed=1") as source,
        open_device(f"sim:destination,{spec},seed=2") as destination,
    ):
        # The migration uses only the MigrationDevice API; comparing states is the sim's.
        assert isinstance(source, SimDevice)
        assert isinstance(destination, SimDevice)
        if source.content_digest() == destination.content_digest():
            print("the two devices start out equal: nothing to show", file=sys.stderr)
            return 1
        start = time.perf_counter()
        total = copy_stream(source, destination)
        seconds = time.perf_counter() - start
        same = source.content_digest() == destination.content_digest()
        print(f"stream: {total} bytes in {seconds:.2f} s ({total / seconds / CHUNK:.0f} MiB/s)")
        print(f"source: {source.get_state().name}, destination: {destination.get_state().name}")
        print(f"destination state equals the source's: {'yes' if same else 'NO'}")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
