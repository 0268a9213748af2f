"""The Runner: owns what runs share, and turns ``run(...)`` calls into tracked runs.

One direction, no back and forth: fetch the source, validate the project and its
parameters, prepare the backend (environment), create the tracking run, start it, and
hand back a :class:`~aioproj.SubmittedRun`. Everything that can be wrong with the input
fails before a run is tracked.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from aioproj._marks import build_mark, process_mark
from aioproj._output import EchoMode
from aioproj._paths import cache_root
from aioproj._prepare import extra_run_tags
from aioproj._run_args import RunArgs
from aioproj._shared import SharedCalls
from aioproj._start import RunStarting
from aioproj.backends import (
    Backend,
)
from aioproj.envs import validate_env_manager
from aioproj.errors import InvalidArgumentError, RunFailedError
from aioproj.handle import SubmittedRun
from aioproj.journal import Journal
from aioproj.sources import SourceCache
from aioproj.tracking import TrackingStore
from aioproj.tracking.base import check_record
from aioproj.tracking.metrics import MetricsPoller

if TYPE_CHECKING:
    from aioproj.sources.path_params import PathDownloads

__all__ = ["Runner", "extra_run_tags", "run"]

logger = logging.getLogger("aioproj")


class Runner(RunStarting):
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
            args = RunArgs(
                uri=uri,
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
            if detach:
                from aioproj._detach import check_detach, cli_args  # detached runs only

                check_detach(backend, synchronous, docker_auth)
                return await self._run_detached(cli_args(args))
            await self._open_journal()
            # Processes started while preparing (environment builds) carry the driver's
            # mark, so `aioproj recover` stops them if this process dies meanwhile.
            mark = process_mark.set(build_mark(self._journal.id))
            try:
                return await self._run(args)
            finally:
                process_mark.reset(mark)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
                self._idle = anyio.Event()

    async def _run(self, args: RunArgs) -> SubmittedRun:
        """The phases of :meth:`run` once its arguments are checked: prepare (nothing
        tracked yet), wait for a slot, track and start (never interrupted), follow."""
        async with self._starting:
            prepared = await self._prepare(args)
        try:
            held = await self._acquire_slots(prepared.backend)
            async with self._starting:
                handle = await self._start_in_runner(
                    functools.partial(
                        self._track_and_start, prepared, run_id=args.run_id, run_name=args.run_name
                    ),
                    held,
                )
            if prepared.downloads is not None:
                prepared.downloads.keep()  # the run uses them: they stay, as in MLflow
        finally:
            if prepared.downloads is not None:  # removes what no started run uses
                await prepared.downloads.release()
        try:
            if args.synchronous:
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


#: Runs in the preparation phase, and in the start phase, at a time (see Runner._starting).
_STARTING_AT_ONCE = 32


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
