"""The options of one migration run, as ``vfmig migrate`` takes them and the wire carries them.

Theory of operation
-------------------
:class:`RunOptions` is the user's side of a run: the limits and switches of ``vfmig
migrate`` in the units its flags use. It becomes the phase machine's
:class:`~vfmig.core.phases.MachineConfig` where a run is driven -- in the ``vfmig migrate``
process, or in an agent that hosts the run for a thin client (ADR 0010), which is why it
also travels as a msgpack map (:meth:`RunOptions.to_wire` / :meth:`RunOptions.from_wire`).
A map from a peer is checked field by field: a missing field takes its default (an older
client), a mis-shaped or out-of-range one is refused with :class:`ValueError`.

Pure: stdlib only, and cheap to import (the thin client imports it before anything else).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from vfmig.core.phases import MachineConfig

#: How long precopy may go on past ``max_precopy_s`` while switchover-acks are missing.
PRECOPY_ACK_GRACE_S: Final = 60.0
#: The zstd levels ``--compress-level`` accepts (None: send device data uncompressed).
MIN_LEVEL: Final = -7
MAX_LEVEL: Final = 22
#: The options that are durations.
_SECONDS_OR_MS: Final = ("downtime_limit_ms", "max_precopy_s", "step_timeout_s")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """A run's limits and switches (``vfmig migrate --help`` says what each one does)."""

    downtime_limit_ms: float = 300.0
    max_precopy_s: float = 120.0
    precopy: bool = True
    allow_no_p2p: bool = False
    #: zstd level of device data; None sends it uncompressed.
    compress_level: int | None = -1
    #: A device step (ioctl, data read or write) taking longer counts as hung.
    step_timeout_s: float = 30.0
    #: Journal the device streams too (each agent captures its destinations' streams).
    journal_data: bool = False

    def __post_init__(self) -> None:
        for name in _SECONDS_OR_MS:
            value = getattr(self, name)
            if not (isinstance(value, float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        for name in ("precopy", "allow_no_p2p", "journal_data"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false")
        level = self.compress_level
        if level is not None and (type(level) is not int or not MIN_LEVEL <= level <= MAX_LEVEL):
            raise ValueError(f"compress_level must be {MIN_LEVEL}..{MAX_LEVEL} or nil")

    def machine_config(self) -> MachineConfig:
        """The phase machine's configuration for these options."""
        from vfmig.core.phases import MachineConfig, PhaseTimeouts, PrecopyMode
        from vfmig.core.policy import ConvergenceConfig

        max_precopy_ns = int(self.max_precopy_s * 1e9)
        return MachineConfig(
            precopy=PrecopyMode.AUTO if self.precopy else PrecopyMode.OFF,
            allow_no_p2p=self.allow_no_p2p,
            convergence=ConvergenceConfig(
                downtime_limit_ns=int(self.downtime_limit_ms * 1e6),
                max_precopy_ns=max_precopy_ns,
            ),
            # Precopy may outlast its cap while acks are still due: by a minute at most.
            timeouts=PhaseTimeouts(precopy_ns=max_precopy_ns + int(PRECOPY_ACK_GRACE_S * 1e9)),
            step_timeout_ns=int(self.step_timeout_s * 1e9),
        )

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, value: object) -> RunOptions:
        """Options from a peer's map (ValueError naming the first bad field)."""
        if not isinstance(value, dict):
            raise ValueError("the run options must be a map")
        known = {f.name for f in fields(cls)}
        given: dict[str, Any] = {}
        for name, item in value.items():
            if name not in known:
                continue  # a newer client's option: ignored, like unknown message fields
            if name in _SECONDS_OR_MS and type(item) is int:
                item = float(item)  # msgpack keeps 300.0 a float, a hand-made map may not
            given[name] = item
        return cls(**given)
