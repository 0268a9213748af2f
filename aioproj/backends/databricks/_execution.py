"""A run on Databricks once submitted: followed through the workspace's shared poller,
its output read, cancelled with runs/cancel."""

from __future__ import annotations

import logging
from collections.abc import Callable

from aioproj._status import RunStatus
from aioproj.errors import AioprojError

from ._client import DatabricksClient
from ._poller import Poller, Watch

__all__ = ["JOBS_API", "DatabricksExecution"]

logger = logging.getLogger("aioproj.databricks")

#: The Jobs API (2.2) every request of the backend goes to.
JOBS_API = "/api/2.2/jobs"


class DatabricksExecution:
    """A run on Databricks as the handle sees it. ``run_id`` is the Databricks run id."""

    waits_for_stop = False

    def __init__(
        self,
        client: DatabricksClient,
        poller: Poller,
        watch: Watch,
        task_run_id: int,
        feed: Callable[[bytes], None],
        close_output: Callable[[], None],
    ) -> None:
        self._client = client
        self._poller = poller
        self._watch = watch
        self.run_id = watch.run_id
        self.task_run_id = task_run_id
        self._feed = feed
        self._close_output = close_output
        self._cancel_sent = False
        #: Why a cancel request could not be sent, if it could not.
        self.cancel_error: Exception | None = None
        #: What the run journal keeps to find the run again (set by the launch).
        self.journal_state: dict[str, object] = {}

    def __repr__(self) -> str:
        return f"<DatabricksExecution run_id={self.run_id} status={self._watch.status.value}>"

    def status(self) -> RunStatus:
        return self._watch.status

    async def wait(self) -> RunStatus:
        """Follow the run (through the shared poller) to its end, then fetch its output.

        Raises BackendError if the workspace keeps refusing the poller's requests.
        """
        try:
            if not self._watch.done.is_set():
                await self._poller.follow(self._watch)
            if self._watch.error is not None:
                raise self._watch.error
            await self._fetch_output()
            return self._watch.status
        finally:
            self._close_output()

    async def _fetch_output(self) -> None:
        client = self._client
        try:
            out = await client.call(
                "GET", f"{JOBS_API}/runs/get-output", params={"run_id": str(self.task_run_id)}
            )
        except AioprojError as exc:
            self._feed(f"=== aioproj: could not fetch the run's output: {exc} ===\n".encode())
            return
        logs = out.get("logs")
        if isinstance(logs, str) and logs:
            self._feed(logs.encode() if logs.endswith("\n") else (logs + "\n").encode())
        if out.get("logs_truncated"):
            self._feed(b"=== Databricks kept only the last 5 MB of this output ===\n")
        error = out.get("error")
        trace = out.get("error_trace")
        if isinstance(trace, str) and trace and (not isinstance(logs, str) or trace not in logs):
            self._feed((trace.rstrip("\n") + "\n").encode())
        state = (self._watch.run.get("state") or {}) if self._watch.run else {}
        ending = state.get("result_state") or state.get("life_cycle_state") or "?"
        message = state.get("state_message") or ""
        if isinstance(error, str) and error:
            message = error
        if self._watch.status is not RunStatus.FINISHED:
            tail = f": {message}" if message else ""
            self._feed(f"=== Databricks run {self.run_id} ended {ending}{tail} ===\n".encode())

    async def cancel(self) -> None:
        """Ask Databricks to cancel the run (``runs/cancel``) and return at once.

        Idempotent. Never raises: if the request cannot be sent, the error is logged and
        kept in :attr:`cancel_error`, and the run is still followed to its end.
        """
        if self._watch.done.is_set() or self._cancel_sent:
            return
        self._cancel_sent = True
        try:
            await self._client.call(
                "POST", f"{JOBS_API}/runs/cancel", json={"run_id": self.run_id}, repeatable=True
            )
        except AioprojError as exc:
            self._cancel_sent = False
            self.cancel_error = exc
            logger.error("Could not cancel Databricks run %s: %s", self.run_id, exc)
            return
        self._poller.nudge()
