"""FakeDatabricks: a Databricks workspace on 127.0.0.1 for tests, real enough for the SDK."""

from __future__ import annotations

import base64
import collections
import functools
import itertools
import logging
import math
import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
from aiohttp import web

from aioproj.testing._json import JsonBodyError, loads_bounded

from ._dbfs import DbfsError, FakeDbfs
from ._jobs import FakeRun, RunScript, drive, run_process, subprocess_env
from ._mlflow import ARTIFACT_PREFIX, MlflowApi, MlflowApiError

__all__ = ["FakeDatabricks", "Fault"]

logger = logging.getLogger("aioproj.testing.databricks")

_API = re.compile(r"^/api/(2\.[0-2])/(.+)$")
_TASK_TYPES = (
    "spark_python_task",
    "notebook_task",
    "spark_jar_task",
    "spark_submit_task",
    "python_wheel_task",
    "pipeline_task",
    "sql_task",
    "dbt_task",
    "run_job_task",
    "condition_task",
    "for_each_task",
    "shell_command_task",
)
_LIST_LIMIT_MAX = 25
#: How many requests :attr:`FakeDatabricks.request_log` keeps.
REQUEST_LOG_SIZE = 100_000
_DEFAULT_TOKEN = "dapi-aioproj-emulator"
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class _ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error_code": code, "message": message}, status=status, headers=headers
    )


