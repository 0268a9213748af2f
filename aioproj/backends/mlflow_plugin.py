"""MLflow's own backend plugins (mlflow-slurm, mlflow-yarn, Azure ML...) as aioproj backends.

MLflow finds third-party backends in the ``mlflow.project_backend`` entry-point group and
calls them synchronously: ``plugin.run(project_uri, entry_point, params, version,
backend_config, tracking_uri, experiment_id)`` fetches the project, creates the tracking
run (with MLflow's helpers) and returns an ``mlflow.projects.SubmittedRun``. Here that
call runs in a worker thread when the run starts, and the ``SubmittedRun`` it returns is
followed through an :class:`~aioproj.backends.base.Execution` whose ``wait``,
``get_status`` and ``cancel`` run in threads of their own, so a plugin that blocks for
hours never holds the event loop or anyio's shared worker threads.

As in ``mlflow.projects._run``: the plugin receives the backend config with MLflow's keys
added (``ENV_MANAGER``, ``SYNCHRONOUS``, ``DOCKER_ARGS``, ``STORAGE_DIR``,
``build_image``, ``docker_auth``), the run gets the tag ``mlflow.project.backend=<name>``
(and ``mlflow.runName``) once the plugin returns, and ``run_id`` is not passed on (the
plugin creates its run). Unlike MLflow, aioproj has checked the project, entry point and
parameters before the plugin is called, and records the final status itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from aioproj._mlflow_context import call_with_tracking
from aioproj._status import RunStatus
from aioproj.errors import BackendError

from .base import Execution, LaunchRequest, StartRequest

if TYPE_CHECKING:
    from aioproj.tracking.base import TrackingStore

__all__ = ["MlflowPluginBackend", "MlflowPluginExecution", "MlflowPluginLaunch"]

#: MLflow's names for the keys it adds to a plugin's backend config
#: (``mlflow.projects.utils.PROJECT_*``).
_ENV_MANAGER = "ENV_MANAGER"
_SYNCHRONOUS = "SYNCHRONOUS"
_DOCKER_ARGS = "DOCKER_ARGS"
_STORAGE_DIR = "STORAGE_DIR"
_BUILD_IMAGE = "build_image"
_DOCKER_AUTH = "docker_auth"


class MlflowPluginBackend:
    """An MLflow backend plugin, called the way ``mlflow.projects.run`` calls it.

    ``builder`` is what the entry point names (the plugin class or a factory); like
    MLflow, a new plugin object is built for every run.
    """

    def __init__(self, name: str, builder: Callable[[], Any], *, source: str = "") -> None:
        self.name = name
        self._builder = builder
        self._source = source or repr(builder)

    def __repr__(self) -> str:
        return f"MlflowPluginBackend({self.name!r}, {self._source!r})"

    @classmethod
    def from_entry_point(cls, entry_point: EntryPoint) -> MlflowPluginBackend:
        """Load the plugin an ``mlflow.project_backend`` entry point names (blocking).

        Raises BackendError if it cannot be imported.
        """
        try:
            builder = entry_point.load()
        except Exception as exc:
            raise BackendError(
                f"The MLflow backend plugin {entry_point.name!r} ({entry_point.value}) could"
                f" not be loaded: {type(exc).__name__}: {exc}"
            ) from exc
        return cls(entry_point.name, builder, source=entry_point.value)

    async def prepare(self, request: LaunchRequest) -> MlflowPluginLaunch:
        """Build the plugin object and the arguments MLflow would pass it.

        Raises BackendError if the plugin cannot be built or has no ``run`` method.
        Nothing is submitted yet: the plugin runs once the runner asks for the run.
        """
        try:
            plugin = await anyio.to_thread.run_sync(self._builder)
        except Exception as exc:
            raise BackendError(
                f"The MLflow backend plugin {self.name!r} could not be created:"
                f" {type(exc).__name__}: {exc}"
            ) from exc
        if not callable(getattr(plugin, "run", None)):
            raise BackendError(
                f"The MLflow backend plugin {self.name!r} ({self._source}) has no run()"
                " method: it does not implement mlflow.projects.backend.AbstractBackend."
            )
        config: dict[str, Any] = dict(request.backend_config or {})
        config.update(
            {
                _ENV_MANAGER: request.env_manager,
                _SYNCHRONOUS: request.synchronous,
                _DOCKER_ARGS: dict(request.docker_args) or None,
                _STORAGE_DIR: str(request.storage_dir) if request.storage_dir else None,
                _BUILD_IMAGE: request.build_image,
                _DOCKER_AUTH: request.docker_auth,
            }
        )
        return MlflowPluginLaunch(
            name=self.name,
            plugin=plugin,
            uri=request.source.uri,
            entry_point=request.entry_point.name,
            params=dict(request.parameters.logged),
            version=request.version,
            backend_config=config,
        )

    async def aclose(self) -> None:
        """Plugins keep nothing between runs here."""


class MlflowPluginLaunch:
    """A run ready for an MLflow plugin: :meth:`create_run` submits it, :meth:`start`
    follows what the plugin returned."""

    def __init__(
        self,
        *,
        name: str,
        plugin: Any,
        uri: str,
        entry_point: str,
        params: dict[str, str],
        version: str | None,
        backend_config: dict[str, Any],
    ) -> None:
        self._name = name
        self._plugin = plugin
        self._uri = uri
        self._entry_point = entry_point
        self._params = params
        self._version = version
        self._config = backend_config
        self._submitted: Any = None

    def __repr__(self) -> str:  # the URI and the config may hold credentials
        return f"<MlflowPluginLaunch {self._name!r} entry_point={self._entry_point!r}>"

    @property
    def tags(self) -> Mapping[str, str]:
        """None of aioproj's: the plugin sets the tags it wants on the run it creates."""
        return {}

    async def create_run(self, experiment_id: str, store: TrackingStore) -> str:
        """Call the plugin's ``run(...)`` in a worker thread; return the run id it created.

        The plugin creates the run with MLflow's client, so for the duration of the call
        MLflow's tracking URI (and the variables the store's child processes get, such as
        ``MLFLOW_ALLOW_FILE_STORE``) are those of ``store``. Cancellation waits for the
        call to return (the runner starts runs under a shield).

        Raises BackendError if the plugin raises or returns no run id.
        """
        env = store.child_env()
        uri = env.get("MLFLOW_TRACKING_URI", store.uri)
        call = functools.partial(
            self._plugin.run,
            self._uri,
            self._entry_point,
            self._params,
            self._version,
            self._config,
            uri,
            experiment_id,
        )
        try:
            self._submitted = await anyio.to_thread.run_sync(call_with_tracking, uri, env, call)
        except Exception as exc:
            raise BackendError(
                f"The MLflow backend plugin {self._name!r} could not submit the run:"
                f" {type(exc).__name__}: {exc}"
            ) from exc
        run_id = getattr(self._submitted, "run_id", None)
        if not isinstance(run_id, str) or not run_id:
            raise BackendError(
                f"The MLflow backend plugin {self._name!r} returned {self._submitted!r},"
                " which has no run_id: run() must return an mlflow.projects.SubmittedRun."
            )
        return run_id

    async def start(self, request: StartRequest) -> Execution:
        """Follow the run the plugin submitted (submitting it now if not done yet)."""
        if self._submitted is None:
            raise BackendError(
                f"The run for the MLflow backend plugin {self._name!r} was not submitted:"
                " the runner calls create_run() before start()."
            )
        request.output.feed(
            f"=== Run {request.run_id} was submitted by the MLflow backend plugin"
            f" {self._name!r}; its output goes where the plugin sends it ===\n".encode()
        )
        return MlflowPluginExecution(self._submitted, close_output=request.output.close)


