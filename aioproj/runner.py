"""The Runner: owns what runs share, and turns ``run(...)`` calls into tracked runs.

One direction, no back and forth: fetch the source, validate the project and its
parameters, prepare the backend (environment), create the tracking run, start it, and
hand back a :class:`~aioproj.SubmittedRun`. Everything that can be wrong with the input
fails before a run is tracked.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import os
import sys
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from aioproj._detach import (
    DetachedExecution,
    SupervisorError,
    check_detach,
    cli_args,
    spawn_supervisor,
)
from aioproj._keys import new_key
from aioproj._marks import build_mark, process_mark
from aioproj._output import EchoMode, RunOutput
from aioproj._paths import cache_root
from aioproj._shared import SharedCalls
from aioproj.backends import (
    Backend,
    Launch,
    LaunchRequest,
    StartRequest,
    load_backend,
)
from aioproj.envs import validate_env_manager
from aioproj.errors import AioprojError, InvalidArgumentError, RunFailedError
from aioproj.handle import SubmittedRun
from aioproj.journal import Journal, record_exit
from aioproj.project import (
    EntryPoint,
    ResolvedParameters,
    load_project,
    resolve_parameters,
)
from aioproj.sources import FetchedProject, SourceCache, redact_url
from aioproj.tracking import TrackingStore, open_store
from aioproj.tracking.base import RUN_NAME_TAG, check_record, current_user
from aioproj.tracking.metrics import MetricsPoller
from aioproj.tracking.resolve import default_tracking_uri

if TYPE_CHECKING:
    from aioproj.sources.path_params import Localized, PathDownloads

__all__ = ["Runner", "run"]

logger = logging.getLogger("aioproj")

#: Tags added to the runs a task creates, over the usual ones: a sweep sets its parent
#: run (``mlflow.parentRunId``) and trial number here around its ``run()`` calls.
extra_run_tags: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "aioproj_extra_run_tags", default=None
)


@dataclass(frozen=True)
class _Prepared:
    """A run ready to be tracked and started: what :meth:`Runner._prepare` produced."""

    backend: Backend
    store: TrackingStore
    launch: Launch
    source: FetchedProject
    entry_point: EntryPoint
    parameters: ResolvedParameters
    experiment_id: str
    #: The downloads of its ``path`` parameters, held until the run has started.
    downloads: Localized | None = None


class Runner:
    """Owns the resources runs share, and the runs it started. An async context manager.

    ``tracking_uri``: where runs are recorded (default: ``MLFLOW_TRACKING_URI``, else the
    installed MLflow's default, resolved once per runner: ``sqlite:///mlflow.db`` for
    MLflow >= 3.7 unless ``./mlruns`` has data, else the file store ``./mlruns``).

    ``max_concurrency``: at most this many runs of this runner are active
    at once; ``run()`` waits for a free slot before it creates a run. ``echo``: how run
    output reaches this process's stdout (``"labelled"`` prefixes each line with the run's
    short label, ``"plain"`` does not, ``"off"`` keeps it to ``run.logs()`` and the run's
    artifact). ``grace_period``: seconds between SIGTERM and SIGKILL when a local run is
    cancelled.

    Leaving the ``async with`` block normally waits for the runs still going, as a task
    group does; leaving it with an exception (or by cancellation) cancels them and
    records them KILLED. Either way no process started by the runner survives it and no
    run it tracked is left RUNNING.
    """

    def __init__(
        self,
        *,
        tracking_uri: str | None = None,
        max_concurrency: int | None = None,
        echo: EchoMode = "labelled",
        grace_period: float = 10.0,
        cache_dir: str | Path | None = None,
    ) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise InvalidArgumentError(
                f"max_concurrency must be a positive integer or None, got {max_concurrency!r}"
            )
        if echo not in ("labelled", "plain", "off"):
            raise InvalidArgumentError(f"echo must be 'labelled', 'plain' or 'off', got {echo!r}")
        self._tracking_uri = tracking_uri
        self._slots = anyio.Semaphore(max_concurrency) if max_concurrency else None
        self._echo: EchoMode = echo
        self._grace = grace_period
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._sources: SourceCache | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._backends: dict[str, Backend] = {}
        self._stores: dict[str, TrackingStore] = {}
        self._default_uri: str | None = None  # resolved once, on first use
        self._pollers: dict[str, MetricsPoller] = {}
        self._held: dict[SubmittedRun, list[anyio.Semaphore]] = {}
        self._fd_limits: dict[str, anyio.Semaphore | None] = {}
        self._journal = Journal((self._cache_dir or cache_root()) / "journal")
        self._live: set[SubmittedRun] = set()
        self._state = "unopened"
        self._shared = SharedCalls()
        self._downloads: PathDownloads | None = None  # made on the first URI to download
        self._inflight = 0  # run() calls between their first check and their handle
        self._idle = anyio.Event()
        self._is_default = False
        self._ready = anyio.Event()
        #: Runs being prepared, and runs being tracked and started, at once. The steps of
        #: one run between two waits are short, but a burst of hundreds would make them
        #: one long stretch of the event loop (200 runs: 60 ms without a timer firing).
        self._starting = anyio.CapacityLimiter(_STARTING_AT_ONCE)

    # -- lifetime ----------------------------------------------------------------------

    async def __aenter__(self) -> Runner:
        if self._state != "unopened":
            raise RuntimeError(f"A Runner can be opened once; this one is {self._state}.")
        cache = self._cache_dir or cache_root()
        self._sources = SourceCache(cache / "sources")
        await self._sources.__aenter__()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._state = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        assert self._sources is not None
        self._state = "closing"
        if self._inflight:
            # run() calls still preparing see the runner closing and create nothing.
            with anyio.move_on_after(2 * self._grace + 10):
                await self._idle.wait()
        left = sum(1 for run in self._live if run._execution.waits_for_stop)
        remote = len(self._live) - left
        try:
            if exc is not None:
                # Leaving by an exception (or cancellation): stop the runs; each records
                # itself KILLED. The exception is the caller's, never wrapped in a group.
                self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            return None
        finally:
            with anyio.CancelScope(shield=True):
                await self._release()
            self._state = "closed"
            if self._is_default and left:
                warnings.warn(
                    f"{left} local aioproj run(s) were still going when their event loop "
                    "ended; they were cancelled and recorded KILLED. To let runs finish, "
                    "await them (`await run` or `await run.wait()`) before the loop ends.",
                    RuntimeWarning,
                    stacklevel=1,
                )
            if self._is_default and remote:
                warnings.warn(
                    f"{remote} remote aioproj run(s) were still going when their event loop "
                    "ended; they go on on their backend. Run `aioproj recover` later to "
                    "record how they ended.",
                    RuntimeWarning,
                    stacklevel=1,
                )

    async def _release(self) -> None:
        await self._journal.aclose()
        for backend in self._backends.values():
            await backend.aclose()
        for store in self._stores.values():
            await store.aclose()
        assert self._sources is not None
        await self._sources.__aexit__(None, None, None)

    @property
    def active_runs(self) -> frozenset[SubmittedRun]:
        """The runs of this runner that have not ended yet."""
        return frozenset(self._live)

    async def cancel_all(self) -> None:
        """Cancel every run of this runner that has not ended, concurrently."""
        async with anyio.create_task_group() as tg:
            for handle in list(self._live):
                tg.start_soon(handle.cancel)

    # -- runs --------------------------------------------------------------------------

    async def run(
        self,
        uri: str,
        entry_point: str = "main",
        version: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        docker_args: Mapping[str, str | bool] | None = None,
        experiment_name: str | None = None,
        experiment_id: str | int | None = None,
        backend: str | Backend = "local",
        backend_config: Mapping[str, Any] | str | None = None,
        storage_dir: str | Path | None = None,
        synchronous: bool = True,
        run_id: str | None = None,
        run_name: str | None = None,
        env_manager: str | None = None,
        build_image: bool = False,
        docker_auth: Mapping[str, str] | None = None,
        *,
        detach: bool = False,
    ) -> SubmittedRun:
        """Run an MLflow project; the arguments are those of ``mlflow.projects.run``.

        Returns the run's :class:`SubmittedRun`. With ``synchronous=True`` (the default)
        it returns once the run has FINISHED and raises :class:`RunFailedError`
        ("Run (ID '…') failed") if it ended FAILED or KILLED; with ``synchronous=False``
        it returns as soon as the backend has accepted the run.

        Raises :class:`InvalidArgumentError` for bad arguments, and an
        :class:`ExecutionError` subclass (:class:`SourceError`, :class:`MLprojectError`,
        :class:`EntryPointError`, :class:`ParameterError`, :class:`EnvironmentBuildError`,
        :class:`BackendError`) when the project cannot be run; in those cases no tracking
        run is created.

        ``detach=True`` (local backend, ``synchronous=False``) hands the run to a detached
        aioproj process that outlives this one and records the final status itself, as
        ``aioproj run --no-wait`` and MLflow's asynchronous local runs do. The handle
        follows that process: awaiting it waits for the run, ``cancel()`` stops it. Its
        ``logs()`` has one line saying where the output is saved (the run's artifact
        ``aioproj/output.log``). Errors the detached process meets before the run starts
        are raised as :class:`ExecutionError` with its message.

        Cancellation: if the calling task is cancelled while ``run()`` waits for a
        synchronous run, or before it returns the handle of an asynchronous one, the run
        is stopped and recorded KILLED before the cancellation propagates. A detached run
        is never stopped by a cancellation of its caller.
        """
        if self._state != "open":
            raise RuntimeError(
                "This Runner is not open: use `async with Runner() as runner:` "
                "or the module-level aioproj.run()."
            )
        self._inflight += 1
        try:
            if experiment_name is not None and experiment_id is not None:
                raise InvalidArgumentError(
                    "Specify only one of 'experiment_name' or 'experiment_id'."
                )
            if not isinstance(entry_point, str) or not entry_point:
                raise InvalidArgumentError(
                    f"entry_point must be a non-empty string, got {entry_point!r}"
                )
            if parameters is not None and not isinstance(parameters, Mapping):
                raise InvalidArgumentError(
                    "parameters must be a mapping of names to values, got "
                    f"{type(parameters).__name__}"
                )
            validate_env_manager(env_manager)
            check_record(run_name=run_name, experiment_name=experiment_name)
            if detach:
                check_detach(backend, synchronous, docker_auth)
                return await self._run_detached(
                    cli_args(
                        uri,
                        entry_point=entry_point,
                        version=version,
                        parameters=parameters,
                        docker_args=docker_args,
                        experiment_name=experiment_name,
                        experiment_id=experiment_id,
                        backend_config=backend_config,
                        storage_dir=storage_dir,
                        run_id=run_id,
                        run_name=run_name,
                        env_manager=env_manager,
                        build_image=build_image,
                    )
                )
            await self._open_journal()
            # Processes started while preparing (environment builds) carry the driver's
            # mark, so `aioproj recover` stops them if this process dies meanwhile.
            mark = process_mark.set(build_mark(self._journal.id))
            try:
                return await self._run(
                    uri,
                    entry_point=entry_point,
                    version=version,
                    parameters=parameters,
                    docker_args=docker_args,
                    experiment_name=experiment_name,
                    experiment_id=experiment_id,
                    backend=backend,
                    backend_config=backend_config,
                    storage_dir=storage_dir,
                    synchronous=synchronous,
                    run_id=run_id,
                    run_name=run_name,
                    env_manager=env_manager,
                    build_image=build_image,
                    docker_auth=docker_auth,
                )
            finally:
                process_mark.reset(mark)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
                self._idle = anyio.Event()

    async def _run(
        self,
        uri: str,
        *,
        entry_point: str,
        version: str | None,
        parameters: Mapping[str, Any] | None,
        docker_args: Mapping[str, str | bool] | None,
        experiment_name: str | None,
        experiment_id: str | int | None,
        backend: str | Backend,
        backend_config: Mapping[str, Any] | str | None,
        storage_dir: str | Path | None,
        synchronous: bool,
        run_id: str | None,
        run_name: str | None,
        env_manager: str | None,
        build_image: bool,
        docker_auth: Mapping[str, str] | None,
    ) -> SubmittedRun:
        """The phases of :meth:`run` once its arguments are checked: prepare (nothing
        tracked yet), wait for a slot, track and start (never interrupted), follow."""
        async with self._starting:
            prepared = await self._prepare(
                uri,
                entry_point=entry_point,
                version=version,
                parameters=parameters,
                docker_args=docker_args,
                experiment_name=experiment_name,
                experiment_id=experiment_id,
                backend=backend,
                backend_config=backend_config,
                storage_dir=storage_dir,
                synchronous=synchronous,
                env_manager=env_manager,
                build_image=build_image,
                docker_auth=docker_auth,
            )
        try:
            held = await self._acquire_slots(prepared.backend)
            async with self._starting:
                handle = await self._start_in_runner(
                    functools.partial(
                        self._track_and_start, prepared, run_id=run_id, run_name=run_name
                    ),
                    held,
                )
            if prepared.downloads is not None:
                prepared.downloads.keep()  # the run uses them: they stay, as in MLflow
        finally:
            if prepared.downloads is not None:  # removes what no started run uses
                await prepared.downloads.release()
        try:
            if synchronous:
                if not await handle.wait():
                    raise RunFailedError(handle.run_id, (await handle.get_status()).value)
                logger.info("=== Run (ID '%s') succeeded ===", handle.run_id)
            else:
                await anyio.lowlevel.checkpoint()
        except anyio.get_cancelled_exc_class():
            logger.info("Run (ID '%s') interrupted, cancelling it", handle.run_id)
            await handle.cancel()
            raise
        return handle

    async def _open_journal(self) -> Journal:
        """The runner's journal, opened on first use. Raises JournalError."""
        if not self._journal.opened:
            assert self._tg is not None
            await self._journal.open(self._tg.start_soon)
        return self._journal

    async def _prepare(
        self,
        uri: str,
        *,
        entry_point: str,
        version: str | None,
        parameters: Mapping[str, Any] | None,
        docker_args: Mapping[str, str | bool] | None,
        experiment_name: str | None,
        experiment_id: str | int | None,
        backend: str | Backend,
        backend_config: Mapping[str, Any] | str | None,
        storage_dir: str | Path | None,
        synchronous: bool,
        env_manager: str | None,
        build_image: bool,
        docker_auth: Mapping[str, str] | None,
    ) -> _Prepared:
        """Everything that can fail before a run is tracked: fetch the source, validate
        the project and parameters, prepare the backend, find the experiment."""
        the_backend = await self._backend(backend)
        config = await _load_backend_config(backend_config)
        store = await self._store()
        assert self._sources is not None
        # Runs started together (a sweep) share one fetch, one parse, one lookup.
        sources = self._sources
        source = await self._shared.run(
            f"fetch\0{uri}\0{version}", lambda: sources.fetch(uri, version)
        )
        project = await self._shared.run(
            f"project\0{source.directory}",
            lambda: anyio.to_thread.run_sync(load_project, source.directory),
        )
        ep = project.get_entry_point(entry_point)
        has_paths = any(p.type == "path" for p in ep.parameters.values())
        if has_paths:  # checks files exist
            resolved = await anyio.to_thread.run_sync(resolve_parameters, project, ep, parameters)
        else:
            resolved = resolve_parameters(project, ep, parameters)
        # Tags and params checked before an environment, experiment or run is made.
        check_record(
            tags={**_run_tags(source, ep, the_backend.name), **(extra_run_tags.get() or {})},
            params=resolved.logged,
        )
        request = LaunchRequest(
            source=source,
            project=project,
            entry_point=ep,
            parameters=resolved,
            backend_config=config,
            env_manager=env_manager,
            docker_args=dict(docker_args or {}),
            storage_dir=Path(storage_dir) if storage_dir is not None else None,
            build_image=build_image,
            docker_auth=docker_auth,
            env_cache_dir=(self._cache_dir or cache_root()) / "envs",
            tracking_uri=store.uri,
            version=version,
            synchronous=synchronous,
        )
        downloaded: Localized | None = None
        if has_paths and getattr(the_backend, "downloads_path_parameters", False):
            launch, downloaded = await self._prepare_downloading(
                the_backend, request, parameters, store
            )
        else:
            launch = await the_backend.prepare(request)
        exp_key = None if experiment_id is None else str(experiment_id)
        try:
            exp_id = await self._shared.run(
                f"experiment\0{store.uri}\0{experiment_name}\0{exp_key}",
                lambda: store.resolve_experiment(
                    experiment_name=experiment_name, experiment_id=exp_key
                ),
            )
        except BaseException:
            if downloaded is not None:
                await downloaded.release()
            raise
        return _Prepared(the_backend, store, launch, source, ep, resolved, exp_id, downloaded)

    async def _prepare_downloading(
        self,
        backend: Backend,
        request: LaunchRequest,
        parameters: Mapping[str, Any] | None,
        store: TrackingStore,
    ) -> tuple[Launch, Localized | None]:
        """The backend's preparation, with the ``path`` parameters given as URIs
        downloaded meanwhile (MLflow's ``storage_dir``); the launch then runs the command
        with the local paths. Raises what either raises; nothing is left of the downloads
        on failure."""
        from aioproj.sources.path_params import PathDownloads, remote_path_parameters

        if not remote_path_parameters(request.entry_point, request.parameters):
            return await backend.prepare(request), None
        if self._downloads is None:
            self._downloads = PathDownloads()
        downloads = self._downloads
        launch, downloaded = await downloads.alongside(
            lambda: backend.prepare(request),
            lambda: downloads.localize(
                request.project,
                request.entry_point,
                parameters,
                request.parameters,
                storage_dir=request.storage_dir,
                store=store,
            ),
        )
        return launch.with_parameters(downloaded.parameters), downloaded  # type: ignore[attr-defined]

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
        self, prepared: _Prepared, *, run_id: str | None, run_name: str | None
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
        tags = {**_run_tags(prepared.source, prepared.entry_point, backend_name), **launch.tags}
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

    async def _backend(self, backend: str | Backend) -> Backend:
        if not isinstance(backend, str):
            if not isinstance(backend, Backend):
                raise InvalidArgumentError(
                    f"backend must be a name or an aioproj.backends.Backend, got {backend!r}"
                )
            return backend
        if backend not in self._backends:
            if backend == "local":
                loaded = load_backend(backend)
            else:  # imports and plugin metadata read files: off the loop, once
                loaded = await self._shared.run(
                    f"backend\0{backend}", lambda: anyio.to_thread.run_sync(load_backend, backend)
                )
            self._backends.setdefault(backend, loaded)
        return self._backends[backend]

    def _metrics_poller(self, store: TrackingStore) -> MetricsPoller:
        """The one poll of ``store`` that every run's :meth:`SubmittedRun.metrics` shares."""
        poller = self._pollers.get(store.uri)
        if poller is None:
            assert self._tg is not None
            poller = self._pollers[store.uri] = MetricsPoller(store, self._tg.start_soon)
        return poller

    async def _store(self) -> TrackingStore:
        uri = self._tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow's default looks at ./mlruns and the installed MLflow
            if self._default_uri is None:
                found = await self._shared.run(
                    "default-uri", lambda: anyio.to_thread.run_sync(default_tracking_uri)
                )
                self._default_uri = self._default_uri or found
            uri = self._default_uri
        if uri not in self._stores:
            # Opening imports the store's module (httpx, mlflow): off the loop, once for
            # a whole burst of runs.
            name = uri
            store = await self._shared.run(
                f"store\0{name}", lambda: anyio.to_thread.run_sync(open_store, name)
            )
            self._stores.setdefault(uri, store)
        return self._stores[uri]


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


