"""Pure logic of the Kubernetes backend: backend_config checks (MLflow's keys and
messages), the Job built from the user's template, DNS-1123 names, the project bundle.

Nothing here does network I/O; the file reads (template, project tree) are plain blocking
functions that callers run in a worker thread.
"""

from __future__ import annotations

import copy
import gzip
import io
import os
import re
import shlex
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aioproj._http import split_uri_credentials
from aioproj._redact import warn
from aioproj.errors import BackendError

__all__ = [
    "BUNDLE_DIR",
    "BUNDLE_KEY",
    "BUNDLE_MAX_BYTES",
    "CODE_DIR",
    "CONFIGMAP_MAX_BYTES",
    "LABEL_MANAGED",
    "LABEL_PROJECT",
    "LABEL_RUN_ID",
    "MANAGED_SELECTOR",
    "KubeBackendConfig",
    "build_job",
    "bundle_project",
    "dns_label",
    "load_template",
    "parse_backend_config",
]

#: Where the project's code is inside the container (MLflow's path).
CODE_DIR = "/mlflow/projects/code"
#: Where the ConfigMap holding the project tarball is mounted.
BUNDLE_DIR = "/mlflow/projects/bundle"
BUNDLE_KEY = "project.tar.gz"
#: The apiserver's limit on the data of one ConfigMap.
CONFIGMAP_MAX_BYTES = 1024 * 1024
#: The largest bundle aioproj ships: base64 on the wire makes it 4/3 larger, and request
#: bodies stay under 1 MiB (aiohttp would write a larger one in a blocking call).
BUNDLE_MAX_BYTES = 768 * 1024

LABEL_MANAGED = "app.kubernetes.io/managed-by"
LABEL_RUN_ID = "aioproj.dev/run-id"
LABEL_PROJECT = "aioproj.dev/project"
#: The label selector of the shared watches: every object aioproj creates carries it.
MANAGED_SELECTOR = f"{LABEL_MANAGED}=aioproj"

_EXCLUDED = frozenset({"mlruns", ".git"})


@dataclass(frozen=True)
class KubeBackendConfig:
    """The checked backend_config of one run.

    MLflow's keys: ``kube-context``, ``repository-uri``, ``kube-job-template-path`` (the
    template is loaded into ``template``). aioproj's: ``kube-config-path`` (a kubeconfig
    file instead of ``$KUBECONFIG``/``~/.kube/config``), ``namespace`` (when the template
    has none), ``pending-timeout`` (seconds a run may wait for its pod to start before it
    is failed; ``None`` waits forever).
    """

    kube_context: str | None
    repository_uri: str
    template_path: str
    template: Mapping[str, Any]
    kube_config_path: str | None = None
    namespace: str | None = None
    pending_timeout: float | None = 600.0


#: The backend_config keys the Kubernetes backend reads (MLflow's three, then aioproj's).
_CONFIG_KEYS = frozenset(
    {
        "kube-context",
        "kube-job-template-path",
        "repository-uri",
        "kube-config-path",
        "namespace",
        "pending-timeout",
    }
)


