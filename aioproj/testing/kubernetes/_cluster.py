"""FakeKubernetes' behaviour: API semantics (defaults, validation, delete propagation,
garbage collection), a job controller and a "kubelet" that runs containers' commands as
local process groups.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import functools
import math
import random
import re
import shlex
import shutil
import signal
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from aioproj._process import ProcessGroup

from ._store import RESOURCES, Obj, Resource, StatusError, Store, now_rfc3339

__all__ = ["CONFIGMAP_MAX_BYTES", "Cluster", "Faults", "PodLog"]

JOBS = RESOURCES["jobs"]
PODS = RESOURCES["pods"]
CONFIGMAPS = RESOURCES["configmaps"]
SECRETS = RESOURCES["secrets"]
EVENTS = RESOURCES["events"]

#: The apiserver's limit on the data of one ConfigMap or Secret.
CONFIGMAP_MAX_BYTES = 1024 * 1024

_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_UNSCHEDULABLE = (
    "0/1 nodes are available: 1 Insufficient memory. preemption: 0/1 nodes are available: "
    "1 No preemption victims found for incoming pod."
)
_DATA_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_SUFFIX_CHARS = "bcdfghjklmnpqrstvwxz2456789"
_NOT_DNS = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)


@dataclass
class Faults:
    """Switches a test flips to make FakeKubernetes misbehave.

    * ``expired_as_http``: a watch from a too old resourceVersion is answered with HTTP
      410 instead of 200 and one ERROR event (both shapes real servers use).
    * ``unschedulable``: new pods stay Pending with ``PodScheduled=False/Unschedulable``.
    * ``hold_pending``: new pods are scheduled but their containers never start
      (``ContainerCreating``).
    * ``image_pull_failures``: images whose pull fails (``ErrImagePull`` then
      ``ImagePullBackOff``); the pod stays Pending.
    * ``oom_images``: containers of these images are killed as by the OOM killer
      (``OOMKilled``, exit code 137) once they have started.
    * :meth:`fail_next`: the next requests get a 5xx (or 429) Status.
    """

    expired_as_http: bool = False
    unschedulable: bool = False
    hold_pending: bool = False
    image_pull_failures: set[str] = field(default_factory=set)
    oom_images: set[str] = field(default_factory=set)
    failing: list[tuple[int, str | None]] = field(default_factory=list)

    def fail_next(
        self, count: int = 1, *, status: int = 500, path_contains: str | None = None
    ) -> None:
        """Answer the next ``count`` requests (whose path contains ``path_contains``, if
        given) with ``status``: 500 InternalError, 503 ServiceUnavailable, 429
        TooManyRequests (with Retry-After: 1) or 504 Timeout."""
        self.failing.extend([(status, path_contains)] * count)

    def take_failure(self, path: str) -> int | None:
        for index, (status, contains) in enumerate(self.failing):
            if contains is None or contains in path:
                del self.failing[index]
                return status
        return None


@dataclass
class PodLog:
    """The output of a pod's container, for ``/log``."""

    data: bytearray = field(default_factory=bytearray)
    started: bool = False
    done: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass
class _Kubelet:
    """What runs for one pod."""

    task: asyncio.Task[None]
    group: ProcessGroup | None = None
    terminating: bool = False
    oom: bool = False


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = obj["metadata"]
    return meta


def _suffix() -> str:
    return "".join(random.choice(_SUFFIX_CHARS) for _ in range(5))


def _truthy(value: Any) -> bool:
    return bool(value) and value is not False


