"""Optuna as a sweep's tuner and early stopper: :class:`OptunaTuner`.

Optuna's samplers propose each trial's parameters through ask/tell, and the study's
pruner (``MedianPruner``, ``SuccessiveHalvingPruner``, ``HyperbandPruner``...) judges
the metric values the trials log while they run (``trial.report`` then
``trial.should_prune``), so pruning works for command-line projects that only log to
MLflow. Every call into Optuna runs in a worker thread, one at a time: a study in a
database (``storage="sqlite:///study.db"``) does I/O, and the study is shared.

Needs ``pip install 'aioproj[optuna]'``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from aioproj.errors import InvalidArgumentError
from aioproj.handle import RunStatus
from aioproj.sweeps.spaces import Choice, IntUniform, LogUniform, Uniform
from aioproj.sweeps.trials import Goal, TrialResult

if TYPE_CHECKING:
    import optuna

__all__ = ["OptunaTuner"]

logger = logging.getLogger("aioproj")

_T = TypeVar("_T")

#: User attributes of the Optuna trials a sweep makes: its parent run, trial and run.
PARENT_ATTR = "aioproj.parent_run_id"
TRIAL_ATTR = "aioproj.trial"
RUN_ATTR = "aioproj.run_id"

Space = Mapping[str, Any] | Callable[["optuna.Trial"], Mapping[str, Any]]


class OptunaTuner:
    """An Optuna ``study`` as the tuner of a sweep (``aioproj.sweep(uri, tuner=...)``).

    ``space`` is a mapping like that of a random sweep (:class:`aioproj.Uniform`,
    :class:`aioproj.LogUniform`, :class:`aioproj.IntUniform`, :class:`aioproj.Choice` or a
    list, constants), turned into Optuna's distributions; or a function of an
    ``optuna.Trial`` that calls ``trial.suggest_*`` and returns the parameters (a
    define-by-run space). ``metric`` names the logged metric each objective of the
    study reads (a list for a multi-objective study, in the order of its directions);
    the sweep ranks trials by the first.

    As the sweep's stopper (when it is given no ``early_stopping``), each value of the
    metric a trial logs is reported to its Optuna trial, and the study's pruner decides;
    ``prune=False`` turns that off, and multi-objective studies are never pruned (Optuna
    has no pruning for them). A trial's first value never prunes it (a metric logged
    once, a final score, is not an intermediate value), nor a value at a step that no
    finished trial went past.

    Results go back to the study as COMPLETE (the metric's final values), PRUNED, or
    FAIL. A resumed sweep tells the tuner its kept trials: a study in Optuna's own
    storage already has them and is left as it is, an in-memory one gets them added
    (with their logged curves); the trials a killed sweep left RUNNING in the study are
    marked FAIL.

    Raises:
        InvalidArgumentError: ``study`` is not an Optuna study, or the metrics do not
            match its directions, or ``space`` is neither a mapping nor a function.
    """

    def __init__(
        self, study: optuna.Study, space: Space, metric: str | Sequence[str], *, prune: bool = True
    ) -> None:
        if not all(hasattr(study, name) for name in ("ask", "tell", "directions")):
            raise InvalidArgumentError(f"OptunaTuner needs an optuna.Study, got {study!r}")
        metrics = [metric] if isinstance(metric, str) else list(metric)
        directions = [d.name.lower() for d in study.directions]
        if not metrics or len(metrics) != len(directions):
            raise InvalidArgumentError(
                f"The study has {len(directions)} objective(s) ({', '.join(directions)}): "
                f"give as many metric names, got {metrics!r}."
            )
        if not (callable(space) or isinstance(space, Mapping)):
            raise InvalidArgumentError(
                f"space must be a mapping of distributions or a function, got {space!r}"
            )
        self.study = study
        self.metrics = metrics
        #: The metric and goal the sweep ranks by: the first objective's.
        self.metric = metrics[0]
        self.goal: Goal = "max" if directions[0] == "maximize" else "min"
        self._space = space
        self._prune = prune and len(directions) == 1
        self._fixed = _distributions(space) if isinstance(space, Mapping) else None
        self._parent: str | None = None
        self._pending: dict[int, optuna.Trial] = {}
        self._reported: dict[int, set[int]] = {}
        self._kept_curves: dict[int, dict[int, float]] = {}
        self._final_steps: list[int] = []
        self._limiter = anyio.CapacityLimiter(1)

    def __repr__(self) -> str:
        return f"<OptunaTuner study={self.study.study_name!r} metrics={self.metrics!r}>"

    async def _call(self, func: Callable[..., _T], *args: Any) -> _T:
        return await anyio.to_thread.run_sync(functools.partial(func, *args), limiter=self._limiter)

    # -- the Tuner protocol -------------------------------------------------------------

    async def bind(self, parent_run_id: str) -> None:
        """The sweep's parent run: trials it left RUNNING in the study are marked FAIL."""
        self._parent = parent_run_id
        await self._call(self._fail_abandoned)

    async def ask(self, index: int) -> dict[str, Any]:
        """The next parameters Optuna's sampler proposes, for trial ``index``."""
        return await self._call(self._ask, index)

    async def tell(self, result: TrialResult) -> None:
        """Tell the study how trial ``result.index`` ended."""
        await self._call(self._tell, result)

    # -- the Stopper protocol -----------------------------------------------------------

    async def observe(self, trial: int, step: int, value: float) -> str | None:
        """Report ``value`` to the trial's Optuna trial; why its pruner prunes it, or None."""
        return await self._call(self._observe, trial, step, value)

    def ended(self, trial: int, status: RunStatus) -> None:
        """Note the last step a finished trial reported (see the class documentation)."""
        steps = self._reported.pop(trial, set()) | set(self._kept_curves.get(trial, {}))
        if status is RunStatus.FINISHED and steps:
            self._final_steps.append(max(steps))

    # -- in the worker thread -----------------------------------------------------------

    def _fail_abandoned(self) -> None:
        import optuna

        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for frozen in running:
            if frozen.user_attrs.get(PARENT_ATTR) == self._parent:
                self.study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)

    def _ask(self, index: int) -> dict[str, Any]:
        trial = self.study.ask(fixed_distributions=self._fixed)
        trial.set_user_attr(TRIAL_ATTR, index)
        if self._parent is not None:
            trial.set_user_attr(PARENT_ATTR, self._parent)
        if isinstance(self._space, Mapping):
            params = {**_constants(self._space), **trial.params}
        else:
            params = dict(self._space(trial))
        self._pending[index] = trial
        return {name: params[name] for name in params}

    def _values(self, result: TrialResult) -> list[float] | None:
        if not result.ok or any(m not in result.metrics for m in self.metrics):
            return None
        return [result.metrics[m] for m in self.metrics]

    def _tell(self, result: TrialResult) -> None:
        import optuna

        states = optuna.trial.TrialState
        trial = self._pending.pop(result.index, None)
        if trial is None:  # a trial a resumed sweep kept
            self._add_kept(result)
            return
        if result.run_id is not None:
            trial.set_user_attr(RUN_ATTR, result.run_id)
        values = self._values(result)
        if result.pruned:
            self.study.tell(trial, state=states.PRUNED)
        elif values is not None:
            self.study.tell(trial, values)
        else:
            self.study.tell(trial, state=states.FAIL)

    def _add_kept(self, result: TrialResult) -> None:
        import optuna

        curve = self._kept_curves.pop(result.index, {})
        known = self.study.get_trials(deepcopy=False)
        if any(t.user_attrs.get(RUN_ATTR) == result.run_id for t in known):
            return  # the study lives in its own storage and has it already
        values = self._values(result)
        states = optuna.trial.TrialState
        state = states.PRUNED if result.pruned else states.COMPLETE if values else states.FAIL
        try:
            distributions = self._fixed or _suggested(self._space, result.params)
            frozen = optuna.trial.create_trial(
                state=state,
                values=values if state is states.COMPLETE else None,
                params={k: result.params[k] for k in distributions},
                distributions=distributions,
                user_attrs={
                    TRIAL_ATTR: result.index,
                    PARENT_ATTR: self._parent,
                    RUN_ATTR: result.run_id,
                },
                intermediate_values=curve if self._prune else None,
            )
            self.study.add_trial(frozen)
        except (KeyError, ValueError, TypeError) as exc:
            logger.warning("Trial %d could not be added to the study: %s", result.index, exc)

    def _observe(self, index: int, step: int, value: float) -> str | None:
        trial = self._pending.get(index)
        if trial is None:  # a kept trial's curve, replayed before it is told
            self._kept_curves.setdefault(index, {})[step] = value
            return None
        reported = self._reported.setdefault(index, set())
        if not self._prune or step in reported:  # Optuna takes one value per step
            return None
        first = not reported
        reported.add(step)
        trial.report(value, step)
        if first or not any(last > step for last in self._final_steps or [step + 1]):
            return None
        if not trial.should_prune():
            return None
        pruner = type(self.study.pruner).__name__
        return f"Optuna {pruner}: {self.metric}={value:.6g} at step {step}"


