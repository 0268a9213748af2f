"""FakeKubernetes' Tables (``Accept: application/json;as=Table``): the columns and cells
kubectl prints for ``kubectl get`` of Jobs, Pods and other objects."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from ._store import (
    Obj,
    Resource,
)

__all__ = ["table_of", "wants_table"]


def _age(stamp: str | None, end: str | None = None) -> str:
    if not stamp:
        return "<unknown>"
    start = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    finish = (
        datetime.strptime(end, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        if end
        else datetime.now(timezone.utc)
    )
    seconds = max(0, int((finish - start).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60}s" if seconds < 600 else f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60}m"


def _job_state(job: Obj) -> str:
    if job["metadata"].get("deletionTimestamp"):
        return "Terminating"
    conditions = {
        c["type"]
        for c in job.get("status", {}).get("conditions") or []
        if c.get("status") == "True"
    }
    for kind in ("Failed", "Complete", "FailureTarget", "SuccessCriteriaMet", "Suspended"):
        if kind in conditions:
            return kind
    return "Running"


def _pod_state(pod: Obj) -> str:
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    status = pod.get("status", {})
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state", {})
        if "waiting" in state and state["waiting"].get("reason"):
            return str(state["waiting"]["reason"])
        if "terminated" in state and state["terminated"].get("reason"):
            return str(state["terminated"]["reason"])
    return str(status.get("phase", "Pending"))


def _columns(resource: Resource) -> list[tuple[str, str]]:
    if resource.name == "jobs":
        return [
            ("Name", "string"),
            ("Status", "string"),
            ("Completions", "string"),
            ("Duration", "string"),
            ("Age", "string"),
        ]
    if resource.name == "pods":
        return [
            ("Name", "string"),
            ("Ready", "string"),
            ("Status", "string"),
            ("Restarts", "string"),
            ("Age", "string"),
        ]
    if resource.name == "events":
        return [
            ("Last Seen", "string"),
            ("Type", "string"),
            ("Reason", "string"),
            ("Object", "string"),
            ("Message", "string"),
        ]
    if resource.name == "secrets":
        return [("Name", "string"), ("Type", "string"), ("Data", "string"), ("Age", "string")]
    return [("Name", "string"), ("Data", "string"), ("Age", "string")]


def _cells(resource: Resource, obj: Obj) -> list[Any]:
    meta = obj["metadata"]
    age = _age(meta.get("creationTimestamp"))
    if resource.name == "jobs":
        status = obj.get("status", {})
        start = status.get("startTime")
        duration = _age(start, status.get("completionTime")) if start else ""
        completions = f"{status.get('succeeded', 0)}/{obj['spec'].get('completions', 1)}"
        return [meta["name"], _job_state(obj), completions, duration, age]
    if resource.name == "pods":
        statuses = obj.get("status", {}).get("containerStatuses") or []
        ready = sum(1 for s in statuses if s.get("ready"))
        restarts = sum(int(s.get("restartCount", 0)) for s in statuses)
        total = len(obj.get("spec", {}).get("containers") or [])
        return [meta["name"], f"{ready}/{total}", _pod_state(obj), str(restarts), age]
    if resource.name == "events":
        involved = obj.get("involvedObject", {})
        return [
            _age(obj.get("lastTimestamp")),
            obj.get("type", ""),
            obj.get("reason", ""),
            f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}",
            obj.get("message", ""),
        ]
    data = len(obj.get("data") or {}) + len(obj.get("binaryData") or {})
    if resource.name == "secrets":
        return [meta["name"], obj.get("type", "Opaque"), str(data), age]
    return [meta["name"], str(data), age]


def table_of(resource: Resource, items: list[Obj], rv: str) -> Obj:
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": [
            {
                "name": n,
                "type": t,
                "format": "name" if n == "Name" else "",
                "description": "",
                "priority": 0,
            }
            for n, t in _columns(resource)
        ],
        "rows": [
            {
                "cells": _cells(resource, obj),
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                },
            }
            for obj in items
        ],
    }


def wants_table(request: web.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")
