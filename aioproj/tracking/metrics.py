"""Live metrics: what runs log while they run, read with one shared poll per store.

A store reads new metric values of many runs in one call (:meth:`read_new_metrics`),
resuming from a :class:`MetricCursor` per run. The file store tails its metric files by
byte offset; the REST store and the mlflow adapter ask for the latest value of every
metric of up to 100 runs in one search request and fetch a metric's history only when
its latest value changed (:func:`read_new_via_history`).

:class:`MetricsPoller` runs one polling loop per store for every run someone follows
with :meth:`aioproj.SubmittedRun.metrics`, however many runs and followers there are.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectSendStream

logger = logging.getLogger("aioproj")

__all__ = [
    "FollowedRun",
    "Metric",
    "MetricCursor",
    "MetricsPoller",
    "MetricsReader",
    "read_new_via_history",
]

#: Runs per search request: MLflow's servers accept IN lists this long.
SEARCH_BATCH = 100
#: While the store cannot be read, rounds back off up to this many seconds apart.
MAX_BACKOFF = 30.0
#: Followers of a run that has ended give up after the store has failed this long.
GIVE_UP_AFTER = 600.0


@dataclass(frozen=True)
class Metric:
    """One value of a metric, as logged: ``timestamp`` in ms since the epoch."""

    key: str
    value: float
    timestamp: int
    step: int


@dataclass
class MetricCursor:
    """Where a reader left off in one run's metrics. Stores use the fields they need."""

    run_id: str
    experiment_id: str
    #: file store: bytes of each metric file already read
    offsets: dict[str, int] = field(default_factory=dict)
    #: search-based stores: the latest (timestamp, step, value) seen for each key
    latest: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    #: search-based stores: values of each key already delivered
    seen: dict[str, set[tuple[int, int, float]]] = field(default_factory=dict)


class MetricsReader(Protocol):
    """The part of a tracking store that live metrics need."""

    async def read_new_metrics(self, cursors: Sequence[MetricCursor]) -> list[list[Metric]]:
        """New values since each cursor, one list per cursor; advances the cursors.

        Values of one key come in the order they were logged. Raises TrackingError.
        """
        ...


LatestFn = Callable[[Sequence[MetricCursor]], Awaitable[Mapping[str, Sequence[Metric]]]]
HistoryFn = Callable[[str, str], Awaitable[Sequence[Metric]]]


async def read_new_via_history(
    cursors: Sequence[MetricCursor], latest: LatestFn, history: HistoryFn
) -> list[list[Metric]]:
    """New values from a store that answers "latest values of these runs" in one request.

    ``latest`` is called once per :data:`SEARCH_BATCH` runs; ``history`` once per key
    whose latest value changed since the last call.
    """
    out: list[list[Metric]] = [[] for _ in cursors]
    changed: list[tuple[int, str]] = []
    for start in range(0, len(cursors), SEARCH_BATCH):
        batch = cursors[start : start + SEARCH_BATCH]
        found = await latest(batch)
        for index, cursor in enumerate(batch, start):
            for metric in found.get(cursor.run_id, ()):
                mark = (metric.timestamp, metric.step, metric.value)
                if cursor.latest.get(metric.key) != mark:
                    cursor.latest[metric.key] = mark
                    changed.append((index, metric.key))
    histories: dict[tuple[str, str], Sequence[Metric]] = {}  # followers of one run share
    for index, key in changed:
        cursor = cursors[index]
        if (cursor.run_id, key) not in histories:
            histories[cursor.run_id, key] = await history(cursor.run_id, key)
        seen = cursor.seen.setdefault(key, set())
        for metric in histories[cursor.run_id, key]:
            mark = (metric.timestamp, metric.step, metric.value)
            if mark not in seen:
                seen.add(mark)
                out[index].append(metric)
    return out


class FollowedRun(Protocol):
    """What the poller reads of a run it follows (a :class:`aioproj.SubmittedRun`)."""

    @property
    def run_id(self) -> str: ...

    @property
    def experiment_id(self) -> str: ...

    @property
    def done(self) -> bool: ...


@dataclass(eq=False)
class _Follower:
    run: FollowedRun
    cursor: MetricCursor
    send: MemoryObjectSendStream[Metric]
    interval: float
    error: Exception | None = None


