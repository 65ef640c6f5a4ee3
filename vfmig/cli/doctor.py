"""``vfmig doctor [DEVICE ...] [--probe] [--json]``: is this host (and are these devices) ready?

Runs the checks of :mod:`vfmig.device.doctor`: the host's, then each device's, one line
each -- pass, warn, fail or n/a -- with a hint under every warning and failure. The exit
status is 0 when no check fails, 1 (failed) otherwise; ``--json`` prints the versioned
envelope with every check.

Nothing is opened unless ``--probe`` is given, and then only devices no process holds:
opening a vfio-pci device resets the function, and a device parked in STOP may hold the
only copy of a migrated state. A device is named as for ``vfmig migrate`` (``vfio:ID``,
with ``vf-token=`` if it needs one) or by its bare id (PCI address, mdev UUID, sysfs path).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vfmig.core.errors import ExitStatus, UsageError
from vfmig.core.spec import parse_spec, vfio_options
from vfmig.core.units import DURATION_EXAMPLES, parse_duration
from vfmig.device import debugfs, sysfs
from vfmig.device.doctor import Check, DoctorHost, Status, check_device, check_host
from vfmig.device.sysfs import HostPaths

if TYPE_CHECKING:
    import argparse
    import uuid

    from vfmig.cli.context import Environment

DEFAULT_TIMEOUT = "10s"

PROBE_NOTE = (
    "--probe opens each idle device (read only: no SET, no reset); "
    "opening a vfio-pci device resets the function"
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "doctor",
        help="check that this host and its devices can migrate (pass/warn/fail, with hints)",
        description="Check the host -- kernel release and its known migration bugs, VFIO "
        "modules, group and cdev paths, debugfs, privileges -- and each DEVICE: driver, "
        "IOMMU group, access, VF token, other users, migration flags, state and dirty "
        "tracking. Exit status 0 when no check fails. Opens no device unless --probe.",
    )
    parser.add_argument(
        "devices",
        nargs="*",
        metavar="DEVICE",
        help="vfio:ID[,vf-token=UUID] or a bare PCI address, mdev UUID or sysfs path",
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help="open each device no process holds to read its flags, state and DMA logging "
        "support (no state change; opening a vfio-pci device resets the function)",
    )
    parser.add_argument(
        "--timeout",
        default=DEFAULT_TIMEOUT,
        metavar="DURATION",
        help=f"stop waiting for a probed device after this long (default {DEFAULT_TIMEOUT})",
    )
    parser.add_argument(
        "--debugfs",
        type=Path,
        default=debugfs.DEFAULT_ROOT,
        metavar="DIR",
        help=f"where debugfs is mounted (default {debugfs.DEFAULT_ROOT})",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON envelope")
    parser.set_defaults(run=run)


def device_ident(text: str) -> tuple[str, uuid.UUID | None]:
    """``vfio:ID[,vf-token=...]`` or a bare id -> (id, VF token)."""
    kind, sep, _ = text.partition(":")
    if not sep or kind not in ("vfio", "sim"):
        return text, None  # a bare PCI address (it has colons too), UUID or path
    spec = parse_spec(text)
    if spec.kind == "sim":
        raise UsageError(
            f"{text}: a simulated device needs no host checks", hint="give vfio:ID devices"
        )
    if spec.remote:
        raise UsageError(
            f"{text} belongs to the host at {spec.address}",
            hint="run 'vfmig doctor' on that host",
        )
    return spec.name, vfio_options(spec).vf_token


def check_json(check: Check) -> dict[str, Any]:
    return {
        "id": check.id,
        "title": check.title,
        "status": check.status.value,
        "detail": check.detail,
        "hint": check.hint,
    }


def tally(checks: list[Check]) -> dict[str, int]:
    return {status.value: sum(c.status is status for c in checks) for status in Status}


def render(sections: list[tuple[str, list[Check]]]) -> list[str]:
    """``  pass  title  detail`` lines under a heading per section, hints indented below."""
    width = max((len(c.title) for _, checks in sections for c in checks), default=0)
    lines: list[str] = []
    for heading, checks in sections:
        lines.append(heading)
        for check in checks:
            lines.append(f"  {check.status.value:<4}  {check.title:<{width}}  {check.detail}")
            if check.hint and check.status in (Status.WARN, Status.FAIL):
                lines.append(f"  {'':<4}  {'':<{width}}  hint: {check.hint}")
    return lines


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def summary_line(counts: dict[str, int]) -> str:
    return (
        f"{counts['pass']} passed, {_plural(counts['warn'], 'warning')}, "
        f"{counts['fail']} failed, {counts['n/a']} n/a"
    )


def run(args: argparse.Namespace, env: Environment, *, host: DoctorHost | None = None) -> int:
    try:
        timeout = parse_duration(args.timeout)
    except ValueError as exc:
        raise UsageError(f"--timeout {exc}", hint=DURATION_EXAMPLES) from None
    if timeout <= 0:
        raise UsageError("--timeout must be more than 0")
    wanted = [device_ident(text) for text in args.devices]
    if host is None:
        host = DoctorHost(paths=HostPaths(debugfs=args.debugfs))
    found = [sysfs.find(ident, host.paths, host.kernel) for ident, _ in wanted]
    sections = [("host", check_host(host, [d for d in found if d is not None]))]
    for text, (ident, token) in zip(args.devices, wanted, strict=True):
        checks = check_device(ident, host, vf_token=token, probe=args.probe, timeout=timeout)
        sections.append((text, checks))
    every = [check for _, checks in sections for check in checks]
    counts = tally(every)
    failed = counts["fail"] > 0
    if args.json:
        result = {
            "host": {
                "release": host.release,
                "checks": [check_json(c) for c in sections[0][1]],
            },
            "devices": [
                {"device": name, "checks": [check_json(c) for c in checks]}
                for name, checks in sections[1:]
            ],
            "summary": counts,
            "probe": args.probe,
        }
        error = None
        if failed:
            error = {
                "type": "ChecksFailed",
                "message": f"{_plural(counts['fail'], 'check')} failed",
                "hint": "see each failed check's hint",
            }
        env.emit_json("doctor", result, error=error)
    else:
        if args.probe:
            print(f"note: {PROBE_NOTE}", file=env.stderr)
        for line in render(sections):
            env.print(line)
        env.print(summary_line(counts))
    return int(ExitStatus.FAILED if failed else ExitStatus.OK)
