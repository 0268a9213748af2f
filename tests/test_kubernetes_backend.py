"""End to end: ``aioproj.run(..., backend="kubernetes")`` against FakeKubernetes, whose pods
are local processes sharing the test's file tracking store."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

import aioproj
from aioproj.journal import RECOVERED_TAG
from aioproj.testing.kubernetes import FakeKubernetes
from tests.support import (
    all_runs,
    amake_project,
    journal_runs,
    process_gone,
    read_run,
    wait_for_file,
)

pytestmark = pytest.mark.anyio

TEMPLATE = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"name": "{replaced with MLflow Project name}", "namespace": "default"},
    "spec": {
        "ttlSecondsAfterFinished": 100,
        "backoffLimit": 0,
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "{replaced with MLflow Project name}",
                        "image": "{replaced with URI of Docker image created during Project "
                        "execution}",
                        "command": ["{replaced with MLflow Project entry point command}"],
                        "env": [{"name": "FROM_TEMPLATE", "value": "yes"}],
                        "resources": {"limits": {"memory": "512Mi"}},
                    }
                ],
                "restartPolicy": "Never",
            }
        },
    },
}

TRAIN = """\
import argparse, os, mlflow
parser = argparse.ArgumentParser()
parser.add_argument("--alpha", type=float)
args = parser.parse_args()
print("training with alpha", args.alpha, "in", os.path.basename(os.getcwd()), flush=True)
print("template env:", os.environ.get("FROM_TEMPLATE"), flush=True)
given = os.environ["MLFLOW_RUN_ID"]
with mlflow.start_run():
    mlflow.log_metric("score", args.alpha * 2)
    mlflow.log_param("seen_run", given)
"""


def pod_env() -> dict[str, str]:
    """The environment of the emulator's pods: this Python (with mlflow) first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture
async def kube(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeKubernetes]:
    async with FakeKubernetes(env=pod_env(), bookmark_interval=0.5) as fake:
        monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig))
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        yield fake


@pytest.fixture
async def template(tmp_path: Path) -> Path:
    path = tmp_path / "job-template.yaml"
    await anyio.Path(path).write_text(yaml.safe_dump(TEMPLATE))
    return path


def config(kube: FakeKubernetes, template: Path, **extra: Any) -> dict[str, Any]:
    return {
        "kube-context": kube.context,
        "kube-job-template-path": str(template),
        "repository-uri": "registry.example.com/aioproj/demo",
        **extra,
    }


def mlproject(
    command: str, *, name: str = "k8s-demo", image: str = "python:3.11-slim", extra: str = ""
) -> str:
    return textwrap.dedent(f"""\
        name: {name}
        docker_env:
          image: {image}
        {extra}
        entry_points:
          main:
            parameters:
              alpha: {{type: float, default: 0.5}}
            command: "{command}"
        """)


