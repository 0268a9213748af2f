"""The second phase of a run: slots, the journal, the tracking run, the start on its
backend and the handle (see :class:`aioproj.Runner`)."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from aioproj._keys import new_key
from aioproj._output import EchoMode, RunOutput
from aioproj._prepare import Prepared, RunPreparation, extra_run_tags, run_tags
from aioproj.backends import (
    Backend,
    StartRequest,
)
from aioproj.errors import AioprojError, InvalidArgumentError
from aioproj.handle import SubmittedRun
from aioproj.journal import Journal, record_exit
from aioproj.sources import redact_url
from aioproj.tracking import TrackingStore
from aioproj.tracking.base import RUN_NAME_TAG

__all__ = [
    "RunStarting",
]

if TYPE_CHECKING:
    pass


logger = logging.getLogger("aioproj")


class RunStarting(RunPreparation):
    """The Runner's start phase: concurrency and open-files slots, then journal, track and
    start a prepared run (in the runner, or handed to a detached supervisor)."""

    # The Runner sets these in its __init__ (see aioproj.runner).
    _slots: anyio.Semaphore | None
    _echo: EchoMode
    _grace: float
    _held: dict[SubmittedRun, list[anyio.Semaphore]]
    _fd_limits: dict[str, anyio.Semaphore | None]
    _journal: Journal
    _live: set[SubmittedRun]
    _state: str
    _is_default: bool

    async def _acquire_slots(self, backend: Backend) -> list[anyio.Semaphore]:
        """Wait for a concurrency slot and an open-files slot; return those held."""
        fd_slots = await self._fd_slots(backend)
        held: list[anyio.Semaphore] = []
        try:
            for slots in (self._slots, fd_slots):
                if slots is not None:
                    await slots.acquire()
                    held.append(slots)
            if self._state != "open":
                raise RuntimeError(
                    "The Runner was closed while this run was being prepared; no run was created."
                )
        except BaseException:
            for slots in held:
                slots.release()
            raise
        return held

    async def _track_and_start(
        self, prepared: Prepared, *, run_id: str | None, run_name: str | None
    ) -> SubmittedRun:
        """Journal, track and start a prepared run; return its handle (the task that
        called this supervises it next: see :meth:`_start_in_runner`).

        Write-ahead: the run's intent is in the journal before its tracking run exists,
        and its tracking run exists before its process or job does, which carries the
        journal's mark. Whatever point this process dies at, ``aioproj recover`` finds
        what was made. A start that fails records the run FAILED.
        """
        store, launch = prepared.store, prepared.launch
        backend_name = prepared.backend.name
        journal = self._journal
        key = new_key()
        await journal.intent(
            key,
            tracking_uri=store.uri,
            backend=backend_name,
            experiment_id=prepared.experiment_id,
            run_id=run_id,
            state=getattr(launch, "journal_state", None),
        )
        extra = extra_run_tags.get() or {}
        tags = {**run_tags(prepared.source, prepared.entry_point, backend_name), **launch.tags}
        tags.update(extra)
        try:
            creates_run = getattr(launch, "create_run", None)
            if creates_run is not None:  # an MLflow backend plugin tracks its run itself
                run_id = await creates_run(prepared.experiment_id, store)
            if run_id is not None:
                record = await store.get_run(run_id)
                if run_name is not None:
                    tags[RUN_NAME_TAG] = run_name
                await store.set_tags(run_id, tags)
            else:
                record = await store.create_run(
                    prepared.experiment_id,
                    run_name=run_name,
                    tags=tags,
                    params=prepared.parameters.logged,
                    client_key=key,
                )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._abandon(store, key, prepared.experiment_id, run_id)
            raise
        journal.note(key, "tracked", run=record.run_id)
        label = run_name or record.run_id[:8]
        output = RunOutput(label, echo=self._echo)
        tracking_env = {
            **store.child_env(),
            "MLFLOW_RUN_ID": record.run_id,
            "MLFLOW_EXPERIMENT_ID": record.experiment_id,
        }
        try:
            execution = await launch.start(
                StartRequest(
                    run_id=record.run_id,
                    experiment_id=record.experiment_id,
                    tracking_env=tracking_env,
                    output=output,
                    grace_period=self._grace,
                    process_mark=journal.mark(key),
                    record_exit=functools.partial(
                        record_exit, journal_path=str(journal.path), key=key
                    ),
                )
            )
        except BaseException:
            output.close()
            end_ms = int(time.time() * 1000)
            journal.note(key, "ended", status="FAILED", end=end_ms)
            with anyio.CancelScope(shield=True):
                await store.set_terminated(record.run_id, "FAILED", end_time_ms=end_ms)
            journal.note(key, "done")
            raise
        journal.note(key, "started", state=getattr(execution, "journal_state", None) or {})
        handle = SubmittedRun(
            run_id=record.run_id,
            experiment_id=record.experiment_id,
            execution=execution,
            store=store,
            output=output,
            on_done=self._run_done,
            # Stopping takes up to two grace periods (leader, then stragglers).
            cleanup_timeout=2 * self._grace + 10,
            metrics=self._metrics_poller(store),
            journal=journal,
            journal_key=key,
            leave_remote_running=self._is_default,
            start_soon=self._tg.start_soon if self._tg is not None else None,
        )
        self._live.add(handle)
        return handle

    async def _abandon(
        self, store: TrackingStore, key: str, experiment_id: str, run_id: str | None
    ) -> None:
        """After a failed create: settle the run's journal intent, never leave a ghost.

        The store is asked whether the run exists after all (an answer lost on the way):
        if not, the intent is void; if so, the run is recorded FAILED. If the store cannot
        say, the intent stays for ``aioproj recover``, which asks again later.
        """
        journal = self._journal
        try:
            with anyio.fail_after(30):
                found = run_id or await store.find_run(experiment_id, key)
                if found is not None:
                    await store.set_terminated(found, "FAILED")
        except (AioprojError, TimeoutError) as exc:
            logger.warning(
                "A run of this process may exist in %s without aioproj knowing it (%s);"
                " `aioproj recover` records it FAILED once this process has ended.",
                redact_url(store.uri),
                exc,
            )
            return
        journal.note(key, "void" if found is None else "done")

    async def _run_detached(self, argv: list[str]) -> SubmittedRun:
        """Start a detached supervisor for ``aioproj run <argv>``; a handle following it."""
        from aioproj._detach import DetachedExecution, SupervisorError, spawn_supervisor

        store = await self._store()
        env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri}
        if self._cache_dir is not None:
            env["AIOPROJ_CACHE_DIR"] = str(self._cache_dir)
        try:
            pid, run_id = await anyio.to_thread.run_sync(spawn_supervisor, argv, env)
        except SupervisorError as exc:
            if exc.usage:
                raise InvalidArgumentError(str(exc)) from None
            raise
        record = await store.get_run(run_id)
        output = RunOutput(run_id[:8], echo="off")
        output.feed(
            f"=== Run {run_id} is supervised by the detached aioproj process {pid}; its"
            " output is saved as the run's artifact aioproj/output.log ===\n".encode()
        )
        output.close()
        return SubmittedRun(
            run_id=run_id,
            experiment_id=record.experiment_id,
            execution=DetachedExecution(pid, run_id, store),
            store=store,
            output=output,
            cleanup_timeout=2 * self._grace + 10,
            metrics=self._metrics_poller(store),
        )

    async def _start_in_runner(
        self, start: Callable[[], Awaitable[SubmittedRun]], held: list[anyio.Semaphore]
    ) -> SubmittedRun:
        """Track and start a run in a task of the runner, and return its handle.

        From the moment the run exists in tracking until it has a supervisor that will
        record its end, nothing may interrupt: not a cancellation of the caller by anyio,
        nor asyncio's own ``Task.cancel()`` or ``asyncio.timeout``, which anyio's shields
        do not hold back. So the work runs in the runner's task group, shielded, and the
        caller only waits for it. If the caller is cancelled meanwhile, the run is stopped
        once it has started (and recorded KILLED) by another runner task, and the
        cancellation propagates. ``held`` (concurrency slots) is released if the start
        fails, else when the run is done.
        """
        done = anyio.Event()
        outcome: list[SubmittedRun] = []
        failure: list[BaseException] = []

        async def body() -> None:
            try:
                with anyio.CancelScope(shield=True):
                    handle = await start()
            except BaseException as exc:
                for slots in held:
                    slots.release()
                failure.append(exc)
                done.set()
                if not isinstance(exc, Exception):
                    raise
                return
            self._held[handle] = held  # released by _run_done
            outcome.append(handle)
            done.set()
            await handle._supervise()  # the same task follows the run to its end

        async def stop_once_started() -> None:
            await done.wait()
            if outcome:
                await outcome[0].cancel()

        assert self._tg is not None
        self._tg.start_soon(body)
        try:
            await done.wait()
        except anyio.get_cancelled_exc_class():
            stopped = anyio.Event()

            async def stop_and_signal() -> None:
                try:
                    await stop_once_started()
                finally:
                    stopped.set()

            self._tg.start_soon(stop_and_signal)
            with anyio.CancelScope(shield=True), anyio.move_on_after(2 * self._grace + 10):
                await stopped.wait()
            raise
        if failure:
            raise failure[0]
        return outcome[0]

    def _run_done(self, handle: SubmittedRun) -> None:
        self._live.discard(handle)
        for slots in self._held.pop(handle, ()):
            slots.release()

    async def _fd_slots(self, backend: Backend) -> anyio.Semaphore | None:
        """How many runs of ``backend`` fit in the open-files limit, as a semaphore.

        A backend that keeps descriptors open for each run (the local backend: the output
        pipe and the pidfd) says how many in ``fds_per_run``. Runs beyond what the soft
        RLIMIT_NOFILE leaves (after a reserve for tracking, sources and sockets) wait for
        a slot instead of failing with "Too many open files".
        """
        per_run = int(getattr(backend, "fds_per_run", 0) or 0)
        if per_run <= 0:
            return None
        if backend.name not in self._fd_limits:
            # A burst of runs shares the one lookup in flight.
            slots = await self._shared.run(
                f"fd-limit\0{backend.name}",
                lambda: anyio.to_thread.run_sync(_runs_within_fd_limit, per_run),
            )
            self._fd_limits.setdefault(
                backend.name, anyio.Semaphore(slots) if slots is not None else None
            )
        return self._fd_limits[backend.name]


def _runs_within_fd_limit(per_run: int) -> int | None:
    """Runs of ``per_run`` descriptors each that the open-files limit leaves room for.

    None when there is no limit to respect. Reads /proc/self/fd: call it in a thread.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 32
    reserve = min(_FD_RESERVE, soft // 4)
    return max(1, (soft - open_now - reserve) // per_run)


#: Descriptors left for everything but runs' own: tracking files, sources, sockets.
_FD_RESERVE = 128
