"""Early stopping: rules that stop running trials whose live metric falls behind."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aioproj.errors import InvalidArgumentError
from aioproj.sweeps.trials import Goal

__all__ = ["MedianStopping"]


@dataclass(frozen=True)
class MedianStopping:
    """Early stopping by the median rule, on a metric the trials log as they run.

    A running trial is stopped once it has logged ``metric`` at a step ``>= warmup_steps``
    with a value worse (by ``goal``) than the median of the values that at least
    ``min_trials`` ended trials logged at that step (their latest value at or before it).
    A stopped trial is recorded KILLED with the tag ``aioproj.sweep.pruned`` saying why.
    """

    metric: str
    goal: Goal = "min"
    warmup_steps: int = 0
    min_trials: int = 3

    def __post_init__(self) -> None:
        if self.goal not in ("min", "max"):
            raise InvalidArgumentError(f"goal must be 'min' or 'max', got {self.goal!r}")
        if self.min_trials < 1:
            raise InvalidArgumentError(f"min_trials must be >= 1, got {self.min_trials!r}")

    def verdict(self, step: int, value: float, ended: Sequence[Mapping[int, float]]) -> str | None:
        """Why a trial at ``value`` on ``step`` should stop, or None to let it go on.

        ``ended`` holds the ``{step: value}`` histories of ended trials. Pure.
        """
        if step < self.warmup_steps:
            return None
        peers = [v for v in (_value_at(h, step) for h in ended) if v is not None]
        if len(peers) < self.min_trials:
            return None
        median = _median(peers)
        worse = value > median if self.goal == "min" else value < median
        if not worse:
            return None
        return (
            f"median rule: {self.metric}={value:.6g} at step {step} is worse than the "
            f"median {median:.6g} of {len(peers)} ended trials"
        )


def _value_at(history: Mapping[int, float], step: int) -> float | None:
    steps = [s for s in history if s <= step]
    return history[max(steps)] if steps else None


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
