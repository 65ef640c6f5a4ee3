"""The agent's RPC methods: one table of names and parameter shapes.

The protocol checks only msgpack shapes (a ``device`` is a str, a ``stream`` an int);
what the values mean is the engine's business. A known method with a missing or
mis-shaped parameter is refused when sent (LocalProtocolError) and when received
(RemoteProtocolError, ``bad_params``); extra parameters are ignored, like unknown message
fields (forward compatibility). A method this side does not know cannot be sent; one
received is passed through unchecked, and the agent answers it with an ErrorResponse
``unknown_method``, so a newer orchestrator can probe an older agent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._errors import ErrorCode, LocalProtocolError

if TYPE_CHECKING:
    from ._events import Value

_SHAPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "bool": bool,
    "bytes": bytes,
    "list": list,
    "map": dict,
}


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    #: param name -> (msgpack shape, required)
    params: dict[str, tuple[str, bool]]
    summary: str


def _m(name: str, summary: str, **params: str) -> Method:
    """``device="str"`` is required; ``recover="int?"`` optional."""
    return Method(
        name, {k: (v.rstrip("?"), not v.endswith("?")) for k, v in params.items()}, summary
    )


#: Every method an agent serves (docs/protocol.md §6 lists the same table; a test compares).
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _m("open_device", "open a device spec and read its migration flags", device="str",
           options="map?"),
        _m("close_device", "close a device (returns it to RUNNING first if needed)",
           device="str"),
        _m("get_state", "read the device state (MIG_DEVICE_STATE GET)", device="str"),
        _m("set_state", "vetted SET to state, recovering to recover on failure",
           device="str", state="int", recover="int?"),
        _m("precopy_info", "VFIO_MIG_GET_PRECOPY_INFO on the data session", device="str"),
        _m("data_size", "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE", device="str"),
        _m("reset", "VFIO_DEVICE_RESET", device="str"),
        _m("start_send", "connect to a destination's data listener and stream the device",
           device="str", stream="int", peer="str", peer_name="str?"),
        _m("start_receive", "open a data listener for stream; returns its address",
           device="str", stream="int"),
        _m("stop_stream", "stop sending or receiving a stream", device="str", stream="int"),
        _m("commit", "the point of no return of a run: resume the destination", run="str"),
        _m("status", "the agent's devices, streams and runs"),
        _m("journal", "bytes of the agent's journal of a run, from offset", run="str",
           offset="int"),
        _m("fetch_journal", "bytes of a finished journal of the agent's store, from offset",
           run="str", offset="int", role="str?"),
        _m("subscribe", "stream the agent's events as Notification messages",
           topics="list?"),
        _m("migrate", "run a migration from this agent (vfmig agent --orchestrate)",
           devices="list", options="map?", progress="bool?"),
        _m("abort", "abort the run this link asked for (before its commit point)",
           signal="str?"),
    )
}  # fmt: skip


def check_params(method: str, params: dict[str, Value]) -> None:
    """Raise LocalProtocolError if a known method's params have the wrong shapes."""
    spec = METHODS.get(method)
    if spec is None:
        return
    for name, (shape, required) in spec.params.items():
        if name not in params:
            if required:
                raise _bad(method, f"parameter {name!r} ({shape}) is missing")
            continue
        value = params[name]
        ok = isinstance(value, _SHAPES[shape])
        if shape == "int":
            ok = type(value) is int
        if not ok:
            got = type(value).__name__
            raise _bad(method, f"parameter {name!r} must be msgpack {shape}, got {got}")


def _bad(method: str, problem: str) -> LocalProtocolError:
    return LocalProtocolError(f"request {method}: {problem}", code=ErrorCode.BAD_PARAMS)
