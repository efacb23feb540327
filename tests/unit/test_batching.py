"""The batcher: alone at light load, grouped when busy, and a failed batch retried item by item
so one bad item never fails its neighbours."""

from __future__ import annotations

import asyncio

import pytest

from persistence.batching import Batcher


class Recorder:
    """A batch runner that records each batch and fails any batch holding a negative item."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    async def run(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(0)
        if any(item < 0 for item in items):
            raise ValueError(f"bad item in {items}")
        return [item * 10 for item in items]


async def test_not_busy_every_item_runs_alone_at_once() -> None:
    recorder = Recorder()
    batcher = Batcher("t", recorder.run, busy=lambda: False, window=60.0)

    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)))

    assert results == [0, 10, 20]
    assert recorder.batches == [[0], [1], [2]]


async def test_busy_items_within_the_window_share_one_batch() -> None:
    recorder = Recorder()
    batcher = Batcher("t", recorder.run, busy=lambda: True, window=0.01)

    results = await asyncio.gather(*(batcher.submit(i) for i in range(5)))

    assert results == [0, 10, 20, 30, 40]
    assert recorder.batches == [[0, 1, 2, 3, 4]]


async def test_a_full_batch_goes_without_waiting_for_the_window() -> None:
    recorder = Recorder()
    batcher = Batcher("t", recorder.run, busy=lambda: True, window=60.0, max_size=3)

    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(3))), 5)

    assert results == [0, 10, 20]
    assert recorder.batches == [[0, 1, 2]]


async def test_a_failed_batch_is_retried_one_by_one_and_only_the_bad_item_fails() -> None:
    recorder = Recorder()
    batcher = Batcher("t", recorder.run, busy=lambda: True, window=0.01)

    results = await asyncio.gather(*(batcher.submit(i) for i in (1, -2, 3)), return_exceptions=True)

    assert results[0] == 10
    assert isinstance(results[1], ValueError)
    assert results[2] == 30
    assert recorder.batches == [[1, -2, 3], [1], [-2], [3]]


async def test_drain_runs_what_is_queued() -> None:
    recorder = Recorder()
    batcher = Batcher("t", recorder.run, busy=lambda: True, window=60.0)
    pending = asyncio.ensure_future(batcher.submit(7))
    await asyncio.sleep(0)

    await batcher.drain()

    assert await pending == 70


@pytest.mark.parametrize("busy", [False, True])
async def test_a_submitter_that_gave_up_does_not_break_the_batch(busy: bool) -> None:
    recorder = Recorder()
    batcher = Batcher("t", recorder.run, busy=lambda: busy, window=0.01)
    gave_up = asyncio.ensure_future(batcher.submit(1))
    stays = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    gave_up.cancel()

    assert await stays == 20
    await batcher.drain()
