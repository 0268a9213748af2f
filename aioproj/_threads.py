"""Worker threads for aioproj's short blocking calls (file writes, process spawns).

A burst of run starts makes hundreds of such calls: a run's tracking record, its process
spawn, its final status. Each hop to a worker thread and back costs the event loop more
than the call itself (a lock, a queue, a wake-up, a future), so calls made while others
are waiting are run together: :func:`run_short` queues a call, and one worker-thread hop
runs every call queued by then, one after the other, and hands each its result. At most
:data:`SHORT_CALL_THREADS` such hops run at once: every thread doing Python work takes the
GIL from the event loop for up to the switch interval (5 ms) at a time. A 10 ms timer fired
200-350 ms late while 200 runs started on anyio's 40 default threads, and its p99 was
25-40 ms with 4 short-call threads against 13-24 ms with one, at the same wall time and
less CPU per run (benchmarks/local_sweep.py, N = 200 and 1,000, interleaved). So a call
made here must not wait for anything but the local machine: calls that wait for something
else (a network fetch, an environment build, a lock held by another process) use anyio's
default limiter, so they cannot hold this thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

__all__ = ["SHORT_CALL_THREADS", "run_short"]

_T = TypeVar("_T")

#: Worker threads for short calls, per event loop.
SHORT_CALL_THREADS = 1


@dataclass(eq=False)
class _Call:
    func: Callable[..., Any]
    args: tuple[Any, ...]
    #: Set when the call has run, or when its caller is to run the next batch.
    turn: anyio.Event = field(default_factory=anyio.Event)
    finished: bool = False
    ran: bool = False
    result: Any = None
    error: BaseException | None = None

    def run(self) -> None:
        """In the worker thread: the call, its outcome kept for its caller."""
        try:
            self.result = self.func(*self.args)
        except BaseException as exc:  # handed to the caller, raised there
            self.error = exc
        finally:
            self.ran = True


class _Batches:
    """The queue of short calls of one event loop, and the hops that run them.

    A caller that finds a thread free runs a batch itself: every call queued by then.
    Whoever finishes a batch while calls are queued hands the next one to the first of
    them, so no caller runs other callers' batches for longer than one.
    """

    def __init__(self) -> None:
        self.queue: list[_Call] = []
        self.running = 0

    async def submit(self, call: _Call) -> None:
        self.queue.append(call)
        if self.running < SHORT_CALL_THREADS:
            await self._run_batch()
        while not call.finished:
            await call.turn.wait()
            call.turn = anyio.Event()
            if not call.finished:  # handed the next batch
                await self._run_batch()

    async def _run_batch(self) -> None:
        self.running += 1
        batch, self.queue = self.queue, []
        interrupted: BaseException | None = None
        try:
            await anyio.to_thread.run_sync(_run_all, batch)
        except BaseException as exc:  # asyncio's own cancellation, at the loop's end
            interrupted = exc
            raise
        finally:
            self.running -= 1
            for call in batch:
                if not call.ran and call.error is None:
                    call.error = interrupted or RuntimeError("the call did not run")
                call.finished = True
                call.turn.set()
            if self.queue and self.running < SHORT_CALL_THREADS:
                self.queue[0].turn.set()


def _run_all(batch: list[_Call]) -> None:
    for index, call in enumerate(batch):
        if index:
            time.sleep(0)  # let the event loop's thread have the GIL between calls
        call.run()


_batches: RunVar[_Batches] = RunVar("aioproj_short_calls")


def _loop_batches() -> _Batches:
    try:
        return _batches.get()
    except LookupError:
        batches = _Batches()
        _batches.set(batches)
        return batches


async def run_short(func: Callable[..., _T], *args: object) -> _T:
    """Run a short blocking call in one of aioproj's few worker threads, with the other
    short calls made meanwhile; return its result or raise its exception.

    Cancellation: the call is not interrupted; the caller gets the cancellation once the
    call has run (as ``anyio.to_thread.run_sync`` without ``abandon_on_cancel``).
    """
    call = _Call(func, args)
    with anyio.CancelScope(shield=True):
        await _loop_batches().submit(call)
    await anyio.lowlevel.checkpoint_if_cancelled()
    if call.error is not None:
        raise call.error
    return cast(_T, call.result)
