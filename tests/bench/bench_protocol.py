"""Micro-benchmark of the data path of vfmig.protocol (``make bench-protocol``). Not a test.

Measures, on one core, the throughput of encoding and decoding 1 MiB chunks through a
Connection -- compression, framing and the keyed stream digest included -- next to the
bare primitives on the same data: memcpy, the digest candidates, and zstd compression and
decompression. Then it checks the acceptance targets of the protocol issue:

* encoding realistic (partly compressible) state reaches >= 90 % of in-process zstd
  level 1 compression throughput;
* encoding and decoding incompressible data each reach >= 1 GB/s.

Realistic state comes from the simulated device (``vfmig.device.sim_content``: ~40 % zero
pages, 16 % random, 34 % descriptor rings, 10 % near-copies), so the benchmark and the
simulator agree on what "realistic" means. Throughput is raw bytes per second (1 GB =
1e9 bytes); each figure is the best of ``--repeat`` runs, the machine being shared.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import statistics
import sys
import time
from typing import TYPE_CHECKING

import zstandard

from vfmig.device.sim_content import realistic_state
from vfmig.protocol import (
    DEFAULT_COMPRESSION_LEVEL,
    Config,
    Connection,
    Credit,
    DataChunk,
    Role,
    decode_chunk_payload,
    encode_chunk_payload,
    make_compressor,
    make_decompressor,
)

if TYPE_CHECKING:
    from collections.abc import Callable

CHUNK = 1 << 20
KEY = b"benchmark key, 32 bytes long...."
#: How a socket hands data to the receiver (trio's receive_some default).
RECEIVE_SIZE = 64 << 10


def pin_to_one_core() -> str:
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})
    return f"pinned to CPU {cpus[-1]} of {len(cpus)}"


def best_rate(
    fn: Callable[[], int], repeat: int, setup: Callable[[], None] | None = None
) -> tuple[float, float]:
    """(best, median) GB/s of ``fn``, which returns the raw bytes it processed.

    ``setup`` runs before each run, untimed. The first run is a warm-up (pools, caches,
    allocator) and is not counted.
    """
    rates = []
    for _ in range(repeat + 1):
        if setup is not None:
            setup()
        start = time.perf_counter()
        size = fn()
        rates.append(size / (time.perf_counter() - start) / 1e9)
    return max(rates[1:]), statistics.median(rates[1:])


class Link:
    """An established data link with credit to spare, for timing the data path alone."""

    def __init__(self, level: int) -> None:
        cfg = Config(key=KEY, compression_level=level)
        self.sender = Connection(Role.DATA_SENDER, cfg, name="bench-src")
        self.receiver = Connection(Role.DATA_RECEIVER, cfg, name="bench-dst")
        for _ in range(3):
            for a, b in ((self.sender, self.receiver), (self.receiver, self.sender)):
                if data := a.data_to_send():
                    b.receive_data(data)
        self.stream = 0
        self.seq = self.offset = 0

    def new_stream(self, size: int) -> None:
        self.stream += 1
        self.seq = self.offset = 0
        self.sender.receive_data(self.receiver.send(Credit(stream=self.stream, increment=size)))


def encode_all(link: Link, compressor: zstandard.ZstdCompressor, chunks: list[bytes]) -> list:
    frames = []
    for raw in chunks:
        encoding, payload = encode_chunk_payload(compressor, raw)
        frames.append(link.sender.send_data(link.stream, link.seq, link.offset, len(raw),
                                            encoding, payload))  # fmt: skip
        link.seq += 1
        link.offset += len(raw)
    return frames


def measure(name: str, chunks: list[bytes], level: int, repeat: int) -> dict[str, float]:
    total = sum(map(len, chunks))
    compressor, decompressor = make_compressor(level), make_decompressor(CHUNK)
    link = Link(level)
    wire: list[list[bytes]] = []

    def encode() -> int:
        wire[:] = encode_all(link, compressor, chunks)
        return total

    encode_best, encode_median = best_rate(encode, repeat, setup=lambda: link.new_stream(total))
    pieces = []
    for parts in wire:
        frame = b"".join(parts)
        pieces += [frame[i : i + RECEIVE_SIZE] for i in range(0, len(frame), RECEIVE_SIZE)]
    receivers: list[Link] = []

    def fresh_receiver() -> None:
        """A new link whose receiver expects the stream id the frames carry."""
        receiver = Link(level)
        receiver.stream = link.stream - 1
        receiver.new_stream(total)
        receivers[:] = [receiver]

    def decode() -> int:
        conn = receivers[0].receiver
        for piece in pieces:
            for event in conn.receive_data(piece):
                assert isinstance(event, DataChunk)
                decode_chunk_payload(decompressor, event, CHUNK)
        return total

    decode_best, decode_median = best_rate(decode, repeat, setup=fresh_receiver)
    wire_bytes = sum(len(parts[1]) for parts in wire)
    return {
        "encode": encode_best,
        "encode_median": encode_median,
        "decode": decode_best,
        "decode_median": decode_median,
        "ratio": total / wire_bytes,
    }


def primitives(chunks: list[bytes], repeat: int) -> dict[str, float]:
    total = sum(map(len, chunks))
    out: dict[str, float] = {}
    buffer = bytearray(CHUNK)

    def memcpy() -> int:
        for raw in chunks:
            buffer[: len(raw)] = raw
        return total

    out["memcpy"] = best_rate(memcpy, repeat)[0]
    for label, make in (
        ("HMAC-SHA256", lambda: hmac.new(KEY, digestmod="sha256")),
        ("SHA-256", lambda: hashlib.sha256()),
        ("SHA-1", lambda: hashlib.sha1()),  # a speed reference only
        ("BLAKE2b keyed", lambda: hashlib.blake2b(key=KEY)),
    ):

        def digest(make: Callable[[], hmac.HMAC | hashlib._Hash] = make) -> int:
            h = make()
            for raw in chunks:
                h.update(raw)
            h.digest()
            return total

        out[label] = best_rate(digest, repeat)[0]
    for level in (1, DEFAULT_COMPRESSION_LEVEL):
        compressor = make_compressor(level)
        frames = [compressor.compress(raw) for raw in chunks]
        decompressor = zstandard.ZstdDecompressor()

        def compress(compressor: zstandard.ZstdCompressor = compressor) -> int:
            for raw in chunks:
                compressor.compress(raw)
            return total

        def decompress(frames: list[bytes] = frames, d=decompressor) -> int:
            for frame in frames:
                d.decompress(frame)
            return total

        out[f"zstd {level} compress"] = best_rate(compress, repeat)[0]
        out[f"zstd {level} decompress"] = best_rate(decompress, repeat)[0]
    return out


def level_sweep(chunks: list[bytes], repeat: int) -> list[tuple[int, float, float]]:
    total = sum(map(len, chunks))
    rows = []
    for level in (-7, -5, -3, -2, -1, 1, 2, 3):
        compressor = make_compressor(level)

        def compress(compressor: zstandard.ZstdCompressor = compressor) -> int:
            for raw in chunks:
                compressor.compress(raw)
            return total

        size = sum(len(compressor.compress(raw)) for raw in chunks)
        rows.append((level, total / size, best_rate(compress, repeat)[0]))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32, help="MiB of data per data set")
    parser.add_argument("--repeat", type=int, default=15, help="runs per figure (best is kept)")
    args = parser.parse_args()
    print(f"vfmig.protocol data path, 1 MiB chunks, {args.mib} MiB per set; {pin_to_one_core()}")
    realistic = [realistic_state(1, i * CHUNK, CHUNK) for i in range(args.mib)]
    incompressible = [hashlib.shake_256(b"bench %d" % i).digest(CHUNK) for i in range(args.mib)]

    print("\nzstd levels on realistic state (compression only):")
    print(f"  {'level':>5}  {'ratio':>6}  {'GB/s':>6}")
    for level, ratio, rate in level_sweep(realistic, args.repeat):
        mark = "  <- default" if level == DEFAULT_COMPRESSION_LEVEL else ""
        print(f"  {level:>5}  {ratio:6.2f}  {rate:6.2f}{mark}")

    results = {}
    for name, data in (("realistic", realistic), ("incompressible", incompressible)):
        prims = primitives(data, args.repeat)
        print(f"\n{name}: primitives, GB/s")
        for label, rate in prims.items():
            print(f"  {label:<22} {rate:7.2f}")
        print(f"{name}: through the Connection, GB/s (best / median)")
        for level in sorted({1, DEFAULT_COMPRESSION_LEVEL}):
            r = measure(name, data, level, args.repeat)
            results[name, level] = (r, prims)
            print(f"  level {level:>2}: encode {r['encode']:5.2f} / {r['encode_median']:5.2f}"
                  f"   decode {r['decode']:5.2f} / {r['decode_median']:5.2f}"
                  f"   wire ratio {r['ratio']:.2f}")  # fmt: skip

    print("\nacceptance")
    real, prims = results["realistic", DEFAULT_COMPRESSION_LEVEL]
    share = real["encode"] / prims["zstd 1 compress"]
    verdicts = [
        (f"encode realistic (level {DEFAULT_COMPRESSION_LEVEL}) >= 90 % of zstd-1 compress",
         share >= 0.9, f"{share:.0%}"),
    ]  # fmt: skip
    like, _ = results["realistic", 1]
    like_share = like["encode"] / prims["zstd 1 compress"]
    print(f"  (like for like, level 1 encode vs zstd-1 compress: {like_share:.0%})")
    rnd, _ = results["incompressible", DEFAULT_COMPRESSION_LEVEL]
    verdicts += [
        ("encode incompressible >= 1 GB/s", rnd["encode"] >= 1.0, f"{rnd['encode']:.2f} GB/s"),
        ("decode incompressible >= 1 GB/s", rnd["decode"] >= 1.0, f"{rnd['decode']:.2f} GB/s"),
    ]
    for label, ok, figure in verdicts:
        print(f"  {'PASS' if ok else 'MISS'}  {label}: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
