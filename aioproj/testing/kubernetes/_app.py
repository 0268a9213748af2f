"""FakeKubernetes' HTTP face: discovery, OpenAPI stubs, resource CRUD, list/watch, pod logs,
Tables for kubectl, auth, fault injection and request accounting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from aioproj.testing._json import JsonBodyError, loads_bounded

from ._cluster import Cluster, Faults
from ._discovery import (
    VERSION,
    core_resources,
    openapi_group,
    resource_entry,
)
from ._store import (
    RESOURCES,
    Obj,
    Resource,
    StatusError,
    Store,
    json_patch,
    merge_patch,
    parse_field_selector,
    parse_label_selector,
    parse_rv,
    status_body,
)
from ._tables import table_of, wants_table

__all__ = ["ApiServer", "RequestRecord"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_RESOURCE_PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>batch)/v1)(?P<watch>/watch)?"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<res>[a-z]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>status|log))?)?$"
)
_NAMESPACE_PATH = re.compile(r"^/api/v1/namespaces(?:/(?P<name>[^/]+))?$")


@dataclass(frozen=True)
class RequestRecord:
    """One request FakeKubernetes answered."""

    method: str
    path: str
    query: str
    #: get, list, watch, create, update, patch, delete, log, discovery
    verb: str
    resource: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def is_true(value: str | None) -> bool:
    """The apiserver's rule for boolean query values: false only when absent, ``0`` or
    ``false`` (any case)."""
    return value is not None and value != "0" and value.lower() != "false"


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A compact single-line JSON answer (watch clients read errors line by line)."""
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        headers={**dict(headers or {}), "Content-Type": "application/json"},
    )


def _error(exc: StatusError) -> web.Response:
    headers = dict(exc.headers)
    if exc.code == 429:
        headers.setdefault("Retry-After", "1")
    return _json(exc.body, exc.code, headers)


#: How many requests :attr:`ApiServer.requests` keeps: a flood must not grow the emulator.
REQUEST_LOG_SIZE = 100_000


