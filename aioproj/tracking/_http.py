"""Credentials of the REST store: what an MLflow client would send.

:mod:`aioproj.tracking.rest` builds the client from a :class:`HostCreds` (retry timing
comes from :mod:`aioproj._http`); Databricks
credentials are resolved by :mod:`aioproj._databricks_auth`, as for the Databricks
backend. Reading ``~/.databrickscfg`` is file I/O, so :func:`resolve_creds` is meant to
run in a worker thread.
"""

from __future__ import annotations

import base64
import os
import urllib.parse
from dataclasses import dataclass, field

from aioproj._databricks_auth import DatabricksAuthError, resolve_workspace
from aioproj.errors import InvalidArgumentError

__all__ = ["HostCreds", "resolve_creds"]

_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True)
class HostCreds:
    """Where and how to reach a tracking server. ``repr`` never shows the secrets."""

    host: str
    token: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    verify: bool = True
    server_cert_path: str | None = None
    client_cert_path: str | None = None
    #: A Databricks service principal (OAuth machine-to-machine): the REST store fetches
    #: its access tokens with :class:`aioproj._databricks_auth.OAuthM2M`.
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)

    def auth_header(self) -> str | None:
        """The fixed Authorization header value, as MLflow builds it (Basic wins over
        Bearer); None without credentials or with OAuth machine-to-machine."""
        if self.username and self.password:
            raw = f"{self.username}:{self.password}".encode()
            return "Basic " + base64.standard_b64encode(raw).decode("ascii")
        if self.token:
            return f"Bearer {self.token}"
        return None

    def secrets(self) -> tuple[str, ...]:
        """The strings an error message must never contain."""
        out = [s for s in (self.token, self.password, self.client_secret) if s]
        header = self.auth_header()
        if header is not None:
            out.append(header.split(" ", 1)[1])
        return tuple(out)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def resolve_creds(uri: str) -> HostCreds:
    """The host and credentials for an ``http(s)://`` or ``databricks[://profile]`` URI.

    http(s): MLFLOW_TRACKING_TOKEN (Bearer), MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD (Basic; else the user and password of the URI, which the
    returned host no longer holds), MLFLOW_TRACKING_INSECURE_TLS,
    MLFLOW_TRACKING_SERVER_CERT_PATH (else REQUESTS_CA_BUNDLE, else CURL_CA_BUNDLE, the
    CA bundles requests trusts for MLflow) and MLFLOW_TRACKING_CLIENT_CERT_PATH.

    Databricks: as :func:`aioproj._databricks_auth.resolve_workspace` finds them (the
    databricks-sdk's order): a personal access token, basic auth, or a service principal
    (``client_id`` and ``client_secret``, OAuth machine-to-machine), from the profile of
    ``databricks://profile``, else the environment and the profile
    DATABRICKS_CONFIG_PROFILE, ``[__settings__] default_profile`` or ``DEFAULT`` of
    DATABRICKS_CONFIG_FILE (default ``~/.databrickscfg``).

    Raises:
        InvalidArgumentError: both MLFLOW_TRACKING_INSECURE_TLS and a server certificate
            are set, or no Databricks host or credentials can be found (the message names
            where aioproj looked; it never contains a token).
    """
    parsed = urllib.parse.urlparse("databricks:" if uri == "databricks" else uri)
    if parsed.scheme.lower() == "databricks":
        return _databricks_creds(uri)
    insecure = _env_flag("MLFLOW_TRACKING_INSECURE_TLS")
    cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None
    if insecure and cert:
        raise InvalidArgumentError(
            "MLFLOW_TRACKING_INSECURE_TLS and MLFLOW_TRACKING_SERVER_CERT_PATH cannot both"
            " be set: one turns certificate checks off, the other configures them."
        )
    if cert is None and not insecure:
        # MLflow's client is requests, which trusts these CA bundles (in this order).
        cert = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None
    # Credentials in the URI (http://user:pw@host) are Basic auth, as requests makes them
    # for MLflow; the host keeps none, so request URLs (which httpx logs) carry no secret.
    username = os.environ.get("MLFLOW_TRACKING_USERNAME") or None
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or None
    if parsed.username is not None and not (username and password):
        username = urllib.parse.unquote(parsed.username)
        password = urllib.parse.unquote(parsed.password or "") or None
    host = urllib.parse.urlunparse(parsed._replace(netloc=parsed.netloc.rpartition("@")[2]))
    return HostCreds(
        host=host.rstrip("/"),
        token=os.environ.get("MLFLOW_TRACKING_TOKEN") or None,
        username=username,
        password=password,
        verify=not insecure,
        server_cert_path=cert,
        client_cert_path=os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None,
    )


def _databricks_creds(uri: str) -> HostCreds:
    try:
        workspace = resolve_workspace(uri)
    except DatabricksAuthError as exc:
        raise InvalidArgumentError(f"Tracking URI {uri!r}: {exc}") from None
    return HostCreds(
        host=workspace.host,
        token=workspace.token,
        username=workspace.username,
        password=workspace.password,
        verify=workspace.verify,
        client_id=workspace.client_id,
        client_secret=workspace.client_secret,
    )
