"""A sweep read back from tracking: its parent run, the runs of its trials and their
metrics. What resuming a sweep (:func:`plan_resume`) and the sweep report start from.

A trial may have several runs (retries, or reruns by a resumed sweep); the one that
counts is its FINISHED run if it has one, else its latest attempt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aioproj.errors import InvalidArgumentError
from aioproj.handle import RunStatus
from aioproj.sweeps.spaces import Plan
from aioproj.sweeps.trials import (
    ATTEMPT_TAG,
    GOAL_TAG,
    METRIC_TAG,
    PARAMS_TAG,
    PLAN_TAG,
    PRUNED_TAG,
    REASON_TAG,
    SEED_TAG,
    SIZE_TAG,
    TRIAL_TAG,
    TUNER_TAG,
    TrialResult,
    TrialState,
)
from aioproj.tracking.base import RunRecord, TrackingStore, check_run_id
from aioproj.tracking.metrics import MetricCursor

__all__ = [
    "SweepRecord",
    "TrialRecord",
    "kept_result",
    "kept_state",
    "load_sweep",
    "parent_tags",
    "plan_fingerprint",
    "plan_resume",
]


@dataclass(frozen=True)
class TrialRecord:
    """One trial as tracking holds it."""

    index: int
    #: The run that counts: the trial's FINISHED run, else its latest attempt.
    run: RunRecord
    #: Attempts made so far, over every session of the sweep.
    attempts: int
    #: The parameters, typed as the sweep gave them where the run kept them.
    params: Mapping[str, Any]
    #: Every metric's values by step (the latest value logged at each step).
    history: Mapping[str, Mapping[int, float]]

    @property
    def status(self) -> str:
        return self.run.status

    @property
    def metrics(self) -> dict[str, float]:
        """The final value of each metric: the one at its highest step."""
        return {key: values[max(values)] for key, values in self.history.items() if values}

    @property
    def pruned(self) -> str | None:
        return self.run.tags.get(PRUNED_TAG)

    @property
    def reason(self) -> str | None:
        return self.pruned or self.run.tags.get(REASON_TAG)

    @property
    def duration(self) -> float:
        if self.run.end_time_ms is None:
            return 0.0
        return max(self.run.end_time_ms - self.run.start_time_ms, 0) / 1000


@dataclass(frozen=True)
class SweepRecord:
    """A sweep's parent run and its trials, by index."""

    parent: RunRecord
    trials: Sequence[TrialRecord]

    @property
    def metric(self) -> str | None:
        """The metric the sweep ranked by, if it had one."""
        return self.parent.tags.get(METRIC_TAG) or None

    @property
    def goal(self) -> str:
        return "max" if self.parent.tags.get(GOAL_TAG) == "max" else "min"