async def wait_until(predicate: Any, limit: float = 20.0) -> None:
    with anyio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 (the emulator's state has no event)
            await anyio.sleep(0.02)


def our_objects(kube: FakeKubernetes) -> dict[str, list[str]]:
    return {
        kind: [o["metadata"]["name"] for o in kube.objects(kind, "default")]
        for kind in ("jobs", "pods", "configmaps", "secrets")
    }


async def test_run_finishes_with_the_projects_own_tracking_and_logs(
    kube: FakeKubernetes, template: Path, tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(
        tmp_path / "proj",
        mlproject("python train.py --alpha {alpha}"),
        {"train.py": TRAIN, "mlruns/ignored.txt": "not shipped"},
    )
    run = await aioproj.run(
        str(project),
        backend="kubernetes",
        parameters={"alpha": 0.7},
        backend_config=config(kube, template),
    )
    assert await run.get_status() is aioproj.RunStatus.FINISHED
    lines = [line async for line in run.logs()]
    assert "training with alpha 0.7 in code\n" in lines
    assert "template env: yes\n" in lines

    record = await read_run(tracking_uri, run.run_id)
    assert record.info.status == "FINISHED"
    artifact = Path(record.info.artifact_uri.removeprefix("file://")) / "aioproj" / "output.log"
    assert "training with alpha 0.7" in await anyio.Path(artifact).read_text()
    assert record.data.params["alpha"] == "0.7"
    assert record.data.params["seen_run"] == run.run_id
    assert record.data.metrics["score"] == pytest.approx(1.4)
    tags = record.data.tags
    assert tags["mlflow.project.backend"] == "kubernetes"
    assert tags["mlflow.project.env"] == "docker"
    assert tags["mlflow.docker.image.uri"] == "python:3.11-slim"
    job_name = tags["aioproj.kubernetes.job"]

    job = kube.get("jobs", "default", job_name)
    assert job is not None
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == "k8s-demo"
    assert container["image"] == "python:3.11-slim"
    names = [e["name"] for e in container["env"]]
    assert names[:4] == [
        "FROM_TEMPLATE",
        "MLFLOW_RUN_ID",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_ID",
    ]
    assert job["metadata"]["labels"]["aioproj.dev/run-id"] == run.run_id
    (configmap,) = kube.objects("configmaps", "default")
    assert configmap["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    # The project's tarball did not carry its mlruns directory.
    assert (
        "mlruns"
        not in kube.pod_log(
            "default", kube.objects("pods", "default")[0]["metadata"]["name"]
        ).decode()
    )
    # One list and one watch per resource; no request about this run alone.
    assert kube.count(verb="get") == 0
    assert kube.watch_connections[("jobs", "default")] == 1
    assert kube.watch_connections[("pods", "default")] == 1


async def test_failed_run_raises_and_is_recorded_failed(
    kube: FakeKubernetes, template: Path, tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(tmp_path / "proj", mlproject("echo about to fail; exit 3"))
    async with aioproj.Runner(echo="off") as runner:
        with pytest.raises(aioproj.RunFailedError, match=r"Run \(ID '.*'\) failed"):
            await runner.run(
                str(project), backend="kubernetes", backend_config=config(kube, template)
            )
    runs = await all_runs(tracking_uri)
    assert [r.info.status for r in runs] == ["FAILED"]
    (pod,) = kube.objects("pods", "default")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3


async def test_failure_detail_and_logs_reach_the_handle(
    kube: FakeKubernetes, template: Path, tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(tmp_path / "proj", mlproject("echo about to fail; exit 3"))
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            backend="kubernetes",
            synchronous=False,
            backend_config=config(kube, template),
        )
        assert not await run.wait()
        assert run.status_detail == (
            "BackoffLimitExceeded: Job has reached the specified backoff limit"
        )
        lines = [line async for line in run.logs()]
    assert "about to fail\n" in lines
    assert any("BackoffLimitExceeded" in line for line in lines)


async def test_cancel_deletes_job_pods_and_configmap_and_records_killed(
    kube: FakeKubernetes, template: Path, tmp_path: Path, tracking_uri: str
) -> None:
    pids = tmp_path / "pids"
    project = await amake_project(
        tmp_path / "proj", mlproject(f"echo $$ >> {pids}; echo started; exec sleep 60")
    )
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            backend="kubernetes",
            synchronous=False,
            backend_config=config(kube, template),
        )
        await wait_for_file(pids)
        await wait_until(lambda: run._execution.status() is aioproj.RunStatus.RUNNING)
        await run.cancel()
        assert await run.get_status() is aioproj.RunStatus.KILLED
        assert await run == aioproj.RunStatus.KILLED
    (pid,) = [int(p) for p in (await anyio.Path(pids).read_text()).split()]
    await wait_until(
        lambda: our_objects(kube) == {"jobs": [], "pods": [], "configmaps": [], "secrets": []}
    )
    with anyio.fail_after(10):
        while not await anyio.to_thread.run_sync(process_gone, pid):  # noqa: ASYNC110
            await anyio.sleep(0.05)
    assert (await read_run(tracking_uri, run.run_id)).info.status == "KILLED"
    (delete,) = [r for r in kube.requests if r.verb == "delete"]
    assert delete.resource == "jobs"  # the ConfigMap went by garbage collection


async def test_cancelling_a_synchronous_run_kills_its_job(
    kube: FakeKubernetes, template: Path, tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(tmp_path / "proj", mlproject("exec sleep 60"))
    async with aioproj.Runner(echo="off") as runner:
        with anyio.move_on_after(3):
            await runner.run(
                str(project), backend="kubernetes", backend_config=config(kube, template)
            )
    (record,) = await all_runs(tracking_uri)
    assert record.info.status == "KILLED"
    await wait_until(
        lambda: not kube.objects("jobs", "default") and not kube.objects("pods", "default")
    )


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("image", "ImagePullBackOff"),
        ("unschedulable", "Unschedulable"),
    ],
)
async def test_pods_that_cannot_start_are_visible_and_fail_after_pending_timeout(
    kube: FakeKubernetes,
    template: Path,
    tmp_path: Path,
    tracking_uri: str,
    fault: str,
    expected: str,
) -> None:
    if fault == "image":
        kube.faults.image_pull_failures.add("registry.example.com/missing:1")
    else:
        kube.faults.unschedulable = True
    project = await amake_project(
        tmp_path / "proj", mlproject("echo never", image="registry.example.com/missing:1")
    )
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            backend="kubernetes",
            synchronous=False,
            backend_config=config(kube, template, **{"pending-timeout": 1.5}),
        )
        await wait_until(lambda: expected in (run.status_detail or ""))
        assert await run.get_status() is aioproj.RunStatus.SCHEDULED
        assert not await run.wait()
        assert "pending-timeout" in (run.status_detail or "")
        lines = [line async for line in run.logs()]
    assert any(expected in line for line in lines)
    assert any("pending-timeout" in line for line in lines)
    assert (await read_run(tracking_uri, run.run_id)).info.status == "FAILED"
    await wait_until(lambda: not kube.objects("jobs", "default"))


async def test_oom_killed_container_is_reported(
    kube: FakeKubernetes, template: Path, tmp_path: Path, tracking_uri: str
) -> None:
    kube.faults.oom_images.add("hungry:1")
    project = await amake_project(tmp_path / "proj", mlproject("exec sleep 30", image="hungry:1"))
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            backend="kubernetes",
            synchronous=False,
            backend_config=config(kube, template),
        )
        assert not await run.wait()
        lines = [line async for line in run.logs()]
    assert any("OOMKilled" in line and "exit code 137" in line for line in lines)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: {}, "Backend_config file not found."),
        (
            lambda c: {k: v for k, v in c.items() if k != "kube-job-template-path"},
            "'kube-job-template-path' attribute must be specified in backend_config.",
        ),
        (
            lambda c: {**c, "kube-job-template-path": "/nonexistent/job.yaml"},
            "Could not find 'kube-job-template-path': /nonexistent/job.yaml",
        ),
        (
            lambda c: {k: v for k, v in c.items() if k != "repository-uri"},
            "Could not find 'repository-uri' in backend_config.",
        ),
        (lambda c: {**c, "pending-timeout": -1}, "'pending-timeout' in backend_config"),
    ],
    ids=["none", "no-template-key", "missing-template", "no-repository", "bad-timeout"],
)
async def test_bad_backend_config_gives_mlflows_message_and_tracks_nothing(
    kube: FakeKubernetes,
    template: Path,
    tmp_path: Path,
    tracking_uri: str,
    change: Any,
    message: str,
) -> None:
    project = await amake_project(tmp_path / "proj", mlproject("echo hi"))
    async with aioproj.Runner(echo="off") as runner:
        with pytest.raises(aioproj.ExecutionError) as caught:
            await runner.run(
                str(project), backend="kubernetes", backend_config=change(config(kube, template))
            )
    assert message in str(caught.value)
    assert await all_runs(tracking_uri) == []
    assert kube.count(verb="create") == 0


