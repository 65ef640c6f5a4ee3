"""``sim:``: a simulated migratable device that answers exactly as a kernel driver would.

Theory of operation
-------------------
:class:`SimDevice` implements the four kernel-exact primitives of
:class:`~vfmig.device.backend.MigrationDevice` the way a VFIO variant driver does:

* ``_set_state`` holds the device lock (the driver's state mutex) and loops
  ``while (cur != new)`` over :func:`vfmig.core.fsm.next_state`, executing one arc at a
  time: ``cur == new`` succeeds without an fd (even ERROR -> ERROR); a request the kernel
  refuses (a state the flags lack, a target >= 8, any SET while in ERROR, the blocked
  STOP_COPY -> PRE_COPY* arcs of a fixed kernel) fails with EINVAL before any arc. Each
  arc's data-session effect comes from :func:`vfmig.core.fsm.arc_effect`: entering the
  saving group opens a saving session, STOP -> RESUMING a resuming one, moves inside the
  saving group keep the session, leaving it ends it (later reads give ENODEV).
  RESUMING -> STOP validates the written stream (:mod:`vfmig.device.sim_stream`): a bad,
  short or corrupt stream fails with EINVAL and the device stays in RESUMING, as mtty does.
* ``_reset`` is VFIO_DEVICE_RESET: RUNNING, every data session ended.
* ``_data_size`` is MIG_DATA_SIZE: the stop-copy stream length, in any state.

Failures raise ``OSError(errno)`` as the ioctl would; the shared policy layer above turns
them into vfmig errors. Fault injection (``fail=``, ``error=``, ``hang=``, ``read-error=``,
``write-error=``, ``truncate=``, ``corrupt=``) acts at exactly one arc or stream offset.
A hung arc blocks, holding the device lock like the kernel's looping arc holds the state
mutex, until :func:`release_hangs` (a test's cleanup) lets it fail with EINTR.

The state's content (:mod:`vfmig.device.sim_content`) is generated page by page from the
seed or read from ``image=``, never held in memory. While the device runs (RUNNING,
RUNNING_P2P, PRE_COPY, PRE_COPY_P2P) it dirties ``dirty-rate`` bytes per second of pages,
measured on an injectable clock, so precopy has something to converge on; the content of
a dirtied page depends on how often it was dirtied. A saving session streams pages as they
are at the moment it sends them; a resuming one writes into a staging file that becomes the
device's content when RESUMING -> STOP accepts it, and ``dump=`` gets a copy of it when the
device next reaches RUNNING (a hard link of that content file where possible: it is never
written in place, so the link is a copy that costs no downtime; an older dump is removed
when RESUMING begins, so that neither its blocks nor a rename over it cost downtime).

Every state change is written to a simulated debugfs tree
(``<tree>/vfio/<name>/migration/{state,features}``) read through the same
:class:`~vfmig.device.debugfs.DebugfsReader` as a real one. With ``state-dir=`` that tree,
the FSM state, the dirtied-page generations and any resumed content live in that directory
and survive the process, as mtty's state survives a close: a run that dies in PRE_COPY
leaves the device in PRE_COPY (without its data session) for the next opener, who must
bring it back. An exclusive ``flock`` on ``<state-dir>/lock`` makes a second opener fail
with EBUSY, like a VFIO group held by another process.

All primitives are thread-safe (one re-entrant lock per device); data-session reads and
writes may block (``read-delay=``), so callers run them in the device's worker thread.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from vfmig.core import fsm
from vfmig.core.errors import DataError, DeviceError
from vfmig.core.fsm import ArcEffect, DeviceState, MigrationFlags
from vfmig.core.units import format_size
from vfmig.device.backend import DataSession, Direction, MigrationDevice, PrecopyInfo
from vfmig.device.debugfs import DebugfsReader
from vfmig.device.sim_content import (
    BLOCK_PAGES,
    PAGE_SIZE,
    ZERO_PAGE,
    FilePages,
    GeneratedPages,
    PageSource,
    dirty_page,
    mix64,
)
from vfmig.device.sim_stream import SavingStream, StreamLoader, full_length

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from vfmig.core.spec import ContentKind, SimOptions

#: State size when neither ``size=`` nor ``image=`` gives one.
DEFAULT_SIZE: Final = 16 << 20

#: States in which the simulated device runs, and so dirties pages.
RUNNING_STATES: Final = frozenset(
    {DeviceState.RUNNING, DeviceState.RUNNING_P2P, DeviceState.PRE_COPY, DeviceState.PRE_COPY_P2P}
)

#: Version of ``<state-dir>/device.json``.
STATE_FORMAT: Final = 1

_FEATURE_NAMES: Final = (
    (MigrationFlags.STOP_COPY, "stop-copy"),
    (MigrationFlags.P2P, "p2p"),
    (MigrationFlags.PRE_COPY, "pre-copy"),
)

_hang_release = threading.Condition()
_hang_epoch = 0


def release_hangs() -> None:
    """Let every arc hung by ``hang=`` fail with EINTR (tests call this in their cleanup)."""
    global _hang_epoch
    with _hang_release:
        _hang_epoch += 1
        _hang_release.notify_all()


def _wait_for_release() -> None:
    with _hang_release:
        epoch = _hang_epoch
        while _hang_epoch == epoch:
            _hang_release.wait()


def name_seed(name: str) -> int:
    """The seed of a device whose spec gives none: a hash of its name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _nonzero_runs(offset: int, data: memoryview) -> list[tuple[int, memoryview]]:
    """``(offset, bytes)`` runs of ``data`` (at ``offset``) without its whole zero pages, as
    ``zstd -d`` leaves holes for zero blocks: ~40 % of a realistic state is never written
    to the staging file (nor to the page cache)."""
    raw = data.tobytes()  # slices of bytes compare at memcmp speed, memoryview's do not
    first = -offset % PAGE_SIZE  # the first page boundary in data
    runs: list[tuple[int, memoryview]] = []
    start = 0  # of the run being collected
    for at in range(first, len(raw) - PAGE_SIZE + 1, PAGE_SIZE):
        if raw[at : at + PAGE_SIZE] == ZERO_PAGE:
            if at > start:
                runs.append((offset + start, data[start:at]))
            start = at + PAGE_SIZE
    if start < len(raw):
        runs.append((offset + start, data[start:]))
    return runs


