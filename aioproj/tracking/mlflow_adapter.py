"""Any other MLflow store (``sqlite:``, ``postgresql:``, ``mysql:``, ``mssql:``, plugins)
through ``mlflow.tracking.MlflowClient``, in worker threads.

mlflow is imported on first use, in a worker thread (the import is slow and reads many
files); without it the first call raises :class:`~aioproj.errors.InvalidArgumentError`
naming the extra to install. Each public call is one thread hop; the client itself is
created once per store and shared by the threads (MLflow's SQL stores are thread-safe).
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from aioproj._redact import redact_text, redact_url
from aioproj.errors import InvalidArgumentError, TrackingError
from aioproj.tracking.base import (
    CLIENT_KEY_TAG,
    PARENT_RUN_TAG,
    RUN_NAME_TAG,
    TERMINAL_STATUSES,
    RunRecord,
    check_params,
    check_run_id,
    check_tags,
    choose_experiment,
    named_run_tags,
)
from aioproj.tracking.metrics import Metric, MetricCursor, read_new_via_history

__all__ = ["MlflowStore"]

_T = TypeVar("_T")
_EXTRA_HINT = "pip install 'aioproj[mlflow]'"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _normalise_uri(uri: str) -> str:
    """``sqlite:///relative.db`` made absolute, so a child in another directory finds it."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme.lower() == "sqlite" and parsed.netloc == "" and parsed.path.startswith("/"):
        rel = parsed.path[1:]
        if rel and rel != ":memory:" and not rel.startswith("/"):
            absolute = os.path.abspath(rel)
            query = f"?{parsed.query}" if parsed.query else ""
            return f"{parsed.scheme}:///{absolute}{query}"
    return uri


def _check_key(client_key: str) -> None:
    if not re.fullmatch(r"[0-9a-f]{32}", client_key):
        raise InvalidArgumentError(f"Invalid client key {client_key!r}.")


def _check_artifact_path(artifact_path: str) -> str:
    norm = artifact_path.replace("\\", "/")
    parts = [part for part in norm.split("/") if part not in ("", ".")]
    if not parts or norm.startswith("/") or norm.endswith("/") or ".." in parts:
        raise InvalidArgumentError(
            f"Invalid artifact path {artifact_path!r}: it must be a relative file path"
            " without '..'."
        )
    return "/".join(parts)