def parse_backend_config(config: Mapping[str, Any] | None) -> KubeBackendConfig:
    """Check ``config`` as MLflow's ``_parse_kubernetes_config`` does, with its messages,
    and load the template (blocking: run it in a thread).

    Warns (UserWarning) about keys it does not read. Raises :class:`BackendError`: no
    config, no template path, a missing or unreadable
    template, a template that is not a Job with a container, no ``repository-uri``, a
    bad ``pending-timeout``.
    """
    if not config:
        raise BackendError("Backend_config file not found.")
    unknown = sorted(map(str, set(config) - _CONFIG_KEYS))
    if unknown:  # MLflow drops them without a word, which hides typos
        warn(
            f"Unknown key(s) {unknown} in the Kubernetes backend config are ignored; the"
            f" keys it reads are {sorted(_CONFIG_KEYS)}.",
            UserWarning,
            stacklevel=2,
        )
    if "kube-job-template-path" not in config:
        raise BackendError(
            "'kube-job-template-path' attribute must be specified in backend_config."
        )
    path = config["kube-job-template-path"]
    if not isinstance(path, str) or not os.path.exists(path):
        raise BackendError(f"Could not find 'kube-job-template-path': {path}")
    template = load_template(path)
    if "repository-uri" not in config:
        raise BackendError("Could not find 'repository-uri' in backend_config.")
    context = config.get("kube-context")
    if context is not None and not isinstance(context, str):
        raise BackendError(f"'kube-context' must be a string, got {context!r}.")
    namespace = config.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or not _is_dns_label(namespace)):
        raise BackendError(
            f"'namespace' in backend_config must be a DNS-1123 label, got {namespace!r}."
        )
    timeout = config.get("pending-timeout", 600.0)
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        raise BackendError(
            f"'pending-timeout' in backend_config must be a positive number of seconds or "
            f"null, got {timeout!r}."
        )
    kube_config_path = config.get("kube-config-path")
    if kube_config_path is not None and not isinstance(kube_config_path, str):
        raise BackendError(f"'kube-config-path' must be a path, got {kube_config_path!r}.")
    return KubeBackendConfig(
        kube_context=context,
        repository_uri=str(config["repository-uri"]),
        template_path=path,
        template=template,
        kube_config_path=kube_config_path,
        namespace=namespace,
        pending_timeout=None if timeout is None else float(timeout),
    )


def load_template(path: str) -> dict[str, Any]:
    """Read and check a Job template (blocking). Raises :class:`BackendError` naming the
    file and what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            template = yaml.safe_load(f)
    except OSError as exc:
        raise BackendError(f"Could not read 'kube-job-template-path' {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise BackendError(f"The Kubernetes Job template {path} is not valid YAML: {exc}") from exc
    if not isinstance(template, dict):
        raise BackendError(f"The Kubernetes Job template {path} must be a YAML mapping (a Job).")
    kind = template.get("kind", "Job")
    if kind != "Job":
        raise BackendError(f"The Kubernetes Job template {path} has kind {kind!r}; expected 'Job'.")
    containers = (((template.get("spec") or {}).get("template") or {}).get("spec") or {}).get(
        "containers"
    )
    if not isinstance(containers, list) or not containers or not isinstance(containers[0], dict):
        raise BackendError(
            f"The Kubernetes Job template {path} needs spec.template.spec.containers with at "
            "least one container (the first one runs the project)."
        )
    if not isinstance(template.get("metadata") or {}, dict):
        raise BackendError(f"The Kubernetes Job template {path}: metadata must be a mapping.")
    return template


def template_namespace(template: Mapping[str, Any]) -> str | None:
    namespace = (template.get("metadata") or {}).get("namespace")
    return str(namespace) if namespace else None


# -- names ------------------------------------------------------------------------------

_NOT_DNS = re.compile(r"[^a-z0-9-]+")


def dns_label(text: str, *, max_length: int = 63, fallback: str = "mlflow-project") -> str:
    """``text`` as a DNS-1123 label: lower case, ``[a-z0-9-]``, alphanumeric at both ends,
    at most ``max_length`` characters. Raises nothing."""
    label = _NOT_DNS.sub("-", text.lower()).strip("-")[:max_length].strip("-")
    return label or fallback


def _is_dns_label(text: str) -> bool:
    return len(text) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", text) is not None


def job_name(project_name: str | None, unique: str) -> str:
    """``<project>-<unique>``: a valid Job name (≤ 63 characters: it becomes a label)."""
    base = dns_label(project_name or "mlflow-project", max_length=62 - len(unique))
    return f"{base}-{unique}"


# -- the bundle -------------------------------------------------------------------------


def bundle_project(directory: Path) -> bytes:
    """The project as a deterministic ``tar.gz`` (sorted, mtime 0, owner 0, no ``mlruns``
    or ``.git``), blocking. Raises :class:`BackendError` if it is larger than a ConfigMap
    holds or cannot be read."""
    buffer = io.BytesIO()
    try:
        with (
            gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for path in _walk(directory):
                rel = path.relative_to(directory).as_posix()
                info = tar.gettarinfo(str(path), arcname=rel)
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if info.isfile():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                elif info.isdir() or info.issym():
                    tar.addfile(info)
                if buffer.tell() > 8 * CONFIGMAP_MAX_BYTES:
                    break  # far too large already: stop reading
    except OSError as exc:
        raise BackendError(f"Could not pack the project {directory} for Kubernetes: {exc}") from exc
    data = buffer.getvalue()
    if len(data) > BUNDLE_MAX_BYTES:
        raise BackendError(
            f"The project {directory} packs to {len(data):,} bytes (gzipped, without mlruns "
            f"and .git), more than the {BUNDLE_MAX_BYTES:,} bytes aioproj ships in a Kubernetes "
            "ConfigMap (ConfigMaps hold at most 1 MiB, base64-encoded on the wire). Move data "
            "files out of the project (download them in the entry point), or pass "
            "build_image=True to build an image with the code and push it to 'repository-uri'."
        )
    return data


def _walk(directory: Path) -> list[Path]:
    out: list[Path] = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in _EXCLUDED)
        base = Path(root)
        out.extend(base / name for name in dirs)
        out.extend(base / name for name in sorted(files) if name not in _EXCLUDED)
    return sorted(out, key=lambda p: p.relative_to(directory).as_posix())


# -- the Job ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvPlan:
    """The container's variables: plain values, and names whose values go in a Secret."""

    values: Sequence[tuple[str, str]]
    #: Values copied from the host (credentials among them): never in a repr.
    secret: Mapping[str, str] = field(repr=False)


