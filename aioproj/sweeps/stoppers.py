"""Early stopping: rules that stop running trials whose live metric falls behind.

A stopper sees every value of its ``metric`` that each trial logs, in the order logged
(:meth:`Stopper.observe`), and hears how each trial ended (:meth:`Stopper.ended`). Its
answer to a value is None (go on) or the reason to stop the trial now; the sweep then
cancels the trial, records it KILLED and tags it ``aioproj.sweep.pruned`` with the reason.
A stopper keeps what it has seen: give each sweep its own.

Two rules are built in, both pure bookkeeping with no I/O: :class:`MedianStopping` (the
median rule of Google Vizier) and :class:`ASHA` (asynchronous successive halving, Ray
Tune's default scheduler). :class:`aioproj.OptunaTuner` is a stopper too: it hands the
values to its study's pruner.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from aioproj.errors import InvalidArgumentError
from aioproj.handle import RunStatus
from aioproj.sweeps.trials import Goal

__all__ = ["ASHA", "MedianStopping", "Stopper", "percentile"]


@runtime_checkable
class Stopper(Protocol):
    """Decides from live metric values which running trials to stop.

    ``observe`` is called for each value of ``metric`` a trial logs, in order, also for
    values read after the trial ended (then its answer is ignored) and, when a sweep
    resumes, for the histories of the trials it keeps. ``ended`` is called once a trial
    has ended, after its last ``observe``. Either may be a coroutine function.
    """

    @property
    def metric(self) -> str:
        """The metric whose values the stopper judges."""
        ...

    def observe(self, trial: int, step: int, value: float) -> str | Awaitable[str | None] | None:
        """Trial ``trial`` logged ``value`` at ``step``: why it should stop now, or None."""
        ...

    def ended(self, trial: int, status: RunStatus) -> Awaitable[None] | None:
        """Trial ``trial`` has ended with ``status``."""
        ...


def _check_goal(goal: str) -> None:
    if goal not in ("min", "max"):
        raise InvalidArgumentError(f"goal must be 'min' or 'max', got {goal!r}")


@dataclass(frozen=True)
class _Curve:
    """An ended trial's history, sorted by step, for quick lookups."""

    steps: list[int]
    values: list[float]

    @classmethod
    def of(cls, history: Mapping[int, float]) -> _Curve:
        steps = sorted(history)
        return cls(steps, [history[s] for s in steps])

    def at(self, step: int) -> float | None:
        """The latest value at or before ``step``."""
        where = bisect.bisect_right(self.steps, step)
        return self.values[where - 1] if where else None

    def goes_on_after(self, step: int) -> bool:
        return bool(self.steps) and self.steps[-1] > step


