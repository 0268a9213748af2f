"""FakeKubernetes' job controller: a Job's pods, retries with backoff, its conditions
and status, and Jobs that end when their pods do."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
from collections.abc import Mapping
from typing import Any

import anyio

from ._base import JOBS, PODS, ClusterBase, meta_of, name_suffix
from ._store import Obj, StatusError, now_rfc3339

__all__ = [
    "JobController",
]


def _finished(job: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in (job.get("status") or {}).get("conditions") or []
    )


class JobController(ClusterBase):
    """The job controller: a Job's pods, retries with backoff, its conditions and status."""

    def _reconcile_job(self, job: Obj) -> None:
        uid = meta_of(job)["uid"]
        if uid in self._controllers or meta_of(job).get("deletionTimestamp"):
            return
        if job["spec"].get("suspend") or _finished(job):
            return
        self._controllers[uid] = self._spawn(
            self._run_job(meta_of(job)["namespace"], meta_of(job)["name"], uid)
        )

    def _stop_controller(self, uid: str) -> None:
        task = self._controllers.pop(uid, None)
        if task is not None:
            task.cancel()

    def _job_status(self, namespace: str, name: str, **changes: Any) -> Obj:
        def change(job: Obj) -> None:
            status = job.setdefault("status", {})
            for key, value in changes.items():
                if value is None:
                    status.pop(key, None)
                else:
                    status[key] = value

        return self.store.update(JOBS, namespace, name, change)

    def _add_condition(
        self, namespace: str, name: str, kind: str, reason: str, message: str, **status: Any
    ) -> None:
        """Append a True condition, with other status changes in the same update."""
        job = self.store.get(JOBS, namespace, name)
        conditions = list(job.get("status", {}).get("conditions") or [])
        now = now_rfc3339()
        conditions.append(
            {
                "type": kind,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastProbeTime": now,
                "lastTransitionTime": now,
            }
        )
        self._job_status(namespace, name, conditions=conditions, **status)

    async def _run_job(self, namespace: str, name: str, uid: str) -> None:
        try:
            await self._drive_job(namespace, name, uid)
        except StatusError:  # the Job went away under the controller
            pass
        finally:
            if self._controllers.get(uid) is asyncio.current_task():
                del self._controllers[uid]

    async def _drive_job(self, namespace: str, name: str, uid: str) -> None:
        job = self.store.get(JOBS, namespace, name)
        spec = job["spec"]
        limit = int(spec.get("backoffLimit", 6))
        deadline = spec.get("activeDeadlineSeconds")
        on_failure = spec["template"]["spec"].get("restartPolicy") == "OnFailure"
        self._job_status(
            namespace,
            name,
            startTime=now_rfc3339(),
            active=1,
            ready=0,
            terminating=0,
            uncountedTerminatedPods={},
        )
        failed = 0
        outcome = "deadline"
        current: list[Obj] = []
        with anyio.move_on_after(math.inf if deadline is None else float(deadline)):
            while True:
                pod = self._create_job_pod(self.store.get(JOBS, namespace, name))
                current[:] = [pod]
                result = await self._pod_result(meta_of(pod)["uid"])
                current.clear()
                if result == "Succeeded":
                    outcome = "success"
                    break
                failed += 1
                self._job_status(namespace, name, failed=failed, active=0, ready=0)
                if failed > limit or on_failure:
                    outcome = "backoff"
                    break
                await asyncio.sleep(self.pod_backoff * 2 ** (failed - 1))
                self._job_status(namespace, name, active=1)
        if outcome == "success":
            message = "Reached expected number of succeeded pods"
            self._add_condition(
                namespace,
                name,
                "SuccessCriteriaMet",
                "CompletionsReached",
                message,
                succeeded=1,
                active=0,
                ready=0,
            )
            self._add_condition(
                namespace,
                name,
                "Complete",
                "CompletionsReached",
                message,
                completionTime=now_rfc3339(),
            )
            self._event(
                self.store.get(JOBS, namespace, name), "Normal", "Completed", "Job completed"
            )
        else:
            if outcome == "backoff":
                reason, message = (
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit",
                )
            else:
                reason, message = (
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline",
                )
            self._add_condition(namespace, name, "FailureTarget", reason, message)
            for pod in current:  # the deadline: stop what still runs
                with contextlib.suppress(StatusError):
                    await self.delete(
                        PODS, namespace, meta_of(pod)["name"], propagation=None, grace=None
                    )
                with contextlib.suppress(asyncio.CancelledError, KeyError):
                    await self._pod_result(meta_of(pod)["uid"])
                failed += 1
            self._job_status(namespace, name, failed=failed, active=0, ready=0)
            self._add_condition(namespace, name, "Failed", reason, message)
            self._event(self.store.get(JOBS, namespace, name), "Warning", reason, message)
        ttl = spec.get("ttlSecondsAfterFinished")
        if ttl is not None:
            await asyncio.sleep(float(ttl))
            self._controllers.pop(uid, None)
            await self.delete(JOBS, namespace, name, propagation="Background", grace=None)

    def _create_job_pod(self, job: Obj) -> Obj:
        meta = meta_of(job)
        template = copy.deepcopy(job["spec"]["template"])
        pod = {
            "metadata": {
                **template.get("metadata", {}),
                "name": f"{meta['name']}-{name_suffix()}",
                "generateName": f"{meta['name']}-",
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": template["spec"],
            "status": {"phase": "Pending", "qosClass": "BestEffort"},
        }
        stored = self.create(PODS, meta["namespace"], pod)
        self._event(job, "Normal", "SuccessfulCreate", f"Created pod: {meta_of(stored)['name']}")
        return stored

    def _pod_result(self, uid: str) -> asyncio.Future[str]:
        future = self._pod_results.get(uid)
        if future is None:
            future = self._pod_results[uid] = asyncio.get_running_loop().create_future()
        return future

    def _pod_finished(self, uid: str, phase: str) -> None:
        future = self._pod_result(uid)
        if not future.done():
            future.set_result(phase)

    def _pod_changed(self, pod: Obj) -> None:
        """Keep the owning Job's ``ready`` count in step with its pod."""
        for ref in meta_of(pod).get("ownerReferences") or []:
            if ref.get("kind") == "Job" and ref.get("uid") in self._controllers:
                ready = any(c.get("ready") for c in pod["status"].get("containerStatuses", []))
                with contextlib.suppress(StatusError):
                    job = self.store.get(JOBS, meta_of(pod)["namespace"], ref["name"])
                    if job.get("status", {}).get("ready") != int(ready) and not _finished(job):
                        self._job_status(meta_of(pod)["namespace"], ref["name"], ready=int(ready))
