"""``open_device(spec)``: from a device spec to an open :class:`MigrationDevice` of its kind.

Theory of operation
-------------------
A spec string is parsed (:func:`vfmig.core.spec.parse_spec`), then dispatched on its kind:
``sim`` builds a :class:`~vfmig.device.sim.SimDevice`, ``vfio`` calls
``vfmig.device.vfio.open_vfio_device``, imported only then so that simulated runs never
load the ctypes uAPI bindings. A spec naming an agent (``@HOST:PORT``) is not for this
host: the orchestrator hands it to that agent, which opens it without the address.

``sim_dir`` confines a simulated device's files: an agent opens specs that a remote peer
sent, and a peer must never choose files on the agent's host. With ``sim_dir`` set,
``image=``, ``dump=`` and ``state-dir=`` must be relative names that stay inside it (no
absolute path, no ``..``, no symlink leading out), and are resolved against it. Without it
(the local command line) paths are used as given.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from vfmig.core.errors import SpecError
from vfmig.core.spec import DeviceSpec, SimOptions, parse_spec, sim_options, vfio_options
from vfmig.device.sim import SimDevice

if TYPE_CHECKING:
    from vfmig.device.backend import MigrationDevice


def open_device(spec: DeviceSpec | str, *, sim_dir: Path | None = None) -> MigrationDevice:
    """Open the device ``spec`` names on this host (SpecError, DeviceError on failure)."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if spec.remote:
        raise SpecError(
            f"{spec} belongs to the agent at {spec.address}, not to this host",
            hint="give the spec to 'vfmig migrate', which asks that agent to open it",
        )
    if spec.kind == "sim":
        options = sim_options(spec)
        if sim_dir is not None:
            options = confine(options, sim_dir)
        return SimDevice(spec.name, options)
    if spec.kind == "vfio":
        vfio_options(spec)
        from vfmig.device.vfio import open_vfio_device

        return open_vfio_device(spec)
    raise SpecError(f"unknown device kind {spec.kind!r} (expected vfio or sim)")


def confine(options: SimOptions, sim_dir: Path) -> SimOptions:
    """``options`` with image=, dump= and state-dir= resolved inside ``sim_dir``, or SpecError."""
    root = sim_dir.resolve()

    def inside(key: str, value: str | None) -> str | None:
        if value is None:
            return None
        relative = Path(value)
        if relative.is_absolute() or ".." in relative.parts:
            raise SpecError(
                f"{key}={value!r}: this agent takes only names inside its sim directory",
                hint="give a relative name without '..' (the agent decides where its files live)",
            )
        resolved = (root / relative).resolve()
        if not resolved.is_relative_to(root):
            raise SpecError(
                f"{key}={value!r} leads out of this agent's sim directory (through a symlink)",
                hint="give a name inside the agent's sim directory",
            )
        return str(resolved)

    return dataclasses.replace(
        options,
        image=inside("image", options.image),
        dump=inside("dump", options.dump),
        state_dir=inside("state-dir", options.state_dir),
    )
