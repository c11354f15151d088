"""Shared fan-out's clean-up when its caller is cancelled (a gateway stopping): a queue's deletion, once begun,
ends before the cancellation goes through, so the broker connection is not closed under it."""

from __future__ import annotations

import asyncio

import pytest

from gateway.fanout import _to_the_end


async def test_a_cancelled_caller_waits_for_the_operation_then_is_cancelled() -> None:
    steps: list[str] = []
    started = asyncio.Event()

    async def delete_queue() -> None:
        started.set()
        await asyncio.sleep(0.05)
        steps.append("deleted")

    async def caller() -> None:
        await _to_the_end(delete_queue())
        steps.append("caller went on")  # never: it was cancelled

    task = asyncio.create_task(caller())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    steps.append("caller ended")
    # asyncio.shield alone would give ["caller ended"] here, the deletion still under way
    assert steps == ["deleted", "caller ended"]


async def test_the_operations_result_and_errors_pass_through() -> None:
    async def fails() -> None:
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError, match="refused"):
        await _to_the_end(fails())
