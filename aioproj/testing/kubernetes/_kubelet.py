"""FakeKubernetes' kubelet: runs a pod's container command as a local process group
(volumes materialised, the environment resolved), reports its status as a kubelet does
(waiting, running, terminated, OOMKilled, image pull errors) and stops it on delete."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import shlex
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio

from aioproj._process import ProcessGroup

from ._base import (
    CONFIGMAPS,
    JOBS,
    PODS,
    SECRETS,
    ClusterBase,
    KubeletState,
    PodLog,
    meta_of,
)
from ._store import Obj, StatusError, now_rfc3339

__all__ = [
    "Kubelet",
]

_UNSCHEDULABLE = (
    "0/1 nodes are available: 1 Insufficient memory. preemption: 0/1 nodes are available: "
    "1 No preemption victims found for incoming pod."
)


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in env values."""
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def _path_rewriter(mounts: Mapping[str, Path]) -> Callable[[str], str]:
    """Map container mount paths inside a string to their host directories (longest first),
    so commands that name ``/mount/path/file`` work without a container."""
    if not mounts:
        return lambda text: text
    ordered = sorted(mounts, key=len, reverse=True)
    pattern = re.compile(
        "(?<![A-Za-z0-9_.-])("
        + "|".join(re.escape(m.rstrip("/")) for m in ordered)
        + r")(?=$|[/\s'\";:&|)=,])"
    )
    table = {m.rstrip("/"): str(mounts[m]) for m in ordered}
    return lambda text: pattern.sub(lambda m: table[m.group(1)], text)


