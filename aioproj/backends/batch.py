"""Runs started as one batch: how a sweep tells a backend that its trials belong together.

A sweep whose trials are all known in advance (a grid, a list, random samples) sets
:data:`current_batch` around the ``run()`` calls of its trials and starts them all at
once, instead of ``max_parallel`` at a time. A backend that can run such a batch as one
unit (:attr:`submits_batches`, e.g. Slurm, which submits one job array whose tasks run at
most ``max_parallel`` at a time) reads it in :meth:`Launch.start`; every other backend
ignores it and the sweep keeps its own limit. Adaptive sweeps (tuners) set no batch.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

__all__ = ["TrialBatch", "current_batch", "submits_batches"]


@dataclass(frozen=True)
class TrialBatch:
    """Runs that one sweep starts together.

    ``key`` names the batch (the sweep's parent run id), ``size`` is how many runs it
    has, ``max_parallel`` how many of them may run at once.
    """

    key: str
    size: int
    max_parallel: int


#: The batch the runs started in this context belong to, if any.
current_batch: contextvars.ContextVar[TrialBatch | None] = contextvars.ContextVar(
    "aioproj_current_batch", default=None
)


def submits_batches(backend: object) -> bool:
    """True if ``backend`` runs a :class:`TrialBatch` as one unit and enforces its
    ``max_parallel`` itself (its ``submits_batches`` attribute)."""
    return bool(getattr(backend, "submits_batches", False))
