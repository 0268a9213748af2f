"""The sweep engine: :class:`Sweep` runs the trials of one sweep as child runs of one
parent run, at most ``max_parallel`` at once, and hands their results to the caller.

The sweep itself runs in a task of its own; the iterator only reads its results. Leaving
the ``async for`` early (``break``, an exception, cancellation, Ctrl-C) or calling
:meth:`Sweep.aclose` cancels every trial still running: each is recorded KILLED, the
parent run too. ``async with aioproj.sweep(...) as s:`` makes that clean-up happen at a
known point (a bare ``break`` hands it to the event loop's async-generator finaliser).

The parent run begins in :meth:`Sweep._open_parent` (created, or reopened by a resumed
sweep) and ends in :meth:`Sweep._close_parent`; trials become runs in
:meth:`~aioproj.sweeps.execution.TrialExecution.submit`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from aioproj._keys import new_key
from aioproj._redact import redact_url
from aioproj.backends.batch import current_batch
from aioproj.errors import AioprojError, InvalidArgumentError
from aioproj.handle import RunStatus
from aioproj.sweeps.execution import RunArgs, TrialExecution
from aioproj.sweeps.records import (
    SweepRecord,
    kept_result,
    kept_state,
    load_sweep,
    parent_tags,
    plan_resume,
)
from aioproj.sweeps.spaces import Plan
from aioproj.sweeps.stoppers import Stopper
from aioproj.sweeps.trials import (
    BEST_RUN_TAG,
    BEST_VALUE_TAG,
    GOAL_TAG,
    METRIC_TAG,
    RESUMED_TAG,
    Goal,
    TrialResult,
    TrialState,
    best_of,
    missing_metric,
)
from aioproj.sweeps.tuners import Tuner

if TYPE_CHECKING:
    from aioproj._output import EchoMode
    from aioproj.runner import Runner
    from aioproj.tracking.base import TrackingStore

__all__ = ["Display", "Sweep"]

logger = logging.getLogger("aioproj")

#: Shows a sweep while it runs: called in the sweep's task group with the sweep and an
#: event set once the sweep has recorded its end (see :mod:`aioproj.sweeps.live`).
Display = Callable[["Sweep", anyio.Event], Coroutine[Any, Any, None]]

_T = TypeVar("_T")


async def _maybe(value: _T | Awaitable[_T]) -> _T:
    """The value of a call to a method that may be sync or async."""
    if inspect.isawaitable(value):
        return await value
    return value


class Sweep:
    """A running (or not yet started) sweep; see :func:`aioproj.sweep`.

    Iterate it for :class:`TrialResult` values in completion order (a resumed sweep
    first yields the trials it keeps), or await it for the list of all of them. It
    starts on first use and can be iterated once.
    """

    def __init__(
        self,
        run_args: RunArgs,
        *,
        plan: Plan | None,
        tuner: Tuner | None,
        budget: int | None,
        max_parallel: int,
        fail_fast: bool,
        retries: int,
        retry_delay: float,
        metric: str | None,
        goal: Goal,
        stopper: Stopper | None,
        runner: Runner | None,
        tracking_uri: str | None,
        echo: EchoMode,
        name: str | None,
        metrics_interval: float,
        display: Display | None,
        resume: str | None = None,
    ) -> None:
        self._args = run_args
        self._plan = plan
        self._display = display
        self._tuner = tuner
        self._budget = budget
        self._max_parallel = max_parallel
        self._fail_fast = fail_fast
        self._retries = retries
        self._retry_delay = retry_delay
        self.metric = metric
        self.goal: Goal = goal
        self._stopper = stopper
        self._runner = runner
        self._tracking_uri = tracking_uri
        self._echo: EchoMode = echo
        self._name = name
        self._metrics_interval = metrics_interval
        self._resume = resume
        self.trials: list[TrialState] = [
            TrialState(index=i, params=p) for i, p in enumerate(plan.sets if plan else [])
        ]
        self.results: list[TrialResult] = []
        #: The MLflow run id of the sweep's parent run, once it exists.
        self.parent_run_id: str | None = None
        #: The sweep's own status: RUNNING, then FINISHED, FAILED (fail_fast stopped it,
        #: or it could not start) or KILLED (cancelled).
        self.status: RunStatus = RunStatus.SCHEDULED
        self.error: BaseException | None = None
        #: False once the parent run's final status could not be written to tracking
        #: (it is kept in the run journal for ``aioproj recover``).
        self.parent_recorded = True
        #: Warnings about the sweep as a whole (a metric no trial logs), for the views.
        self.notices: list[str] = []
        #: The tracking URI the sweep records to, once it has started.
        self.tracking_uri: str | None = None
        # Created on start: a Sweep that is never started holds nothing to close.
        self._send: MemoryObjectSendStream[TrialResult] | None = None
        self._receive: MemoryObjectReceiveStream[TrialResult] | None = None
        self._listeners: list[Callable[[TrialState], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._scope: anyio.CancelScope | None = None
        self._iterated = False
        self._stop_reason: str | None = None  # fail_fast: why nothing more starts
        self._execution: TrialExecution | None = None
        self._store: TrackingStore | None = None
        self._parent_key: str | None = None  # the parent's key in the run journal
        self._kept: SweepRecord | None = None  # what a resumed sweep keeps
        self._resumed_attempts: dict[int, int] = {}  # attempts made before, by index
        self._next_index = 0
        self._metric_checked = False

    def __repr__(self) -> str:
        return (
            f"<Sweep uri={redact_url(self.uri)!r} status={self.status.value} "
            f"trials={len(self.trials)} done={len(self.results)}>"
        )

    # -- what users call -------------------------------------------------------------------

    @property
    def uri(self) -> str:
        """The project the sweep runs."""
        return self._args.uri

    @property
    def total(self) -> int | None:
        """How many trials the sweep will run; None while a tuner decides."""
        if self._tuner is not None:
            return self._budget
        return len(self.trials)

    @property
    def best(self) -> TrialResult | None:
        """The FINISHED trial with the best final value of ``metric`` so far."""
        if self.metric is None:
            return None
        return best_of(self.results, self.metric, self.goal)

    def start(self) -> None:
        """Start the sweep in a task of its own (iterating or awaiting does this)."""
        if self._task is None:
            self._send, self._receive = anyio.create_memory_object_stream[TrialResult](math.inf)
            self._task = asyncio.get_running_loop().create_task(
                self._drive(), name=f"aioproj sweep {redact_url(self.uri)}"
            )

    async def aclose(self) -> None:
        """Stop the sweep: cancel every trial still running and record it KILLED, with the
        parent run; wait for that. Idempotent; shielded from the caller's cancellation."""
        if self._task is None:
            self.status = RunStatus.KILLED
        else:
            if self._scope is not None:
                self._scope.cancel()
            else:  # not started yet: it never will
                self._task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait([self._task])
            if not self.status.is_terminal:
                self.status = RunStatus.KILLED
        if self._send is not None and self._receive is not None:
            self._send.close()
            self._receive.close()

    async def write_report(self, path: str | os.PathLike[str]) -> None:
        """Write the sweep's HTML report (see :mod:`aioproj.sweeps.report`) to ``path``,
        from what tracking holds of it.

        Raises:
            InvalidArgumentError: the sweep has no parent run yet.
            TrackingError: the store cannot be read. OSError: the file cannot be written.
        """
        from aioproj.sweeps.report import write_sweep_report

        if self.parent_run_id is None or self.tracking_uri is None:
            raise InvalidArgumentError("The sweep has not started: there is nothing to report.")
        await write_sweep_report(self.tracking_uri, self.parent_run_id, path, metric=self.metric)

    async def __aenter__(self) -> Sweep:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[TrialResult]:
        if self._iterated:
            raise RuntimeError("A Sweep can be iterated once; use .results for what it had.")
        self._iterated = True
        return self._iterate()

    def __await__(self) -> Generator[Any, None, list[TrialResult]]:
        return self._collect().__await__()

    async def _collect(self) -> list[TrialResult]:
        async for _ in self:
            pass
        return list(self.results)

    async def _iterate(self) -> AsyncIterator[TrialResult]:
        self.start()
        assert self._receive is not None
        try:
            try:
                async for result in self._receive:
                    yield result
            except anyio.ClosedResourceError:  # aclose() from elsewhere
                pass
        finally:
            # Reached on exhaustion, break (via the loop's finaliser), an exception in
            # the consumer and cancellation: whatever still runs is stopped and recorded.
            await self.aclose()
        if self.error is not None:
            raise self.error

    def _subscribe(self, listener: Callable[[TrialState], None]) -> None:
        """Call ``listener`` with a trial's state whenever its status changes."""
        self._listeners.append(listener)

    def _changed(self, state: TrialState, status: str, note: str | None = None) -> None:
        state.status = status
        if note is not None:
            state.note = note
        for listener in self._listeners:
            try:
                listener(state)
            except Exception:  # a broken view must not break the sweep
                logger.exception("sweep listener failed")

    # -- the driver ------------------------------------------------------------------------

    async def _drive(self) -> None:
        from aioproj.runner import Runner

        finished = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                if self._display is not None:
                    tg.start_soon(self._display, self, finished)
                try:
                    with anyio.CancelScope() as self._scope:
                        if self._runner is not None:
                            await self._drive_on(self._runner)
                        else:
                            async with Runner(
                                tracking_uri=self._tracking_uri, echo=self._echo
                            ) as own:
                                await self._drive_on(own)
                except Exception as exc:
                    self.status = RunStatus.FAILED
                    self.error = exc
                finally:
                    if not self.status.is_terminal:
                        self.status = RunStatus.KILLED
                    finished.set()
        finally:
            assert self._send is not None
            self._send.close()

    async def _drive_on(self, runner: Runner) -> None:
        store = self._store = await runner._store()
        self.tracking_uri = store.uri
        await self._open_parent(runner, store)
        assert self.parent_run_id is not None
        self.status = RunStatus.RUNNING
        outcome = RunStatus.KILLED
        try:
            bind = getattr(self._tuner, "bind", None)
            if callable(bind):
                await _maybe(bind(self.parent_run_id))
            await self._replay_kept()
            self._execution = TrialExecution(
                runner=runner,
                store=store,
                args=self._args,
                parent_run_id=self.parent_run_id,
                retries=self._retries,
                retry_delay=self._retry_delay,
                metrics_interval=self._metrics_interval,
                # Live metrics for the view's metric and early stopping; else each trial's
                # final values are read once, when it has ended.
                watch_metrics=self._metrics_interval > 0
                and (self.metric is not None or self._stopper is not None),
                stopper=self._stopper,
                changed=self._changed,
                stop_reason=lambda: self._stop_reason,
            )
            await self._run_trials(self._execution)
            outcome = RunStatus.FAILED if self._stop_reason else RunStatus.FINISHED
        except Exception:
            outcome = RunStatus.FAILED
            raise
        finally:
            self.status = outcome
            with anyio.CancelScope(shield=True):
                await self._close_parent(runner, store, outcome)

    # -- the parent run --------------------------------------------------------------------

    async def _open_parent(self, runner: Runner, store: TrackingStore) -> None:
        """Create the sweep's parent run, or reopen the one a resumed sweep continues;
        journaled ahead like every run, so that ``aioproj recover`` records it KILLED if
        this process dies before the sweep ends.

        Raises (before anything is written) the errors of a resume that does not fit:
        InvalidArgumentError, TrackingError.
        """
        if self._resume is not None:
            await self._reopen_parent(runner, store, self._resume)
            return
        from aioproj.tracking.base import current_user

        args = self._args
        experiment_id = await store.resolve_experiment(
            experiment_name=args.experiment_name,
            experiment_id=None if args.experiment_id is None else str(args.experiment_id),
        )
        tags = parent_tags(
            user=current_user(),
            uri=redact_url(args.uri),
            entry_point=args.entry_point,
            total=self.total,
            metric=self.metric,
            goal=self.goal,
            plan=self._plan,
            tuner=None if self._tuner is None else type(self._tuner).__name__,
        )
        journal = await runner._open_journal()
        key = new_key()
        await journal.intent(
            key, tracking_uri=store.uri, backend="sweep", experiment_id=experiment_id,
            kind="sweep",
        )  # fmt: skip
        try:
            parent = await store.create_run(
                experiment_id, run_name=self._name, tags=tags, params={}, client_key=key
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await runner._abandon(store, key, experiment_id, None)
            raise
        journal.note(key, "tracked", run=parent.run_id)
        self.parent_run_id, self._parent_key = parent.run_id, key

    async def _reopen_parent(
        self, runner: Runner, store: TrackingStore, parent_run_id: str
    ) -> None:
        """Resume: read the sweep back, keep its ended trials, mark its parent RUNNING."""
        record = await load_sweep(store, parent_run_id)
        tags = record.parent.tags
        plan, resumption = plan_resume(record, self._plan, self._args.entry_point)
        if plan is not self._plan:  # drawn again with the seed the sweep recorded
            assert plan is not None
            self._plan = plan
            self.trials = [TrialState(index=i, params=p) for i, p in enumerate(plan.sets)]
        for index, attempts in resumption.attempts.items():
            if plan is not None:
                self.trials[index].attempts = attempts
        self._resumed_attempts = dict(resumption.attempts)
        self._kept = dataclasses.replace(record, trials=resumption.kept)
        # The trials of a sweep are siblings: the resumed ones go to the parent's experiment.
        experiment_id = record.parent.experiment_id
        self._args = dataclasses.replace(
            self._args, experiment_id=experiment_id, experiment_name=None
        )
        journal = await runner._open_journal()
        key = new_key()
        await journal.intent(
            key, tracking_uri=store.uri, backend="sweep", experiment_id=experiment_id,
            run_id=parent_run_id, kind="sweep",
        )  # fmt: skip
        self.parent_run_id, self._parent_key = parent_run_id, key
        resumed = int(tags.get(RESUMED_TAG, "0") or 0) + 1
        await store.reopen_run(parent_run_id)
        await store.set_tags(parent_run_id, {RESUMED_TAG: str(resumed)})

    async def _close_parent(self, runner: Runner, store: TrackingStore, outcome: RunStatus) -> None:
        """Record how the sweep ended on its parent run: counts, best trial, status.

        A status tracking refuses is kept in the journal and :attr:`parent_recorded`
        turns False (the CLI then says so and exits non-zero).
        """
        assert self.parent_run_id is not None
        assert self._parent_key is not None
        journal, key = runner._journal, self._parent_key
        end_ms = int(time.time() * 1000)
        journal.note(key, "ended", status=outcome.value, end=end_ms)
        counts = dict.fromkeys(("FINISHED", "FAILED", "KILLED"), 0)
        for result in self.results:
            counts[result.status.value] = counts.get(result.status.value, 0) + 1
        tags = {f"aioproj.sweep.{k.lower()}": str(v) for k, v in counts.items()}
        best = self.best
        if best is not None and best.run_id is not None and self.metric is not None:
            tags[BEST_RUN_TAG] = best.run_id
            tags[BEST_VALUE_TAG] = repr(best.metrics[self.metric])
            tags[METRIC_TAG] = self.metric
            tags[GOAL_TAG] = self.goal
        try:
            with anyio.fail_after(30):
                await store.set_tags(self.parent_run_id, tags)
                await store.set_terminated(self.parent_run_id, outcome.value, end_time_ms=end_ms)
        except (AioprojError, TimeoutError) as exc:
            self.parent_recorded = False
            logger.error(
                "Could not record the end of sweep run %s (%s): its status %s is kept in the"
                " run journal; run `aioproj recover` once the tracking store is reachable.",
                self.parent_run_id,
                exc,
                outcome.value,
            )
            try:
                await journal.commit(key, "kept")
            except AioprojError as journal_exc:
                logger.error("Could not keep it in the run journal either: %s", journal_exc)
            return
        journal.note(key, "done")

    # -- trials ----------------------------------------------------------------------------

    async def _replay_kept(self) -> None:
        """A resumed sweep's kept trials: to the views, the stopper, the tuner, the caller."""
        if self._kept is None:
            return
        by_index = {t.index: t for t in self.trials}
        for trial in self._kept.trials:
            planned = by_index.get(trial.index)
            result = kept_result(trial, planned.params if planned is not None else None)
            state = kept_state(result)
            if planned is not None:
                self.trials[self.trials.index(planned)] = state
            else:
                self.trials.append(state)
            self._changed(state, state.status)
            history = trial.history.get(self._stopper.metric, {}) if self._stopper else {}
            await self._conclude(result, history)

    async def _run_trials(self, execution: TrialExecution) -> None:
        queued = sum(t.status == "QUEUED" for t in self.trials)
        batch = None if self._tuner else await execution.batch(queued, self._max_parallel)
        # The sweep runs in a task of its own: the batch is seen by its trials' starts only.
        current_batch.set(batch)
        slots = anyio.Semaphore(batch.size if batch is not None else self._max_parallel)
        async with anyio.create_task_group() as tg:
            while True:
                await slots.acquire()
                state = None if self._stop_reason else await self._next_trial()
                if state is None:
                    slots.release()
                    break
                tg.start_soon(self._trial_slot, execution, state, slots, tg)
        if self._stop_reason:
            for state in self.trials:
                if state.status == "QUEUED":
                    self._changed(state, "SKIPPED")

    async def _next_trial(self) -> TrialState | None:
        """The next trial to run: the next queued planned one, or the tuner's proposal
        for the next free index."""
        if self._tuner is None:
            while self._next_index < len(self.trials):
                state = self.trials[self._next_index]
                self._next_index += 1
                if state.status == "QUEUED":
                    return state
            return None
        taken = {t.index for t in self.trials}
        while self._next_index in taken:
            self._next_index += 1
        index = self._next_index
        if self._budget is not None and index >= self._budget:
            return None
        params = await _maybe(self._tuner.ask(index))
        if params is None:
            return None
        if not isinstance(params, Mapping):
            raise InvalidArgumentError(
                f"Tuner.ask must return a mapping of parameters or None, got {params!r}"
            )
        attempts = self._resumed_attempts.get(index, 0)
        state = TrialState(index=index, params=dict(params), attempts=attempts)
        self.trials.append(state)
        return state

    async def _trial_slot(
        self,
        execution: TrialExecution,
        state: TrialState,
        slots: anyio.Semaphore,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        try:
            try:
                result = await execution.run(state)
            except anyio.get_cancelled_exc_class():
                if not state.is_done:  # its run (if it had one) was cancelled: KILLED
                    state.ended = time.monotonic()
                    state.reason = "the sweep was stopped"
                    self._changed(state, "KILLED", state.reason)
                raise
            await self._conclude(result)
            if self._fail_fast and result.status is RunStatus.FAILED and not self._stop_reason:
                # Stop starting trials and cancel the running ones; they end KILLED and
                # their results are still reported.
                self._stop_reason = f"stopped: trial {result.index} failed (fail-fast)"
                for handle in list(execution.handles.values()):
                    tg.start_soon(handle.cancel)
        finally:
            slots.release()

    async def _conclude(
        self, result: TrialResult, history: Mapping[int, float] | None = None
    ) -> None:
        """A trial has ended: tell the stopper (replaying a kept trial's ``history``
        first), then the tuner, check the metric, and hand the result out."""
        self.results.append(result)
        if self._stopper is not None:
            for step in sorted(history or {}):
                await _maybe(self._stopper.observe(result.index, step, (history or {})[step]))
            await _maybe(self._stopper.ended(result.index, result.status))
        if self._tuner is not None:  # told before the next ask takes this slot
            await _maybe(self._tuner.tell(result))
        self._check_metric(result)
        assert self._send is not None
        self._send.send_nowait(result)

    def _check_metric(self, result: TrialResult) -> None:
        """Warn once when ended trials logged metrics, but none the sweep's ``metric``."""
        if self.metric is None or self._metric_checked:
            return
        if self.metric in result.metrics:
            self._metric_checked = True
            return
        message = missing_metric(self.metric, self.results)
        if message is not None:
            self._metric_checked = True
            logger.warning("%s", message)
            self.notices.append(message)
