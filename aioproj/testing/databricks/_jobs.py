"""Jobs runs as FakeDatabricks keeps them: the state machine, and the task really run.

A submitted ``spark_python_task`` runs as ``python <python_file> <parameters...>`` with
the emulator's Python, in its own process group, with the ``dbfs:/`` file mapped to the
emulator's DBFS directory. Its exit code decides the result state and its output is what
``runs/get-output`` returns. :class:`RunScript` decides everything else: how long a run
stays QUEUED, PENDING and TERMINATING, and whether it ends another way (SKIPPED,
INTERNAL_ERROR, a scripted result state) without running anything.
"""

from __future__ import annotations

import itertools
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from aioproj._process import ProcessGroup

__all__ = ["ACTIVE_STATES", "FakeRun", "RunScript", "drive", "run_process", "subprocess_env"]

#: Life-cycle states that ``runs/list?active_only=true`` returns.
ACTIVE_STATES = frozenset({"QUEUED", "PENDING", "RUNNING", "TERMINATING", "BLOCKED"})
#: ``runs/get-output`` keeps the last 5 MB of logs.
MAX_LOG_BYTES = 5 * 1024 * 1024

# v1 result state -> v2 termination_details (code, type).
_TERMINATION = {
    "SUCCESS": ("SUCCESS", "SUCCESS"),
    "FAILED": ("RUN_EXECUTION_ERROR", "CLIENT_ERROR"),
    "CANCELED": ("USER_CANCELED", "SUCCESS"),
    "TIMEDOUT": ("CANCELED", "CLIENT_ERROR"),
    "MAXIMUM_CONCURRENT_RUNS_REACHED": ("MAX_CONCURRENT_RUNS_EXCEEDED", "CLIENT_ERROR"),
    "EXCLUDED": ("SKIPPED", "SUCCESS"),
    "SUCCESS_WITH_FAILURES": ("SUCCESS_WITH_FAILURES", "SUCCESS"),
    "UPSTREAM_FAILED": ("RUN_EXECUTION_ERROR", "CLIENT_ERROR"),
    "UPSTREAM_CANCELED": ("USER_CANCELED", "SUCCESS"),
    "DISABLED": ("DISABLED", "CLIENT_ERROR"),
}


@dataclass(frozen=True)
class RunScript:
    """How a submitted run behaves in FakeDatabricks.

    ``queued``, ``pending`` and ``terminating`` are the seconds spent in those states
    (0 skips QUEUED). ``outcome`` is ``"EXECUTE"`` (run the task for real: its exit code
    gives SUCCESS or FAILED), ``"SKIPPED"`` or ``"INTERNAL_ERROR"`` (the run ends in that
    life-cycle state without running), or a result state (``"FAILED"``, ``"TIMEDOUT"``,
    ``"MAXIMUM_CONCURRENT_RUNS_REACHED"``...) reached after ``running`` seconds in
    RUNNING without running anything. ``state_message`` is shown in ``state``.
    """

    queued: float = 0.0
    pending: float = 0.05
    terminating: float = 0.05
    outcome: str = "EXECUTE"
    running: float = 0.0
    state_message: str = ""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


_CLUSTER_IDS = itertools.count(1)


