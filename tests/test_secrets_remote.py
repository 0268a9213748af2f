"""Secrets never leave the environment on the remote backends either.

- Databricks, against FakeDatabricks, authenticated by DATABRICKS_TOKEN and (separately)
  by an OAuth M2M client secret;
- Kubernetes, against FakeKubernetes, with a bearer token in the kubeconfig, a
  ``docker_env`` variable copied from the host, and the tracking server's token and the
  password in its URI (a real ``mlflow server``).

Runs succeed, fail, are cancelled and are refused (bad backend_config, wrong credentials);
then every surface is searched for each secret, raw, percent-encoded and base64-encoded
(see tests/test_secrets.py): log records at DEBUG, captured stdout/stderr, errors with
their chains, tags and params, the runs' ``aioproj/output.log`` artifacts and every other
byte the tracking store persisted, each run's ``logs()``, the reprs of handles, executions,
backends and clients; for Kubernetes also every object the API server holds but the
Secret: Jobs, pods, ConfigMaps and events. The copied secret does reach the Secret and the
container.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import pytest
import yaml

import aioproj
from aioproj import Runner, RunStatus, SubmittedRun
from aioproj.backends.databricks import DatabricksBackend
from aioproj.backends.kubernetes import _HTTP_NAMES
from aioproj.backends.kubernetes._spec import plan_env
from aioproj.testing.databricks import FakeDatabricks, RunScript
from aioproj.testing.kubernetes import FakeKubernetes

from .databricks_support import CLUSTER, MLPROJECT, TRAIN
from .mlflow_server import MlflowServer
from .support import all_runs, amake_project
from .test_kubernetes_backend import TEMPLATE, wait_until
from .test_secrets import Secrets, Surfaces, _secret

pytestmark = pytest.mark.anyio


class RemoteSecrets(Secrets):
    """The secrets of one test, searched in every form :class:`Secrets` knows."""

    def __init__(self, *kinds: str) -> None:
        super().__init__()
        self.values = {kind: _secret(kind) for kind in kinds}

    def all(self) -> list[str]:
        return list(self.values.values())

    def __getitem__(self, kind: str) -> str:
        return self.values[kind]


async def _store_tree(surfaces: Surfaces, where: str, root: Path) -> int:
    return await anyio.to_thread.run_sync(surfaces.add_tree, where, root)


async def _attempt(
    runner: Runner, surfaces: Surfaces, label: str, uri: str, **kwargs: Any
) -> SubmittedRun | None:
    """One run that may be refused; it is awaited to its end, its error kept."""
    try:
        run = await runner.run(uri, synchronous=False, **kwargs)
    except aioproj.AioprojError as exc:
        surfaces.add_error(label, exc)
        return None
    await run.wait()
    return run


async def _gather_runs(surfaces: Surfaces, runs: list[SubmittedRun]) -> None:
    for run in runs:
        surfaces.add(f"logs of {run.run_id}", "".join([line async for line in run.logs()]))
        surfaces.add(f"repr of {run.run_id}", repr(run))
        surfaces.add(f"execution of {run.run_id}", repr(run._execution))
        surfaces.add(f"detail of {run.run_id}", str(run.status_detail))


async def _gather_records(
    surfaces: Surfaces, tracking_uri: str, runs: list[SubmittedRun]
) -> list[str]:
    records = {r.info.run_id: r for r in await all_runs(tracking_uri)}
    for run in runs:
        record = records[run.run_id]
        surfaces.add(f"tags of {run.run_id}", json.dumps(record.data.tags))
        surfaces.add(f"params of {run.run_id}", json.dumps(record.data.params))
    return sorted(records[run.run_id].info.status for run in runs)


# --------------------------------------------------------------------------- Databricks


@pytest.mark.parametrize("auth", ["token", "oauth"])
async def test_databricks_runs_leak_no_secret(
    auth: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level("DEBUG")
    secrets = RemoteSecrets("dapi", "oauth", "wrongdapi")
    project = await amake_project(tmp_path / "proj", MLPROJECT, {"train.py": TRAIN})
    surfaces = Surfaces()
    runs: list[SubmittedRun] = []
    for var in ("DATABRICKS_CONFIG_PROFILE", "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)
    async with FakeDatabricks(
        token=secrets["dapi"],
        client_id="sp-aioproj",
        client_secret=secrets["oauth"],
        script=RunScript(pending=0.02, terminating=0.02),
        workdir=tmp_path / "workspace",
    ) as ws:
        monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / "no-databrickscfg"))
        monkeypatch.setenv("DATABRICKS_HOST", ws.host)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "databricks")
        if auth == "token":
            monkeypatch.setenv("DATABRICKS_TOKEN", secrets["dapi"])
        else:
            monkeypatch.delenv("DATABRICKS_TOKEN", raising=False)
            monkeypatch.setenv("DATABRICKS_CLIENT_ID", "sp-aioproj")
            monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", secrets["oauth"])
        backend = DatabricksBackend(poll_interval=(0.05, 0.2))
        wrong = DatabricksBackend(poll_interval=(0.05, 0.2), token=secrets["wrongdapi"])
        try:
            async with Runner(echo="labelled") as runner:
                kwargs: dict[str, Any] = {"backend": backend, "backend_config": CLUSTER}
                for label, parameters in [
                    ("succeeds", {}),
                    ("fails", {"fail": 1}),
                ]:
                    run = await _attempt(
                        runner, surfaces, label, str(project), parameters=parameters, **kwargs
                    )
                    assert run is not None
                    runs.append(run)
                slow = await runner.run(
                    str(project), parameters={"sleep": 30}, synchronous=False, **kwargs
                )
                await wait_until(lambda: slow._execution.status() is RunStatus.RUNNING)
                await slow.cancel()
                assert await slow.wait() is False
                runs.append(slow)
                for label, config in [
                    ("no backend_config", None),
                    ("existing cluster", {"existing_cluster_id": "0101-x"}),
                    ("unknown key", {"new_cluster": CLUSTER, "token": secrets["dapi"]}),
                ]:
                    refused = await _attempt(
                        runner, surfaces, label, str(project), backend=backend,
                        backend_config=config,
                    )  # fmt: skip
                    assert refused is None
                # A wrong token: the workspace answers 401, which is the error.
                refused = await _attempt(
                    runner, surfaces, "wrong token", str(project), backend=wrong,
                    backend_config=CLUSTER,
                )  # fmt: skip
                assert refused is None
                assert any("401" in t for w, t in surfaces.texts if w.startswith("wrong"))
                await _gather_runs(surfaces, runs)
                surfaces.add("runner repr", repr(runner))
            for instance in (backend, wrong):
                surfaces.add("backend repr", repr(instance))
                workspace = instance.workspace(ws.host)
                if workspace is not None:
                    surfaces.add("workspace repr", repr(workspace))
                    surfaces.add("client repr", repr(workspace.client))
                    surfaces.add("auth repr", repr(workspace.client.auth))
                    surfaces.add("poller repr", repr(workspace.poller))
            # What the backend submitted: the task, its parameters and cluster spec.
            surfaces.add("submitted tasks", json.dumps([r.task for r in ws.runs.values()]))
            statuses = await _gather_records(surfaces, ws.tracking_uri, runs)
            assert statuses == ["FAILED", "FINISHED", "KILLED"]
            # The tracking store (tags, params, meta.yaml, aioproj/output.log), DBFS (the
            # code and bootstrap uploaded) and the runs' working directories.
            assert await _store_tree(surfaces, "workspace", ws.workdir) > 0
        finally:
            await backend.aclose()
            await wrong.aclose()
    captured = await anyio.to_thread.run_sync(capfd.readouterr)
    assert "training with alpha 0.5" in captured.out  # the output was echoed
    surfaces.add("stdout", captured.out)
    surfaces.add("stderr", captured.err)
    surfaces.add("log records", caplog.text)
    assert surfaces.leaks(secrets) == []


# --------------------------------------------------------------------------- Kubernetes

K8S_MLPROJECT = """\
name: secretive-k8s
docker_env:
  image: python:3.11-slim
  environment: [["DEFINED", "not-a-secret"], "COPIED_TOKEN"]
