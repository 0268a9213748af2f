"""One shared list+watch of aioproj's Jobs and Pods per namespace, for every run in it.

Each resource is listed once, then watched from the list's resourceVersion with
bookmarks; a stream that ends (server timeout) is resumed from the last resourceVersion
seen; 410 Expired (HTTP 410 or an ERROR event) means list again and watch from the new
version; other failures (a lost connection, "Too large resource version" from a server
that lost its state) reconnect with jittered backoff and list again, as client-go's
reflector does: a restarted API server may have forgotten a Job, which only a fresh list
shows (the run then fails, saying its Job is gone). Runs
subscribe by Job name and are called back when their Job or one of its pods changes;
nobody polls a single run's status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from aioproj._http import backoff_delay

from ._client import ExpiredError, KubeClient

__all__ = ["NamespaceWatch"]

logger = logging.getLogger("aioproj.kubernetes")

Obj = dict[str, Any]
_JOB_LABELS = ("batch.kubernetes.io/job-name", "job-name")


def _pod_job(pod: Obj) -> str | None:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    for key in _JOB_LABELS:
        if key in labels:
            return str(labels[key])
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "Job":
            return str(ref.get("name"))
    return None


class NamespaceWatch:
    """The cache of aioproj's Jobs and Pods in one namespace, kept by two watch streams.

    ``timeout_seconds``: how long each watch request lasts before it is renewed (the
    server ends it; the resume costs one request and no relist).
    """

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        selector: str,
        *,
        timeout_seconds: int = 240,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.selector = selector
        self.timeout_seconds = timeout_seconds
        self.jobs: dict[str, Obj] = {}
        self.pods: dict[str, Obj] = {}
        self._subscribers: dict[str, Callable[[], None]] = {}
        self._synced = {"jobs": anyio.Event(), "pods": anyio.Event()}
        #: Counters for users and benchmarks: list requests, watch requests, 410s.
        self.lists = 0
        self.watches = 0
        self.expired = 0
        self.errors = 0

    # -- for runs ----------------------------------------------------------------------

    def subscribe(self, job_name: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` whenever the Job or one of its pods changes (and once when
        the first lists are in). Returns the unsubscribe function."""
        self._subscribers[job_name] = callback
        return lambda: self._unsubscribe(job_name, callback)

    def _unsubscribe(self, job_name: str, callback: Callable[[], None]) -> None:
        if self._subscribers.get(job_name) is callback:
            del self._subscribers[job_name]

    @property
    def synced(self) -> bool:
        """True once both resources have been listed (the cache is complete)."""
        return all(event.is_set() for event in self._synced.values())

    def job(self, name: str) -> Obj | None:
        return self.jobs.get(name)

    def pods_of(self, job_name: str) -> list[Obj]:
        return [pod for pod in self.pods.values() if _pod_job(pod) == job_name]

    def _notify(self, job_name: str | None) -> None:
        if job_name is None:
            return
        callback = self._subscribers.get(job_name)
        if callback is not None:
            callback()

    # -- the streams -------------------------------------------------------------------

    async def run(self) -> None:
        """Follow both resources until cancelled. Never raises otherwise."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._follow, "jobs", f"/apis/batch/v1/namespaces/{self.namespace}/jobs")
            tg.start_soon(self._follow, "pods", f"/api/v1/namespaces/{self.namespace}/pods")

    def _cache(self, kind: str) -> dict[str, Obj]:
        return self.jobs if kind == "jobs" else self.pods

    def _job_of(self, kind: str, obj: Obj) -> str | None:
        if kind == "jobs":
            return str((obj.get("metadata") or {}).get("name"))
        return _pod_job(obj)

    def _replace(self, kind: str, items: list[Obj]) -> None:
        """A fresh list: the cache becomes it; runs whose objects changed or vanished are
        told."""
        cache = self._cache(kind)
        fresh = {str(item["metadata"]["name"]): item for item in items}
        touched: set[str | None] = set()
        for name, old in cache.items():
            new = fresh.get(name)
            if new is None or new["metadata"].get("resourceVersion") != old["metadata"].get(
                "resourceVersion"
            ):
                touched.add(self._job_of(kind, old))
        for name, new in fresh.items():
            if name not in cache:
                touched.add(self._job_of(kind, new))
        cache.clear()
        cache.update(fresh)
        first = not self._synced[kind].is_set()
        self._synced[kind].set()
        if first and self.synced:
            touched.update(self._subscribers)
        for job_name in touched:
            self._notify(job_name)

    def _apply(self, kind: str, event: Obj) -> None:
        obj = event["object"]
        name = str(obj["metadata"]["name"])
        cache = self._cache(kind)
        if event["type"] == "DELETED":
            old = cache.pop(name, obj)
            self._notify(self._job_of(kind, old))
        else:
            cache[name] = obj
            self._notify(self._job_of(kind, obj))

    async def _follow(self, kind: str, path: str) -> None:
        rv: str | None = None
        failures = 0
        while True:
            try:
                if rv is None:
                    self.lists += 1
                    listing = await self.client.request(
                        "GET", path, query=[("labelSelector", self.selector)]
                    )
                    self._replace(kind, list(listing.get("items") or []))
                    rv = str((listing.get("metadata") or {}).get("resourceVersion", ""))
                self.watches += 1
                opened, events = anyio.current_time(), 0
                async for event in self.client.watch(
                    path,
                    label_selector=self.selector,
                    resource_version=rv,
                    timeout_seconds=self.timeout_seconds,
                ):
                    failures, events = 0, events + 1
                    rv = str(event["object"]["metadata"].get("resourceVersion") or rv)
                    if event["type"] != "BOOKMARK":
                        self._apply(kind, event)
                # The server ended the stream (timeout or a drop): resume from rv, at once
                # unless it keeps ending empty-handed right away.
                if not events and anyio.current_time() - opened < 1.0:
                    failures += 1
                    await anyio.sleep(backoff_delay(failures, base=0.05, cap=5.0))
            except ExpiredError:
                self.expired += 1
                logger.debug(
                    "watch of %s in %s expired at %s: listing again", kind, self.namespace, rv
                )
                rv = None
            except Exception as exc:  # API errors, lost connections, malformed objects
                self.errors += 1
                failures += 1
                rv = None  # the server may have lost its state: only a list tells
                delay = backoff_delay(failures, base=0.2, cap=10.0)
                logger.warning(
                    "watch of %s in %s failed (%s); listing again in %.1f s",
                    kind,
                    self.namespace,
                    exc,
                    delay,
                )
                await anyio.sleep(delay)
