"""FakeKubernetes' object store: objects by resource, one resourceVersion counter, an event
history with a retention window, watchers, selectors and Status errors.

Pure in-memory data structures; nothing here does I/O or knows about HTTP.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "RESOURCES",
    "Resource",
    "StatusError",
    "Store",
    "Watcher",
    "merge_patch",
    "now_rfc3339",
    "parse_field_selector",
    "parse_label_selector",
    "status_body",
]

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    """One served resource type."""

    name: str  # plural, as in paths: "jobs"
    kind: str
    group: str  # "" for the core group
    version: str = "v1"
    short_names: tuple[str, ...] = ()
    verbs: tuple[str, ...] = (
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    )
    categories: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """``jobs.batch``, ``pods``: how error messages name the resource."""
        return f"{self.name}.{self.group}" if self.group else self.name

    @property
    def qualified_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind


RESOURCES: dict[str, Resource] = {
    r.name: r
    for r in (
        Resource("pods", "Pod", "", short_names=("po",), categories=("all",)),
        Resource("configmaps", "ConfigMap", "", short_names=("cm",)),
        Resource("secrets", "Secret", ""),
        Resource("events", "Event", "", short_names=("ev",)),
        Resource("jobs", "Job", "batch", categories=("all",)),
    )
}


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(
    code: int,
    reason: str,
    message: str,
    details: Mapping[str, Any] | None = None,
) -> Obj:
    """A ``Status`` object as the apiserver sends for errors."""
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        body["details"] = dict(details)
    return body


class StatusError(Exception):
    """An API error: answered as a ``Status`` body with its code."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.body = status_body(code, reason, message, details)
        self.headers = dict(headers or {})

    @classmethod
    def not_found(cls, resource: Resource, name: str) -> StatusError:
        return cls(
            404,
            "NotFound",
            f'{resource.qualified} "{name}" not found',
            {"name": name, "group": resource.group, "kind": resource.name},
        )

    @classmethod
    def already_exists(cls, resource: Resource, name: str) -> StatusError:
        return cls(
            409,
            "AlreadyExists",
            f'{resource.qualified} "{name}" already exists',
            {"name": name, "group": resource.group, "kind": resource.name},
        )

    @classmethod
    def invalid(
        cls, resource: Resource, name: str, causes: list[tuple[str, str, str]]
    ) -> StatusError:
        """``causes``: (reason, field, message) triples."""
        summary = "; ".join(f"{f}: {m}" for _, f, m in causes)
        if len(causes) > 1:
            summary = "[" + ", ".join(f"{f}: {m}" for _, f, m in causes) + "]"
        return cls(
            422,
            "Invalid",
            f'{resource.qualified_kind} "{name}" is invalid: {summary}',
            {
                "name": name,
                "group": resource.group,
                "kind": resource.kind,
                "causes": [{"reason": r, "message": m, "field": f} for r, f, m in causes],
            },
        )

    @classmethod
    def bad_request(cls, message: str) -> StatusError:
        return cls(400, "BadRequest", message)

    @classmethod
    def expired(cls, requested: str, oldest: int) -> StatusError:
        return cls(410, "Expired", f"too old resource version: {requested} ({oldest})")

    @classmethod
    def too_large(cls, requested: str, current: int) -> StatusError:
        """A version newer than the store's: it lost its state (a restarted API server with
        an empty etcd). The real server answers so after waiting for its cache."""
        return cls(
            504,
            "Timeout",
            f"Too large resource version: {requested}, current: {current}",
            {
                "causes": [
                    {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
                ],
                "retryAfterSeconds": 1,
            },
        )


# -- selectors --------------------------------------------------------------------------

Predicate = Callable[[Mapping[str, str]], bool]

_SET_RE = re.compile(r"^\s*([^\s!=()]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _requirement(labels: Mapping[str, str], op: str, key: str, values: frozenset[str]) -> bool:
    if op == "in":
        return labels.get(key) in values
    if op == "notin":
        return labels.get(key) not in values
    if op == "exists":
        return key in labels
    if op == "!exists":
        return key not in labels
    value = next(iter(values))
    return labels.get(key) == value if op == "=" else labels.get(key) != value


def parse_label_selector(text: str | None) -> Predicate:
    """A predicate over label maps for ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``,
    ``k notin (a,b)``, ``k`` and ``!k``, comma meaning AND. Raises StatusError (400)."""
    requirements: list[tuple[str, str, frozenset[str]]] = []
    for part in _split_top(text or ""):
        match = _SET_RE.match(part)
        if match:
            values = frozenset(v.strip() for v in match.group(3).split(",") if v.strip())
            requirements.append((match.group(2), match.group(1), values))
        elif "!=" in part:
            key, value = part.split("!=", 1)
            requirements.append(("!=", key.strip(), frozenset([value.strip()])))
        elif "=" in part:
            key, value = part.replace("==", "=", 1).split("=", 1)
            requirements.append(("=", key.strip(), frozenset([value.strip()])))
        elif part.startswith("!"):
            requirements.append(("!exists", part[1:].strip(), frozenset()))
        elif re.fullmatch(r"[A-Za-z0-9._/-]+", part):
            requirements.append(("exists", part, frozenset()))
        else:
            raise StatusError.bad_request(f"unable to parse requirement: {part!r}")

    def matches(labels: Mapping[str, str]) -> bool:
        return all(_requirement(labels, op, key, values) for op, key, values in requirements)

    return matches


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_field_selector(text: str | None) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate over objects for ``path=v``, ``path==v``, ``path!=v`` (AND by comma),
    where path is a dotted field path such as ``metadata.name`` or ``status.phase``."""
    requirements: list[tuple[bool, str, str]] = []  # (equal?, path, value)
    for part in _split_top(text or ""):
        if "!=" in part:
            path, value = part.split("!=", 1)
            requirements.append((False, path.strip(), value.strip()))
        elif "=" in part:
            path, value = part.replace("==", "=", 1).split("=", 1)
            requirements.append((True, path.strip(), value.strip()))
        else:
            raise StatusError.bad_request(f"invalid field selector: {part!r}")

    def matches(obj: Mapping[str, Any]) -> bool:
        return all((_field_value(obj, p) == v) is eq for eq, p, v in requirements)

    return matches


# -- patches ----------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic merge patches: lists replace)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: Obj, ops: list[Any]) -> Obj:
    """RFC 6902 ``add``/``replace``/``remove``/``test``. Raises StatusError (422/400)."""
    doc: Any = copy.deepcopy(target)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise StatusError.bad_request("invalid JSON patch operation")
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent: Any = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last = parts[-1] if parts else ""
        kind = op["op"]
        try:
            if kind in ("add", "replace"):
                if isinstance(parent, list):
                    index = len(parent) if last == "-" else int(last)
                    if kind == "add":
                        parent.insert(index, op.get("value"))
                    else:
                        parent[index] = op.get("value")
                else:
                    parent[last] = op.get("value")
            elif kind == "remove":
                if isinstance(parent, list):
                    del parent[int(last)]
                else:
                    del parent[last]
            elif kind == "test":
                current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
                if current != op.get("value"):
                    raise StatusError(422, "Invalid", f"the test of {op['path']} failed")
            else:
                raise StatusError.bad_request(f"unsupported JSON patch operation {kind!r}")
        except (KeyError, IndexError, ValueError) as exc:
            raise StatusError(
                422, "Invalid", f"the JSON patch path {op['path']} does not exist"
            ) from exc
    result: Obj = doc
    return result


# -- store, history and watchers --------------------------------------------------------


@dataclass
class Event:
    rv: int
    resource: str
    namespace: str
    type: str  # ADDED MODIFIED DELETED
    obj: Obj
    old: Obj | None = None


@dataclass(eq=False)
class Watcher:
    """One open watch: a queue of encoded event lines; ``None`` ends the stream."""

    resource: Resource
    namespace: str | None
    labels: Predicate
    fields: Callable[[Mapping[str, Any]], bool]
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    last_rv: int = 0

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        return self.labels(meta.get("labels") or {}) and self.fields(obj)

    def offer(self, event: Event) -> None:
        if event.resource != self.resource.name:
            return
        if self.namespace is not None and event.namespace != self.namespace:
            return
        new_match = self.matches(event.obj)
        old_match = event.old is not None and self.matches(event.old)
        kind = event.type
        if kind == "MODIFIED":
            if new_match and not old_match:
                kind = "ADDED"
            elif old_match and not new_match:
                kind = "DELETED"
            elif not new_match:
                return
        elif not new_match:
            return
        self.last_rv = event.rv
        self.send(kind, event.obj)

    def send(self, kind: str, obj: Obj) -> None:
        line = json.dumps({"type": kind, "object": obj}, separators=(",", ":")) + "\n"
        self.queue.put_nowait(line.encode())

    def close(self) -> None:
        self.queue.put_nowait(None)


class Store:
    """Objects, a global resourceVersion, the event history and the open watchers.

    ``retention``: how many events the history keeps; a watch or continue token from a
    resourceVersion older than the oldest kept event gets 410 Expired.
    """

    def __init__(self, *, retention: int = 10_000) -> None:
        self.rv = 0
        self.retention = retention
        self.objects: dict[str, dict[tuple[str, str], Obj]] = {name: {} for name in RESOURCES}
        self.history: deque[Event] = deque()
        #: Events with a resourceVersion at or below this were dropped from the history.
        self.compacted = 0
        self.watchers: set[Watcher] = set()

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    # -- reads ---

    def get(self, resource: Resource, namespace: str, name: str) -> Obj:
        obj = self.objects[resource.name].get((namespace, name))
        if obj is None:
            raise StatusError.not_found(resource, name)
        return obj

    def find(self, resource: Resource, namespace: str, name: str) -> Obj | None:
        return self.objects[resource.name].get((namespace, name))

    def items(
        self,
        resource: Resource,
        namespace: str | None,
        labels: Predicate | None = None,
        fields: Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> list[Obj]:
        out = []
        for (ns, _), obj in sorted(self.objects[resource.name].items()):
            if namespace is not None and ns != namespace:
                continue
            meta = obj["metadata"]
            if labels is not None and not labels(meta.get("labels") or {}):
                continue
            if fields is not None and not fields(obj):
                continue
            out.append(obj)
        return out

    def dependents(self, namespace: str, owner_uid: str) -> list[tuple[Resource, Obj]]:
        found = []
        for resource in RESOURCES.values():
            for obj in self.items(resource, namespace):
                refs = obj["metadata"].get("ownerReferences") or []
                if any(ref.get("uid") == owner_uid for ref in refs):
                    found.append((resource, obj))
        return found

    # -- writes (each emits one event) ---

    def add(self, resource: Resource, obj: Obj) -> Obj:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        if key in self.objects[resource.name]:
            raise StatusError.already_exists(resource, meta["name"])
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now_rfc3339())
        meta["resourceVersion"] = str(self.next_rv())
        obj["kind"], obj["apiVersion"] = resource.kind, resource.api_version
        self.objects[resource.name][key] = obj
        self._emit(Event(self.rv, resource.name, key[0], "ADDED", obj))
        return obj

    def put(self, resource: Resource, obj: Obj) -> Obj:
        """Store a new state of an existing object (MODIFIED)."""
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        old = self.objects[resource.name].get(key)
        if old is None:
            raise StatusError.not_found(resource, meta["name"])
        meta["resourceVersion"] = str(self.next_rv())
        obj["kind"], obj["apiVersion"] = resource.kind, resource.api_version
        self.objects[resource.name][key] = obj
        self._emit(Event(self.rv, resource.name, key[0], "MODIFIED", obj, old))
        return obj

    def update(
        self, resource: Resource, namespace: str, name: str, change: Callable[[Obj], None]
    ) -> Obj:
        """Apply ``change`` to a copy of the object and store it."""
        obj = copy.deepcopy(self.get(resource, namespace, name))
        change(obj)
        return self.put(resource, obj)

    def remove(self, resource: Resource, namespace: str, name: str) -> Obj:
        obj = self.objects[resource.name].pop((namespace, name), None)
        if obj is None:
            raise StatusError.not_found(resource, name)
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.next_rv())
        self._emit(Event(self.rv, resource.name, namespace, "DELETED", obj))
        return obj

    def _emit(self, event: Event) -> None:
        self.history.append(event)
        while len(self.history) > self.retention:
            self.compacted = self.history.popleft().rv
        for watcher in list(self.watchers):
            watcher.offer(event)

    def expire_history(self) -> None:
        """Forget every event so far: any watch resuming from an older version gets 410."""
        self.history.clear()
        self.compacted = self.rv

    # -- watches ---

    def open_watch(
        self,
        resource: Resource,
        namespace: str | None,
        labels: Predicate,
        fields: Callable[[Mapping[str, Any]], bool],
        resource_version: str | None,
    ) -> Watcher:
        """Register a watcher, pre-filled per the resourceVersion rules.

        Unset or ``"0"``: synthetic ADDED for every matching object. A version: the
        kept events after it. Raises StatusError 410 if that version is too old, 504
        (ResourceVersionTooLarge) if it is newer than any this store made (it was
        restarted empty since the client saw it).
        """
        watcher = Watcher(resource, namespace, labels, fields)
        if not resource_version or resource_version == "0":
            for obj in self.items(resource, namespace, labels, fields):
                watcher.send("ADDED", obj)
            watcher.last_rv = self.rv
        else:
            start = parse_rv(resource_version)
            if start < self.compacted:
                raise StatusError.expired(resource_version, self.compacted)
            if start > self.rv:
                raise StatusError.too_large(resource_version, self.rv)
            for event in self.history:
                if event.rv > start:
                    watcher.offer(event)
            watcher.last_rv = max(start, watcher.last_rv)
        self.watchers.add(watcher)
        return watcher

    def close_watch(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def drop_watches(self) -> int:
        """End every open watch stream now (a dropped connection). Returns how many."""
        watchers = list(self.watchers)
        for watcher in watchers:
            watcher.close()
        self.watchers.clear()
        return len(watchers)


def parse_rv(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise StatusError.bad_request(f"invalid resource version: {text!r}") from None
    if value < 0:
        raise StatusError.bad_request(f"invalid resource version: {text!r}")
    return value


def iter_owner_uids(obj: Mapping[str, Any]) -> Iterable[str]:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        uid = ref.get("uid")
        if isinstance(uid, str):
            yield uid