def plan_env(
    tracking_env: Mapping[str, str],
    docker_environment: Sequence[str | tuple[str, str]],
    host_env: Mapping[str, str],
    *,
    credential_names: Sequence[str],
) -> EnvPlan:
    """MLflow's three variables first (``KUBE_MLFLOW_TRACKING_URI`` replacing the tracking
    URI), the rest of the tracking variables, then ``docker_env.environment``: defined
    values as given; copied host variables, and tracking credentials found in
    ``host_env``, by reference to a Secret (their values never sit in the Job). A user
    and password in an http(s) tracking URI move to the Secret as
    MLFLOW_TRACKING_USERNAME/PASSWORD (unless the host sets both, which MLflow would use
    instead), so that neither the Job nor MLflow's "View run at" lines show them.
    Raises :class:`BackendError` if a copied variable is not set on the host."""
    values: dict[str, str] = {}
    uri = host_env.get("KUBE_MLFLOW_TRACKING_URI") or tracking_env.get("MLFLOW_TRACKING_URI", "")
    uri, uri_credentials = split_uri_credentials(uri)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        values[name] = uri if name == "MLFLOW_TRACKING_URI" else tracking_env.get(name, "")
    secret: dict[str, str] = {}
    for name, value in tracking_env.items():
        if name in credential_names:  # e.g. a URI's password, split off by the store
            secret[name] = value
        else:
            values.setdefault(name, value)
    for name in credential_names:
        if name in host_env and name not in values:
            secret[name] = host_env[name]
    if uri_credentials and not all(name in host_env for name in uri_credentials):
        for name in uri_credentials:
            values.pop(name, None)
        secret.update(uri_credentials)
    missing = [
        item for item in docker_environment if isinstance(item, str) and item not in host_env
    ]
    if missing:
        raise BackendError(
            f"This project expects the {', '.join(str(m) for m in missing)} environment "
            f"variables to be set on the machine running the project, but {missing[0]} was "
            "not set. Please ensure all expected environment variables are set."
        )
    for item in docker_environment:
        if isinstance(item, str):
            secret[item] = host_env[item]
            values.pop(item, None)
        else:
            values[item[0]] = item[1]
            secret.pop(item[0], None)
    return EnvPlan(values=list(values.items()), secret=secret)


