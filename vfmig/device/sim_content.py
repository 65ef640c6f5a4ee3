"""What a simulated device's state holds: deterministic pages, generated on demand, never stored.

Theory of operation
-------------------
A simulated state of any size (GiBs) is never held in memory. Its content is a pure
function of ``(kind, seed, page index)`` for the pages the device was created with, and of
``(seed, page index, generation)`` for pages dirtied since, so any range can be produced
again at any time, in any process, in bounded memory.

Content is produced in *blocks* of 256 pages (1 MiB), each one ``bytes`` made by a single
join of views into process-wide pools and short stamps, so each byte is copied once and
the per-page cost is a few view slices, never a per-byte Python loop; a read of a whole
block returns that object itself:

* a **random pool** of 8 MiB (SHAKE-256 of a fixed label, identical in every process):
  a random page is a 4 KiB window at a pseudo-random byte offset into it;
* a **ring pool** of 1024 pages that look like descriptor rings: 64-byte records with a
  sequence counter, flags, a length, a DMA address and cookies; a ring page is a pool page
  whose first 16 bytes are replaced by a stamp naming the page, so no two are equal;
* eight **template pages**, of which a near-copy differs by a 16-byte stamp at a
  pseudo-random offset.

For each block, 1 KiB of SHAKE-128 output keyed by ``(seed, block)`` picks every page's
class and pool offset. ``realistic`` content is about 40 % zero pages, 16 % random, 34 %
ring and 10 % near-copies (3.4x with zstd level 1, see docs/device-spec.md for the
measurement); ``random`` is all random windows; ``zero`` is all zero.

A dirtied page's content depends on its generation (how often it was dirtied), so each
dirtying really changes it, and so does each later one: a migration that loses a dirty
page leaves a destination that differs from the source.

The pools are built on first use (about 20 ms) and shared by every device of the process.
"""

from __future__ import annotations

import abc
import hashlib
import os
import struct
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from vfmig.core.spec import ContentKind

PAGE_SIZE: Final = 4096
#: Pages per generated block: 1 MiB, the read size the engine uses.
BLOCK_PAGES: Final = 256
BLOCK_SIZE: Final = PAGE_SIZE * BLOCK_PAGES


ZERO_PAGE: Final = bytes(PAGE_SIZE)
ZERO_BLOCK: Final = bytes(BLOCK_SIZE)

_RANDOM_POOL_SIZE: Final = 8 << 20
_RING_POOL_PAGES: Final = 1024
_TEMPLATES: Final = 8
_RECORD: Final = 64
#: One ring record: sequence, flags, length, DMA address, cookie, status, queue, type, hash.
_RING_RECORD: Final = struct.Struct("<IHHQ4s4xIHH3s29x")
_NOISE: Final = 14  # random bytes drawn per ring record
_STAMP: Final = 16

#: Class of a page by the low byte of its block word: 102/256 zero, 41 random, 87 ring,
#: 26 template (39.8 %, 16.0 %, 34.0 %, 10.2 %).
_ZERO_BELOW: Final = 102
_RANDOM_BELOW: Final = 143
_RING_BELOW: Final = 230

_BLOCK_WORDS: Final = struct.Struct(f"<{BLOCK_PAGES}I")
_STAMP_FORMAT: Final = struct.Struct("<QQ")
_MASK64: Final = (1 << 64) - 1
_GOLDEN: Final = 0x9E37_79B9_7F4A_7C15
_GOLDEN_2: Final = 0xC2B2_AE3D_27D4_EB4F
_ZERO_TAIL: Final = bytes(PAGE_SIZE - _STAMP)


