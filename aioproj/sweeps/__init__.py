"""Sweeps (:func:`aioproj.sweep`): one project, many parameter sets, results as they end.

:func:`sweep` returns a :class:`Sweep`: iterate it (``async for result in ...``) to get a
:class:`TrialResult` as each trial ends, or await it for all of them. Parameter sets come
from a grid (cartesian product), an explicit list of dicts, random samples of
distributions, or a :class:`Tuner` that proposes the next set as results arrive (Optuna's
ask/tell fits it). Every trial is an MLflow child run of one parent run of the sweep
(``mlflow.parentRunId``), as MLflow's hyperparameter example does by hand.

The package, bottom up: ``spaces`` (grids and distributions), ``trials`` (trial states,
results and tags), ``tuners``, ``stoppers`` and ``optuna_tuner`` (what proposes and what
stops trials), ``reasons`` (why a trial failed, redacted), ``records`` (a sweep read back
from tracking, for resuming and reports), ``execution`` (one trial, from its run to its
result), ``engine`` (:class:`Sweep`), ``report`` (the HTML report), ``live`` (the
progress view), ``api`` (:func:`sweep`). Each module imports only those before it.
"""

from __future__ import annotations

from aioproj.sweeps.api import sweep
from aioproj.sweeps.engine import Sweep
from aioproj.sweeps.optuna_tuner import OptunaTuner
from aioproj.sweeps.spaces import Choice, IntUniform, LogUniform, Uniform, expand_grid, sample_space
from aioproj.sweeps.stoppers import ASHA, MedianStopping, Stopper
from aioproj.sweeps.trials import (
    ATTEMPT_TAG,
    PARENT_TAG,
    PRUNED_TAG,
    REASON_TAG,
    TRIAL_TAG,
    TrialResult,
    TrialState,
)
from aioproj.sweeps.tuners import Tuner

__all__ = [
    "ASHA",
    "ATTEMPT_TAG",
    "PARENT_TAG",
    "PRUNED_TAG",
    "REASON_TAG",
    "TRIAL_TAG",
    "Choice",
    "IntUniform",
    "LogUniform",
    "MedianStopping",
    "OptunaTuner",
    "Stopper",
    "Sweep",
    "TrialResult",
    "TrialState",
    "Tuner",
    "Uniform",
    "expand_grid",
    "sample_space",
    "sweep",
]
