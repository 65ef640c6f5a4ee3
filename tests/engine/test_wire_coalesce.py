"""wire.coalesce: an agent's batch of notices, folded for the orchestrator (pure)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from vfmig.core.events import (
    ChunkReceived,
    ChunkSent,
    StreamEnded,
    from_record,
    to_record,
)
from vfmig.core.model import DeviceId
from vfmig.engine import wire
from vfmig.engine.wire import Progress

DEVICES = [DeviceId.parse(name) for name in ("src0", "dst0", "src1", "dst1")]


def _chunk(kind: type[ChunkSent | ChunkReceived], dev: DeviceId, seq: int, final: bool) -> Any:
    return wire.event_notice(
        "r", kind(device=dev, seq=seq, offset=seq * 10, raw=10, wire=3 + seq % 4, final=final)
    )


@st.composite
def batches(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Notices as a sender and a receiver queue them: per device, chunks in seq order,
    cumulative progress, and now and then something that is not deferrable."""
    seqs: Counter[tuple[type, DeviceId]] = Counter()
    out: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 40))):
        what = draw(st.sampled_from(["sent", "received", "progress", "final", "ended"]))
        dev = draw(st.sampled_from(DEVICES))
        kind = ChunkSent if what in ("sent", "final") and dev.index == 0 else ChunkReceived
        if what == "progress":
            raw = seqs[(kind, dev)] * 10
            progress = Progress(device=dev, raw=raw, wire=raw // 3, busy_ns=raw)
            out.append(wire.progress_notice("r", progress))
        elif what == "ended":
            out.append(wire.event_notice("r", StreamEnded(device=dev, total=1, digest_ok=True)))
        else:
            out.append(_chunk(kind, dev, seqs[(kind, dev)], final=what == "final"))
            seqs[(kind, dev)] += 1
    return out


def _chunks(payloads: list[dict[str, Any]]) -> list[ChunkSent | ChunkReceived]:
    events = [from_record(p["event"]) for p in payloads if "event" in p]
    return [e for e in events if isinstance(e, ChunkSent | ChunkReceived)]


@given(batches())
def test_bytes_and_chunks_are_kept_per_device(batch: list[dict[str, Any]]) -> None:
    def totals(payloads: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
        sums: Counter[tuple[Any, ...]] = Counter()
        for e in _chunks(payloads):
            key = (type(e), e.device)
            sums[(*key, "raw")] += e.raw
            sums[(*key, "wire")] += e.wire
            sums[(*key, "chunks")] += e.chunks
        return sums

    assert totals(wire.coalesce(batch)) == totals(batch)


@given(batches())
def test_a_folded_record_covers_consecutive_chunks(batch: list[dict[str, Any]]) -> None:
    following: dict[tuple[type, DeviceId], int] = {}
    for e in _chunks(wire.coalesce(batch)):
        key = (type(e), e.device)
        assert e.seq == following.get(key, 0)
        assert e.offset == e.seq * 10  # the first chunk's
        following[key] = e.seq + e.chunks


@given(batches())
def test_nothing_crosses_a_notice_that_is_not_deferrable(batch: list[dict[str, Any]]) -> None:
    folded = wire.coalesce(batch)
    kept = [p for p in batch if not wire.deferrable(p)]
    assert [p for p in folded if not wire.deferrable(p)] == kept

    def segments(payloads: list[dict[str, Any]]) -> list[int]:
        """How many chunks lie between consecutive notices that are not deferrable."""
        counts = [0]
        for p in payloads:
            if wire.deferrable(p):
                counts[-1] += sum(e.chunks for e in _chunks([p]))
            else:
                counts.append(0)
        return counts

    assert segments(folded) == segments(batch)


@given(batches())
def test_progress_keeps_the_latest_sample_and_folding_again_changes_nothing(
    batch: list[dict[str, Any]],
) -> None:
    folded = wire.coalesce(batch)
    assert wire.coalesce(folded) == folded
    if batch and all(wire.deferrable(p) for p in batch):
        latest = {p["progress"]["device"]: p for p in batch if "progress" in p}
        assert [p for p in folded if "progress" in p] == list(latest.values())


def test_a_fold_reads_as_one_event() -> None:
    dev = DeviceId.parse("src0")
    batch = [_chunk(ChunkSent, dev, seq, final=False) for seq in range(5, 8)]
    (folded,) = wire.coalesce(batch)
    assert from_record(folded["event"]) == ChunkSent(
        device=dev, seq=5, offset=50, raw=30, wire=(4 + 5 + 6), final=False, chunks=3
    )
    # A record without the field (an older agent's) counts as one chunk.
    old = {
        "run": "r",
        "event": to_record(ChunkSent(device=dev, seq=8, offset=80, raw=10, wire=1, final=False))[
            :-1
        ],
    }
    (again,) = wire.coalesce([folded, old])
    assert from_record(again["event"]).chunks == 4
