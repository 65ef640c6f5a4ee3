"""``vfmig recover DEVICE [--json] [--timeout DURATION]``: bring a device back to RUNNING.

For a device an earlier run left in a migration state (PRE_COPY, STOP_COPY, RESUMING, a
P2P state, STOP, ERROR). The procedure is :func:`vfmig.device.recovery.recover`: through
the FSM where it can, by reset where it must (ERROR, RESUMING, a failed SET). Each step is
printed as it completes. The device calls run in a worker thread; if one does not return
within ``--timeout`` the command stops waiting and exits with status 6 (device hung).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from vfmig.core.errors import DeviceError, DeviceHung, UsageError, VfmigError, errno_name
from vfmig.core.spec import parse_spec
from vfmig.core.units import DURATION_EXAMPLES, parse_duration
from vfmig.device.recovery import Method, Outcome, RecoveryReport, Step, recover

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from vfmig.cli.context import Environment
    from vfmig.core.spec import DeviceSpec
    from vfmig.device.backend import MigrationDevice

DEFAULT_TIMEOUT = "60s"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "recover",
        help="bring a device left in a migration state back to RUNNING",
        description="Open a device (vfio:ID or sim:NAME) found in a leftover migration "
        "state and bring it back to RUNNING: through the state machine where it can "
        "(STOP_COPY via STOP, PRE_COPY, the P2P states), by VFIO_DEVICE_RESET where it "
        "must (ERROR, RESUMING, after a failed state change). Reports every step.",
    )
    parser.add_argument("device", metavar="DEVICE", help="a device spec: vfio:ID or sim:NAME")
    parser.add_argument("--json", action="store_true", help="print a JSON envelope")
    parser.add_argument(
        "--timeout",
        default=DEFAULT_TIMEOUT,
        metavar="DURATION",
        help=f"stop waiting for the device after this long (default {DEFAULT_TIMEOUT})",
    )
    parser.set_defaults(run=run)


def step_json(step: Step) -> dict[str, Any]:
    return {
        "method": step.method.value,
        "request": step.request,
        "before": step.before.name if step.before is not None else None,
        "after": step.after.name if step.after is not None else None,
        "ok": step.ok,
        "errno": errno_name(step.errno) if step.errno is not None else None,
        "note": step.note,
    }


def report_json(spec: DeviceSpec, report: RecoveryReport) -> dict[str, Any]:
    return {
        "spec": str(spec),
        "device": report.device,
        "found": report.found.name if report.found is not None else None,
        "final": report.final.name if report.final is not None else None,
        "outcome": report.outcome.value,
        "methods": [method.value for method in report.methods],
        "steps": [step_json(step) for step in report.steps],
    }


def conclusion(report: RecoveryReport) -> str:
    """The last line: what the device is now and how it got there."""
    if report.outcome is Outcome.NOTHING_TO_DO:
        return "nothing to do: the device is RUNNING"
    found = report.found.name if report.found is not None else "an unreadable state"
    how = " then ".join(
        "the FSM" if method is Method.FSM else "a reset" for method in report.methods
    )
    return f"recovered: {found} -> RUNNING by {how}"


def failure(report: RecoveryReport) -> DeviceError:
    final = report.final.name if report.final is not None else "unknown"
    return DeviceError(
        report.device,
        "recover",
        f"the device is not RUNNING after recovery (state: {final})",
        hint="check the host's kernel log; the device or its driver needs attention",
    )


class _Worker:
    """Runs the recovery in a daemon thread, so a hung driver call cannot hold the command."""

    def __init__(self, device: MigrationDevice, observer: Callable[[Step], None]) -> None:
        self.device = device
        self.observer = observer
        self.report: RecoveryReport | None = None
        self.error: BaseException | None = None
        self.last: Step | None = None
        self.thread = threading.Thread(target=self._run, name="vfmig-recover", daemon=True)

    def _note(self, step: Step) -> None:
        self.last = step
        self.observer(step)

    def _run(self) -> None:
        try:
            self.report = recover(self.device, observer=self._note)
        except BaseException as exc:  # handed to the main thread, which raises it
            self.error = exc

    def wait(self, timeout: float) -> RecoveryReport:
        self.thread.start()
        self.thread.join(timeout)
        if self.thread.is_alive():
            last = f"; the last step that returned: {self.last.describe()}" if self.last else ""
            raise DeviceHung(
                self.device.name,
                "recover",
                f"no answer from the device within {timeout:g} s{last}",
                hint="the driver may be stuck holding its lock: check the host's kernel log",
            )
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report


def run(
    args: argparse.Namespace,
    env: Environment,
    *,
    opener: Callable[[DeviceSpec], MigrationDevice] | None = None,
) -> int:
    try:
        timeout = parse_duration(args.timeout)
    except ValueError as exc:
        raise UsageError(f"--timeout {exc}", hint=DURATION_EXAMPLES) from None
    if timeout <= 0:
        raise UsageError("--timeout must be more than 0")
    spec = parse_spec(args.device)
    if opener is None:
        from vfmig.device.open import open_device  # sim or vfio backend, loaded on demand

        opener = open_device
    as_json: bool = args.json

    def show(step: Step) -> None:
        if not as_json:
            env.print(f"  {step.describe()}")

    try:
        with opener(spec) as device:
            if not as_json:
                env.print(f"recovering {spec}")
            report = _Worker(device, show).wait(timeout)
    except VfmigError as exc:
        if as_json:
            error = {"type": type(exc).__name__, "message": str(exc), "hint": exc.hint}
            env.emit_json("recover", None, error=error)
        raise
    result = report_json(spec, report)
    if not report.ok:
        problem = failure(report)
        if as_json:
            error = {"type": type(problem).__name__, "message": str(problem), "hint": problem.hint}
            env.emit_json("recover", result, error=error)
        raise problem
    if as_json:
        env.emit_json("recover", result)
    else:
        env.print(conclusion(report))
    return 0
