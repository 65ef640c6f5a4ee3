"""``vfmig list``: the VFIO devices of this host, from sysfs, ``/proc`` and debugfs only.

Nothing is opened unless ``--probe`` is given: opening a vfio-pci device resets the
function. With ``--probe`` every idle device (no process holds its group or cdev, as far
as ``/proc`` tells) is opened once to read its migration flags and state by ioctl; a
device that is held, or whose holders cannot be known (not root), is left alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vfmig.core.errors import DeviceError, errno_name
from vfmig.core.fsm import flag_names
from vfmig.device import sysfs
from vfmig.device.kernel import REAL_KERNEL
from vfmig.device.sysfs import HostPaths

if TYPE_CHECKING:
    import argparse

    from vfmig.cli.context import Environment
    from vfmig.device.kernel import Kernel

PROBE_NOTE = (
    "--probe opens every idle device to read its migration flags; "
    "opening a vfio-pci device resets the function"
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "list",
        help="list this host's VFIO devices",
        description="List the PCI functions bound to vfio-pci or a variant driver and the "
        "mdevs of this host: driver, IOMMU group, VFIO cdev, which process holds them, and "
        "their migration flags and state where debugfs shows them. Reads sysfs, /proc and "
        "debugfs only; opens nothing unless --probe is given.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON envelope")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="open each idle device (never a held one) to read its migration flags and "
        "state by ioctl; opening a vfio-pci device resets the function",
    )
    parser.set_defaults(run=run)


def probe(
    dev: sysfs.SysfsDevice, held: sysfs.Held, host: HostPaths, kernel: Kernel
) -> dict[str, Any]:
    """Open one device to read its flags and state, unless someone may be using it."""
    if held.status == "yes":
        return {"probed": False, "reason": "held"}
    if held.status == "unknown":
        return {"probed": False, "reason": "holders unknown (run as root)"}
    from vfmig.device.vfio import open_sysfs_device  # the ctypes uAPI only when probing

    try:
        with open_sysfs_device(dev, host=host, kernel=kernel) as device:
            return {
                "probed": True,
                "flags": flag_names(device.flags),
                "state": device.get_state().name,
            }
    except DeviceError as exc:  # the row already names the device: say only what failed
        suffix = f" ({errno_name(exc.errno)})" if exc.errno is not None else ""
        return {"probed": False, "reason": exc.reason + suffix}


def collect(host: HostPaths, kernel: Kernel, *, with_probe: bool) -> list[dict[str, Any]]:
    """One JSON-ready row per VFIO device."""
    holders = sysfs.scan_holders(host, kernel)
    rows: list[dict[str, Any]] = []
    for dev in sysfs.scan(host, kernel):
        held = holders.held(dev)
        migration = sysfs.debugfs_migration(dev.name, host)
        row: dict[str, Any] = {
            "device": dev.name,
            "bus": dev.bus,
            "description": dev.description,
            "driver": dev.driver,
            "iommu_group": dev.iommu_group,
            "cdev": dev.cdev,
            # vfio-dev/vfioN is in sysfs for every VFIO device; the node needs VFIO_DEVICE_CDEV
            "cdev_node": dev.cdev_node is not None and kernel.exists(host.dev_node(dev.cdev_node)),
            "physfn": dev.physfn,
            "parent": dev.parent,
            "held": held.status,
            "holders": [{"pid": h.pid, "command": h.command} for h in held.holders],
            "migration": migration.flags_text,
            "migration_source": "debugfs",
            "state": migration.state,
        }
        if with_probe:
            result = probe(dev, held, host, kernel)
            row["probe"] = result
            if result["probed"]:
                row["migration"] = result["flags"]
                row["migration_source"] = "probe"
                row["state"] = result["state"]
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]], *, with_probe: bool) -> list[str]:
    header = ["DEVICE", "BUS", "ID/TYPE", "DRIVER", "GROUP", "CDEV", "HELD", "MIGRATION", "STATE"]
    if with_probe:
        header.append("PROBE")
    lines = [header]
    for row in rows:
        held = row["held"]
        if row["holders"]:
            held = ",".join(f"{h['pid']}/{h['command']}" for h in row["holders"])
        cells = [
            row["device"],
            row["bus"],
            row["description"],
            row["driver"] or "-",
            row["iommu_group"] or "-",
            row["cdev"] if row["cdev_node"] else "-",
            held,
            row["migration"],
            row["state"] or "-",
        ]
        if with_probe:
            result = row["probe"]
            cells.append("ok" if result["probed"] else f"skipped: {result['reason']}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]


def run(
    args: argparse.Namespace,
    env: Environment,
    *,
    host: HostPaths | None = None,
    kernel: Kernel | None = None,
) -> int:
    host = host or HostPaths()
    kernel = kernel or REAL_KERNEL
    if args.probe and not args.json:
        print(f"note: {PROBE_NOTE}", file=env.stderr)
    rows = collect(host, kernel, with_probe=args.probe)
    if args.json:
        result: dict[str, Any] = {"devices": rows}
        if args.probe:
            result["note"] = PROBE_NOTE
        env.emit_json("list", result)
        return 0
    if not rows:
        env.print(
            "no VFIO devices (looked in "
            f"{host.sys / 'bus' / 'pci' / 'devices'} and {host.sys / 'bus' / 'mdev' / 'devices'})"
        )
        return 0
    for line in _table(rows, with_probe=args.probe):
        env.print(line)
    return 0