@dataclass
class FakeRun:
    """One submit run (with its single task) and everything the API shows of it."""

    run_id: int
    task_run_id: int
    job_id: int
    run_name: str
    task: dict[str, Any]
    script: RunScript
    page_url: str
    timeout_seconds: int = 0
    idempotency_token: str | None = None
    life_cycle_state: str = "PENDING"
    result_state: str | None = None
    state_message: str = ""
    user_cancelled_or_timedout: bool = False
    start_time: int = field(default_factory=_now_ms)
    running_since: int = 0
    terminating_since: int = 0
    end_time: int = 0
    cluster_id: str = ""
    deleted: bool = False
    logs: bytearray = field(default_factory=bytearray)
    logs_truncated: bool = False
    error: str | None = None
    error_trace: str | None = None
    exit_code: int | None = None
    #: The process group running the task, while it runs (tests check it is gone).
    pid: int | None = None
    cancel_requested: anyio.Event = field(default_factory=anyio.Event)
    changed: anyio.Event = field(default_factory=anyio.Event)

    # -- state ------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.life_cycle_state in ACTIVE_STATES

    def set_state(self, life_cycle_state: str, result_state: str | None = None) -> None:
        now = _now_ms()
        self.life_cycle_state = life_cycle_state
        if life_cycle_state == "RUNNING":
            self.running_since = now
            self.cluster_id = f"0101-000000-emu{next(_CLUSTER_IDS):05d}"
        elif life_cycle_state == "TERMINATING":
            self.terminating_since = now
        if result_state is not None:
            self.result_state = result_state
        if life_cycle_state not in ACTIVE_STATES:
            self.end_time = now
        self.changed.set()
        self.changed = anyio.Event()

    def feed(self, data: bytes) -> None:
        self.logs += data
        if len(self.logs) > MAX_LOG_BYTES:
            del self.logs[: len(self.logs) - MAX_LOG_BYTES]
            self.logs_truncated = True

    # -- JSON -------------------------------------------------------------------------

    def _state_json(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "life_cycle_state": self.life_cycle_state,
            "state_message": self.state_message,
            "user_cancelled_or_timedout": self.user_cancelled_or_timedout,
        }
        if self.result_state is not None:
            state["result_state"] = self.result_state
        return state

    def _status_json(self) -> dict[str, Any]:
        lcs = self.life_cycle_state
        if lcs in ACTIVE_STATES:
            return {"state": lcs}
        if lcs == "WAITING_FOR_RETRY":
            return {"state": "WAITING"}
        if lcs == "SKIPPED":
            code, kind = "SKIPPED", "SUCCESS"
        elif lcs == "INTERNAL_ERROR":
            code, kind = "INTERNAL_ERROR", "INTERNAL_ERROR"
        else:
            code, kind = _TERMINATION.get(self.result_state or "", ("SUCCESS", "SUCCESS"))
        return {
            "state": "TERMINATED",
            "termination_details": {"code": code, "type": kind, "message": self.state_message},
        }

    def _durations(self) -> dict[str, int]:
        now = _now_ms()
        end = self.end_time or now
        run_start = self.running_since or end
        term_start = self.terminating_since or end
        return {
            "setup_duration": max(0, run_start - self.start_time) if self.running_since else 0,
            "execution_duration": max(0, term_start - run_start) if self.running_since else 0,
            "cleanup_duration": max(0, end - term_start) if self.terminating_since else 0,
            "run_duration": max(0, end - self.start_time) if self.end_time else 0,
        }

    def task_json(self) -> dict[str, Any]:
        task: dict[str, Any] = {
            **{k: v for k, v in self.task.items() if k != "task_key"},
            "task_key": self.task.get("task_key", "task"),
            "run_id": self.task_run_id,
            "attempt_number": 0,
            "state": self._state_json(),
            "status": self._status_json(),
            "start_time": self.start_time,
            "end_time": self.end_time,
            "run_page_url": self.page_url,
            **self._durations(),
        }
        if self.cluster_id:
            task["cluster_instance"] = {
                "cluster_id": self.cluster_id,
                "spark_context_id": str(self.run_id * 7919),
            }
        return task

    def run_json(self, *, with_tasks: bool = True) -> dict[str, Any]:
        run: dict[str, Any] = {
            "job_id": self.job_id,
            "run_id": self.run_id,
            "number_in_job": self.run_id,
            "original_attempt_run_id": self.run_id,
            "creator_user_name": "emulator@aioproj.invalid",
            "run_name": self.run_name,
            "run_type": "SUBMIT_RUN",
            "run_page_url": self.page_url,
            "format": "MULTI_TASK",
            "attempt_number": 0,
            "state": self._state_json(),
            "status": self._status_json(),
            "start_time": self.start_time,
            "end_time": self.end_time,
            **self._durations(),
        }
        if self.cluster_id:
            run["cluster_instance"] = {"cluster_id": self.cluster_id}
        if with_tasks:
            run["tasks"] = [self.task_json()]
        return run

    def output_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metadata": self.task_json()}
        if "spark_python_task" in self.task:
            out["logs"] = self.logs.decode("utf-8", "replace")
            out["logs_truncated"] = self.logs_truncated
        if self.error is not None:
            out["error"] = self.error
        if self.error_trace is not None:
            out["error_trace"] = self.error_trace
        return out


async def _dwell(run: FakeRun, seconds: float) -> bool:
    """Stay ``seconds`` in the current state; True if a cancel came meanwhile."""
    if run.cancel_requested.is_set():
        return True
    if seconds > 0:
        with anyio.move_on_after(seconds):
            await run.cancel_requested.wait()
    return run.cancel_requested.is_set()