#: Runs in the preparation phase, and in the start phase, at a time (see Runner._starting).
_STARTING_AT_ONCE = 32

#: Descriptors left for everything but runs' own: tracking files, sources, sockets.
_FD_RESERVE = 128


async def _load_backend_config(config: Mapping[str, Any] | str | None) -> dict[str, Any] | None:
    """A dict as given, a ``.json`` path loaded, a JSON object string parsed; None stays
    None (MLflow tells "not given" from ``{}``: Databricks requires a config)."""
    if config is None:
        return None
    if isinstance(config, Mapping):
        return dict(config)
    if not isinstance(config, str):
        raise InvalidArgumentError(
            f"backend_config must be a dict or a path to a JSON file, got {type(config).__name__}"
        )
    if config.endswith(".json"):
        try:
            text = await anyio.Path(config).read_text()
        except OSError as exc:
            raise InvalidArgumentError(
                f"Could not read backend config file {config}: {exc.strerror or exc}"
            ) from exc
        source = f"file {config}"
    else:
        text, source = config, "string"
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(
            f"Invalid backend config JSON in {source}: {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}."
        ) from exc
    if not isinstance(loaded, dict):
        raise InvalidArgumentError(
            f"The backend config ({source}) must be a JSON object, got {type(loaded).__name__}."
        )
    return loaded


