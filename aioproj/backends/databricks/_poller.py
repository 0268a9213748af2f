"""One poller per workspace for every active run: a few list requests per round.

Each round asks ``runs/list?completed_only=true`` for the runs that ended since the last
round (newest end first, paging only while the ends are newer than the watermark), so a
steady state costs one request per round whatever the number of active runs. Every few
rounds (more rarely the more runs there are, so that it costs at most one request per
round on average) an ``active_only=true`` sweep refreshes PENDING/RUNNING states, and any
followed run missing from both lists is read once with ``runs/get``. The interval adapts:
short after a change, a cancel or a new run, growing when nothing changes.

No task of its own: the poller runs inside the ``wait()`` of one of the runs it follows
(the leader); when the leader's run ends, another follower takes over. So polling stops
when nobody waits, and belongs to the runner's supervising tasks like everything else.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from aioproj._status import RunStatus

from ._client import DatabricksApiError, DatabricksClient

__all__ = ["Poller", "Watch", "map_state"]

logger = logging.getLogger("aioproj.databricks")

_LIST = "/api/2.2/jobs/runs/list"
_PAGE = 25
#: End times this much older than the newest seen are still listed again (clock jitter,
#: runs that become visible late).
_WATERMARK_MARGIN_MS = 2_000
_START_MARGIN_MS = 60_000

_SCHEDULED = frozenset({"QUEUED", "PENDING", "BLOCKED", "WAITING_FOR_RETRY", "WAITING"})
_RUNNING = frozenset({"RUNNING", "TERMINATING"})
_TERMINAL = frozenset({"TERMINATED", "SKIPPED", "INTERNAL_ERROR"})
_KILLED_RESULTS = frozenset({"CANCELED", "UPSTREAM_CANCELED"})
_KILLED_CODES = frozenset({"USER_CANCELED", "CANCELED"})


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _word(value: object) -> str | None:
    return value if isinstance(value, str) else None


def map_state(run: Mapping[str, Any]) -> tuple[RunStatus, bool]:
    """The RunStatus of a Jobs run (``runs/get`` or a ``runs/list`` item), and whether
    it is final.

    Decided on the life-cycle state (MLflow looks only at ``result_state`` and polls a
    result-less terminal run forever): TERMINATED + SUCCESS is FINISHED; CANCELED is
    KILLED; every other end (FAILED, TIMEDOUT, INTERNAL_ERROR, SKIPPED, ...) is FAILED.
    The 2.2 ``status`` object is used when ``state`` is absent; unknown states, and
    fields of the wrong type, count as still running. Never raises.
    """
    state = _mapping(run.get("state"))
    lcs = _word(state.get("life_cycle_state"))
    result = _word(state.get("result_state"))
    if lcs is None:
        status = _mapping(run.get("status"))
        v2 = _word(status.get("state"))
        if v2 == "TERMINATED":
            code = _word(_mapping(status.get("termination_details")).get("code"))
            if code in ("SUCCESS", "SUCCESS_WITH_FAILURES"):
                return RunStatus.FINISHED if code == "SUCCESS" else RunStatus.FAILED, True
            return RunStatus.KILLED if code in _KILLED_CODES else RunStatus.FAILED, True
        lcs = v2
    if lcs in _TERMINAL:
        if lcs == "TERMINATED" and result == "SUCCESS":
            return RunStatus.FINISHED, True
        if result in _KILLED_RESULTS:
            return RunStatus.KILLED, True
        return RunStatus.FAILED, True
    if lcs in _SCHEDULED:
        return RunStatus.SCHEDULED, False
    return RunStatus.RUNNING, False


@dataclass(eq=False)
class Watch:
    """One followed run: what the poller learned, and how its follower is woken."""

    run_id: int
    start_time_ms: int
    status: RunStatus = RunStatus.SCHEDULED
    run: Mapping[str, Any] = field(default_factory=dict)
    done: anyio.Event = field(default_factory=anyio.Event)
    error: Exception | None = None
    wake: anyio.Event = field(default_factory=anyio.Event)

    def update(self, run: Mapping[str, Any]) -> bool:
        """Take a new answer about the run; True if its status changed."""
        if self.done.is_set():
            return False
        status, final = map_state(run)
        changed = status is not self.status or final
        self.status, self.run = status, run
        if final:
            self.finish()
        return changed

    def finish(self, error: Exception | None = None) -> None:
        if error is not None:
            self.error = error
        self.done.set()
        self.wake.set()


class Poller:
    """Follows the runs of one workspace. ``rounds`` and ``round_requests`` are kept for
    benchmarks: the number of rounds so far and the requests each one sent (retries of
    one request not counted)."""

    def __init__(
        self,
        client: DatabricksClient,
        *,
        min_interval: float = 1.0,
        max_interval: float = 30.0,
    ) -> None:
        self._client = client
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._watches: dict[int, Watch] = {}
        self._leader: Watch | None = None
        self._interval = min_interval
        self._nudged = anyio.Event()
        self._watermark_ms = 0
        self._failures = 0
        self._since_sweep = 0
        self._sent = 0
        self.rounds = 0
        self.round_requests: list[int] = []
        #: Runs followed in each round: what one request per run per round would cost.
        self.round_active: list[int] = []

    @property
    def active(self) -> int:
        return len(self._watches)

    def nudge(self) -> None:
        """Poll soon (a run was cancelled or added)."""
        self._interval = self.min_interval
        self._nudged.set()

    async def follow(self, watch: Watch) -> None:
        """Return once ``watch`` is done (its run ended, or following it failed).

        Cancellation stops following this run only; another follower keeps polling.
        """
        self._watches[watch.run_id] = watch
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
                    watch.wake = anyio.Event()
                    await watch.wake.wait()
        finally:
            self._watches.pop(watch.run_id, None)
            if self._leader is None:
                self._hand_over()

    def _hand_over(self) -> None:
        for other in self._watches.values():
            if not other.done.is_set():
                other.wake.set()
                return

    async def _lead(self, mine: Watch) -> None:
        while not mine.done.is_set():
            with anyio.move_on_after(self._interval):
                await self._nudged.wait()
            self._nudged = anyio.Event()
            self._sent = 0
            try:
                changed = await self._round()
                self._failures = 0
            except DatabricksApiError as exc:
                changed = False
                self._failures += 1
                permanent = exc.status_code in (400, 401, 403, 404)
                logger.warning(
                    "Polling Databricks runs failed (%d in a row): %s", self._failures, exc
                )
                if permanent or self._failures >= 3:
                    for watch in list(self._watches.values()):
                        watch.finish(exc)
                    return
                self._interval = self.max_interval
            self.rounds += 1
            self.round_requests.append(self._sent)
            if changed:
                self._interval = self.min_interval
            else:
                self._interval = min(self.max_interval, self._interval * 1.5)

    async def _round(self) -> bool:
        watches = [w for w in self._watches.values() if not w.done.is_set()]
        if not watches:
            return False
        self.round_active.append(len(watches))
        changed = False
        pages = math.ceil(len(watches) / _PAGE)
        self._since_sweep += 1
        swept: set[int] | None = None
        if self._since_sweep >= max(3, pages):
            # Active runs first: a run that ends meanwhile is then in the completed list.
            self._since_sweep = 0
            swept, changed = await self._sweep(watches)
        changed |= await self._completed(watches)
        if swept is not None:
            # Neither listed as active nor seen ending (deleted, or listed late): read it.
            for watch in watches:
                if watch.run_id not in swept and not watch.done.is_set():
                    self._sent += 1
                    try:
                        run = await self._client.call(
                            "GET", "/api/2.2/jobs/runs/get", params={"run_id": str(watch.run_id)}
                        )
                    except DatabricksApiError as exc:
                        if exc.status_code not in (400, 404):
                            raise
                        watch.finish(exc)  # deleted: this run alone cannot be followed
                        changed = True
                        continue
                    changed |= watch.update(run)
        return changed

    async def _list(self, params: dict[str, str]) -> list[Mapping[str, Any]]:
        self._sent += 1
        body = await self._client.call("GET", _LIST, params=params)
        runs = body.get("runs") or []
        token = body.get("next_page_token")
        if token:
            params["page_token"] = str(token)
        else:
            params.pop("page_token", None)
        return [r for r in runs if isinstance(r, Mapping)]

    async def _completed(self, watches: list[Watch]) -> bool:
        oldest_start = min(w.start_time_ms for w in watches)
        floor = max(self._watermark_ms, oldest_start) - _WATERMARK_MARGIN_MS
        params = {
            "completed_only": "true",
            "run_type": "SUBMIT_RUN",
            "limit": str(_PAGE),
            "start_time_from": str(max(0, oldest_start - _START_MARGIN_MS)),
        }
        changed = False
        newest = self._watermark_ms
        while True:
            runs = await self._list(params)
            for run in runs:
                end = int(run.get("end_time") or 0)
                newest = max(newest, end)
                watch = self._watches.get(int(run.get("run_id") or 0))
                if watch is not None:
                    changed |= watch.update(run)
            ends = [int(r.get("end_time") or 0) for r in runs]
            if "page_token" not in params or not runs or min(ends) < floor:
                break
        self._watermark_ms = newest
        return changed

    async def _sweep(self, watches: list[Watch]) -> tuple[set[int], bool]:
        params = {
            "active_only": "true",
            "run_type": "SUBMIT_RUN",
            "limit": str(_PAGE),
            "start_time_from": str(
                max(0, min(w.start_time_ms for w in watches) - _START_MARGIN_MS)
            ),
        }
        seen: set[int] = set()
        changed = False
        while True:
            for run in await self._list(params):
                run_id = int(run.get("run_id") or 0)
                seen.add(run_id)
                watch = self._watches.get(run_id)
                if watch is not None:
                    changed |= watch.update(run)
            if "page_token" not in params:
                break
        return seen, changed
