"""worker.loops: a forever-loop ends when cancelled, even after a swallowed cancel."""

from __future__ import annotations

import asyncio

import pytest

from worker.loops import raise_if_cancelled


async def _loop_that_swallows_one_cancel(turns: list[int]) -> None:
    """A loop whose first await swallows the cancel (as Python 3.11's wait_for can, racing a
    completion) and then keeps turning, checking at the top of each turn."""
    swallowed = False
    while True:
        raise_if_cancelled()
        turns.append(len(turns))
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed = True  # swallowed without uncancel(): the request still counts


async def test_a_swallowed_cancel_ends_the_loop_at_its_next_turn() -> None:
    turns: list[int] = []
    task = asyncio.create_task(_loop_that_swallows_one_cancel(turns))
    await asyncio.sleep(0.03)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)  # without the check, it would turn forever
    assert task.cancelled()


async def test_a_loop_nobody_cancelled_goes_on() -> None:
    raise_if_cancelled()  # no request: nothing happens

    async def timed_out_once() -> str:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):  # a timeout's own cancel is taken back
                await asyncio.sleep(1)
        raise_if_cancelled()
        return "went on"

    assert await timed_out_once() == "went on"
