"""Work that outlives its request: aborts sent to workers after a request ended, and dual dispatch's
prefill calls read to their end. Kept referenced until done, and waited for at shutdown."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

T = TypeVar("T")

_tasks: set[asyncio.Future[Any]] = set()


def keep(task: asyncio.Future[T]) -> asyncio.Future[T]:
    """`task`, referenced until it has run (a task nobody references may be collected mid-way)."""
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


async def settle(timeout: float) -> None:
    """Waits (at most `timeout` seconds) for the aborts and prefill drains of ended requests."""
    if _tasks:
        await asyncio.wait(set(_tasks), timeout=timeout)