class MetricsPoller:
    """One polling loop per store for every followed run.

    The runner makes one per store; :meth:`follow` is what :meth:`SubmittedRun.metrics`
    iterates. The loop runs in the runner's task group while anyone follows a live run,
    and each round reads every followed run in one :meth:`MetricsReader.read_new_metrics`
    call, however many runs and followers there are.
    """

    def __init__(
        self,
        reader: MetricsReader,
        start_soon: Callable[[Callable[[], Coroutine[Any, Any, None]]], object],
        *,
        give_up_after: float = GIVE_UP_AFTER,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self._reader = reader
        self._start_soon = start_soon
        self._followers: list[_Follower] = []
        self._running = False
        self._wake = anyio.Event()
        self._give_up_after = give_up_after
        self._max_backoff = max_backoff
        #: When the store started failing (``anyio.current_time()``), None while it answers.
        self.failing_since: float | None = None
        self._failures = 0
        #: Polling rounds so far.
        self.rounds = 0

    async def follow(self, run: FollowedRun, *, interval: float = 0.5) -> AsyncIterator[Metric]:
        """Every value ``run`` logs: its history first, then new values, until it ends.

        Rounds are at most ``interval`` seconds apart (the shortest interval any follower
        asked for). Ends once the run has ended and a round after its end has read its
        last values. While the store cannot be read (a tracking server down), rounds go
        on with backoff (a warning is logged once per outage) and the values logged
        meanwhile arrive once it answers again; a run that has ended gives up after
        ``give_up_after`` seconds of failures and raises the store's TrackingError.
        Breaking out of the iteration or cancelling the task that iterates stops
        following; the run goes on.
        """
        cursor = MetricCursor(run.run_id, run.experiment_id)
        if run.done:  # nothing more will be logged: one read, no loop
            (found,) = await self._reader.read_new_metrics([cursor])
            for metric in found:
                yield metric
            return
        send, receive = anyio.create_memory_object_stream[Metric](math.inf)
        follower = _Follower(run, cursor, send, interval)
        self._followers.append(follower)
        self._wake.set()  # a new follower gets its history at once
        if not self._running:
            self._running = True
            self._start_soon(self._loop)
        try:
            async with receive:
                async for metric in receive:
                    yield metric
        finally:
            send.close()
        if follower.error is not None:
            raise follower.error

    async def _loop(self) -> None:
        try:
            while self._followers:
                self._wake = anyio.Event()
                await self._round()
                interval = min((f.interval for f in self._followers), default=0.0)
                if self._failures:  # back off while the store fails
                    interval = min(self._max_backoff, max(interval, 0.5) * 2**self._failures)
                with anyio.move_on_after(interval):
                    await self._wake.wait()
        finally:
            self._running = False
            for follower in self._followers:
                follower.send.close()
            self._followers.clear()

    async def _round(self) -> None:
        followers = [f for f in self._followers if _listening(f)]
        ended = [f.run.done for f in followers]  # those get this last round
        self.rounds += 1
        try:
            found = await self._reader.read_new_metrics([f.cursor for f in followers])
        except Exception as exc:
            self._failed(exc, followers)
            return
        if self.failing_since is not None:
            logger.warning(
                "Live metrics can be read again from %s, after %.0f s; values logged"
                " meanwhile follow.",
                _store_name(self._reader),
                anyio.current_time() - self.failing_since,
            )
            self.failing_since = None
            self._failures = 0
        for follower, was_done, new in zip(followers, ended, found, strict=True):
            for metric in new:
                try:
                    follower.send.send_nowait(metric)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    break
            if was_done:
                follower.send.close()
        self._followers = [f for f in self._followers if _listening(f)]

    def _failed(self, exc: Exception, followers: list[_Follower]) -> None:
        """A round failed: warn once per outage, back off; runs that have ended give
        up once the outage has lasted ``give_up_after`` seconds."""
        now = anyio.current_time()
        self._failures += 1
        if self.failing_since is None:
            self.failing_since = now
            logger.warning(
                "Could not read live metrics from %s (%s); retrying with backoff while the"
                " runs live.",
                _store_name(self._reader),
                exc,
            )
        if now - self.failing_since < self._give_up_after:
            return
        for follower in followers:
            if follower.run.done:
                follower.error = exc
                follower.send.close()
        self._followers = [f for f in self._followers if _listening(f)]


def _store_name(reader: MetricsReader) -> str:
    return repr(reader)


def _listening(follower: _Follower) -> bool:
    stats = follower.send.statistics()
    return stats.open_send_streams > 0 and stats.open_receive_streams > 0
