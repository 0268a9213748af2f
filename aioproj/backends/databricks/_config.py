"""The Databricks backend's configuration: MLflow's backend_config keys (a new cluster
spec, libraries, timeout, run name) and the extra ``code_volume``, checked before
anything is uploaded; the tracking URIs a Databricks run can log to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aioproj.errors import BackendError, InvalidArgumentError

__all__ = [
    "DOCKER_UNSUPPORTED",
    "ClusterConfig",
    "check_backend_config",
    "check_tracking_uri",
    "parse_backend_config",
]

_CONFIG_KEYS = frozenset({"new_cluster", "libraries", "timeout_seconds", "run_name", "code_volume"})


_NO_CONFIG = "Backend spec must be provided when launching MLflow project runs on Databricks."
_EXISTING_CLUSTER = (
    "MLflow Project runs on Databricks must provide a *new cluster* specification."
    " Project execution against existing clusters is not currently supported. For more"
    " information, see https://mlflow.org/docs/latest/projects.html"
    "#run-an-mlflow-project-on-databricks"
)
DOCKER_UNSUPPORTED = "Running docker-based projects on Databricks is not yet supported."


@dataclass(frozen=True)
class ClusterConfig:
    """What a backend config asks for: the cluster, its libraries, a timeout, a name."""

    new_cluster: Mapping[str, Any]
    libraries: tuple[Mapping[str, Any], ...]
    timeout_seconds: int = 0
    run_name: str | None = None
    #: A Unity Catalog volume (``/Volumes/<catalog>/<schema>/<volume>[/dir]``) for the
    #: code, instead of DBFS.
    code_volume: str | None = None


def check_tracking_uri(uri: str) -> None:
    """MLflow's rule: the cluster logs to ``databricks[://profile]`` or an http(s) server.

    Raises BackendError with MLflow's message otherwise.
    """
    lowered = uri.lower()
    if lowered.startswith("databricks") or lowered.startswith(("http://", "https://")):
        return
    raise BackendError(
        "When running on Databricks, the MLflow tracking URI must be of the form "
        "'databricks' or 'databricks://profile', or a remote HTTP URI accessible to both the "
        "current client and code running on Databricks. Got local tracking URI "
        f"{uri}. Please specify a valid tracking URI via mlflow.set_tracking_uri or "
        "by setting the MLFLOW_TRACKING_URI environment variable."
    )


def check_backend_config(config: Mapping[str, Any] | None) -> None:
    """MLflow's first checks (``databricks.before_run_validations``), in its order.

    Only ``None`` is a missing config: ``{}`` goes on to the next check, the tracking
    URI (:func:`check_tracking_uri`), as in MLflow.

    Raises:
        BackendError: no config (MLflow's ``ExecutionException``).
        InvalidArgumentError: ``existing_cluster_id`` (MLflow's ``MlflowException`` with
            ``INVALID_PARAMETER_VALUE``), at the top or inside ``new_cluster``.
    """
    if config is None:
        raise BackendError(_NO_CONFIG)
    cluster = config.get("new_cluster")
    if "existing_cluster_id" in config or (
        isinstance(cluster, Mapping) and "existing_cluster_id" in cluster
    ):
        raise InvalidArgumentError(_EXISTING_CLUSTER)


def parse_backend_config(config: Mapping[str, Any] | None) -> ClusterConfig:
    """The cluster config of a backend config, in the forms MLflow accepts.

    ``{"new_cluster": {...}, "libraries": [...]}`` (plus aioproj's optional
    ``timeout_seconds``, ``run_name`` and ``code_volume``, a Unity Catalog volume to keep
    the code in instead of DBFS), or a bare cluster spec (the whole dict is the
    ``new_cluster``).

    Raises:
        BackendError: no config (MLflow's message), an empty one, or a malformed value
            (the message names the key and what is expected).
        InvalidArgumentError: ``existing_cluster_id`` (MLflow's message).
    """
    check_backend_config(config)
    assert config is not None
    if not config:
        raise BackendError(
            "The Databricks backend config is empty: give a cluster spec (spark_version,"
            ' node_type_id, num_workers...) or {"new_cluster": {...}, "libraries": [...]}.'
        )
    if "new_cluster" not in config:
        return ClusterConfig(new_cluster=dict(config), libraries=())
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        raise BackendError(
            f"Unknown key(s) {unknown} in the Databricks backend config. With 'new_cluster'"
            f" it may have {sorted(_CONFIG_KEYS)}; put cluster settings inside 'new_cluster'."
        )
    cluster = config["new_cluster"]
    if not isinstance(cluster, Mapping):
        raise BackendError(
            "The Databricks backend config's 'new_cluster' must be an object (a cluster spec"
            " with spark_version, node_type_id, num_workers...), got"
            f" {type(cluster).__name__}."
        )
    libraries = config.get("libraries", [])
    if not isinstance(libraries, list) or not all(isinstance(lib, Mapping) for lib in libraries):
        raise BackendError(
            "The Databricks backend config's 'libraries' must be a list of objects such as"
            ' {"pypi": {"package": "scikit-learn==1.5.0"}}.'
        )
    timeout = config.get("timeout_seconds", 0)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
        raise BackendError(
            "The Databricks backend config's 'timeout_seconds' must be a non-negative"
            f" integer (0: no timeout), got {timeout!r}."
        )
    run_name = config.get("run_name")
    if run_name is not None and not isinstance(run_name, str):
        raise BackendError("The Databricks backend config's 'run_name' must be a string.")
    volume = config.get("code_volume")
    if volume is not None and (
        not isinstance(volume, str)
        or not volume.startswith("/Volumes/")
        or len([p for p in volume.split("/") if p]) < 4
        or ".." in volume.split("/")
    ):
        raise BackendError(
            "The Databricks backend config's 'code_volume' must be a Unity Catalog volume"
            f" path, /Volumes/<catalog>/<schema>/<volume>[/<dir>], got {volume!r}."
        )
    return ClusterConfig(
        dict(cluster), tuple(dict(lib) for lib in libraries), timeout, run_name, volume
    )
