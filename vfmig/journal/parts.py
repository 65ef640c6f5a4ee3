"""A journal file in parts, as agents serve it over the control RPC (``journal``,
``fetch_journal``: docs/protocol.md §6).

Theory of operation
-------------------
An answer carries a journal's bytes from a requested offset as at most :data:`PIECES`
pieces of at most :data:`PIECE` bytes: the protocol's largest bin (64 KiB), 960 KiB in
all, within a 1 MiB control frame. With them come the whole file's size, whether these
bytes reach its end, and the file's name on the agent's host; the asker asks again from
the next offset until the end. The agent reads a part with :func:`read` (in a worker
thread); both ends convert with :func:`to_wire` and :func:`from_wire`. This module holds
nothing else, so a client that only copies journals loads neither the engine nor the
journal's codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pathlib import Path

    from vfmig.protocol import Value

#: The largest piece: the protocol's max_bin_len.
PIECE: Final = 64 << 10
#: Pieces in one answer: 960 KiB, within a 1 MiB control frame.
PIECES: Final = 15
#: Whose journals of a run ``fetch_journal`` serves, by the role in their names: the
#: journal of a run the agent hosted, and the agent's own side of a run.
ROLES: Final = ("orchestrator", "agent")


class PartError(ValueError):
    """An answer that is not a journal's part."""


@dataclass(frozen=True, slots=True)
class Part:
    """Bytes of a journal from the requested offset; ``size`` is the whole file's,
    ``done`` says these bytes reach its end, ``name`` is the file's name on its host."""

    pieces: list[bytes]
    size: int
    done: bool
    name: str


def read(path: Path, offset: int) -> Part:
    """Up to :data:`PIECES` pieces of ``path`` from ``offset`` (ValueError for an offset
    beyond its end; OSError as the file gives it)."""
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        if not 0 <= offset <= size:
            raise ValueError(f"offset {offset} is outside 0..{size}")
        f.seek(offset)
        pieces = []
        for _ in range(PIECES):
            piece = f.read(PIECE)
            if not piece:
                break
            pieces.append(piece)
            offset += len(piece)
    return Part(pieces=pieces, size=size, done=offset >= size, name=path.name)


def to_wire(part: Part) -> dict[str, Value]:
    pieces: list[Value] = list(part.pieces)
    return {"data": pieces, "size": part.size, "done": part.done, "name": part.name}


def from_wire(value: object) -> Part:
    if not isinstance(value, dict):
        raise PartError(f"not a map: {value!r:.80}")
    pieces, size, done, name = (value.get(k) for k in ("data", "size", "done", "name"))
    if not isinstance(pieces, list) or not all(isinstance(p, bytes) for p in pieces):
        raise PartError("its data is not a list of bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise PartError(f"its size is not a count of bytes: {size!r:.40}")
    if not isinstance(done, bool) or not isinstance(name, str):
        raise PartError("its done or name has the wrong type")
    return Part(pieces=pieces, size=size, done=done, name=name)
