"""aioproj: run MLflow Projects from asyncio."""

from __future__ import annotations

__version__ = "0.1.0"
