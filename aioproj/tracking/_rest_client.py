"""The HTTP side of the REST store: one pooled client per tracking URI, credentials,
retries with backoff, error messages that name the host and never a secret, and the
shapes of MLflow's messages (batch limits, key/value lists, metrics). See
:mod:`aioproj.tracking.rest`."""

from __future__ import annotations

import math
import os
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.to_thread
import httpx

from aioproj._databricks_auth import DatabricksAuthError, OAuthM2M, WorkspaceAuth
from aioproj._http import backoff_delay, parse_retry_after
from aioproj._redact import scrub
from aioproj.errors import InvalidArgumentError, TrackingError
from aioproj.tracking._http import HostCreds, resolve_creds
from aioproj.tracking.metrics import Metric

__all__ = [
    "API",
    "MAX_ITEMS_PER_BATCH",
    "MAX_PARAMS_PER_BATCH",
    "MAX_TAGS_PER_BATCH",
    "RETRY_STATUSES",
    "RestClient",
    "RestError",
    "Sleep",
    "display_host",
    "kv_list",
    "log_batches",
    "metric_of",
]

API = "/api/2.0/mlflow"


RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_UNSENT_STATUSES = frozenset({429, 503})


# Requests in flight per server. A default `mlflow server` on sqlite has a database pool
# of 5 + 10 connections and answers "QueuePool limit ... reached" beyond it, so many
# concurrent runs queue here instead of overloading the server.
_MAX_CONNECTIONS = 8


Sleep = Callable[[float], Awaitable[None]]


class RestError(TrackingError):
    """A tracking server answered with an error: ``status_code`` and ``error_code`` say which."""

    def __init__(self, message: str, *, status_code: int, error_code: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_code = error_code


def display_host(host: str) -> str:
    """``host`` without any ``user:password@`` part."""
    parsed = urllib.parse.urlsplit(host)
    netloc = parsed.hostname or ""
    if parsed.port is not None:
        netloc = f"{netloc}:{parsed.port}"
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", ""))


def _build_client(creds: HostCreds) -> httpx.AsyncClient:
    """The pooled client (loads CA certificates: call it in a worker thread)."""
    verify: bool | ssl.SSLContext = creds.verify
    if creds.verify and (creds.server_cert_path or creds.client_cert_path):
        ctx = (
            ssl.create_default_context(cafile=creds.server_cert_path)
            if creds.server_cert_path
            else httpx.create_ssl_context()
        )
        if creds.client_cert_path:
            ctx.load_cert_chain(creds.client_cert_path)
        verify = ctx
    headers = {"User-Agent": "aioproj"}
    auth = creds.auth_header()
    if auth is not None:
        headers["Authorization"] = auth
    timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or 120)
    return httpx.AsyncClient(
        headers=headers,
        verify=verify,
        # Waiting for a free connection is not a failure: no pool timeout.
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0), pool=None),
        limits=httpx.Limits(
            max_connections=_MAX_CONNECTIONS, max_keepalive_connections=_MAX_CONNECTIONS
        ),
        trust_env=True,
    )