def _volume_mount(volume: str, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A docker ``host:container[:ro]`` volume as a hostPath volume and its mount."""
    parts = volume.split(":")
    if len(parts) < 2:
        raise BackendError(
            f"The docker_env volume {volume!r} is not 'host_path:container_path[:ro]'; "
            "the Kubernetes backend mounts it as a hostPath volume."
        )
    host, target = os.path.expanduser(os.path.expandvars(parts[0])), parts[1]
    mount: dict[str, Any] = {"name": f"docker-volume-{index}", "mountPath": target}
    if len(parts) > 2 and "ro" in parts[2].split(","):
        mount["readOnly"] = True
    return {"name": f"docker-volume-{index}", "hostPath": {"path": host}}, mount


@dataclass(frozen=True)
class JobPlan:
    """Everything that makes one run's Job."""

    name: str
    namespace: str
    project_name: str | None
    image: str
    command: str  # the entry point's shell command
    env: EnvPlan
    run_id: str
    docker_volumes: Sequence[str] = ()
    #: The ConfigMap holding the project tarball (None: the code is in the image).
    bundle_configmap: str | None = None
    #: The Secret holding copied variables (None: there are none).
    env_secret: str | None = None


def labels_for(plan: JobPlan) -> dict[str, str]:
    return {
        LABEL_MANAGED: "aioproj",
        LABEL_RUN_ID: dns_label(plan.run_id, fallback="run"),
        LABEL_PROJECT: dns_label(plan.project_name or "mlflow-project"),
    }


def container_command(plan: JobPlan) -> list[str]:
    """``sh -c`` with the entry-point command, after unpacking the bundle when there is
    one (the command runs in :data:`CODE_DIR` either way)."""
    if plan.bundle_configmap is None:
        return ["sh", "-c", plan.command]
    setup = (
        f"mkdir -p {CODE_DIR} && tar -xzf {BUNDLE_DIR}/{BUNDLE_KEY} -C {CODE_DIR} "
        f"&& cd {CODE_DIR} || exit 1"
    )
    return ["sh", "-c", f"{setup}\n{plan.command}"]


def build_job(template: Mapping[str, Any], plan: JobPlan) -> dict[str, Any]:
    """The Job of one run: the user's template filled as MLflow fills it (name, first
    container's name, image, command, appended env), plus aioproj's labels, the code
    volumes, docker_env volumes and the Secret references. Raises :class:`BackendError`
    for a malformed docker_env volume."""
    job: dict[str, Any] = copy.deepcopy(dict(template))
    job.setdefault("apiVersion", "batch/v1")
    job.setdefault("kind", "Job")
    meta = job.setdefault("metadata", {})
    meta["name"] = plan.name
    meta["namespace"] = plan.namespace
    meta.pop("generateName", None)
    labels = labels_for(plan)
    meta["labels"] = {**(meta.get("labels") or {}), **labels}
    pod_template = job["spec"]["template"]
    pod_meta = pod_template.setdefault("metadata", {}) or {}
    pod_template["metadata"] = pod_meta
    pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **labels}
    pod_spec = pod_template["spec"]
    pod_spec.setdefault("restartPolicy", "Never")
    container = pod_spec["containers"][0]
    container["name"] = dns_label(plan.project_name or "mlflow-project")
    container["image"] = plan.image
    container["command"] = container_command(plan)
    container.pop("args", None)
    env = list(container.get("env") or [])
    env += [{"name": name, "value": value} for name, value in plan.env.values]
    if plan.env_secret is not None:
        env += [
            {"name": name, "valueFrom": {"secretKeyRef": {"name": plan.env_secret, "key": name}}}
            for name in plan.env.secret
        ]
    container["env"] = env
    volumes = list(pod_spec.get("volumes") or [])
    mounts = list(container.get("volumeMounts") or [])
    if plan.bundle_configmap is not None:
        volumes += [
            {"name": "aioproj-bundle", "configMap": {"name": plan.bundle_configmap}},
            {"name": "aioproj-code", "emptyDir": {}},
        ]
        mounts += [
            {"name": "aioproj-bundle", "mountPath": BUNDLE_DIR, "readOnly": True},
            {"name": "aioproj-code", "mountPath": CODE_DIR},
        ]
        container["workingDir"] = CODE_DIR
    for index, volume in enumerate(plan.docker_volumes):
        vol, mount = _volume_mount(volume, index)
        volumes.append(vol)
        mounts.append(mount)
    if volumes:
        pod_spec["volumes"] = volumes
    if mounts:
        container["volumeMounts"] = mounts
    return job


def owner_reference(job: Mapping[str, Any]) -> dict[str, Any]:
    """An ownerReference to ``job`` (as the API returned it, with its uid)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
        "blockOwnerDeletion": True,
        "controller": False,
    }


def describe_command(argv: Sequence[str]) -> str:
    return shlex.join(argv)
