"""Find a backend by name: built-ins first, then the ``aioproj.backends`` entry-point group,
then MLflow's own backend plugins (the ``mlflow.project_backend`` group)."""

from __future__ import annotations

from aioproj.errors import ExecutionError, InvalidArgumentError

from .base import Backend

__all__ = ["BUILTIN_BACKENDS", "ENTRY_POINT_GROUP", "MLFLOW_ENTRY_POINT_GROUP", "load_backend"]

#: Backends that ship with aioproj, by name, with the extra they need (None: core).
BUILTIN_BACKENDS: dict[str, str | None] = {
    "local": None,
    "databricks": None,
    "kubernetes": None,
    "slurm": None,
}

ENTRY_POINT_GROUP = "aioproj.backends"
#: Where MLflow finds third-party project backends (mlflow-slurm, mlflow-yarn, ...).
MLFLOW_ENTRY_POINT_GROUP = "mlflow.project_backend"


def load_backend(name: str) -> Backend:
    """Return a new backend instance for ``name`` (blocking: plugins are imported).

    A name that no aioproj backend has is looked up among MLflow's backend plugins,
    which run through :class:`~aioproj.backends.mlflow_plugin.MlflowPluginBackend`.

    Raises:
        ExecutionError: no built-in backend or installed plugin has that name (MLflow's
            ``ExecutionException`` and message, with the plugins' names listed too).
        InvalidArgumentError: an ``aioproj.backends`` plugin does not implement
            :class:`Backend`.
        BackendError: an MLflow backend plugin cannot be imported.
    """
    if name == "local":
        from .local import LocalBackend

        return LocalBackend()
    if name == "databricks":
        from .databricks import DatabricksBackend

        return DatabricksBackend()
    if name == "kubernetes":
        from .kubernetes import KubernetesBackend

        return KubernetesBackend()
    if name == "slurm":
        from .slurm import SlurmBackend

        return SlurmBackend()
    from importlib.metadata import entry_points  # slow to import; plugins are rare

    plugins = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name in plugins:
        factory = plugins[name].load()
        backend = factory()
        if not isinstance(backend, Backend):
            raise InvalidArgumentError(
                f"The backend plugin {name!r} ({plugins[name].value}) does not implement "
                "aioproj.backends.Backend (a 'name' attribute and 'prepare'/'aclose' methods)."
            )
        return backend
    mlflow_plugins = {ep.name: ep for ep in entry_points(group=MLFLOW_ENTRY_POINT_GROUP)}
    if name in mlflow_plugins:
        from .mlflow_plugin import MlflowPluginBackend

        return MlflowPluginBackend.from_entry_point(mlflow_plugins[name])
    # MLflow's order: databricks, kubernetes, then its registry ("local"); aioproj's own
    # (slurm) and plugins after.
    known = ["databricks", "kubernetes", "local"]
    known += [builtin for builtin in BUILTIN_BACKENDS if builtin not in known]
    known += sorted((set(plugins) | set(mlflow_plugins)) - set(known))
    raise ExecutionError(
        f"Got unsupported execution mode {name}. Supported values: {known}. Install a "
        f"plugin that registers it (entry-point group {ENTRY_POINT_GROUP!r}, or MLflow's "
        f"{MLFLOW_ENTRY_POINT_GROUP!r}), or pass a Backend instance."
    )