class SimSession(DataSession):
    """A simulated data fd: kernel side (``disabled`` once the session ends) and user side."""

    def __init__(
        self,
        device: SimDevice,
        direction: Direction,
        *,
        stream: SavingStream | None = None,
        loader: StreamLoader | None = None,
        staging_fd: int = -1,
    ) -> None:
        self.direction = direction
        self._device = device
        self.stream = stream
        self.loader = loader
        self.staging_fd = staging_fd
        self.disabled = False  # the driver ended the session: reads and writes give ENODEV
        self._closed = False  # this side closed its fd: everything gives EBADF
        self.written = 0

    @property
    def offset(self) -> int:
        """Stream bytes read or written so far."""
        return self.stream.position if self.stream is not None else self.written

    # --- DataSession -----------------------------------------------------------------

    def readinto(self, buffer: bytearray | memoryview) -> int | None:
        try:
            return self.raw_read(buffer)
        except OSError as exc:
            if exc.errno == _errno.ENOMSG:
                return None
            raise DataError(self._device.name, "read", errno=exc.errno, offset=self.offset) from exc

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return self.raw_write(data)
        except OSError as exc:
            raise DataError(
                self._device.name, "write", errno=exc.errno, offset=self.offset
            ) from exc

    def precopy_info(self) -> PrecopyInfo:
        try:
            return self.raw_precopy_info()
        except OSError as exc:
            raise DeviceError(
                self._device.name, "VFIO_MIG_GET_PRECOPY_INFO", errno=exc.errno
            ) from exc

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True

    # --- what the driver answers -----------------------------------------------------

    def raw_read(self, buffer: bytearray | memoryview) -> int:
        """read(2) on the fd: bytes read, 0 at the end of a STOP_COPY stream, OSError else."""
        if self._closed:
            raise OSError(_errno.EBADF, "the data fd is closed")
        if self.stream is None:
            raise OSError(_errno.EBADF, "read on a resuming data fd")
        device = self._device
        options = device.options
        if options.read_delay:
            device.sleep(options.read_delay)
        out = memoryview(buffer).cast("B")
        with device.lock:
            if self.disabled:
                raise OSError(_errno.ENODEV, "the data session has ended")
            device.advance()
            final = device.state is DeviceState.STOP_COPY
            position = self.stream.position
            limit = len(out)
            if options.truncate is not None:
                if position >= options.truncate:
                    if final:
                        return 0
                    raise OSError(_errno.ENOMSG, "no data now")
                limit = min(limit, options.truncate - position)
            if options.read_error is not None and position <= options.read_error.offset:
                if position == options.read_error.offset and limit:
                    raise OSError(options.read_error.errno, "injected read error")
                limit = min(limit, options.read_error.offset - position)
            filled = 0
            while filled < limit:
                chunk = self.stream.read(limit - filled, final=final)
                if not chunk:  # None: nothing now; empty: end of stream
                    break
                out[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
            if filled == 0 and limit and not final:
                raise OSError(_errno.ENOMSG, "no data now")
            corrupt = options.corrupt
            if corrupt is not None and position <= corrupt < position + filled:
                out[corrupt - position] ^= 0xFF
            return filled

    def raw_write(self, data: bytes | bytearray | memoryview) -> int:
        """write(2) on the fd: bytes taken, or OSError as the driver answers."""
        if self._closed:
            raise OSError(_errno.EBADF, "the data fd is closed")
        if self.loader is None:
            raise OSError(_errno.EBADF, "write on a saving data fd")
        device = self._device
        view = memoryview(data).cast("B")
        with device.lock:
            if self.disabled:
                raise OSError(_errno.ENODEV, "the data session has ended")
            fault = device.options.write_error
            if fault is not None and self.written <= fault.offset < self.written + len(view):
                if self.written == fault.offset:
                    raise OSError(fault.errno, "injected write error")
                view = view[: fault.offset - self.written]
            self.loader.feed(view)
            self.written += len(view)
            return len(view)

    def raw_precopy_info(self) -> PrecopyInfo:
        """VFIO_MIG_GET_PRECOPY_INFO on the fd, with mtty's order of checks."""
        if self._closed:
            raise OSError(_errno.EBADF, "the data fd is closed")
        if self.stream is None:
            raise OSError(_errno.ENOTTY, "a resuming data fd has no ioctls")
        device = self._device
        with device.lock:
            device.advance()
            if device.state not in fsm.PRECOPY_STATES:
                raise OSError(_errno.EINVAL, f"not in precopy ({device.state.name})")
            if self.disabled:
                raise OSError(_errno.ENODEV, "the data session has ended")
            return PrecopyInfo(self.stream.initial_bytes, self.stream.dirty_bytes)


class SimDevice(MigrationDevice):
    """A simulated device; see the module docstring. Paths in ``options`` are used as given."""

    kind = "sim"

    def __init__(
        self,
        name: str,
        options: SimOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__()
        self.name = name
        self.flags = options.flags
        self.options = options
        self.seed = options.seed if options.seed is not None else name_seed(name)
        self.sleep = sleep
        self.lock = threading.RLock()
        self._clock = clock
        self._hang_guard = threading.Lock()
        self._hanging = False
        self._close_pending = False
        self._closed = False
        self._lock_fd = -1
        self._released = False
        self._private_dir: Path | None = None
        self._dirty_kind: ContentKind = "realistic" if options.image else options.content
        self.state = DeviceState.RUNNING
        self._migf: SimSession | None = None
        self._gens: array[int] | None = None
        self._gens_changed = False
        self._dirty_seq = 0
        self._budget = 0.0
        self._last = clock()
        self._dump_pending = False
        self._base: PageSource | None = None
        try:
            self._open()
        except BaseException:
            self._release()
            raise

    # --- opening, persistence ----------------------------------------------------------

    def _open(self) -> None:
        options = self.options
        if options.state_dir is not None:
            self.workdir = Path(options.state_dir)
            self._lock_state_dir()
        else:
            self._private_dir = Path(tempfile.mkdtemp(prefix=f"vfmig-sim-{self.name}-"))
            self.workdir = self._private_dir
        self.size = self._initial_size()
        self.pages = -(-self.size // PAGE_SIZE)
        resumed = options.state_dir is not None and self._load_state_dir()
        if resumed:
            self._base = FilePages(self.workdir / "content.bin", self.size)
        elif options.image is not None:
            self._base = FilePages(Path(options.image), self.size)
        else:
            self._base = GeneratedPages(options.content, self.seed, self.size)
        if options.dump is not None and not Path(options.dump).parent.is_dir():
            raise DeviceError(
                self.name, "open", f"dump={options.dump}: the directory does not exist"
            )
        self._debugfs_dir.mkdir(parents=True, exist_ok=True)
        features = "".join(f"{text}\n" for flag, text in _FEATURE_NAMES if flag in self.flags)
        _atomic_write(self._debugfs_dir / "features", features.encode())
        self._enter(self.state)

    def _initial_size(self) -> int:
        options = self.options
        if options.image is None:
            return options.size or DEFAULT_SIZE
        try:
            size = os.stat(options.image).st_size
            with open(options.image, "rb"):
                pass
        except OSError as exc:
            raise DeviceError(
                self.name, "open", f"image={options.image}: {exc.strerror}", errno=exc.errno
            ) from exc
        if size == 0:
            raise DeviceError(self.name, "open", f"image={options.image} is empty")
        if options.size is not None and options.size != size:
            raise DeviceError(
                self.name,
                "open",
                f"image={options.image} holds {format_size(size)} but size= says "
                f"{format_size(options.size)}",
                hint="drop size= (it defaults to the image's size) or make them agree",
            )
        return size

    def _identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "flags": int(self.flags),
            "seed": self.seed,
            "content": self.options.content,
            "image": self.options.image,
        }

    def _lock_state_dir(self) -> None:
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(
                self.workdir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            raise DeviceError(
                self.name, "open", f"state-dir={self.workdir}: {exc.strerror}", errno=exc.errno
            ) from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeviceError(
                self.name,
                "open",
                f"device busy: another process holds its state-dir {self.workdir}",
                errno=_errno.EBUSY,
                hint="only one process may open a device; stop the other one first",
            ) from None

    def _load_state_dir(self) -> bool:
        """Take over the state a previous opener left; True if it holds resumed content."""
        path = self.workdir / "device.json"
        if not path.exists():
            return False
        try:
            meta = json.loads(path.read_text())
            if meta["format"] != STATE_FORMAT:
                raise ValueError(f"format {meta['format']}")
            identity = meta["identity"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise self._damaged(exc) from exc
        if identity != self._identity():
            raise DeviceError(
                self.name,
                "open",
                f"state-dir={self.workdir} belongs to another device ({_describe(identity)})",
                hint="use a fresh state-dir for this spec, or delete the old one",
            )
        try:
            self.state = DeviceState[meta["state"]]
            if meta["gens"]:
                self._gens = array("I", (self.workdir / "gens.bin").read_bytes())
                if len(self._gens) != self.pages:
                    raise ValueError("gens.bin does not match the state size")
            self._dirty_seq = int(meta["dirty_seq"])
            self._dump_pending = bool(meta["dump_pending"])
            return bool(meta["content_file"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise self._damaged(exc) from exc

    def _damaged(self, exc: Exception) -> DeviceError:
        return DeviceError(
            self.name,
            "open",
            f"state-dir={self.workdir} is damaged ({exc})",
            hint="delete the directory to start from a fresh device",
        )

    def _persist(self) -> None:
        if self.options.state_dir is None or self._released:
            return
        meta = {
            "format": STATE_FORMAT,
            "identity": self._identity(),
            "state": self.state.name,
            "content_file": isinstance(self._base, FilePages)
            and self._base.path == self.workdir / "content.bin",
            "gens": self._gens is not None,
            "dirty_seq": self._dirty_seq,
            "dump_pending": self._dump_pending,
        }
        if self._gens is not None and self._gens_changed:
            _atomic_write(self.workdir / "gens.bin", self._gens.tobytes())
            self._gens_changed = False
        _atomic_write(self.workdir / "device.json", json.dumps(meta, indent=1).encode())

    @property
    def _debugfs_root(self) -> Path:
        return self.workdir / "debugfs"

    @property
    def _debugfs_dir(self) -> Path:
        return self._debugfs_root / "vfio" / self.name / "migration"

    def _enter(self, state: DeviceState) -> None:
        self.state = state
        _atomic_write(self._debugfs_dir / "state", f"{state.name}\n".encode())
        self._persist()

    # --- content -----------------------------------------------------------------------

    def advance(self) -> None:
        """Dirty the pages due since the last call (caller holds :attr:`lock`)."""
        now = self._clock()
        elapsed, self._last = now - self._last, now
        rate = self.options.dirty_rate
        if rate and elapsed > 0 and self.state in RUNNING_STATES:
            self._budget += elapsed * rate
            count = int(self._budget // PAGE_SIZE)
            if count:
                self._budget -= count * PAGE_SIZE
                self._dirty(min(count, self.pages))

    def _dirty(self, count: int) -> None:
        if self._gens is None:
            self._gens = array("I", bytes(4 * self.pages))
        gens, seed, pages = self._gens, self.seed, self.pages
        migf = self._migf
        mark = migf.stream.mark_dirty if migf is not None and migf.stream is not None else None
        first = self._dirty_seq + 1
        self._dirty_seq += count
        for sequence in range(first, first + count):
            page = mix64(seed ^ sequence) % pages
            gens[page] = (gens[page] + 1) & 0xFFFF_FFFF or 1
            if mark is not None:
                mark(page)
        self._gens_changed = True

    def read_pages(self, first: int, count: int) -> bytes:
        """The current content of pages ``[first, first+count)`` (caller holds :attr:`lock`)."""
        assert self._base is not None
        gens = self._gens
        if gens is None:
            return self._base.read(first, count)
        dirtied = [(index, gen) for index, gen in enumerate(gens[first : first + count]) if gen]
        if not dirtied:
            return self._base.read(first, count)
        kind, seed = self._dirty_kind, self.seed
        if len(dirtied) == count:
            # Every page was rewritten since: the original content is not needed. (A dirty
            # record is mostly one page, and reading its original meant generating a whole
            # block: 2 GiB dirtied at 50 MiB/s drained in stop-copy at 55 MiB/s, against
            # precopy's 270, and missed a 300 ms downtime limit; now ~180 MiB/s.)
            length = min(count * PAGE_SIZE, self._base.size - first * PAGE_SIZE)
            rewritten = b"".join(dirty_page(kind, seed, first + i, g) for i, g in dirtied)
            return rewritten if length == len(rewritten) else rewritten[:length]
        data = self._base.read(first, count)
        view = memoryview(data)
        pages: list[bytes | memoryview] = [
            view[offset : offset + PAGE_SIZE] for offset in range(0, len(data), PAGE_SIZE)
        ]
        for index, generation in dirtied:
            page = dirty_page(kind, seed, first + index, generation)
            pages[index] = page if len(pages[index]) == PAGE_SIZE else page[: len(pages[index])]
        return b"".join(pages)

    def _blocks(self) -> Iterator[bytes]:
        for first in range(0, self.pages, BLOCK_PAGES):
            yield self.read_pages(first, min(BLOCK_PAGES, self.pages - first))

    def probe_features(self) -> dict[str, str]:
        """What a VFIO_DEVICE_FEATURE PROBE of each known feature would answer.

        The simulated device implements the migration features and nothing else: no DMA
        logging (no dirty tracking), no precopy info v2, no power management, no DMA-BUF.
        """
        from vfmig.device import _uapi as uapi

        implemented = {
            uapi.FeatureId.MIGRATION,
            uapi.FeatureId.MIG_DEVICE_STATE,
            uapi.FeatureId.MIG_DATA_SIZE,
        }
        return {
            feature.name: "supported" if feature in implemented else "ENOTTY"
            for feature in uapi.FeatureId
        }

    def content_digest(self) -> str:
        """blake2b-256 (hex) of the device's current state content, computed in 1 MiB blocks."""
        digest = hashlib.blake2b(digest_size=32)
        with self.lock:
            self._check_open()
            self.advance()
            for block in self._blocks():
                digest.update(block)
        return digest.hexdigest()

    def snapshot_to(self, path: Path) -> None:
        """Write the device's current state content to ``path``, in 1 MiB blocks."""
        with self.lock, open(path, "wb") as out:
            self._check_open()
            self.advance()
            for block in self._blocks():
                out.write(block)

    # --- primitives ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise OSError(_errno.EBADF, "the device is closed")

    def _get_state(self) -> DeviceState:
        with self.lock:
            self._check_open()
            return self.state

    def _set_state(self, target: int) -> DataSession | None:
        with self.lock:
            self._check_open()
            self.advance()
            opened: SimSession | None = None
            try:
                while self.state != target:
                    step = fsm.next_state(self.state, target, self.flags)
                    if step is None:
                        raise OSError(
                            _errno.EINVAL, f"no step from {self.state.name} towards {target}"
                        )
                    opened = self._arc(self.state, step)
            finally:
                self._persist()
            return opened

    def _arc(self, src: DeviceState, dst: DeviceState) -> SimSession | None:
        options = self.options
        if (src, dst) in options.hang:
            self._hang(src, dst)
        code = options.fail_errno(src, dst)
        if code is not None:
            raise OSError(code, f"injected failure of {src.name}>{dst.name}")
        if (src, dst) in options.error:
            self._end_session()
            self._enter(DeviceState.ERROR)
            raise OSError(_errno.EIO, f"injected device error on {src.name}>{dst.name}")
        effect = fsm.arc_effect(src, dst)
        opened: SimSession | None = None
        if effect is ArcEffect.OPENS_SAVING:
            self._end_session()
            checksum = self.options.checksum == "crc32"
            stream = SavingStream(self.size, self.name, self.read_pages, checksum=checksum)
            opened = SimSession(self, Direction.SAVING, stream=stream)
        elif effect is ArcEffect.OPENS_RESUMING:
            self._end_session()
            opened = self._open_resuming()
        elif effect is ArcEffect.ENDS:
            if src is DeviceState.RESUMING:
                self._load_resumed()
            self._end_session()
        if dst is DeviceState.RUNNING and self._dump_pending:
            self._write_dump()
        if opened is not None:
            self._migf = opened
        self._enter(dst)
        return opened

    def _hang(self, src: DeviceState, dst: DeviceState) -> None:
        with self._hang_guard:
            self._hanging = True
        try:
            _wait_for_release()
        finally:
            with self._hang_guard:
                self._hanging = False
                close = self._close_pending
        if close:
            self._shutdown()
        raise OSError(_errno.EINTR, f"{src.name}>{dst.name} hung until release_hangs()")

    def _open_resuming(self) -> SimSession:
        if self.options.dump is not None:  # an older dump goes now, outside any downtime
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.options.dump)
        staging = self.workdir / "resuming.bin"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, self.size)
        fresh = 0  # bytes from here on were never written: the sized file's holes are zeros

        def sink(offset: int, data: memoryview) -> None:
            nonlocal fresh
            end = offset + len(data)
            if offset >= fresh:  # first-time pages arrive in order
                for at, run in _nonzero_runs(offset, data):
                    _pwrite_all(fd, run, at)
            else:  # a re-sent page may turn zero: written as is
                _pwrite_all(fd, data, offset)
            fresh = max(fresh, end)

        loader = StreamLoader(self.size, sink, checksum=self.options.checksum == "crc32")
        return SimSession(self, Direction.RESUMING, loader=loader, staging_fd=fd)

    def _load_resumed(self) -> None:
        """RESUMING -> STOP: accept the written stream as the state, or EINVAL (stay)."""
        migf = self._migf
        if migf is None or migf.loader is None:
            raise OSError(_errno.EINVAL, "no stream was written in this session")
        migf.loader.finish()
        content = self.workdir / "content.bin"
        os.replace(self.workdir / "resuming.bin", content)
        assert self._base is not None
        self._base.close()
        self._base = FilePages(content, self.size)
        self._gens = None
        self._dump_pending = self.options.dump is not None

    def _write_dump(self) -> None:
        assert self.options.dump is not None
        dump = Path(self.options.dump)
        partial = dump.with_name(dump.name + ".partial")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        # content.bin is never written in place (a later resume replaces it), so a hard
        # link is a faithful copy that costs nothing in the step; copy across filesystems.
        try:
            os.link(self.workdir / "content.bin", partial)
        except OSError:
            shutil.copyfile(self.workdir / "content.bin", partial)
        # Never a rename over an older dump (RESUMING removed it): ext4 would flush the
        # renamed file's dirty data before the rename returns (auto_da_alloc), hundreds of
        # MiB inside this step, in the downtime (0.4-1.7 s of a 256 MiB run's start), and
        # freeing the old one's blocks here cost 30-40 ms more.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dump)
        os.replace(partial, dump)
        self._dump_pending = False

    def _end_session(self) -> None:
        migf, self._migf = self._migf, None
        if migf is None:
            return
        migf.disabled = True
        if migf.staging_fd >= 0:
            os.close(migf.staging_fd)
            migf.staging_fd = -1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.workdir / "resuming.bin")

    def _reset(self) -> None:
        with self.lock:
            self._check_open()
            self.advance()
            self._end_session()
            self._dump_pending = False
            self._enter(DeviceState.RUNNING)

    def _data_size(self) -> int:
        with self.lock:
            self._check_open()
            self.advance()
            migf = self._migf
            if migf is not None and migf.stream is not None:
                return migf.stream.remaining()
            return full_length(self.size)

    def _close(self) -> None:
        with self._hang_guard:
            if self._closed:
                return
            self._closed = True
            if self._hanging:
                self._close_pending = True
                return
        with self.lock:
            self._shutdown()

    def _shutdown(self) -> None:
        self._end_session()
        self._persist()
        self._release()

    def _release(self) -> None:
        self._released = True
        if self._base is not None:
            self._base.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None

    @property
    def debugfs(self) -> DebugfsReader:
        return DebugfsReader(self.name, root=self._debugfs_root)


def _atomic_write(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _describe(identity: dict[str, Any]) -> str:
    try:
        flags = fsm.flag_names(MigrationFlags(identity["flags"]))
        return f"'{identity['name']}', {format_size(identity['size'])}, {flags}"
    except (KeyError, TypeError, ValueError):
        return "unreadable identity"
