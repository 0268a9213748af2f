"""Crash injection on the remote backends: a driver killed with SIGKILL while its
Databricks submit or its Kubernetes Job creation is in flight (the service made the run,
the answer is held back by a proxy, so the journal never got the remote id). ``aioproj
recover`` still finds the remote run (Databricks: by the MLflow run id its task carries;
Kubernetes: by the Job name written ahead), leaves it while it runs, and records its
true final status with its real end time once it has ended.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import yaml

import aioproj
from aioproj.journal import RECOVERED_TAG
from aioproj.testing.databricks import FakeDatabricks
from aioproj.testing.kubernetes import FakeKubernetes

from .databricks_support import CLUSTER, ws  # noqa: F401 - fixture
from .databricks_support import project as dbx_project  # noqa: F401 - fixture
from .faultproxy import FaultProxy
from .support import amake_project, journal_runs, read_run, until

# The fault proxy runs in a thread of its own; the tests wait for it with plain calls.
pytestmark = [pytest.mark.anyio, pytest.mark.allow_blocking]

DATABRICKS_DRIVER = """\
import asyncio, json, sys
import aioproj

async def main():
    run = await aioproj.run(sys.argv[1], backend="databricks",
                            backend_config={"new_cluster": json.loads(sys.argv[2])},
                            parameters={"sleep": 1.5})
asyncio.run(main())
"""


async def _kill(proc: anyio.abc.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    await proc.aclose()


async def test_databricks_driver_killed_while_the_submit_is_in_flight(
    ws: FakeDatabricks,  # noqa: F811
    dbx_project: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The driver's temp dir, and this process's (where recover looks), are the test's own.
    temp = anyio.Path(tmp_path / "temp")
    await temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with FaultProxy(ws.host) as proxy:
        monkeypatch.setenv("DATABRICKS_HOST", proxy.url)
        submitted = proxy.hold("POST", "/jobs/runs/submit")
        driver = tmp_path / "driver.py"
        await anyio.Path(driver).write_text(DATABRICKS_DRIVER)
        proc = await anyio.open_process(
            [sys.executable, str(driver), str(dbx_project), json.dumps(CLUSTER)]
        )
        await until(submitted.is_set, limit=60)
        await _kill(proc)
        # The dead driver's code tarball is left, in a directory named for it.
        (tarballs,) = [p async for p in temp.glob(f"aioproj-databricks-{proc.pid}-*")]
        (entry,) = await journal_runs()
        assert not entry.started  # the Databricks run id never reached the journal
        run_id = entry.run_id
        assert run_id is not None
        (fake,) = ws.runs.values()
        # While the Databricks run runs, recover leaves it (and its entry) alone.
        (still,) = await aioproj.recover()
        assert not await tarballs.exists()
        assert (still.run_id, still.status) == (run_id, None)
        await until(lambda: fake.result_state is not None, limit=60)
        (ended,) = await aioproj.recover()
        assert (ended.run_id, ended.status) == (run_id, "FINISHED")
        record = await read_run(ws.tracking_uri, run_id)
        assert record.info.status == "FINISHED"
        assert "databricks run ended FINISHED" in record.data.tags[RECOVERED_TAG]
        assert record.info.end_time == fake.end_time  # the run's end, not recover's
        assert await aioproj.recover() == []


KUBE_DRIVER = """\
import asyncio, json, sys
import aioproj

async def main():
    await aioproj.run(sys.argv[1], backend="kubernetes", backend_config=json.loads(sys.argv[2]))

asyncio.run(main())
"""

TEMPLATE = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"name": "{replaced with MLflow Project name}", "namespace": "default"},
    "spec": {
        "ttlSecondsAfterFinished": 100,
        "backoffLimit": 0,
        "template": {
            "spec": {
                "containers": [{"name": "{replaced}", "image": "{replaced}", "command": []}],
                "restartPolicy": "Never",
            }
        },
    },
}


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubernetes]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    async with FakeKubernetes(env=env, bookmark_interval=0.5) as fake:
        yield fake


async def test_kubernetes_driver_killed_while_the_job_is_being_created(
    kube: FakeKubernetes, tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    go = tmp_path / "go"
    project = await amake_project(
        tmp_path / "proj",
        f"""\
        name: k8s-crash
        docker_env:
          image: python:3.11-slim
        entry_points:
          main:
            command: "sh -c 'while [ ! -e {go} ]; do sleep 0.05; done; echo done'"
        """,
    )
    template = tmp_path / "job.yaml"
    await anyio.Path(template).write_text(yaml.safe_dump(TEMPLATE))
    # Clients find the cluster in the kubeconfig: point it at a proxy to the emulator.
    config: dict[str, Any] = yaml.safe_load(await anyio.Path(kube.kubeconfig).read_text())
    server = str(config["clusters"][0]["cluster"]["server"])
    with FaultProxy(server) as proxy:
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = proxy.url
        kubeconfig = tmp_path / "kubeconfig"
        await anyio.Path(kubeconfig).write_text(yaml.safe_dump(config))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        # The first POST is the dry run that validates the Job; the second creates it.
        created = proxy.hold("POST", "/jobs", after=1)
        driver = tmp_path / "driver.py"
        await anyio.Path(driver).write_text(KUBE_DRIVER)
        backend_config = {
            "kube-context": kube.context,
            "kube-job-template-path": str(template),
            "repository-uri": "registry.example.com/aioproj/crash",
        }
        proc = await anyio.open_process(
            [sys.executable, str(driver), str(project), json.dumps(backend_config)],
            stdout=None,
            stderr=None,
        )
        await until(created.is_set, limit=60)
        await _kill(proc)
        (entry,) = await journal_runs()
        assert not entry.started
        assert entry.state["job"]  # written ahead, before the Job was created
        run_id = entry.run_id
        (still,) = await aioproj.recover()
        assert (still.run_id, still.status) == (run_id, None)
        await anyio.Path(go).touch()
        await until(lambda: _job_complete(kube), limit=60)
        (ended,) = await aioproj.recover()
        assert (ended.run_id, ended.status) == (run_id, "FINISHED")
        record = await read_run(tracking_uri, str(run_id))
        assert record.info.status == "FINISHED"
        assert "kubernetes run ended FINISHED" in record.data.tags[RECOVERED_TAG]
        (job,) = kube.objects("jobs", "default")
        completion = job["status"]["completionTime"]
        from datetime import datetime

        when = datetime.fromisoformat(completion.replace("Z", "+00:00")).timestamp() * 1000
        assert abs(record.info.end_time - when) < 1000  # the Job's end, not recover's
        assert await aioproj.recover() == []


def _job_complete(kube: FakeKubernetes) -> bool:
    return any(
        c.get("type") == "Complete"
        for j in kube.objects("jobs", "default")
        for c in (j.get("status") or {}).get("conditions") or []
    )
