"""FakeKubernetes' discovery: the version, the API groups and resources, and the OpenAPI
stubs kubectl and kubernetes-asyncio read before they call the API."""

from __future__ import annotations

from ._store import (
    RESOURCES,
    Obj,
    Resource,
)

__all__ = [
    "VERSION",
    "core_resources",
    "openapi_group",
    "resource_entry",
]

VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-fake",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.23.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def core_resources() -> list[Obj]:
    out = []
    for resource in RESOURCES.values():
        if resource.group:
            continue
        out.append(resource_entry(resource))
        if resource.name == "pods":
            out.append(
                {
                    "name": "pods/log",
                    "singularName": "",
                    "namespaced": True,
                    "kind": "Pod",
                    "verbs": ["get"],
                }
            )
            out.append(
                {
                    "name": "pods/status",
                    "singularName": "",
                    "namespaced": True,
                    "kind": "Pod",
                    "verbs": ["get", "patch", "update"],
                }
            )
    out.append(
        {
            "name": "namespaces",
            "singularName": "namespace",
            "namespaced": False,
            "kind": "Namespace",
            "verbs": ["get", "list"],
            "shortNames": ["ns"],
        }
    )
    return out


def resource_entry(resource: Resource) -> Obj:
    entry: Obj = {
        "name": resource.name,
        "singularName": resource.kind.lower(),
        "namespaced": True,
        "kind": resource.kind,
        "verbs": list(resource.verbs),
    }
    if resource.short_names:
        entry["shortNames"] = list(resource.short_names)
    if resource.categories:
        entry["categories"] = list(resource.categories)
    return entry


def openapi_group(prefix: str, resources: list[Resource]) -> Obj:
    paths: Obj = {}
    for resource in resources:
        paths[f"{prefix}/namespaces/{{namespace}}/{resource.name}/{{name}}"] = {
            "patch": {
                "x-kubernetes-group-version-kind": {
                    "group": resource.group,
                    "version": resource.version,
                    "kind": resource.kind,
                },
                "parameters": [
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
                ],
            }
        }
    return {
        "openapi": "3.0.0",
        "info": {"title": "FakeKubernetes", "version": "v1.32.0"},
        "paths": paths,
    }
