"""The :class:`Tuner` protocol: an ask/tell optimiser that proposes a sweep's parameters."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from aioproj.sweeps.trials import TrialResult

__all__ = ["Tuner"]


@runtime_checkable
class Tuner(Protocol):
    """Proposes parameter sets as results arrive (an ask/tell optimiser).

    ``ask(index)`` is called whenever a trial slot is free and returns the parameters of
    trial ``index``, or None when it has nothing more to try (the sweep then ends once
    the running trials end). ``tell(result)`` is called as each trial ends, before the
    result is yielded. Either may be a coroutine function. An exception from either
    stops the sweep like a failed trial under ``fail_fast``, and is raised to the caller.

    A tuner may also define ``bind(parent_run_id)`` (sync or async), called once with
    the sweep's parent run id before the first ``tell`` or ``ask``, the same id again
    when the sweep is resumed. A resumed sweep tells the tuner each trial it keeps (with
    ``result.resumed`` True) before it asks for more.
    """

    def ask(self, index: int) -> Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None:
        """The parameters of trial ``index``, or None for no more trials."""
        ...

    def tell(self, result: TrialResult) -> Awaitable[None] | None:
        """A trial has ended with ``result``."""
        ...