class _Pools:
    """The process-wide pools, built on first use."""

    random: bytes
    random_view: memoryview  # of random: its slices are views, copied once by the join
    rings: tuple[bytes, ...]
    ring_tails: tuple[bytes, ...]  # each ring page without its first _STAMP bytes
    templates: tuple[memoryview, ...]

    def __init__(self) -> None:
        self.random = hashlib.shake_256(b"vfmig sim random pool v1").digest(
            _RANDOM_POOL_SIZE + PAGE_SIZE
        )
        entropy = hashlib.shake_256(b"vfmig sim ring pool v1").digest(
            _RING_POOL_PAGES * (PAGE_SIZE // _RECORD) * _NOISE
        )
        self.rings = tuple(_ring_page(entropy, page) for page in range(_RING_POOL_PAGES))
        self.random_view = memoryview(self.random)
        self.ring_tails = tuple(ring[_STAMP:] for ring in self.rings)
        self.templates = tuple(
            memoryview(self.rings[index])
            for index in range(0, _RING_POOL_PAGES, _RING_POOL_PAGES // _TEMPLATES)
        )


def _ring_page(entropy: bytes, page: int) -> bytes:
    """A page of 64-byte descriptor records: counters, flags, lengths, addresses, cookies."""
    # The amount of randomness per record (about 13 bytes: length, flags, 24 address bits,
    # a 4-byte cookie, status, a 3-byte hash) sets the ratio: ~3.4x overall with zstd -1.
    records = []
    base = page * (PAGE_SIZE // _RECORD)
    for index in range(PAGE_SIZE // _RECORD):
        noise = entropy[(base + index) * _NOISE : (base + index + 1) * _NOISE]
        length = 64 + int.from_bytes(noise[0:2], "little") % 1450
        flags = (0x8001, 0x8003, 0x0001, 0x4001)[noise[2] & 3]
        address = 0xFFFF_8880_0000_0000 | (int.from_bytes(noise[3:6], "little") << 12)
        records.append(
            _RING_RECORD.pack(
                (base + index) & 0xFFFF_FFFF,
                flags,
                length,
                address,
                noise[6:10],
                noise[10] & 7,
                index & 0xF,
                0x0800,
                noise[11:14],
            )
        )
    data = b"".join(records)
    assert len(data) == PAGE_SIZE
    return data


_pools: _Pools | None = None


def _get_pools() -> _Pools:
    global _pools
    if _pools is None:
        _pools = _Pools()
    return _pools


def mix64(value: int) -> int:
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash of an integer."""
    value = (value + 0x9E37_79B9_7F4A_7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58_476D_1CE4_E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D0_49BB_1331_11EB) & _MASK64
    return value ^ (value >> 31)


def _block(kind: ContentKind, seed: int, block: int) -> bytes:
    """The 256 pages of ``block`` of a generated state, joined (full pages; callers trim)."""
    if kind == "zero":
        return ZERO_BLOCK
    pools = _get_pools()
    words = _BLOCK_WORDS.unpack(
        hashlib.shake_128(_STAMP_FORMAT.pack(seed, block)).digest(_BLOCK_WORDS.size)
    )
    pool = pools.random_view
    if kind == "random":
        return b"".join([pool[(w >> 9) : (w >> 9) + PAGE_SIZE] for w in words])
    tails, templates, stamp = pools.ring_tails, pools.templates, _STAMP_FORMAT.pack
    pieces: list[bytes | memoryview] = []
    append = pieces.append
    first = block * BLOCK_PAGES
    for index, word in enumerate(words):
        cls = word & 0xFF
        if cls < _ZERO_BELOW:
            append(ZERO_PAGE)
        elif cls < _RANDOM_BELOW:
            append(pool[(word >> 9) : (word >> 9) + PAGE_SIZE])
        elif cls < _RING_BELOW:
            append(stamp(first + index, seed))
            append(tails[word >> 22])
        else:
            template = templates[(word >> 8) & 7]
            at = ((word >> 11) & 0xFF) * _STAMP
            append(template[:at])
            append(stamp(first + index, seed))
            append(template[at + _STAMP :])
    return b"".join(pieces)


def realistic_state(seed: int, offset: int, length: int) -> bytes:
    """Bytes ``[offset, offset+length)`` of the realistic state for ``seed`` (any alignment)."""
    if length <= 0:
        return b""
    first = offset // PAGE_SIZE
    last = (offset + length - 1) // PAGE_SIZE
    data = _generated_pages(lambda block: _block("realistic", seed, block), first, last - first + 1)
    skip = offset - first * PAGE_SIZE
    return data[skip : skip + length]


def _generated_pages(blocks: Callable[[int], bytes], first: int, count: int) -> bytes:
    """Pages ``[first, first+count)`` joined, taken from ``blocks(block) -> its 256 pages``;
    a whole block is that block's object itself (no copy)."""
    start, end = first * PAGE_SIZE, (first + count) * PAGE_SIZE
    first_block, last_block = first // BLOCK_PAGES, (first + count - 1) // BLOCK_PAGES
    if first_block == last_block:
        data = blocks(first_block)
        at = start - first_block * BLOCK_SIZE
        return data if at == 0 and count == BLOCK_PAGES else data[at : at + end - start]
    pieces: list[memoryview] = []
    for block in range(first_block, last_block + 1):
        base = block * BLOCK_SIZE
        view = memoryview(blocks(block))
        pieces.append(view[max(start, base) - base : min(end, base + BLOCK_SIZE) - base])
    return b"".join(pieces)


class _BlockCache:
    """The last block generated, kept for the small reads that re-send dirty pages."""

    def __init__(self, kind: ContentKind, seed: int) -> None:
        self.kind = kind
        self.seed = seed
        self._block = -1
        self._data = b""

    def get(self, block: int) -> bytes:
        if block != self._block:
            self._data = _block(self.kind, self.seed, block)
            self._block = block
        return self._data


def dirty_page(kind: ContentKind, seed: int, page: int, generation: int) -> bytes:
    """The content of ``page`` after its ``generation``-th dirtying (generation >= 1).

    Starts with a stamp naming the page and the generation, so it differs from the
    original page and from every other generation of it; the rest looks like the
    device's content kind (a ring page, a random window, or zeros).
    """
    stamp = _STAMP_FORMAT.pack(page, ((generation << 32) ^ seed) & _MASK64)
    if kind == "zero":
        return stamp + _ZERO_TAIL
    pools = _get_pools()
    # A multiplicative hash is enough to pick a pool entry (the stamp makes the page unique).
    word = ((page * _GOLDEN + generation * _GOLDEN_2) ^ seed) & _MASK64
    if kind == "random":
        start = (word >> 41) + _STAMP  # 23 bits: an offset into the 8 MiB pool
        return stamp + pools.random[start : start + PAGE_SIZE - _STAMP]
    return stamp + pools.ring_tails[word >> 54]


class PageSource(abc.ABC):
    """The original (never dirtied) content of a state, page by page."""

    size: int

    @property
    def pages(self) -> int:
        return -(-self.size // PAGE_SIZE)

    @abc.abstractmethod
    def read(self, first: int, count: int) -> bytes:
        """Pages ``[first, first+count)`` joined; the state's last page may be short."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the source holds (an open file)."""


class GeneratedPages(PageSource):
    """Content generated from ``(kind, seed)``."""

    def __init__(self, kind: ContentKind, seed: int, size: int) -> None:
        self.kind = kind
        self.seed = seed
        self.size = size
        self._cache = _BlockCache(kind, seed)
        if kind != "zero":
            _get_pools()  # once per process (~0.1 s): at open, not in the first (timed) read

    def read(self, first: int, count: int) -> bytes:
        data = _generated_pages(self._cache.get, first, count)
        end = (first + count) * PAGE_SIZE
        return data[: len(data) - (end - self.size)] if end > self.size else data

    def close(self) -> None:
        """Nothing to release: generated content holds no resources."""


class FilePages(PageSource):
    """Content read from a file (``image=``, or a state resumed earlier)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, first: int, count: int) -> bytes:
        offset = first * PAGE_SIZE
        length = min(count * PAGE_SIZE, self.size - offset)
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise OSError(5, f"{self.path}: short read at {offset} (the file shrank?)")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
