"""``vfmig inspect DEVICE``: everything vfmig can learn about one device without changing it.

For any spec (``sim:`` or ``vfio:``) the device is opened through
:func:`vfmig.device.open.open_device` and shown: migration flags, the state by ioctl and by
debugfs side by side, MIG_DATA_SIZE, precopy info (only from a data session this process
holds; a freshly opened device has none), DMA logging support and the kernel's answer to a
PROBE of every device feature vfmig knows. Nothing here sends a SET or a reset, so a device
found in a leftover migration state is shown in it, with a warning.

Feature probing is not part of :class:`~vfmig.device.backend.MigrationDevice`: a backend
that can do it offers ``probe_features() -> dict[str, str]`` (feature name -> ``supported``
or the errno name the kernel answered), and inspect uses it when present.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vfmig.core import fsm
from vfmig.core.errors import VfmigError
from vfmig.core.fsm import DeviceState
from vfmig.core.spec import parse_spec
from vfmig.core.units import format_size
from vfmig.device.backend import Direction

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from vfmig.cli.context import Environment
    from vfmig.core.spec import DeviceSpec
    from vfmig.device.backend import MigrationDevice

#: The features whose PROBE answers make up "DMA logging support".
DMA_LOGGING = ("DMA_LOGGING_START", "DMA_LOGGING_STOP", "DMA_LOGGING_REPORT")

#: What a device found outside RUNNING means, per state (inspect never changes it).
LEFTOVER: dict[DeviceState, str] = {
    DeviceState.ERROR: "the device is in ERROR: only a reset leaves it",
    DeviceState.STOP: "the device is stopped (left in STOP by an earlier user?)",
    DeviceState.RUNNING_P2P: "the device was left in RUNNING_P2P by an earlier user",
    DeviceState.STOP_COPY: "left in STOP_COPY by an earlier user, whose data fd is gone: "
    "bring it back to RUNNING (or reset it) before use",
    DeviceState.RESUMING: "left in RESUMING by an earlier user: reset it before any other state "
    "change (mtty oopses on a state change out of a reopened RESUMING)",
    DeviceState.PRE_COPY: "left in PRE_COPY by an earlier user, whose data fd is gone: bring it "
    "back to RUNNING before use",
    DeviceState.PRE_COPY_P2P: "left in PRE_COPY_P2P by an earlier user, whose data fd is gone: "
    "bring it back to RUNNING before use",
}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "inspect",
        help="show a device's migration flags, state, sizes and features",
        description="Open a device (vfio:ID or sim:NAME) and show its migration flags, its "
        "state by ioctl and by debugfs, MIG_DATA_SIZE, precopy info, DMA logging support and "
        "the kernel's answer to a PROBE of every device feature. Changes no state; note that "
        "opening a vfio-pci device resets the function.",
    )
    parser.add_argument("device", metavar="DEVICE", help="a device spec: vfio:ID or sim:NAME")
    parser.add_argument("--json", action="store_true", help="print a JSON envelope")
    parser.set_defaults(run=run)


def _attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, message)`` for a VfmigError: one failing line, not all."""
    try:
        return fn(), None
    except VfmigError as exc:
        return None, exc.message


def _state(device: MigrationDevice) -> tuple[DeviceState | None, dict[str, Any]]:
    """The state by ioctl (None if the GET failed) and the ioctl/debugfs comparison."""
    ioctl, ioctl_error = _attempt(device.get_state)
    reader = device.debugfs
    debugfs: str | None = None
    debugfs_note: str | None = "this backend has no debugfs view"
    if reader is not None:
        reading = reader.read_state()
        debugfs = reading.state.name if reading.state is not None else None
        debugfs_note = None if reading.state is not None else reading.raw
    return ioctl, {
        "ioctl": ioctl.name if ioctl is not None else None,
        "ioctl_error": ioctl_error,
        "debugfs": debugfs,
        "debugfs_note": debugfs_note,
        "agree": None if ioctl is None or debugfs is None else ioctl.name == debugfs,
    }


def _precopy(device: MigrationDevice, state: DeviceState | None) -> dict[str, Any]:
    if state not in fsm.PRECOPY_STATES:
        return {"available": False, "reason": "not in a precopy state"}
    session = device.session
    if session is None or session.direction is not Direction.SAVING:
        return {
            "available": False,
            "reason": "needs a saving data session, and this process holds none "
            "(the session of whoever entered precopy is gone)",
        }
    info, error = _attempt(device.precopy_info)
    if error is not None:
        return {"available": False, "reason": error}
    return {
        "available": True,
        "initial_bytes": info.initial_bytes,
        "dirty_bytes": info.dirty_bytes,
        "reinit": info.reinit,
    }


def _features(device: MigrationDevice) -> dict[str, str] | None:
    probe = getattr(device, "probe_features", None)
    if not callable(probe):
        return None
    answers: dict[str, str] = probe()
    return answers


