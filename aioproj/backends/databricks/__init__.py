"""The Databricks backend: MLflow projects as Databricks Jobs runs (``backend="databricks"``).

See :class:`DatabricksBackend`. Nothing of aioproj needs installing on the cluster: the
code goes to DBFS as a tarball, a small bootstrap script runs the entry point there.
"""

from __future__ import annotations

from aioproj._databricks_auth import WorkspaceAuth

from ._backend import DatabricksBackend, DatabricksLaunch, resolve_workspace
from ._client import DatabricksApiError, DatabricksClient
from ._config import check_backend_config, check_tracking_uri, parse_backend_config
from ._execution import DatabricksExecution
from ._poller import map_state

__all__ = [
    "DatabricksApiError",
    "DatabricksBackend",
    "DatabricksClient",
    "DatabricksExecution",
    "DatabricksLaunch",
    "WorkspaceAuth",
    "check_backend_config",
    "check_tracking_uri",
    "map_state",
    "parse_backend_config",
    "resolve_workspace",
]
