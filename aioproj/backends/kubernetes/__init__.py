"""The Kubernetes backend: each run is a ``batch/v1`` Job made from the user's template.

It takes MLflow's backend_config (``kube-job-template-path``, ``repository-uri``,
``kube-context``) and fills the template as MLflow does (Job name, the first container's
name, image, command and env ``MLFLOW_RUN_ID``/``MLFLOW_TRACKING_URI``/
``MLFLOW_EXPERIMENT_ID``, with ``KUBE_MLFLOW_TRACKING_URI`` replacing the URI), and goes
further:

* code without a rebuild: unless ``build_image=True``, the project is shipped as a
  deterministic tarball in a ConfigMap owned by the Job, unpacked by the container's
  command into /mlflow/projects/code, so the base image of ``docker_env`` runs it and no
  docker daemon is needed. ``build_image=True`` is MLflow's mode: build with the docker
  CLI, push to ``repository-uri``, run by digest;
* ``docker_env`` ``environment`` (copied host variables go in a Secret owned by the Job,
  never in the Job itself) and ``volumes`` (hostPath) are carried over;
* one list+watch of Jobs and one of Pods per namespace for all runs (no per-run polls);
  pod problems (ImagePullBackOff, CrashLoopBackOff, OOMKilled, Unschedulable) are written
  to the run's output and :attr:`KubernetesExecution.detail`; pods' logs stream into
  ``run.logs()``;
* cancel deletes the Job with background propagation, so its pods, ConfigMap and Secret
  go too.

kubernetes-asyncio is imported only when a run is prepared.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from aioproj._status import RunStatus
from aioproj.errors import BackendError

from ._spec import (
    MANAGED_SELECTOR,
    JobPlan,
    KubeBackendConfig,
    bundle_project,
    job_name,
    parse_backend_config,
    plan_env,
    template_namespace,
)

if TYPE_CHECKING:
    import asyncio

    from aioproj.backends.base import Execution, LaunchRequest, StartRequest

    from ._client import KubeClient
    from ._watch import NamespaceWatch

__all__ = ["KubernetesBackend", "KubernetesLaunch"]

logger = logging.getLogger("aioproj.kubernetes")

_DATABRICKS_NAMES = (
    "DATABRICKS_HOST",
    "DATABRICKS_TOKEN",
    "DATABRICKS_USERNAME",
    "DATABRICKS_PASSWORD",
    "DATABRICKS_INSECURE",
    "DATABRICKS_CLIENT_ID",
    "DATABRICKS_CLIENT_SECRET",
)
_HTTP_NAMES = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_INSECURE_TLS",
)


class KubernetesBackend:
    """Runs projects as Kubernetes Jobs. Construct with no arguments.

    ``watch_timeout``: seconds each watch request lasts before it is renewed.
    ``log_grace``: seconds to let log streams drain once a Job has ended.
    """

    name = "kubernetes"

    def __init__(self, *, watch_timeout: int = 240, log_grace: float = 10.0) -> None:
        self._watch_timeout = watch_timeout
        self._log_grace = log_grace
        self._clients: dict[tuple[str | None, str | None], KubeClient] = {}
        self._client_lock: anyio.Lock | None = None
        self._watches: dict[tuple[int, str], NamespaceWatch] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def prepare(self, request: LaunchRequest) -> KubernetesLaunch:
        """Check the backend_config and template, connect, and ship or build the code.

        Raises :class:`BackendError` (MLflow's messages for backend_config, a clear one
        for a project without ``docker_env``, the cluster configuration, a project too
        large for a ConfigMap, a Job the API server's dry run refuses) or
        :class:`EnvironmentBuildError` (docker build/push). Cancellation kills a docker
        build or push in progress; nothing is created in the cluster before ``start``.
        """
        config = await anyio.to_thread.run_sync(parse_backend_config, request.backend_config)
        project = request.project
        docker_env = project.docker_env
        if docker_env is None:
            raise BackendError(
                "The kubernetes backend runs projects that have a docker_env section: its "
                "image is the image of the Job's container. Add `docker_env: {image: ...}` "
                "to the MLproject file."
            )
        if request.env_manager not in (None, "docker"):
            logger.warning(
                "env_manager=%r is ignored on the kubernetes backend: the run uses the "
                "docker_env image.",
                request.env_manager,
            )
        missing = [i for i in docker_env.environment if isinstance(i, str) and i not in os.environ]
        if missing:
            raise BackendError(
                f"This project expects the {', '.join(str(m) for m in missing)} environment "
                f"variables to be set on the machine running the project, but {missing[0]} "
                "was not set. Please ensure all expected environment variables are set."
            )
        client = await self._client(config)
        namespace = (
            template_namespace(config.template) or config.namespace or client.default_namespace
        )
        tags = {"mlflow.project.env": "docker"}
        bundle: bytes | None = None
        if request.build_image:
            from ._image import build_and_push

            tag, digest = await build_and_push(
                base_image=docker_env.image,
                repository_uri=config.repository_uri,
                project_dir=request.source.directory,
                git_commit=request.source.git_commit,
                docker_auth=request.docker_auth,
            )
            image = f"{tag}@{digest}"
            tags.update({"mlflow.docker.image.uri": tag, "mlflow.docker.image.id": digest})
        else:
            bundle = await anyio.to_thread.run_sync(bundle_project, request.source.directory)
            image = docker_env.image
            tags["mlflow.docker.image.uri"] = image
        name = job_name(project.name, uuid.uuid4().hex[:10])
        tags.update({"aioproj.kubernetes.job": name, "aioproj.kubernetes.namespace": namespace})
        launch = KubernetesLaunch(
            backend=self,
            config=config,
            client=client,
            namespace=namespace,
            job_name=name,
            project_name=project.name,
            image=image,
            command=request.parameters.command,
            docker_environment=tuple(docker_env.environment),
            docker_volumes=tuple(docker_env.volumes),
            bundle=bundle,
            tracking_uri=request.tracking_uri,
            launch_tags=tags,
        )
        await launch.validate()
        return launch

    async def _client(self, config: KubeBackendConfig) -> KubeClient:
        from ._client import connect

        key = (config.kube_config_path, config.kube_context)
        if self._client_lock is None:
            self._client_lock = anyio.Lock()
        async with self._client_lock:
            if key not in self._clients:
                self._clients[key] = await connect(config.kube_context, config.kube_config_path)
            return self._clients[key]

    def watch_for(self, client: KubeClient, namespace: str) -> NamespaceWatch:
        """The shared watch of ``namespace`` on ``client``'s cluster, started on first use."""
        import asyncio

        from ._watch import NamespaceWatch

        key = (id(client), namespace)
        watch = self._watches.get(key)
        if watch is None:
            watch = NamespaceWatch(
                client, namespace, MANAGED_SELECTOR, timeout_seconds=self._watch_timeout
            )
            self._watches[key] = watch
            task = asyncio.get_running_loop().create_task(
                watch.run(), name=f"aioproj kubernetes watch {namespace}"
            )
            self._tasks.append(task)
        return watch

    @property
    def watches(self) -> list[NamespaceWatch]:
        """The namespace watches started so far (for monitoring and benchmarks)."""
        return list(self._watches.values())

    async def recover(self, state: Mapping[str, object]) -> tuple[RunStatus, int | None] | None:
        """The real end of a run whose driver died (see :func:`aioproj.recover`).

        ``state`` is the run's journal entry (context, kubeconfig, namespace, Job), written
        before the Job was created. Returns FINISHED or FAILED from the Job's conditions,
        with the time of the condition (the run's end) in ms; FAILED if the Job is gone
        (never created, or deleted or expired by its TTL, so its outcome cannot be read);
        None while it runs. Raises BackendError if the cluster cannot be reached.
        """
        from ._client import KubeApiError, connect
        from ._execution import _jobs_path
        from ._state import job_end_ms, job_outcome

        context = state.get("kube_context")
        config_path = state.get("kube_config_path")
        client = await connect(
            context if isinstance(context, str) else None,
            config_path if isinstance(config_path, str) else None,
        )
        try:
            job = await client.request(
                "GET", _jobs_path(str(state["namespace"]), str(state["job"]))
            )
        except KubeApiError as exc:
            if exc.code == 404:
                return RunStatus.FAILED, None
            raise
        finally:
            await client.aclose()
        outcome = job_outcome(job)
        return None if outcome is None else (outcome[0], job_end_ms(job))

    async def aclose(self) -> None:
        """Stop the watches and close the API clients. Jobs keep running."""
        import asyncio

        with anyio.CancelScope(shield=True):
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks)
            self._tasks.clear()
            self._watches.clear()
            for client in self._clients.values():
                await client.aclose()
            self._clients.clear()