async def test_project_without_docker_env_is_refused_before_tracking(
    kube: FakeKubernetes, template: Path, tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(
        tmp_path / "proj", "name: plain\nentry_points:\n  main:\n    command: echo hi\n"
    )
    async with aioproj.Runner(echo="off") as runner:
        with pytest.raises(aioproj.BackendError, match="docker_env"):
            await runner.run(
                str(project), backend="kubernetes", backend_config=config(kube, template)
            )
    assert await all_runs(tracking_uri) == []


async def test_unknown_context_is_a_clear_error(
    kube: FakeKubernetes, template: Path, tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(tmp_path / "proj", mlproject("echo hi"))
    async with aioproj.Runner(echo="off") as runner:
        with pytest.raises(aioproj.BackendError, match="nope"):
            await runner.run(
                str(project),
                backend="kubernetes",
                backend_config=config(kube, template, **{"kube-context": "nope"}),
            )
    assert await all_runs(tracking_uri) == []


async def test_docker_env_environment_and_volumes_are_carried_over(
    kube: FakeKubernetes,
    template: Path,
    tmp_path: Path,
    tracking_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data"
    await anyio.Path(data).mkdir()
    await anyio.Path(data / "hello.txt").write_text("from a volume\n")
    monkeypatch.setenv("HOST_SECRET", "s3cr3t-value")
    text = textwrap.dedent(f"""\
        name: env-demo
        docker_env:
          image: python:3.11-slim
          volumes: ["{data}:/data:ro"]
          environment: [["DEFINED", "given"], "HOST_SECRET"]
        entry_points:
          main:
            command: "echo $DEFINED $HOST_SECRET; cat /data/hello.txt"
        """)
    project = await amake_project(tmp_path / "proj", text)
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project), backend="kubernetes", backend_config=config(kube, template)
        )
        lines = [line async for line in run.logs()]
    assert "given s3cr3t-value\n" in lines
    assert "from a volume\n" in lines
    (job,) = kube.objects("jobs", "default")
    assert "s3cr3t-value" not in json.dumps(job)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DEFINED"]["value"] == "given"
    assert env["HOST_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "HOST_SECRET"
    (secret,) = kube.objects("secrets", "default")
    assert secret["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]


async def test_twenty_concurrent_runs_share_one_watch_per_namespace(
    kube: FakeKubernetes, template: Path, tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(tmp_path / "proj", mlproject("echo run {alpha}"))
    async with aioproj.Runner(echo="off") as runner:
        runs: list[aioproj.SubmittedRun] = []

        async def start(i: int) -> None:
            runs.append(
                await runner.run(
                    str(project),
                    backend="kubernetes",
                    parameters={"alpha": i},
                    synchronous=False,
                    backend_config=config(kube, template),
                )
            )

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(start, i)
        statuses = [await run for run in runs]
    assert statuses == [aioproj.RunStatus.FINISHED] * 20
    assert kube.watch_connections == {("jobs", "default"): 1, ("pods", "default"): 1}
    assert kube.count(verb="list") == 2
    assert kube.count(verb="get") == 0  # no per-run status polls
    assert kube.count(verb="log") == 20
    records = await all_runs(tracking_uri)
    assert sorted(r.info.status for r in records) == ["FINISHED"] * 20


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
async def test_runs_survive_dropped_watches_and_410(
    kube: FakeKubernetes, template: Path, tmp_path: Path, tracking_uri: str, as_http: bool
) -> None:
    kube.faults.expired_as_http = as_http
    gate = tmp_path / "gate"
    project = await amake_project(
        tmp_path / "proj",
        mlproject(f"while [ ! -e {gate} ]; do sleep 0.05; done; echo done {{alpha}}"),
    )
    async with aioproj.Runner(echo="off") as runner:
        runs = [
            await runner.run(
                str(project),
                backend="kubernetes",
                parameters={"alpha": i},
                synchronous=False,
                backend_config=config(kube, template),
            )
            for i in range(3)
        ]
        await wait_until(lambda: len(kube.container_pids()) == 3)
        kube.drop_watches()  # a plain drop: resumed from the last resourceVersion
        await wait_until(
            lambda: (
                kube.watch_connections[("jobs", "default")] == 2
                and kube.watch_connections[("pods", "default")] == 2
            )
        )
        kube.expire_history()
        kube.drop_watches()  # now the resume is too old: 410, list again
        kube.faults.fail_next(2, status=503, path_contains="/jobs")  # and a flaky relist
        await anyio.Path(gate).touch()
        statuses = [await run for run in runs]
    assert statuses == [aioproj.RunStatus.FINISHED] * 3
    assert kube.watch_connections[("jobs", "default")] >= 3
    assert kube.count(verb="list", resource="jobs") >= 2  # listed again after the 410
    assert kube.count(verb="get") == 0


async def test_build_image_uses_the_docker_cli_and_runs_by_digest(
    kube: FakeKubernetes,
    template: Path,
    tmp_path: Path,
    tracking_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bin_dir = tmp_path / "bin"
    record = tmp_path / "docker-argv"
    await anyio.Path(bin_dir).mkdir()
    digest = "sha256:" + "ab" * 32
    script = textwrap.dedent(f"""\
        #!/bin/sh
        echo "$@" >> {record}
        case "$1" in
          image) echo '["registry.example.com/aioproj/demo@{digest}"]' ;;
        esac
        exit 0
        """)
    await anyio.Path(bin_dir / "docker").write_text(script)
    await anyio.Path(bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    project = await amake_project(tmp_path / "proj", mlproject("echo built image"))
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            backend="kubernetes",
            build_image=True,
            synchronous=False,
            backend_config=config(kube, template),
        )
        await run.wait()
    calls = [line.split() for line in (await anyio.Path(record).read_text()).splitlines()]
    assert [c[0] for c in calls] == ["info", "build", "push", "image"]
    assert calls[1][:3] == ["build", "-t", "registry.example.com/aioproj/demo"]
    assert calls[2] == ["push", "registry.example.com/aioproj/demo"]
    (job,) = kube.objects("jobs", "default")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"registry.example.com/aioproj/demo@{digest}"
    assert kube.objects("configmaps", "default") == []
    tags = (await read_run(tracking_uri, run.run_id)).data.tags
    assert tags["mlflow.docker.image.id"] == digest
    assert tags["mlflow.docker.image.uri"] == "registry.example.com/aioproj/demo"


async def test_crash_looping_pod_is_visible_and_fails_at_the_backoff_limit(
    kube: FakeKubernetes, tmp_path: Path, tracking_uri: str
) -> None:
    restarting = {**TEMPLATE, "spec": {**TEMPLATE["spec"], "backoffLimit": 2}}
    restarting["spec"]["template"] = {
        "spec": {**TEMPLATE["spec"]["template"]["spec"], "restartPolicy": "OnFailure"}
    }
    template = tmp_path / "on-failure.yaml"
    await anyio.Path(template).write_text(yaml.safe_dump(restarting))
    project = await amake_project(tmp_path / "proj", mlproject("echo crashing; exit 1"))
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            backend="kubernetes",
            synchronous=False,
            backend_config=config(kube, template),
        )
        assert not await run.wait()
        lines = [line async for line in run.logs()]
    assert any("CrashLoopBackOff" in line for line in lines)
    assert lines.count("crashing\n") >= 1
    (pod,) = kube.objects("pods", "default")
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 2


async def test_cli_runs_a_project_on_kubernetes(
    kube: FakeKubernetes, template: Path, tmp_path: Path, tracking_uri: str
) -> None:
    import subprocess

    project = await amake_project(tmp_path / "proj", mlproject("echo hello from {alpha}"))
    config_file = tmp_path / "kube.json"
    await anyio.Path(config_file).write_text(json.dumps(config(kube, template)))
    argv = [
        sys.executable,
        "-m",
        "aioproj",
        "run",
        "-b",
        "kubernetes",
        "-c",
        str(config_file),
        "-P",
        "alpha=0.25",
        str(project),
    ]
    result = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            argv, capture_output=True, text=True, timeout=60, env=dict(os.environ)
        )
    )
    assert result.returncode == 0, result.stderr
    assert "hello from 0.25" in result.stdout
    (record,) = await all_runs(tracking_uri)
    assert record.info.status == "FINISHED"
    missing = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [*argv[:6], str(project)],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ),
        )
    )
    assert missing.returncode != 0
    assert "Specify 'backend_config' when using kubernetes mode." in missing.stderr


