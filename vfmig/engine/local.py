"""Local mode: agent code inside the ``vfmig migrate`` process, reached over socketpairs.

Theory of operation
-------------------
A spec without ``@HOST:PORT`` names a device of this host. Rather than a second code path,
``vfmig migrate`` runs an :class:`~vfmig.engine.agent.Agent` of its own and talks to it
exactly as to a remote one: the control link is a real socketpair carrying the same
protocol, and a stream between two local devices is a second socketpair between the
agent's sending and receiving sides, with the same compression, credit window and
digest. Both ends live in this process, so these links run in the protocol's no-key mode.

When a remote source streams to a local destination, the remote agent must reach this
process: the local agent then listens for that one data link on the address this
process already uses to reach the source's agent (the orchestrator passes it as
``bind``), and that link is authenticated with the shared key like any other.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import trio

from vfmig.core.errors import PeerError
from vfmig.engine.agent import Agent
from vfmig.engine.orchestrator import LOCAL, Endpoint

if TYPE_CHECKING:
    from vfmig.engine.agent import AgentConfig


class LocalAgent:
    """The in-process agent of local mode. Start it with ``await nursery.start(local.run)``."""

    def __init__(self, config: AgentConfig) -> None:
        self.agent = Agent(config)
        self.agent.use_data_binder(self._bind)
        self._listeners: dict[str, int] = {}

    async def run(self, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the agent's background tasks until cancelled (reports the agent)."""
        await self.agent.run(task_status=task_status)

    def endpoint(self) -> Endpoint:
        return Endpoint(host=LOCAL, connect=self._connect)

    async def _connect(self) -> tuple[trio.abc.Stream, bytes | None]:
        ours, theirs = trio.socket.socketpair()
        self.agent.nursery.start_soon(
            partial(
                self.agent.serve_control, trio.SocketStream(theirs), peer="in-process", key=None
            )
        )
        return trio.SocketStream(ours), None

    async def _bind(self, host: str) -> tuple[str, int]:
        """A TCP data listener on ``host`` for remote sources (one per host, kept open)."""
        port = self._listeners.get(host)
        if port is not None:
            return host, port
        agent = self.agent
        key = agent.config.key
        if key is None:
            raise PeerError(host, "a remote source needs the shared key (--key-file)")
        listeners = await trio.open_tcp_listeners(0, host=host)
        port = listeners[0].socket.getsockname()[1]
        self._listeners[host] = port

        async def on_data(stream: trio.SocketStream) -> None:
            await agent.serve_data(stream, peer=f"remote source via {host}", key=key)

        agent.nursery.start_soon(
            partial(trio.serve_listeners, on_data, listeners, handler_nursery=agent.nursery)
        )
        return host, port
