"""Waiting on the database for at most a given time.

``asyncio.timeout`` around a query is not enough when the server has stalled (paused,
its host frozen): the query is cancelled, but giving its connection back to the pool
waits for the server to acknowledge the cancellation, which a stalled server never does.
:func:`within` stops waiting at the deadline and leaves the work to finish (and give its
connection back) by itself once the server answers again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

# How long a request waits for its credentials (an API key, a provisioning token) to be
# checked in the database: one that does not answer (paused, failing over) gets the
# request a 503 after this, not after the pool's 30 s command timeout (TimeoutError is
# answered 503 by problems.install).
AUTH_TIMEOUT_SECONDS = 5.0

# Work whose caller stopped waiting: referenced until it ends (the event loop keeps only
# weak references to tasks).
_LEFT: set[asyncio.Future[Any]] = set()


def _forget(task: asyncio.Future[Any]) -> None:
    _LEFT.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: nobody waits for it any more


async def within(seconds: float, work: Awaitable[T]) -> T:
    """``work``'s result, or TimeoutError after ``seconds`` (the work goes on alone)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.wait_for(asyncio.shield(task), seconds)
    except BaseException:  # the deadline, or the caller cancelled
        if not task.done():
            _LEFT.add(task)
            task.add_done_callback(_forget)
        raise
