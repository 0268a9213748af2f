"""What the parts of FakeKubernetes' cluster share: the fault switches, pods' logs, the
store and the tasks they run, events, and the calls one part makes on another."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aioproj._process import ProcessGroup

from ._store import RESOURCES, Obj, Resource, Store, now_rfc3339

__all__ = [
    "CONFIGMAPS",
    "EVENTS",
    "JOBS",
    "PODS",
    "SECRETS",
    "ClusterBase",
    "Faults",
    "KubeletState",
    "PodLog",
    "meta_of",
    "name_suffix",
]

JOBS = RESOURCES["jobs"]
PODS = RESOURCES["pods"]
CONFIGMAPS = RESOURCES["configmaps"]
SECRETS = RESOURCES["secrets"]
EVENTS = RESOURCES["events"]


_SUFFIX_CHARS = "bcdfghjklmnpqrstvwxz2456789"


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
class KubeletState:
    """What runs for one pod."""

    task: asyncio.Task[None]
    group: ProcessGroup | None = None
    terminating: bool = False
    oom: bool = False


def meta_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = obj["metadata"]
    return meta


def name_suffix() -> str:
    return "".join(random.choice(_SUFFIX_CHARS) for _ in range(5))


class ClusterBase:
    """The state FakeKubernetes' parts share, and what each part offers the others."""

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
        self._kubelets: dict[str, KubeletState] = {}  # by pod uid
        self._pod_results: dict[str, asyncio.Future[str]] = {}  # by pod uid
        self._tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _pod_by_uid(self, uid: str) -> Obj | None:
        for obj in self.store.objects["pods"].values():
            if obj["metadata"]["uid"] == uid:
                return obj
        return None

    def _event(self, obj: Obj, kind: str, reason: str, message: str) -> None:
        meta = meta_of(obj)
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

    # -- what each part offers the others (ApiObjects, JobController, Kubelet) --------

    def create(
        self, resource: Resource, namespace: str, body: Any, *, dry_run: bool = False
    ) -> Obj:
        raise NotImplementedError  # ApiObjects

    async def delete(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        *,
        propagation: str | None,
        grace: int | None,
    ) -> tuple[Obj, dict[str, str]]:
        raise NotImplementedError  # ApiObjects

    def _reconcile_job(self, job: Obj) -> None:
        raise NotImplementedError  # JobController

    def _stop_controller(self, uid: str) -> None:
        raise NotImplementedError  # JobController

    def _pod_result(self, uid: str) -> asyncio.Future[str]:
        raise NotImplementedError  # JobController

    def _pod_finished(self, uid: str, phase: str) -> None:
        raise NotImplementedError  # JobController

    def _pod_changed(self, pod: Obj) -> None:
        raise NotImplementedError  # JobController

    def _start_kubelet(self, pod: Obj) -> None:
        raise NotImplementedError  # Kubelet

    async def _delete_pod(self, pod: Obj, grace: int | None) -> Obj:
        raise NotImplementedError  # Kubelet