async def test_without_a_kubeconfig_the_in_cluster_service_account_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import certifi
    from kubernetes_asyncio.config import incluster_config

    from aioproj.backends.kubernetes import _client

    account = tmp_path / "serviceaccount"
    await anyio.Path(account).mkdir()
    await anyio.Path(account / "token").write_text("pod-token")
    await anyio.Path(account / "namespace").write_text("ml-team\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(account / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", certifi.where())
    monkeypatch.setattr(_client, "_SA_NAMESPACE", str(account / "namespace"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    client = await _client.connect(None)
    try:
        assert client.host == "https://10.0.0.1:443"
        assert client.default_namespace == "ml-team"
        token = client.api.configuration.api_key["BearerToken"]
        assert token.endswith("pod-token")
    finally:
        await client.aclose()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(aioproj.BackendError, match="not a pod with a service account"):
        await _client.connect(None)


async def test_transient_api_errors_on_submission_are_retried(
    kube: FakeKubernetes, template: Path, tmp_path: Path, tracking_uri: str
) -> None:
    kube.faults.fail_next(1, status=503, path_contains="/configmaps")
    kube.faults.fail_next(1, status=429, path_contains="/jobs")
    project = await amake_project(tmp_path / "proj", mlproject("echo ok"))
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project), backend="kubernetes", backend_config=config(kube, template)
        )
    assert await run.get_status() is aioproj.RunStatus.FINISHED
    assert kube.count(verb="create", resource="configmaps") == 2
    assert len(kube.objects("jobs", "default")) == 1