class Cluster:
    """The API semantics and the controllers of FakeKubernetes."""

    def __init__(
        self,
        store: Store,
        faults: Faults,
        *,
        root: Path,
        base_env: Mapping[str, str],
        max_grace: float,
        pod_backoff: float,
    ) -> None:
        self.store = store
        self.faults = faults
        self.root = root
        self.base_env = dict(base_env)
        self.max_grace = max_grace
        self.pod_backoff = pod_backoff
        self.logs: dict[str, PodLog] = {}  # by pod uid
        self._controllers: dict[str, asyncio.Task[None]] = {}  # by job uid
        self._kubelets: dict[str, _Kubelet] = {}  # by pod uid
        self._pod_results: dict[str, asyncio.Future[str]] = {}  # by pod uid
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifetime ----------------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self) -> None:
        """Stop every controller and kill every container process."""
        for task in list(self._controllers.values()):
            task.cancel()
        for kubelet in list(self._kubelets.values()):
            if kubelet.group is not None:
                kubelet.group.signal_group(signal.SIGKILL)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        for kubelet in list(self._kubelets.values()):
            if kubelet.group is not None:
                await kubelet.group.stop(0)
                kubelet.group.close()
        self._kubelets.clear()

    def container_pids(self) -> dict[str, int]:
        """The process id of each running container process, by pod name."""
        out = {}
        for uid, kubelet in self._kubelets.items():
            if kubelet.group is not None and not kubelet.group.empty:
                pod = self._pod_by_uid(uid)
                out[pod["metadata"]["name"] if pod else uid] = kubelet.group.pid
        return out

    def _pod_by_uid(self, uid: str) -> Obj | None:
        for obj in self.store.objects["pods"].values():
            if obj["metadata"]["uid"] == uid:
                return obj
        return None

    # -- create ------------------------------------------------------------------------

    def create(
        self, resource: Resource, namespace: str, body: Any, *, dry_run: bool = False
    ) -> Obj:
        """Validate, default and store a new object (``dry_run``: validate and default
        only, as ``?dryRun=All``). Raises StatusError."""
        if not isinstance(body, dict):
            raise StatusError.bad_request("the request body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise StatusError.bad_request("metadata must be an object")
        kind = obj.get("kind")
        if kind is not None and kind != resource.kind:
            raise StatusError.bad_request(
                f"the body of the request was in an unknown format: kind {kind!r} "
                f"is not {resource.kind!r}"
            )
        body_ns = meta.get("namespace")
        if body_ns and body_ns != namespace:
            raise StatusError.bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"
            )
        meta["namespace"] = namespace
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + _suffix()
            else:
                raise StatusError.invalid(
                    resource,
                    "",
                    [
                        (
                            "FieldValueRequired",
                            "metadata.name",
                            "Required value: name or generateName is required",
                        )
                    ],
                )
        name = meta["name"]
        if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
            raise StatusError.invalid(
                resource,
                name,
                [("FieldValueInvalid", "metadata.name", f'Invalid value: "{name}": {_NOT_DNS}')],
            )
        meta["generation"] = 1
        if resource is JOBS:
            self._default_job(obj)
        elif resource is CONFIGMAPS:
            self._validate_data(resource, obj, binary_key="binaryData")
        elif resource is SECRETS:
            self._default_secret(obj)
        elif resource is PODS:
            obj.setdefault("spec", {})
            obj.setdefault("status", {"phase": "Pending"})
        if dry_run:
            if self.store.find(resource, namespace, name) is not None:
                raise StatusError.already_exists(resource, name)
            obj["kind"], obj["apiVersion"] = resource.kind, resource.api_version
            return obj
        stored = self.store.add(resource, obj)
        if resource is JOBS:
            self._event(stored, "Normal", "Created", "Job created")
            self._reconcile_job(stored)
        elif resource is PODS:
            self._start_kubelet(stored)
        return stored

    def _default_job(self, job: Obj) -> None:
        name = job["metadata"]["name"]
        spec = job.get("spec")
        causes: list[tuple[str, str, str]] = []
        if len(name) > 63:
            causes.append(
                (
                    "FieldValueInvalid",
                    "metadata.name",
                    f'Invalid value: "{name}": must be no more than 63 characters',
                )
            )
        if not isinstance(spec, dict) or not isinstance(spec.get("template"), dict):
            causes.append(("FieldValueRequired", "spec.template", "Required value"))
            raise StatusError.invalid(JOBS, name, causes)
        template = spec["template"]
        pod_spec = template.get("spec")
        if not isinstance(pod_spec, dict):
            causes.append(("FieldValueRequired", "spec.template.spec", "Required value"))
            raise StatusError.invalid(JOBS, name, causes)
        policy = pod_spec.get("restartPolicy")
        if policy is None:
            causes.append(
                (
                    "FieldValueRequired",
                    "spec.template.spec.restartPolicy",
                    'Required value: valid values: "OnFailure", "Never"',
                )
            )
        elif policy not in ("OnFailure", "Never"):
            causes.append(
                (
                    "FieldValueNotSupported",
                    "spec.template.spec.restartPolicy",
                    f'Unsupported value: "{policy}": supported values: "OnFailure", "Never"',
                )
            )
        containers = pod_spec.get("containers")
        if not isinstance(containers, list) or not containers:
            causes.append(("FieldValueRequired", "spec.template.spec.containers", "Required value"))
        else:
            for index, container in enumerate(containers):
                where = f"spec.template.spec.containers[{index}]"
                if not isinstance(container, dict):
                    causes.append(("FieldValueInvalid", where, "Invalid value: must be an object"))
                    continue
                if not container.get("name"):
                    causes.append(("FieldValueRequired", f"{where}.name", "Required value"))
                if not container.get("image"):
                    causes.append(("FieldValueRequired", f"{where}.image", "Required value"))
        if causes:
            raise StatusError.invalid(JOBS, name, causes)
        uid = str(uuid.uuid4())
        job["metadata"]["uid"] = uid
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completions", 1)
        spec.setdefault("parallelism", 1)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
        spec.setdefault("manualSelector", False)
        tmeta = template.setdefault("metadata", {})
        labels = tmeta.setdefault("labels", {})
        generated = {
            "batch.kubernetes.io/controller-uid": uid,
            "batch.kubernetes.io/job-name": name,
            "controller-uid": uid,
            "job-name": name,
        }
        labels.update(generated)
        spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})
        if not job["metadata"].get("labels"):
            job["metadata"]["labels"] = dict(labels)
        pod_spec.setdefault("terminationGracePeriodSeconds", 30)
        pod_spec.setdefault("dnsPolicy", "ClusterFirst")
        job["status"] = {}

    def _validate_data(self, resource: Resource, obj: Obj, *, binary_key: str | None) -> None:
        name = obj["metadata"]["name"]
        total = 0
        causes = []
        for key_name in ("data", binary_key):
            if key_name is None:
                continue
            data = obj.get(key_name) or {}
            if not isinstance(data, dict):
                raise StatusError.bad_request(f"{key_name} must be an object")
            for key, value in data.items():
                if not _DATA_KEY.match(key):
                    causes.append(
                        (
                            "FieldValueInvalid",
                            f"{key_name}[{key}]",
                            f'Invalid value: "{key}": a valid config key must consist of '
                            "alphanumeric characters, '-', '_' or '.'",
                        )
                    )
                if key_name == "binaryData" or resource is SECRETS:
                    try:
                        total += len(base64.b64decode(str(value), validate=True))
                    except (binascii.Error, ValueError):
                        raise StatusError.bad_request(
                            f"illegal base64 data in {key_name}[{key}]"
                        ) from None
                else:
                    total += len(str(value).encode())
        if total > CONFIGMAP_MAX_BYTES:
            causes.append(
                (
                    "FieldValueTooLong",
                    "[]",
                    f"Too long: must have at most {CONFIGMAP_MAX_BYTES} bytes",
                )
            )
        if causes:
            raise StatusError.invalid(resource, name, causes)

    def _default_secret(self, obj: Obj) -> None:
        string_data = obj.pop("stringData", None) or {}
        data = obj.setdefault("data", {})
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        obj.setdefault("type", "Opaque")
        self._validate_data(SECRETS, obj, binary_key=None)

    def _event(self, obj: Obj, kind: str, reason: str, message: str) -> None:
        meta = _meta(obj)
        event = {
            "metadata": {
                "name": f"{meta['name']}.{uuid.uuid4().hex[:16]}",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "kind": obj.get("kind"),
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta.get("uid"),
                "apiVersion": obj.get("apiVersion"),
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "count": 1,
            "firstTimestamp": now_rfc3339(),
            "lastTimestamp": now_rfc3339(),
            "source": {"component": "fake-kubernetes"},
        }
        self.store.add(EVENTS, event)

    # -- update ------------------------------------------------------------------------

    def replace(self, resource: Resource, namespace: str, name: str, body: Any) -> Obj:
        current = self.store.get(resource, namespace, name)
        if not isinstance(body, dict):
            raise StatusError.bad_request("the request body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        expected = meta.get("resourceVersion")
        if expected and expected != current["metadata"]["resourceVersion"]:
            raise StatusError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {resource.qualified} "{name}": the object '
                "has been modified; please apply your changes to the latest version and try "
                "again",
                {"name": name, "group": resource.group, "kind": resource.name},
            )
        for key in ("uid", "creationTimestamp", "generation"):
            if key in current["metadata"]:
                meta[key] = current["metadata"][key]
        meta["name"], meta["namespace"] = name, namespace
        if resource is CONFIGMAPS:
            self._validate_data(resource, obj, binary_key="binaryData")
        if resource is SECRETS:
            self._default_secret(obj)
        stored = self.store.put(resource, obj)
        if resource is JOBS:
            self._reconcile_job(stored)
        return stored

    def patched(self, resource: Resource, obj: Obj) -> Obj:
        """Store a patched object (validated as on create where it matters)."""
        if resource is CONFIGMAPS:
            self._validate_data(resource, obj, binary_key="binaryData")
        stored = self.store.put(resource, obj)
        if resource is JOBS:
            self._reconcile_job(stored)
        return stored

    # -- delete ------------------------------------------------------------------------

    async def delete(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        *,
        propagation: str | None,
        grace: int | None,
    ) -> tuple[Obj, dict[str, str]]:
        """Delete with the propagation policy's semantics; returns (body, headers)."""
        obj = self.store.get(resource, namespace, name)
        headers: dict[str, str] = {}
        if propagation is None:
            if resource is JOBS:
                propagation = "Orphan"
                headers["Warning"] = (
                    '299 - "child pods are preserved by default when jobs are deleted; set '
                    "propagationPolicy=Background to remove them or set "
                    'propagationPolicy=Orphan to suppress this warning"'
                )
            else:
                propagation = "Background"
        if propagation not in ("Background", "Foreground", "Orphan"):
            raise StatusError.bad_request(
                f'Unsupported value: "{propagation}": supported values: "Foreground", '
                '"Background", "Orphan"'
            )
        uid = _meta(obj)["uid"]
        if resource is JOBS:
            self._stop_controller(uid)
        if resource is PODS:
            return await self._delete_pod(obj, grace), headers
        if propagation == "Orphan":
            obj = self._mark_deleting(resource, obj, ["orphan"])
            for dep_resource, dep in self.store.dependents(namespace, uid):
                self.store.update(
                    dep_resource,
                    namespace,
                    _meta(dep)["name"],
                    functools.partial(_strip_owner, uid=uid),
                )
            self.store.remove(resource, namespace, name)
            return obj, headers
        if propagation == "Foreground":
            obj = self._mark_deleting(resource, obj, ["foregroundDeletion"])
            self._spawn(self._foreground(resource, namespace, name, uid))
            return obj, headers
        gone = self.store.remove(resource, namespace, name)
        self._spawn(self._collect(namespace, uid))
        if resource is JOBS:
            details = {"name": name, "group": resource.group, "kind": resource.name, "uid": uid}
            return {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": details,
            }, headers
        return gone, headers

    def _mark_deleting(self, resource: Resource, obj: Obj, finalizers: list[str]) -> Obj:
        def mark(o: Obj) -> None:
            _meta(o)["deletionTimestamp"] = now_rfc3339()
            _meta(o)["deletionGracePeriodSeconds"] = 0
            _meta(o)["finalizers"] = finalizers

        return self.store.update(resource, _meta(obj)["namespace"], _meta(obj)["name"], mark)

    async def _collect(self, namespace: str, owner_uid: str) -> None:
        """Garbage collection: delete (Background) whatever ``owner_uid`` owned."""
        for resource, dep in self.store.dependents(namespace, owner_uid):
            with contextlib.suppress(StatusError):
                await self.delete(
                    resource, namespace, _meta(dep)["name"], propagation="Background", grace=None
                )

    async def _foreground(self, resource: Resource, namespace: str, name: str, uid: str) -> None:
        await self._collect(namespace, uid)
        while self.store.dependents(namespace, uid):  # noqa: ASYNC110 (no event for "gone")
            await asyncio.sleep(0.02)
        with contextlib.suppress(StatusError):
            self.store.remove(resource, namespace, name)

    async def _delete_pod(self, pod: Obj, grace: int | None) -> Obj:
        meta = _meta(pod)
        uid = meta["uid"]
        kubelet = self._kubelets.get(uid)
        running = kubelet is not None and kubelet.group is not None and not kubelet.group.empty
        if not running:
            if kubelet is not None:
                kubelet.task.cancel()
            self._kubelets.pop(uid, None)
            gone = self.store.remove(PODS, meta["namespace"], meta["name"])
            self._pod_finished(uid, "Failed")
            self._finish_log(uid)
            return gone
        assert kubelet is not None
        if grace is None:
            grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))

        def mark(o: Obj) -> None:
            _meta(o)["deletionTimestamp"] = now_rfc3339()
            _meta(o)["deletionGracePeriodSeconds"] = grace

        marked = self.store.update(PODS, meta["namespace"], meta["name"], mark)
        if not kubelet.terminating:
            kubelet.terminating = True
            self._spawn(self._terminate(marked, kubelet, min(float(grace), self.max_grace)))
        return marked

    async def _terminate(self, pod: Obj, kubelet: _Kubelet, grace: float) -> None:
        assert kubelet.group is not None
        await kubelet.group.stop(grace)
        with contextlib.suppress(asyncio.CancelledError):
            await kubelet.task
        meta = _meta(pod)
        self._kubelets.pop(meta["uid"], None)
        with contextlib.suppress(StatusError):
            self.store.remove(PODS, meta["namespace"], meta["name"])
        self._pod_finished(meta["uid"], "Failed")

    # -- job controller ----------------------------------------------------------------

    def _reconcile_job(self, job: Obj) -> None:
        uid = _meta(job)["uid"]
        if uid in self._controllers or _meta(job).get("deletionTimestamp"):
            return
        if job["spec"].get("suspend") or _finished(job):
            return
        self._controllers[uid] = self._spawn(
            self._run_job(_meta(job)["namespace"], _meta(job)["name"], uid)
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
                result = await self._pod_result(_meta(pod)["uid"])
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
                        PODS, namespace, _meta(pod)["name"], propagation=None, grace=None
                    )
                with contextlib.suppress(asyncio.CancelledError, KeyError):
                    await self._pod_result(_meta(pod)["uid"])
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
        meta = _meta(job)
        template = copy.deepcopy(job["spec"]["template"])
        pod = {
            "metadata": {
                **template.get("metadata", {}),
                "name": f"{meta['name']}-{_suffix()}",
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
        self._event(job, "Normal", "SuccessfulCreate", f"Created pod: {_meta(stored)['name']}")
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
        for ref in _meta(pod).get("ownerReferences") or []:
            if ref.get("kind") == "Job" and ref.get("uid") in self._controllers:
                ready = any(c.get("ready") for c in pod["status"].get("containerStatuses", []))
                with contextlib.suppress(StatusError):
                    job = self.store.get(JOBS, _meta(pod)["namespace"], ref["name"])
                    if job.get("status", {}).get("ready") != int(ready) and not _finished(job):
                        self._job_status(_meta(pod)["namespace"], ref["name"], ready=int(ready))

    # -- kubelet -----------------------------------------------------------------------

    def _start_kubelet(self, pod: Obj) -> None:
        uid = _meta(pod)["uid"]
        self.logs[uid] = PodLog()
        self._pod_result(uid)
        task = self._spawn(self._run_pod(_meta(pod)["namespace"], _meta(pod)["name"], uid))
        self._kubelets[uid] = _Kubelet(task)

    def _pod_status(self, pod: Obj, **status: Any) -> Obj:
        def change(o: Obj) -> None:
            o.setdefault("status", {}).update(status)

        stored = self.store.update(PODS, _meta(pod)["namespace"], _meta(pod)["name"], change)
        self._pod_changed(stored)
        return stored

    def _finish_log(self, uid: str) -> None:
        log = self.logs.get(uid)
        if log is not None:
            log.finish()

    async def _run_pod(self, namespace: str, name: str, uid: str) -> None:
        try:
            await self._drive_pod(namespace, name, uid)
        except StatusError:
            pass  # the pod was deleted while its kubelet worked
        finally:
            self._finish_log(uid)

    async def _drive_pod(self, namespace: str, name: str, uid: str) -> None:
        pod = self.store.get(PODS, namespace, name)
        spec = pod["spec"]
        container = spec["containers"][0]
        now = now_rfc3339()
        if self.faults.unschedulable:
            self._pod_status(
                pod,
                phase="Pending",
                conditions=[
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": _UNSCHEDULABLE,
                        "lastProbeTime": None,
                        "lastTransitionTime": now,
                    }
                ],
            )
            self._event(
                pod,
                "Warning",
                "FailedScheduling",
                "0/1 nodes are available: 1 Insufficient memory.",
            )
            await asyncio.Event().wait()
        self._set_node(pod)
        pod = self._waiting(pod, container, "ContainerCreating", None)
        image = str(container.get("image", ""))
        if image in self.faults.image_pull_failures:
            message = (
                f'Failed to pull image "{image}": rpc error: code = NotFound desc = '
                f'failed to pull and unpack image "{image}": not found'
            )
            self._waiting(pod, container, "ErrImagePull", message)
            self._event(pod, "Warning", "Failed", message)
            await asyncio.sleep(0.1)
            self._waiting(pod, container, "ImagePullBackOff", f'Back-off pulling image "{image}"')
            self._event(pod, "Normal", "BackOff", f'Back-off pulling image "{image}"')
            await asyncio.Event().wait()
        if self.faults.hold_pending:
            await asyncio.Event().wait()
        if not container.get("command"):
            self._waiting(
                pod,
                container,
                "CreateContainerError",
                "FakeKubernetes runs a container's command on the host and pulls no "
                "image: set spec.containers[].command",
            )
            await asyncio.Event().wait()
        root = self.root / uid
        mounts = await self._materialize(pod, container, root)
        try:
            env = self._container_env(pod, container)
        except LookupError as exc:
            self._waiting(pod, container, "CreateContainerConfigError", str(exc))
            await asyncio.Event().wait()
        rewrite = _path_rewriter(mounts)
        argv = [
            rewrite(str(a)) for a in [*container.get("command", []), *container.get("args", [])]
        ]
        env = {k: rewrite(v) for k, v in env.items()}
        workdir = container.get("workingDir")
        if workdir:
            cwd = Path(rewrite(workdir))
            if not any(workdir == m or workdir.startswith(m.rstrip("/") + "/") for m in mounts):
                cwd = root / "rootfs" / workdir.lstrip("/")
        else:
            cwd = root / "rootfs"
        await anyio.to_thread.run_sync(lambda: cwd.mkdir(parents=True, exist_ok=True))
        log = self.logs[uid]
        kubelet = self._kubelets[uid]
        restarts = 0
        oom = image in self.faults.oom_images
        while True:
            started = now_rfc3339()
            group = await ProcessGroup.start(
                "/bin/sh", "exec " + shlex.join(argv), cwd=cwd, env=env, on_output=log.feed
            )
            kubelet.group = group
            log.started = True
            pod = self._running(pod, container, started, restarts)
            if restarts == 0:
                self._event(pod, "Normal", "Started", f"Started container {container['name']}")
            if oom:
                await asyncio.sleep(0.05)
                kubelet.oom = True
                group.signal_group(signal.SIGKILL)
            pump = asyncio.get_running_loop().create_task(group.pump_output())
            try:
                code = await group.wait_exit()
                await group.reap_stragglers(self.max_grace)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(pump), timeout=self.max_grace)
            finally:
                pump.cancel()
                group.close()
            exit_code = code if code >= 0 else 128 - code
            if kubelet.oom:
                reason = "OOMKilled"
            elif exit_code == 0:
                reason = "Completed"
            else:
                reason = "Error"
            terminated = {
                "exitCode": exit_code,
                "reason": reason,
                "startedAt": started,
                "finishedAt": now_rfc3339(),
                "containerID": f"fake://{group.pid}",
            }
            kubelet.oom = False
            restart = (
                exit_code != 0
                and spec.get("restartPolicy") == "OnFailure"
                and not kubelet.terminating
                and restarts < self._restart_budget(pod)
            )
            if not restart:
                phase = "Succeeded" if exit_code == 0 and not kubelet.terminating else "Failed"
                self._terminated(pod, container, terminated, restarts, phase)
                log.finish()
                self._pod_finished(uid, phase)
                return
            restarts += 1
            self._pod_status(
                pod,
                phase="Running",
                containerStatuses=[
                    self._container_status(
                        container,
                        {
                            "waiting": {
                                "reason": "CrashLoopBackOff",
                                "message": "back-off restarting failed container "
                                + container["name"],
                            }
                        },
                        restarts,
                        last={"terminated": terminated},
                    )
                ],
            )
            await asyncio.sleep(self.pod_backoff * 2 ** (restarts - 1))
            pod = self.store.get(PODS, namespace, name)

    def _restart_budget(self, pod: Obj) -> int:
        for ref in _meta(pod).get("ownerReferences") or []:
            if ref.get("kind") == "Job":
                job = self.store.find(JOBS, _meta(pod)["namespace"], ref["name"])
                if job is not None:
                    return int(job["spec"].get("backoffLimit", 6))
        return 2**31

    def _set_node(self, pod: Obj) -> None:
        def change(o: Obj) -> None:
            o["spec"]["nodeName"] = "fake-node"

        self.store.update(PODS, _meta(pod)["namespace"], _meta(pod)["name"], change)
        self._event(
            pod,
            "Normal",
            "Scheduled",
            f"Successfully assigned {_meta(pod)['namespace']}/{_meta(pod)['name']} to fake-node",
        )

    def _container_status(
        self, container: Mapping[str, Any], state: Obj, restarts: int, *, last: Obj | None = None
    ) -> Obj:
        ready = "running" in state
        return {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "ready": ready,
            "started": ready,
            "restartCount": restarts,
            "state": state,
            "lastState": last or {},
        }

    def _conditions(self, ready: bool) -> list[Obj]:
        now = now_rfc3339()
        value = "True" if ready else "False"
        return [
            {
                "type": "PodScheduled",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": now,
            },
            {
                "type": "Initialized",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": now,
            },
            {
                "type": "ContainersReady",
                "status": value,
                "lastProbeTime": None,
                "lastTransitionTime": now,
            },
            {"type": "Ready", "status": value, "lastProbeTime": None, "lastTransitionTime": now},
        ]

    def _waiting(
        self, pod: Obj, container: Mapping[str, Any], reason: str, message: str | None
    ) -> Obj:
        waiting: Obj = {"reason": reason}
        if message:
            waiting["message"] = message
        return self._pod_status(
            pod,
            phase="Pending",
            hostIP="127.0.0.1",
            startTime=pod["status"].get("startTime") or now_rfc3339(),
            conditions=self._conditions(False),
            containerStatuses=[self._container_status(container, {"waiting": waiting}, 0)],
        )

    def _running(self, pod: Obj, container: Mapping[str, Any], started: str, restarts: int) -> Obj:
        return self._pod_status(
            pod,
            phase="Running",
            podIP="127.0.0.1",
            conditions=self._conditions(True),
            containerStatuses=[
                self._container_status(container, {"running": {"startedAt": started}}, restarts)
            ],
        )

    def _terminated(
        self, pod: Obj, container: Mapping[str, Any], terminated: Obj, restarts: int, phase: str
    ) -> None:
        with contextlib.suppress(StatusError):
            self._pod_status(
                pod,
                phase=phase,
                conditions=self._conditions(False),
                containerStatuses=[
                    self._container_status(container, {"terminated": terminated}, restarts)
                ],
            )

    async def _materialize(
        self, pod: Obj, container: Mapping[str, Any], root: Path
    ) -> dict[str, Path]:
        """Write each mounted volume under ``root``; return mount path → host path.

        ConfigMaps and Secrets that do not exist yet are waited for (the pod stays
        ContainerCreating), as a kubelet does.
        """
        namespace = _meta(pod)["namespace"]
        volumes = {v.get("name"): v for v in pod["spec"].get("volumes") or []}
        mounts: dict[str, Path] = {}
        files: list[tuple[Path, bytes]] = []
        links: list[tuple[Path, Path]] = []
        dirs: list[Path] = [root / "rootfs"]
        for mount in container.get("volumeMounts") or []:
            mount_path = str(mount.get("mountPath", ""))
            volume = volumes.get(mount.get("name"))
            if not mount_path.startswith("/") or volume is None:
                continue
            host = root / "volumes" / mount_path.lstrip("/")
            mounts[mount_path] = host
            if "hostPath" in volume:
                links.append((host, Path(volume["hostPath"]["path"])))
                continue
            dirs.append(host)
            if "configMap" in volume or "secret" in volume:
                data = await self._volume_data(namespace, volume)
                items = (volume.get("configMap") or volume.get("secret") or {}).get("items")
                paths = (
                    {i["key"]: i.get("path", i["key"]) for i in items}
                    if items
                    else {k: k for k in data}
                )
                for key, path in paths.items():
                    if key in data:
                        files.append((host / path, data[key]))

        def write() -> None:
            for directory in dirs:
                directory.mkdir(parents=True, exist_ok=True)
            for path, content in files:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
            for link, target in links:
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(target)

        await anyio.to_thread.run_sync(write)
        return mounts

    async def _volume_data(self, namespace: str, volume: Mapping[str, Any]) -> dict[str, bytes]:
        is_cm = "configMap" in volume
        source = volume["configMap"] if is_cm else volume["secret"]
        name = source.get("name") if is_cm else source.get("secretName")
        while True:
            obj = self.store.find(CONFIGMAPS if is_cm else SECRETS, namespace, str(name))
            if obj is not None:
                break
            if source.get("optional"):
                return {}
            await asyncio.sleep(0.05)
        data: dict[str, bytes] = {}
        if is_cm:
            data.update({k: str(v).encode() for k, v in (obj.get("data") or {}).items()})
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        else:
            data.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
        return data

    def _container_env(self, pod: Obj, container: Mapping[str, Any]) -> dict[str, str]:
        """The container's environment. Raises LookupError for a missing reference."""
        meta = _meta(pod)
        namespace = meta["namespace"]
        env = dict(self.base_env)
        env["HOSTNAME"] = meta["name"]
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref = source["configMapRef"]
                cm = self.store.find(CONFIGMAPS, namespace, ref.get("name", ""))
                if cm is None and not ref.get("optional"):
                    raise LookupError(f'configmap "{ref.get("name")}" not found')
                env.update({prefix + k: str(v) for k, v in ((cm or {}).get("data") or {}).items()})
            if "secretRef" in source:
                ref = source["secretRef"]
                secret = self.store.find(SECRETS, namespace, ref.get("name", ""))
                if secret is None and not ref.get("optional"):
                    raise LookupError(f'secret "{ref.get("name")}" not found')
                env.update(
                    {
                        prefix + k: base64.b64decode(v).decode()
                        for k, v in ((secret or {}).get("data") or {}).items()
                    }
                )
        fields = {
            "metadata.name": meta["name"],
            "metadata.namespace": namespace,
            "metadata.uid": meta["uid"],
            "spec.nodeName": "fake-node",
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }
        for item in container.get("env") or []:
            name = item.get("name")
            if not name:
                continue
            if "value" in item:
                env[name] = _expand(str(item["value"] if item["value"] is not None else ""), env)
                continue
            source = item.get("valueFrom") or {}
            if "fieldRef" in source:
                env[name] = fields.get(source["fieldRef"].get("fieldPath", ""), "")
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                is_secret = "secretKeyRef" in source
                ref = source["secretKeyRef" if is_secret else "configMapKeyRef"]
                obj = self.store.find(
                    SECRETS if is_secret else CONFIGMAPS, namespace, ref.get("name", "")
                )
                kind = "secret" if is_secret else "configmap"
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise LookupError(f'{kind} "{ref.get("name")}" not found')
                data = obj.get("data") or {}
                if ref.get("key") not in data:
                    if ref.get("optional"):
                        continue
                    raise LookupError(
                        f"couldn't find key {ref.get('key')} in {kind} "
                        f"{namespace}/{ref.get('name')}"
                    )
                value = data[ref["key"]]
                env[name] = base64.b64decode(value).decode() if is_secret else str(value)
        return env

    async def oom_kill(self, namespace: str, name: str) -> None:
        """Kill a running pod's container as the OOM killer would. Raises StatusError."""
        pod = self.store.get(PODS, namespace, name)
        kubelet = self._kubelets.get(_meta(pod)["uid"])
        if kubelet is None or kubelet.group is None:
            raise StatusError.bad_request(f'pod "{name}" has no running container')
        kubelet.oom = True
        kubelet.group.signal_group(signal.SIGKILL)

    async def remove_root(self) -> None:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(self.root, ignore_errors=True))


def _finished(job: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in (job.get("status") or {}).get("conditions") or []
    )


def _strip_owner(obj: Obj, uid: str) -> None:
    refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
    if refs:
        obj["metadata"]["ownerReferences"] = refs
    else:
        obj["metadata"].pop("ownerReferences", None)


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in env values."""
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def _path_rewriter(mounts: Mapping[str, Path]) -> Callable[[str], str]:
    """Map container mount paths inside a string to their host directories (longest first),
    so commands that name ``/mount/path/file`` work without a container."""
    if not mounts:
        return lambda text: text
    ordered = sorted(mounts, key=len, reverse=True)
    pattern = re.compile(
        "(?<![A-Za-z0-9_.-])("
        + "|".join(re.escape(m.rstrip("/")) for m in ordered)
        + r")(?=$|[/\s'\";:&|)=,])"
    )
    table = {m.rstrip("/"): str(mounts[m]) for m in ordered}
    return lambda text: pattern.sub(lambda m: table[m.group(1)], text)
