"""A run as a Kubernetes Job: creating it (with its code ConfigMap and env Secret), following
it through the namespace's shared watch, streaming its pods' logs, cancelling it."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from aioproj._output import RunOutput
from aioproj._status import RunStatus
from aioproj.errors import BackendError

from ._client import KubeApiError, KubeClient
from ._spec import BUNDLE_KEY, LABEL_RUN_ID, JobPlan, build_job, labels_for, owner_reference
from ._state import is_started, job_outcome, pod_problem, run_status
from ._watch import NamespaceWatch

__all__ = ["KubernetesExecution", "create_run_objects", "validate_job"]

logger = logging.getLogger("aioproj.kubernetes")

Obj = dict[str, Any]


def _jobs_path(namespace: str, name: str = "") -> str:
    base = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    return f"{base}/{name}" if name else base


def _core_path(namespace: str, resource: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{namespace}/{resource}"
    return f"{base}/{name}" if name else base


async def _delete(client: KubeClient, path: str) -> None:
    """Delete with background propagation; a missing object is fine."""
    try:
        await client.request("DELETE", path, body={"propagationPolicy": "Background"})
    except KubeApiError as exc:
        if exc.code != 404:
            raise


async def validate_job(client: KubeClient, template: Mapping[str, Any], plan: JobPlan) -> None:
    """Have the API server validate the Job without creating it (``dryRun=All``), so a bad
    template fails before the run is tracked. Raises :class:`KubeApiError`."""
    await client.request(
        "POST",
        _jobs_path(plan.namespace),
        query=[("dryRun", "All")],
        body=build_job(template, plan),
    )


async def _create(client: KubeClient, path: str, body: Obj, run_id: str) -> Obj:
    """POST ``body``. A 409 for an object of this run (a retried POST that had reached the
    server) returns the stored object; any other conflict raises."""
    try:
        return await client.request("POST", path, body=body)
    except KubeApiError as exc:
        if exc.code != 409:
            raise
        name = body["metadata"]["name"]
        existing = await client.request("GET", f"{path}/{name}")
        labels = (existing.get("metadata") or {}).get("labels") or {}
        if labels.get(LABEL_RUN_ID) != body["metadata"]["labels"].get(LABEL_RUN_ID):
            raise
        return existing


async def create_run_objects(
    client: KubeClient, template: Mapping[str, Any], plan: JobPlan, bundle: bytes | None
) -> Obj:
    """Create the ConfigMap (project tarball) and Secret (copied variables), then the Job,
    then make the Job their owner so that deleting it removes them.

    Returns the created Job. Raises :class:`BackendError`; then nothing is left behind.
    Cancellation also removes what was created before it propagates.
    """
    labels = labels_for(plan)
    created: list[str] = []
    try:
        if plan.bundle_configmap is not None and bundle is not None:
            path = _core_path(plan.namespace, "configmaps")
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": plan.bundle_configmap, "labels": labels},
                "binaryData": {BUNDLE_KEY: base64.b64encode(bundle).decode()},
            }
            await _create(client, path, body, plan.run_id)
            created.append(f"{path}/{plan.bundle_configmap}")
        if plan.env_secret is not None:
            path = _core_path(plan.namespace, "secrets")
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {"name": plan.env_secret, "labels": labels},
                "data": {
                    k: base64.b64encode(v.encode()).decode() for k, v in plan.env.secret.items()
                },
            }
            await _create(client, path, body, plan.run_id)
            created.append(f"{path}/{plan.env_secret}")
        job = await _create(
            client, _jobs_path(plan.namespace), build_job(template, plan), plan.run_id
        )
        created.append(_jobs_path(plan.namespace, plan.name))
        patch = {"metadata": {"ownerReferences": [owner_reference(job)]}}
        for path in created[:-1]:
            await client.request(
                "PATCH", path, body=patch, content_type="application/merge-patch+json"
            )
        return job
    except BaseException:
        with anyio.CancelScope(shield=True), anyio.move_on_after(30):
            for path in reversed(created):
                try:
                    await _delete(client, path)
                except KubeApiError as exc:
                    logger.error("Could not remove %s after a failed submission: %s", path, exc)
        raise


@dataclass
class _Logs:
    """The log followers of one run."""

    followed: set[str] = field(default_factory=set)
    active: int = 0
    idle: anyio.Event = field(default_factory=anyio.Event)


class KubernetesExecution:
    """A run's Job, as the handle sees it. Status comes from the namespace's shared watch
    (no request per run); pods' logs are followed into the run's output."""

    waits_for_stop = False

    def __init__(
        self,
        *,
        client: KubeClient,
        watch: NamespaceWatch,
        namespace: str,
        job_name: str,
        output: RunOutput,
        pending_timeout: float | None,
        log_grace: float = 10.0,
    ) -> None:
        self._client = client
        self._watch = watch
        self.namespace = namespace
        self.job_name = job_name
        self._output = output
        self._pending_timeout = pending_timeout
        self._log_grace = log_grace
        self._status = RunStatus.SCHEDULED
        self._final: RunStatus | None = None
        #: What the run is waiting on or why it ended (pod problems, Job conditions).
        self.detail: str | None = None
        #: What the run journal keeps to find the Job again (set by the launch).
        self.journal_state: dict[str, object] = {}
        self._announced: dict[str, str] = {}
        self._seen_job = False
        self._job: Obj | None = None
        self._cancelled = False
        self._wake = anyio.Event()
        self._logs = _Logs()
        self._unsubscribe: Callable[[], None] = watch.subscribe(job_name, self._changed)

    def __repr__(self) -> str:
        return f"<KubernetesExecution job={self.namespace}/{self.job_name} {self._status.value}>"

    def _changed(self) -> None:
        self._wake.set()

    def status(self) -> RunStatus:
        return self._final or self._status

    async def wait(self) -> RunStatus:
        """Follow the Job to its end (FINISHED, FAILED or KILLED), its logs into the output.

        A pod that has not started within ``pending-timeout`` seconds fails the run and
        its Job is deleted. Cancellation stops following (not the Job) and closes the
        output.
        """
        try:
            async with anyio.create_task_group() as tg:
                deadline = (
                    None
                    if self._pending_timeout is None
                    else anyio.current_time() + self._pending_timeout
                )
                while self._final is None:
                    self._wake = anyio.Event()
                    final = self._evaluate(tg)
                    if final is not None:
                        self._final = final
                        break
                    if deadline is not None and self._status is not RunStatus.SCHEDULED:
                        deadline = None
                    if deadline is not None and anyio.current_time() >= deadline:
                        await self._give_up()
                        break
                    with anyio.move_on_after(
                        None if deadline is None else deadline - anyio.current_time()
                    ):
                        await self._wake.wait()
                if self._final is not RunStatus.KILLED:
                    await self._catch_up_logs(tg)
                if self._logs.active:
                    with anyio.move_on_after(self._log_grace):
                        await self._logs.idle.wait()
                tg.cancel_scope.cancel()
        finally:
            self._unsubscribe()
            self._output.close()
        assert self._final is not None
        return self._final

    async def _catch_up_logs(self, tg: anyio.abc.TaskGroup) -> None:
        """The Job and its pods come on two streams: once the Job has ended, wait (briefly)
        for the pod events that lag behind, so that every pod's log is read."""
        status = (self._job or {}).get("status") or {}
        expected = int(status.get("succeeded") or 0) + int(status.get("failed") or 0)
        if self._final is RunStatus.FINISHED:
            expected = max(expected, 1)  # a pod succeeded, even if the count lags
        with anyio.move_on_after(self._log_grace):
            while len(self._logs.followed) < expected:
                self._wake = anyio.Event()
                self._start_followers(tg, self._watch.pods_of(self.job_name))
                if len(self._logs.followed) >= expected:
                    break
                await self._wake.wait()

    def _start_followers(self, tg: anyio.abc.TaskGroup, pods: list[Obj]) -> None:
        for pod in pods:
            name = pod["metadata"]["name"]
            if is_started(pod) and name not in self._logs.followed:
                self._logs.followed.add(name)
                self._logs.active += 1  # now: the task may start after wait() checks
                containers = pod.get("spec", {}).get("containers") or [{}]
                tg.start_soon(self._follow_log, name, str(containers[0].get("name", "")))

    def _evaluate(self, tg: anyio.abc.TaskGroup) -> RunStatus | None:
        if self._cancelled:
            return RunStatus.KILLED
        job = self._watch.job(self.job_name)
        pods = self._watch.pods_of(self.job_name)
        for pod in pods:
            self._announce(pod)
        self._start_followers(tg, pods)
        if job is None:
            if self._seen_job and self._watch.synced:
                self.detail = (
                    f"the Job {self.namespace}/{self.job_name} is gone: it was deleted, or the"
                    " API server lost it (restarted without its state)"
                )
                self._note(self.detail)
                return RunStatus.FAILED
            return None
        self._seen_job = True
        self._job = job
        outcome = job_outcome(job)
        if outcome is not None:
            status, message = outcome
            if status is RunStatus.FAILED:
                self.detail = message
                self._note(f"Job {self.job_name} failed: {message}")
            return status
        self._status = run_status(job, pods)
        return None

    def _announce(self, pod: Obj) -> None:
        problem = pod_problem(pod)
        if problem is None:
            return
        text = problem[0]
        name = pod["metadata"]["name"]
        if self._announced.get(name) != text:
            self._announced[name] = text
            self.detail = text
            self._note(text)

    def _note(self, text: str) -> None:
        logger.warning("Run's Job %s/%s: %s", self.namespace, self.job_name, text)
        self._output.feed(f"[aioproj] {text}\n".encode())

    async def _give_up(self) -> None:
        waited = f"{self._pending_timeout:g}"
        reason = self.detail or "its pod stayed Pending"
        self.detail = f"did not start within {waited} s (pending-timeout): {reason}"
        self._note(f"Job {self.job_name} {self.detail}; deleting it")
        self._final = RunStatus.FAILED
        with anyio.CancelScope(shield=True):
            try:
                await _delete(self._client, _jobs_path(self.namespace, self.job_name))
            except KubeApiError as exc:
                logger.error("Could not delete Job %s: %s", self.job_name, exc)

    async def _follow_log(self, pod: str, container: str) -> None:
        try:
            for attempt in range(1, 30):
                try:
                    async for chunk in self._client.follow_log(self.namespace, pod, container):
                        self._output.feed(chunk)
                    return
                except KubeApiError as exc:
                    if exc.code == 404 or attempt >= 29:
                        if exc.code != 404:
                            self._note(f"could not read the log of pod {pod}: {exc}")
                        return
                    # 400 while the container is still starting; else a transient error.
                    await anyio.sleep(min(0.1 * attempt, 2.0))
        finally:
            self._logs.active -= 1
            if not self._logs.active:
                self._logs.idle.set()
                self._logs.idle = anyio.Event()

    async def cancel(self) -> None:
        """Delete the Job with background propagation (its pods, ConfigMap and Secret go
        with it) and end KILLED. Idempotent; a no-op once the run has ended. Returns once
        the API accepted the deletion. Raises :class:`BackendError` if it refused."""
        if self._final is not None or self._cancelled:
            return
        job = self._watch.job(self.job_name)
        if job is not None and job_outcome(job) is not None:
            return  # already over: wait() reports how
        self._cancelled = True
        logger.info("Cancelling Job %s/%s", self.namespace, self.job_name)
        try:
            await _delete(self._client, _jobs_path(self.namespace, self.job_name))
        except KubeApiError as exc:
            raise BackendError(
                f"Could not delete Job {self.namespace}/{self.job_name}: {exc}"
            ) from exc
        finally:
            self._status = RunStatus.KILLED
            self._wake.set()
