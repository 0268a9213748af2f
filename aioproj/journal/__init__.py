"""The run journal: what a driver leaves behind if it dies, and how to finish it.

Every :class:`~aioproj.Runner` writes a journal (``$AIOPROJ_CACHE_DIR/journal``, else
``~/.cache/aioproj/journal``) ahead of what it does: a run's intent before its tracking
run, process or remote job exists, then each fact as it happens (the tracking run id,
the process group or job, the final status and end time), and every process it starts
carries a mark naming the journal. If the driver dies (SIGKILL, out of memory, a lost
machine), :func:`recover` (``aioproj recover``) finds its journal, stops what is left of
its runs and records each run's true final status. See :mod:`._log` for the file and
:mod:`._recover` for the decisions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._log import Journal, JournalError
from ._records import record_exit

if TYPE_CHECKING:
    from ._recover import RECOVERED_TAG, RecoveredRun, recover

__all__ = ["RECOVERED_TAG", "Journal", "JournalError", "RecoveredRun", "record_exit", "recover"]


def __getattr__(name: str) -> Any:
    # Recovery is imported when asked for: a driver that only writes its journal does
    # not pay for it on its first run.
    if name in {"RECOVERED_TAG", "RecoveredRun", "recover"}:
        from . import _recover

        return getattr(_recover, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
