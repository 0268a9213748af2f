"""The sweep engine: :class:`Sweep` runs the trials of one sweep as child runs of one
parent run, at most ``max_parallel`` at once, and hands their results to the caller.

The sweep itself runs in a task of its own; the iterator only reads its results. Leaving
the ``async for`` early (``break``, an exception, cancellation, Ctrl-C) or calling
:meth:`Sweep.aclose` cancels every trial still running: each is recorded KILLED, the
parent run too. ``async with aioproj.sweep(...) as s:`` makes that clean-up happen at a
known point (a bare ``break`` hands it to the event loop's async-generator finaliser).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from aioproj._keys import new_key
from aioproj._redact import redact_url
from aioproj.backends.batch import TrialBatch, current_batch, submits_batches
from aioproj.errors import AioprojError, InvalidArgumentError
from aioproj.handle import RunStatus, SubmittedRun
from aioproj.sweeps.stoppers import MedianStopping
from aioproj.sweeps.trials import (
    ATTEMPT_TAG,
    PARENT_TAG,
    PRUNED_TAG,
    RETRYABLE,
    TRIAL_TAG,
    Goal,
    TrialResult,
    TrialState,
    best_of,
)
from aioproj.sweeps.tuners import Tuner

if TYPE_CHECKING:
    from aioproj._output import EchoMode
    from aioproj.backends import Backend
    from aioproj.runner import Runner
    from aioproj.tracking.base import TrackingStore

__all__ = ["Display", "RunArgs", "Sweep"]

logger = logging.getLogger("aioproj")

#: Shows a sweep while it runs: called in the sweep's task group with the sweep and an
#: event set once the sweep has recorded its end (see :mod:`aioproj.sweeps.live`).
Display = Callable[["Sweep", anyio.Event], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class RunArgs:
    uri: str = field(repr=False)  # a git URL can carry a password
    entry_point: str
    version: str | None
    docker_args: Mapping[str, str | bool] | None
    experiment_name: str | None
    experiment_id: str | int | None
    backend: str | Backend
    backend_config: Mapping[str, Any] | str | None = field(repr=False)  # may hold tokens
    storage_dir: str | Path | None
    env_manager: str | None
    build_image: bool
    docker_auth: Mapping[str, str] | None = field(repr=False)


class Sweep:
    """A running (or not yet started) sweep; see :func:`sweep`.

    Iterate it for :class:`TrialResult` values in completion order, or await it for the
    list of all of them. It starts on first use and can be iterated once.
    """

    def __init__(
        self,
        run_args: RunArgs,
        *,
        planned: list[dict[str, Any]] | None,
        tuner: Tuner | None,
        budget: int | None,
        max_parallel: int,
        fail_fast: bool,
        retries: int,
        retry_delay: float,
        metric: str | None,
        goal: Goal,
        early_stopping: MedianStopping | None,
        runner: Runner | None,
        tracking_uri: str | None,
        echo: EchoMode,
        name: str | None,
        metrics_interval: float,
        display: Display | None,
    ) -> None:
        self._args = run_args
        self._display = display
        self._tuner = tuner
        self._budget = budget
        self._max_parallel = max_parallel
        self._fail_fast = fail_fast
        self._retries = retries
        self._retry_delay = retry_delay
        self.metric = metric
        self.goal: Goal = goal
        self._stopping = early_stopping
        self._runner = runner
        self._tracking_uri = tracking_uri
        self._echo: EchoMode = echo
        self._name = name
        self._metrics_interval = metrics_interval
        self.trials: list[TrialState] = [
            TrialState(index=i, params=p) for i, p in enumerate(planned or [])
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
        # Created on start: a Sweep that is never started holds nothing to close.
        self._send: MemoryObjectSendStream[TrialResult] | None = None
        self._receive: MemoryObjectReceiveStream[TrialResult] | None = None
        self._listeners: list[Callable[[TrialState], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._scope: anyio.CancelScope | None = None
        self._iterated = False
        self._histories: dict[int, dict[int, float]] = {}
        self._halted = False  # fail_fast: a trial failed, start nothing more
        self._handles: dict[int, SubmittedRun] = {}
        self._store: TrackingStore | None = None

    def __repr__(self) -> str:
        return (
            f"<Sweep uri={redact_url(self._args.uri)!r} status={self.status.value} "
            f"trials={len(self.trials)} done={len(self.results)}>"
        )

    # -- what users call -------------------------------------------------------------------

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
                self._drive(), name=f"aioproj sweep {self._args.uri}"
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
        args = self._args
        experiment_id = await store.resolve_experiment(
            experiment_name=args.experiment_name,
            experiment_id=None if args.experiment_id is None else str(args.experiment_id),
        )
        parent_key = await self._create_parent(runner, store, experiment_id)
        self.status = RunStatus.RUNNING
        outcome = RunStatus.KILLED
        try:
            await self._run_trials(runner)
            outcome = RunStatus.FAILED if self._halted else RunStatus.FINISHED
        except Exception:
            outcome = RunStatus.FAILED
            raise
        finally:
            self.status = outcome
            with anyio.CancelScope(shield=True):
                await self._finish_parent(runner, store, parent_key, outcome)

    async def _create_parent(self, runner: Runner, store: TrackingStore, experiment_id: str) -> str:
        """Create the sweep's parent run, journaled ahead like every run; its journal key.

        If this process dies before the sweep ends, ``aioproj recover`` records the
        parent KILLED (or the final status noted for it).
        """
        from aioproj.runner import _user

        args = self._args
        journal = await runner._open_journal()
        key = new_key()
        await journal.intent(
            key, tracking_uri=store.uri, backend="sweep", experiment_id=experiment_id,
            kind="sweep",
        )  # fmt: skip
        try:
            parent = await store.create_run(
                experiment_id,
                run_name=self._name,
                tags={
                    "mlflow.user": _user(),
                    "mlflow.source.name": redact_url(args.uri),
                    "mlflow.source.type": "PROJECT",
                    "mlflow.project.entryPoint": args.entry_point,
                    "aioproj.sweep.size": str(self.total if self.total is not None else "?"),
                },
                params={},
                client_key=key,
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await runner._abandon(store, key, experiment_id, None)
            raise
        journal.note(key, "tracked", run=parent.run_id)
        self.parent_run_id = parent.run_id
        return key

    async def _finish_parent(
        self, runner: Runner, store: TrackingStore, key: str, outcome: RunStatus
    ) -> None:
        """Tag the parent with the sweep's counts and best trial, write its final status.

        A status tracking refuses is kept in the journal and :attr:`parent_recorded`
        turns False (the CLI then says so and exits non-zero).
        """
        assert self.parent_run_id is not None
        journal = runner._journal
        end_ms = int(time.time() * 1000)
        journal.note(key, "ended", status=outcome.value, end=end_ms)
        counts: dict[str, int] = {}
        for result in self.results:
            counts[result.status.value] = counts.get(result.status.value, 0) + 1
        tags = {f"aioproj.sweep.{k.lower()}": str(v) for k, v in counts.items()}
        best = self.best
        if best is not None and best.run_id is not None and self.metric is not None:
            tags["aioproj.sweep.best_run_id"] = best.run_id
            tags["aioproj.sweep.best_value"] = repr(best.metrics[self.metric])
            tags["aioproj.sweep.metric"] = f"{self.metric} ({self.goal})"
        try:
            with anyio.fail_after(30):
                if tags:
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

    async def _run_trials(self, runner: Runner) -> None:
        batch = await self._trial_batch(runner)
        # The sweep runs in a task of its own: the batch is seen by its trials' starts only.
        current_batch.set(batch)
        slots = anyio.Semaphore(batch.size if batch is not None else self._max_parallel)
        async with anyio.create_task_group() as tg:
            index = 0
            while True:
                await slots.acquire()
                state = None if self._halted else await self._next_trial(index)
                if state is None:
                    slots.release()
                    break
                tg.start_soon(self._trial_slot, runner, state, slots, tg)
                index += 1
        if self._halted:
            for state in self.trials:
                if state.status == "QUEUED":
                    self._changed(state, "SKIPPED")

    async def _trial_batch(self, runner: Runner) -> TrialBatch | None:
        """The trials as one batch, for a backend that runs a batch as one unit and
        enforces ``max_parallel`` itself (Slurm: one job array); None otherwise, and for
        tuners, which propose one trial at a time."""
        if self._tuner is not None or len(self.trials) < 2:
            return None
        try:
            backend = await runner._backend(self._args.backend)
        except AioprojError:  # each trial's run() reports it
            return None
        if not submits_batches(backend):
            return None
        return TrialBatch(
            key=self.parent_run_id or str(id(self)),
            size=len(self.trials),
            max_parallel=self._max_parallel,
        )

    async def _next_trial(self, index: int) -> TrialState | None:
        if self._tuner is None:
            return self.trials[index] if index < len(self.trials) else None
        if self._budget is not None and index >= self._budget:
            return None
        asked = self._tuner.ask(index)
        params = await asked if inspect.isawaitable(asked) else asked
        if params is None:
            return None
        if not isinstance(params, Mapping):
            raise InvalidArgumentError(
                f"Tuner.ask must return a mapping of parameters or None, got {params!r}"
            )
        state = TrialState(index=index, params=dict(params))
        self.trials.append(state)
        return state

    async def _trial_slot(
        self,
        runner: Runner,
        state: TrialState,
        slots: anyio.Semaphore,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        try:
            try:
                result = await self._trial(runner, state)
            except anyio.get_cancelled_exc_class():
                if not state.is_done:  # its run (if it had one) was cancelled: KILLED
                    state.ended = time.monotonic()
                    self._changed(state, "KILLED", "the sweep was stopped")
                raise
            self.results.append(result)
            if self._tuner is not None:  # told before the next ask takes this slot
                told = self._tuner.tell(result)
                if inspect.isawaitable(told):
                    await told
            assert self._send is not None
            self._send.send_nowait(result)
            if self._fail_fast and result.status is RunStatus.FAILED and not self._halted:
                # Stop starting trials and cancel the running ones; they end KILLED and
                # their results are still reported.
                self._halted = True
                for handle in list(self._handles.values()):
                    tg.start_soon(handle.cancel)
        finally:
            slots.release()

    async def _trial(self, runner: Runner, state: TrialState) -> TrialResult:
        """Run one trial to its end, retrying infrastructure failures."""
        from aioproj.runner import extra_run_tags

        args = self._args
        while True:
            state.attempts += 1
            state.started, state.ended, state.run_id = time.monotonic(), None, None
            state.metrics = {}
            self._changed(state, "STARTING", "")
            token = extra_run_tags.set(
                {
                    PARENT_TAG: self.parent_run_id or "",
                    TRIAL_TAG: str(state.index),
                    ATTEMPT_TAG: str(state.attempts),
                }
            )
            try:
                handle = await runner.run(
                    args.uri,
                    entry_point=args.entry_point,
                    version=args.version,
                    parameters=state.params,
                    docker_args=args.docker_args,
                    experiment_name=args.experiment_name,
                    experiment_id=args.experiment_id,
                    backend=args.backend,
                    backend_config=args.backend_config,
                    storage_dir=args.storage_dir,
                    synchronous=False,
                    env_manager=args.env_manager,
                    build_image=args.build_image,
                    docker_auth=args.docker_auth,
                )
            except RETRYABLE as exc:
                if state.attempts <= self._retries and not self._halted:
                    await self._before_retry(state, exc)
                    continue
                return self._ended(state, RunStatus.FAILED, error=exc)
            except AioprojError as exc:
                return self._ended(state, RunStatus.FAILED, error=exc)
            finally:
                extra_run_tags.reset(token)
            if self._halted:  # fail_fast stopped the sweep while this run started
                await handle.cancel()
            status, pruned = await self._follow(state, handle)
            if status is RunStatus.FAILED and handle.error is not None:
                if state.attempts <= self._retries and not self._halted:
                    await self._before_retry(state, handle.error)
                    continue
                return self._ended(state, status, error=handle.error)
            return self._ended(state, status, pruned=pruned)

    async def _before_retry(self, state: TrialState, exc: Exception) -> None:
        delay = self._retry_delay * 2 ** (state.attempts - 1)
        logger.warning(
            "Trial %d, attempt %d failed (%s); retrying in %.1f s",
            state.index,
            state.attempts,
            exc,
            delay,
        )
        self._changed(state, "RETRYING", f"{type(exc).__name__}: {exc}")
        await anyio.sleep(delay)

    async def _follow(
        self, state: TrialState, handle: SubmittedRun
    ) -> tuple[RunStatus, str | None]:
        """Wait for a trial's run, watching its metrics; cancel it if we are cancelled."""
        state.run_id = handle.run_id
        self._handles[state.index] = handle
        self._changed(state, "RUNNING")
        pruned: list[str] = []
        watched = anyio.Event()
        try:
            async with anyio.create_task_group() as watchers:
                live = self._watch_metrics
                if live:
                    watchers.start_soon(self._watch, state, handle, pruned, watched)
                status = await handle
                if not live:  # the final values, in one read: the run has ended
                    watchers.start_soon(self._watch, state, handle, pruned, watched)
                await self._await_final_read(handle, watched, watchers.cancel_scope)
        except anyio.get_cancelled_exc_class():
            await handle.cancel()
            raise
        finally:
            self._handles.pop(state.index, None)
        return status, (pruned[0] if pruned else None)

    @property
    def _watch_metrics(self) -> bool:
        """Follow metrics while trials run: for the live view's metric and early stopping.
        Otherwise each trial's final metrics are read once, when it has ended."""
        live_use = self.metric is not None or self._stopping is not None
        return self._metrics_interval > 0 and live_use

    async def _await_final_read(
        self, handle: SubmittedRun, watched: anyio.Event, watchers: anyio.CancelScope
    ) -> None:
        """Give the watcher of an ended trial a bounded time to read its last values;
        as long as the tracking store is down, wait for it to come back (the values
        logged meanwhile then arrive), up to the poller's own limit."""
        grace = max(5.0, 4 * self._metrics_interval)
        while True:
            with anyio.move_on_after(grace):
                await watched.wait()
                return
            poller = handle._metrics
            if poller is None or poller.failing_since is None:
                watchers.cancel()
                return

    async def _watch(
        self, state: TrialState, handle: SubmittedRun, pruned: list[str], watched: anyio.Event
    ) -> None:
        """Keep the trial's latest metric values; stop it if early stopping says so."""
        try:
            async for m in handle.metrics(interval=self._metrics_interval):
                state.metrics[m.key] = m.value
                if self._stopping is not None and m.key == self._stopping.metric:
                    history = self._histories.setdefault(state.index, {})
                    history[m.step] = m.value
                    if not pruned and not handle.done:
                        await self._maybe_prune(state, handle, m.step, m.value, pruned)
        except AioprojError as exc:  # the run goes on; only its live metrics are lost
            logger.warning("Could not read the metrics of run %s: %s", handle.run_id, exc)
        finally:
            watched.set()

    async def _maybe_prune(
        self, state: TrialState, handle: SubmittedRun, step: int, value: float, pruned: list[str]
    ) -> None:
        assert self._stopping is not None
        ended = [
            self._histories[t.index]
            for t in self.trials
            if t.status == "FINISHED" and t.index in self._histories
        ]
        reason = self._stopping.verdict(step, value, ended)
        if reason is None:
            return
        pruned.append(reason)
        self._changed(state, "RUNNING", reason)
        assert self._store is not None
        try:
            await self._store.set_tags(handle.run_id, {PRUNED_TAG: reason})
        except AioprojError as exc:
            logger.error("Could not tag pruned run %s: %s", handle.run_id, exc)
        await handle.cancel()

    def _ended(
        self,
        state: TrialState,
        status: RunStatus,
        *,
        error: Exception | None = None,
        pruned: str | None = None,
    ) -> TrialResult:
        state.ended = time.monotonic()
        note = pruned or (f"{type(error).__name__}: {error}" if error is not None else "")
        self._changed(state, status.value, note)
        return TrialResult(
            index=state.index,
            params=dict(state.params),
            status=status,
            run_id=state.run_id,
            attempts=state.attempts,
            duration=state.duration or 0.0,
            metrics=dict(state.metrics),
            error=error,
            pruned=pruned,
        )
