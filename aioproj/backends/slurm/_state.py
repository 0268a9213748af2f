"""Pure status logic: a run's status from a Slurm job state, and the words for how it ended.

Slurm reports a job's state as a word (``squeue -o %T``: ``PENDING``, ``RUNNING``,
``COMPLETED``...); ``sacct`` may add to it (``CANCELLED by 1000``, ``FAILED+``). The exit
code comes as ``code:signal`` (``sacct``, ``scontrol``).
"""

from __future__ import annotations

from dataclasses import dataclass

from aioproj._status import RunStatus

__all__ = [
    "FAILED_STATES",
    "RUNNING_STATES",
    "SCHEDULED_STATES",
    "JobInfo",
    "describe_end",
    "map_state",
    "normalize_state",
    "parse_exit_code",
]

#: Waiting for resources, or put back in the queue (requeued, held after a requeue).
SCHEDULED_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
    }
)
#: Started and not yet over (a suspended job resumes; a completing one is cleaning up).
RUNNING_STATES = frozenset(
    {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
)
#: Every end but COMPLETED and CANCELLED.
FAILED_STATES = frozenset(
    {
        "FAILED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)


def normalize_state(state: str) -> str:
    """``CANCELLED by 1000`` and ``FAILED+`` as ``CANCELLED`` and ``FAILED``; upper case."""
    words = state.strip().split()
    return words[0].rstrip("+").upper() if words else ""


def map_state(state: str, exit_code: int | None = None) -> tuple[RunStatus, bool]:
    """The RunStatus of a job in ``state``, and whether that is final.

    PENDING/CONFIGURING (and requeued or held jobs) are SCHEDULED; RUNNING, COMPLETING
    and SUSPENDED are RUNNING; COMPLETED is FINISHED (FAILED if an ``exit_code`` other
    than 0 is known); CANCELLED is KILLED; FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY,
    BOOT_FAIL, DEADLINE and PREEMPTED are FAILED. A state this function does not know is
    RUNNING and not final. Never raises.
    """
    word = normalize_state(state)
    if word == "COMPLETED":
        return (RunStatus.FINISHED if not exit_code else RunStatus.FAILED), True
    if word == "CANCELLED":
        return RunStatus.KILLED, True
    if word in FAILED_STATES:
        return RunStatus.FAILED, True
    if word in SCHEDULED_STATES:
        return RunStatus.SCHEDULED, False
    return RunStatus.RUNNING, False


def parse_exit_code(text: str) -> tuple[int, int] | None:
    """``"3:0"`` as ``(3, 0)`` (exit code, signal); None for anything else. Never raises."""
    code, sep, signal = text.strip().partition(":")
    if not sep or not code.isdigit() or not signal.isdigit():
        return None
    return int(code), int(signal)


@dataclass(frozen=True)
class JobInfo:
    """What Slurm says about one job: its state, the reason it gives (``squeue %r``,
    ``sacct Reason``) and, once known, the exit code and the signal that ended it."""

    state: str
    reason: str = ""
    exit_code: int | None = None
    signal: int | None = None

    @property
    def status(self) -> RunStatus:
        return map_state(self.state, self.exit_code)[0]

    @property
    def final(self) -> bool:
        return map_state(self.state, self.exit_code)[1]


def describe_end(job_id: str, info: JobInfo) -> str:
    """How job ``job_id`` ended, in words: its state, Slurm's reason, the exit code or
    signal. Pure."""
    state = normalize_state(info.state) or "an unknown state"
    parts = []
    if info.reason and info.reason not in ("None", "(null)"):
        parts.append(info.reason)
    if info.exit_code:
        parts.append(f"exit code {info.exit_code}")
    if info.signal:
        parts.append(f"signal {info.signal}")
    detail = f" ({', '.join(parts)})" if parts else ""
    return f"Slurm job {job_id} ended {state}{detail}"
