"""Which workspace, and how to authenticate: resolved as the databricks-sdk does.

Order: ``databricks://profile`` names a profile of the config file and only that profile
is read. Otherwise the environment (DATABRICKS_HOST with DATABRICKS_TOKEN, or with
DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET for OAuth machine-to-machine), then the
profile DATABRICKS_CONFIG_PROFILE, ``[__settings__] default_profile`` or ``DEFAULT`` of
DATABRICKS_CONFIG_FILE (default ``~/.databrickscfg``), whose values never override the
environment's. Reading the config file is file I/O: call :func:`resolve_workspace` in a
worker thread.
"""

from __future__ import annotations

import configparser
import os
import urllib.parse
from dataclasses import dataclass, field

from aioproj.errors import BackendError

__all__ = ["WorkspaceAuth", "normalise_host", "resolve_workspace"]


@dataclass(frozen=True)
class WorkspaceAuth:
    """A workspace host and its credentials. ``repr`` never shows a secret."""

    host: str
    token: str | None = field(default=None, repr=False)
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    verify: bool = True

    @property
    def kind(self) -> str:
        """``pat`` or ``oauth-m2m``."""
        return "pat" if self.token else "oauth-m2m"

    def key(self) -> tuple[str, str, str]:
        """What identifies one pooled client: host, auth kind and principal (no secret)."""
        import hashlib

        who = self.client_id or hashlib.sha256((self.token or "").encode()).hexdigest()[:16]
        return (self.host, self.kind, who)

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.token, self.client_secret) if s)


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
    if not uri or uri == "databricks" or not uri.startswith("databricks"):
        return None
    parsed = urllib.parse.urlsplit(uri)
    profile = parsed.netloc or parsed.path.strip("/")
    if not profile:
        raise BackendError(f"The Databricks URI {uri!r} is formatted incorrectly: no netloc.")
    if ":" in profile:
        raise BackendError(
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
        raise BackendError(f"Cannot read the Databricks config file {path}: {exc}") from exc
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

    Explicit ``host``/``token``/``profile`` win over everything else.

    Raises:
        BackendError: no host or no credentials were found (the message says where
            aioproj looked and never contains a secret), a requested profile does not
            exist, or the config file cannot be read.
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
    has_auth = "token" in values or ("client_id" in values and "client_secret" in values)
    if requested is not None or not ("host" in values and has_auth):
        config = _read_config(path)
        name = requested
        if name is None and config.has_section("__settings__"):
            name = config.get("__settings__", "default_profile", fallback=None)
        section = _section(config, name or "DEFAULT")
        if section is None and requested is not None:
            raise BackendError(f"resolve: {path} has no {requested} profile configured")
        for key, value in (section or {}).items():
            if value and key not in values:
                values[key] = value
    found_host = values.get("host")
    tok = values.get("token")
    cid, secret = values.get("client_id"), values.get("client_secret")
    if not found_host or not (tok or (cid and secret)):
        where = f"profile [{requested}] of {path}" if requested else f"the environment or {path}"
        raise BackendError(
            f"No Databricks workspace credentials found in {where}. Set DATABRICKS_HOST and"
            " DATABRICKS_TOKEN (or DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET for a"
            " service principal), or add host and token to a profile and use the tracking"
            " URI databricks://<profile>."
        )
    insecure = values.get("insecure", "").strip().lower() in ("1", "true", "yes")
    if tok:
        return WorkspaceAuth(normalise_host(found_host), token=tok, verify=not insecure)
    return WorkspaceAuth(
        normalise_host(found_host), client_id=cid, client_secret=secret, verify=not insecure
    )
