"""FakeKubernetes' behaviour: API semantics (defaults, validation, delete propagation,
garbage collection), a job controller and a "kubelet" that runs containers' commands as
local process groups.
"""

from __future__ import annotations

import asyncio
import shutil
import signal

import anyio

from ._base import Faults, PodLog
from ._controllers import JobController
from ._kubelet import Kubelet
from ._objects import CONFIGMAP_MAX_BYTES, ApiObjects

__all__ = ["CONFIGMAP_MAX_BYTES", "Cluster", "Faults", "PodLog"]


class Cluster(ApiObjects, JobController, Kubelet):
    """The API semantics and the controllers of FakeKubernetes, from its parts: the API
    objects (:mod:`._objects`), the job controller (:mod:`._controllers`) and the kubelet
    (:mod:`._kubelet`), over the state they share (:mod:`._base`)."""

    # -- lifetime ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop every controller and kill every container process."""
        for task in list(self._controllers.values()):
            task.cancel()
        for kubelet in list(self._kubelets.values()):
            if kubelet.group is not None:
                kubelet.group.signal_group(signal.SIGKILL)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        for kubelet in list(self._kubelets.values()):
            if kubelet.group is not None:
                await kubelet.group.stop(0)
                kubelet.group.close()
        self._kubelets.clear()

    def container_pids(self) -> dict[str, int]:
        """The process id of each running container process, by pod name."""
        out = {}
        for uid, kubelet in self._kubelets.items():
            if kubelet.group is not None and not kubelet.group.empty:
                pod = self._pod_by_uid(uid)
                out[pod["metadata"]["name"] if pod else uid] = kubelet.group.pid
        return out

    async def remove_root(self) -> None:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(self.root, ignore_errors=True))
