"""The MLflow REST API (2.0) over httpx: MLflow tracking servers and Databricks workspaces.

One :class:`RestStore` per tracking URI holds one pooled :class:`httpx.AsyncClient`,
created on first use (certificates and ``~/.databrickscfg`` are read in a worker thread)
and closed by :meth:`RestStore.aclose`; every run of a Runner shares it. At most 8
requests are in flight per store; more wait for a free connection (50 concurrent runs
on a local ``mlflow server`` with sqlite: 201 requests, about 4.7 s wall time).

Requests for one run, create to final status: ``runs/create`` (with every tag while
there are at most 100), ``runs/log-batch`` for the params (skipped when there are none;
more requests only past MLflow's batch limits), the output artifact ``PUT`` through the
server's artifact proxy, and ``runs/update``. The experiment lookup (one
``experiments/get`` or ``experiments/get-by-name``) is shared by runs started together.

Failed requests are retried on 429, 500, 502, 503, 504 and connection errors with
jittered exponential backoff, honouring Retry-After, at most ``max_tries`` attempts and
``max_wait`` seconds of waiting in all. Requests that create something (``runs/create``)
are retried only when the server cannot have acted on them: 429, 503 and failures to
connect. Error messages name the host, the method and URL path, the server's
``error_code`` and message, and never a token or password.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from aioproj._http import backoff_delay, split_uri_credentials
from aioproj.errors import InvalidArgumentError, TrackingError
from aioproj.tracking._rest_artifacts import ARTIFACTS_API, RestArtifacts
from aioproj.tracking._rest_client import (
    MAX_PARAMS_PER_BATCH,
    MAX_TAGS_PER_BATCH,
    RETRY_STATUSES,
    RestError,
    display_host,
    kv_list,
    log_batches,
    metric_of,
)
from aioproj.tracking.base import (
    CLIENT_KEY_TAG,
    PARENT_RUN_TAG,
    RUN_NAME_TAG,
    TERMINAL_STATUSES,
    USER_TAG,
    RunRecord,
    check_params,
    check_tags,
    choose_experiment,
    named_run_tags,
)
from aioproj.tracking.metrics import Metric, MetricCursor, read_new_via_history

__all__ = ["MAX_PARAMS_PER_BATCH", "MAX_TAGS_PER_BATCH", "RestError", "RestStore"]


_HEX_KEY = re.compile(r"[0-9a-f]{32}")
_MAX_EXPERIMENT_NAME_LENGTH = 500


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_artifact_path(artifact_path: str) -> str:
    norm = artifact_path.replace("\\", "/")
    parts = [part for part in norm.split("/") if part not in ("", ".")]
    if not parts or norm.startswith("/") or norm.endswith("/") or ".." in parts:
        raise InvalidArgumentError(
            f"Invalid artifact path {artifact_path!r}: it must be a relative file path"
            " without '..'."
        )
    return "/".join(parts)


def _check_run_id(run_id: str) -> None:
    if not run_id or not all(c.isalnum() or c in "-_" for c in run_id) or len(run_id) > 256:
        raise InvalidArgumentError(f"Invalid run id {run_id!r}.")


def _write_local(path: Path, data: bytes, append: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if append:
        with path.open("ab") as handle:
            handle.write(data)
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RestStore(RestArtifacts):
    """A :class:`~aioproj.tracking.base.TrackingStore` speaking MLflow's REST API.

    ``uri`` is ``http(s)://host[:port][/prefix]``, ``databricks`` or
    ``databricks://profile``. Credentials are resolved on first use (see
    :func:`aioproj.tracking._http.resolve_creds`); a Databricks service principal's OAuth
    access tokens are fetched and refreshed by :class:`aioproj._databricks_auth.OAuthM2M`.
    ``sleep`` waits between retries (tests pass a fake); ``max_tries`` bounds the
    attempts of one request and ``max_wait`` the seconds spent waiting between them.

    Every method raises :class:`~aioproj.errors.TrackingError` (a :class:`RestError`
    when the server answered) when the server cannot be reached or refuses, and
    :class:`~aioproj.errors.InvalidArgumentError` for bad arguments or credentials
    that cannot be found. Cancelling a call abandons the request in flight (its
    connection is dropped); the server may or may not have applied it.

    The HTTP side (client, retries, errors) is :class:`~aioproj.tracking._rest_client.RestClient`;
    DBFS and proxied artifacts are :class:`~aioproj.tracking._rest_artifacts.RestArtifacts`.
    """

    # --- experiments ------------------------------------------------------------------

    async def resolve_experiment(
        self, *, experiment_name: str | None, experiment_id: str | None
    ) -> str:
        """Return the id of the experiment to run in, as the file store does.

        Raises:
            InvalidArgumentError: both arguments given, an empty or too long name, or
                MLFLOW_EXPERIMENT_ID disagreeing with MLFLOW_EXPERIMENT_NAME.
            TrackingError: the id does not exist, the experiment is deleted, or the
                server cannot be reached or refuses.
        """
        return await choose_experiment(
            experiment_name=experiment_name,
            experiment_id=experiment_id,
            by_id=self._experiment_by_id,
            by_name=self._experiment_named,
        )

    async def _experiment_by_id(self, experiment_id: str) -> str:
        try:
            body = await self._call(
                "GET", "experiments/get", params={"experiment_id": experiment_id}
            )
        except RestError as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or exc.status_code == 404:
                raise RestError(
                    f"No experiment with id {experiment_id} in {display_host(self.uri)}: {exc}",
                    status_code=exc.status_code,
                    error_code=exc.error_code,
                ) from None
            raise
        experiment = body.get("experiment") or {}
        if experiment.get("lifecycle_stage", "active") != "active":
            raise TrackingError(f"Experiment with id {experiment_id} is deleted.")
        return experiment_id

    async def _get_by_name(self, name: str) -> str | None:
        try:
            body = await self._call(
                "GET", "experiments/get-by-name", params={"experiment_name": name}
            )
        except RestError as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or exc.status_code == 404:
                return None
            raise
        experiment = body.get("experiment") or {}
        if experiment.get("lifecycle_stage", "active") != "active":
            raise TrackingError(
                f"Experiment {name!r} exists in deleted state; restore it or delete it"
                " permanently to use the name again."
            )
        return str(experiment["experiment_id"])

    async def _experiment_named(self, name: str) -> str:
        if not name or len(name) > _MAX_EXPERIMENT_NAME_LENGTH:
            raise InvalidArgumentError(f"Invalid experiment name: {name[:50]!r}.")
        async with self._name_lock:
            found = await self._get_by_name(name)
            if found is not None:
                return found
            try:
                body = await self._call("POST", "experiments/create", json={"name": name})
            except RestError as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                # Another client created it between our two requests.
                found = await self._get_by_name(name)
                if found is None:
                    raise
                return found
            return str(body["experiment_id"])

    # --- runs -------------------------------------------------------------------------

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
        """Create a RUNNING run with its tags (``runs/create``) and params (``log-batch``).

        With ``client_key`` the run is tagged ``aioproj.clientKey`` and the creation is
        idempotent: when the answer to ``runs/create`` is lost (a dropped connection, a
        proxy's 502), the run is looked up by its key before another create is sent, so
        the server never keeps a ghost run next to the one aioproj uses.

        If the params cannot be logged, the run is marked FAILED (best effort) before the
        error is raised, so no half-made run stays RUNNING.

        Raises:
            InvalidArgumentError: a bad key, or ``run_name`` disagreeing with an
                ``mlflow.runName`` tag.
            TrackingError: the experiment does not exist or is deleted, or the server
                refuses or cannot be reached within the retry budget (then, with a
                ``client_key``, a run created meanwhile is found by ``aioproj recover``).
        """
        all_tags, name = named_run_tags(tags, run_name)
        if client_key is not None:
            all_tags[CLIENT_KEY_TAG] = client_key
        checked_params = check_params(params)
        start = _now_ms() if start_time_ms is None else start_time_ms
        items = list(all_tags.items())
        first = dict(items[:MAX_TAGS_PER_BATCH])
        rest_tags = dict(items[MAX_TAGS_PER_BATCH:])
        body: dict[str, Any] = {
            "experiment_id": str(experiment_id),
            "start_time": start,
            "run_name": name,
            "tags": kv_list(first),
        }
        if USER_TAG in all_tags:
            body["user_id"] = all_tags[USER_TAG]
        info = await self._create_once(body, client_key)
        run_id = str(info.get("run_id") or info.get("run_uuid") or "")
        if not run_id:
            raise TrackingError(f"{display_host(self.uri)}: runs/create returned no run id.")
        try:
            await self._log_batch(run_id, checked_params, rest_tags)
        except BaseException:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(10),
                contextlib.suppress(TrackingError),
            ):
                await self.set_terminated(run_id, "FAILED")
            raise
        record = self._record(info, all_tags, checked_params)
        self._artifact_uris[run_id] = record.artifact_uri
        return record

    async def _create_once(self, body: Mapping[str, Any], client_key: str | None) -> dict[str, Any]:
        """``runs/create`` at most once in effect: the run's ``info``.

        A create that may have reached the server (its answer lost) is followed by a
        search for its key, and sent again only once the search says it is not there.
        """
        experiment_id = str(body["experiment_id"])
        unsure = False
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            failure: TrackingError
            try:
                if unsure:
                    assert client_key is not None
                    found = await self._search_key(experiment_id, client_key)
                    if found is not None:
                        return found
                    unsure = False
                answer = await self._call("POST", "runs/create", json=body, creates=True)
                return dict((answer.get("run") or {}).get("info") or {})
            except RestError as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    raise RestError(
                        f"No experiment with id {experiment_id} in {display_host(self.uri)}: {exc}",
                        status_code=exc.status_code,
                        error_code=exc.error_code,
                    ) from None
                if client_key is None or exc.status_code not in RETRY_STATUSES:
                    raise
                failure = exc
            except TrackingError as exc:
                if client_key is None:
                    raise
                failure = exc
            unsure = True
            delay = backoff_delay(attempt)
            if attempt >= self._max_tries or waited + delay > self._max_wait:
                raise TrackingError(
                    f"{failure} The server may have created the run; `aioproj recover`"
                    " finds it by its key once this process has ended."
                ) from None
            waited += delay
            await self._sleep(delay)

    async def _search_key(self, experiment_id: str, client_key: str) -> dict[str, Any] | None:
        """The ``info`` of the run tagged with ``client_key``, or None."""
        if not _HEX_KEY.fullmatch(client_key):
            raise InvalidArgumentError(f"Invalid client key {client_key!r}.")
        body = await self._call(
            "POST",
            "runs/search",
            json={
                "experiment_ids": [experiment_id],
                "filter": f"tags.`{CLIENT_KEY_TAG}` = '{client_key}'",
                "run_view_type": "ALL",
                "max_results": 1,
            },
        )
        for run in body.get("runs") or []:
            info = run.get("info") or {}
            if info.get("run_id") or info.get("run_uuid"):
                return dict(info)
        return None

    async def find_run(self, experiment_id: str, client_key: str) -> str | None:
        """The id of the run tagged ``aioproj.clientKey = client_key``, if any.

        Raises:
            InvalidArgumentError: a malformed key.
            TrackingError: the server refuses or cannot be reached.
        """
        found = await self._search_key(str(experiment_id), client_key)
        if found is None:
            return None
        return str(found.get("run_id") or found.get("run_uuid"))

    async def _log_batch(
        self, run_id: str, params: Mapping[str, str], tags: Mapping[str, str]
    ) -> None:
        for batch_params, batch_tags in log_batches(params, tags):
            await self._call(
                "POST",
                "runs/log-batch",
                json={
                    "run_id": run_id,
                    "params": kv_list(batch_params),
                    "tags": kv_list(batch_tags),
                    "metrics": [],
                },
            )

    def _record(
        self, info: Mapping[str, Any], tags: Mapping[str, str], params: Mapping[str, str]
    ) -> RunRecord:
        end = info.get("end_time")
        return RunRecord(
            run_id=str(info.get("run_id") or info.get("run_uuid")),
            experiment_id=str(info.get("experiment_id")),
            run_name=str(info.get("run_name") or tags.get(RUN_NAME_TAG, "")),
            status=str(info.get("status") or "RUNNING"),
            start_time_ms=int(info.get("start_time") or 0),
            end_time_ms=None if end in (None, "", 0, "0") else int(end),
            artifact_uri=str(info.get("artifact_uri") or ""),
            tags=dict(tags),
            params=dict(params),
        )

    async def get_run(self, run_id: str) -> RunRecord:
        """Read a run back (``runs/get``).

        Raises:
            InvalidArgumentError: a malformed run id.
            TrackingError: no such run, or the server refuses or cannot be reached.
        """
        _check_run_id(run_id)
        try:
            body = await self._call("GET", "runs/get", params={"run_id": run_id})
        except RestError as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or exc.status_code == 404:
                raise RestError(
                    f"Run '{run_id}' not found in {display_host(self.uri)}: {exc}",
                    status_code=exc.status_code,
                    error_code=exc.error_code,
                ) from None
            raise
        record = self._run_record(body.get("run") or {})
        self._artifact_uris[run_id] = record.artifact_uri
        return record

    def _run_record(self, run: Mapping[str, Any]) -> RunRecord:
        """A run as ``runs/get`` and ``runs/search`` give it."""
        data = run.get("data") or {}
        tags = {str(t["key"]): str(t.get("value", "")) for t in data.get("tags") or []}
        params = {str(p["key"]): str(p.get("value", "")) for p in data.get("params") or []}
        return self._record(run.get("info") or {}, tags, params)

    async def search_child_runs(self, experiment_id: str, parent_run_id: str) -> list[RunRecord]:
        """The active runs of an experiment tagged ``mlflow.parentRunId = parent_run_id``:
        ``runs/search`` pages of 1,000.

        Raises:
            InvalidArgumentError: a malformed run id.
            TrackingError: the server refuses or cannot be reached.
        """
        _check_run_id(parent_run_id)
        found: list[RunRecord] = []
        page_token = ""
        while True:
            query: dict[str, Any] = {
                "experiment_ids": [str(experiment_id)],
                "filter": f"tags.{PARENT_RUN_TAG} = '{parent_run_id}'",
                "run_view_type": "ACTIVE_ONLY",
                "max_results": 1000,
            }
            if page_token:
                query["page_token"] = page_token
            body = await self._call("POST", "runs/search", json=query)
            records = (self._run_record(run) for run in body.get("runs") or [])
            # A server that ignores the filter must not hand us other runs.
            found.extend(r for r in records if r.tags.get(PARENT_RUN_TAG) == parent_run_id)
            page_token = str(body.get("next_page_token") or "")
            if not page_token:
                return found

    async def reopen_run(self, run_id: str) -> None:
        """Mark an ended run RUNNING again (``runs/update``; the end time stays until the
        next :meth:`set_terminated`).

        Raises:
            InvalidArgumentError: a malformed run id.
            TrackingError: no such run, or the server refuses or cannot be reached.
        """
        _check_run_id(run_id)
        await self._call("POST", "runs/update", json={"run_id": run_id, "status": "RUNNING"})

    async def read_new_metrics(self, cursors: Sequence[MetricCursor]) -> list[list[Metric]]:
        """Values logged since each cursor: one ``runs/search`` per 100 runs for the latest
        values, and ``metrics/get-history`` only for metrics whose latest value changed.

        Raises:
            TrackingError: the server refuses or cannot be reached.
        """
        return await read_new_via_history(cursors, self._latest_metrics, self._metric_history)

    async def _latest_metrics(self, cursors: Sequence[MetricCursor]) -> dict[str, list[Metric]]:
        ids = ", ".join(f"'{c.run_id}'" for c in cursors)
        body = await self._call(
            "POST",
            "runs/search",
            json={
                "experiment_ids": sorted({c.experiment_id for c in cursors}),
                "filter": f"attributes.run_id IN ({ids})",
                "run_view_type": "ALL",
                "max_results": len(cursors),
            },
        )
        out: dict[str, list[Metric]] = {}
        for run in body.get("runs") or []:
            run_id = str((run.get("info") or {}).get("run_id", ""))
            metrics = (run.get("data") or {}).get("metrics") or []
            out[run_id] = [metric_of(m) for m in metrics]
        return out

    async def _metric_history(self, run_id: str, key: str) -> list[Metric]:
        out: list[Metric] = []
        page_token = ""
        while True:
            params = {"run_id": run_id, "metric_key": key, "max_results": "25000"}
            if page_token:
                params["page_token"] = page_token
            body = await self._call("GET", "metrics/get-history", params=params)
            out.extend(metric_of(m) for m in body.get("metrics") or [])
            page_token = str(body.get("next_page_token") or "")
            if not page_token:
                return out

    async def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags: one ``runs/set-tag``, or ``log-batch`` requests for several.

        Raises:
            InvalidArgumentError: a malformed run id or tag key.
            TrackingError: no such run, or the server refuses or cannot be reached.
        """
        _check_run_id(run_id)
        checked = check_tags(tags)
        if len(checked) == 1:
            ((key, value),) = checked.items()
            await self._call(
                "POST", "runs/set-tag", json={"run_id": run_id, "key": key, "value": value}
            )
        elif checked:
            await self._log_batch(run_id, {}, checked)

    async def set_terminated(
        self, run_id: str, status: str, *, end_time_ms: int | None = None
    ) -> None:
        """Write the final status and end time (now if not given) with ``runs/update``.

        Raises:
            InvalidArgumentError: a malformed run id, or a status other than FINISHED,
                FAILED or KILLED.
            TrackingError: no such run, or the server refuses or cannot be reached.
        """
        _check_run_id(run_id)
        if status not in TERMINAL_STATUSES:
            raise InvalidArgumentError(
                f"Invalid final status {status!r}; expected one of {sorted(TERMINAL_STATUSES)}."
            )
        end = _now_ms() if end_time_ms is None else end_time_ms
        await self._call(
            "POST", "runs/update", json={"run_id": run_id, "status": status, "end_time": end}
        )
        self._artifact_uris.pop(run_id, None)  # the run is over: nothing more to write

    # --- artifacts --------------------------------------------------------------------

    async def log_artifact_bytes(
        self, run_id: str, artifact_path: str, data: bytes, *, append: bool = False
    ) -> None:
        """Write ``data`` as the artifact ``artifact_path`` of a run.

        ``mlflow-artifacts:`` locations (``mlflow server`` with artifact serving) are
        written with a PUT through the server's proxy; ``dbfs:`` locations of a
        Databricks workspace with the DBFS API; ``file:`` locations directly, in a
        worker thread. ``append`` on the proxy reads the current file and writes it
        back longer (not atomic against another writer).

        Raises:
            InvalidArgumentError: a malformed run id or artifact path.
            TrackingError: the run's artifact store is not one of those (the message
                names it), or writing failed.
        """
        _check_run_id(run_id)
        path = _check_artifact_path(artifact_path)
        artifact_uri = self._artifact_uris.get(run_id)
        if artifact_uri is None:
            artifact_uri = (await self.get_run(run_id)).artifact_uri
        parsed = urllib.parse.urlsplit(artifact_uri)
        scheme = parsed.scheme.lower()
        if scheme == "mlflow-artifacts":
            _client, creds = await self._ensure_client()
            base = creds.host
            if parsed.netloc:
                base = f"{urllib.parse.urlsplit(creds.host).scheme}://{parsed.netloc}"
            prefix = parsed.path.strip("/")
            url_path = f"{ARTIFACTS_API}/{urllib.parse.quote(f'{prefix}/{path}')}"
            if append:
                data = await self._read_proxied(url_path, base) + data
            await self._request("PUT", url_path, content=data, base=base)
            return
        if scheme == "dbfs" and self.uri.lower().startswith("databricks"):
            target = f"/{parsed.path.strip('/')}/{path}"
            if append:
                data = await self._read_dbfs(target) + data
            await self._write_dbfs(target, data)
            return
        if scheme == "file" or (not scheme and artifact_uri.startswith("/")):
            local = Path(urllib.parse.unquote(parsed.path)) / path
            try:
                await anyio.to_thread.run_sync(functools.partial(_write_local, local, data, append))
            except OSError as exc:
                raise TrackingError(
                    f"Run '{run_id}': cannot write artifact {local}: {exc}"
                ) from exc
            return
        raise TrackingError(
            f"Run '{run_id}' stores artifacts at {artifact_uri!r}: aioproj's REST store"
            f" writes artifacts only through an MLflow artifact proxy (mlflow-artifacts:) or"
            f" to local paths (file:); the {scheme or 'unknown'!r} artifact store is not"
            " supported."
        )

    # --- the rest ---------------------------------------------------------------------

    def child_env(self) -> dict[str, str]:
        """MLFLOW_TRACKING_URI; credentials reach the child through the inherited env.

        A user and password in the URI become MLFLOW_TRACKING_USERNAME/PASSWORD (unless
        the environment sets both already), so the child's MLflow never prints them in
        its "View run at" lines.
        """
        uri, credentials = split_uri_credentials(self.uri)
        env = {"MLFLOW_TRACKING_URI": uri}
        if credentials and not all(os.environ.get(name) for name in credentials):
            env.update(credentials)
        return env
