"""Tracking stores: where aioproj records runs, in MLflow's formats.

:class:`RestStore` (httpx) and :class:`MlflowStore` (the mlflow client) load on first
access, so importing this package imports neither httpx nor mlflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aioproj.tracking.base import RunRecord, TrackingStore
from aioproj.tracking.file_store import FileStore
from aioproj.tracking.resolve import open_store, resolve_tracking_uri

if TYPE_CHECKING:
    from aioproj.tracking.mlflow_adapter import MlflowStore
    from aioproj.tracking.rest import RestStore

__all__ = [
    "FileStore",
    "MlflowStore",
    "RestStore",
    "RunRecord",
    "TrackingStore",
    "open_store",
    "resolve_tracking_uri",
]

_LAZY = {
    "MlflowStore": "aioproj.tracking.mlflow_adapter",
    "RestStore": "aioproj.tracking.rest",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
