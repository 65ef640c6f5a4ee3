"""The trio engine: device workers, protocol links, agents, the orchestrator and the event bus.

Everything that awaits lives here (architecture.md §1): device code below is synchronous and
runs in each device's worker thread; the pure phase machine above never awaits. The engine
never writes to a terminal: it publishes events on a bus that the CLI's display reads.
"""

from __future__ import annotations