entry_points:
  main:
    command: "python check.py"
  fail:
    command: "python check.py 3"
  slow:
    command: "echo started; exec sleep 60"
"""

CHECK_PY = """\
import hashlib, os, sys
import mlflow
for name in ("COPIED_TOKEN", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
    value = os.environ.get(name, "")
    print(name, hashlib.sha256(value.encode()).hexdigest()[:16], flush=True)
mlflow.log_param("seen", "yes")  # the run logs into the server with the credentials
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


@pytest.fixture
async def secret_kube(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[FakeKubernetes, RemoteSecrets]]:
    secrets = RemoteSecrets("kubetoken", "copied", "mlflowtoken", "uripw")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    async with FakeKubernetes(env=env, bookmark_interval=0.5, token=secrets["kubetoken"]) as kube:
        monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        yield kube, secrets


async def test_kubernetes_runs_leak_no_secret(
    secret_kube: tuple[FakeKubernetes, RemoteSecrets],
    mlflow_server: MlflowServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    kube, secrets = secret_kube
    caplog.set_level("DEBUG")
    host = mlflow_server.uri.removeprefix("http://")
    tracking_uri = f"http://alice:{quote(secrets['uripw'], safe='')}@{host}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secrets["mlflowtoken"])
    monkeypatch.setenv("COPIED_TOKEN", secrets["copied"])
    project = await amake_project(tmp_path / "proj", K8S_MLPROJECT, {"check.py": CHECK_PY})
    template = tmp_path / "job-template.yaml"
    await anyio.Path(template).write_text(yaml.safe_dump(TEMPLATE))
    config = {
        "kube-context": kube.context,
        "kube-job-template-path": str(template),
        "repository-uri": "registry.example.com/aioproj/secretive",
    }
    wrong_kubeconfig = tmp_path / "wrong-kubeconfig.yaml"
    wrong = kube.kubeconfig_dict()
    wrong["users"][0]["user"]["token"] = secrets["kubetoken"][::-1]
    await anyio.Path(wrong_kubeconfig).write_text(yaml.safe_dump(wrong))
    surfaces = Surfaces()
    runs: list[SubmittedRun] = []
    objects: list[tuple[str, object]] = []
    copied_in_secret = False

    def snapshot() -> None:
        nonlocal copied_in_secret
        for kind in ("jobs", "pods", "configmaps", "events"):
            objects.extend((kind, o) for o in kube.objects(kind))
        for secret in kube.objects("secrets"):
            data = secret.get("data") or {}
            copied = data.get("COPIED_TOKEN")
            if copied and base64.b64decode(copied).decode() == secrets["copied"]:
                copied_in_secret = True

    async with Runner(echo="labelled", grace_period=2) as runner:
        kwargs: dict[str, Any] = {"backend": "kubernetes", "backend_config": config}
        for label, entry_point in [("succeeds", "main"), ("fails", "fail")]:
            run = await _attempt(
                runner, surfaces, label, str(project), entry_point=entry_point, **kwargs
            )
            assert run is not None
            runs.append(run)
            snapshot()
        slow = await runner.run(str(project), entry_point="slow", synchronous=False, **kwargs)
        await wait_until(lambda: slow._execution.status() is RunStatus.RUNNING)
        snapshot()
        await slow.cancel()
        assert await slow.wait() is False
        runs.append(slow)
        for label, bad in [
            ("no template", {k: v for k, v in config.items() if k != "kube-job-template-path"}),
            ("unknown context", {**config, "kube-context": "nope"}),
        ]:
            assert await _attempt(runner, surfaces, label, str(project), backend="kubernetes",
                                  backend_config=bad) is None  # fmt: skip
        # An unknown key (MLflow ignores it) is never echoed, whatever is said about it.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            unknown = {**config, "token": secrets["kubetoken"]}
            run = await _attempt(
                runner, surfaces, "unknown key", str(project), backend="kubernetes",
                backend_config=unknown,
            )  # fmt: skip
        assert run is not None
        runs.append(run)
        snapshot()
        surfaces.add("warnings", "\n".join(str(w.message) for w in caught))
        # A kubeconfig whose token the API server refuses (401).
        refused = await _attempt(
            runner, surfaces, "wrong token", str(project), backend="kubernetes",
            backend_config={**config, "kube-config-path": str(wrong_kubeconfig)},
        )  # fmt: skip
        assert refused is None
        assert any("401" in t for w, t in surfaces.texts if w.startswith("wrong"))
        await _gather_runs(surfaces, runs)
        surfaces.add("runner repr", repr(runner))
        backend = runner._backends.get("kubernetes")
        surfaces.add("backend repr", repr(backend))
        surfaces.add("clients repr", repr(getattr(backend, "_clients", None)))
    statuses = await _gather_records(surfaces, tracking_uri, runs)
    assert statuses == ["FAILED", "FINISHED", "FINISHED", "KILLED"]
    assert copied_in_secret  # where it belongs
    for kind, obj in objects:
        surfaces.add(f"kubernetes {kind}", json.dumps(obj))
    # The store's database and artifacts (aioproj/output.log) hold every tag and param.
    assert await _store_tree(surfaces, "tracking server", mlflow_server.root) > 0
    captured = await anyio.to_thread.run_sync(capfd.readouterr)
    # The container did get the values, by reference.
    assert f"COPIED_TOKEN {_digest(secrets['copied'])}" in captured.out
    assert f"MLFLOW_TRACKING_TOKEN {_digest(secrets['mlflowtoken'])}" in captured.out
    # The password of the tracking URI too, as MLflow's variable (from the Secret).
    assert f"MLFLOW_TRACKING_PASSWORD {_digest(secrets['uripw'])}" in captured.out
    surfaces.add("stdout", captured.out)
    surfaces.add("stderr", captured.err)
    surfaces.add("log records", caplog.text)
    assert surfaces.leaks(secrets) == []


def test_tracking_uri_credentials_go_to_the_secret_not_the_job() -> None:
    tracking = {
        "MLFLOW_RUN_ID": "r",
        "MLFLOW_TRACKING_URI": "https://al%40ice:p%2Fw%3A@mlflow:5000/x",
    }
    env = plan_env(tracking, (), {}, credential_names=_HTTP_NAMES)
    assert ("MLFLOW_TRACKING_URI", "https://mlflow:5000/x") in env.values
    assert dict(env.secret) == {
        "MLFLOW_TRACKING_USERNAME": "al@ice",
        "MLFLOW_TRACKING_PASSWORD": "p/w:",
    }
    # KUBE_MLFLOW_TRACKING_URI (the URI as seen from the cluster) alike.
    env = plan_env(
        tracking, (), {"KUBE_MLFLOW_TRACKING_URI": "http://u:pw@in"}, credential_names=()
    )
    assert ("MLFLOW_TRACKING_URI", "http://in") in env.values
    assert dict(env.secret) == {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "pw"}
    # The host's own user and password win, as they do in MLflow; the URI still loses its.
    host = {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "bobpw"}
    env = plan_env(tracking, (), host, credential_names=_HTTP_NAMES)
    assert ("MLFLOW_TRACKING_URI", "https://mlflow:5000/x") in env.values
    assert dict(env.secret) == host
    # No password in the URI: nothing moves.
    for uri in ("http://mlflow:5000", "http://user@mlflow", "file:///u:p@x", "databricks://p"):
        env = plan_env({"MLFLOW_TRACKING_URI": uri}, (), {}, credential_names=())
        assert ("MLFLOW_TRACKING_URI", uri) in env.values
        assert dict(env.secret) == {}
