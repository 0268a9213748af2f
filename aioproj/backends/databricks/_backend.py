"""The Databricks backend: MLflow projects as Databricks Jobs runs.

``prepare`` checks what MLflow checks (a backend config, no existing cluster, a tracking
URI the cluster can reach, no docker project), resolves the workspace and builds the
code tarball. ``start`` uploads the tarball and a bootstrap script to DBFS once per
content, submits a ``spark_python_task`` run that unpacks the code and runs the entry
point's command with the run's tracking environment, and tags the MLflow run with the
Databricks run URL. The run is then followed by the workspace's shared poller; when it
ends, its output (``runs/get-output``) goes into ``run.logs()``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from aioproj._databricks_auth import DatabricksAuthError, WorkspaceAuth
from aioproj._databricks_auth import resolve_workspace as _resolve_workspace
from aioproj._paths import process_temp_prefix
from aioproj._shared import SharedCalls
from aioproj._status import RunStatus
from aioproj.backends.base import Execution, LaunchRequest, StartRequest
from aioproj.errors import AioprojError, BackendError, InvalidArgumentError
from aioproj.project import EnvType
from aioproj.tracking import TrackingStore

from ._client import DatabricksClient
from ._code import (
    BOOTSTRAP,
    CodeArchive,
    build_archive,
    dbfs_code_dir,
    exists,
    upload_bytes,
    upload_file,
    upload_volume_bytes,
    upload_volume_file,
    volume_code_dir,
    volume_file_exists,
)
from ._config import (
    DOCKER_UNSUPPORTED,
    ClusterConfig,
    check_backend_config,
    check_tracking_uri,
    parse_backend_config,
)
from ._execution import JOBS_API, DatabricksExecution
from ._poller import Poller, Watch, map_state

__all__ = [
    "DatabricksBackend",
    "DatabricksExecution",
    "DatabricksLaunch",
    "check_backend_config",
    "parse_backend_config",
]

logger = logging.getLogger("aioproj.databricks")

_TASK_KEY = "mlflow_project"

RUN_URL_TAG = "mlflow.databricks.runURL"
SHELL_JOB_RUN_ID_TAG = "mlflow.databricks.shellJobRunID"
SHELL_JOB_ID_TAG = "mlflow.databricks.shellJobID"
WEBAPP_URL_TAG = "mlflow.databricks.webappURL"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


#: How far before the journal's intent a submitted run may start (clock skew).
_RECOVER_SKEW_MS = 10 * 60 * 1000


async def _find_submitted(client: Any, state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The submitted run whose task carries the MLflow run ``state["mlflow_run_id"]``.

    Reads ``runs/list`` (submitted runs that started after the journal's intent, tasks
    expanded), page by page; None if there is none.
    """
    mlflow_run_id = state.get("mlflow_run_id")
    if not isinstance(mlflow_run_id, str):
        return None
    since = max(0, int(state.get("submitted_after") or 0) - _RECOVER_SKEW_MS)
    params = {
        "run_type": "SUBMIT_RUN",
        "start_time_from": str(since),
        "expand_tasks": "true",
        "limit": "25",
    }
    while True:
        page = await client.call("GET", f"{JOBS_API}/runs/list", params=params)
        for run in page.get("runs") or []:
            if any(_task_runs(task, mlflow_run_id) for task in run.get("tasks") or []):
                return dict(run)
        token = page.get("next_page_token")
        if not page.get("has_more") or not token:
            return None
        params = {**params, "page_token": str(token)}


def _task_runs(task: Mapping[str, Any], mlflow_run_id: str) -> bool:
    """True if ``task`` is aioproj's bootstrap running the MLflow run ``mlflow_run_id``."""
    parameters = (task.get("spark_python_task") or {}).get("parameters") or []
    if len(parameters) < 2:
        return False
    try:
        spec = json.loads(parameters[1])
    except (TypeError, ValueError):
        return False
    env = spec.get("env") if isinstance(spec, dict) else None
    return isinstance(env, dict) and env.get("MLFLOW_RUN_ID") == mlflow_run_id


def _location(path: str) -> str:
    """How a task names a file: volumes by their path, DBFS files as ``dbfs:/...``."""
    return path if path.startswith("/Volumes/") else f"dbfs:{path}"


