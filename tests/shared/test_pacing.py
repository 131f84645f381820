"""Helpers every stage uses (bridge.common)."""

from __future__ import annotations

import asyncio

import pytest

from bridge.shared.pacing import wait_event


async def _loop_until_cancelled(ev: asyncio.Event,
                                wait: object) -> asyncio.Task[None]:
    async def loop() -> None:
        while True:
            await wait(ev)  # type: ignore[operator]
            ev.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)  # the task is waiting on the event now
    ev.set()                # the event and the cancel land in the same loop turn
    task.cancel()
    return task


async def test_a_cancel_that_lands_as_the_event_is_set_still_ends_the_waiting_task():
    # With asyncio.wait_for in place of wait_event, Python 3.11 keeps this task running.
    task = await _loop_until_cancelled(asyncio.Event(), lambda e: wait_event(e, 10))
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task


async def test_wait_event_says_whether_the_event_was_set():
    ev = asyncio.Event()
    assert await wait_event(ev, 0.01) is False
    ev.set()
    assert await wait_event(ev, 0.01) is True
