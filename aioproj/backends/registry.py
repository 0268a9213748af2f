"""Find a backend by name: built-ins first, then the ``aioproj.backends`` entry-point group."""

from __future__ import annotations

from aioproj.errors import InvalidArgumentError

from .base import Backend

__all__ = ["BUILTIN_BACKENDS", "load_backend"]

#: Backends that ship with aioproj, by name, with the extra they need (None: core).
BUILTIN_BACKENDS: dict[str, str | None] = {"local": None, "databricks": None, "kubernetes": None}

ENTRY_POINT_GROUP = "aioproj.backends"


def load_backend(name: str) -> Backend:
    """Return a new backend instance for ``name``.

    Raises :class:`InvalidArgumentError` if no built-in backend or installed plugin has
    that name, listing those that exist.
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
    known = sorted(set(BUILTIN_BACKENDS) | set(plugins))
    raise InvalidArgumentError(
        f"Got unsupported execution mode {name!r}. Supported values: {known}. "
        f"Install a plugin that registers it in the {ENTRY_POINT_GROUP!r} entry-point group, "
        "or pass a Backend instance."
    )
