"""Tracking stores: where aioproj records runs, in MLflow's formats."""

from __future__ import annotations

from aioproj.tracking.base import RunRecord, TrackingStore
from aioproj.tracking.file_store import FileStore
from aioproj.tracking.resolve import open_store, resolve_tracking_uri

__all__ = ["FileStore", "RunRecord", "TrackingStore", "open_store", "resolve_tracking_uri"]