class Kubelet(ClusterBase):
    """The kubelet: runs a pod's container command as a local process group, reports its
    status, stops it."""

    async def _delete_pod(self, pod: Obj, grace: int | None) -> Obj:
        meta = meta_of(pod)
        uid = meta["uid"]
        kubelet = self._kubelets.get(uid)
        running = kubelet is not None and kubelet.group is not None and not kubelet.group.empty
        if not running:
            if kubelet is not None:
                kubelet.task.cancel()
            self._kubelets.pop(uid, None)
            gone = self.store.remove(PODS, meta["namespace"], meta["name"])
            self._pod_finished(uid, "Failed")
            self._finish_log(uid)
            return gone
        assert kubelet is not None
        if grace is None:
            grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))

        def mark(o: Obj) -> None:
            meta_of(o)["deletionTimestamp"] = now_rfc3339()
            meta_of(o)["deletionGracePeriodSeconds"] = grace

        marked = self.store.update(PODS, meta["namespace"], meta["name"], mark)
        if not kubelet.terminating:
            kubelet.terminating = True
            self._spawn(self._terminate(marked, kubelet, min(float(grace), self.max_grace)))
        return marked

    async def _terminate(self, pod: Obj, kubelet: KubeletState, grace: float) -> None:
        assert kubelet.group is not None
        await kubelet.group.stop(grace)
        with contextlib.suppress(asyncio.CancelledError):
            await kubelet.task
        meta = meta_of(pod)
        self._kubelets.pop(meta["uid"], None)
        with contextlib.suppress(StatusError):
            self.store.remove(PODS, meta["namespace"], meta["name"])
        self._pod_finished(meta["uid"], "Failed")

    def _start_kubelet(self, pod: Obj) -> None:
        uid = meta_of(pod)["uid"]
        self.logs[uid] = PodLog()
        self._pod_result(uid)
        task = self._spawn(self._run_pod(meta_of(pod)["namespace"], meta_of(pod)["name"], uid))
        self._kubelets[uid] = KubeletState(task)

    def _pod_status(self, pod: Obj, **status: Any) -> Obj:
        def change(o: Obj) -> None:
            o.setdefault("status", {}).update(status)

        stored = self.store.update(PODS, meta_of(pod)["namespace"], meta_of(pod)["name"], change)
        self._pod_changed(stored)
        return stored

    def _finish_log(self, uid: str) -> None:
        log = self.logs.get(uid)
        if log is not None:
            log.finish()

    async def _run_pod(self, namespace: str, name: str, uid: str) -> None:
        try:
            await self._drive_pod(namespace, name, uid)
        except StatusError:
            pass  # the pod was deleted while its kubelet worked
        finally:
            self._finish_log(uid)

    async def _drive_pod(self, namespace: str, name: str, uid: str) -> None:
        pod = self.store.get(PODS, namespace, name)
        spec = pod["spec"]
        container = spec["containers"][0]
        now = now_rfc3339()
        if self.faults.unschedulable:
            self._pod_status(
                pod,
                phase="Pending",
                conditions=[
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": _UNSCHEDULABLE,
                        "lastProbeTime": None,
                        "lastTransitionTime": now,
                    }
                ],
            )
            self._event(
                pod,
                "Warning",
                "FailedScheduling",
                "0/1 nodes are available: 1 Insufficient memory.",
            )
            await asyncio.Event().wait()
        self._set_node(pod)
        pod = self._waiting(pod, container, "ContainerCreating", None)
        image = str(container.get("image", ""))
        if image in self.faults.image_pull_failures:
            message = (
                f'Failed to pull image "{image}": rpc error: code = NotFound desc = '
                f'failed to pull and unpack image "{image}": not found'
            )
            self._waiting(pod, container, "ErrImagePull", message)
            self._event(pod, "Warning", "Failed", message)
            await asyncio.sleep(0.1)
            self._waiting(pod, container, "ImagePullBackOff", f'Back-off pulling image "{image}"')
            self._event(pod, "Normal", "BackOff", f'Back-off pulling image "{image}"')
            await asyncio.Event().wait()
        if self.faults.hold_pending:
            await asyncio.Event().wait()
        if not container.get("command"):
            self._waiting(
                pod,
                container,
                "CreateContainerError",
                "FakeKubernetes runs a container's command on the host and pulls no "
                "image: set spec.containers[].command",
            )
            await asyncio.Event().wait()
        root = self.root / uid
        mounts = await self._materialize(pod, container, root)
        try:
            env = self._container_env(pod, container)
        except LookupError as exc:
            self._waiting(pod, container, "CreateContainerConfigError", str(exc))
            await asyncio.Event().wait()
        rewrite = _path_rewriter(mounts)
        argv = [
            rewrite(str(a)) for a in [*container.get("command", []), *container.get("args", [])]
        ]
        env = {k: rewrite(v) for k, v in env.items()}
        workdir = container.get("workingDir")
        if workdir:
            cwd = Path(rewrite(workdir))
            if not any(workdir == m or workdir.startswith(m.rstrip("/") + "/") for m in mounts):
                cwd = root / "rootfs" / workdir.lstrip("/")
        else:
            cwd = root / "rootfs"
        await anyio.to_thread.run_sync(lambda: cwd.mkdir(parents=True, exist_ok=True))
        log = self.logs[uid]
        kubelet = self._kubelets[uid]
        restarts = 0
        oom = image in self.faults.oom_images
        while True:
            started = now_rfc3339()
            group = await ProcessGroup.start(
                "/bin/sh", "exec " + shlex.join(argv), cwd=cwd, env=env, on_output=log.feed
            )
            kubelet.group = group
            log.started = True
            pod = self._running(pod, container, started, restarts)
            if restarts == 0:
                self._event(pod, "Normal", "Started", f"Started container {container['name']}")
            if oom:
                await asyncio.sleep(0.05)
                kubelet.oom = True
                group.signal_group(signal.SIGKILL)
            pump = asyncio.get_running_loop().create_task(group.pump_output())
            try:
                code = await group.wait_exit()
                await group.reap_stragglers(self.max_grace)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(pump), timeout=self.max_grace)
            finally:
                pump.cancel()
                group.close()
            exit_code = code if code >= 0 else 128 - code
            if kubelet.oom:
                reason = "OOMKilled"
            elif exit_code == 0:
                reason = "Completed"
            else:
                reason = "Error"
            terminated = {
                "exitCode": exit_code,
                "reason": reason,
                "startedAt": started,
                "finishedAt": now_rfc3339(),
                "containerID": f"fake://{group.pid}",
            }
            kubelet.oom = False
            restart = (
                exit_code != 0
                and spec.get("restartPolicy") == "OnFailure"
                and not kubelet.terminating
                and restarts < self._restart_budget(pod)
            )
            if not restart:
                phase = "Succeeded" if exit_code == 0 and not kubelet.terminating else "Failed"
                self._terminated(pod, container, terminated, restarts, phase)
                log.finish()
                self._pod_finished(uid, phase)
                return
            restarts += 1
            self._pod_status(
                pod,
                phase="Running",
                containerStatuses=[
                    self._container_status(
                        container,
                        {
                            "waiting": {
                                "reason": "CrashLoopBackOff",
                                "message": "back-off restarting failed container "
                                + container["name"],
                            }
                        },
                        restarts,
                        last={"terminated": terminated},
                    )
                ],
            )
            await asyncio.sleep(self.pod_backoff * 2 ** (restarts - 1))
            pod = self.store.get(PODS, namespace, name)

    def _restart_budget(self, pod: Obj) -> int:
        for ref in meta_of(pod).get("ownerReferences") or []:
            if ref.get("kind") == "Job":
                job = self.store.find(JOBS, meta_of(pod)["namespace"], ref["name"])
                if job is not None:
                    return int(job["spec"].get("backoffLimit", 6))
        return 2**31

    def _set_node(self, pod: Obj) -> None:
        def change(o: Obj) -> None:
            o["spec"]["nodeName"] = "fake-node"

        meta = meta_of(pod)
        self.store.update(PODS, meta["namespace"], meta["name"], change)
        self._event(
            pod,
            "Normal",
            "Scheduled",
            f"Successfully assigned {meta['namespace']}/{meta['name']} to fake-node",
        )

    def _container_status(
        self, container: Mapping[str, Any], state: Obj, restarts: int, *, last: Obj | None = None
    ) -> Obj:
        ready = "running" in state
        return {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "ready": ready,
            "started": ready,
            "restartCount": restarts,
            "state": state,
            "lastState": last or {},
        }

    def _conditions(self, ready: bool) -> list[Obj]:
        now = now_rfc3339()
        value = "True" if ready else "False"
        return [
            {
                "type": "PodScheduled",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": now,
            },
            {
                "type": "Initialized",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": now,
            },
            {
                "type": "ContainersReady",
                "status": value,
                "lastProbeTime": None,
                "lastTransitionTime": now,
            },
            {"type": "Ready", "status": value, "lastProbeTime": None, "lastTransitionTime": now},
        ]

    def _waiting(
        self, pod: Obj, container: Mapping[str, Any], reason: str, message: str | None
    ) -> Obj:
        waiting: Obj = {"reason": reason}
        if message:
            waiting["message"] = message
        return self._pod_status(
            pod,
            phase="Pending",
            hostIP="127.0.0.1",
            startTime=pod["status"].get("startTime") or now_rfc3339(),
            conditions=self._conditions(False),
            containerStatuses=[self._container_status(container, {"waiting": waiting}, 0)],
        )

    def _running(self, pod: Obj, container: Mapping[str, Any], started: str, restarts: int) -> Obj:
        return self._pod_status(
            pod,
            phase="Running",
            podIP="127.0.0.1",
            conditions=self._conditions(True),
            containerStatuses=[
                self._container_status(container, {"running": {"startedAt": started}}, restarts)
            ],
        )

    def _terminated(
        self, pod: Obj, container: Mapping[str, Any], terminated: Obj, restarts: int, phase: str
    ) -> None:
        with contextlib.suppress(StatusError):
            self._pod_status(
                pod,
                phase=phase,
                conditions=self._conditions(False),
                containerStatuses=[
                    self._container_status(container, {"terminated": terminated}, restarts)
                ],
            )

    async def _materialize(
        self, pod: Obj, container: Mapping[str, Any], root: Path
    ) -> dict[str, Path]:
        """Write each mounted volume under ``root``; return mount path → host path.

        ConfigMaps and Secrets that do not exist yet are waited for (the pod stays
        ContainerCreating), as a kubelet does.
        """
        namespace = meta_of(pod)["namespace"]
        volumes = {v.get("name"): v for v in pod["spec"].get("volumes") or []}
        mounts: dict[str, Path] = {}
        files: list[tuple[Path, bytes]] = []
        links: list[tuple[Path, Path]] = []
        dirs: list[Path] = [root / "rootfs"]
        for mount in container.get("volumeMounts") or []:
            mount_path = str(mount.get("mountPath", ""))
            volume = volumes.get(mount.get("name"))
            if not mount_path.startswith("/") or volume is None:
                continue
            host = root / "volumes" / mount_path.lstrip("/")
            mounts[mount_path] = host
            if "hostPath" in volume:
                links.append((host, Path(volume["hostPath"]["path"])))
                continue
            dirs.append(host)
            if "configMap" in volume or "secret" in volume:
                data = await self._volume_data(namespace, volume)
                items = (volume.get("configMap") or volume.get("secret") or {}).get("items")
                paths = (
                    {i["key"]: i.get("path", i["key"]) for i in items}
                    if items
                    else {k: k for k in data}
                )
                for key, path in paths.items():
                    if key in data:
                        files.append((host / path, data[key]))

        def write() -> None:
            for directory in dirs:
                directory.mkdir(parents=True, exist_ok=True)
            for path, content in files:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
            for link, target in links:
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(target)

        await anyio.to_thread.run_sync(write)
        return mounts

    async def _volume_data(self, namespace: str, volume: Mapping[str, Any]) -> dict[str, bytes]:
        is_cm = "configMap" in volume
        source = volume["configMap"] if is_cm else volume["secret"]
        name = source.get("name") if is_cm else source.get("secretName")
        while True:
            obj = self.store.find(CONFIGMAPS if is_cm else SECRETS, namespace, str(name))
            if obj is not None:
                break
            if source.get("optional"):
                return {}
            await asyncio.sleep(0.05)
        data: dict[str, bytes] = {}
        if is_cm:
            data.update({k: str(v).encode() for k, v in (obj.get("data") or {}).items()})
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        else:
            data.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
        return data

    def _container_env(self, pod: Obj, container: Mapping[str, Any]) -> dict[str, str]:
        """The container's environment. Raises LookupError for a missing reference."""
        meta = meta_of(pod)
        namespace = meta["namespace"]
        env = dict(self.base_env)
        env["HOSTNAME"] = meta["name"]
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref = source["configMapRef"]
                cm = self.store.find(CONFIGMAPS, namespace, ref.get("name", ""))
                if cm is None and not ref.get("optional"):
                    raise LookupError(f'configmap "{ref.get("name")}" not found')
                env.update({prefix + k: str(v) for k, v in ((cm or {}).get("data") or {}).items()})
            if "secretRef" in source:
                ref = source["secretRef"]
                secret = self.store.find(SECRETS, namespace, ref.get("name", ""))
                if secret is None and not ref.get("optional"):
                    raise LookupError(f'secret "{ref.get("name")}" not found')
                env.update(
                    {
                        prefix + k: base64.b64decode(v).decode()
                        for k, v in ((secret or {}).get("data") or {}).items()
                    }
                )
        fields = {
            "metadata.name": meta["name"],
            "metadata.namespace": namespace,
            "metadata.uid": meta["uid"],
            "spec.nodeName": "fake-node",
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }
        for item in container.get("env") or []:
            name = item.get("name")
            if not name:
                continue
            if "value" in item:
                env[name] = _expand(str(item["value"] if item["value"] is not None else ""), env)
                continue
            source = item.get("valueFrom") or {}
            if "fieldRef" in source:
                env[name] = fields.get(source["fieldRef"].get("fieldPath", ""), "")
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                is_secret = "secretKeyRef" in source
                ref = source["secretKeyRef" if is_secret else "configMapKeyRef"]
                obj = self.store.find(
                    SECRETS if is_secret else CONFIGMAPS, namespace, ref.get("name", "")
                )
                kind = "secret" if is_secret else "configmap"
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise LookupError(f'{kind} "{ref.get("name")}" not found')
                data = obj.get("data") or {}
                if ref.get("key") not in data:
                    if ref.get("optional"):
                        continue
                    raise LookupError(
                        f"couldn't find key {ref.get('key')} in {kind} "
                        f"{namespace}/{ref.get('name')}"
                    )
                value = data[ref["key"]]
                env[name] = base64.b64decode(value).decode() if is_secret else str(value)
        return env

    async def oom_kill(self, namespace: str, name: str) -> None:
        """Kill a running pod's container as the OOM killer would. Raises StatusError."""
        pod = self.store.get(PODS, namespace, name)
        kubelet = self._kubelets.get(meta_of(pod)["uid"])
        if kubelet is None or kubelet.group is None:
            raise StatusError.bad_request(f'pod "{name}" has no running container')
        kubelet.oom = True
        kubelet.group.signal_group(signal.SIGKILL)


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