@dataclass
class _Bucket:
    """A token bucket: ``rate`` requests a second, bursts of ``burst``."""

    endpoint: str
    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """0 if a request may pass now, else the seconds until one may."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class Fault:
    """A fault FakeDatabricks injects into the next ``times`` requests matching ``endpoint``.

    ``endpoint`` is matched against ``"<METHOD> <path>"`` with the ``/api/2.x/`` prefix
    removed (``"GET jobs/runs/list"``): a substring (``"jobs/runs/"``), a key ending in
    ``$`` to match only keys ending there (``"GET jobs/runs/get$"``), or ``"*"``.
    ``status`` answers with that HTTP status (429 carries ``Retry-After`` when
    ``retry_after`` is set); ``drop`` closes the connection without an answer before the
    request is handled, ``drop_after`` after it was handled (the client never learns
    the outcome); ``delay`` waits that long first.
    """

    endpoint: str = "*"
    status: int | None = None
    retry_after: str | None = None
    drop: bool = False
    drop_after: bool = False
    delay: float = 0.0
    times: int = 1

    def matches(self, key: str) -> bool:
        if self.endpoint == "*":
            return True
        if self.endpoint.endswith("$"):
            return key.endswith(self.endpoint[:-1]) and self.endpoint[:-1] in key
        return self.endpoint in key


class FakeDatabricks:
    """An emulated Databricks workspace: Jobs API 2.0/2.1/2.2 runs, DBFS, the Files API for
    Unity Catalog volumes, MLflow tracking.

    Use it as an async context manager (``async with FakeDatabricks() as ws:``); ``ws.host``
    and ``ws.token`` are what a client needs (``DATABRICKS_HOST``/``DATABRICKS_TOKEN``).
    Submitted ``spark_python_task`` runs execute for real as local subprocesses with this
    Python. ``script`` is the default :class:`RunScript` of runs; :meth:`script_next`
    queues scripts for the next submits. :meth:`inject` adds faults and
    :meth:`rate_limit` token-bucket limits. ``requests`` counts requests by
    ``"<METHOD> <endpoint>"``.

    ``client_id``/``client_secret`` enable OAuth M2M (``/oidc/v1/token``) with tokens that
    live ``oauth_token_ttl`` seconds. ``workdir`` holds DBFS, the tracking store and the
    runs' working directories (a temporary directory, removed on exit, when not given).

    Leaving the context stops every run still going (its process group is killed) and the
    server; nothing survives it.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        port: int = 0,
        script: RunScript | None = None,
        workdir: str | Path | None = None,
        python: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        oauth_token_ttl: float = 3600.0,
        workspace_id: int = 1234567890123456,
    ) -> None:
        import sys

        self.token = token or _DEFAULT_TOKEN
        self.client_id = client_id
        self.client_secret = client_secret
        self.oauth_token_ttl = oauth_token_ttl
        self.workspace_id = workspace_id
        self.script = script or RunScript()
        self.python = python or sys.executable
        self.runs: dict[int, FakeRun] = {}
        self.requests: collections.Counter[str] = collections.Counter()
        #: The last :data:`REQUEST_LOG_SIZE` authenticated requests as (monotonic time,
        #: "<METHOD> <endpoint>"), in order.
        self.request_log: collections.deque[tuple[float, str]] = collections.deque(
            maxlen=REQUEST_LOG_SIZE
        )
        #: Requests refused with 401 (missing or wrong credentials), by method. They are
        #: not in ``requests``: a flood to unique paths must not grow the emulator.
        self.unauthenticated: collections.Counter[str] = collections.Counter()
        self.faults: list[Fault] = []
        self._buckets: list[_Bucket] = []
        #: Requests refused by a rate limit (429), by endpoint key.
        self.throttled: collections.Counter[str] = collections.Counter()
        self._scripts: collections.deque[RunScript] = collections.deque()
        self._port = port
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._ids = itertools.count(int(time.time()) % 100000 * 1000 + 1001)
        self._job_ids = itertools.count(900000001)
        self._by_token: dict[str, int] = {}
        self._oauth_tokens: dict[str, float] = {}
        self._runner: web.AppRunner | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self.host = ""
        self.workdir = Path()
        self.dbfs: FakeDbfs
        self.mlflow: MlflowApi

    def __repr__(self) -> str:
        return f"FakeDatabricks(host={self.host!r})"

    # -- lifetime ----------------------------------------------------------------------

    async def __aenter__(self) -> FakeDatabricks:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start serving; ``host`` is set when this returns."""
        if self._workdir_arg is None:
            self._tmp = await anyio.to_thread.run_sync(
                functools.partial(tempfile.TemporaryDirectory, prefix="fake-databricks-")
            )
            self.workdir = Path(self._tmp.name)
        else:
            self.workdir = self._workdir_arg
        tracking = self.workdir / "mlruns"
        await anyio.Path(self.workdir / "dbfs").mkdir(parents=True, exist_ok=True)
        await anyio.Path(tracking).mkdir(parents=True, exist_ok=True)
        self.dbfs = FakeDbfs(self.workdir / "dbfs", {ARTIFACT_PREFIX: tracking})
        self.mlflow = MlflowApi(tracking)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        self.port: int = sock.getsockname()[1]
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.host = f"http://127.0.0.1:{self.port}"

    async def aclose(self) -> None:
        """Stop every active run (killing its processes), then the server. Idempotent."""
        for run in self.runs.values():
            if run.active:
                run.cancel_requested.set()
        if self._tg is not None:
            tg, self._tg = self._tg, None
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                for run in self.runs.values():
                    while run.active:
                        await run.changed.wait()
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        with anyio.CancelScope(shield=True):
            if self._runner is not None:
                runner, self._runner = self._runner, None
                await runner.cleanup()
            if self._tmp is not None:
                tmp, self._tmp = self._tmp, None
                await anyio.to_thread.run_sync(tmp.cleanup)

    # -- test controls -----------------------------------------------------------------

    @property
    def tracking_uri(self) -> str:
        """The ``file:`` URI of the tracking store behind the MLflow endpoints."""
        return self.mlflow.root.as_uri()

    def script_next(self, *scripts: RunScript) -> None:
        """Use these scripts, in order, for the next submitted runs."""
        self._scripts.extend(scripts)

    def inject(
        self,
        endpoint: str = "*",
        *,
        status: int | None = None,
        retry_after: str | int | None = None,
        drop: bool = False,
        drop_after: bool = False,
        delay: float = 0.0,
        times: int = 1,
    ) -> Fault:
        """Add a :class:`Fault` for the next ``times`` matching requests; returns it."""
        fault = Fault(
            endpoint,
            status,
            None if retry_after is None else str(retry_after),
            drop,
            drop_after,
            delay,
            times,
        )
        self.faults.append(fault)
        return fault

    def revoke_oauth_tokens(self) -> None:
        """Revoke every OAuth access token issued so far: requests with one get 401."""
        self._oauth_tokens.clear()

    def clear_faults(self) -> None:
        self.faults.clear()
        self._buckets.clear()

    def rate_limit(self, endpoint: str, per_second: float, burst: int | None = None) -> None:
        """Throttle requests matching ``endpoint`` (as :class:`Fault` matches) to
        ``per_second``, allowing bursts of ``burst`` (default: one second's worth). Refused
        requests get 429 ``REQUEST_LIMIT_EXCEEDED`` with ``Retry-After`` in whole seconds,
        as the service does."""
        size = float(burst if burst is not None else max(1.0, per_second))
        self._buckets.append(_Bucket(endpoint, per_second, size, size, time.monotonic()))

    def count(self, endpoint: str) -> int:
        """Requests so far whose key contains ``endpoint`` (``"jobs/runs/get"``...)."""
        return sum(n for key, n in self.requests.items() if endpoint in key)

    def active_runs(self) -> list[FakeRun]:
        return [r for r in self.runs.values() if r.active]

    async def wait_run(self, run_id: int) -> FakeRun:
        """Wait until run ``run_id`` is no longer active; return it."""
        run = self.runs[run_id]
        while run.active:
            await run.changed.wait()
        return run

    # -- HTTP plumbing -----------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        if path == "/.well-known/databricks-config":
            return web.json_response({})  # never faulted: the SDK would retry for minutes
        if not path.startswith("/oidc/") and not self._authorised(request):
            # Before anything is kept per request: unauthenticated floods stay flat.
            self.unauthenticated[request.method if request.method in _METHODS else "*"] += 1
            return _error(
                401,
                "UNAUTHENTICATED",
                "Credential was not sent or was of an unsupported type for this API.",
            )
        match = _API.match(path)
        endpoint = match.group(2) if match else path.lstrip("/")
        key = f"{request.method} {endpoint}"
        self.requests[key] += 1
        self.request_log.append((time.monotonic(), key))
        for bucket in self._buckets:
            if Fault(bucket.endpoint).matches(key):
                wait = bucket.take(time.monotonic())
                if wait > 0:
                    self.throttled[key] += 1
                    return _error(
                        429,
                        "REQUEST_LIMIT_EXCEEDED",
                        f"Too many requests for {endpoint}; the limit is {bucket.rate:g}/s.",
                        {"Retry-After": str(max(1, math.ceil(wait)))},
                    )
        fault = self._take_fault(key)
        if fault is not None:
            if fault.delay:
                await anyio.sleep(fault.delay)
            if fault.drop:
                return self._drop(request)
            if fault.status is not None:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
                code = {
                    429: "REQUEST_LIMIT_EXCEEDED",
                    503: "TEMPORARILY_UNAVAILABLE",
                    500: "INTERNAL_ERROR",
                    502: "BAD_GATEWAY",
                    504: "DEADLINE_EXCEEDED",
                }.get(fault.status, "INTERNAL_ERROR")
                return _error(fault.status, code, f"Injected fault: HTTP {fault.status}", headers)
        response = await handler(request)
        if fault is not None and fault.drop_after:
            return self._drop(request)
        return response

    def _take_fault(self, key: str) -> Fault | None:
        for fault in self.faults:
            if fault.times > 0 and fault.matches(key):
                fault.times -= 1
                if fault.times == 0:
                    self.faults.remove(fault)
                return fault
        return None

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.abort()
        return web.Response(status=500)

    def _authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value:
            return False
        # As bytes: compare_digest refuses str with non-ASCII characters (a 500, not a 401).
        raw = value.encode("utf-8", "surrogateescape")
        if secrets.compare_digest(raw, self.token.encode("utf-8", "surrogateescape")):
            return True
        expiry = self._oauth_tokens.get(value)
        return expiry is not None and expiry > time.monotonic()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        try:
            if path.startswith("/oidc/"):
                return await self._oidc(request)
            match = _API.match(path)
            if match is None:
                raise _ApiError(
                    404, "ENDPOINT_NOT_FOUND", f"No API found for '{request.method} {path}'"
                )
            version, endpoint = match.groups()
            if endpoint.startswith("jobs/"):
                return web.json_response(await self._jobs(request, version, endpoint[5:]))
            if endpoint.startswith("dbfs/"):
                return web.json_response(await self._dbfs(request, endpoint[5:]))
            if endpoint.startswith("fs/files/"):
                return await self._files(request, "/" + endpoint[len("fs/files/") :])
            for prefix in ("mlflow/", "preview/mlflow/"):
                if endpoint.startswith(prefix):
                    return web.json_response(await self._mlflow(request, endpoint[len(prefix) :]))
            raise _ApiError(
                404, "ENDPOINT_NOT_FOUND", f"No API found for '{request.method} {path}'"
            )
        except _ApiError as exc:
            return _error(exc.status, exc.code, exc.message)
        except DbfsError as exc:
            return _error(exc.status, exc.code, exc.message)
        except MlflowApiError as exc:
            return _error(exc.status, exc.code, exc.message)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.exception("FakeDatabricks: %s %s failed", request.method, path)
            return _error(500, "INTERNAL_ERROR", f"{type(exc).__name__}: {exc}")

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        raw = await request.read()  # past client_max_size: 413, as the service answers
        if not raw.strip():
            return {}
        try:
            body = loads_bounded(raw)
        except JsonBodyError as exc:
            raise _ApiError(
                400, "MALFORMED_REQUEST", f"Invalid JSON given in the body of the request: {exc}"
            ) from None
        if not isinstance(body, dict):
            raise _ApiError(400, "MALFORMED_REQUEST", "The request body must be a JSON object")
        return body

    @staticmethod
    def _method(request: web.Request, *allowed: str) -> None:
        if request.method not in allowed:
            raise _ApiError(
                405 if request.method not in ("GET", "POST") else 404,
                "ENDPOINT_NOT_FOUND",
                f"No API found for '{request.method} {request.path}'",
            )

    # -- OAuth M2M ---------------------------------------------------------------------

    async def _oidc(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/oidc/.well-known/oauth-authorization-server":
            return web.json_response(
                {
                    "issuer": f"{self.host}/oidc",
                    "authorization_endpoint": f"{self.host}/oidc/v1/authorize",
                    "token_endpoint": f"{self.host}/oidc/v1/token",
                    "grant_types_supported": ["client_credentials", "authorization_code"],
                }
            )
        if request.path == "/oidc/v1/token" and request.method == "POST":
            header = request.headers.get("Authorization", "")
            form = await request.post()
            client_id = str(form.get("client_id", ""))
            client_secret = str(form.get("client_secret", ""))
            if header.lower().startswith("basic "):
                try:
                    raw = base64.b64decode(header[6:]).decode()
                except (ValueError, UnicodeDecodeError):
                    raw = ""
                client_id, _, client_secret = raw.partition(":")
            if (
                self.client_id is None
                or client_id != self.client_id
                or not secrets.compare_digest(client_secret, self.client_secret or "")
            ):
                return web.json_response(
                    {
                        "error": "invalid_client",
                        "error_description": "Client authentication failed",
                    },
                    status=401,
                )
            if form.get("grant_type") != "client_credentials":
                return web.json_response(
                    {
                        "error": "unsupported_grant_type",
                        "error_description": "Only client_credentials",
                    },
                    status=400,
                )
            access = "emu-oauth-" + secrets.token_urlsafe(24)
            self._oauth_tokens[access] = time.monotonic() + self.oauth_token_ttl
            return web.json_response(
                {
                    "access_token": access,
                    "token_type": "Bearer",
                    "expires_in": int(self.oauth_token_ttl),
                    "scope": str(form.get("scope", "all-apis")),
                }
            )
        raise _ApiError(
            404, "ENDPOINT_NOT_FOUND", f"No API found for '{request.method} {request.path}'"
        )

    # -- Jobs --------------------------------------------------------------------------

    async def _jobs(self, request: web.Request, version: str, endpoint: str) -> dict[str, Any]:
        if endpoint == "runs/submit":
            self._method(request, "POST")
            return self._submit(version, await self._body(request))
        if endpoint == "runs/get":
            self._method(request, "GET")
            run = self._run(request.query.get("run_id"), task_ok=True)
            return run.run_json()
        if endpoint == "runs/list":
            self._method(request, "GET")
            return self._list(request.query)
        if endpoint == "runs/cancel":
            self._method(request, "POST")
            body = await self._body(request)
            run = self._run(body.get("run_id"), task_ok=True)
            if run.active:
                run.cancel_requested.set()
            return {}
        if endpoint == "runs/get-output":
            self._method(request, "GET")
            raw = request.query.get("run_id")
            run = self._run(raw, task_ok=True)
            if version != "2.0" and str(run.run_id) == raw:
                raise _ApiError(
                    400,
                    "INVALID_PARAMETER_VALUE",
                    "Retrieving the output of runs with multiple tasks is not supported. Please"
                    " retrieve the output of each individual task run instead.",
                )
            return run.output_json()
        if endpoint == "runs/delete":
            self._method(request, "POST")
            body = await self._body(request)
            run = self._run(body.get("run_id"))
            if run.active:
                raise _ApiError(400, "INVALID_STATE", "Cannot delete an active run")
            run.deleted = True
            return {}
        raise _ApiError(
            404, "ENDPOINT_NOT_FOUND", f"No API found for '{request.method} {request.path}'"
        )

    def _run(self, raw: object, *, task_ok: bool = False) -> FakeRun:
        try:
            run_id = int(raw)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise _ApiError(
                400, "INVALID_PARAMETER_VALUE", f"Invalid run_id: {raw!r} is not an integer"
            ) from None
        run = self.runs.get(run_id)
        if run is None and task_ok:
            run = next((r for r in self.runs.values() if r.task_run_id == run_id), None)
        if run is None or run.deleted:
            raise _ApiError(400, "INVALID_PARAMETER_VALUE", f"Run {run_id} does not exist")
        return run

    def _submit(self, version: str, body: dict[str, Any]) -> dict[str, Any]:
        token = body.get("idempotency_token")
        if token is not None:
            if not isinstance(token, str) or len(token) > 64:
                raise _ApiError(
                    400,
                    "INVALID_PARAMETER_VALUE",
                    "idempotency_token must be a string of at most 64 characters",
                )
            if token in self._by_token:
                existing = self.runs[self._by_token[token]]
                if existing.deleted:
                    raise _ApiError(
                        400,
                        "INVALID_PARAMETER_VALUE",
                        f"The run with idempotency token {token} was deleted",
                    )
                return {"run_id": existing.run_id}
        run_name = body.get("run_name", "Untitled")
        if not isinstance(run_name, str) or len(run_name.encode()) > 4096:
            raise _ApiError(
                400, "INVALID_PARAMETER_VALUE", "run_name must be a string of at most 4096 bytes"
            )
        tasks = body.get("tasks")
        if version == "2.0" and tasks is None:
            tasks = [
                {
                    "task_key": "task",
                    **{
                        k: v
                        for k, v in body.items()
                        if k not in ("run_name", "idempotency_token", "timeout_seconds")
                    },
                }
            ]
        if not isinstance(tasks, list) or not tasks:
            raise _ApiError(400, "INVALID_PARAMETER_VALUE", "At least one task is required.")
        if len(tasks) > 1:
            raise _ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                "FakeDatabricks runs one task per submit run; got " + str(len(tasks)),
            )
        task = tasks[0]
        if (
            not isinstance(task, dict)
            or not isinstance(task.get("task_key"), str)
            or not task["task_key"]
        ):
            raise _ApiError(
                400, "INVALID_PARAMETER_VALUE", "Task key must be set: tasks[0].task_key"
            )
        kinds = [k for k in _TASK_TYPES if k in task]
        if len(kinds) != 1:
            raise _ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                f"Exactly one task type must be set for task {task['task_key']},"
                f" got {kinds or 'none'}",
            )
        if kinds[0] != "spark_python_task":
            raise _ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                f"FakeDatabricks runs spark_python_task tasks only, not {kinds[0]}",
            )
        spt = task["spark_python_task"]
        if not isinstance(spt, dict) or not isinstance(spt.get("python_file"), str):
            raise _ApiError(
                400, "INVALID_PARAMETER_VALUE", "spark_python_task.python_file is required"
            )
        params = spt.get("parameters", [])
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise _ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                "spark_python_task.parameters must be a list of strings",
            )
        if not any(
            k in task
            for k in ("new_cluster", "existing_cluster_id", "job_cluster_key", "environment_key")
        ):
            raise _ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                "One of job_cluster_key, new_cluster, or existing_cluster_id must be specified.",
            )
        cluster = task.get("new_cluster")
        if cluster is not None and (
            not isinstance(cluster, dict) or "spark_version" not in cluster
        ):
            raise _ApiError(
                400, "INVALID_PARAMETER_VALUE", "Missing required field: new_cluster.spark_version"
            )
        libraries = task.get("libraries", [])
        if not isinstance(libraries, list) or not all(isinstance(lib, dict) for lib in libraries):
            raise _ApiError(400, "INVALID_PARAMETER_VALUE", "libraries must be a list of objects")
        timeout = body.get("timeout_seconds") or task.get("timeout_seconds") or 0
        if not isinstance(timeout, int) or timeout < 0:
            raise _ApiError(
                400, "INVALID_PARAMETER_VALUE", "timeout_seconds must be a non-negative integer"
            )
        run_id = next(self._ids)
        task_run_id = next(self._ids)
        job_id = next(self._job_ids)
        script = self._scripts.popleft() if self._scripts else self.script
        run = FakeRun(
            run_id=run_id,
            task_run_id=task_run_id,
            job_id=job_id,
            run_name=run_name,
            task=dict(task),
            script=script,
            page_url=f"{self.host}/?o={self.workspace_id}#job/{job_id}/run/{run_id}",
            timeout_seconds=timeout,
            idempotency_token=token,
        )
        self.runs[run_id] = run
        if token is not None:
            self._by_token[token] = run_id
        assert self._tg is not None
        self._tg.start_soon(drive, run, self._execute)
        return {"run_id": run_id}

    async def _execute(self, run: FakeRun) -> str:
        python_file = run.task["spark_python_task"]["python_file"]
        script: Path | None
        try:
            if python_file.startswith("/Volumes/"):
                script = self.volume_path(python_file)
            else:
                script = self.dbfs.local(self.dbfs.normalise(python_file))
        except (DbfsError, _ApiError):
            script = None
        env = subprocess_env(
            os.environ,
            {
                "DATABRICKS_HOST": self.host,
                "DATABRICKS_TOKEN": self.token,
                # The emulator's stand-in for the /dbfs FUSE mount of a cluster.
                "AIOPROJ_DBFS_FUSE_ROOT": str(self.dbfs.root),
                # ... and for the /Volumes mount of Unity Catalog volumes.
                "AIOPROJ_VOLUMES_FUSE_ROOT": str(self.workdir / "uc"),
                "DB_IS_DRIVER": "TRUE",
                "DATABRICKS_RUNTIME_VERSION": "15.4",
            },
        )
        cwd = self.workdir / "runs" / str(run.run_id)
        return await run_process(run, python=self.python, script_path=script, cwd=cwd, env=env)

    def _list(self, query: Any) -> dict[str, Any]:
        def flag(name: str) -> bool:
            return str(query.get(name, "false")).lower() in ("true", "1")

        active_only, completed_only = flag("active_only"), flag("completed_only")
        if active_only and completed_only:
            raise _ApiError(
                400, "INVALID_PARAMETER_VALUE", "active_only and completed_only cannot both be true"
            )
        try:
            limit = int(query.get("limit", 20))
            offset = int(query.get("page_token") or query.get("offset") or 0)
            start_from = int(query.get("start_time_from", 0))
            start_to = int(query.get("start_time_to", 0))
        except ValueError:
            raise _ApiError(400, "INVALID_PARAMETER_VALUE", "Invalid list parameters") from None
        if limit == 0:
            limit = _LIST_LIMIT_MAX
        if not 1 <= limit <= _LIST_LIMIT_MAX:
            raise _ApiError(
                400, "INVALID_PARAMETER_VALUE", f"limit must be between 1 and {_LIST_LIMIT_MAX}"
            )
        run_type = query.get("run_type")
        runs = [
            r
            for r in self.runs.values()
            if not r.deleted
            and (not active_only or r.active)
            and (not completed_only or not r.active)
            and (run_type in (None, "SUBMIT_RUN"))
            and (not query.get("job_id") or str(r.job_id) == query.get("job_id"))
            and r.start_time >= start_from
            and (not start_to or r.start_time <= start_to)
        ]
        runs.sort(key=lambda r: (r.end_time or r.start_time, r.run_id), reverse=True)
        page = runs[offset : offset + limit]
        expand = flag("expand_tasks")
        out: dict[str, Any] = {"has_more": offset + limit < len(runs)}
        if page:
            out["runs"] = [r.run_json(with_tasks=expand) for r in page]
        if offset + limit < len(runs):
            out["next_page_token"] = str(offset + limit)
        if offset:
            out["prev_page_token"] = str(max(0, offset - limit))
        return out

    # -- DBFS --------------------------------------------------------------------------

    async def _dbfs(self, request: web.Request, endpoint: str) -> dict[str, Any]:
        dbfs = self.dbfs
        if request.method == "GET":
            query = request.query
            body = await self._body(request) if request.can_read_body else {}
            path = query.get("path", body.get("path"))
            if endpoint == "get-status":
                return await dbfs.get_status(path)
            if endpoint == "list":
                return await dbfs.list(path)
            if endpoint == "read":
                return await dbfs.read(
                    path,
                    query.get("offset", body.get("offset")),
                    query.get("length", body.get("length")),
                )
            raise _ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for 'GET {request.path}'")
        self._method(request, "POST")
        body = await self._body(request)
        if endpoint == "put":
            await dbfs.put(
                body.get("path"), body.get("contents", ""), bool(body.get("overwrite", False))
            )
            return {}
        if endpoint == "create":
            return {
                "handle": await dbfs.create(body.get("path"), bool(body.get("overwrite", False)))
            }
        if endpoint == "add-block":
            await dbfs.add_block(body.get("handle"), body.get("data"))
            return {}
        if endpoint == "close":
            await dbfs.close(body.get("handle"))
            return {}
        if endpoint == "mkdirs":
            await dbfs.mkdirs(body.get("path"))
            return {}
        if endpoint == "delete":
            await dbfs.delete(body.get("path"), bool(body.get("recursive", False)))
            return {}
        if endpoint == "move":
            await dbfs.move(body.get("source_path"), body.get("destination_path"))
            return {}
        raise _ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for 'POST {request.path}'")

    # -- Files API (Unity Catalog volumes) ---------------------------------------------

    def volume_path(self, path: str) -> Path:
        """The local file behind a ``/Volumes/...`` path."""
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if len(parts) < 5 or parts[0] != "Volumes" or ".." in parts:
            raise _ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                f"Invalid path {path}: expected /Volumes/<catalog>/<schema>/<volume>/<file>",
            )
        return self.workdir / "uc" / "/".join(parts)

    async def _files(self, request: web.Request, path: str) -> web.StreamResponse:
        local = anyio.Path(self.volume_path(path))
        missing = _ApiError(404, "NOT_FOUND", f"The file {path} does not exist.")
        if request.method == "PUT":
            overwrite = request.query.get("overwrite", "false").lower() in ("true", "1")
            if await local.exists() and not overwrite:
                raise _ApiError(409, "ALREADY_EXISTS", f"The file {path} already exists.")
            data = await request.read()
            await local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".aioproj-tmp-{secrets.token_hex(6)}")
            await tmp.write_bytes(data)
            await tmp.replace(local)
            return web.Response(status=204)
        if request.method in ("GET", "HEAD"):
            if not await local.is_file():
                if request.method == "HEAD":
                    return web.Response(status=404)
                raise missing
            stat = await local.stat()
            headers = {
                "Content-Type": "application/octet-stream",
                "Last-Modified": time.strftime(
                    "%a, %d %b %Y %H:%M:%S GMT", time.gmtime(stat.st_mtime)
                ),
            }
            if request.method == "HEAD":
                headers["Content-Length"] = str(stat.st_size)
                return web.Response(status=200, headers=headers)
            return web.Response(body=await local.read_bytes(), headers=headers)
        if request.method == "DELETE":
            if not await local.is_file():
                raise missing
            await local.unlink()
            return web.Response(status=204)
        raise _ApiError(
            405, "ENDPOINT_NOT_FOUND", f"No API found for '{request.method} {request.path}'"
        )

    # -- MLflow ------------------------------------------------------------------------

    async def _mlflow(self, request: web.Request, endpoint: str) -> dict[str, Any]:
        api = self.mlflow
        query = request.query
        if request.method == "GET":
            if endpoint == "experiments/get":
                return await api.get_experiment(query.get("experiment_id", ""))
            if endpoint == "experiments/get-by-name":
                return await api.get_experiment_by_name(query.get("experiment_name", ""))
            if endpoint == "runs/get":
                return await api.get_run(query.get("run_id") or query.get("run_uuid") or "")
            if endpoint in ("metrics/get-history", "metrics/get-history-bulk-interval"):
                return await api.metric_history(
                    query.get("run_id", ""), query.get("metric_key", "")
                )
            if endpoint == "experiments/search":
                return await api.search_experiments()
            raise _ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for 'GET {request.path}'")
        self._method(request, "POST")
        body = await self._body(request)
        run_id = str(body.get("run_id") or body.get("run_uuid") or "")
        if endpoint == "experiments/create":
            return await api.create_experiment(body.get("name"))
        if endpoint == "experiments/search":
            return await api.search_experiments()
        if endpoint == "runs/create":
            return await api.create_run(body)
        if endpoint == "runs/update":
            return await api.update_run(body)
        if endpoint == "runs/log-batch":
            return await api.log_batch(
                run_id,
                metrics=body.get("metrics") or [],
                params=body.get("params") or [],
                tags=body.get("tags") or [],
            )
        if endpoint == "runs/log-metric":
            return await api.log_batch(run_id, metrics=[body])
        if endpoint == "runs/log-parameter":
            return await api.log_batch(run_id, params=[body])
        if endpoint == "runs/set-tag":
            return await api.log_batch(run_id, tags=[body])
        if endpoint == "runs/delete-tag":
            return await api.delete_tag(run_id, str(body.get("key", "")))
        if endpoint == "runs/search":
            return await api.search_runs(body)
        if endpoint in ("runs/log-inputs", "runs/log-model", "runs/outputs"):
            await api.get_run(run_id)
            return {}
        raise _ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for 'POST {request.path}'")
