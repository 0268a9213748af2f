"""Job arrays: the runs of one :class:`~aioproj.backends.batch.TrialBatch` submitted with
one ``sbatch --array``.

The runs of a sweep reach :meth:`SlurmLaunch.start` one by one, each from its own task,
as soon as each is tracked. The first of a batch waits a moment for the others (until all
``size`` have arrived, or none has for ``quiet`` seconds, or ``longest`` seconds have
passed), then submits everyone who came as one array, ``%max_parallel`` at a time; each
run gets its array task. Runs of the batch that come later (a retried trial, stragglers)
form the next group. Runs are grouped only with runs that share every sbatch option and
the environment sbatch passes on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio

from aioproj.backends.batch import TrialBatch
from aioproj.errors import BackendError

__all__ = ["ArrayCollector"]

logger = logging.getLogger("aioproj.slurm")

M = TypeVar("M")
R = TypeVar("R")


@dataclass(eq=False)
class _Group(Generic[M, R]):
    batch: TrialBatch
    members: list[M] = field(default_factory=list)
    arrived: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    results: Sequence[R] = ()
    error: BaseException | None = None


class ArrayCollector(Generic[M, R]):
    """Gathers the members of a batch that arrive together and submits them at once with
    ``submit(members, max_parallel)``, which returns one result per member, in order."""

    def __init__(
        self,
        submit: Callable[[list[M], int], Awaitable[Sequence[R]]],
        *,
        quiet: float = 0.25,
        longest: float = 5.0,
    ) -> None:
        self._submit = submit
        self._quiet = quiet
        self._longest = longest
        self._open: dict[Hashable, _Group[M, R]] = {}
        self._submitted: dict[str, int] = {}

    async def join(self, batch: TrialBatch, group_key: Hashable, member: M) -> R:
        """Submit ``member`` with the other members of ``batch`` that share ``group_key``;
        its result.

        Raises :class:`BackendError` if the submission failed (each member gets its own
        exception).
        """
        key = (batch.key, group_key)
        group = self._open.get(key)
        if group is None:
            group = self._open[key] = _Group(batch)
            group.members.append(member)
            return await self._lead(key, group)
        index = len(group.members)
        group.members.append(member)
        group.arrived.set()
        await group.done.wait()
        if group.error is not None:
            raise BackendError(str(group.error)) from group.error
        return group.results[index]

    async def _lead(self, key: Hashable, group: _Group[M, R]) -> R:
        batch = group.batch
        deadline = anyio.current_time() + self._longest
        try:
            while self._submitted.get(batch.key, 0) + len(group.members) < batch.size:
                left = deadline - anyio.current_time()
                if left <= 0:
                    break
                group.arrived = anyio.Event()
                with anyio.move_on_after(min(self._quiet, left)) as scope:
                    await group.arrived.wait()
                if scope.cancelled_caught:
                    break
        finally:
            del self._open[key]  # later members start the next group
        self._submitted[batch.key] = self._submitted.get(batch.key, 0) + len(group.members)
        logger.info("Submitting %d runs of batch %s together", len(group.members), batch.key)
        try:
            group.results = await self._submit(group.members, batch.max_parallel)
        except BaseException as exc:
            group.error = exc
            # Not submitted: their retries may form an array again.
            self._submitted[batch.key] -= len(group.members)
            raise
        finally:
            group.done.set()
        return group.results[0]
