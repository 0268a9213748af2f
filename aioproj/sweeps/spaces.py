"""Parameter spaces of a sweep: grids (every combination) and random samples.

A grid maps names to lists of values (a single value holds a parameter fixed);
:func:`expand_grid` gives every combination. A space maps names to distributions
(:class:`Uniform`, :class:`LogUniform`, :class:`IntUniform`, :class:`Choice`; a plain list
is a choice); :func:`sample_space` draws parameter sets from it, the same ones for the
same seed. Pure functions, no I/O.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aioproj.errors import InvalidArgumentError

__all__ = [
    "Choice",
    "IntUniform",
    "LogUniform",
    "Plan",
    "Uniform",
    "check_names",
    "expand_grid",
    "sample_space",
]


class _Distribution:
    def sample(self, rng: random.Random) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Uniform(_Distribution):
    """A float drawn uniformly from ``[low, high]``."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise InvalidArgumentError(f"Uniform needs low <= high, got {self.low}, {self.high}")

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)


@dataclass(frozen=True)
class LogUniform(_Distribution):
    """A float whose logarithm is uniform in ``[log(low), log(high)]``; ``0 < low <= high``."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high:
            raise InvalidArgumentError(
                f"LogUniform needs 0 < low <= high, got {self.low}, {self.high}"
            )

    def sample(self, rng: random.Random) -> float:
        return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))


@dataclass(frozen=True)
class IntUniform(_Distribution):
    """An integer drawn uniformly from ``low`` to ``high``, both included."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise InvalidArgumentError(f"IntUniform needs low <= high, got {self.low}, {self.high}")

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass(frozen=True)
class Choice(_Distribution):
    """One of ``values``, each as likely (a plain list in a sampled grid means the same)."""

    values: tuple[Any, ...]

    def __init__(self, values: Sequence[Any]) -> None:
        if isinstance(values, (str, bytes)) or not len(values):
            raise InvalidArgumentError(f"Choice needs a non-empty list of values, got {values!r}")
        object.__setattr__(self, "values", tuple(values))

    def sample(self, rng: random.Random) -> Any:
        return rng.choice(self.values)


def _values(name: str, value: Any) -> list[Any]:
    """The values of one grid axis: a list or tuple as given, anything else as one value."""
    if isinstance(value, _Distribution) and not isinstance(value, Choice):
        raise InvalidArgumentError(
            f"Grid parameter {name!r} is a distribution ({value!r}); give samples=N to "
            "draw random parameter sets from it."
        )
    values = list(value.values) if isinstance(value, Choice) else value
    if isinstance(values, (list, tuple, range)):
        if not len(values):
            raise InvalidArgumentError(f"Grid parameter {name!r} has no values.")
        return list(values)
    return [values]


def check_names(grid: Mapping[str, Any]) -> None:
    for name in grid:
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"Parameter names must be non-empty strings, got {name!r}")


def expand_grid(grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of a grid's values (the first name varies slowest).

    Raises:
        InvalidArgumentError: an axis with no values, a distribution without sampling.
    """
    check_names(grid)
    axes = [_values(name, value) for name, value in grid.items()]
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*axes)]


def sample_space(space: Mapping[str, Any], n: int, seed: int | None) -> list[dict[str, Any]]:
    """``n`` random parameter sets from ``space``: distributions are sampled, lists are
    choices, other values are constants. The same seed gives the same sets.

    Raises:
        InvalidArgumentError: ``n`` < 1 or an empty list of choices.
    """
    check_names(space)
    if n < 1:
        raise InvalidArgumentError(f"samples must be a positive integer, got {n!r}")
    axes: dict[str, _Distribution | Any] = {}
    for name, value in space.items():
        if isinstance(value, _Distribution):
            axes[name] = value
        elif isinstance(value, (list, tuple, range)):
            axes[name] = Choice(list(value)) if len(value) else _values(name, value)
        else:
            axes[name] = value
    rng = random.Random(seed)
    return [
        {
            name: axis.sample(rng) if isinstance(axis, _Distribution) else axis
            for name, axis in axes.items()
        }
        for _ in range(n)
    ]


@dataclass(frozen=True)
class Plan:
    """The parameter sets of a sweep without a tuner, in trial order.

    Random samples also keep their ``seed`` and how to draw them again with another
    one (``resample``): a resumed sweep given no seed draws with the one it recorded.
    """

    sets: list[dict[str, Any]]
    seed: int | None = None
    seed_given: bool = True
    resample: Callable[[int], list[dict[str, Any]]] | None = None
