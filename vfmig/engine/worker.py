"""One device, one worker thread: every blocking call on a device, made safe for the event loop.

Theory of operation
-------------------
Device code (:class:`~vfmig.device.backend.MigrationDevice`) is synchronous and may block:
a driver can sit on its state mutex, a data read can wait for the device to produce data,
and most data fds cannot be polled (vfio-migration.md §3). So a :class:`DeviceWorker` runs
every call in a worker thread, through one ``CapacityLimiter(1)`` per device: calls on a
device are serialized in the order they were made (trio's limiter is fair), exactly like
QEMU's one migration thread per device.

Every call is a *step* with a timeout, and is shielded from ordinary cancellation: a state
change that was sent completes, so the caller learns the real state, and a data read that
was started is not lost half way. Only the step's own deadline can stop the wait; then the
device is reported hung (:class:`~vfmig.core.errors.DeviceHung`), the thread is abandoned
(it keeps the limiter until it returns, if ever), and the worker refuses every later call
at once with the same error: nothing else may queue behind a stuck driver.

debugfs reads take the driver's mutex too, but change nothing: they run through a limiter
of their own, with a short timeout, and are abandoned freely.

The thread runner is injectable (:data:`Executor`): tests on simulated devices may run the
calls inline to use trio's ``autojump_clock`` without trio#456 (the clock jumping while a
real thread works).
"""

from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

import trio

from vfmig.core.errors import DataError, DeviceError, DeviceHung, StateChangeError
from vfmig.core.fsm import DeviceState
from vfmig.device.backend import Direction
from vfmig.device.debugfs import DebugfsReading
from vfmig.protocol import Encoding, decode_chunk_payload, encode_chunk_payload

if TYPE_CHECKING:
    from collections.abc import Callable

    import zstandard

    from vfmig.device.backend import DataSession, MigrationDevice, PrecopyInfo
    from vfmig.protocol import DataChunk

T = TypeVar("T")

#: A debugfs read that takes longer than this is abandoned (it changes nothing).
DEBUGFS_TIMEOUT: Final = 1.0
#: Chunks of one stream compressed at once, each in a thread of its own (not the device's):
#: zstandard releases the GIL, so the next chunk is read while two are compressed.
ENCODERS: Final = max(1, min(2, os.cpu_count() or 1))


class Executor(Protocol):
    """Runs ``fn`` holding ``limiter``; ``abandon`` lets a cancellation abandon the call."""

    async def __call__(
        self, fn: Callable[[], T], *, limiter: trio.CapacityLimiter, abandon: bool
    ) -> T: ...


async def thread_executor(
    fn: Callable[[], T], *, limiter: trio.CapacityLimiter, abandon: bool
) -> T:
    """The real executor: a trio worker thread."""
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=abandon, limiter=limiter)


async def inline_executor(
    fn: Callable[[], T], *, limiter: trio.CapacityLimiter, abandon: bool
) -> T:
    """Run ``fn`` on the event loop (tests with ``autojump_clock``; never with a hang)."""
    async with limiter:
        await trio.lowlevel.checkpoint()
        return fn()


@dataclass(frozen=True, slots=True)
class SetResult:
    """A SET's answer: the state reached, or the failure with the state read back."""

    ok: bool
    state: DeviceState | None  #: the target if ok, else the state read back (None: unreadable)
    errno: int | None = None
    message: str = ""


@dataclass(frozen=True, slots=True)
class ReadResult:
    """One data read: ``raw`` bytes at ``offset``, encoded. ``raw == 0`` is end of stream."""

    offset: int
    raw: int
    encoding: Encoding | None = None
    payload: bytes | bytearray | memoryview = b""


