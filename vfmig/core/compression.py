"""Whether a sender tries to compress its next chunk.

Theory of operation
-------------------
A chunk is sent compressed only when zstd makes it smaller; otherwise its raw bytes go out
(``protocol.encode_chunk_payload``). On incompressible state -- encrypted or already
compressed memory -- every attempt is lost work: zstd level 1 spends ~0.75 CPU-s per GiB
to find that out, on a machine where CPU is what limits the transfer. So a chunk that did
not compress makes the sender skip the next attempts, one chunk at first and twice as
many after each further failure, up to :data:`MAX_SKIP`; a chunk that compresses resets
the skip. A stream that turns compressible again is noticed within ``MAX_SKIP`` chunks;
a compressible one never skips (any chunk that compresses keeps every next one tried).

Decisions are made in read order; outcomes arrive a few chunks later, and from two
encoder threads not always in order: an outcome only shapes the decisions made after it
arrives, the latest one winning.

Pure: stdlib only.
"""

from __future__ import annotations

from typing import Final

#: Most chunks sent raw, untried, between two attempts on an incompressible stream.
MAX_SKIP: Final = 8


class CompressionProbe:
    """``attempt()`` for each chunk read, in order; ``observe()`` each attempt's outcome."""

    def __init__(self) -> None:
        self._skip = 0  # chunks still to send untried
        self._next_skip = 1  # the skip after the next failed attempt

    def attempt(self) -> bool:
        """Whether to try compressing the next chunk (False: send it raw, untried)."""
        if self._skip:
            self._skip -= 1
            return False
        return True

    def observe(self, compressed: bool) -> None:
        """An attempt's outcome: did zstd make the chunk smaller?"""
        if compressed:
            self._skip, self._next_skip = 0, 1
        else:
            self._skip = self._next_skip
            self._next_skip = min(self._next_skip * 2, MAX_SKIP)
