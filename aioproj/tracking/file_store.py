"""The MLflow file store layout (``mlruns/``), written natively by aioproj.

The layout is the one MLflow's own file store reads and writes, so ``mlflow ui`` and
``MlflowClient`` see aioproj's runs, and ``mlflow.start_run()`` in a child process logs
into them::

    <root>/.trash/                              deleted experiments
    <root>/<experiment_id>/meta.yaml            experiment record
    <root>/<experiment_id>/<run_id>/meta.yaml   run record (status as an int)
    <root>/<experiment_id>/<run_id>/{tags,params}/<key>   one file per key, '/' = subdir
    <root>/<experiment_id>/<run_id>/{metrics,artifacts}/

All file work happens in a worker thread, one hop per public call. ``meta.yaml`` files are
written to a temporary file and renamed into place, so readers never see half a record; a
new run's tags and params are written before its ``meta.yaml``.

Experiment creation by name is serialised by an :class:`anyio.Lock` inside a process and
by an advisory lock file (``<root>/.aioproj-experiments.lock``, where ``fcntl`` exists)
across aioproj processes. MLflow itself takes no lock, so an MLflow process creating the
same name at the same moment can still race with aioproj.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import yaml

from aioproj._threads import run_short
from aioproj.errors import InvalidArgumentError, TrackingError
from aioproj.tracking._layout import Layout
from aioproj.tracking.base import (
    TERMINAL_STATUSES,
    RunRecord,
    check_params,
    check_tags,
    choose_experiment,
    named_run_tags,
)
from aioproj.tracking.metrics import Metric, MetricCursor
from aioproj.tracking.mlruns import (
    check_artifact_path,
    check_experiment_folder_id,
    check_experiment_name,
    check_run_folder_id,
    now_ms,
    root_path,
)

__all__ = ["FileStore"]

_T = TypeVar("_T")


class FileStore:
    """A :class:`~aioproj.tracking.base.TrackingStore` over MLflow's ``mlruns`` layout.

    ``root`` is a local path or a ``file:`` URI (a relative one is resolved against the
    current directory now). Nothing is touched until the first call, which creates the
    root, ``.trash`` and the Default experiment ("0") if missing.

    Raises:
        InvalidArgumentError: ``root`` is a URI with another scheme or a remote host.
    """

    def __init__(self, root: str | Path) -> None:
        path = root_path(root)
        self.uri: str = path.as_uri()
        self.root = path
        self._layout = Layout(path, self.uri)
        self._name_lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"FileStore({self.uri!r})"

    async def _call(self, func: Callable[..., _T], *args: Any) -> _T:
        """Run ``func`` in a worker thread; OSError and YAML errors become TrackingError."""
        try:
            return await run_short(functools.partial(func, *args))
        except (OSError, yaml.YAMLError) as exc:
            raise TrackingError(f"File store {self.uri}: {exc}") from exc

    async def resolve_experiment(
        self, *, experiment_name: str | None, experiment_id: str | None
    ) -> str:
        """Return the id of the experiment to run in.

        Raises:
            InvalidArgumentError: both arguments given, a malformed id or name, or
                MLFLOW_EXPERIMENT_ID disagreeing with MLFLOW_EXPERIMENT_NAME.
            TrackingError: the id does not exist, the named experiment is deleted, or the
                store cannot be read or written.
        """
        return await choose_experiment(
            experiment_name=experiment_name,
            experiment_id=experiment_id,
            by_id=self._experiment_by_id,
            by_name=self._experiment_named,
        )

    async def _experiment_by_id(self, experiment_id: str) -> str:
        check_experiment_folder_id(experiment_id)
        await self._call(self._layout.active_experiment, experiment_id)
        return experiment_id

    async def _experiment_named(self, name: str) -> str:
        check_experiment_name(name)
        async with self._name_lock:
            return await self._call(self._layout.experiment_named, name)

    async def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str | None,
        tags: Mapping[str, str],
        params: Mapping[str, str],
        start_time_ms: int | None = None,
        client_key: str | None = None,
    ) -> RunRecord:
        """Create a RUNNING run with all its tags and params, in one thread hop.

        ``mlflow.runName`` is set to ``run_name`` (or a generated name). ``client_key``
        becomes the run id, so creating it again after a crash finds the same run.

        Raises:
            InvalidArgumentError: a bad key, a bad experiment id, or ``run_name``
                disagreeing with an ``mlflow.runName`` tag.
            TrackingError: the experiment does not exist or is deleted, or writing failed.
        """
        check_experiment_folder_id(experiment_id)
        all_tags, name = named_run_tags(tags, run_name)
        start = now_ms() if start_time_ms is None else start_time_ms
        if client_key is not None:
            check_run_folder_id(client_key)
        return await self._call(
            self._layout.create_run,
            experiment_id,
            name,
            all_tags,
            check_params(params),
            start,
            client_key,
        )

    async def find_run(self, experiment_id: str, client_key: str) -> str | None:
        """The run created with ``client_key`` (its id) if it exists in the experiment.

        A run folder left without its ``meta.yaml`` by a process that died creating it is
        removed (readers would take it for a malformed run).

        Raises:
            InvalidArgumentError: a malformed experiment id or key.
            TrackingError: the store cannot be read.
        """
        check_experiment_folder_id(experiment_id)
        check_run_folder_id(client_key)
        return await self._call(self._layout.find_run, experiment_id, client_key)

    async def get_run(self, run_id: str) -> RunRecord:
        """Read a run back.

        Raises:
            InvalidArgumentError: a malformed run id.
            TrackingError: no such run, or its record cannot be read.
        """
        check_run_folder_id(run_id)
        return await self._call(self._layout.get_run, run_id)

    async def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags of a run; ``mlflow.runName`` also renames it.

        Raises:
            InvalidArgumentError: a malformed run id or tag key.
            TrackingError: no such run, the run is deleted, or writing failed.
        """
        check_run_folder_id(run_id)
        checked = check_tags(tags)
        if checked:
            await self._call(self._layout.set_tags, run_id, checked)

    async def set_terminated(
        self, run_id: str, status: str, *, end_time_ms: int | None = None
    ) -> None:
        """Write the final status and end time (now if not given); the last call wins.

        Raises:
            InvalidArgumentError: a malformed run id, or a status other than FINISHED,
                FAILED or KILLED.
            TrackingError: no such run, the run is deleted, or writing failed.
        """
        check_run_folder_id(run_id)
        if status not in TERMINAL_STATUSES:
            raise InvalidArgumentError(
                f"Invalid final status {status!r}; expected one of {sorted(TERMINAL_STATUSES)}."
            )
        end = now_ms() if end_time_ms is None else end_time_ms
        await self._call(self._layout.set_terminated, run_id, status, end)

    async def log_artifact_bytes(
        self, run_id: str, artifact_path: str, data: bytes, *, append: bool = False
    ) -> None:
        """Write ``data`` as the artifact ``artifact_path`` (e.g. ``aioproj/output.log``).

        With ``append`` the bytes are added to the end of the file; otherwise the file is
        replaced atomically.

        Raises:
            InvalidArgumentError: a malformed run id or artifact path.
            TrackingError: no such run, a non-local artifact location, or writing failed.
        """
        check_run_folder_id(run_id)
        path = check_artifact_path(artifact_path)
        await self._call(self._layout.write_artifact, run_id, path, data, append)

    async def read_new_metrics(self, cursors: Sequence[MetricCursor]) -> list[list[Metric]]:
        """Values logged since each cursor, one list per cursor, in one worker-thread hop.

        Raises:
            TrackingError: a run does not exist.
        """
        return await self._call(self._layout.read_new_metrics, cursors)

    async def search_child_runs(self, experiment_id: str, parent_run_id: str) -> list[RunRecord]:
        """The active runs of an experiment whose ``mlflow.parentRunId`` is ``parent_run_id``.

        Raises:
            InvalidArgumentError: a malformed experiment or run id.
            TrackingError: no such experiment, or the store cannot be read.
        """
        check_experiment_folder_id(experiment_id)
        check_run_folder_id(parent_run_id)
        return await self._call(self._layout.search_child_runs, experiment_id, parent_run_id)

    async def reopen_run(self, run_id: str) -> None:
        """Mark an ended run RUNNING again, without an end time.

        Raises:
            InvalidArgumentError: a malformed run id.
            TrackingError: no such run, the run is deleted, or writing failed.
        """
        check_run_folder_id(run_id)
        await self._call(self._layout.reopen_run, run_id)

    def child_env(self) -> dict[str, str]:
        """MLFLOW_TRACKING_URI, and MLFLOW_ALLOW_FILE_STORE which mlflow>=3 needs."""
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_ALLOW_FILE_STORE": "true"}

    async def aclose(self) -> None:
        """Nothing to release: the file store holds no open files between calls."""
