"""What a sweep knows of its trials: :class:`TrialState` while they run,
:class:`TrialResult` once they end, and the tags their runs carry."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aioproj.errors import (
    BackendError,
    EnvironmentBuildError,
    SourceError,
    TrackingError,
)
from aioproj.handle import RunStatus

__all__ = [
    "ATTEMPT_TAG",
    "PARENT_TAG",
    "PRUNED_TAG",
    "RETRYABLE",
    "TRIAL_TAG",
    "Goal",
    "TrialResult",
    "TrialState",
    "best_of",
]

#: Tags of a trial's child run, and of a run stopped by early stopping.
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "aioproj.sweep.trial"
ATTEMPT_TAG = "aioproj.sweep.attempt"
PRUNED_TAG = "aioproj.sweep.pruned"

#: Errors that say the infrastructure failed, not the project: a trial is retried on them.
RETRYABLE: tuple[type[Exception], ...] = (
    BackendError,
    SourceError,
    EnvironmentBuildError,
    TrackingError,
)

Goal = Literal["min", "max"]


@dataclass
class TrialState:
    """A trial as it is now; what a live view shows. Changed only by the sweep.

    ``status`` is ``QUEUED``, ``STARTING``, ``RUNNING``, ``RETRYING``, or a final
    ``FINISHED``/``FAILED``/``KILLED``.
    """

    index: int
    params: dict[str, Any]
    status: str = "QUEUED"
    run_id: str | None = None
    attempts: int = 0
    started: float | None = None
    ended: float | None = None
    #: Latest value of each metric the run has logged.
    metrics: dict[str, float] = field(default_factory=dict)
    #: What went wrong, or why the trial was stopped early.
    note: str = ""

    @property
    def duration(self) -> float | None:
        """Seconds since the trial's current attempt started (until it ended)."""
        if self.started is None:
            return None
        return (self.ended if self.ended is not None else time.monotonic()) - self.started

    @property
    def is_done(self) -> bool:
        return self.status in _FINAL


_FINAL = frozenset({"FINISHED", "FAILED", "KILLED"})


@dataclass(frozen=True)
class TrialResult:
    """How a trial ended. ``run_id`` is None if no run could be created for it."""

    index: int
    params: Mapping[str, Any]
    status: RunStatus
    run_id: str | None
    attempts: int
    duration: float
    #: Final value of each metric the run logged.
    metrics: Mapping[str, float]
    #: The error that made the trial fail before or outside its own process, if any
    #: (a project's non-zero exit is a plain FAILED status, with no error).
    error: Exception | None = None
    #: Why early stopping stopped the trial (then ``status`` is KILLED).
    pruned: str | None = None

    @property
    def ok(self) -> bool:
        """True if the trial's run FINISHED."""
        return self.status is RunStatus.FINISHED


def best_of(results: Sequence[TrialResult], metric: str, goal: Goal) -> TrialResult | None:
    """The FINISHED result with the best final ``metric``, or None."""
    scored = [r for r in results if r.ok and metric in r.metrics]
    if not scored:
        return None
    pick = min if goal == "min" else max
    return pick(scored, key=lambda r: r.metrics[metric])
