"""The entry point of sweeps, :func:`sweep`: checks the arguments, plans the parameter
sets and builds the :class:`~aioproj.sweeps.engine.Sweep` that runs them."""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from aioproj.errors import InvalidArgumentError
from aioproj.sweeps.engine import Display, Sweep
from aioproj.sweeps.execution import RunArgs
from aioproj.sweeps.live import ProgressMode, show_progress
from aioproj.sweeps.spaces import Plan, check_names, expand_grid, sample_space
from aioproj.sweeps.stoppers import Stopper
from aioproj.sweeps.trials import Goal
from aioproj.sweeps.tuners import Tuner
from aioproj.tracking.base import check_record, check_run_id

if TYPE_CHECKING:
    from aioproj._output import EchoMode
    from aioproj.backends import Backend
    from aioproj.runner import Runner

__all__ = ["sweep"]


def sweep(
    uri: str,
    grid: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    *,
    samples: int | None = None,
    seed: int | None = None,
    tuner: Tuner | None = None,
    max_parallel: int = 4,
    fail_fast: bool = False,
    retries: int = 2,
    retry_delay: float = 1.0,
    metric: str | None = None,
    goal: Goal | None = None,
    early_stopping: Stopper | None = None,
    resume: str | None = None,
    runner: Runner | None = None,
    tracking_uri: str | None = None,
    echo: EchoMode = "off",
    name: str | None = None,
    metrics_interval: float = 0.5,
    progress: bool | ProgressMode = False,
    entry_point: str = "main",
    version: str | None = None,
    docker_args: Mapping[str, str | bool] | None = None,
    experiment_name: str | None = None,
    experiment_id: str | int | None = None,
    backend: str | Backend = "local",
    backend_config: Mapping[str, Any] | str | None = None,
    storage_dir: str | Path | None = None,
    env_manager: str | None = None,
    build_image: bool = False,
    docker_auth: Mapping[str, str] | None = None,
) -> Sweep:
    """Run the project at ``uri`` once per parameter set; see :class:`Sweep`.

    Parameter sets: ``grid`` as a mapping of names to lists of values is the cartesian
    product (a single value is held fixed); as a list of mappings it is run as given.
    With ``samples=N`` the mapping is a space instead: ``N`` sets are drawn with
    :class:`Uniform`, :class:`LogUniform`, :class:`IntUniform` and :class:`Choice` (a
    list means a choice) from ``random.Random(seed)`` (a seed is chosen and recorded on
    the parent run when none is given). With ``tuner`` the sets come from its ``ask`` as
    slots free up (``samples`` then caps the number of trials); :class:`OptunaTuner`
    drives an Optuna study.

    At most ``max_parallel`` trials run at once. With ``fail_fast`` the first FAILED
    trial stops the sweep and the running trials are cancelled (their KILLED results are
    still yielded); otherwise every trial runs. A trial whose run could not be started or
    followed because of the infrastructure (:class:`BackendError`, :class:`SourceError`,
    :class:`EnvironmentBuildError`, :class:`TrackingError`) is retried up to ``retries``
    times, after ``retry_delay`` seconds doubling each time; a run that ends FAILED on its
    own (the project's non-zero exit) is not. Invalid parameters fail the trial, not the
    sweep. A result that did not finish says why in ``reason``.

    ``metric``/``goal`` name the metric that :attr:`Sweep.best` and the live view rank
    by (default: the tuner's, else none and ``"min"``); a warning says so when trials log
    metrics but not this one. With a ``metric`` or ``early_stopping``, trials' metrics are
    read from tracking while they run (every ``metrics_interval`` seconds; 0 turns that
    off); otherwise, and always at the end, each trial's final metrics are read once
    into its result. ``early_stopping`` (:class:`MedianStopping`, :class:`ASHA`, or any
    :class:`~aioproj.sweeps.stoppers.Stopper`) stops trials whose metric falls behind; a
    tuner that is a stopper too (an :class:`OptunaTuner` with a pruner) is used when
    ``early_stopping`` is not given.

    ``resume`` continues the sweep whose parent run has that id, with the same
    arguments: its FINISHED trials (and those early stopping stopped) are kept, yielded
    first and told to the tuner and the stopper; the others, and those that never ran,
    run again as new child runs of the same parent, in its experiment.

    ``progress`` shows the sweep while it runs and a summary table at the end, on
    stdout: ``"live"`` a rich table redrawn in place (terminals and Jupyter), ``"lines"``
    one line per trial status change, ``True``/``"auto"`` the first when stdout is a
    terminal or a notebook, else the second.

    Runs go to ``runner`` if given (then ``tracking_uri`` and ``echo`` are its own),
    else to a runner of the sweep's own. The other arguments are those of
    :func:`aioproj.run`, the same for every trial.

    Raises:
        InvalidArgumentError: at once, for a bad grid, space or option. Errors of the
            sweep itself (its tracking store, a tuner, a resume that does not fit the
            recorded sweep) are raised from the iteration.

    Cancellation: see the module documentation; every trial still running when the
    consumer stops is cancelled and recorded KILLED, the parent run too.
    """
    if max_parallel < 1:
        raise InvalidArgumentError(f"max_parallel must be a positive integer, got {max_parallel!r}")
    if retries < 0:
        raise InvalidArgumentError(f"retries must be >= 0, got {retries!r}")
    if runner is not None and tracking_uri is not None:
        raise InvalidArgumentError(
            "Pass tracking_uri to the Runner, not to sweep(), when you give a runner."
        )
    if not isinstance(uri, str) or not uri:
        raise InvalidArgumentError(f"uri must be a non-empty string, got {uri!r}")
    check_record(run_name=name, experiment_name=experiment_name)
    if resume is not None:
        check_run_id(resume)
    plan = _plan(grid, tuner, samples, seed)
    metric = metric if metric is not None else getattr(tuner, "metric", None)
    goal = goal if goal is not None else getattr(tuner, "goal", "min")
    if goal not in ("min", "max"):
        raise InvalidArgumentError(f"goal must be 'min' or 'max', got {goal!r}")
    if early_stopping is not None and not isinstance(cast(object, early_stopping), Stopper):
        raise InvalidArgumentError(
            "early_stopping must have a metric and observe() and ended() methods, got "
            f"{early_stopping!r}"
        )
    stopper = early_stopping
    candidate = cast(object, tuner)  # a tuner that is a stopper too (OptunaTuner)
    if stopper is None and isinstance(candidate, Stopper):
        stopper = candidate
    if early_stopping is not None and metrics_interval <= 0:
        raise InvalidArgumentError("early_stopping needs metrics_interval > 0.")
    return Sweep(
        RunArgs(
            uri=uri,
            entry_point=entry_point,
            version=version,
            docker_args=docker_args,
            experiment_name=experiment_name,
            experiment_id=experiment_id,
            backend=backend,
            backend_config=backend_config,
            storage_dir=storage_dir,
            env_manager=env_manager,
            build_image=build_image,
            docker_auth=docker_auth,
        ),
        plan=plan,
        tuner=tuner,
        budget=samples,
        max_parallel=max_parallel,
        fail_fast=fail_fast,
        retries=retries,
        retry_delay=retry_delay,
        metric=metric,
        goal=goal,
        stopper=stopper,
        runner=runner,
        tracking_uri=tracking_uri,
        echo=echo,
        name=name,
        metrics_interval=metrics_interval,
        display=_display(progress),
        resume=resume,
    )


