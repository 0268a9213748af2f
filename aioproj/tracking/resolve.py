"""Which tracking URI to use, and which store serves it.

Resolution follows MLflow: an explicit URI, else ``MLFLOW_TRACKING_URI``, else the
embedded default, a file store in ``./mlruns``. Stores are chosen by URI scheme in
:data:`_OPENERS`: local paths and ``file:`` go to the native file store, ``http``,
``https`` and ``databricks`` to the REST store, every other scheme (``sqlite``,
``postgresql``, ``mysql``, ``mssql``, plugin schemes) to the mlflow client adapter.
The REST store and the adapter are imported only when a URI needs them, so importing
aioproj loads neither httpx nor mlflow.
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


def _open_rest(uri: str) -> TrackingStore:
    from aioproj.tracking.rest import RestStore

    return RestStore(uri)


def _open_mlflow(uri: str) -> TrackingStore:
    from aioproj.tracking.mlflow_adapter import MlflowStore

    return MlflowStore(uri)


# Scheme -> store factory. "" is a plain local path; any scheme not listed goes to the
# mlflow client adapter (which raises a clear error on first use without mlflow).
_OPENERS: dict[str, Callable[[str], TrackingStore]] = {
    "": FileStore,
    "file": FileStore,
    "http": _open_rest,
    "https": _open_rest,
    "databricks": _open_rest,
}


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri``, else MLFLOW_TRACKING_URI, else ``./mlruns``.

    The default is the absolute ``file:`` URI of ``mlruns`` in the current directory.
    This is where aioproj differs from recent MLflow on purpose. MLflow >= 3.7 (checked
    with 3.17) defaults to ``sqlite:///mlflow.db`` in the current directory, unless
    ``./mlruns`` already holds file-store data (a numbered folder with a
    ``meta.yaml``), in which case it keeps ``./mlruns``. aioproj keeps the file store
    because it needs no mlflow install (the sqlite store is only reachable through the
    mlflow client adapter, i.e. ``aioproj[mlflow]`` and its import cost), it is written
    natively without worker-thread database migrations, and ``mlflow ui`` and
    ``MlflowClient`` read it. Children get ``MLFLOW_TRACKING_URI`` set explicitly (and
    ``MLFLOW_ALLOW_FILE_STORE``), so a project's own ``mlflow`` calls land in the same
    store whatever the installed MLflow's default is. To track into sqlite as MLflow
    does by default, pass ``sqlite:///mlflow.db`` or set MLFLOW_TRACKING_URI.
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
    if uri == "databricks":  # MLflow's name for the default Databricks profile
        return "databricks"
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter
        return ""
    return scheme.split("+", 1)[0]


def open_store(uri: str) -> TrackingStore:
    """Open the store for a tracking URI (see :func:`resolve_tracking_uri`).

    Nothing is contacted or imported beyond the store's module: connections, credentials
    and the mlflow import happen on the store's first call.

    Raises:
        InvalidArgumentError: an empty URI, or a file store URI with a remote host.
    """
    if not uri:
        raise InvalidArgumentError("The tracking URI is empty.")
    scheme = _scheme(uri)
    opener = _OPENERS.get(scheme, _open_mlflow)
    return opener(uri)
