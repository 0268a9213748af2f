"""Which tracking URI to use, and which store serves it.

Resolution follows MLflow: an explicit URI, else ``MLFLOW_TRACKING_URI``, else the
default of the installed MLflow version (``sqlite:///mlflow.db`` since 3.7 unless
``./mlruns`` has data), else the embedded default, a file store in ``./mlruns``.
Stores are chosen by URI scheme in :data:`_OPENERS`: local paths and ``file:`` go to
the native file store, ``http``, ``https`` and ``databricks`` to the REST store, every
other scheme (``sqlite``, ``postgresql``, ``mysql``, ``mssql``, plugin schemes) to the
mlflow client adapter.
The REST store and the adapter are imported only when a URI needs them, so importing
aioproj loads neither httpx nor mlflow.
"""

from __future__ import annotations

import functools
import os
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from aioproj.errors import InvalidArgumentError
from aioproj.tracking.base import TrackingStore
from aioproj.tracking.file_store import FileStore

__all__ = [
    "DEFAULT_SQLITE_FILE",
    "DEFAULT_TRACKING_DIR",
    "default_tracking_uri",
    "installed_mlflow_version",
    "open_store",
    "resolve_tracking_uri",
    "uri_scheme",
]

DEFAULT_TRACKING_DIR = "mlruns"
DEFAULT_SQLITE_FILE = "mlflow.db"


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
    """The tracking URI to use, resolved as the installed MLflow resolves it.

    ``uri`` if given, else MLFLOW_TRACKING_URI, else :func:`default_tracking_uri`.
    Reads the directory listing of ``./mlruns`` and installed package metadata when it
    falls through to the default, so call it off the event loop. Raises nothing.
    """
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return default_tracking_uri()


def default_tracking_uri() -> str:
    """The store a run goes to when nothing names one: MLflow's default, version for version.

    MLflow >= 3.7 defaults to ``sqlite:///mlflow.db`` in the current directory, unless
    ``./mlruns`` already holds file-store data (a numbered folder with a ``meta.yaml``),
    in which case it keeps ``./mlruns``; older MLflow versions default to ``./mlruns``.
    aioproj follows the MLflow that is installed beside it, so ``mlflow ui`` and the
    project's own ``mlflow`` calls look where aioproj writes. Without MLflow installed
    (the sqlite store needs it) the default is the native file store in ``./mlruns``.
    """
    version = installed_mlflow_version()
    if version is not None and version >= _SQLITE_DEFAULT_SINCE and not _has_mlruns_data():
        # MLflow's path_to_local_sqlite_uri: "sqlite:///" + the absolute path.
        return "sqlite:///" + Path(os.path.abspath(DEFAULT_SQLITE_FILE)).as_posix()
    return Path(os.path.abspath(DEFAULT_TRACKING_DIR)).as_uri()


#: The MLflow release that made ``sqlite:///mlflow.db`` the default tracking URI.
_SQLITE_DEFAULT_SINCE = (3, 7)


@functools.cache
def installed_mlflow_version() -> tuple[int, int] | None:
    """(major, minor) of the installed ``mlflow`` or ``mlflow-skinny``; None if neither."""
    from importlib import metadata  # slow to import; only the default URI needs it

    for dist in ("mlflow", "mlflow-skinny"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        match = re.match(r"(\d+)\.(\d+)", version)
        if match:
            return int(match[1]), int(match[2])
    return None


def _has_mlruns_data() -> bool:
    """MLflow's check: does ``./mlruns`` hold an experiment (``<digits>/meta.yaml``)?"""
    try:
        with os.scandir(DEFAULT_TRACKING_DIR) as entries:
            for entry in entries:
                meta = os.path.join(entry.path, "meta.yaml")
                if entry.name.isdigit() and entry.is_dir() and os.path.lexists(meta):
                    return True
    except OSError:
        return False
    return False


def uri_scheme(uri: str) -> str:
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
    scheme = uri_scheme(uri)
    opener = _OPENERS.get(scheme, _open_mlflow)
    return opener(uri)