async def test_a_job_the_api_refuses_fails_before_tracking(
    kube: FakeKubernetes, tmp_path: Path, tracking_uri: str
) -> None:
    bad = {
        **TEMPLATE,
        "spec": {
            **TEMPLATE["spec"],
            "template": {
                "spec": {**TEMPLATE["spec"]["template"]["spec"], "restartPolicy": "Always"}
            },
        },
    }
    template = tmp_path / "bad.yaml"
    await anyio.Path(template).write_text(yaml.safe_dump(bad))
    project = await amake_project(tmp_path / "proj", mlproject("echo never"))
    async with aioproj.Runner(echo="off") as runner:
        with pytest.raises(aioproj.BackendError, match="restartPolicy: Unsupported value"):
            await runner.run(
                str(project), backend="kubernetes", backend_config=config(kube, template)
            )
    assert our_objects(kube) == {"jobs": [], "pods": [], "configmaps": [], "secrets": []}
    assert await all_runs(tracking_uri) == []  # refused by a dry run, before tracking
    assert [r.query for r in kube.requests if r.verb == "create"] == ["dryRun=All"]


# --- the event loop ends, the Job goes on, `aioproj recover` records its end ---

# The default runner: the run is started, then the event loop ends at once.
RECOVER_DRIVER = """\
import asyncio, json, sys
import aioproj

async def main():
    run = await aioproj.run(sys.argv[1], backend="kubernetes",
                            backend_config=json.loads(sys.argv[2]), synchronous=False)
    print(run.run_id)

asyncio.run(main())
"""


