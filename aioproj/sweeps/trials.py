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
    "BEST_RUN_TAG",
    "BEST_VALUE_TAG",
    "GOAL_TAG",
    "METRIC_TAG",
    "PARAMS_TAG",
    "PARENT_TAG",
    "PLAN_TAG",
    "PRUNED_TAG",
    "REASON_TAG",
    "RESUMED_TAG",
    "RETRYABLE",
    "SEED_TAG",
    "SIZE_TAG",
    "TRIAL_TAG",
    "TUNER_TAG",
    "Goal",
    "TrialResult",
    "TrialState",
    "best_of",
    "missing_metric",
]

#: Tags of a trial's child run: its parent, its number, its attempt and its parameters
#: as JSON (typed, where MLflow's params are strings); why it was stopped early, or why
#: it failed (redacted).
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "aioproj.sweep.trial"
ATTEMPT_TAG = "aioproj.sweep.attempt"
PARAMS_TAG = "aioproj.sweep.params"
PRUNED_TAG = "aioproj.sweep.pruned"
REASON_TAG = "aioproj.sweep.reason"

#: Tags of a sweep's parent run: how many trials it plans (``?`` while a tuner decides),
#: a digest of its parameter sets, the seed of its samples, its tuner's type, the
#: metric it ranks by and the goal, how often it was resumed, and (once it ended) how
#: many trials ended how (``aioproj.sweep.finished`` ...) and its best run.
SIZE_TAG = "aioproj.sweep.size"
PLAN_TAG = "aioproj.sweep.plan"
SEED_TAG = "aioproj.sweep.seed"
TUNER_TAG = "aioproj.sweep.tuner"
METRIC_TAG = "aioproj.sweep.metric"
GOAL_TAG = "aioproj.sweep.goal"
RESUMED_TAG = "aioproj.sweep.resumed"
BEST_RUN_TAG = "aioproj.sweep.best_run_id"
BEST_VALUE_TAG = "aioproj.sweep.best_value"

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
    #: One line on what went wrong, or why the trial was stopped early.
    note: str = ""
    #: Why the trial failed or was stopped, whole (the last lines of its output...).
    reason: str = ""

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
    #: Why the trial did not finish: the error, the last lines of the output of a
    #: project that exited non-zero, the early-stopping verdict, or the sweep's stop;
    #: with known secrets redacted. None for a FINISHED trial.
    reason: str | None = None
    #: True for a trial a resumed sweep kept from its earlier run.
    resumed: bool = False

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


def missing_metric(metric: str, results: Sequence[TrialResult]) -> str | None:
    """What to say when trials that ended logged metrics but none is ``metric``; None
    when one of them logged it, or none logged anything."""
    if any(metric in r.metrics for r in results):
        return None
    logged = sorted({key for r in results for key in r.metrics})
    if not logged:
        return None
    return (
        f"No trial has logged the metric {metric!r}; the trials that ended logged "
        f"{', '.join(repr(k) for k in logged)}. Is the metric name right?"
    )
