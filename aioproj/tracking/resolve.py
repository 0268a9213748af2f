"""Which tracking URI to use, and which store serves it.

Resolution follows MLflow: an explicit URI, else ``MLFLOW_TRACKING_URI``, else the
embedded default, a file store in ``./mlruns``. Stores are chosen by URI scheme in
:data:`_OPENERS`; the REST store (``http``, ``https``, ``databricks``) and the mlflow
client adapter (``sqlite``, ``postgresql``, ``mysql``, ...) are added there.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from aioproj.errors import InvalidArgumentError
from aioproj.tracking.base import TrackingStore
from aioproj.tracking.file_store import FileStore

__all__ = ["DEFAULT_TRACKING_DIR", "open_store", "resolve_tracking_uri"]

DEFAULT_TRACKING_DIR = "mlruns"

# Scheme -> store factory. "" is a plain local path.
_OPENERS: dict[str, Callable[[str], TrackingStore]] = {
    "": FileStore,
    "file": FileStore,
}

# Schemes with a store planned but not written yet, and what will serve them.
_PLANNED = {
    "http": "the REST store",
    "https": "the REST store",
    "databricks": "the REST store",
}
_MLFLOW_ADAPTER = "the mlflow client adapter (aioproj[mlflow])"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri``, else MLFLOW_TRACKING_URI, else ``./mlruns``.

    The default is the absolute ``file:`` URI of ``mlruns`` in the current directory.
    Raises nothing.
    """
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return Path(os.path.abspath(DEFAULT_TRACKING_DIR)).as_uri()


def _scheme(uri: str) -> str:
    """The store scheme of ``uri``: '' for paths, 'postgresql' for 'postgresql+psycopg2'."""
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter
        return ""
    return scheme.split("+", 1)[0]


def open_store(uri: str) -> TrackingStore:
    """Open the store for a tracking URI (see :func:`resolve_tracking_uri`).

    Raises:
        InvalidArgumentError: the URI's scheme has no store in aioproj yet; the message
            names the URIs that are supported.
    """
    scheme = _scheme(uri)
    opener = _OPENERS.get(scheme)
    if opener is not None:
        return opener(uri)
    planned = _PLANNED.get(scheme, _MLFLOW_ADAPTER)
    raise InvalidArgumentError(
        f"Tracking URI {uri!r}: the {scheme!r} store ({planned}) is not supported yet."
        " Supported tracking URIs: local paths and file: URIs (for example ./mlruns or"
        " file:///abs/path/mlruns)."
    )
