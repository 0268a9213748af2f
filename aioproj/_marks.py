"""The mark every process aioproj starts carries, so a dead driver's processes are found.

A driver (the process running a :class:`~aioproj.Runner`) can die at any moment,
SIGKILL included, with processes of its own still running: run process groups, and the
builds of their environments. Each such process gets the environment variable
``AIOPROJ_RUN_MARK=<journal id>/<what>`` (``<what>`` is a run's journal key, or ``build``),
which every descendant inherits and which ``/proc/PID/environ`` shows for as long as the
process lives, whatever process group or session it moved to. ``aioproj recover`` looks
for the marks of dead drivers' journals (see :mod:`aioproj.journal`).

This module sits at the bottom of the package: the environment builders and the backends
stamp processes with :func:`marked_env` without knowing about the journal.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping

__all__ = ["MARK_VARIABLE", "build_mark", "marked_env", "process_mark"]

#: The environment variable that marks a process as started by an aioproj driver.
MARK_VARIABLE = "AIOPROJ_RUN_MARK"

#: The mark for processes started while preparing runs (environment builds), set by the
#: runner around a run's preparation.
process_mark: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "aioproj_process_mark", default=None
)


def build_mark(journal_id: str) -> str:
    """The mark of the environment builds of the driver whose journal is ``journal_id``."""
    return f"{journal_id}/build"


def marked_env(env: Mapping[str, str], mark: str | None = None) -> dict[str, str]:
    """``env`` with the mark of the current run preparation (or ``mark``) added."""
    out = dict(env)
    value = mark if mark is not None else process_mark.get()
    if value is not None:
        out[MARK_VARIABLE] = value
    return out
