"""Where aioproj keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """``$AIOPROJ_CACHE_DIR``, else ``$XDG_CACHE_HOME/aioproj``, else ``~/.cache/aioproj``."""
    explicit = os.environ.get("AIOPROJ_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "aioproj"