class DeviceWorker:
    """The one way the engine touches a device; see the module docstring."""

    def __init__(
        self,
        device: MigrationDevice,
        *,
        label: str,
        step_timeout: float,
        executor: Executor = thread_executor,
    ) -> None:
        self.device = device
        self.label = label
        self.step_timeout = step_timeout
        self._executor = executor
        self._limiter = trio.CapacityLimiter(1)
        self._debugfs_limiter = trio.CapacityLimiter(1)
        self._encode_limiter = trio.CapacityLimiter(ENCODERS)
        self._running: str | None = None  #: the step in the device's thread right now
        self.hung: DeviceHung | None = None

    # --- the primitive ------------------------------------------------------------------

    async def run(self, fn: Callable[[], T], *, step: str, hang_after: float | None = None) -> T:
        """``fn()`` in the device's thread: shielded, serialized; DeviceHung once it has run for
        ``hang_after`` seconds (default: the step timeout) -- a verdict, not a cancellation."""
        if self.hung is not None:
            raise DeviceHung(
                self.label,
                step,
                f"refused: the device hung earlier ({self.hung.step}) and is abandoned",
            )
        limit = self.step_timeout if hang_after is None else hang_after

        def call() -> T:
            self._running = step
            try:
                return fn()
            finally:
                self._running = None

        done = False
        result: T | None = None
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + limit
            result = await self._executor(call, limiter=self._limiter, abandon=True)
            done = True
        if not done:
            # The step that holds the device is the one to blame, not one queued behind it.
            culprit = self._running or step
            behind = f" ({step} waited behind it)" if culprit != step else ""
            self.hung = DeviceHung(
                self.label,
                culprit,
                f"did not return within {limit:g} s{behind}; its thread is abandoned",
            )
            raise self.hung
        return result  # type: ignore[return-value]  # T may itself include None

    # --- device operations ----------------------------------------------------------------

    async def get_state(self) -> DeviceState:
        return await self.run(self.device.get_state, step="GET device state")

    async def set_state(
        self, target: DeviceState, *, step: str, hang_after: float | None = None
    ) -> SetResult:
        """A vetted SET. A device's refusal is a :class:`SetResult`, not an exception;
        RequestRefused (vfmig's own refusal) and DeviceHung propagate."""

        def call() -> SetResult:
            try:
                self.device.set_state(target)
            except StateChangeError as exc:
                after = None if exc.state_after is None else DeviceState(exc.state_after)
                return SetResult(False, after, exc.errno, exc.reason)
            return SetResult(True, target)

        return await self.run(call, step=step, hang_after=hang_after)

    async def reset(self, *, hang_after: float | None = None) -> None:
        await self.run(self.device.reset, step="reset", hang_after=hang_after)

    async def data_size(self) -> int:
        return await self.run(self.device.data_size, step="MIG_DATA_SIZE")

    async def precopy_info(
        self, *, then: Callable[[PrecopyInfo], None] | None = None
    ) -> PrecopyInfo:
        """VFIO_MIG_GET_PRECOPY_INFO; ``then(info)`` runs in the same serialized step."""

        def call() -> PrecopyInfo:
            info = self.device.precopy_info()
            if then is not None:
                then(info)
            return info

        return await self.run(call, step="VFIO_MIG_GET_PRECOPY_INFO")

    async def read_chunk(
        self, buffer: bytearray, size: int, position: Callable[[int], int]
    ) -> ReadResult | None:
        """Read up to ``size`` bytes of the saving session into ``buffer``, in the thread.

        Returns None for "nothing now", a ``raw == 0`` result at end of stream, else a RAW
        result whose payload is a view of ``buffer`` (:meth:`encode` compresses it).
        ``position`` is called in the thread with the bytes read and returns the stream
        offset before them, so a precopy query serialized after this step sees the new
        position.
        """

        def call() -> ReadResult | None:
            session = self._session(Direction.SAVING, "data read")
            view = memoryview(buffer)[:size]
            count = session.readinto(view)
            if count is None:
                return None
            offset = position(count)
            if count == 0:
                return ReadResult(offset, 0)
            return ReadResult(offset, count, Encoding.RAW, view[:count])

        return await self.run(call, step="data read")

    async def encode(
        self, compressor: zstandard.ZstdCompressor, raw: memoryview
    ) -> tuple[Encoding, bytes | bytearray | memoryview]:
        """``raw`` encoded with ``compressor`` (used by this call alone), in a thread of up
        to :data:`ENCODERS` that are not the device's: the device is not touched."""
        return await self._executor(
            lambda: encode_chunk_payload(compressor, raw),
            limiter=self._encode_limiter,
            abandon=False,
        )

    async def write_chunk(
        self,
        chunk: DataChunk,
        decompressor: zstandard.ZstdDecompressor | None,
        max_chunk_size: int,
        offset: int,
        tap: Callable[[int, memoryview], None] | None = None,
    ) -> None:
        """Decode ``chunk`` and write all of it to the resuming session, in the thread;
        ``tap(offset, raw)`` then sees the written bytes there (a journal capturing them).

        Raises DataError for a write error (the first one stops the stream) and
        RemoteProtocolError for a payload that does not decode.
        """

        def call() -> None:
            raw = memoryview(decode_chunk_payload(decompressor, chunk, max_chunk_size))
            session = self._session(Direction.RESUMING, "data write")
            written = 0
            while written < len(raw):
                taken = session.write(raw[written:])
                if taken <= 0:
                    raise DataError(
                        self.label,
                        "data write",
                        errno=_errno.EIO,
                        offset=offset + written,
                        message="the driver took no bytes",
                    )
                written += taken
            if tap is not None:
                tap(offset, raw)

        await self.run(call, step="data write")

    def _session(self, direction: Direction, step: str) -> DataSession:
        session = self.device.session
        if session is None or session.direction is not direction:
            raise DeviceError(
                self.label, step, f"no {direction.value} data session", errno=_errno.EBADF
            )
        return session

    async def read_debugfs_state(self) -> DebugfsReading | None:
        """The debugfs ``state`` file, or None without debugfs; abandoned after a timeout."""
        reader = self.device.debugfs
        if reader is None:
            return None
        with trio.move_on_after(DEBUGFS_TIMEOUT):
            return await thread_executor(
                lambda: reader.read_state(DEBUGFS_TIMEOUT),
                limiter=self._debugfs_limiter,
                abandon=True,
            )
        return DebugfsReading(None, "timeout")

    async def close(self) -> None:
        """Close the device; a hung device is closed from an abandoned thread."""
        if self.hung is not None:
            with trio.move_on_after(DEBUGFS_TIMEOUT):
                await thread_executor(
                    self.device.close, limiter=trio.CapacityLimiter(1), abandon=True
                )
            return
        await self.run(self.device.close, step="close")
