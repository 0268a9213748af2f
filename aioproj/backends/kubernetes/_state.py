"""Pure status logic: a run's status from its Job and pods, and pod problems in words."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from aioproj._status import RunStatus

__all__ = ["is_started", "job_outcome", "pod_problem", "run_status"]

#: Waiting reasons that mean the container will not start without a change.
STUCK_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "CrashLoopBackOff",
    }
)

Obj = Mapping[str, Any]


def _true_conditions(job: Obj) -> dict[str, Obj]:
    conditions = (job.get("status") or {}).get("conditions") or []
    return {c.get("type", ""): c for c in conditions if c.get("status") == "True"}


def job_outcome(job: Obj) -> tuple[RunStatus, str] | None:
    """FINISHED or FAILED with the condition's reason and message, once the Job's
    conditions say so (``FailureTarget``/``SuccessCriteriaMet`` count: Kubernetes ≥ 1.31
    sets them first), else None."""
    conditions = _true_conditions(job)
    for kind, status in (
        ("Failed", RunStatus.FAILED),
        ("FailureTarget", RunStatus.FAILED),
        ("Complete", RunStatus.FINISHED),
        ("SuccessCriteriaMet", RunStatus.FINISHED),
    ):
        if kind in conditions:
            c = conditions[kind]
            return status, f"{c.get('reason') or kind}: {c.get('message') or ''}".strip()
    return None


def job_end_ms(job: Obj) -> int | None:
    """When the Job ended, in ms since the epoch: its ``completionTime``, else the latest
    transition of its final condition; None if neither is readable."""
    status = job.get("status") or {}
    stamps = [status.get("completionTime")]
    stamps += [c.get("lastTransitionTime") for c in _true_conditions(job).values()]
    times = [t for t in map(_parse_time, stamps) if t is not None]
    return max(times) if times else None


def _parse_time(value: object) -> int | None:
    """An RFC 3339 time (``2026-12-04T18:40:22Z``) in ms, or None."""
    if not isinstance(value, str):
        return None
    import datetime

    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return int(parsed.timestamp() * 1000)


def is_started(pod: Obj) -> bool:
    """True once a container of the pod runs or has run (its log can be read)."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        state = cs.get("state") or {}
        last = cs.get("lastState") or {}
        if "running" in state or "terminated" in state or last.get("terminated"):
            return True
    return (pod.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed")


def run_status(job: Obj | None, pods: Iterable[Obj]) -> RunStatus:
    """SCHEDULED until a pod's container has started, RUNNING after, FINISHED/FAILED from
    the Job's conditions."""
    if job is not None:
        outcome = job_outcome(job)
        if outcome is not None:
            return outcome[0]
        status = job.get("status") or {}
        if status.get("ready") or status.get("succeeded") or status.get("failed"):
            return RunStatus.RUNNING
    if any(is_started(pod) for pod in pods):
        return RunStatus.RUNNING
    return RunStatus.SCHEDULED


def pod_problem(pod: Obj) -> tuple[str, bool] | None:
    """What keeps a pod from running, in words, and whether it is stuck (it will not
    start without a change: image pull failures, bad config, unschedulable), or None.

    Covers Unschedulable, ErrImagePull/ImagePullBackOff, CrashLoopBackOff, container
    config errors and OOMKilled containers.
    """
    name = (pod.get("metadata") or {}).get("name", "?")
    status = pod.get("status") or {}
    for condition in status.get("conditions") or []:
        if (
            condition.get("type") == "PodScheduled"
            and condition.get("status") == "False"
            and condition.get("reason") == "Unschedulable"
        ):
            return f"pod {name} is Unschedulable: {condition.get('message', '')}".strip(), True
    statuses = [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]
    for cs in statuses:
        state = cs.get("state") or {}
        waiting = state.get("waiting") or {}
        reason = waiting.get("reason")
        if reason in STUCK_REASONS:
            message = waiting.get("message", "")
            text = f"pod {name}: container {cs.get('name')} is {reason}"
            return (f"{text}: {message}" if message else text), reason != "CrashLoopBackOff"
        for terminated in (state.get("terminated"), (cs.get("lastState") or {}).get("terminated")):
            if terminated and terminated.get("reason") == "OOMKilled":
                return (
                    f"pod {name}: container {cs.get('name')} was OOMKilled (exit code "
                    f"{terminated.get('exitCode', 137)}): it used more memory than its limit",
                    False,
                )
    return None
