"""DeviceWorker: serialized, shielded device steps; a step past its limit makes the device hung."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from vfmig.core.errors import DeviceHung
from vfmig.core.fsm import DeviceState
from vfmig.device.open import open_device
from vfmig.engine.worker import DeviceWorker, inline_executor


@pytest.fixture
def device(tmp_path):
    with open_device(f"sim:w,size=1MiB,state-dir={tmp_path / 'w'}") as opened:
        yield opened


@pytest.fixture
def gate():
    """A threading.Event every blocked thread waits on; set at teardown so none lingers."""
    event = threading.Event()
    yield event
    event.set()


async def test_steps_run_one_at_a_time_in_call_order(device) -> None:
    worker = DeviceWorker(device, label="sim:w", step_timeout=10)
    order: list[int] = []
    inside = []

    def step(n: int) -> int:
        inside.append(n)
        assert len(inside) == 1  # never two steps in the device at once
        order.append(n)
        inside.pop()
        return n

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(lambda n=n: worker.run(lambda: step(n), step=f"step {n}"))
            await trio.testing.wait_all_tasks_blocked()
    assert order == list(range(5))


async def test_a_cancelled_caller_does_not_abandon_a_state_change(device, gate) -> None:
    worker = DeviceWorker(device, label="sim:w", step_timeout=10)
    done = []

    def slow_set() -> None:
        gate.wait()
        device.set_state(DeviceState.STOP)
        done.append(True)

    results = []

    async def caller() -> None:
        results.append(await worker.run(slow_set, step="RUNNING>STOP"))

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            gate.set()
    assert done == [True]
    assert results == [None]  # the caller still learns that the step completed
    assert await worker.get_state() is DeviceState.STOP


async def test_a_step_past_its_limit_makes_the_device_hung(device, gate) -> None:
    worker = DeviceWorker(device, label="sim:w", step_timeout=10)
    with pytest.raises(DeviceHung, match=r"did not return within 0\.05 s") as caught:
        await worker.run(gate.wait, step="RUNNING>STOP", hang_after=0.05)
    assert caught.value.step == "RUNNING>STOP"
    with pytest.raises(DeviceHung, match="hung earlier") as again:
        await worker.get_state()
    assert again.value.step == "GET device state"


async def test_a_step_queued_behind_a_stuck_one_blames_it(device, gate) -> None:
    worker = DeviceWorker(device, label="sim:w", step_timeout=10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: worker.run(gate.wait, step="data read"))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(DeviceHung, match="precopy info waited behind it") as caught:
            await worker.run(lambda: None, step="precopy info", hang_after=0.05)
        assert caught.value.step == "data read"
        gate.set()


async def test_a_refused_set_is_an_answer_with_the_state_read_back(tmp_path) -> None:
    spec = f"sim:f,size=1MiB,state-dir={tmp_path / 'f'},fail=RUNNING_P2P>STOP:EIO"
    with open_device(spec) as device:
        worker = DeviceWorker(device, label="sim:f", step_timeout=10)
        result = await worker.set_state(DeviceState.STOP_COPY, step="RUNNING>STOP_COPY")
    assert not result.ok
    assert result.state is DeviceState.RUNNING_P2P  # it stopped half-way along the path
    assert result.errno == 5


async def test_the_inline_executor_runs_under_a_virtual_clock(device, autojump_clock) -> None:
    worker = DeviceWorker(device, label="sim:w", step_timeout=10, executor=inline_executor)
    start = trio.current_time()
    result = await worker.set_state(DeviceState.STOP, step="RUNNING>STOP")
    assert result.ok
    await trio.sleep(3600)  # the virtual clock jumps; no step is declared hung meanwhile
    assert await worker.get_state() is DeviceState.STOP
    assert trio.current_time() - start >= 3600
