"""A journal file in parts, as agents serve it (``vfmig.journal.parts``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from vfmig.journal import parts

if TYPE_CHECKING:
    from pathlib import Path


def test_a_file_comes_in_parts_that_add_up_to_it(tmp_path: Path) -> None:
    path = tmp_path / "j.vfj"
    data = os.urandom(2 * parts.PIECES * parts.PIECE + 1000)
    path.write_bytes(data)
    got, offset, answers = b"", 0, 0
    while True:
        part = parts.from_wire(parts.to_wire(parts.read(path, offset)))
        assert (part.size, part.name) == (len(data), "j.vfj")
        assert len(part.pieces) <= parts.PIECES
        assert all(0 < len(p) <= parts.PIECE for p in part.pieces)
        got += b"".join(part.pieces)
        offset += sum(map(len, part.pieces))
        answers += 1
        if part.done:
            break
    assert (got, answers) == (data, 3)
    end = parts.read(path, len(data))
    assert (end.pieces, end.done) == ([], True)
    with pytest.raises(ValueError, match=r"is outside 0\.\."):
        parts.read(path, len(data) + 1)


@pytest.mark.parametrize(
    "answer",
    [
        None,
        [],
        {"data": [b"x"], "size": 1, "done": True},
        {"data": ["x"], "size": 1, "done": True, "name": "n"},
        {"data": [b"x"], "size": True, "done": True, "name": "n"},
        {"data": [b"x"], "size": -1, "done": True, "name": "n"},
        {"data": [b"x"], "size": 1, "done": 1, "name": "n"},
        {"data": b"x", "size": 1, "done": True, "name": "n"},
    ],
)
def test_what_is_not_a_part_is_refused(answer: object) -> None:
    with pytest.raises(parts.PartError):
        parts.from_wire(answer)