@dataclass(frozen=True)
class KubernetesLaunch:
    """A run ready to become a Job."""

    backend: KubernetesBackend = field(repr=False)
    config: KubeBackendConfig = field(repr=False)
    client: KubeClient = field(repr=False)
    namespace: str
    job_name: str
    project_name: str | None
    image: str
    command: str
    docker_environment: tuple[str | tuple[str, str], ...] = field(repr=False)
    docker_volumes: tuple[str, ...]
    bundle: bytes | None = field(repr=False)
    tracking_uri: str = field(repr=False)
    launch_tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def tags(self) -> Mapping[str, str]:
        return self.launch_tags

    @property
    def journal_state(self) -> dict[str, object]:
        """What ``aioproj recover`` needs to find the Job: known before it is created."""
        return {
            "kube_context": self.config.kube_context,
            "kube_config_path": self.config.kube_config_path,
            "namespace": self.namespace,
            "job": self.job_name,
        }

    def plan(self, run_id: str, tracking_env: Mapping[str, str]) -> JobPlan:
        """The Job of this launch for run ``run_id``. Raises :class:`BackendError` if a
        copied docker_env variable is not set."""
        uri = tracking_env.get("MLFLOW_TRACKING_URI", self.tracking_uri)
        credentials: tuple[str, ...] = ()
        if uri.startswith("databricks"):
            credentials = _DATABRICKS_NAMES
        elif uri.startswith(("http://", "https://")):
            credentials = _HTTP_NAMES
        env = plan_env(
            tracking_env, self.docker_environment, os.environ, credential_names=credentials
        )
        return JobPlan(
            name=self.job_name,
            namespace=self.namespace,
            project_name=self.project_name,
            image=self.image,
            command=self.command,
            env=env,
            run_id=run_id,
            docker_volumes=self.docker_volumes,
            bundle_configmap=f"{self.job_name}-code" if self.bundle is not None else None,
            env_secret=f"{self.job_name}-env" if env.secret else None,
        )

    async def validate(self) -> None:
        """Let the API server check the Job (a dry run) before anything is tracked.
        Raises :class:`BackendError` with the server's reason."""
        from ._client import KubeApiError
        from ._execution import validate_job

        placeholder = {
            "MLFLOW_RUN_ID": "0" * 32,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_EXPERIMENT_ID": "0",
        }
        try:
            await validate_job(self.client, self.config.template, self.plan("0" * 32, placeholder))
        except KubeApiError as exc:
            raise BackendError(
                f"The Job made from {self.config.template_path} was refused by the Kubernetes "
                f"API ({self.namespace}): {exc}"
            ) from exc

    async def start(self, request: StartRequest) -> Execution:
        """Create the Job (and its ConfigMap and Secret) and follow it through the
        namespace's shared watch. Raises :class:`BackendError` if the API refuses it;
        then nothing is left in the cluster."""
        from ._execution import KubernetesExecution, create_run_objects

        plan = self.plan(request.run_id, request.tracking_env)
        watch = self.backend.watch_for(self.client, self.namespace)
        execution = KubernetesExecution(
            client=self.client,
            watch=watch,
            namespace=self.namespace,
            job_name=self.job_name,
            output=request.output,
            pending_timeout=self.config.pending_timeout,
            log_grace=self.backend._log_grace,
        )
        # What `aioproj recover` needs to find the Job if this process dies.
        execution.journal_state = self.journal_state
        logger.info("=== Creating Job %s in namespace %s ===", self.job_name, self.namespace)
        try:
            await create_run_objects(self.client, self.config.template, plan, self.bundle)
        except BackendError as exc:
            execution._unsubscribe()
            raise BackendError(
                f"Kubernetes refused the Job of run {request.run_id} "
                f"({self.namespace}/{self.job_name}): {exc}"
            ) from exc
        except BaseException:
            execution._unsubscribe()
            raise
        return execution
