"""HTTP helpers every client of aioproj shares: retry timing and URI credentials.

The REST tracking store, the Databricks and Kubernetes clients and the Databricks OAuth
token source retry the same way (jittered exponential backoff, ``Retry-After`` honoured),
and a tracking URI's ``user:password@`` is moved into MLflow's variables the same way
wherever a child process gets it. Pure functions, no I/O.
"""

from __future__ import annotations

import email.utils
import random
import time
import urllib.parse

__all__ = ["backoff_delay", "parse_retry_after", "split_uri_credentials"]


def split_uri_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """An http(s) URI without its ``user:password@``, and MLflow's variables for them
    (MLFLOW_TRACKING_USERNAME/PASSWORD; none when the URI carries no password).

    What a child process gets instead of the URI as given, so that neither its
    environment's URI nor MLflow's "View run at" lines show the password.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.password:
        return uri, {}
    host = parts.netloc.rpartition("@")[2]
    credentials = {
        "MLFLOW_TRACKING_USERNAME": urllib.parse.unquote(parts.username or ""),
        "MLFLOW_TRACKING_PASSWORD": urllib.parse.unquote(parts.password),
    }
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), credentials


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None if absent."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    seconds: float = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds)


def backoff_delay(attempt: int, *, base: float = 0.5, cap: float = 16.0) -> float:
    """Jittered exponential backoff for retry ``attempt`` (1-based): up to base*2**(n-1)."""
    ceiling: float = min(cap, base * 2.0 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)