def plan_fingerprint(planned: Sequence[Mapping[str, Any]]) -> str:
    """A short digest of a sweep's parameter sets, recorded on its parent run so that a
    resumed sweep can check it runs the same ones."""
    text = json.dumps([dict(p) for p in planned], sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parent_tags(
    *,
    user: str,
    uri: str,
    entry_point: str,
    total: int | None,
    metric: str | None,
    goal: str,
    plan: Plan | None,
    tuner: str | None,
) -> dict[str, str]:
    """The tags a sweep's parent run starts with: MLflow's, and what a resume checks."""
    tags = {
        "mlflow.user": user,
        "mlflow.source.name": uri,
        "mlflow.source.type": "PROJECT",
        "mlflow.project.entryPoint": entry_point,
        SIZE_TAG: str(total if total is not None else "?"),
        GOAL_TAG: goal,
    }
    if metric is not None:
        tags[METRIC_TAG] = metric
    if plan is not None:
        tags[PLAN_TAG] = plan_fingerprint(plan.sets)
        if plan.seed is not None:
            tags[SEED_TAG] = str(plan.seed)
    if tuner is not None:
        tags[TUNER_TAG] = tuner
    return tags


async def load_sweep(store: TrackingStore, parent_run_id: str) -> SweepRecord:
    """Read a sweep back: its parent, its trials' runs and their metric histories.

    Raises:
        InvalidArgumentError: a malformed run id, or a run that is not a sweep's parent.
        TrackingError: no such run, or the store cannot be read.
    """
    check_run_id(parent_run_id)
    parent = await store.get_run(parent_run_id)
    if SIZE_TAG not in parent.tags:
        raise InvalidArgumentError(
            f"Run {parent_run_id} is not the parent run of an aioproj sweep (it has no "
            f"{SIZE_TAG} tag)."
        )
    children = await store.search_child_runs(parent.experiment_id, parent_run_id)
    chosen = _choose(children)
    cursors = [MetricCursor(run.run_id, run.experiment_id) for _, run, _ in chosen]
    found = await store.read_new_metrics(cursors) if cursors else []
    trials = []
    for (index, run, attempts), metrics in zip(chosen, found, strict=True):
        history: dict[str, dict[int, float]] = {}
        for m in sorted(metrics, key=lambda m: (m.step, m.timestamp)):
            history.setdefault(m.key, {})[m.step] = m.value
        trials.append(TrialRecord(index, run, attempts, _params(run), history))
    return SweepRecord(parent, trials)


def _choose(children: Sequence[RunRecord]) -> list[tuple[int, RunRecord, int]]:
    """Per trial index: the run that counts and the number of attempts."""
    by_index: dict[int, list[RunRecord]] = {}
    for run in children:
        try:
            index = int(run.tags[TRIAL_TAG])
        except (KeyError, ValueError):  # a nested run the sweep did not start
            continue
        by_index.setdefault(index, []).append(run)
    chosen = []
    for index, runs in sorted(by_index.items()):
        runs.sort(key=lambda r: (_attempt(r), r.start_time_ms))
        finished = [r for r in runs if r.status == "FINISHED"]
        chosen.append((index, (finished or runs)[-1], max(_attempt(r) for r in runs)))
    return chosen


def _attempt(run: RunRecord) -> int:
    try:
        return int(run.tags.get(ATTEMPT_TAG, "1"))
    except ValueError:
        return 1


def _params(run: RunRecord) -> dict[str, Any]:
    try:
        typed = json.loads(run.tags[PARAMS_TAG])
    except (KeyError, ValueError):
        typed = None
    return dict(typed) if isinstance(typed, dict) else dict(run.params)


@dataclass(frozen=True)
class Resumption:
    """What a resumed sweep keeps and what it runs again."""

    #: Trials that ended for good: FINISHED, or stopped by early stopping.
    kept: Sequence[TrialRecord]
    #: Attempts already made, by index, of the trials to run again.
    attempts: Mapping[int, int]


def plan_resume(
    record: SweepRecord, plan: Plan | None, entry_point: str
) -> tuple[Plan | None, Resumption]:
    """Which trials of ``record`` a resumed sweep keeps, and its plan (random samples
    given no seed are drawn again with the seed the sweep recorded); pure.

    FINISHED trials are kept, and so are those early stopping stopped (a decision, not
    an accident); FAILED and KILLED ones run again, as do planned trials that never ran.

    Raises:
        InvalidArgumentError: another entry point, parameter sets that differ from the
            recorded sweep's, or a trial's run still RUNNING (its driver may live, or
            need ``aioproj recover``).
    """
    parent_id = record.parent.run_id
    tags = record.parent.tags
    recorded_entry = tags.get("mlflow.project.entryPoint")
    if recorded_entry is not None and recorded_entry != entry_point:
        raise InvalidArgumentError(
            f"Sweep {parent_id} ran entry point {recorded_entry!r}, not {entry_point!r}: "
            "resume it with the same one."
        )
    if plan is not None and plan.resample is not None and not plan.seed_given:
        try:
            seed: int | None = int(tags[SEED_TAG])
        except (KeyError, ValueError):
            seed = None
        if seed is not None and seed != plan.seed:
            plan = dataclasses.replace(plan, sets=plan.resample(seed), seed=seed)
    planned = plan.sets if plan is not None else None
    recorded = tags.get(PLAN_TAG)
    if planned is not None and recorded is not None and recorded != plan_fingerprint(planned):
        raise InvalidArgumentError(
            f"The parameter sets differ from those of sweep {parent_id}: resume it with the "
            "same grid, list or space, samples and seed."
        )
    tuned = TUNER_TAG in tags
    if (planned is None and recorded is not None) or (planned is not None and tuned):
        kind = "a tuner" if planned is None else "a grid, list or samples"
        raise InvalidArgumentError(
            f"Sweep {parent_id} was not run with {kind}: resume it with what it was run with."
        )
    kept, attempts = [], {}
    for trial in record.trials:
        if trial.status not in ("FINISHED", "FAILED", "KILLED"):
            raise InvalidArgumentError(
                f"Trial {trial.index} of sweep {parent_id} (run {trial.run.run_id}) is still "
                f"{trial.status}. If the process that ran the sweep died, run `aioproj "
                "recover` first; if it still runs, wait for it or stop it."
            )
        if planned is not None and trial.index >= len(planned):
            raise InvalidArgumentError(
                f"Sweep {parent_id} has a trial {trial.index}, beyond the {len(planned)} "
                "parameter sets given: resume it with the same ones."
            )
        if trial.status == "FINISHED" or (trial.status == "KILLED" and trial.pruned):
            kept.append(trial)
        else:
            attempts[trial.index] = trial.attempts
    return plan, Resumption(kept, attempts)


def kept_result(trial: TrialRecord, params: Mapping[str, Any] | None = None) -> TrialResult:
    """The result of a trial a resumed sweep keeps (``params``: the planned ones)."""
    return TrialResult(
        index=trial.index,
        params=dict(trial.params if params is None else params),
        status=RunStatus(trial.status),
        run_id=trial.run.run_id,
        attempts=trial.attempts,
        duration=trial.duration,
        metrics=trial.metrics,
        pruned=trial.pruned,
        reason=trial.reason,
        resumed=True,
    )


def kept_state(result: TrialResult) -> TrialState:
    """The state a live view shows for a kept trial."""
    reason = result.reason or ""
    return TrialState(
        index=result.index,
        params=dict(result.params),
        status=result.status.value,
        run_id=result.run_id,
        attempts=result.attempts,
        started=0.0,
        ended=result.duration,
        metrics=dict(result.metrics),
        note=f"kept from before the resume{': ' + reason.splitlines()[-1] if reason else ''}",
        reason=reason,
    )
