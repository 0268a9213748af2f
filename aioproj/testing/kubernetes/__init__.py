"""FakeKubernetes: a small Kubernetes API server on 127.0.0.1 for tests.

It speaks enough of the real wire format that ``kubectl`` and kubernetes-asyncio work
against it unchanged: discovery, ``batch/v1`` Jobs and core ``v1`` Pods, ConfigMaps,
Secrets and Events (create, get, list, watch, patch, replace, delete), Status error
bodies, list+watch with resourceVersion semantics, bookmarks and a retention window that
answers 410 Expired, label and field selectors, delete propagation (Background,
Foreground, Orphan) with ownerReference garbage collection. A job controller creates a
pod per Job and keeps the Job's status and conditions as Kubernetes ≥ 1.31 does; a
"kubelet" runs each pod's first container command as a local process group (images are
not pulled: the command runs on the host, ConfigMap/Secret volumes are written under a
per-pod directory and mount paths in the command, working directory and environment are
rewritten to point there), with pod phases, container states and logs.

Use it as an async context manager::

    async with FakeKubernetes() as kube:
        ...  # kube.kubeconfig is a kubeconfig file for it; kube.context its context

or from a shell: ``python -m aioproj.testing.kubernetes --port 8001 --kubeconfig kc.yaml``.
Faults are switched on :attr:`FakeKubernetes.faults` (see :class:`Faults`), plus
:meth:`FakeKubernetes.drop_watches` and :meth:`FakeKubernetes.expire_history`.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter, deque
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import yaml
from aiohttp import web

from ._app import ApiServer, RequestRecord
from ._cluster import CONFIGMAP_MAX_BYTES, Cluster, Faults
from ._store import RESOURCES, StatusError, Store

__all__ = ["CONFIGMAP_MAX_BYTES", "FakeKubernetes", "Faults", "RequestRecord"]


class FakeKubernetes:
    """An emulated Kubernetes API server and node. An async context manager.

    ``port``: 0 picks a free port. ``token``: when set, requests need ``Authorization:
    Bearer <token>`` (the kubeconfig carries it). ``namespace``: the kubeconfig context's
    namespace. ``kubeconfig``: where to write the kubeconfig (default: a temporary file).
    ``retention``: how many events the watch history keeps. ``bookmark_interval``:
    seconds between BOOKMARK events on watches that allow them. ``env``: the base
    environment of every container process (default: this process's environment).
    ``max_grace``: cap, in seconds, on pods' termination grace periods. ``pod_backoff``:
    the first delay before a failed pod is replaced or restarted (doubling).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        namespace: str = "default",
        context: str = "fake-kubernetes",
        kubeconfig: str | Path | None = None,
        retention: int = 10_000,
        bookmark_interval: float = 1.0,
        env: Mapping[str, str] | None = None,
        max_grace: float = 2.0,
        pod_backoff: float = 0.05,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.namespace = namespace
        self.context = context
        self._kubeconfig_arg = Path(kubeconfig) if kubeconfig is not None else None
        self._env = dict(env) if env is not None else None
        self.faults = Faults()
        self.store = Store(retention=retention)
        self._bookmark_interval = bookmark_interval
        self._max_grace = max_grace
        self._pod_backoff = pod_backoff
        self._runner: web.AppRunner | None = None
        self._root: Path | None = None
        self._cluster: Cluster | None = None
        self._server: ApiServer | None = None
        self.kubeconfig: Path = Path()

    # -- lifetime ----------------------------------------------------------------------

    async def __aenter__(self) -> FakeKubernetes:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start serving and write the kubeconfig. Raises OSError if the port is taken."""
        self._root = Path(
            await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="fake-k8s-"))
        )
        env = self._env if self._env is not None else dict(os.environ)
        self._cluster = Cluster(
            self.store,
            self.faults,
            root=self._root / "pods",
            base_env=env,
            max_grace=self._max_grace,
            pod_backoff=self._pod_backoff,
        )
        self._server = ApiServer(
            self.store,
            self._cluster,
            self.faults,
            token=self.token,
            bookmark_interval=self._bookmark_interval,
        )
        self._runner = web.AppRunner(
            self._server.app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1]
        self.kubeconfig = self._kubeconfig_arg or self._root / "kubeconfig.yaml"
        text = yaml.safe_dump(self.kubeconfig_dict(), sort_keys=False)
        await anyio.Path(self.kubeconfig).write_text(text)

    async def aclose(self) -> None:
        """Stop serving, kill every container process, remove the temporary files."""
        with anyio.CancelScope(shield=True):
            if self._server is not None:
                await self._server.close_streams()
            if self._cluster is not None:
                await self._cluster.aclose()
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None
            if self._cluster is not None:
                await self._cluster.remove_root()
            if self._root is not None:
                root = self._root
                await anyio.to_thread.run_sync(lambda: _rmtree(root))

    # -- configuration -----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def kubeconfig_dict(self) -> dict[str, Any]:
        """The kubeconfig for this server as a dict (also written to :attr:`kubeconfig`)."""
        user: dict[str, Any] = {"token": self.token} if self.token else {}
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": self.context, "cluster": {"server": self.url}}],
            "users": [{"name": self.context, "user": user}],
            "contexts": [
                {
                    "name": self.context,
                    "context": {
                        "cluster": self.context,
                        "user": self.context,
                        "namespace": self.namespace,
                    },
                }
            ],
            "current-context": self.context,
            "preferences": {},
        }

    # -- inspection --------------------------------------------------------------------

    @property
    def requests(self) -> deque[RequestRecord]:
        """The requests answered so far (the last 100,000), in order; requests refused
        for their credentials are not kept."""
        return self._api.requests

    def count(self, **match: str | None) -> int:
        """How many requests had all the given fields, e.g. ``count(verb="get",
        resource="jobs")``; fields are those of :class:`RequestRecord`."""
        return sum(
            1
            for r in self._api.requests
            if all(getattr(r, key) == value for key, value in match.items())
        )

    @property
    def watch_connections(self) -> Counter[tuple[str, str]]:
        """Watch streams opened so far, by (resource, namespace)."""
        return self._api.watch_connections

    @property
    def active_watches(self) -> int:
        """Watch streams open right now."""
        return self._api.active_watches

    def objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """The stored objects of ``resource`` ("jobs", "pods", "configmaps", "secrets",
        "events"), in ``namespace`` or all namespaces."""
        return self.store.items(RESOURCES[resource], namespace)

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One stored object, or None."""
        return self.store.find(RESOURCES[resource], namespace, name)

    def container_pids(self) -> dict[str, int]:
        """The process id of each running container process, by pod name."""
        return self._kube.container_pids()

    def pod_log(self, namespace: str, name: str) -> bytes:
        """What a pod's container wrote so far. Raises KeyError for an unknown pod."""
        pod = self.store.find(RESOURCES["pods"], namespace, name)
        if pod is None:
            raise KeyError(name)
        return bytes(self._kube.logs[pod["metadata"]["uid"]].data)

    # -- faults ------------------------------------------------------------------------

    def drop_watches(self) -> int:
        """End every open watch stream now, as a dropped connection. Returns how many."""
        return self.store.drop_watches()

    def expire_history(self) -> None:
        """Forget the event history: watches resuming from any earlier resourceVersion
        get 410 Expired (an ERROR event, or HTTP 410 with ``faults.expired_as_http``)."""
        self.store.expire_history()

    async def oom_kill(self, namespace: str, pod: str) -> None:
        """Kill a running pod's container as the OOM killer would (``OOMKilled``)."""
        try:
            await self._kube.oom_kill(namespace, pod)
        except StatusError as exc:
            raise LookupError(str(exc)) from None

    @property
    def _api(self) -> ApiServer:
        if self._server is None:
            raise RuntimeError("FakeKubernetes is not started: use `async with FakeKubernetes()`")
        return self._server

    @property
    def _kube(self) -> Cluster:
        if self._cluster is None:
            raise RuntimeError("FakeKubernetes is not started: use `async with FakeKubernetes()`")
        return self._cluster


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