def _run_tags(source: FetchedProject, ep: EntryPoint, backend: str) -> dict[str, str]:
    """The tags MLflow gives a project run, all set at creation."""
    tags = {
        "mlflow.user": current_user(),
        "mlflow.source.name": source.source_name,
        "mlflow.source.type": "PROJECT",
        "mlflow.project.entryPoint": ep.name,
        "mlflow.project.backend": backend,
    }
    if source.git_commit:
        tags["mlflow.source.git.commit"] = source.git_commit
    if source.git_repo_url:
        tags["mlflow.source.git.repoURL"] = source.git_repo_url
    if source.git_branch:
        tags["mlflow.source.git.branch"] = source.git_branch
    parent = _active_mlflow_run_id()
    if parent:
        tags["mlflow.parentRunId"] = parent
    return tags


def _active_mlflow_run_id() -> str | None:
    """The caller's active MLflow run, if it uses mlflow (never imported just for this)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return None
    active = mlflow.active_run()
    return active.info.run_id if active is not None else None


# -- the default runner of each event loop ----------------------------------------------

_default_runners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Runner] = (
    weakref.WeakKeyDictionary()
)
_host_tasks: set[asyncio.Task[None]] = set()


async def _host(runner: Runner, ready: anyio.Event) -> None:
    async with runner:
        ready.set()
        await anyio.sleep_forever()


async def default_runner() -> Runner:
    """The runner that module-level :func:`run` uses on the running event loop.

    It lives as long as the loop: when the loop ends (``asyncio.run`` returns), local
    runs still going are cancelled and recorded KILLED, with a warning saying how many;
    remote runs (Databricks, Kubernetes) go on, and ``aioproj recover`` records their end.
    """
    loop = asyncio.get_running_loop()
    runner = _default_runners.get(loop)
    if runner is None or runner._state in ("closing", "closed"):
        runner = Runner()
        runner._is_default = True
        _default_runners[loop] = runner
        task = loop.create_task(_host(runner, runner._ready))
        _host_tasks.add(task)
        task.add_done_callback(_host_tasks.discard)
    await runner._ready.wait()
    return runner


async def run(
    uri: str,
    entry_point: str = "main",
    version: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    docker_args: Mapping[str, str | bool] | None = None,
    experiment_name: str | None = None,
    experiment_id: str | int | None = None,
    backend: str | Backend = "local",
    backend_config: Mapping[str, Any] | str | None = None,
    storage_dir: str | Path | None = None,
    synchronous: bool = True,
    run_id: str | None = None,
    run_name: str | None = None,
    env_manager: str | None = None,
    build_image: bool = False,
    docker_auth: Mapping[str, str] | None = None,
    *,
    detach: bool = False,
) -> SubmittedRun:
    """Run an MLflow project on the default runner of the running event loop.

    Same arguments, return value, errors and cancellation behaviour as
    :meth:`Runner.run` (and as ``mlflow.projects.run``). Concurrent calls share one
    runner, so they share its caches and clients.
    """
    runner = await default_runner()
    return await runner.run(
        uri,
        entry_point=entry_point,
        version=version,
        parameters=parameters,
        docker_args=docker_args,
        experiment_name=experiment_name,
        experiment_id=experiment_id,
        backend=backend,
        backend_config=backend_config,
        storage_dir=storage_dir,
        synchronous=synchronous,
        run_id=run_id,
        run_name=run_name,
        env_manager=env_manager,
        build_image=build_image,
        docker_auth=docker_auth,
        detach=detach,
    )
