"""The small interface every backend implements.

A backend turns a validated :class:`LaunchRequest` into a :class:`Launch` (everything that
can fail before a tracking run exists: config checks, environment preparation, image
builds), and a launch into a running :class:`Execution` once the run is tracked. The
runner owns everything around it: sources, project validation, tracking, the handle.

Two optional capabilities, looked up by name:

- a backend with ``downloads_path_parameters = True`` has ``path`` parameters given as
  URIs downloaded for it while its ``prepare`` runs (MLflow's ``storage_dir``); its
  launch's ``with_parameters(parameters)`` then returns the launch running the command
  with the local paths (the local backend);
- a launch with ``async create_run(experiment_id, store) -> run_id`` creates the tracking
  run itself; the runner records into that run instead of creating one (MLflow backend
  plugins, see :mod:`aioproj.backends.mlflow_plugin`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from aioproj._output import RunOutput
    from aioproj._status import RunStatus
    from aioproj.project import EntryPoint, Project, ResolvedParameters
    from aioproj.sources import FetchedProject

__all__ = ["Backend", "Execution", "Launch", "LaunchRequest", "StartRequest"]


@dataclass(frozen=True)
class LaunchRequest:
    """What a backend needs to prepare a run: the project, resolved, before tracking."""

    source: FetchedProject
    project: Project
    entry_point: EntryPoint
    parameters: ResolvedParameters
    #: As the user gave it (a ``.json`` file or JSON string loaded); None when not given,
    #: which MLflow tells apart from ``{}`` (Databricks requires one). May hold tokens.
    backend_config: Mapping[str, Any] | None = field(repr=False)
    env_manager: str | None
    docker_args: Mapping[str, str | bool]
    storage_dir: Path | None
    build_image: bool
    docker_auth: Mapping[str, str] | None = field(repr=False)  # holds a password
    env_cache_dir: Path
    #: Where the run will be tracked (the resolved URI): docker runs mount a local store.
    #: Not in the repr: a database or server URI can carry credentials.
    tracking_uri: str = field(default="", repr=False)
    #: The ``version`` argument as given (MLflow backend plugins fetch the project again).
    version: str | None = None
    #: Whether the caller waits for the run (MLflow hands this to its backend plugins).
    synchronous: bool = True


@dataclass(frozen=True)
class StartRequest:
    """What a prepared launch needs to start: the tracked run it belongs to."""

    run_id: str
    experiment_id: str
    #: Environment variables the run's code needs to log into its run (MLFLOW_RUN_ID, ...).
    tracking_env: Mapping[str, str]
    output: RunOutput
    grace_period: float = 10.0
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The value of ``AIOPROJ_RUN_MARK`` for every local process of the run, so that
    #: ``aioproj recover`` finds them if the driver dies (see :mod:`aioproj._marks`).
    process_mark: str | None = None
    #: Wraps a local run's shell command so that the shell records the command's exit
    #: code and end time in the run journal (see :func:`aioproj.journal.record_exit`).
    record_exit: Callable[[str], str] | None = None


@runtime_checkable
class Execution(Protocol):
    """A run on its backend, as the handle sees it."""

    #: True when :meth:`cancel` returns only once the run has stopped (local processes);
    #: False when it returns as soon as the backend has accepted the request (remote).
    waits_for_stop: bool

    async def wait(self) -> RunStatus:
        """Follow the run to its end and return FINISHED, FAILED or KILLED.

        Called once, by the runner's supervising task. Feeds output to the run's
        :class:`~aioproj._output.RunOutput` and closes it at the end.
        """
        ...

    def status(self) -> RunStatus:
        """The latest known status, without I/O."""
        ...

    async def cancel(self) -> None:
        """Stop the run. Idempotent; safe while or after :meth:`wait` runs or was cancelled."""
        ...


@runtime_checkable
class Launch(Protocol):
    """A run prepared by a backend, ready to start once it is tracked."""

    @property
    def tags(self) -> Mapping[str, str]:
        """Tags the run is created with (``mlflow.project.env``, ``mlflow.docker.image.uri``)."""
        ...

    async def start(self, request: StartRequest) -> Execution:
        """Start the run. Raises :class:`~aioproj.BackendError` if the backend refuses it."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A place where runs execute: local processes, Databricks, Kubernetes, plugins."""

    #: The value of the ``mlflow.project.backend`` tag.
    name: str

    async def prepare(self, request: LaunchRequest) -> Launch:
        """Validate ``request`` for this backend and prepare what the run needs.

        Raises an :class:`~aioproj.ExecutionError` subclass; nothing is tracked yet.
        """
        ...

    async def aclose(self) -> None:
        """Release shared resources (clients, watches, pollers)."""
        ...
