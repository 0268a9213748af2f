"""Worker threads for aioproj's short blocking calls (file writes, process spawns).

A burst of run starts makes hundreds of such calls. On anyio's default limiter (40
threads) they run 40 at a time, and 40 threads doing Python work starve the event loop of
the GIL: a 10 ms timer fired 200-350 ms late while 200 runs started. Four threads start
the runs as fast (the work is short and mostly serialised by the GIL anyway) and keep the
loop responsive. Calls that wait for something else (a network fetch, an environment
build, a lock held by another process) keep using the default limiter, so they cannot
hold these threads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

__all__ = ["SHORT_CALL_THREADS", "run_short"]

_T = TypeVar("_T")

#: Threads for short calls, per event loop.
SHORT_CALL_THREADS = 4

_limiter: RunVar[anyio.CapacityLimiter] = RunVar("aioproj_short_calls")


def _short_calls() -> anyio.CapacityLimiter:
    try:
        return _limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(SHORT_CALL_THREADS)
        _limiter.set(limiter)
        return limiter


async def run_short(func: Callable[..., _T], *args: object) -> _T:
    """Run a short blocking call in one of aioproj's few worker threads.

    Cancellation: as ``anyio.to_thread.run_sync`` (the call finishes in its thread; the
    caller gets the cancellation once it does not wait for it any more).
    """
    return await anyio.to_thread.run_sync(func, *args, limiter=_short_calls())