def _distributions(space: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna's distributions for the ranges and choices of a space; constants stay out."""
    import optuna.distributions as od

    out: dict[str, Any] = {}
    for name, axis in space.items():
        if isinstance(axis, LogUniform):
            out[name] = od.FloatDistribution(axis.low, axis.high, log=True)
        elif isinstance(axis, Uniform):
            out[name] = od.FloatDistribution(axis.low, axis.high)
        elif isinstance(axis, IntUniform):
            out[name] = od.IntDistribution(axis.low, axis.high)
        elif isinstance(axis, Choice):
            out[name] = od.CategoricalDistribution(axis.values)
        elif isinstance(axis, (list, tuple, range)):
            out[name] = od.CategoricalDistribution(list(axis))
    return out


def _constants(space: Mapping[str, Any]) -> dict[str, Any]:
    kinds = (LogUniform, Uniform, IntUniform, Choice, list, tuple, range)
    return {name: value for name, value in space.items() if not isinstance(value, kinds)}


def _suggested(space: Space, params: Mapping[str, Any]) -> dict[str, Any]:
    """The distributions a define-by-run space suggests for ``params``."""
    import optuna

    fixed = optuna.trial.FixedTrial(dict(params))
    assert callable(space)
    space(fixed)  # type: ignore[arg-type]
    return dict(fixed.distributions)
