"""The Databricks REST client of the backend: httpx, one pooled client per workspace.

Retries, as the databricks-sdk does and a little safer: 429 and 503 are retried on every
request (the service did not act on them), honouring Retry-After with jitter so that many
runs throttled together do not come back together; failures to connect are retried
always; a dropped or timed-out answer is retried only for requests that are safe to
repeat (reads, cancel, and a submit carrying an idempotency token); 500/502/504 are
retried for reads. All of it within a time budget (``retry_timeout``). Errors become
:class:`DatabricksApiError` (an :class:`~aioproj.BackendError`) naming the host, method,
path, the service's ``error_code`` and message, and never a token.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import httpx

from aioproj._databricks_auth import DatabricksAuthError, OAuthM2M, WorkspaceAuth
from aioproj._http import backoff_delay, parse_retry_after
from aioproj._redact import scrub
from aioproj.errors import BackendError

__all__ = ["DatabricksApiError", "DatabricksClient"]

Sleep = Callable[[float], Awaitable[None]]

_THROTTLED = frozenset({429, 503})
_READ_RETRY = frozenset({500, 502, 504})
_USER_AGENT = "aioproj databricks-backend"


class DatabricksApiError(BackendError):
    """The workspace answered with an error (``status_code``, ``error_code``), or could
    not be reached (``status_code`` 0)."""

    def __init__(self, message: str, *, status_code: int, error_code: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_code = error_code


class DatabricksClient:
    """Requests to one workspace. ``request_count`` counts every attempt, OAuth token
    requests included."""

    def __init__(
        self,
        auth: WorkspaceAuth,
        *,
        sleep: Sleep | None = None,
        retry_timeout: float = 300.0,
        timeout: float = 60.0,
        max_connections: int = 20,
    ) -> None:
        self.auth = auth
        self.host = auth.host
        self._sleep: Sleep = sleep if sleep is not None else anyio.sleep
        self._retry_timeout = retry_timeout
        headers = {"User-Agent": _USER_AGENT, "Accept": "application/json"}
        header = auth.header()
        if header is not None:
            headers["Authorization"] = header
        self._client = httpx.AsyncClient(
            base_url=auth.host,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0), pool=None),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            verify=auth.verify,
            trust_env=True,
        )
        #: The service principal's token source (OAuth machine-to-machine), else None.
        self.oauth: OAuthM2M | None = None
        if header is None:
            self.oauth = OAuthM2M(
                auth, self._client, sleep=self._sleep, retry_timeout=retry_timeout
            )
            self._client.auth = self.oauth
        self._sent = 0

    @property
    def request_count(self) -> int:
        """Requests sent so far (every attempt counts), for tests and benchmarks."""
        return self._sent + (self.oauth.fetch_count if self.oauth is not None else 0)

    def __repr__(self) -> str:
        return f"DatabricksClient(host={self.host!r}, auth={self.auth.kind!r})"

    def scrub(self, text: str) -> str:
        """``text`` without any secret of this client."""
        return scrub(text, self.oauth.secrets() if self.oauth is not None else self.auth.secrets())

    async def aclose(self) -> None:
        """Close the pooled connections. Shielded from cancellation."""
        with anyio.CancelScope(shield=True):
            await self._client.aclose()

    # -- requests ---------------------------------------------------------------------

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        repeatable: bool | None = None,
    ) -> dict[str, Any]:
        """Send one API request with retries; return the JSON answer (``{}`` if empty).

        ``repeatable``: whether the request may be sent again after a lost answer
        (default: GET only).

        Raises:
            DatabricksApiError: the workspace refused (after retries), could not be
                reached within the retry budget, or answered something not JSON.

        Cancellation abandons the request in flight.
        """
        response = await self.send(method, path, params=params, json=json, repeatable=repeatable)
        try:
            body = response.json() if response.content else {}
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise DatabricksApiError(
                f"{self.host}: {method} {path} returned an answer that is not a JSON"
                " object; is this a Databricks workspace?",
                status_code=response.status_code,
                error_code="INVALID_RESPONSE",
            )
        return body

    async def send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        repeatable: bool | None = None,
    ) -> httpx.Response:
        """Send one request with retries; return the successful (< 300) response.

        Same retries, errors and cancellation as :meth:`call`; ``content`` sends raw
        bytes (the Files API).
        """
        if repeatable is None:
            repeatable = method in ("GET", "HEAD")
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            self._sent += 1
            delay: float
            failure: str
            try:
                response = await self._client.request(
                    method, path, params=params, json=json, content=content, headers=headers
                )
            except DatabricksAuthError as exc:
                # The token source retried within the same budget already.
                raise DatabricksApiError(
                    self.scrub(str(exc)), status_code=exc.status_code, error_code=exc.error_code
                ) from None
            except httpx.TransportError as exc:
                unsent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
                failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if not (unsent or repeatable):
                    raise self._unreachable(method, path, attempt, failure) from None
                delay = backoff_delay(attempt)
                if waited + delay > self._retry_timeout:
                    raise self._unreachable(method, path, attempt, failure) from None
                waited += delay
                await self._sleep(delay)
                continue
            status = response.status_code
            if status < 300:
                return response
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if status in _THROTTLED or (repeatable and status in _READ_RETRY):
                if retry_after is not None:
                    # Jitter, so runs throttled together do not return together.
                    delay = retry_after + random.uniform(0, max(0.05, retry_after * 0.25))
                else:
                    delay = backoff_delay(attempt)
                if waited + delay <= self._retry_timeout:
                    waited += delay
                    await self._sleep(delay)
                    continue
            raise self._error(method, path, response, attempt)

    def _unreachable(
        self, method: str, path: str, attempts: int, failure: str
    ) -> DatabricksApiError:
        return DatabricksApiError(
            self.scrub(
                f"Databricks workspace {self.host}: {method} {path} failed after {attempts}"
                f" attempt(s): {failure}"
            ),
            status_code=0,
            error_code="CONNECTION_ERROR",
        )

    def _error(
        self, method: str, path: str, response: httpx.Response, attempts: int
    ) -> DatabricksApiError:
        try:
            body = response.json()
        except ValueError:
            body = None
        code, message = "", ""
        if isinstance(body, dict):
            code = str(body.get("error_code") or body.get("error") or "")
            message = str(body.get("message") or body.get("detail") or "")
        if not message:
            message = response.text[:300].strip() or response.reason_phrase
        status = response.status_code
        if not code:
            code = {
                400: "BAD_REQUEST",
                401: "UNAUTHENTICATED",
                403: "PERMISSION_DENIED",
                404: "NOT_FOUND",
                429: "REQUEST_LIMIT_EXCEEDED",
                503: "TEMPORARILY_UNAVAILABLE",
            }.get(status, "HTTP_ERROR")
        hint = ""
        if status == 401:
            hint = " (check DATABRICKS_TOKEN or the profile's token; it may have expired)"
        elif status == 403:
            hint = " (the credentials are valid but not allowed to do this)"
        retried = f" after {attempts} attempts" if attempts > 1 else ""
        return DatabricksApiError(
            self.scrub(
                f"Databricks workspace {self.host}: {method} {path} failed{retried}: HTTP"
                f" {status} {code}: {message}{hint}"
            ),
            status_code=status,
            error_code=code,
        )