def _names_mlflow(library: Mapping[str, Any]) -> bool:
    pypi = library.get("pypi")
    package = str(pypi.get("package", "")) if isinstance(pypi, Mapping) else ""
    name = package.strip("'\"").split("[")[0].split("=")[0].split("<")[0].split(">")[0]
    return name.strip().lower() in ("mlflow", "mlflow-skinny") or "/mlflow" in package


@functools.cache
def _mlflow_library() -> dict[str, Any]:
    """The pypi library that gives the cluster the local MLflow version, as MLflow does."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        local = version("mlflow")
    except PackageNotFoundError:
        try:
            local = version("mlflow-skinny")
        except PackageNotFoundError:
            return {"pypi": {"package": "mlflow"}}
    if any(tag in local for tag in ("dev", "rc", "+")):
        return {"pypi": {"package": f"mlflow<={local.split('+')[0]}"}}
    return {"pypi": {"package": f"mlflow=={local}"}}


def resolve_workspace(
    uri: str | None = None,
    *,
    host: str | None = None,
    token: str | None = None,
    profile: str | None = None,
) -> WorkspaceAuth:
    """The workspace and credentials for ``uri`` (``databricks[://profile]``), found as
    :func:`aioproj._databricks_auth.resolve_workspace` finds them (the tracking store
    uses the same). Reads the config file: call it in a worker thread.

    Raises:
        BackendError: no host or credentials found, a requested profile does not exist,
            or the config file cannot be read. The message never contains a secret.
    """
    try:
        return _resolve_workspace(uri, host=host, token=token, profile=profile)
    except DatabricksAuthError as exc:
        raise BackendError(str(exc)) from None


class _Workspace:
    """What runs on one workspace share: the client, the poller, the uploaded paths."""

    def __init__(self, auth: WorkspaceAuth, backend: DatabricksBackend) -> None:
        self.client = DatabricksClient(
            auth,
            retry_timeout=backend.retry_timeout,
            timeout=backend.request_timeout,
            sleep=backend._sleep,
        )
        self.poller = Poller(
            self.client,
            min_interval=backend.poll_interval[0],
            max_interval=backend.poll_interval[1],
        )
        self._uploads = SharedCalls()
        self._present: set[str] = set()
        #: DBFS uploads made (not counting files found already there), for tests.
        self.uploads = 0

    async def ensure(
        self,
        path: str,
        upload: Callable[[], Awaitable[None]],
        present: Callable[[DatabricksClient, str], Awaitable[bool]] = exists,
    ) -> None:
        """Make sure ``path`` exists (DBFS, or a volume with ``present``), uploading it at
        most once at a time."""
        if path in self._present:
            return

        async def once() -> None:
            if path in self._present:
                return
            if not await present(self.client, path):
                logger.info("=== Uploading project to DBFS path %s ===", path)
                await upload()
                self.uploads += 1
            else:
                logger.info("=== Project already exists in DBFS ===")
            self._present.add(path)

        await self._uploads.run(path, once)


class DatabricksBackend:
    """Runs projects as Databricks Jobs runs. Construct with no arguments.

    The workspace comes from the tracking URI (``databricks://profile``) or, as for the
    databricks-sdk, from DATABRICKS_HOST/DATABRICKS_TOKEN (or DATABRICKS_CLIENT_ID and
    DATABRICKS_CLIENT_SECRET) and ``~/.databrickscfg``; ``host``, ``token`` and
    ``profile`` override that. ``poll_interval`` is the (shortest, longest) seconds
    between status rounds of the shared poller; ``retry_timeout`` bounds the retries of
    one request and ``request_timeout`` one attempt; ``sleep`` waits between retries
    (tests may pass a fake).

    Raises InvalidArgumentError for a bad ``poll_interval``.
    """

    name = "databricks"

    def __init__(
        self,
        *,
        host: str | None = None,
        token: str | None = None,
        profile: str | None = None,
        poll_interval: tuple[float, float] = (1.0, 30.0),
        retry_timeout: float = 300.0,
        request_timeout: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        low, high = poll_interval
        if not 0 < low <= high:
            raise InvalidArgumentError(
                f"poll_interval must be (shortest, longest) seconds with 0 < shortest <="
                f" longest, got {poll_interval!r}."
            )
        self._host = host
        self._token = token
        self._profile = profile
        self.poll_interval = (float(low), float(high))
        self.retry_timeout = retry_timeout
        self.request_timeout = request_timeout
        self._sleep = sleep
        self._workspaces: dict[tuple[str, str, str], _Workspace] = {}
        self._archives = SharedCalls()
        self._tmp: Path | None = None
        self._tag_stores: dict[str, TrackingStore] = {}

    def __repr__(self) -> str:
        return f"DatabricksBackend(workspaces={[k[0] for k in self._workspaces]!r})"

    def workspace(self, host: str) -> _Workspace | None:
        """The shared state of the workspace at ``host`` (for tests and benchmarks)."""
        return next((w for k, w in self._workspaces.items() if k[0] == host), None)

    async def prepare(self, request: LaunchRequest) -> DatabricksLaunch:
        """Validate the run for Databricks, resolve the workspace, build the code tarball.

        Raises:
            BackendError: a missing or malformed backend config, a local tracking URI, a
                docker project, an env manager other than ``local``, no workspace
                credentials, or a project that cannot be read.
            InvalidArgumentError: ``existing_cluster_id`` in the backend config.

        The first three checks are MLflow's, in its order: a config is given, it has no
        ``existing_cluster_id``, the tracking URI is remote.
        """
        check_backend_config(request.backend_config)
        check_tracking_uri(request.tracking_uri)
        cluster = parse_backend_config(request.backend_config)
        if request.project.env_type is EnvType.DOCKER:
            raise BackendError(DOCKER_UNSUPPORTED)
        if request.env_manager not in (None, "local"):
            raise BackendError(
                f"env_manager={request.env_manager!r} is not supported on Databricks: the"
                " entry point runs with the cluster's Python. Install what it needs with the"
                " backend config's 'libraries' (pypi packages, wheels, requirements files)."
            )
        ws_uri = request.tracking_uri if request.tracking_uri.startswith("databricks") else None
        auth = await anyio.to_thread.run_sync(
            functools.partial(
                resolve_workspace, ws_uri, host=self._host, token=self._token, profile=self._profile
            )
        )
        workspace = self._workspaces.get(auth.key())
        if workspace is None:
            workspace = self._workspaces[auth.key()] = _Workspace(auth, self)
        archive = await self._archive(request.source.directory)
        libraries = list(cluster.libraries)
        if not any(_names_mlflow(lib) for lib in libraries):
            libraries.append(await anyio.to_thread.run_sync(_mlflow_library))
        return DatabricksLaunch(
            backend=self,
            workspace=workspace,
            archive=archive,
            cluster=cluster,
            libraries=tuple(libraries),
            command=request.parameters.command,
            entry_point=request.entry_point.name,
            run_name=cluster.run_name or f"MLflow Run for {request.source.source_name}",
            tracking_uri=request.tracking_uri,
        )

    async def _archive(self, directory: Path) -> CodeArchive:
        # Made once: the runs of a burst that find none share the one being made.
        target = self._tmp
        if target is None:
            target = await self._archives.run("\0temp", self._make_tmp)

        async def build() -> CodeArchive:
            try:
                return await build_archive(directory, target)
            except OSError as exc:
                raise BackendError(
                    f"Could not pack the project {directory} for Databricks: {exc}"
                ) from exc

        return await self._archives.run(str(directory), build)

    async def _make_tmp(self) -> Path:
        # Named for this process: `aioproj recover` removes it if the process is killed.
        made = await anyio.to_thread.run_sync(
            lambda: tempfile.mkdtemp(prefix=process_temp_prefix("databricks"))
        )
        self._tmp = Path(made)
        return self._tmp

    async def _set_tags(self, uri: str, run_id: str, tags: Mapping[str, str]) -> None:
        from aioproj.tracking import open_store

        store = self._tag_stores.get(uri)
        if store is None:
            store = self._tag_stores[uri] = open_store(uri)
        await store.set_tags(run_id, tags)

    async def recover(self, state: Mapping[str, Any]) -> tuple[RunStatus, int | None] | None:
        """The real end of a run whose driver died (see :func:`aioproj.recover`).

        ``state`` is the run's journal entry: the workspace host and
        ``databricks[://profile]`` URI, the Jobs run id once it was known, and the MLflow
        run id (``mlflow_run_id``). A driver that died between the submit and the journal
        write left no Jobs run id: the run is then found among the workspace's recent
        submitted runs by the MLflow run id its task carries. Asks with the credentials
        the backend resolves for that workspace now.

        Returns (FINISHED, FAILED or KILLED, the run's end time in ms) once the run has
        ended, FAILED if it was never submitted, None while it runs. Raises BackendError
        if the workspace cannot be asked (no credentials for that host, or it refuses).
        """
        uri = state.get("uri")
        auth = await anyio.to_thread.run_sync(
            functools.partial(
                resolve_workspace,
                uri if isinstance(uri, str) else None,
                host=self._host or str(state["host"]),
                token=self._token,
                profile=self._profile,
            )
        )
        if auth.host != state["host"]:
            raise BackendError(
                f"The run is on the Databricks workspace {state['host']}, but the"
                f" credentials found are for {auth.host}: set DATABRICKS_HOST and its"
                " credentials for that workspace to recover it."
            )
        workspace = self._workspaces.get(auth.key())
        if workspace is None:
            workspace = self._workspaces[auth.key()] = _Workspace(auth, self)
        client = workspace.client
        if state.get("run_id") is not None:
            run = await client.call(
                "GET", f"{JOBS_API}/runs/get", params={"run_id": str(state["run_id"])}
            )
        else:
            found = await _find_submitted(client, state)
            if found is None:
                return RunStatus.FAILED, None  # never submitted
            run = found
        status, final = map_state(run)
        if not final:
            return None
        return status, int(run.get("end_time") or 0) or None

    async def aclose(self) -> None:
        """Close the workspaces' clients and tracking stores, remove the local tarballs.

        Runs still going on Databricks keep going. Shielded from cancellation.
        """
        with anyio.CancelScope(shield=True):
            try:
                workspaces, self._workspaces = self._workspaces, {}
                for workspace in workspaces.values():
                    await workspace.client.aclose()
                stores, self._tag_stores = self._tag_stores, {}
                for store in stores.values():
                    await store.aclose()
            finally:
                if self._tmp is not None:
                    tmp, self._tmp = self._tmp, None
                    await anyio.to_thread.run_sync(
                        functools.partial(shutil.rmtree, tmp, ignore_errors=True)
                    )


@dataclass(frozen=True)
class DatabricksLaunch:
    """A run ready to be submitted to a workspace."""

    backend: DatabricksBackend
    workspace: _Workspace
    archive: CodeArchive
    cluster: ClusterConfig
    libraries: tuple[Mapping[str, Any], ...]
    command: str
    entry_point: str
    run_name: str
    tracking_uri: str = field(repr=False)  # a server URI can carry credentials

    @property
    def tags(self) -> Mapping[str, str]:
        return {}

    @property
    def journal_state(self) -> dict[str, Any]:
        """What ``aioproj recover`` needs to find the run, written before it is submitted."""
        uri = self.tracking_uri if self.tracking_uri.startswith("databricks") else None
        return {"host": self.workspace.client.host, "uri": uri, "submitted_after": _now_ms()}

    def _cluster_env(self, request: StartRequest) -> dict[str, str]:
        uri = self.tracking_uri
        return {
            "MLFLOW_RUN_ID": request.run_id,
            "MLFLOW_EXPERIMENT_ID": request.experiment_id,
            "MLFLOW_TRACKING_URI": "databricks" if uri.lower().startswith("databricks") else uri,
        }

    def submit_body(
        self, request: StartRequest, code_path: str, bootstrap_path: str
    ) -> dict[str, Any]:
        """The ``runs/submit`` request of this run."""
        spec = {
            "command": self.command,
            "entry_point": self.entry_point,
            "env": self._cluster_env(request),
        }
        task: dict[str, Any] = {
            "task_key": _TASK_KEY,
            "new_cluster": dict(self.cluster.new_cluster),
            "spark_python_task": {
                "python_file": _location(bootstrap_path),
                "parameters": [_location(code_path), json.dumps(spec, sort_keys=True)],
            },
        }
        if self.libraries:
            task["libraries"] = [dict(lib) for lib in self.libraries]
        body: dict[str, Any] = {
            "run_name": self.run_name,
            "tasks": [task],
            # One MLflow run, one Databricks run: a submit repeated after a lost answer
            # (or by a restarted driver for the same MLflow run) returns the same run.
            "idempotency_token": f"aioproj-{request.run_id}"[:64],
        }
        if self.cluster.timeout_seconds:
            body["timeout_seconds"] = self.cluster.timeout_seconds
        return body

    async def start(self, request: StartRequest) -> Execution:
        """Upload the code (once per content), submit the run, tag the MLflow run.

        Raises:
            BackendError: the workspace refused the upload or the submit, or could not be
                reached. If the run was submitted but could not be read back, it is
                cancelled before the error is raised.
        """
        ws = self.workspace
        client = ws.client
        volume = self.cluster.code_volume
        if volume:
            folder = volume_code_dir(volume, request.experiment_id)
        else:
            folder = dbfs_code_dir(request.experiment_id)
        code_path = f"{folder}/{self.archive.sha256}.tar.gz"
        boot = BOOTSTRAP.encode()
        bootstrap_path = f"{folder}/{hashlib.sha256(boot).hexdigest()}.py"
        try:
            if volume:
                await ws.ensure(
                    code_path,
                    functools.partial(upload_volume_file, client, self.archive.path, code_path),
                    volume_file_exists,
                )
                await ws.ensure(
                    bootstrap_path,
                    functools.partial(upload_volume_bytes, client, bootstrap_path, boot),
                    volume_file_exists,
                )
            else:
                await ws.ensure(
                    code_path,
                    functools.partial(upload_file, client, self.archive.path, code_path),
                )
                await ws.ensure(
                    bootstrap_path, functools.partial(upload_bytes, client, bootstrap_path, boot)
                )
        except OSError as exc:
            raise BackendError(
                f"Could not read the project tarball {self.archive.path}: {exc}"
            ) from exc
        logger.info("=== Running entry point %s of project on Databricks ===", self.entry_point)
        answer = await client.call(
            "POST",
            f"{JOBS_API}/runs/submit",
            json=self.submit_body(request, code_path, bootstrap_path),
            repeatable=True,
        )
        try:
            db_run_id = int(answer["run_id"])
        except (KeyError, TypeError, ValueError):
            raise BackendError(
                f"Databricks workspace {client.host}: runs/submit returned no run_id."
            ) from None
        try:
            run = await client.call(
                "GET", f"{JOBS_API}/runs/get", params={"run_id": str(db_run_id)}
            )
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                try:
                    await client.call(
                        "POST",
                        f"{JOBS_API}/runs/cancel",
                        json={"run_id": db_run_id},
                        repeatable=True,
                    )
                except AioprojError as exc:
                    logger.error("Could not cancel Databricks run %s: %s", db_run_id, exc)
            raise
        url = str(run.get("run_page_url") or "")
        tasks = run.get("tasks") or []
        task_run_id = int(tasks[0].get("run_id") or db_run_id) if tasks else db_run_id
        tags = {RUN_URL_TAG: url, SHELL_JOB_RUN_ID_TAG: str(db_run_id), WEBAPP_URL_TAG: client.host}
        if run.get("job_id") is not None:
            tags[SHELL_JOB_ID_TAG] = str(run["job_id"])
        logger.info(
            "=== Launched MLflow run as Databricks job run with ID %s."
            " Check the run's status at %s ===",
            db_run_id,
            url,
        )
        request.output.feed(f"=== Databricks run {db_run_id}: {url} ===\n".encode())
        try:
            await self.backend._set_tags(self.tracking_uri, request.run_id, tags)
        except AioprojError as exc:
            logger.warning("Could not tag run %s with its Databricks run: %s", request.run_id, exc)
        watch = Watch(run_id=db_run_id, start_time_ms=int(run.get("start_time") or 0))
        watch.update(run)
        execution = DatabricksExecution(
            ws.client, ws.poller, watch, task_run_id, request.output.feed, request.output.close
        )
        # What `aioproj recover` needs to ask the workspace if this process dies.
        execution.journal_state = {**self.journal_state, "run_id": db_run_id}
        return execution