class ApiServer:
    """The aiohttp application of FakeKubernetes."""

    def __init__(
        self,
        store: Store,
        cluster: Cluster,
        faults: Faults,
        *,
        token: str | None,
        bookmark_interval: float,
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.faults = faults
        self.token = token
        self.bookmark_interval = bookmark_interval
        #: The last :data:`REQUEST_LOG_SIZE` authenticated requests, in order.
        self.requests: deque[RequestRecord] = deque(maxlen=REQUEST_LOG_SIZE)
        #: Watch streams opened, by (resource, namespace or "*").
        self.watch_connections: Counter[tuple[str, str]] = Counter()
        self.active_watches = 0
        self._streams: set[asyncio.Task[Any]] = set()
        self.app = web.Application(middlewares=[self._middleware], client_max_size=8 * 1024 * 1024)
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)

    # -- plumbing ----------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            self.token is not None
            and request.path not in ("/healthz", "/readyz", "/livez")
            and request.headers.get("Authorization", "") != f"Bearer {self.token}"
        ):
            return _json(status_body(401, "Unauthorized", "Unauthorized"), 401)
        failure = self.faults.take_failure(request.path)
        if failure is not None:
            self._record(request)
            reasons = {429: "TooManyRequests", 503: "ServiceUnavailable", 504: "Timeout"}
            reason = reasons.get(failure, "InternalError")
            exc = StatusError(failure, reason, f"FakeKubernetes injected a {failure} ({reason})")
            return _error(exc)
        try:
            return await handler(request)
        except StatusError as exc:
            return _error(exc)

    def _record(self, request: web.Request, match: re.Match[str] | None = None) -> RequestRecord:
        query = request.query
        verb = "discovery"
        resource = namespace = name = sub = None
        if match is None:
            match = _RESOURCE_PATH.match(request.path)
        if match is not None:
            resource, namespace, name, sub = (
                match.group("res"),
                match.group("ns"),
                match.group("name"),
                match.group("sub"),
            )
            verbs = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
            if request.method in verbs:
                verb = verbs[request.method]
            elif sub == "log":
                verb = "log"
            elif name is not None and not match.group("watch"):
                verb = "get"
            elif match.group("watch") or is_true(query.get("watch")):
                verb = "watch"
            else:
                verb = "list"
        record = RequestRecord(
            request.method, request.path, request.query_string, verb, resource, namespace, name, sub
        )
        self.requests.append(record)
        return record

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        match = _RESOURCE_PATH.match(path)
        self._record(request, match)
        if match is not None and match.group("res") in RESOURCES:
            resource = RESOURCES[match.group("res")]
            if (resource.group or None) == match.group("group"):
                return await self._resource(request, match, resource)
        if request.method != "GET":
            raise StatusError(405, "MethodNotAllowed", f"{request.method} is not allowed on {path}")
        ns_match = _NAMESPACE_PATH.match(path)
        if ns_match:
            return self._namespace(ns_match.group("name"))
        static = self._static(path)
        if static is None:
            raise StatusError(404, "NotFound", "the server could not find the requested resource")
        return _json(static)

    def _static(self, path: str) -> Obj | None:
        if path == "/version":
            return dict(VERSION)
        if path in ("/healthz", "/readyz", "/livez"):
            return {"status": "ok"}
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}
                ],
            }
        group = {
            "name": "batch",
            "versions": [{"groupVersion": "batch/v1", "version": "v1"}],
            "preferredVersion": {"groupVersion": "batch/v1", "version": "v1"},
        }
        if path == "/apis":
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}
        if path == "/apis/batch":
            return {"kind": "APIGroup", "apiVersion": "v1", **group}
        if path == "/api/v1":
            return {"kind": "APIResourceList", "groupVersion": "v1", "resources": core_resources()}
        if path == "/apis/batch/v1":
            jobs = RESOURCES["jobs"]
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": "batch/v1",
                "resources": [
                    resource_entry(jobs),
                    {
                        "name": "jobs/status",
                        "singularName": "",
                        "namespaced": True,
                        "kind": "Job",
                        "verbs": ["get", "patch", "update"],
                    },
                ],
            }
        if path == "/openapi/v3":
            return {
                "paths": {
                    "api/v1": {"serverRelativeURL": "/openapi/v3/api/v1"},
                    "apis/batch/v1": {"serverRelativeURL": "/openapi/v3/apis/batch/v1"},
                }
            }
        if path == "/openapi/v3/apis/batch/v1":
            return openapi_group("/apis/batch/v1", [RESOURCES["jobs"]])
        if path == "/openapi/v3/api/v1":
            return openapi_group("/api/v1", [r for r in RESOURCES.values() if not r.group])
        return None

    def _namespace(self, name: str | None) -> web.Response:
        def ns(n: str) -> Obj:
            return {
                "kind": "Namespace",
                "apiVersion": "v1",
                "metadata": {
                    "name": n,
                    "uid": f"ns-{n}",
                    "resourceVersion": "1",
                    "creationTimestamp": "2026-01-01T00:00:00Z",
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            }

        if name is not None:
            return _json(ns(name))
        names = {"default"} | {key[0] for objs in self.store.objects.values() for key in objs}
        return _json(
            {
                "kind": "NamespaceList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.store.rv)},
                "items": [ns(n) for n in sorted(names)],
            }
        )

    # -- resources ---------------------------------------------------------------------

    async def _resource(
        self, request: web.Request, match: re.Match[str], resource: Resource
    ) -> web.StreamResponse:
        namespace, name, sub = match.group("ns"), match.group("name"), match.group("sub")
        method = request.method
        if sub == "log":
            if resource.name != "pods" or method != "GET" or namespace is None or name is None:
                raise StatusError(
                    404, "NotFound", "the server could not find the requested resource"
                )
            return await self._log(request, namespace, name)
        if name is None:
            if method == "GET":
                if match.group("watch") or is_true(request.query.get("watch")):
                    return await self._watch(request, resource, namespace)
                return self._list(request, resource, namespace)
            if method == "POST" and namespace is not None:
                body = await self._body(request)
                dry_run = request.query.get("dryRun") == "All"
                created = self.cluster.create(resource, namespace, body, dry_run=dry_run)
                return _json(created, 201)
            raise StatusError(405, "MethodNotAllowed", f"{method} is not supported here")
        if namespace is None:
            raise StatusError(404, "NotFound", "the server could not find the requested resource")
        if method == "GET":
            obj = self.store.get(resource, namespace, name)
            if wants_table(request):
                return _json(table_of(resource, [obj], obj["metadata"]["resourceVersion"]))
            return _json(obj)
        if method == "PUT":
            body = await self._body(request)
            return _json(self.cluster.replace(resource, namespace, name, body))
        if method == "PATCH":
            return _json(await self._patch(request, resource, namespace, name, sub))
        if method == "DELETE":
            options: Obj = {}
            if request.can_read_body:
                raw = await request.read()
                if raw.strip():
                    try:
                        options = loads_bounded(raw)
                    except JsonBodyError as exc:
                        raise StatusError.bad_request(
                            f"the DeleteOptions body is not usable: {exc}"
                        ) from None
                    if not isinstance(options, dict):
                        raise StatusError.bad_request("the DeleteOptions body must be an object")
            else:
                options = {
                    k: v
                    for k, v in request.query.items()
                    if k in ("propagationPolicy", "gracePeriodSeconds", "orphanDependents")
                }
            propagation = options.get("propagationPolicy")
            orphan = options.get("orphanDependents")
            if propagation is None and orphan is not None:
                propagation = "Orphan" if is_true(str(orphan)) else "Background"
            grace = options.get("gracePeriodSeconds")
            body, headers = await self.cluster.delete(
                resource,
                namespace,
                name,
                propagation=propagation,
                grace=int(grace) if grace is not None else None,
            )
            return _json(body, 200, headers)
        raise StatusError(405, "MethodNotAllowed", f"{method} is not supported here")

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()  # past client_max_size: 413, as the API server answers
        try:
            return loads_bounded(raw)
        except JsonBodyError as exc:
            raise StatusError.bad_request(f"the request body is not usable: {exc}") from None

    async def _patch(
        self, request: web.Request, resource: Resource, namespace: str, name: str, sub: str | None
    ) -> Obj:
        current = self.store.get(resource, namespace, name)
        patch = await self._body(request)
        kind = request.headers.get("Content-Type", "").split(";")[0].strip()
        if kind == "application/json-patch+json":
            if not isinstance(patch, list):
                raise StatusError.bad_request("a JSON patch must be a list of operations")
            updated = json_patch(current, patch)
        elif kind in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(patch, dict):
                raise StatusError.bad_request("a merge patch must be a JSON object")
            if sub == "status":
                patch = {"status": patch.get("status")} if "status" in patch else {}
            updated = merge_patch(current, patch)
        else:
            raise StatusError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media "
                f"types include: application/json-patch+json, "
                f"application/merge-patch+json, "
                f"application/strategic-merge-patch+json; got {kind!r}",
            )
        for key in ("name", "namespace", "uid", "creationTimestamp"):
            updated["metadata"][key] = current["metadata"][key]
        return self.cluster.patched(resource, updated)

    def _list(
        self, request: web.Request, resource: Resource, namespace: str | None
    ) -> web.Response:
        query = request.query
        labels = parse_label_selector(query.get("labelSelector"))
        fields = parse_field_selector(query.get("fieldSelector"))
        items = self.store.items(resource, namespace, labels, fields)
        rv = str(self.store.rv)
        metadata: Obj = {"resourceVersion": rv}
        start = 0
        token = query.get("continue")
        if token:
            try:
                token_rv, offset = (int(p) for p in token.split(":", 1))
            except ValueError:
                raise StatusError.bad_request("invalid continue token") from None
            if token_rv < self.store.compacted:
                raise StatusError(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to "
                    "display a consistent list result. You can start a new list "
                    "without the continue parameter.",
                )
            start = offset
        limit = int(query.get("limit", "0") or 0)
        if limit > 0 and start + limit < len(items):
            metadata["continue"] = f"{self.store.rv}:{start + limit}"
            metadata["remainingItemCount"] = len(items) - start - limit
            items = items[start : start + limit]
        else:
            items = items[start:]
        if wants_table(request):
            return _json(table_of(resource, items, rv))
        listed = [
            {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")} for obj in items
        ]
        return _json(
            {
                "kind": f"{resource.kind}List",
                "apiVersion": resource.api_version,
                "metadata": metadata,
                "items": listed,
            }
        )

    async def _watch(
        self, request: web.Request, resource: Resource, namespace: str | None
    ) -> web.StreamResponse:
        query = request.query
        labels = parse_label_selector(query.get("labelSelector"))
        fields = parse_field_selector(query.get("fieldSelector"))
        rv = query.get("resourceVersion")
        if rv:
            parse_rv(rv)
        bookmarks = is_true(query.get("allowWatchBookmarks"))
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        try:
            watcher = self.store.open_watch(resource, namespace, labels, fields, rv)
        except StatusError as exc:
            if exc.code != 410 or self.faults.expired_as_http:
                raise
            watcher = None
            expired = exc
        self.watch_connections[(resource.name, namespace or "*")] += 1
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if watcher is None:
            error = json.dumps({"type": "ERROR", "object": expired.body}, separators=(",", ":"))
            await response.write(error.encode() + b"\n")
            await response.write_eof()
            return response
        self.active_watches += 1
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                wait = self.bookmark_interval if bookmarks else None
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    wait = left if wait is None else min(wait, left)
                try:
                    line = await asyncio.wait_for(watcher.queue.get(), wait)
                except asyncio.TimeoutError:
                    if bookmarks:
                        await response.write(self._bookmark(resource, watcher))
                    continue
                if line is None:
                    return response  # dropped: the connection ends without a clean EOF
                await response.write(line)
            if bookmarks:
                await response.write(self._bookmark(resource, watcher))
            await response.write_eof()
        except ConnectionResetError:  # the client went away
            pass
        finally:
            self.active_watches -= 1
            self.store.close_watch(watcher)
        return response

    def _bookmark(self, resource: Resource, watcher: Any) -> bytes:
        rv = max(watcher.last_rv, self.store.rv) if watcher.queue.empty() else watcher.last_rv
        obj = {
            "kind": resource.kind,
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(rv)},
        }
        return (
            json.dumps({"type": "BOOKMARK", "object": obj}, separators=(",", ":")).encode() + b"\n"
        )

    async def _log(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        pod = self.store.get(RESOURCES["pods"], namespace, name)
        containers = [c["name"] for c in pod["spec"].get("containers") or []]
        container = request.query.get("container")
        if container is None:
            if len(containers) != 1:
                raise StatusError.bad_request(
                    f"a container name must be specified for pod {name}, choose one of: "
                    f"[{' '.join(containers)}]"
                )
            container = containers[0]
        elif container not in containers:
            raise StatusError.bad_request(f"container {container} is not valid for pod {name}")
        log = self.cluster.logs.get(pod["metadata"]["uid"])
        if log is None or not log.started:
            reason = "ContainerCreating"
            for cs in pod.get("status", {}).get("containerStatuses") or []:
                reason = cs.get("state", {}).get("waiting", {}).get("reason", reason)
            raise StatusError.bad_request(
                f'container "{container}" in pod "{name}" is waiting to start: {reason}'
            )
        follow = is_true(request.query.get("follow"))
        data = bytes(log.data)
        tail = request.query.get("tailLines")
        if tail is not None:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-int(tail) :]) if int(tail) > 0 else b""
        limit = request.query.get("limitBytes")
        if not follow:
            if limit is not None:
                data = data[: int(limit)]
            return web.Response(body=data, content_type="text/plain")
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        sent = len(log.data)
        if data:
            await response.write(data)
        with contextlib.suppress(ConnectionResetError):  # the client went away
            await self._follow(response, log, sent)
        return response

    async def _follow(self, response: web.StreamResponse, log: Any, sent: int) -> None:
        while True:
            if sent < len(log.data):
                chunk = bytes(log.data[sent:])
                sent += len(chunk)
                await response.write(chunk)
                continue
            if log.done:
                break
            changed = log.changed
            if sent == len(log.data) and not log.done:
                await changed.wait()
        await response.write_eof()

    async def close_streams(self) -> None:
        self.store.drop_watches()
        for log in self.cluster.logs.values():
            log.finish()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)
