"""Fixtures of the device tests, and the backend the conformance suite runs against.

``test_conformance.py`` states how any migratable device must behave, through the
:class:`~vfmig.device.backend.MigrationDevice` interface only. By default it runs against
``sim:`` devices (:class:`SimBackend`). The kernel tier runs the same module inside its
guest against real devices: it sets ``VFMIG_CONFORMANCE_BACKEND`` to a Python file whose
``make_backend(directory: Path)`` returns an object with :class:`SimBackend`'s attributes:

* ``name``: shown in test ids and messages;
* ``flag_sets``: the flag sets it can open devices with (mtty: all three flags only);
  cases for other sets are skipped;
* ``quirks``: names from ``test_conformance.QUIRKS`` where the backend's driver departs
  from the uAPI text; cases that depend on them are skipped and say why;
* ``device(flags, dirty=False)``: an open device in RUNNING (``dirty``: one that dirties
  its state while running, so precopy reports dirty bytes);
* ``pair(flags)``: two devices a stream from the first can be resumed into;
* ``content_digest(device)``: a digest of the device's state, equal for equal states;
* ``failing_device(flags, src, dst, errno)``: a device whose ``src>dst`` arc fails with
  ``errno`` and leaves it in ``src``, or None when the backend cannot inject faults.

Every device a fixture hands out is closed at the end of the test.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

import pytest

from vfmig.core import fsm
from vfmig.core.errors import errno_name
from vfmig.core.spec import FLAG_NAMES
from vfmig.device.open import open_device
from vfmig.device.sim import SimDevice, release_hangs

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from vfmig.core.fsm import DeviceState, MigrationFlags
    from vfmig.device.backend import MigrationDevice

#: Not a whole number of pages, so the short last page is always exercised.
SIM_SIZE = 276 * 4096 - 3996


def flag_text(flags: MigrationFlags) -> str:
    return "+".join(name for name, flag in FLAG_NAMES.items() if flag in flags)


class SimBackend:
    """The conformance backend of ``sim:`` devices (the default)."""

    name = "sim"
    flag_sets = fsm.FLAG_SETS
    quirks: frozenset[str] = frozenset()

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._count = 0

    def _spec(self, flags: MigrationFlags, extra: str = "") -> str:
        self._count += 1
        return f"sim:conf{self._count},size={SIM_SIZE},flags={flag_text(flags)}{extra}"

    def device(self, flags: MigrationFlags, *, dirty: bool = False) -> MigrationDevice:
        return open_device(self._spec(flags, ",dirty-rate=1GiB/s" if dirty else ""))

    def pair(self, flags: MigrationFlags) -> tuple[MigrationDevice, MigrationDevice]:
        return open_device(self._spec(flags)), open_device(self._spec(flags))

    def content_digest(self, device: MigrationDevice) -> str:
        assert isinstance(device, SimDevice)
        return device.content_digest()

    def failing_device(
        self, flags: MigrationFlags, src: DeviceState, dst: DeviceState, errno: int
    ) -> MigrationDevice | None:
        return open_device(self._spec(flags, f",fail={src.name}>{dst.name}:{errno_name(errno)}"))


def _load_backend(path: str, directory: Path) -> Any:
    spec = importlib.util.spec_from_file_location("vfmig_conformance_backend", path)
    if spec is None or spec.loader is None:
        raise pytest.UsageError(f"VFMIG_CONFORMANCE_BACKEND={path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_backend(directory)


@pytest.fixture(scope="session")
def conformance_backend(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The backend under test: ``sim:`` unless ``VFMIG_CONFORMANCE_BACKEND`` names another."""
    directory = tmp_path_factory.mktemp("conformance")
    path = os.environ.get("VFMIG_CONFORMANCE_BACKEND")
    return _load_backend(path, directory) if path else SimBackend(directory)


@pytest.fixture
def quirks(conformance_backend: Any) -> frozenset[str]:
    return frozenset(conformance_backend.quirks)


@pytest.fixture
def _opened() -> Iterator[list[MigrationDevice]]:
    devices: list[MigrationDevice] = []
    yield devices
    release_hangs()
    for device in devices:
        device.close()


def _supported(backend: Any, flags: MigrationFlags) -> None:
    if flags not in backend.flag_sets:
        pytest.skip(f"{backend.name} devices cannot have flags {flag_text(flags)}")


@pytest.fixture
def make_device(
    conformance_backend: Any, _opened: list[MigrationDevice]
) -> Callable[..., MigrationDevice]:
    """``make_device(flags, dirty=False)``: a device in RUNNING, closed after the test."""

    def make(flags: MigrationFlags, *, dirty: bool = False) -> MigrationDevice:
        _supported(conformance_backend, flags)
        device: MigrationDevice = conformance_backend.device(flags, dirty=dirty)
        _opened.append(device)
        return device

    return make


@pytest.fixture
def make_pair(
    conformance_backend: Any, _opened: list[MigrationDevice]
) -> Callable[[MigrationFlags], tuple[MigrationDevice, MigrationDevice]]:
    """``make_pair(flags)``: a source and a destination for a save -> resume round trip."""

    def make(flags: MigrationFlags) -> tuple[MigrationDevice, MigrationDevice]:
        _supported(conformance_backend, flags)
        source, destination = conformance_backend.pair(flags)
        _opened.extend((source, destination))
        return source, destination

    return make


@pytest.fixture
def make_failing_device(
    conformance_backend: Any, _opened: list[MigrationDevice]
) -> Callable[[MigrationFlags, DeviceState, DeviceState, int], MigrationDevice]:
    """``make_failing_device(flags, src, dst, errno)``; skips where faults cannot be injected."""

    def make(
        flags: MigrationFlags, src: DeviceState, dst: DeviceState, errno: int
    ) -> MigrationDevice:
        _supported(conformance_backend, flags)
        device: MigrationDevice | None = conformance_backend.failing_device(flags, src, dst, errno)
        if device is None:
            pytest.skip(f"{conformance_backend.name} devices cannot inject arc failures")
        _opened.append(device)
        return device

    return make


@pytest.fixture
def content_digest(conformance_backend: Any) -> Callable[[MigrationDevice], str]:
    """``content_digest(device)``: equal for devices holding equal states."""
    digest: Callable[[MigrationDevice], str] = conformance_backend.content_digest
    return digest
