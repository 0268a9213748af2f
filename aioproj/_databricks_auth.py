"""Databricks workspace credentials, for the tracking store and the Databricks backend.

Which workspace and how to authenticate is resolved as the databricks-sdk does.
``databricks://profile`` (or ``databricks:profile``) names a profile of the config file
and only that profile is read. Otherwise the environment (DATABRICKS_HOST with
DATABRICKS_TOKEN, or with DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET for OAuth
machine-to-machine), then the profile DATABRICKS_CONFIG_PROFILE, ``[__settings__]
default_profile`` or ``DEFAULT`` of DATABRICKS_CONFIG_FILE (default
``~/.databrickscfg``), whose values never override the environment's. A profile may hold
``token``, ``username`` and ``password``, or ``client_id`` and ``client_secret``, and
``insecure = true`` to skip certificate checks. Reading the config file is file I/O:
call :func:`resolve_workspace` in a worker thread.

:class:`OAuthM2M` is the one source of OAuth machine-to-machine access tokens, an
:class:`httpx.Auth` both the backend's client and the REST tracking store use.

Errors are :class:`DatabricksAuthError`; each caller re-raises them as its own type. No
message contains a token, password or client secret.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import os
import time
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from dataclasses import dataclass, field

import anyio
import httpx

from aioproj._http import backoff_delay, parse_retry_after
from aioproj._redact import scrub
from aioproj.errors import AioprojError

__all__ = [
    "DatabricksAuthError",
    "OAuthM2M",
    "WorkspaceAuth",
    "normalise_host",
    "resolve_workspace",
]

_TRUE = frozenset({"1", "true", "yes", "on"})
_THROTTLED = frozenset({429, 503})


class DatabricksAuthError(AioprojError):
    """No usable Databricks credentials, or the OAuth token endpoint refused.

    ``status_code`` is the token endpoint's HTTP status (0 when it was not asked or
    could not be reached) and ``error_code`` a Databricks-style code.
    """

    def __init__(
        self, message: str, *, status_code: int = 0, error_code: str = "INVALID_CONFIG"
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_code = error_code


@dataclass(frozen=True)
class WorkspaceAuth:
    """A workspace host and its credentials. ``repr`` never shows a secret.

    Exactly one kind of credentials is set: ``token`` (personal access token),
    ``username`` and ``password`` (basic auth), or ``client_id`` and ``client_secret``
    (OAuth machine-to-machine).
    """

    host: str
    token: str | None = field(default=None, repr=False)
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    verify: bool = True
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        """``pat``, ``basic`` or ``oauth-m2m``."""
        if self.token:
            return "pat"
        if self.username and self.password:
            return "basic"
        return "oauth-m2m"

    def header(self) -> str | None:
        """The fixed Authorization header of a token or basic auth; None for OAuth (see
        :class:`OAuthM2M`)."""
        if self.token:
            return f"Bearer {self.token}"
        if self.username and self.password:
            raw = f"{self.username}:{self.password}".encode()
            return "Basic " + base64.standard_b64encode(raw).decode("ascii")
        return None

    def key(self) -> tuple[str, str, str]:
        """What identifies one pooled client: host, auth kind and principal (no secret)."""
        secret = self.token or self.password or ""
        who = self.client_id or hashlib.sha256(secret.encode()).hexdigest()[:16]
        return (self.host, self.kind, who)

    def secrets(self) -> tuple[str, ...]:
        """The strings an error message must never contain."""
        out = [s for s in (self.token, self.password, self.client_secret) if s]
        header = self.header()
        if header is not None:
            out.append(header.split(" ", 1)[1])
        return tuple(out)


def normalise_host(host: str) -> str:
    """As the SDK does: add ``https://`` when there is no scheme, drop a trailing ``/``
    and an explicit ``:443``."""
    host = host.strip().rstrip("/")
    if "://" not in host:
        host = f"https://{host}"
    parsed = urllib.parse.urlsplit(host)
    if parsed.port == 443 and parsed.scheme == "https":
        host = f"{parsed.scheme}://{parsed.hostname}{parsed.path}"
    return host


def _profile_of(uri: str | None) -> str | None:
    if not uri or uri == "databricks" or not uri.lower().startswith("databricks"):
        return None
    parsed = urllib.parse.urlsplit(uri)
    profile = parsed.netloc or parsed.path.strip("/")
    if not profile:
        raise DatabricksAuthError(
            f"The Databricks URI {uri!r} is formatted incorrectly: no netloc."
        )
    if ":" in profile:
        raise DatabricksAuthError(
            f"The Databricks URI {uri!r} names a secret scope; secret-scope credentials are"
            " only readable inside the Databricks runtime. Use a profile or"
            " DATABRICKS_HOST/DATABRICKS_TOKEN."
        )
    return profile


def _read_config(path: str) -> configparser.ConfigParser:
    config = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            config.read_file(handle)
    except FileNotFoundError:
        pass
    except (OSError, configparser.Error) as exc:
        # configparser errors quote lines of the file, which may hold a secret.
        if isinstance(exc, OSError):
            reason = exc.strerror or type(exc).__name__
        else:
            line = getattr(exc, "lineno", None)
            reason = f"{type(exc).__name__}" + (f" at line {line}" if line else "")
        raise DatabricksAuthError(
            f"Cannot read the Databricks config file {path}: {reason}"
        ) from None
    return config


def _section(config: configparser.ConfigParser, name: str) -> dict[str, str] | None:
    # The SDK reads sections raw: [DEFAULT] values are not merged into other profiles.
    if name == "DEFAULT":
        return dict(config.defaults()) or None
    if not config.has_section(name):
        return None
    return dict(config._sections[name])  # type: ignore[attr-defined]


def resolve_workspace(
    uri: str | None = None,
    *,
    host: str | None = None,
    token: str | None = None,
    profile: str | None = None,
) -> WorkspaceAuth:
    """The workspace and credentials to use for ``uri`` (``databricks[://profile]``).

    Explicit ``host``/``token``/``profile`` win over everything else. A personal access
    token wins over basic auth, which wins over OAuth machine-to-machine, as in the SDK.

    Raises:
        DatabricksAuthError: no host or no credentials were found (the message says
            where aioproj looked and never contains a secret), a requested profile does
            not exist, the URI is malformed, or the config file cannot be read.
    """
    env = os.environ
    values: dict[str, str] = {}
    if host:
        values["host"] = host
    if token:
        values["token"] = token
    requested = profile or _profile_of(uri)
    if requested is None:
        for key, var in (
            ("host", "DATABRICKS_HOST"),
            ("token", "DATABRICKS_TOKEN"),
            ("client_id", "DATABRICKS_CLIENT_ID"),
            ("client_secret", "DATABRICKS_CLIENT_SECRET"),
        ):
            if env.get(var) and key not in values:
                values[key] = env[var]
        requested = env.get("DATABRICKS_CONFIG_PROFILE") or None
    path = os.path.expanduser(env.get("DATABRICKS_CONFIG_FILE") or "~/.databrickscfg")
    if requested is not None or not ("host" in values and _has_credentials(values)):
        config = _read_config(path)
        name = requested
        if name is None and config.has_section("__settings__"):
            name = config.get("__settings__", "default_profile", fallback=None)
        section = _section(config, name or "DEFAULT")
        if section is None and requested is not None:
            raise DatabricksAuthError(
                f"{path} has no {requested} profile configured: add a [{requested}] section"
                " with host and token (or client_id and client_secret), or name another"
                " profile."
            )
        for key, value in (section or {}).items():
            if value and key not in values:
                values[key] = value
    found_host = values.get("host")
    if not found_host or not _has_credentials(values):
        where = f"profile [{requested}] of {path}" if requested else f"the environment or {path}"
        raise DatabricksAuthError(
            f"No Databricks workspace credentials found in {where}. Set DATABRICKS_HOST and"
            " DATABRICKS_TOKEN (or DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET for a"
            " service principal), or add host and token (or client_id and client_secret)"
            " to a profile and use the tracking URI databricks://<profile>."
        )
    verify = values.get("insecure", "").strip().lower() not in _TRUE
    found_host = normalise_host(found_host)
    if values.get("token"):
        return WorkspaceAuth(found_host, token=values["token"], verify=verify)
    if values.get("username") and values.get("password"):
        return WorkspaceAuth(
            found_host, username=values["username"], password=values["password"], verify=verify
        )
    return WorkspaceAuth(
        found_host,
        client_id=values["client_id"],
        client_secret=values["client_secret"],
        verify=verify,
    )


def _has_credentials(values: dict[str, str]) -> bool:
    return bool(
        values.get("token")
        or (values.get("username") and values.get("password"))
        or (values.get("client_id") and values.get("client_secret"))
    )


Sleep = Callable[[float], Awaitable[None]]


class OAuthM2M(httpx.Auth):
    """OAuth machine-to-machine access tokens of one service principal, as httpx auth.

    Set it as the ``auth`` of ``client``, the pooled client it fetches tokens with::

        client.auth = OAuthM2M(workspace, client)

    The first request fetches a token from ``<host>/oidc/v1/token`` (client credentials
    grant, scope ``all-apis``); it is cached and replaced shortly before it expires (a
    minute early, or at 90% of a short lifetime) and when the workspace answers 401 to a
    request sent with it (that request is then sent once more). One fetch at a time:
    requests that need a token meanwhile wait for it and share it. The token request is
    retried on 429/503 (honouring Retry-After) and on connection failures within
    ``retry_timeout`` seconds of waiting.

    Requests through the client raise :class:`DatabricksAuthError` when no token can
    be had (refused credentials, or the endpoint unreachable within the budget).
    Cancelling a request cancels a fetch it is making; the next request fetches again.
    """

    requires_request_body = True

    def __init__(
        self,
        workspace: WorkspaceAuth,
        client: httpx.AsyncClient,
        *,
        sleep: Sleep | None = None,
        retry_timeout: float = 300.0,
    ) -> None:
        if not (workspace.client_id and workspace.client_secret):
            raise ValueError("OAuth machine-to-machine needs a client_id and client_secret")
        self.workspace = workspace
        self._client = client
        self._sleep: Sleep = sleep if sleep is not None else anyio.sleep
        self._retry_timeout = retry_timeout
        self._token: str | None = None
        self._expiry = 0.0
        self._lock = anyio.Lock()
        #: Token requests sent (every attempt counts), for tests.
        self.fetch_count = 0

    def __repr__(self) -> str:
        return f"OAuthM2M(host={self.workspace.host!r}, client_id={self.workspace.client_id!r})"

    def secrets(self) -> tuple[str, ...]:
        """The client secret and the current access token."""
        return (*self.workspace.secrets(), *((self._token,) if self._token else ()))

    def scrub(self, text: str) -> str:
        """``text`` with every secret of :meth:`secrets` replaced by ``***``."""
        return scrub(text, self.secrets())

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("OAuthM2M works with httpx.AsyncClient only")

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self.token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            # Read the refusal (which releases its connection) first: with every pooled
            # connection held by a refused request, the token request would wait forever.
            await response.aread()
            request.headers["Authorization"] = f"Bearer {await self.token(stale=token)}"
            yield request

    async def token(self, *, stale: str | None = None) -> str:
        """The current access token, fetched when there is none, it is about to expire,
        or it is ``stale`` (refused by the workspace).

        Raises:
            DatabricksAuthError: the token endpoint refused or could not be reached.
        """
        async with self._lock:
            current = self._token
            if current is None or current == stale or time.monotonic() >= self._expiry:
                current = await self._fetch()
            return current

    async def _fetch(self) -> str:
        host = self.workspace.host
        basic = base64.b64encode(
            f"{self.workspace.client_id}:{self.workspace.client_secret}".encode()
        ).decode("ascii")
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            self.fetch_count += 1
            try:
                response = await self._client.post(
                    f"{host}/oidc/v1/token",
                    data={"grant_type": "client_credentials", "scope": "all-apis"},
                    headers={"Authorization": f"Basic {basic}"},
                    auth=httpx.Auth(),  # not this auth: the token request sends its own
                )
            except httpx.TransportError as exc:
                delay = backoff_delay(attempt)
                if waited + delay > self._retry_timeout:
                    raise DatabricksAuthError(
                        self.scrub(
                            f"{host}: OAuth token request failed after {attempt} attempt(s):"
                            f" {type(exc).__name__}: {exc}"
                        ),
                        error_code="CONNECTION_ERROR",
                    ) from None
                waited += delay
                await self._sleep(delay)
                continue
            if response.status_code in _THROTTLED:
                delay = parse_retry_after(response.headers.get("Retry-After")) or backoff_delay(
                    attempt
                )
                if waited + delay <= self._retry_timeout:
                    waited += delay
                    await self._sleep(delay)
                    continue
            try:
                body = response.json()
            except ValueError:
                body = {}
            if response.status_code >= 300 or not isinstance(body, dict):
                if not isinstance(body, dict):
                    body = {}
                detail = body.get("error_description") or body.get("error") or response.text[:200]
                raise DatabricksAuthError(
                    self.scrub(
                        f"{host}: OAuth machine-to-machine token request for client"
                        f" {self.workspace.client_id} failed: HTTP {response.status_code}:"
                        f" {detail} (check DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET,"
                        " or the profile's client_id and client_secret)"
                    ),
                    status_code=response.status_code,
                    error_code="UNAUTHENTICATED",
                )
            token = body.get("access_token")
            if not isinstance(token, str) or not token:
                raise DatabricksAuthError(
                    f"{host}: the OAuth token answer has no access_token.",
                    status_code=response.status_code,
                    error_code="UNAUTHENTICATED",
                )
            lifetime = float(body.get("expires_in") or 3600)
            self._token = token
            self._expiry = time.monotonic() + lifetime - min(60.0, lifetime * 0.1)
            return token