async def drive(
    run: FakeRun,
    execute: Callable[[FakeRun], Any],
) -> None:
    """Move ``run`` through its life cycle, as its script says."""
    script = run.script
    run.state_message = ""
    try:
        if script.queued > 0:
            run.set_state("QUEUED")
            run.state_message = "Waiting for a free slot"
            if await _dwell(run, script.queued):
                return await _end_cancelled(run, script)
        run.set_state("PENDING")
        run.state_message = "Waiting for cluster"
        if await _dwell(run, script.pending):
            return await _end_cancelled(run, script)
        if script.outcome in ("SKIPPED", "INTERNAL_ERROR"):
            run.state_message = script.state_message or (
                "An active run of this job already exists"
                if script.outcome == "SKIPPED"
                else "Run failed with an internal error"
            )
            if script.outcome == "INTERNAL_ERROR":
                run.error = run.state_message
            run.set_state(script.outcome, "FAILED" if script.outcome == "INTERNAL_ERROR" else None)
            return None
        run.state_message = ""
        run.set_state("RUNNING")
        if script.outcome == "EXECUTE":
            result = await execute(run)
        else:
            cancelled = await _dwell(run, script.running)
            result = "CANCELED" if cancelled else script.outcome
            if result != "SUCCESS" and not cancelled:
                run.error = script.state_message or f"Run ended with {result}"
        if result in ("CANCELED", "TIMEDOUT"):
            run.user_cancelled_or_timedout = True
        run.state_message = script.state_message or _message(result)
        run.set_state("TERMINATING")
        await _dwell(run, script.terminating)
        run.set_state("TERMINATED", result)
    except BaseException:
        if run.active:  # the emulator is shutting down
            run.state_message = "The emulator stopped"
            run.set_state("INTERNAL_ERROR", "FAILED")
        raise
    return None


def _message(result: str) -> str:
    if result == "SUCCESS":
        return ""
    if result == "CANCELED":
        return "Run cancelled."
    if result == "TIMEDOUT":
        return "Run timed out."
    return "Workload failed, see run output for details"


async def _end_cancelled(run: FakeRun, script: RunScript) -> None:
    run.user_cancelled_or_timedout = True
    run.state_message = "Run cancelled."
    run.set_state("TERMINATING")
    await _dwell(run, 0)
    if script.terminating > 0:
        await anyio.sleep(script.terminating)
    run.set_state("TERMINATED", "CANCELED")


async def run_process(
    run: FakeRun,
    *,
    python: str,
    script_path: Path | None,
    cwd: Path,
    env: Mapping[str, str],
    grace_period: float = 2.0,
) -> str:
    """Run the task's Python file to its end, a cancel or the timeout; the result state."""
    task = run.task["spark_python_task"]
    if script_path is None or not await anyio.Path(script_path).is_file():
        run.error = f"FileNotFoundError: python_file {task.get('python_file')} does not exist"
        run.error_trace = run.error
        return "FAILED"
    args = [python, str(script_path), *[str(p) for p in task.get("parameters") or []]]
    await anyio.Path(cwd).mkdir(parents=True, exist_ok=True)
    try:
        group = await ProcessGroup.start(
            "/bin/sh",
            "exec " + shlex.join(args),
            cwd=cwd,
            env=env,
            on_output=run.feed,
        )
    except OSError as exc:
        run.error = f"Could not start the driver: {exc}"
        return "FAILED"
    run.pid = group.pid
    timeout = run.timeout_seconds or None
    outcome = "SUCCESS"
    try:
        async with anyio.create_task_group() as tg:
            pumped = anyio.Event()

            async def pump() -> None:
                try:
                    await group.pump_output()
                finally:
                    pumped.set()

            async def on_cancel() -> None:
                await run.cancel_requested.wait()
                nonlocal outcome
                outcome = "CANCELED"
                await group.stop(grace_period)

            tg.start_soon(pump)
            tg.start_soon(on_cancel)
            with anyio.move_on_after(timeout) as timer:
                code = await group.wait_exit()
            if timer.cancelled_caught:
                outcome = "TIMEDOUT"
                await group.stop(grace_period)
                code = await group.wait_exit()
            await group.reap_stragglers(grace_period)
            with anyio.move_on_after(grace_period):
                await pumped.wait()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if not group.empty:
                await group.stop(grace_period)
            group.close()
    run.exit_code = code
    if outcome != "SUCCESS":
        return outcome
    if code != 0:
        tail = run.logs[-4000:].decode("utf-8", "replace").rstrip().splitlines()
        last = tail[-1] if tail else ""
        run.error = last or f"The Python process exited with code {code}"
        run.error_trace = "\n".join(tail[-40:]) or run.error
        return "FAILED"
    return "SUCCESS"


def subprocess_env(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The driver's environment: the emulator's, minus the caller's MLflow settings."""
    env = {k: v for k, v in base.items() if not k.startswith(("MLFLOW_", "DATABRICKS_"))}
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
