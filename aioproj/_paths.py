"""Where aioproj keeps its caches, and the temporary directories a process owns."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "process_temp_prefix", "remove_orphaned_temps"]


def cache_root() -> Path:
    """``$AIOPROJ_CACHE_DIR``, else ``$XDG_CACHE_HOME/aioproj``, else ``~/.cache/aioproj``."""
    explicit = os.environ.get("AIOPROJ_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "aioproj"


def _start_ticks(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot, None if it is gone (or
    there is no ``/proc``): with the pid, it names one process for the machine's uptime."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def process_temp_prefix(kind: str) -> str:
    """The name prefix of a temporary directory this process owns,
    ``aioproj-<kind>-<pid>-<start>-``: :func:`remove_orphaned_temps` removes it once the
    process is gone, whatever killed it. Blocking (it reads ``/proc``)."""
    return f"aioproj-{kind}-{os.getpid()}-{_start_ticks(os.getpid()) or 0}-"


def remove_orphaned_temps(kind: str) -> int:
    """Remove the temporary directories named by :func:`process_temp_prefix` whose
    process is gone (in this process's temp dir); return how many. Blocking. Does nothing
    without ``/proc``, where the owner of a directory cannot be told."""
    if _start_ticks(os.getpid()) is None:
        return 0
    import re
    import shutil
    import tempfile

    pattern = re.compile(rf"aioproj-{re.escape(kind)}-(\d+)-(\d+)-")
    removed = 0
    base = tempfile.gettempdir()
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    for name in names:
        match = pattern.match(name)
        if match and _start_ticks(int(match[1])) != match[2]:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            removed += 1
    return removed