async def test_a_kubernetes_run_outlives_its_loop_and_recover_records_its_end(
    kube: FakeKubernetes, template: Path, tmp_path: Path, tracking_uri: str
) -> None:
    go = tmp_path / "go"
    project = await amake_project(
        tmp_path / "proj",
        mlproject(f"sh -c 'while [ ! -e {go} ]; do sleep 0.05; done; echo done'"),
    )
    driver = tmp_path / "driver.py"
    await anyio.Path(driver).write_text(RECOVER_DRIVER)
    result = await anyio.run_process(
        [sys.executable, str(driver), str(project), json.dumps(config(kube, template))],
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert b"remote aioproj run(s) were still going" in result.stderr
    run_id = result.stdout.decode().split()[-1]
    # The Job was not deleted with the loop; the run waits, RUNNING, for its end.
    (entry,) = await journal_runs()
    assert entry.run_id == run_id
    assert [j["metadata"]["name"] for j in kube.objects("jobs", "default")] == [entry.state["job"]]
    assert (await read_run(tracking_uri, run_id)).info.status == "RUNNING"
    (still,) = await aioproj.recover()
    assert (still.status, still.action) == (None, "still running on its backend; left as is")
    assert len(await journal_runs()) == 1

    await anyio.Path(go).touch()
    await wait_until(
        lambda: any(
            c.get("type") == "Complete"
            for j in kube.objects("jobs", "default")
            for c in (j.get("status") or {}).get("conditions") or []
        )
    )
    (done,) = await aioproj.recover()
    assert done.status == "FINISHED"
    record = await read_run(tracking_uri, run_id)
    assert record.info.status == "FINISHED"
    assert "kubernetes run ended FINISHED" in record.data.tags[RECOVERED_TAG]
    assert await journal_runs() == []


async def test_a_job_lost_by_a_restarted_api_server_fails_the_run(
    template: Path, tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API server restarts with an empty store (the Job and its pods are gone): the
    shared watch lists again and the run fails, saying so. It waited forever before: the
    watch resumed from a resourceVersion the new server never reaches."""
    env = pod_env()
    project = await amake_project(tmp_path / "proj", mlproject("sleep 600"))
    first = FakeKubernetes(env=env, bookmark_interval=0.5)
    await first.start()
    try:
        monkeypatch.setenv("KUBECONFIG", str(first.kubeconfig))
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        async with aioproj.Runner(echo="off") as runner:
            run = await runner.run(
                str(project),
                backend="kubernetes",
                synchronous=False,
                backend_config=config(first, template),
            )
            await wait_until(lambda: len(first.container_pids()) == 1)
            port = first.port
            await first.aclose()
            async with FakeKubernetes(env=env, port=port, bookmark_interval=0.5) as second:
                with anyio.fail_after(60):
                    status = await run
                assert second.count(verb="list", resource="jobs") >= 1
                assert second.objects("jobs", "default") == []
            lines = [line async for line in run.logs()]
    finally:
        await first.aclose()
    assert status is aioproj.RunStatus.FAILED
    assert any("is gone" in line and "API server lost it" in line for line in lines), lines
    assert (await read_run(tracking_uri, run.run_id)).info.status == "FAILED"