class MlflowPluginExecution:
    """A plugin's ``SubmittedRun`` as an aioproj :class:`Execution`.

    Its blocking ``wait()``, ``get_status()`` and ``cancel()`` run in worker threads
    limited per run (never in anyio's shared pool, which a long ``wait()`` would hold).
    A cancelled :meth:`wait` leaves its thread to return on its own once the run stops.
    """

    #: MLflow's ``SubmittedRun.cancel()`` "waits for it to terminate".
    waits_for_stop = True

    def __init__(self, submitted: Any, *, close_output: Callable[[], None]) -> None:
        self._submitted = submitted
        self._close_output = close_output
        self._status = RunStatus.RUNNING
        self._cancelled = False
        self._stopped = False
        # wait() and cancel() may block at the same time, and each once.
        self._threads = anyio.CapacityLimiter(2)

    def status(self) -> RunStatus:
        return self._status

    async def wait(self) -> RunStatus:
        """Wait for the plugin's run; FINISHED when its ``wait()`` says it succeeded."""
        try:
            ok = await anyio.to_thread.run_sync(
                self._submitted.wait, abandon_on_cancel=True, limiter=self._threads
            )
            if self._cancelled:
                self._status = RunStatus.KILLED
            elif ok:
                self._status = RunStatus.FINISHED
            else:
                killed = await self._reported_status() is RunStatus.KILLED
                self._status = RunStatus.KILLED if killed else RunStatus.FAILED
        finally:
            self._close_output()
        return self._status

    async def cancel(self) -> None:
        """Call the plugin's ``cancel()`` once; it returns when the run has stopped."""
        if self._stopped or self._status.is_terminal:
            return
        self._stopped = True
        self._cancelled = True
        await anyio.to_thread.run_sync(self._submitted.cancel, limiter=self._threads)
        self._status = RunStatus.KILLED

    async def _reported_status(self) -> RunStatus | None:
        """What the plugin's ``get_status()`` says (a name or MLflow's int), if it can."""
        try:
            raw = await anyio.to_thread.run_sync(self._submitted.get_status, limiter=self._threads)
        except Exception:
            return None
        if isinstance(raw, int) and not isinstance(raw, bool):
            names = {1: "RUNNING", 2: "SCHEDULED", 3: "FINISHED", 4: "FAILED", 5: "KILLED"}
            raw = names.get(raw)
        try:
            return RunStatus(str(raw).upper())
        except ValueError:
            return None
