"""Check that a file holds exactly a simulated device's current state (e.g. a migration's dump).

    python examples/compare_state.py 'sim:src,size=256MiB,state-dir=.cache/demo/src' dump.bin

The device is opened through the same API every vfmig command uses
(:func:`vfmig.device.open.open_device`); with ``state-dir=`` it is the very device an
earlier process (``vfmig migrate``) left behind, in whatever state it was left. Both
sides are hashed in 1 MiB blocks, so this works for states of any size. Nothing is
changed on the device. Exit status 0 when equal, 1 when not.
"""

from __future__ import annotations

import argparse
import hashlib
import sys

from vfmig.core.errors import VfmigError
from vfmig.device.open import open_device
from vfmig.device.sim import SimDevice


def file_digest(path: str) -> str:
    """blake2b-256 of a file, as ``SimDevice.content_digest`` computes it for a state."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("device", help="a sim: device spec")
    parser.add_argument("file", help="the file to compare with the device's state")
    args = parser.parse_args()
    try:
        with open_device(args.device) as device:
            if not isinstance(device, SimDevice):
                parser.error("only a simulated device (sim:) can show its state")
            state = device.get_state().name
            expected = device.content_digest()
    except VfmigError as exc:
        print(f"compare_state: {exc}", file=sys.stderr)
        return 1
    actual = file_digest(args.file)
    same = actual == expected
    print(f"device {args.device} ({state}): blake2b {expected[:16]}...")
    print(f"file   {args.file}: blake2b {actual[:16]}...")
    print("the file equals the device's state" if same else "the file DIFFERS from the state")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
