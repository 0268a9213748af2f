"""FakeDatabricks: a Databricks workspace on 127.0.0.1 for tests, real enough for the SDK."""

from __future__ import annotations

import base64
import collections
import functools
import itertools
import logging
import math
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import anyio
import anyio.abc
from aiohttp import web

from ._api import ApiError, error_response
from ._dbfs import DbfsError, FakeDbfs
from ._jobs import FakeRun, RunScript
from ._jobs_api import JobsApi
from ._mlflow import ARTIFACT_PREFIX, MlflowApi, MlflowApiError

__all__ = ["FakeDatabricks", "Fault"]

logger = logging.getLogger("aioproj.testing.databricks")

_API = re.compile(r"^/api/(2\.[0-2])/(.+)$")
#: How many requests :attr:`FakeDatabricks.request_log` keeps.
REQUEST_LOG_SIZE = 100_000
_DEFAULT_TOKEN = "dapi-aioproj-emulator"
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


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


class FakeDatabricks(JobsApi):
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
            return error_response(
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
                    return error_response(
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
                return error_response(
                    fault.status, code, f"Injected fault: HTTP {fault.status}", headers
                )
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
                raise ApiError(
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
            raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for '{request.method} {path}'")
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except DbfsError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except MlflowApiError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.exception("FakeDatabricks: %s %s failed", request.method, path)
            return error_response(500, "INTERNAL_ERROR", f"{type(exc).__name__}: {exc}")

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
        raise ApiError(
            404, "ENDPOINT_NOT_FOUND", f"No API found for '{request.method} {request.path}'"
        )

    # -- Jobs --------------------------------------------------------------------------

    # -- DBFS --------------------------------------------------------------------------

    # -- Files API (Unity Catalog volumes) ---------------------------------------------

    # -- MLflow ------------------------------------------------------------------------