class _Sync:
    """The blocking half: every method runs whole in one worker thread."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            try:
                from mlflow.tracking import MlflowClient
            except ImportError as exc:
                raise InvalidArgumentError(
                    f"Tracking URI {redact_url(self.uri)!r} needs the mlflow client, which is not"
                    f" installed: {_EXTRA_HINT}"
                ) from exc
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def experiment_by_id(self, experiment_id: str) -> str:
        experiment = self.client().get_experiment(experiment_id)
        if experiment.lifecycle_stage != "active":
            raise TrackingError(f"Experiment with id {experiment_id} is deleted.")
        return experiment_id

    def experiment_named(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        client = self.client()
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return str(client.create_experiment(name))
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            raise TrackingError(
                f"Experiment {name!r} exists in deleted state; restore it or delete it"
                " permanently to use the name again."
            )
        return str(experiment.experiment_id)

    def create_run(
        self,
        experiment_id: str,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, str],
        start_time_ms: int,
        client_key: str | None,
    ) -> RunRecord:
        from mlflow.entities import Param

        client = self.client()
        try:
            run = client.create_run(
                experiment_id, start_time=start_time_ms, tags=dict(tags), run_name=run_name
            )
        except Exception:
            # The database may have committed the run before the error (a dropped
            # connection): use it rather than leave it RUNNING next to a retry's.
            found = self._find(experiment_id, client_key) if client_key else None
            if found is None:
                raise
            run = found
        run_id = run.info.run_id
        try:
            if params:
                client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                client.set_terminated(run_id, "FAILED")
            raise
        return _record(run.info, dict(tags), dict(params))

    def _find(self, experiment_id: str, client_key: str) -> Any:
        runs = self.client().search_runs(
            [experiment_id],
            filter_string=f"tags.`{CLIENT_KEY_TAG}` = '{client_key}'",
            run_view_type=3,  # ViewType.ALL
            max_results=1,
        )
        return runs[0] if runs else None

    def find_run(self, experiment_id: str, client_key: str) -> str | None:
        found = self._find(experiment_id, client_key)
        return None if found is None else str(found.info.run_id)

    def get_run(self, run_id: str) -> RunRecord:
        run = self.client().get_run(run_id)
        return _record(run.info, dict(run.data.tags), dict(run.data.params))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        client = self.client()
        if len(tags) == 1:
            ((key, value),) = tags.items()
            client.set_tag(run_id, key, value)
        else:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def latest_metrics(self, cursors: Sequence[MetricCursor]) -> dict[str, list[Metric]]:
        ids = ", ".join(f"'{c.run_id}'" for c in cursors)
        runs = self.client().search_runs(
            sorted({c.experiment_id for c in cursors}),
            filter_string=f"attributes.run_id IN ({ids})",
            run_view_type=3,  # ViewType.ALL
            max_results=len(cursors),
        )
        # RunData keeps the Metric objects (with timestamp and step) behind its dict view.
        return {
            run.info.run_id: [
                Metric(m.key, float(m.value), int(m.timestamp), int(m.step))
                for m in getattr(run.data, "_metric_objs", ())
            ]
            for run in runs
        }

    def metric_history(self, run_id: str, key: str) -> list[Metric]:
        return [
            Metric(m.key, float(m.value), int(m.timestamp), int(m.step))
            for m in self.client().get_metric_history(run_id, key)
        ]

    def set_terminated(self, run_id: str, status: str, end_time_ms: int) -> None:
        self.client().set_terminated(run_id, status, end_time=end_time_ms)

    def search_child_runs(self, experiment_id: str, parent_run_id: str) -> list[RunRecord]:
        found: list[RunRecord] = []
        page_token = None
        while True:
            page = self.client().search_runs(
                [experiment_id],
                filter_string=f"tags.{PARENT_RUN_TAG} = '{parent_run_id}'",
                max_results=1000,
                page_token=page_token,
            )
            found.extend(_record(r.info, dict(r.data.tags), dict(r.data.params)) for r in page)
            page_token = page.token
            if not page_token:
                return found

    def reopen_run(self, run_id: str) -> None:
        self.client().update_run(run_id, status="RUNNING")

    def log_artifact(self, run_id: str, artifact_path: str, data: bytes, append: bool) -> None:
        client = self.client()
        folder, name = posixpath.split(artifact_path)
        with tempfile.TemporaryDirectory(prefix="aioproj-artifact-") as tmp:
            local = Path(tmp, name)
            if append:
                try:
                    old = client.download_artifacts(run_id, artifact_path, tmp)
                    existing = Path(old).read_bytes()
                except Exception:  # no such artifact yet
                    existing = b""
                data = existing + data
            local.write_bytes(data)
            client.log_artifact(run_id, str(local), artifact_path=folder or None)


def _record(info: Any, tags: dict[str, str], params: dict[str, str]) -> RunRecord:
    end = info.end_time
    return RunRecord(
        run_id=str(info.run_id),
        experiment_id=str(info.experiment_id),
        run_name=str(info.run_name or tags.get(RUN_NAME_TAG, "")),
        status=str(info.status),
        start_time_ms=int(info.start_time or 0),
        end_time_ms=None if end is None else int(end),
        artifact_uri=str(info.artifact_uri or ""),
        tags=tags,
        params=params,
    )


class MlflowStore:
    """A :class:`~aioproj.tracking.base.TrackingStore` over ``MlflowClient(uri)``.

    ``sqlite:///relative.db`` is made absolute now (children run in the project's
    directory). Every call runs the client in a worker thread; MLflow's errors become
    :class:`~aioproj.errors.TrackingError` with MLflow's message. Cancelling a call
    stops waiting for it, but the thread finishes the MLflow call (threads cannot be
    interrupted), so the change may still land.

    Raises (on first use):
        InvalidArgumentError: mlflow is not installed (``pip install 'aioproj[mlflow]'``).
    """

    def __init__(self, uri: str) -> None:
        self.uri: str = _normalise_uri(uri)
        self._sync = _Sync(self.uri)
        self._client_lock = anyio.Lock()
        self._name_lock = anyio.Lock()
        self._ready = False

    def __repr__(self) -> str:
        return f"MlflowStore({redact_url(self.uri)!r})"

    async def _call(self, func: Callable[..., _T], *args: Any) -> _T:
        if not self._ready:
            async with self._client_lock:  # one thread imports mlflow and builds the client
                if not self._ready:
                    await self._run(self._sync.client)
                    self._ready = True
        return await self._run(func, *args)

    async def _run(self, func: Callable[..., _T], *args: Any) -> _T:
        try:
            return await anyio.to_thread.run_sync(functools.partial(func, *args))
        except (InvalidArgumentError, TrackingError):
            raise
        except Exception as exc:
            if type(exc).__name__ == "MlflowException" or isinstance(exc, OSError):
                # A database URI carries its password: never show it.
                message = redact_text(f"Tracking store {self.uri}: {exc}", self.uri)
                raise TrackingError(message) from exc
            raise

    async def resolve_experiment(
        self, *, experiment_name: str | None, experiment_id: str | None
    ) -> str:
        """Return the id of the experiment to run in, as the file store does.

        Raises:
            InvalidArgumentError: both arguments given, or MLFLOW_EXPERIMENT_ID
                disagreeing with MLFLOW_EXPERIMENT_NAME, or mlflow missing.
            TrackingError: the id does not exist, the experiment is deleted, or the
                store fails.
        """
        return await choose_experiment(
            experiment_name=experiment_name,
            experiment_id=experiment_id,
            by_id=self._by_id,
            by_name=self._named,
        )

    async def _by_id(self, experiment_id: str) -> str:
        return await self._call(self._sync.experiment_by_id, experiment_id)

    async def _named(self, name: str) -> str:
        if not name:
            raise InvalidArgumentError("Invalid experiment name: ''.")
        async with self._name_lock:
            return await self._call(self._sync.experiment_named, name)

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
        """Create a RUNNING run (``create_run`` with the tags, ``log_batch`` the params).

        With ``client_key`` the run is tagged ``aioproj.clientKey``; if the database
        fails after creating it, the run is found by that tag and used.

        Raises:
            InvalidArgumentError: a bad key, or ``run_name`` disagreeing with an
                ``mlflow.runName`` tag.
            TrackingError: the experiment does not exist, or the store fails (a run
                whose params could not be logged is marked FAILED first).
        """
        all_tags, name = named_run_tags(tags, run_name)
        if client_key is not None:
            _check_key(client_key)
            all_tags[CLIENT_KEY_TAG] = client_key
        checked_params = check_params(params)
        start = _now_ms() if start_time_ms is None else start_time_ms
        return await self._call(
            self._sync.create_run,
            str(experiment_id),
            name,
            all_tags,
            checked_params,
            start,
            client_key,
        )

    async def find_run(self, experiment_id: str, client_key: str) -> str | None:
        """The id of the run tagged ``aioproj.clientKey = client_key``, if any.

        Raises:
            InvalidArgumentError: a malformed key.
            TrackingError: the store fails.
        """
        _check_key(client_key)
        return await self._call(self._sync.find_run, str(experiment_id), client_key)

    async def get_run(self, run_id: str) -> RunRecord:
        """Read a run back; TrackingError if it does not exist."""
        return await self._call(self._sync.get_run, run_id)

    async def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags of a run; InvalidArgumentError for a bad key, TrackingError on failure."""
        checked = check_tags(tags)
        if checked:
            await self._call(self._sync.set_tags, run_id, checked)

    async def set_terminated(
        self, run_id: str, status: str, *, end_time_ms: int | None = None
    ) -> None:
        """Write the final status and end time (now if not given).

        Raises:
            InvalidArgumentError: a status other than FINISHED, FAILED or KILLED.
            TrackingError: no such run, or the store fails.
        """
        if status not in TERMINAL_STATUSES:
            raise InvalidArgumentError(
                f"Invalid final status {status!r}; expected one of {sorted(TERMINAL_STATUSES)}."
            )
        end = _now_ms() if end_time_ms is None else end_time_ms
        await self._call(self._sync.set_terminated, run_id, status, end)

    async def search_child_runs(self, experiment_id: str, parent_run_id: str) -> list[RunRecord]:
        """The active runs of an experiment tagged ``mlflow.parentRunId = parent_run_id``.

        Raises:
            InvalidArgumentError: a malformed run id.
            TrackingError: the store fails.
        """
        check_run_id(parent_run_id)
        return await self._call(self._sync.search_child_runs, str(experiment_id), parent_run_id)

    async def reopen_run(self, run_id: str) -> None:
        """Mark an ended run RUNNING again (``MlflowClient.update_run``).

        Raises:
            TrackingError: no such run, or the store fails.
        """
        await self._call(self._sync.reopen_run, run_id)

    async def read_new_metrics(self, cursors: Sequence[MetricCursor]) -> list[list[Metric]]:
        """Values logged since each cursor: one search per 100 runs for the latest values,
        and a metric's history only when its latest value changed.

        Raises:
            TrackingError: the store cannot be read.
        """
        return await read_new_via_history(
            cursors,
            lambda batch: self._call(self._sync.latest_metrics, batch),
            lambda run_id, key: self._call(self._sync.metric_history, run_id, key),
        )

    async def log_artifact_bytes(
        self, run_id: str, artifact_path: str, data: bytes, *, append: bool = False
    ) -> None:
        """Write ``data`` as an artifact through a temporary file and ``log_artifact``.

        ``append`` downloads the current file first (not atomic against another writer).

        Raises:
            InvalidArgumentError: a malformed artifact path.
            TrackingError: the run or its artifact store fails.
        """
        path = _check_artifact_path(artifact_path)
        await self._call(self._sync.log_artifact, run_id, path, data, append)

    def child_env(self) -> dict[str, str]:
        """MLFLOW_TRACKING_URI (an absolute one for relative sqlite paths)."""
        return {"MLFLOW_TRACKING_URI": self.uri}

    async def aclose(self) -> None:
        """Nothing to release: MlflowClient holds no per-store connections aioproj owns."""