def _dma_logging(features: dict[str, str] | None) -> dict[str, Any]:
    if features is None:
        return {"supported": None, "answers": {}}
    answers = {name: features.get(name, "unknown") for name in DMA_LOGGING}
    return {
        "supported": all(answer == "supported" for answer in answers.values()),
        "answers": answers,
    }


def _vfio_facts(device: MigrationDevice) -> dict[str, Any] | None:
    """Driver, group, cdev and how a kernel VFIO device was opened; None for other backends."""
    if device.kind != "vfio":
        return None  # never load the ctypes uAPI for a simulated device
    from vfmig.device.vfio import VfioDevice  # loaded already: the device came from it

    if not isinstance(device, VfioDevice):
        return None
    return {
        "driver": device.sysfs.driver,
        "iommu_group": device.sysfs.iommu_group,
        "cdev": device.sysfs.cdev,
        "physfn": device.sysfs.physfn,
        "description": device.sysfs.description,
        "opened_via": device.access,
    }


def inspect_device(device: MigrationDevice) -> dict[str, Any]:
    """The JSON-ready report of one open device; sends no SET and no reset."""
    report: dict[str, Any] = {"kind": device.kind, "name": device.name}
    facts = _vfio_facts(device)
    if facts is not None:
        report["vfio"] = facts
    report["flags"] = [f.name for f in fsm.MigrationFlags if f in device.flags]
    value, report["state"] = _state(device)
    report["leftover"] = LEFTOVER.get(value) if value is not None else None
    size, size_error = _attempt(device.data_size)
    report["data_size"] = size
    report["data_size_error"] = size_error
    report["precopy"] = _precopy(device, value)
    features = _features(device)
    report["dma_logging"] = _dma_logging(features)
    report["features"] = features
    return report


def render(spec: DeviceSpec, report: dict[str, Any]) -> list[str]:
    """The human-readable report: aligned ``key  value`` lines."""
    lines: list[tuple[str, str]] = [("device", str(spec))]
    vfio = report.get("vfio")
    if vfio is not None:
        where = ", ".join(
            part
            for part in (
                f"group {vfio['iommu_group']}" if vfio["iommu_group"] else "",
                f"cdev {vfio['cdev']}" if vfio["cdev"] else "",
                f"VF of {vfio['physfn']}" if vfio["physfn"] else "",
            )
            if part
        )
        lines.append(("driver", f"{vfio['driver']} ({where})" if where else str(vfio["driver"])))
        lines.append(("opened via", str(vfio["opened_via"])))
    lines.append(("flags", "+".join(report["flags"]) or "none"))
    state = report["state"]
    by_ioctl = state["ioctl"] or f"? ({state['ioctl_error']})"
    by_debugfs = state["debugfs"] or f"? ({state['debugfs_note']})"
    lines.append(("state", f"{by_ioctl} (ioctl)   {by_debugfs} (debugfs)"))
    if state["agree"] is False:
        lines.append(("", "ioctl and debugfs disagree"))
    if report["data_size"] is not None:
        size = report["data_size"]
        shown = f"{size} bytes" + (
            f" ({format_size(size)})" if format_size(size) != str(size) else ""
        )
        lines.append(("data size", f"{shown} (MIG_DATA_SIZE)"))
    else:
        lines.append(("data size", f"? ({report['data_size_error']})"))
    precopy = report["precopy"]
    if precopy["available"]:
        text = f"initial {precopy['initial_bytes']} bytes, dirty {precopy['dirty_bytes']} bytes"
        lines.append(("precopy", text + (", REINIT" if precopy["reinit"] else "")))
    else:
        lines.append(("precopy", f"n/a: {precopy['reason']}"))
    dma = report["dma_logging"]
    if dma["supported"] is None:
        lines.append(("dma logging", "unknown: this backend cannot probe features"))
    else:
        answers = ", ".join(
            f"{name.removeprefix('DMA_LOGGING_')} {answer}"
            for name, answer in dma["answers"].items()
        )
        lines.append(("dma logging", ("yes: " if dma["supported"] else "no: ") + answers))
    features = report["features"]
    if features is None:
        lines.append(("features", "not probed: this backend cannot probe features"))
    else:
        width = max(len(name) for name in features)
        for n, (name, answer) in enumerate(features.items()):
            lines.append(("features" if n == 0 else "", f"{name.ljust(width)}  {answer}"))
    key_width = max(len(key) for key, _ in lines)
    out = [f"{key.ljust(key_width)}  {value}".rstrip() for key, value in lines]
    if report["leftover"]:
        out.append(f"warning: {report['leftover']}")
    return out


def run(
    args: argparse.Namespace,
    env: Environment,
    *,
    opener: Callable[[DeviceSpec], MigrationDevice] | None = None,
) -> int:
    spec = parse_spec(args.device)
    if opener is None:
        from vfmig.device.open import open_device  # sim or vfio backend, loaded on demand

        opener = open_device
    with opener(spec) as device:
        report = inspect_device(device)
    if args.json:
        env.emit_json("inspect", {"spec": str(spec), **report})
        return 0
    for line in render(spec, report):
        env.print(line)
    return 0
