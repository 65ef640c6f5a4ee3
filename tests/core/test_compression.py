"""CompressionProbe: when a sender tries zstd on its next chunk (pure)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from vfmig.core.compression import MAX_SKIP, CompressionProbe


def _run(outcomes: list[bool]) -> list[bool]:
    """Each chunk's decision, feeding back the outcome of every attempt at once."""
    probe = CompressionProbe()
    decisions = []
    it = iter(outcomes)
    for _ in range(len(outcomes)):
        tried = probe.attempt()
        decisions.append(tried)
        if tried:
            probe.observe(next(it))
    return decisions


def test_a_compressible_stream_tries_every_chunk() -> None:
    assert all(_run([True] * 100))


def test_an_incompressible_stream_backs_off_to_one_attempt_in_max_skip_plus_one() -> None:
    decisions = _run([False] * 200)
    tried = [i for i, d in enumerate(decisions) if d]
    gaps = [b - a for a, b in itertools.pairwise(tried)]
    assert gaps[:4] == [2, 3, 5, 9]  # skips of 1, 2, 4, 8
    assert set(gaps[3:]) == {MAX_SKIP + 1}
    assert len(tried) <= 200 / (MAX_SKIP + 1) + 4


@given(st.lists(st.booleans(), max_size=200))
def test_a_chunk_that_compresses_keeps_the_next_one_tried(outcomes: list[bool]) -> None:
    probe = CompressionProbe()
    for compressed in outcomes:
        if probe.attempt():
            probe.observe(compressed)
            if compressed:
                assert probe.attempt()  # the very next chunk is tried
                probe.observe(True)
    # Never more than MAX_SKIP chunks in a row go untried.
    untried = 0
    for _ in range(3 * MAX_SKIP):
        if probe.attempt():
            break
        untried += 1
    assert untried <= MAX_SKIP


def test_late_results_shape_only_later_decisions() -> None:
    probe = CompressionProbe()
    assert probe.attempt()
    assert probe.attempt()  # dispatched before the first result came back
    probe.observe(False)
    probe.observe(False)  # the second failure doubles the skip
    assert [probe.attempt() for _ in range(3)] == [False, False, True]
