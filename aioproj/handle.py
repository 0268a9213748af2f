"""The run handle users hold: :class:`SubmittedRun`, and :class:`RunStatus`.

A handle is backend-neutral. A backend supplies an :class:`~aioproj.backends.base.Execution`
(it knows how to follow and stop its run); the handle adds what every backend shares:
the final status written to tracking exactly once, the run's output, and the awaitable
API (``await run``, ``wait``, ``cancel``, ``logs``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

import anyio

from aioproj._output import RunOutput
from aioproj._status import RunStatus
from aioproj.errors import AioprojError

if TYPE_CHECKING:
    from aioproj.backends.base import Execution
    from aioproj.journal import Journal
    from aioproj.tracking.base import TrackingStore
    from aioproj.tracking.metrics import Metric, MetricsPoller

__all__ = ["RunStatus", "SubmittedRun"]

logger = logging.getLogger("aioproj")


class SubmittedRun:
    """A run that a backend has accepted. Returned by :func:`aioproj.run`.

    ``run_id`` is the MLflow run id. The handle is awaitable: ``await run`` returns the
    final :class:`RunStatus`. Handles are safe to share between tasks of one event loop.
    """

    def __init__(
        self,
        *,
        run_id: str,
        experiment_id: str,
        execution: Execution,
        store: TrackingStore,
        output: RunOutput,
        on_done: Callable[[SubmittedRun], None] | None = None,
        cleanup_timeout: float = 30.0,
        metrics: MetricsPoller | None = None,
        journal: Journal | None = None,
        journal_key: str = "",
        leave_remote_running: bool = False,
        start_soon: Callable[[Callable[[], Coroutine[Any, Any, None]]], object] | None = None,
    ) -> None:
        self._run_id = run_id
        self._experiment_id = experiment_id
        self._execution = execution
        self._store = store
        self._output = output
        self._on_done = on_done
        self._metrics = metrics
        self._journal = journal
        self._journal_key = journal_key
        #: Loop-end of the default runner: a remote run goes on, recorded by `aioproj recover`.
        self._leave_remote_running = leave_remote_running
        self._left_running = False
        #: A detached run's supervisor process records its status; the handle only
        #: follows it, from whichever task awaits it (no task of the runner).
        self._drives_itself = bool(getattr(execution, "records_own_status", False))
        self._drive_lock = anyio.Lock() if self._drives_itself else None
        self._final: RunStatus | None = None
        self._done = anyio.Event()
        self._cancel_requested = False
        #: Starts the stop in a task of the runner (created on the first cancel()).
        self._start_soon = start_soon
        self._stop_accepted: anyio.Event | None = None
        self._cleanup_timeout = cleanup_timeout
        #: The error that stopped aioproj from following the run, if any (then FAILED).
        self.error: Exception | None = None

    def __repr__(self) -> str:
        status = self._final or self._execution.status()
        return f"<SubmittedRun run_id={self._run_id!r} status={status.value}>"

    @property
    def run_id(self) -> str:
        """The MLflow run id of this run."""
        return self._run_id

    @property
    def experiment_id(self) -> str:
        """The MLflow experiment id of this run."""
        return self._experiment_id

    @property
    def label(self) -> str:
        """The short label that prefixes this run's lines on a shared terminal."""
        return self._output.label

    @property
    def done(self) -> bool:
        """True once the final status is known and recorded."""
        return self._done.is_set()

    @property
    def status_detail(self) -> str | None:
        """What the backend knows beyond the status, without I/O: why a remote run has
        not started (``ImagePullBackOff``, ``Unschedulable``) or why it failed; None when
        there is nothing to say."""
        detail = getattr(self._execution, "detail", None)
        return detail if isinstance(detail, str) else None

    async def wait(self) -> bool:
        """Wait until the run ends; return True if it FINISHED.

        Cancelling the task that waits does not cancel the run (use :meth:`cancel`, or
        a synchronous :func:`aioproj.run`, for that).
        """
        return await self._final_status() is RunStatus.FINISHED

    async def get_status(self) -> RunStatus:
        """The current status, without waiting."""
        if self._final is not None:
            return self._final
        return self._execution.status()

    async def cancel(self) -> None:
        """Stop the run and record it KILLED. Idempotent; a no-op once the run has ended.

        For local runs this returns once the process group is gone (SIGTERM, a grace
        period, then SIGKILL) and the status is recorded. Remote backends return once the
        service has accepted the cancellation. Cancelling the calling task does not cut
        the stop short: it is shielded, bounded by the clean-up timeout (twice the grace
        period plus 10 s), and the cancellation is delivered once it is done.
        """
        if self._done.is_set():
            return
        self._cancel_requested = True
        if self._drives_itself:  # its detached supervisor stops it and records KILLED
            await self._stop_bounded()
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._cleanup_timeout):
                await self._final_status()
            return
        # A task of the runner does the stop, so no cancellation of this task can cut it
        # short, not even asyncio's own (Task.cancel(), asyncio.timeout), which anyio's
        # shields do not hold back: here we only wait for it.
        accepted = self._request_stop()
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._cleanup_timeout):
            if self._execution.waits_for_stop:
                await self._done.wait()
            else:
                await accepted.wait()

    def _request_stop(self) -> anyio.Event:
        """Start stopping the run (once) in a task of the runner; set when accepted."""
        if self._stop_accepted is None:
            self._stop_accepted = anyio.Event()
            assert self._start_soon is not None, "a handle without a runner cannot stop"
            self._start_soon(self._stop_and_accept)
        return self._stop_accepted

    def logs(self) -> AsyncIterator[str]:
        """Iterate over the run's output lines, from the start, live until the run ends."""
        return self._output.lines()

    def metrics(self, *, interval: float = 0.5) -> AsyncIterator[Metric]:
        """Iterate over the metrics the run logs: its history first, then each new value.

        Every value logged by the project's own ``mlflow.log_metric`` calls, in the order
        logged for each key, as :class:`aioproj.Metric` (key, value, timestamp, step). The
        iteration ends once the run has ended and its last values were read. Any number of
        runs and iterators of one runner share one poll of their tracking store, at most
        ``interval`` seconds apart; on a REST server a round costs one search request per
        100 runs, plus a history request for each metric that changed.

        Raises :class:`aioproj.errors.TrackingError` if the store cannot be read.
        Breaking out of the loop or cancelling the iterating task stops following; the
        run itself goes on.
        """
        if self._metrics is None:
            raise RuntimeError("This run was not started by an aioproj Runner.")
        return self._metrics.follow(self, interval=interval)

    def __await__(self) -> Generator[Any, None, RunStatus]:
        return self._final_status().__await__()

    async def _final_status(self) -> RunStatus:
        if self._drive_lock is not None and not self._done.is_set():
            async with self._drive_lock:
                if not self._done.is_set():
                    await self._supervise()
        await self._done.wait()
        assert self._final is not None
        return self._final

    # -- driven by the runner --------------------------------------------------------

    async def _supervise(self) -> None:
        """Follow the run to its end and record the final status exactly once.

        Runs as a task of the runner and never raises into it, except a cancellation:
        if it is cancelled (the runner or event loop is shutting down), the run is stopped
        and recorded KILLED under a shielded, bounded scope before the cancellation
        propagates. If the backend fails while following the run, the run is stopped,
        recorded FAILED and the error kept in :attr:`error`.
        """
        status = RunStatus.FAILED
        self._left_running = False
        try:
            status = await self._execution.wait()
            if self._cancel_requested and status is not RunStatus.FINISHED:
                status = RunStatus.KILLED
        except anyio.get_cancelled_exc_class():
            outlives = getattr(self._execution, "outlives_caller", False)
            if not self._cancel_requested and (
                outlives or (self._leave_remote_running and not self._execution.waits_for_stop)
            ):
                # A detached run goes on with its own supervisor. A remote run goes on when
                # the caller's event loop ends; its journal entry stays, so
                # `aioproj recover` records its end.
                self._left_running = True
                if outlives:
                    raise
                logger.warning(
                    "Run %s goes on on its backend after this event loop ends; run "
                    "`aioproj recover` later to record how it ended.",
                    self._run_id,
                )
                raise
            status = RunStatus.KILLED
            await self._stop_bounded()
            raise
        except Exception as exc:
            self.error = exc
            logger.error("Run %s: following it on its backend failed: %r", self._run_id, exc)
            await self._stop_bounded()
        finally:
            if not self._left_running:
                await self._record(status)

    async def _stop_and_accept(self) -> None:
        """Stop the run for :meth:`cancel`, in a task of the runner."""
        try:
            if not self._done.is_set():
                await self._stop_bounded()
        except Exception as exc:
            logger.error("Run %s: stopping it failed: %r", self._run_id, exc)
        finally:
            assert self._stop_accepted is not None
            self._stop_accepted.set()

    async def _stop_bounded(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._cleanup_timeout) as scope:
            await self._execution.cancel()
        if scope.cancelled_caught:
            logger.error(
                "Run %s did not stop within %.0f s; it may still be running.",
                self._run_id,
                self._cleanup_timeout,
            )

    async def _record(self, status: RunStatus) -> None:
        """Write the final status and output to tracking, once; never raises."""
        if self._done.is_set():
            return
        self._final = status
        end_time_ms = int(time.time() * 1000)
        recorded = False
        if self._drives_itself:  # the detached supervisor has recorded it
            self._done.set()
            if self._stop_accepted is not None:
                self._stop_accepted.set()
            if self._on_done is not None:
                self._on_done(self)
            return
        if self._journal is not None:
            # Should this process die before the status is written, recover writes it.
            self._journal.note(self._journal_key, "ended", status=status.value, end=end_time_ms)
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._cleanup_timeout):
                try:
                    await self._output.aclose(self._store, self._run_id)
                except Exception as exc:  # the log is lost, the status must not be
                    logger.error("Could not save the output of run %s: %s", self._run_id, exc)
                await self._store.set_terminated(
                    self._run_id, status.value, end_time_ms=end_time_ms
                )
                recorded = True
        except Exception as exc:
            logger.error("Could not record the final status of run %s: %s", self._run_id, exc)
        try:
            if self._journal is not None:
                await self._settle_journal(self._journal, status, recorded)
        except AioprojError as exc:  # the journal cannot be written
            logger.error("Run %s: could not update the run journal: %s", self._run_id, exc)
        finally:
            self._done.set()
            if self._stop_accepted is not None:  # a cancel() waiting for a stop made moot
                self._stop_accepted.set()
            if self._on_done is not None:
                self._on_done(self)

    async def _settle_journal(self, journal: Journal, status: RunStatus, recorded: bool) -> None:
        """Recorded: the run is done. Not recorded: keep its status for `aioproj recover`."""
        if recorded:
            journal.note(self._journal_key, "done")
            return
        with anyio.CancelScope(shield=True):
            await journal.commit(self._journal_key, "kept")
        logger.error(
            "Run %s: its final status %s is kept in the run journal %s; run `aioproj"
            " recover` once the tracking store is reachable.",
            self._run_id,
            status.value,
            journal.path,
        )
