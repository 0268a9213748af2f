"""Backends: where runs execute. ``local`` is built in; others load by name."""

from __future__ import annotations

from .base import Backend, Execution, Launch, LaunchRequest, StartRequest
from .registry import load_backend

__all__ = ["Backend", "Execution", "Launch", "LaunchRequest", "StartRequest", "load_backend"]