@dataclass(frozen=True)
class MedianStopping:
    """Early stopping by the median rule, on a metric the trials log as they run.

    A running trial is stopped once it has logged ``metric`` at a step ``>= warmup_steps``
    with a value worse (by ``goal``) than the median of the values that at least
    ``min_trials`` FINISHED trials logged at that step (their latest value at or before
    it). Only FINISHED trials that logged the metric at a later step count: so a metric
    logged once per run (a final score) never stops a trial, nor does the last step
    the finished trials reached.
    """

    metric: str
    goal: Goal = "min"
    warmup_steps: int = 5
    min_trials: int = 3
    _seen: dict[int, dict[int, float]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _finished: list[_Curve] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_goal(self.goal)
        if self.min_trials < 1:
            raise InvalidArgumentError(f"min_trials must be >= 1, got {self.min_trials!r}")
        if self.warmup_steps < 0:
            raise InvalidArgumentError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")

    def observe(self, trial: int, step: int, value: float) -> str | None:
        """Keep the value; why the trial should stop by the median rule, or None."""
        self._seen.setdefault(trial, {})[step] = value
        return self._judge(step, value, self._finished)

    def ended(self, trial: int, status: RunStatus) -> None:
        """A FINISHED trial's history joins the peers; others are forgotten."""
        history = self._seen.pop(trial, None)
        if status is RunStatus.FINISHED and history:
            self._finished.append(_Curve.of(history))

    def verdict(self, step: int, value: float, ended: Sequence[Mapping[int, float]]) -> str | None:
        """Why a trial at ``value`` on ``step`` should stop, or None to let it go on.

        ``ended`` holds the ``{step: value}`` histories of finished trials. Pure.
        """
        return self._judge(step, value, [_Curve.of(h) for h in ended])

    def _judge(self, step: int, value: float, ended: Sequence[_Curve]) -> str | None:
        if step < self.warmup_steps or len(ended) < self.min_trials:
            return None
        peers = [v for c in ended if c.goes_on_after(step) and (v := c.at(step)) is not None]
        if len(peers) < self.min_trials:
            return None
        median = percentile(peers, 50)
        assert median is not None
        worse = value > median if self.goal == "min" else value < median
        if not worse:
            return None
        return (
            f"median rule: {self.metric}={value:.6g} at step {step} is worse than the "
            f"median {median:.6g} of {len(peers)} finished trials"
        )


@dataclass(frozen=True)
class ASHA:
    """Asynchronous successive halving (Li et al., 2018), as Ray Tune's
    ``AsyncHyperBandScheduler`` (one bracket) runs it, on the steps of a live metric.

    Rungs sit at ``grace_period * reduction_factor**k`` steps, for every ``k`` whose rung
    lies below ``max_t`` (the last step trials reach). The first value a trial logs at
    or past a rung it has not reached before is recorded there, and the trial is stopped
    if it is worse than the best ``1/reduction_factor`` of the values recorded at that
    rung so far (the ``1 - 1/reduction_factor`` quantile, linearly interpolated, of the
    earlier trials); the first trial at a rung always goes on. Once recorded at a rung,
    a trial is not judged again at a lower one. A trial's first value never stops it
    (it may be the only one it logs: a final score), nor do values before the first rung
    or values that are not finite (NaN, infinity), which are not recorded.
    """

    metric: str
    goal: Goal = "min"
    max_t: int = 100
    grace_period: int = 1
    reduction_factor: float = 4
    _rungs: list[tuple[float, dict[int, float]]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )
    _seen: set[int] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_goal(self.goal)
        if self.grace_period < 1:
            raise InvalidArgumentError(f"grace_period must be >= 1, got {self.grace_period!r}")
        if self.max_t <= self.grace_period:
            raise InvalidArgumentError(
                f"max_t must be larger than grace_period, got {self.max_t!r} <= "
                f"{self.grace_period!r}"
            )
        if not self.reduction_factor > 1:
            raise InvalidArgumentError(
                f"reduction_factor must be > 1, got {self.reduction_factor!r}"
            )
        milestone = float(self.grace_period)
        while milestone < self.max_t:
            self._rungs.insert(0, (milestone, {}))  # highest first, as Ray keeps them
            milestone *= self.reduction_factor

    @property
    def rungs(self) -> tuple[float, ...]:
        """The steps of the rungs, lowest first."""
        return tuple(milestone for milestone, _ in reversed(self._rungs))

    def observe(self, trial: int, step: int, value: float) -> str | None:
        """Record the value at the highest new rung it reaches; why the trial should stop
        there, or None."""
        if not math.isfinite(value):
            return None
        first = trial not in self._seen
        self._seen.add(trial)
        reward = -value if self.goal == "min" else value  # higher is better, as in Ray
        for milestone, recorded in self._rungs:
            if step < milestone:
                continue
            if trial in recorded:  # judged here already: the decision stands
                return None
            cutoff = percentile(list(recorded.values()), (1 - 1 / self.reduction_factor) * 100)
            recorded[trial] = reward
            if first or cutoff is None or reward >= cutoff:
                return None
            shown = -cutoff if self.goal == "min" else cutoff
            return (
                f"ASHA: {self.metric}={value:.6g} at step {step} is outside the best "
                f"1/{self.reduction_factor:g} of the {len(recorded) - 1} trials at rung "
                f"{milestone:g} (cutoff {shown:.6g})"
            )
        return None

    def ended(self, trial: int, status: RunStatus) -> None:
        """Nothing to do: a trial's rung values stay, whatever its end."""


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile of ``values`` with linear interpolation (numpy's default);
    None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
