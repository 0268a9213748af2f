"""FakeKubernetes against the official clients: kubectl (the dispatcher on PATH) and
kubernetes-asyncio (its ApiClient and its own ``watch.Watch``), plus the API semantics the
backend relies on (resourceVersions, 410, selectors, propagation, garbage collection)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from aioproj.testing.kubernetes import FakeKubernetes

pytestmark = pytest.mark.anyio

KUBECTL = shutil.which("kubectl")


@pytest.fixture
def kubectl_on_path() -> None:
    """The conformance tests drive the emulator with the real kubectl: without it they
    fail (a skipped conformance test would pass for nothing)."""
    if KUBECTL is None:
        pytest.fail("kubectl is not on PATH: install it (Debian: apt install kubectl).")


needs_kubectl = pytest.mark.usefixtures("kubectl_on_path")

JOB_YAML = """\
apiVersion: batch/v1
kind: Job
metadata:
  name: hello
  labels: {team: alpha}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: main
        image: busybox:1.36
        command: ["sh", "-c", "echo hello from the pod; echo second line"]
"""


def job_body(
    name: str, command: str, *, labels: dict[str, str] | None = None, backoff: int = 0
) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "backoffLimit": backoff,
            "template": {
                "metadata": {"labels": labels or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "main", "image": "busybox", "command": ["sh", "-c", command]}
                    ],
                },
            },
        },
    }


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubernetes]:
    async with FakeKubernetes(bookmark_interval=0.2) as fake:
        yield fake


async def wait_until(predicate: Any, limit: float = 15.0) -> None:
    with anyio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 (the emulator's state has no event)
            await anyio.sleep(0.02)


def job_done(kube: FakeKubernetes, name: str, kind: str = "Complete") -> bool:
    job = kube.get("jobs", "default", name)
    conditions = (job or {}).get("status", {}).get("conditions") or []
    return any(c["type"] == kind for c in conditions)


async def kubectl(
    kube: FakeKubernetes, cache: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = "127.0.0.1"
    argv = [str(KUBECTL), "--kubeconfig", str(kube.kubeconfig), "--cache-dir", str(cache), *args]
    result = await anyio.to_thread.run_sync(
        lambda: subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


# -- kubectl ----------------------------------------------------------------------------


@needs_kubectl
async def test_kubectl_apply_get_describe_logs_delete(kube: FakeKubernetes, tmp_path: Path) -> None:
    manifest = tmp_path / "job.yaml"
    await anyio.Path(manifest).write_text(JOB_YAML)
    cache = tmp_path / "cache"

    applied = await kubectl(kube, cache, "apply", "-f", str(manifest))
    assert applied.stdout.strip() == "job.batch/hello created"
    await wait_until(lambda: job_done(kube, "hello"))

    jobs = await kubectl(kube, cache, "get", "jobs")
    header, row = jobs.stdout.splitlines()
    assert header.split() == ["NAME", "STATUS", "COMPLETIONS", "DURATION", "AGE"]
    assert row.split()[:3] == ["hello", "Complete", "1/1"]

    as_json = json.loads((await kubectl(kube, cache, "get", "job", "hello", "-o", "json")).stdout)
    assert as_json["metadata"]["labels"]["team"] == "alpha"
    assert "kubectl.kubernetes.io/last-applied-configuration" in as_json["metadata"]["annotations"]
    types = [c["type"] for c in as_json["status"]["conditions"]]
    assert types == ["SuccessCriteriaMet", "Complete"]

    described = (await kubectl(kube, cache, "describe", "job", "hello")).stdout
    assert "Pods Statuses:    0 Active (0 Ready) / 1 Succeeded / 0 Failed" in described
    assert "SuccessfulCreate" in described

    logs = await kubectl(kube, cache, "logs", "job/hello")
    assert logs.stdout == "hello from the pod\nsecond line\n"

    pods = await kubectl(kube, cache, "get", "pods", "-l", "job-name=hello")
    assert "Completed" in pods.stdout

    deleted = await kubectl(kube, cache, "delete", "job", "hello", "--cascade=background")
    assert deleted.stdout.strip() == 'job.batch "hello" deleted'
    await wait_until(lambda: not kube.objects("pods", "default"))
    delete = [r for r in kube.requests if r.verb == "delete" and r.resource == "jobs"]
    assert len(delete) == 1

    missing = await kubectl(kube, cache, "get", "job", "hello", check=False)
    assert missing.returncode == 1
    assert 'Error from server (NotFound): jobs.batch "hello" not found' in missing.stderr


@needs_kubectl
async def test_kubectl_apply_twice_is_already_exists_on_create_and_patch_on_apply(
    kube: FakeKubernetes, tmp_path: Path
) -> None:
    manifest = tmp_path / "job.yaml"
    await anyio.Path(manifest).write_text(JOB_YAML)
    cache = tmp_path / "cache"
    await kubectl(kube, cache, "create", "-f", str(manifest))
    again = await kubectl(kube, cache, "create", "-f", str(manifest), check=False)
    assert again.returncode == 1
    assert "AlreadyExists" in again.stderr
    assert 'jobs.batch "hello" already exists' in again.stderr

    await anyio.Path(manifest).write_text(JOB_YAML.replace("team: alpha", "team: beta"))
    patched = await kubectl(kube, cache, "apply", "-f", str(manifest))
    assert "configured" in patched.stdout
    job = kube.get("jobs", "default", "hello")
    assert job is not None
    assert job["metadata"]["labels"]["team"] == "beta"


@needs_kubectl
async def test_kubectl_follows_logs_until_the_container_ends(
    kube: FakeKubernetes, tmp_path: Path
) -> None:
    from aioproj.testing.kubernetes._store import RESOURCES

    assert kube._cluster is not None
    kube._cluster.create(
        RESOURCES["jobs"], "default", job_body("slow", "echo one; sleep 0.5; echo two")
    )
    await wait_until(lambda: bool(kube.container_pids()))
    result = await kubectl(kube, tmp_path / "cache", "logs", "-f", "job/slow")
    assert result.stdout == "one\ntwo\n"


@needs_kubectl
async def test_kubectl_sees_a_failed_job_and_a_bad_job_is_invalid(
    kube: FakeKubernetes, tmp_path: Path
) -> None:
    from aioproj.testing.kubernetes._store import RESOURCES

    assert kube._cluster is not None
    kube._cluster.create(RESOURCES["jobs"], "default", job_body("boom", "echo bad; exit 3"))
    await wait_until(lambda: job_done(kube, "boom", "Failed"))
    cache = tmp_path / "cache"
    row = (await kubectl(kube, cache, "get", "job", "boom")).stdout.splitlines()[1].split()
    assert row[:3] == ["boom", "Failed", "0/1"]
    pods = (await kubectl(kube, cache, "get", "pods")).stdout
    assert "Error" in pods
    pod = kube.objects("pods", "default")[0]
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"

    bad = tmp_path / "bad.yaml"
    await anyio.Path(bad).write_text(JOB_YAML.replace("      restartPolicy: Never\n", ""))
    result = await kubectl(kube, cache, "create", "-f", str(bad), check=False)
    assert result.returncode == 1
    assert "spec.template.spec.restartPolicy: Required value" in result.stderr


# -- kubernetes-asyncio -----------------------------------------------------------------


async def _api(kube: FakeKubernetes) -> Any:
    configuration = client.Configuration()
    await config.load_kube_config_from_dict(
        kube.kubeconfig_dict(), client_configuration=configuration
    )
    return client.ApiClient(configuration=configuration)


@pytest.mark.filterwarnings("ignore:Sending a large body:ResourceWarning")
async def test_kubernetes_asyncio_crud_and_status_errors(kube: FakeKubernetes) -> None:
    async with await _api(kube) as api:
        batch = client.BatchV1Api(api)
        core = client.CoreV1Api(api)
        created = await batch.create_namespaced_job("default", job_body("j1", "exit 0"))
        assert created.metadata.uid
        assert created.spec.selector.match_labels == {
            "batch.kubernetes.io/controller-uid": created.metadata.uid
        }
        with pytest.raises(ApiException) as exists:
            await batch.create_namespaced_job("default", job_body("j1", "exit 0"))
        assert exists.value.status == 409
        assert json.loads(exists.value.body)["reason"] == "AlreadyExists"
        with pytest.raises(ApiException) as missing:
            await batch.read_namespaced_job("nope", "default")
        assert missing.value.status == 404
        assert json.loads(missing.value.body)["message"] == 'jobs.batch "nope" not found'
        bad = job_body("j2", "true")
        del bad["spec"]["template"]["spec"]["restartPolicy"]
        with pytest.raises(ApiException) as invalid:
            await batch.create_namespaced_job("default", bad)
        status = json.loads(invalid.value.body)
        assert invalid.value.status == 422
        assert status["reason"] == "Invalid"
        assert status["details"]["causes"][0]["field"] == "spec.template.spec.restartPolicy"

        cm = await core.create_namespaced_config_map(
            "default", {"metadata": {"name": "cm1"}, "data": {"a": "1"}}
        )
        patched = await core.patch_namespaced_config_map(
            "cm1", "default", {"metadata": {"labels": {"x": "y"}}}
        )
        assert patched.metadata.labels == {"x": "y"}
        assert int(patched.metadata.resource_version) > int(cm.metadata.resource_version)
        too_big = {"metadata": {"name": "big"}, "data": {"blob": "x" * (1024 * 1024 + 1)}}
        with pytest.raises(ApiException) as large:
            await core.create_namespaced_config_map("default", too_big)
        assert large.value.status == 422
        assert "Too long" in json.loads(large.value.body)["message"]

        listed = await core.list_namespaced_config_map("default", label_selector="x=y")
        assert [c.metadata.name for c in listed.items] == ["cm1"]
        assert not (await core.list_namespaced_config_map("default", label_selector="x!=y")).items
        by_field = await batch.list_namespaced_job("default", field_selector="metadata.name=j1")
        assert [j.metadata.name for j in by_field.items] == ["j1"]


async def test_kubernetes_asyncio_watch_stream_events_and_bookmarks(kube: FakeKubernetes) -> None:
    async with await _api(kube) as api:
        batch = client.BatchV1Api(api)
        await batch.create_namespaced_job("default", job_body("other", "exit 0"))
        listed = await batch.list_namespaced_job("default", label_selector="app=w")
        rv = listed.metadata.resource_version
        assert rv != "0"  # "0" would mean "any version": synthetic ADDED events
        await batch.create_namespaced_job("default", job_body("w1", "exit 0", labels={"app": "w"}))
        seen: list[tuple[str, str]] = []
        async with watch.Watch() as w:
            async for event in w.stream(
                batch.list_namespaced_job,
                "default",
                label_selector="app=w",
                resource_version=rv,
                allow_watch_bookmarks=True,
                timeout_seconds=10,
            ):
                if event["type"] == "BOOKMARK":
                    seen.append(("BOOKMARK", event["raw_object"]["metadata"]["resourceVersion"]))
                    if ("MODIFIED", "complete") in seen:
                        break
                    continue
                job = event["object"]
                conditions = (job.status.conditions or []) if job.status else []
                complete = any(c.type == "Complete" for c in conditions)
                seen.append((event["type"], "complete" if complete else job.metadata.name))
        assert seen[0] == ("ADDED", "w1")
        assert all(name != "other" for _, name in seen)
        assert ("MODIFIED", "complete") in seen
        assert seen[-1][0] == "BOOKMARK"
        assert int(seen[-1][1]) >= int(rv)


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
async def test_kubernetes_asyncio_watch_gets_410_for_an_expired_version(
    kube: FakeKubernetes, as_http: bool
) -> None:
    kube.faults.expired_as_http = as_http
    async with await _api(kube) as api:
        core = client.CoreV1Api(api)
        await core.create_namespaced_config_map("default", {"metadata": {"name": "b"}})
        old = (await core.list_namespaced_config_map("default")).metadata.resource_version
        await core.create_namespaced_config_map("default", {"metadata": {"name": "c"}})
        kube.expire_history()

        async def stream_from_old() -> None:
            async with watch.Watch() as w:
                async for _ in w.stream(
                    core.list_namespaced_config_map,
                    "default",
                    resource_version=old,
                    timeout_seconds=2,
                ):
                    pass

        with pytest.raises(ApiException) as expired:
            await stream_from_old()
        assert expired.value.status == 410
        # Listing again gives a version to watch from.
        fresh = (await core.list_namespaced_config_map("default")).metadata.resource_version
        await core.create_namespaced_config_map("default", {"metadata": {"name": "d"}})
        async with watch.Watch() as w:
            async for event in w.stream(
                core.list_namespaced_config_map,
                "default",
                resource_version=fresh,
                timeout_seconds=2,
            ):
                assert (event["type"], event["object"].metadata.name) == ("ADDED", "d")
                w.stop()


async def test_pod_log_follows_and_reports_waiting_containers(kube: FakeKubernetes) -> None:
    kube.faults.hold_pending = True
    async with await _api(kube) as api:
        batch = client.BatchV1Api(api)
        core = client.CoreV1Api(api)
        await batch.create_namespaced_job("default", job_body("held", "echo x"))
        await wait_until(lambda: bool(kube.objects("pods", "default")))
        pod = kube.objects("pods", "default")[0]["metadata"]["name"]
        with pytest.raises(ApiException) as waiting:
            await core.read_namespaced_pod_log(pod, "default")
        assert waiting.value.status == 400
        assert "is waiting to start: ContainerCreating" in json.loads(waiting.value.body)["message"]
        kube.faults.hold_pending = False
        await batch.create_namespaced_job("default", job_body("logs", "echo a; sleep 0.3; echo b"))
        await wait_until(lambda: any(n.startswith("logs-") for n in kube.container_pids()))
        name = next(n for n in kube.container_pids() if n.startswith("logs-"))
        response = await core.read_namespaced_pod_log(
            name, "default", follow=True, _preload_content=False
        )
        body = await response.read()
        assert body == b"a\nb\n"


# -- API semantics ----------------------------------------------------------------------


async def test_delete_propagation_background_foreground_orphan(kube: FakeKubernetes) -> None:
    async with await _api(kube) as api:
        batch = client.BatchV1Api(api)
        core = client.CoreV1Api(api)
        for name in ("bg", "fg", "orphan"):
            await batch.create_namespaced_job(
                "default", job_body(name, "sleep 30", labels={"case": name})
            )
        await wait_until(lambda: len(kube.container_pids()) == 3)
        job = await batch.read_namespaced_job("bg", "default")
        await core.create_namespaced_config_map(
            "default",
            {
                "metadata": {
                    "name": "owned",
                    "ownerReferences": [
                        {
                            "apiVersion": "batch/v1",
                            "kind": "Job",
                            "name": "bg",
                            "uid": job.metadata.uid,
                        }
                    ],
                }
            },
        )
        pids = dict(kube.container_pids())

        await batch.delete_namespaced_job("bg", "default", propagation_policy="Background")
        assert kube.get("jobs", "default", "bg") is None
        await wait_until(lambda: kube.get("configmaps", "default", "owned") is None)
        await wait_until(
            lambda: (
                not kube.objects("pods", "default")
                or all(
                    p["metadata"]["labels"].get("case") != "bg"
                    for p in kube.objects("pods", "default")
                )
            )
        )

        await batch.delete_namespaced_job("fg", "default", propagation_policy="Foreground")
        await wait_until(lambda: kube.get("jobs", "default", "fg") is None)
        assert all(
            p["metadata"]["labels"].get("case") != "fg" for p in kube.objects("pods", "default")
        )

        raw = await batch.delete_namespaced_job("orphan", "default", _preload_content=False)
        assert "child pods are preserved" in raw.headers.get("Warning", "")
        await wait_until(lambda: kube.get("jobs", "default", "orphan") is None)
        (left,) = kube.objects("pods", "default")
        assert left["metadata"]["labels"]["case"] == "orphan"
        assert "ownerReferences" not in left["metadata"]
        assert set(kube.container_pids()) == {left["metadata"]["name"]}

    from tests.support import process_gone

    gone = [pid for name, pid in pids.items() if name != left["metadata"]["name"]]
    assert all(process_gone(pid) for pid in gone)


async def test_boolean_query_values_follow_the_apiserver_rule() -> None:
    from aioproj.testing.kubernetes._app import is_true

    assert [is_true(v) for v in (None, "0", "false", "False")] == [False] * 4
    assert [is_true(v) for v in ("1", "true", "True", "", "yes")] == [True] * 5


def test_module_entry_point_serves_and_writes_a_kubeconfig(tmp_path: Path) -> None:
    import urllib.request

    kubeconfig = tmp_path / "kc.yaml"
    with subprocess.Popen(
        [sys.executable, "-m", "aioproj.testing.kubernetes", "--kubeconfig", str(kubeconfig)],
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        try:
            first = process.stdout.readline()
            assert first.startswith("FakeKubernetes listening on http://127.0.0.1:")
            assert process.stdout.readline().strip() == f"kubeconfig: {kubeconfig}"
            url = first.split()[-1]
            with urllib.request.urlopen(f"{url}/version") as answer:
                assert json.load(answer)["minor"] == "32"
            assert url in kubeconfig.read_text()
        finally:
            process.send_signal(2)
        assert process.wait(timeout=10) == 0
        assert process.stdout.read().strip().endswith("FakeKubernetes stopped")


async def test_kubelet_materialises_configmap_and_secret_volumes_and_env(
    kube: FakeKubernetes,
) -> None:
    async with await _api(kube) as api:
        core = client.CoreV1Api(api)
        batch = client.BatchV1Api(api)
        await core.create_namespaced_config_map(
            "default", {"metadata": {"name": "cfg"}, "data": {"a.txt": "from a configmap"}}
        )
        await core.create_namespaced_secret(
            "default", {"metadata": {"name": "sec"}, "stringData": {"b.txt": "from a secret"}}
        )
        body = job_body(
            "vols",
            "cat /etc/cfg/a.txt; echo; cat /etc/sec/b.txt; echo; echo $FROM_SECRET $POD; pwd",
        )
        pod_spec = body["spec"]["template"]["spec"]
        pod_spec["volumes"] = [
            {"name": "c", "configMap": {"name": "cfg"}},
            {"name": "s", "secret": {"secretName": "sec"}},
            {"name": "w", "emptyDir": {}},
        ]
        container = pod_spec["containers"][0]
        container["volumeMounts"] = [
            {"name": "c", "mountPath": "/etc/cfg"},
            {"name": "s", "mountPath": "/etc/sec"},
            {"name": "w", "mountPath": "/work/dir"},
        ]
        container["workingDir"] = "/work/dir"
        container["env"] = [
            {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "b.txt"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ]
        await batch.create_namespaced_job("default", body)
        await wait_until(lambda: job_done(kube, "vols"))
        (pod,) = kube.objects("pods", "default")
        name = pod["metadata"]["name"]
        log = (await core.read_namespaced_pod_log(name, "default")).splitlines()
    assert log[:3] == ["from a configmap", "from a secret", f"from a secret {name}"]
    assert log[3].endswith("/volumes/work/dir")  # the mount path, mapped under the pod


async def test_job_deadline_and_ttl(kube: FakeKubernetes) -> None:
    async with await _api(kube) as api:
        batch = client.BatchV1Api(api)
        slow = job_body("slow", "exec sleep 30")
        slow["spec"]["activeDeadlineSeconds"] = 1
        await batch.create_namespaced_job("default", slow)
        quick = job_body("quick", "echo done")
        quick["spec"]["ttlSecondsAfterFinished"] = 0
        await batch.create_namespaced_job("default", quick)
        await wait_until(lambda: bool(kube.container_pids()))
        await wait_until(lambda: job_done(kube, "slow", "Failed"))
        job = kube.get("jobs", "default", "slow")
        assert job is not None
        reasons = [(c["type"], c["reason"]) for c in job["status"]["conditions"]]
        assert reasons == [("FailureTarget", "DeadlineExceeded"), ("Failed", "DeadlineExceeded")]
        assert job["status"]["failed"] == 1
        assert "completionTime" not in job["status"]
        await wait_until(lambda: not kube.container_pids())
        # ttlSecondsAfterFinished: 0 deletes the finished Job and its pod.
        await wait_until(lambda: kube.get("jobs", "default", "quick") is None)
        await wait_until(
            lambda: all(
                not p["metadata"]["name"].startswith("quick-") for p in kube.objects("pods")
            )
        )


async def test_closing_the_emulator_kills_running_containers() -> None:
    from tests.support import process_gone

    async with FakeKubernetes() as fake:
        assert fake._cluster is not None
        from aioproj.testing.kubernetes._store import RESOURCES

        fake._cluster.create(RESOURCES["jobs"], "default", job_body("long", "exec sleep 60"))
        await wait_until(lambda: bool(fake.container_pids()))
        pids = list(fake.container_pids().values())
        root = fake.kubeconfig.parent
    assert all([await anyio.to_thread.run_sync(process_gone, pid) for pid in pids])
    assert not await anyio.Path(root).exists()


@needs_kubectl
async def test_kubectl_wait_and_foreground_delete(kube: FakeKubernetes, tmp_path: Path) -> None:
    manifest = tmp_path / "job.yaml"
    await anyio.Path(manifest).write_text(
        JOB_YAML.replace("echo hello from the pod; echo second line", "sleep 0.5; echo ok")
    )
    cache = tmp_path / "cache"
    await kubectl(kube, cache, "apply", "-f", str(manifest))
    waited = await kubectl(
        kube, cache, "wait", "--for=condition=complete", "job/hello", "--timeout=30s"
    )
    assert waited.stdout.strip() == "job.batch/hello condition met"
    deleted = await kubectl(kube, cache, "delete", "job", "hello", "--cascade=foreground")
    assert deleted.stdout.strip() == 'job.batch "hello" deleted'
    assert kube.get("jobs", "default", "hello") is None
    assert kube.objects("pods", "default") == []