class RestClient:
    """One pooled HTTP client for a tracking URI: credentials, retries, error messages."""

    def __init__(
        self,
        uri: str,
        *,
        sleep: Sleep | None = None,
        max_tries: int = 5,
        max_wait: float = 60.0,
    ) -> None:
        scheme = "databricks" if uri == "databricks" else urllib.parse.urlsplit(uri).scheme.lower()
        if scheme not in ("http", "https", "databricks"):
            raise InvalidArgumentError(f"The REST store cannot serve the tracking URI {uri!r}.")
        self.uri: str = uri.rstrip("/") if scheme != "databricks" else uri
        self._sleep: Sleep = sleep if sleep is not None else anyio.sleep
        self._max_tries = max(1, max_tries)
        self._max_wait = max_wait
        self._client: httpx.AsyncClient | None = None
        self._creds: HostCreds | None = None
        self._client_lock = anyio.Lock()
        self._name_lock = anyio.Lock()
        self._artifact_uris: dict[str, str] = {}
        #: HTTP requests sent (every attempt counts), for tests and benchmarks.
        self.request_count = 0

    def __repr__(self) -> str:
        return f"RestStore({display_host(self.uri)!r})"

    async def _ensure_client(self) -> tuple[httpx.AsyncClient, HostCreds]:
        async with self._client_lock:
            if self._client is None or self._creds is None:
                creds = await anyio.to_thread.run_sync(resolve_creds, self.uri)
                try:
                    client = await anyio.to_thread.run_sync(_build_client, creds)
                except (OSError, ssl.SSLError) as exc:
                    raise InvalidArgumentError(
                        f"Tracking URI {display_host(creds.host)}: cannot load the TLS"
                        f" certificates: {exc}"
                    ) from exc
                if creds.client_id and creds.client_secret:
                    workspace = WorkspaceAuth(
                        creds.host, client_id=creds.client_id, client_secret=creds.client_secret
                    )
                    client.auth = OAuthM2M(
                        workspace, client, sleep=self._sleep, retry_timeout=self._max_wait
                    )
                self._client, self._creds = client, creds
            return self._client, self._creds

    def _scrub(self, text: str) -> str:
        secrets = self._creds.secrets() if self._creds else ()
        if self._client is not None and isinstance(self._client.auth, OAuthM2M):
            secrets = (*secrets, *self._client.auth.secrets())
        return scrub(text, secrets)

    async def _request(
        self,
        method: str,
        url_path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        creates: bool = False,
        base: str | None = None,
        sink: Callable[[httpx.Response], Awaitable[None]] | None = None,
    ) -> httpx.Response:
        """Send one request with retries; return the successful response.

        With ``sink``, the response is streamed: a successful one is handed to ``sink``
        (which reads the body) before it is returned; a body cut short is retried.

        Raises:
            RestError: the server answered with an error status (after retries).
            TrackingError: the server could not be reached within the retry budget.
        """
        client, creds = await self._ensure_client()
        host = base or creds.host
        url = host + url_path
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            self.request_count += 1
            delay: float | None
            try:
                if sink is None:
                    response = await client.request(
                        method, url, json=json, params=params, content=content
                    )
                else:
                    async with client.stream(method, url, params=params) as response:
                        if response.status_code < 300:
                            await sink(response)
                        else:
                            await response.aread()
            except DatabricksAuthError as exc:
                # The OAuth token source retried within its own budget already.
                raise RestError(
                    self._scrub(f"{method} {url_path}: {exc}"),
                    status_code=exc.status_code,
                    error_code=exc.error_code,
                ) from None
            except httpx.TransportError as exc:
                unsent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
                failure = self._scrub(
                    f"{display_host(host)}: {method} {url_path} failed after {attempt}"
                    f" attempt(s): {type(exc).__name__}: {exc}"
                )
                if creates and not unsent:
                    raise TrackingError(failure) from None
                delay = backoff_delay(attempt)
            else:
                if response.status_code < 300:
                    return response
                await response.aread()
                failure = ""
                if response.status_code not in RETRY_STATUSES or (
                    creates and response.status_code not in _UNSENT_STATUSES
                ):
                    raise self._error(method, url_path, response, host, attempt)
                delay = parse_retry_after(response.headers.get("Retry-After"))
                if delay is None:
                    delay = backoff_delay(attempt)
            if attempt >= self._max_tries or waited + delay > self._max_wait:
                if failure:
                    raise TrackingError(failure) from None
                raise self._error(method, url_path, response, host, attempt)
            waited += delay
            await self._sleep(delay)

    def _error(
        self, method: str, url_path: str, response: httpx.Response, host: str, attempts: int
    ) -> RestError:
        code = ""
        message = ""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            code = str(body.get("error_code") or "")
            message = str(body.get("message") or "")
        if not message:
            message = response.text[:500].strip() or response.reason_phrase
        if not code:
            code = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND"}.get(
                response.status_code, "HTTP_ERROR"
            )
        hint = ""
        if 300 <= response.status_code < 400:
            code = "REDIRECT" if code == "HTTP_ERROR" else code
            location = self._scrub(response.headers.get("Location", "?"))
            hint = f" (the server redirects to {location}: use that as the tracking URI)"
        elif response.status_code == 401:
            hint = (
                " (check MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD,"
                " or the Databricks token)"
            )
        elif response.status_code == 403:
            hint = " (the credentials are valid but not allowed to do this)"
        retried = f" after {attempts} attempts" if attempts > 1 else ""
        text = self._scrub(
            f"{display_host(host)}: {method} {url_path} failed{retried}: HTTP"
            f" {response.status_code} {code}: {message}{hint}"
        )
        return RestError(text, status_code=response.status_code, error_code=code)

    async def _call(
        self,
        method: str,
        endpoint: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        creates: bool = False,
    ) -> dict[str, Any]:
        response = await self._request(
            method, f"{API}/{endpoint}", json=json, params=params, creates=creates
        )
        try:
            body = response.json() if response.content else {}
        except ValueError as exc:
            raise TrackingError(
                f"{display_host(self.uri)}: {method} {API}/{endpoint} returned a body that"
                " is not JSON; is this an MLflow tracking server?"
            ) from exc
        if not isinstance(body, dict):
            raise TrackingError(f"{display_host(self.uri)}: unexpected answer to {endpoint}.")
        return body

    async def aclose(self) -> None:
        """Close the pooled connections; a later call opens a new client.

        Cancellation: the close is shielded, so connections are released regardless.
        """
        client, self._client = self._client, None
        if client is not None:
            with anyio.CancelScope(shield=True):
                await client.aclose()


MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ITEMS_PER_BATCH = 1000
# MLflow refuses log-batch bodies over 1 MB; stay well below.
_MAX_BATCH_BYTES = 900_000


def kv_list(values: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"key": key, "value": value} for key, value in values.items()]


def log_batches(
    params: Mapping[str, str], tags: Mapping[str, str]
) -> list[tuple[dict[str, str], dict[str, str]]]:
    """Split params and tags into log-batch bodies within MLflow's limits."""
    out: list[tuple[dict[str, str], dict[str, str]]] = []
    cur_p: dict[str, str] = {}
    cur_t: dict[str, str] = {}
    size = 0

    def flush() -> None:
        nonlocal cur_p, cur_t, size
        if cur_p or cur_t:
            out.append((cur_p, cur_t))
        cur_p, cur_t, size = {}, {}, 0

    for kind, values in (("p", params), ("t", tags)):
        for key, value in values.items():
            item = len(key.encode()) + len(value.encode()) + 32
            full_kind = (kind == "p" and len(cur_p) >= MAX_PARAMS_PER_BATCH) or (
                kind == "t" and len(cur_t) >= MAX_TAGS_PER_BATCH
            )
            if (
                full_kind
                or len(cur_p) + len(cur_t) >= MAX_ITEMS_PER_BATCH
                or (size + item > _MAX_BATCH_BYTES and (cur_p or cur_t))
            ):
                flush()
            (cur_p if kind == "p" else cur_t)[key] = value
            size += item
    flush()
    return out


def metric_of(data: Mapping[str, Any]) -> Metric:
    """A metric of a REST answer (int64 fields may come as strings)."""
    return Metric(
        key=str(data.get("key", "")),
        value=float(data.get("value", math.nan)),
        timestamp=int(data.get("timestamp") or 0),
        step=int(data.get("step") or 0),
    )