def _plan(
    grid: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    tuner: Tuner | None,
    samples: int | None,
    seed: int | None,
) -> Plan | None:
    """The parameter sets to run, or None when a tuner proposes them."""
    if tuner is not None:
        if grid is not None:
            raise InvalidArgumentError("Give either a grid or a tuner, not both.")
        if not callable(getattr(tuner, "ask", None)) or not callable(getattr(tuner, "tell", None)):
            raise InvalidArgumentError("tuner must have ask(index) and tell(result) methods.")
        if samples is not None and samples < 1:
            raise InvalidArgumentError(f"samples must be a positive integer, got {samples!r}")
        return None
    if grid is None:
        raise InvalidArgumentError(
            "Give a grid (a mapping or a list of parameter sets) or a tuner."
        )
    if isinstance(grid, Mapping):
        if samples is None:
            return Plan(expand_grid(grid))
        space = dict(grid)
        drawn = seed if seed is not None else random.SystemRandom().randrange(2**32)
        resample = functools.partial(sample_space, space, samples)
        return Plan(
            sample_space(space, samples, drawn),
            seed=drawn,
            seed_given=seed is not None,
            resample=resample,
        )
    if samples is not None:
        raise InvalidArgumentError("samples needs a mapping of parameter spaces, not a list.")
    planned = []
    for item in grid:
        if not isinstance(item, Mapping):
            raise InvalidArgumentError(f"A list of parameter sets must hold mappings, got {item!r}")
        check_names(item)
        planned.append(dict(item))
    if not planned:
        raise InvalidArgumentError("The list of parameter sets is empty.")
    return Plan(planned)


def _display(progress: bool | ProgressMode) -> Display | None:
    """The live view for ``progress``, or None."""
    mode = _progress_mode(progress)
    if mode is None:
        return None
    return functools.partial(show_progress, mode=mode)


def _progress_mode(progress: bool | ProgressMode) -> ProgressMode | None:
    if progress is True:
        return "auto"
    if progress is False or progress is None:
        return None
    if progress not in ("auto", "live", "lines"):
        raise InvalidArgumentError(
            f"progress must be True, False, 'auto', 'live' or 'lines', got {progress!r}"
        )
    return progress
