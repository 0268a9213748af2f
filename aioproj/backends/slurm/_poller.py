"""One poller per backend for every job it follows: one status command per round.

Each round runs ``squeue --me -h -t all -r`` once: every job of the user that slurmctld
still holds, finished ones included (for ``MinJobAge``, 300 s by default), array tasks one
by one. Only jobs that ended badly (for their exit code) or that are missing (they aged
out of slurmctld's memory) cost one more command in that round, for all of them at once:
``sacct``, or ``sacct -c`` without slurmdbd, or ``scontrol show job`` as the last resort.
The interval adapts: short after a change or a cancel, growing when nothing changes.

No task of its own: the poller runs inside the ``wait()`` (or ``cancel()``) of one of
the jobs it follows, the leader; when the leader's job ends, another follower takes over.
So polling stops when nobody waits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio

from aioproj._status import RunStatus
from aioproj.errors import BackendError

from ._cli import QueueRow, SlurmCli
from ._state import SCHEDULED_STATES, JobInfo

__all__ = ["Poller", "Watch"]

logger = logging.getLogger("aioproj.slurm")

#: Rounds a job may be missing from both squeue and the accounts before it is given up.
_MAX_MISSES = 5


@dataclass(eq=False)
class Watch:
    """One followed job: what the poller learned, and how its followers are woken."""

    job_id: str
    status: RunStatus = RunStatus.SCHEDULED
    info: JobInfo | None = None
    #: The job's own id once it runs (an array task's id differs from ``123_4``).
    raw_id: str = ""
    done: anyio.Event = field(default_factory=anyio.Event)
    error: Exception | None = None
    #: Set (and replaced) whenever the status changes.
    changed: anyio.Event = field(default_factory=anyio.Event)
    misses: int = 0
    followers: int = 0
    _waiters: list[anyio.Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.raw_id and "_" not in self.job_id:
            self.raw_id = self.job_id  # an array task's own id is known once it runs

    def update(self, info: JobInfo) -> bool:
        """Take a new answer about the job; True if its status changed or is final."""
        if self.done.is_set():
            return False
        status, final = info.status, info.final
        moved = status is not self.status
        self.status, self.info = status, info
        if moved:
            self.changed.set()
            self.changed = anyio.Event()
        if final:
            self.finish()
        return moved or final

    def finish(self, error: Exception | None = None) -> None:
        if error is not None:
            self.error = error
        self.done.set()
        self.changed.set()
        self.wake()

    def wake(self) -> None:
        """Wake this job's followers (one of them takes over the polling)."""
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()

    async def sleep(self) -> None:
        """Wait for :meth:`wake`."""
        event = anyio.Event()
        self._waiters.append(event)
        await event.wait()


class Poller:
    """Follows the jobs of one backend. ``rounds``, ``round_commands`` (the status
    commands each round ran) and ``round_active`` (the jobs followed in it) are kept for
    tests and benchmarks."""

    def __init__(
        self,
        cli: SlurmCli,
        *,
        min_interval: float = 0.5,
        max_interval: float = 15.0,
        max_failures: int = 10,
    ) -> None:
        self._cli = cli
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._max_failures = max_failures
        self._watches: dict[str, Watch] = {}
        self._leader: Watch | None = None
        self._interval = min_interval
        self._nudged = anyio.Event()
        self._failures = 0
        self.rounds = 0
        self.round_commands: list[int] = []
        self.round_active: list[int] = []

    @property
    def active(self) -> int:
        return len(self._watches)

    def nudge(self) -> None:
        """Poll now (a job was cancelled)."""
        self._interval = self.min_interval
        self._nudged.set()

    async def follow(self, watch: Watch) -> None:
        """Return once ``watch`` is done (its job ended, or following it failed).

        Several callers may follow one watch. Cancellation stops this caller only; the
        job goes on, and another follower keeps polling. A job nobody follows any more
        is no longer polled.
        """
        self._watches[watch.job_id] = watch
        watch.followers += 1
        if self._interval >= 4 * self.min_interval:
            # A new job after a quiet spell: look soon, not up to max_interval later
            # (but not once per job of a burst: the interval is short during one).
            self.nudge()
        try:
            while not watch.done.is_set():
                if self._leader is None:
                    self._leader = watch
                    try:
                        await self._lead(watch)
                    finally:
                        self._leader = None
                else:
                    await watch.sleep()
        finally:
            watch.followers -= 1
            if watch.followers <= 0 and self._watches.get(watch.job_id) is watch:
                del self._watches[watch.job_id]
            if self._leader is None:
                self._hand_over()

    def _hand_over(self) -> None:
        for other in self._watches.values():
            if not other.done.is_set() and other.followers > 0:
                other.wake()
                return

    async def _lead(self, mine: Watch) -> None:
        while not mine.done.is_set():
            with anyio.move_on_after(self._interval):
                await self._nudged.wait()
            self._nudged = anyio.Event()
            before = self._cli.status_calls
            try:
                changed = await self._round()
                self._failures = 0
            except BackendError as exc:
                changed = False
                self._failures += 1
                logger.warning("Polling Slurm failed (%d in a row): %s", self._failures, exc)
                if self._failures >= self._max_failures:
                    for watch in list(self._watches.values()):
                        watch.finish(exc)
                    return
                self._interval = self.max_interval
            self.rounds += 1
            self.round_commands.append(self._cli.status_calls - before)
            if changed:
                self._interval = self.min_interval
            else:
                self._interval = min(self.max_interval, self._interval * 1.5)

    async def _round(self) -> bool:
        watches = [w for w in self._watches.values() if not w.done.is_set()]
        if not watches:
            return False
        self.round_active.append(len(watches))
        rows = await self._cli.queue()
        changed = False
        lookups: dict[str, str] = {}
        for watch in watches:
            row = rows.get(watch.job_id)
            if row is None:
                watch.misses += 1
                lookups[watch.job_id] = watch.raw_id
                continue
            watch.misses = 0
            if row.info.state not in SCHEDULED_STATES:
                watch.raw_id = row.raw_id  # a pending task shows its array's id
            if row.info.final and row.info.status is RunStatus.FAILED:
                lookups[watch.job_id] = watch.raw_id  # for its exit code
                continue
            changed |= watch.update(row.info)
        if lookups:
            changed |= await self._look_up(lookups, rows)
        return changed

    async def _look_up(self, lookups: dict[str, str], rows: dict[str, QueueRow]) -> bool:
        """Exit codes of jobs that ended badly, and the end of jobs squeue forgot."""
        found = await self._cli.ended(lookups)
        changed = False
        for job in lookups:
            watch = self._watches.get(job)
            if watch is None or watch.done.is_set():
                continue
            row = rows.get(job)
            info = found.get(job)
            if row is not None:
                queued = row.info
                changed |= watch.update(
                    JobInfo(
                        state=queued.state,
                        reason=queued.reason,
                        exit_code=info.exit_code if info is not None else None,
                        signal=info.signal if info is not None else None,
                    )
                )
            elif info is not None and info.final:
                changed |= watch.update(info)
            elif watch.misses >= _MAX_MISSES:
                watch.finish(
                    BackendError(
                        f"Slurm no longer knows job {job}: it is neither in squeue nor in "
                        f"the job accounts ({self._cli.accounting or 'none'}), so how it "
                        "ended cannot be read."
                    )
                )
                changed = True
        return changed
