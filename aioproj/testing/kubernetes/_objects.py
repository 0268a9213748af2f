"""FakeKubernetes' API semantics: validation and defaults of Jobs, Pods, ConfigMaps and
Secrets, replace and patch, delete with propagation and garbage collection."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import functools
import re
import uuid
from typing import Any

from ._base import (
    CONFIGMAPS,
    JOBS,
    PODS,
    SECRETS,
    ClusterBase,
    meta_of,
    name_suffix,
)
from ._store import Obj, Resource, StatusError, now_rfc3339

__all__ = [
    "CONFIGMAP_MAX_BYTES",
    "ApiObjects",
]

#: The apiserver's limit on the data of one ConfigMap or Secret.
CONFIGMAP_MAX_BYTES = 1024 * 1024

_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


_DATA_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_NOT_DNS = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)


def _strip_owner(obj: Obj, uid: str) -> None:
    refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
    if refs:
        obj["metadata"]["ownerReferences"] = refs
    else:
        obj["metadata"].pop("ownerReferences", None)


class ApiObjects(ClusterBase):
    """API semantics: validation, defaults, replace and patch, delete with propagation
    and garbage collection."""

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
                meta["name"] = meta["generateName"] + name_suffix()
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
        uid = meta_of(obj)["uid"]
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
                    meta_of(dep)["name"],
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
            meta_of(o)["deletionTimestamp"] = now_rfc3339()
            meta_of(o)["deletionGracePeriodSeconds"] = 0
            meta_of(o)["finalizers"] = finalizers

        return self.store.update(resource, meta_of(obj)["namespace"], meta_of(obj)["name"], mark)

    async def _collect(self, namespace: str, owner_uid: str) -> None:
        """Garbage collection: delete (Background) whatever ``owner_uid`` owned."""
        for resource, dep in self.store.dependents(namespace, owner_uid):
            with contextlib.suppress(StatusError):
                await self.delete(
                    resource, namespace, meta_of(dep)["name"], propagation="Background", grace=None
                )

    async def _foreground(self, resource: Resource, namespace: str, name: str, uid: str) -> None:
        await self._collect(namespace, uid)
        while self.store.dependents(namespace, uid):  # noqa: ASYNC110 (no event for "gone")
            await asyncio.sleep(0.02)
        with contextlib.suppress(StatusError):
            self.store.remove(resource, namespace, name)
