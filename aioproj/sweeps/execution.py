"""How one trial of a sweep runs: its run is submitted (:meth:`TrialExecution.submit`, the
one place a trial becomes a run), followed to its end with its live metrics, stopped early
when the sweep's stopper says so, retried after infrastructure failures, and summed up in
a :class:`~aioproj.sweeps.trials.TrialResult` that says why it did not finish.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from aioproj.backends.batch import TrialBatch, submits_batches
from aioproj.errors import AioprojError
from aioproj.handle import RunStatus, SubmittedRun
from aioproj.sweeps.reasons import Redactor, error_text, output_tail
from aioproj.sweeps.stoppers import Stopper
from aioproj.sweeps.trials import (
    ATTEMPT_TAG,
    PARAMS_TAG,
    PARENT_TAG,
    PRUNED_TAG,
    REASON_TAG,
    RETRYABLE,
    TRIAL_TAG,
    TrialResult,
    TrialState,
)
from aioproj.tracking.base import MAX_TAG_VALUE_LENGTH

if TYPE_CHECKING:
    from aioproj.backends import Backend
    from aioproj.runner import Runner
    from aioproj.tracking.base import TrackingStore

__all__ = ["RunArgs", "TrialExecution"]

logger = logging.getLogger("aioproj")

#: Calls the sweep's listeners: a trial's state, its new status, and a note or reason.
Changed = Callable[[TrialState, str, "str | None"], None]


@dataclass(frozen=True)
class RunArgs:
    """The arguments of :func:`aioproj.run` that every trial of a sweep shares."""

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


class TrialExecution:
    """Runs trials of one sweep, each to its end; see :meth:`run`.

    ``stop_reason`` says why the sweep stops its trials (fail-fast), or None while it
    does not; ``changed`` tells the sweep's listeners about each change of a trial.
    """

    def __init__(
        self,
        *,
        runner: Runner,
        store: TrackingStore,
        args: RunArgs,
        parent_run_id: str,
        retries: int,
        retry_delay: float,
        metrics_interval: float,
        watch_metrics: bool,
        stopper: Stopper | None,
        changed: Changed,
        stop_reason: Callable[[], str | None],
    ) -> None:
        self._runner = runner
        self._store = store
        self._args = args
        self._parent_run_id = parent_run_id
        self._retries = retries
        self._retry_delay = retry_delay
        self._interval = metrics_interval
        self._watch_live = watch_metrics
        self._stopper = stopper
        self._redact = Redactor.for_sweep(
            uri=args.uri, child_env=store.child_env(), docker_auth=args.docker_auth
        )
        self._changed = changed
        self._stop_reason = stop_reason
        #: The runs of the trials running now, by trial index.
        self.handles: dict[int, SubmittedRun] = {}

    async def batch(self, size: int, max_parallel: int) -> TrialBatch | None:
        """The trials about to be submitted as one batch, for a backend that runs a batch
        as one unit and enforces ``max_parallel`` itself (Slurm: one job array); None
        otherwise (then the sweep keeps its own limit)."""
        if size < 2:
            return None
        try:
            backend = await self._runner._backend(self._args.backend)
        except AioprojError:  # each trial's run() reports it
            return None
        if not submits_batches(backend):
            return None
        return TrialBatch(key=self._parent_run_id, size=size, max_parallel=max_parallel)

    async def run(self, state: TrialState) -> TrialResult:
        """Run one trial to its end, retrying infrastructure failures ``retries`` times.

        Cancellation: the trial's run is cancelled (recorded KILLED) before the
        cancellation propagates.
        """
        earlier = state.attempts  # those of a sweep this one resumes
        while True:
            state.attempts += 1
            state.started, state.ended, state.run_id = time.monotonic(), None, None
            state.metrics = {}
            self._changed(state, "STARTING", "")
            try:
                handle = await self.submit(state)
            except RETRYABLE as exc:
                if state.attempts - earlier <= self._retries and self._stop_reason() is None:
                    await self._before_retry(state, exc)
                    continue
                return await self._ended(state, RunStatus.FAILED, error=exc)
            except AioprojError as exc:
                return await self._ended(state, RunStatus.FAILED, error=exc)
            if self._stop_reason() is not None:  # fail-fast stopped the sweep meanwhile
                await handle.cancel()
            status, pruned = await self._follow(state, handle)
            if status is RunStatus.FAILED and handle.error is not None:
                if state.attempts - earlier <= self._retries and self._stop_reason() is None:
                    await self._before_retry(state, handle.error)
                    continue
                return await self._ended(state, status, error=handle.error)
            return await self._ended(state, status, pruned=pruned, handle=handle)

    async def submit(self, state: TrialState) -> SubmittedRun:
        """Start the run of one attempt of a trial: a child run of the sweep's parent,
        tagged with the trial's number, attempt and parameters.

        Raises what :meth:`aioproj.Runner.run` raises.
        """
        from aioproj.runner import extra_run_tags

        tags = {
            PARENT_TAG: self._parent_run_id,
            TRIAL_TAG: str(state.index),
            ATTEMPT_TAG: str(state.attempts),
        }
        params_json = json.dumps(state.params, default=str)
        if len(params_json) <= MAX_TAG_VALUE_LENGTH:
            tags[PARAMS_TAG] = params_json
        args = self._args
        token = extra_run_tags.set(tags)
        try:
            return await self._runner.run(
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
        finally:
            extra_run_tags.reset(token)

    async def _before_retry(self, state: TrialState, exc: Exception) -> None:
        delay = self._retry_delay * 2 ** (state.attempts - 1)
        text = self._redact(error_text(exc))
        logger.warning(
            "Trial %d, attempt %d failed (%s); retrying in %.1f s",
            state.index,
            state.attempts,
            text,
            delay,
        )
        self._changed(state, "RETRYING", text)
        await anyio.sleep(delay)

    async def _follow(
        self, state: TrialState, handle: SubmittedRun
    ) -> tuple[RunStatus, str | None]:
        """Wait for a trial's run, watching its metrics; cancel it if we are cancelled."""
        state.run_id = handle.run_id
        self.handles[state.index] = handle
        self._changed(state, "RUNNING", None)
        pruned: list[str] = []
        watched = anyio.Event()
        try:
            async with anyio.create_task_group() as watchers:
                if self._watch_live:
                    watchers.start_soon(self._watch, state, handle, pruned, watched)
                status = await handle
                if not self._watch_live:  # the final values, in one read: the run has ended
                    watchers.start_soon(self._watch, state, handle, pruned, watched)
                await self._await_final_read(handle, watched, watchers.cancel_scope)
        except anyio.get_cancelled_exc_class():
            await handle.cancel()
            raise
        finally:
            self.handles.pop(state.index, None)
        return status, (pruned[0] if pruned else None)

    async def _await_final_read(
        self, handle: SubmittedRun, watched: anyio.Event, watchers: anyio.CancelScope
    ) -> None:
        """Give the watcher of an ended trial a bounded time to read its last values;
        as long as the tracking store is down, wait for it to come back (the values
        logged meanwhile then arrive), up to the poller's own limit."""
        grace = max(5.0, 4 * self._interval)
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
        """Keep the trial's latest metric values; stop it if the stopper says so."""
        stopper = self._stopper
        try:
            async for m in handle.metrics(interval=self._interval):
                state.metrics[m.key] = m.value
                if stopper is None or m.key != stopper.metric or pruned:
                    continue  # a stopped trial's last values must not count
                verdict = stopper.observe(state.index, m.step, m.value)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
                if verdict is not None and not pruned and not handle.done:
                    await self._prune(state, handle, verdict, pruned)
        except AioprojError as exc:  # the run goes on; only its live metrics are lost
            logger.warning("Could not read the metrics of run %s: %s", handle.run_id, exc)
        finally:
            watched.set()

    async def _prune(
        self, state: TrialState, handle: SubmittedRun, reason: str, pruned: list[str]
    ) -> None:
        pruned.append(reason)
        self._changed(state, "RUNNING", reason)
        try:
            await self._store.set_tags(handle.run_id, {PRUNED_TAG: reason})
        except AioprojError as exc:
            logger.error("Could not tag pruned run %s: %s", handle.run_id, exc)
        await handle.cancel()

    async def _ended(
        self,
        state: TrialState,
        status: RunStatus,
        *,
        error: Exception | None = None,
        pruned: str | None = None,
        handle: SubmittedRun | None = None,
    ) -> TrialResult:
        state.ended = time.monotonic()
        reason, note = await self._reason(status, error, pruned, handle)
        if reason is not None and handle is not None and pruned is None:
            try:
                await self._store.set_tags(handle.run_id, {REASON_TAG: reason})
            except AioprojError as exc:
                logger.error("Could not tag run %s with its reason: %s", handle.run_id, exc)
        state.reason = reason or ""
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
            reason=reason,
        )

    async def _reason(
        self,
        status: RunStatus,
        error: Exception | None,
        pruned: str | None,
        handle: SubmittedRun | None,
    ) -> tuple[str | None, str]:
        """Why a trial did not finish (None if it did) and the one line that says it:
        the stopper's verdict, the error, the sweep's stop, or the last lines of the
        run's output with how it ended (``exit status 2``). Redacted."""
        if pruned is not None:
            return pruned, pruned
        if error is not None:
            text = self._redact(error_text(error))
            return text, text.splitlines()[0]
        if status is RunStatus.FINISHED:
            return None, ""
        stopped = self._stop_reason()
        if status is RunStatus.KILLED and stopped is not None:
            return stopped, stopped
        detail = handle.status_detail if handle is not None else None
        tail = await output_tail(handle) if handle is not None else []
        if not tail:
            what = "failed" if status is RunStatus.FAILED else "was killed"
            text = f"the run {what} without printing anything"
            tail = [f"{text} ({detail})" if detail else text]
        elif detail:
            tail[-1] += f" ({detail})"
        return self._redact("\n".join(tail)), self._redact(tail[-1])
