"""The Databricks backend's parts: validation, auth, state mapping, code tarball, client."""

# The fixtures come from databricks_support; their names are reused as parameters.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import logging
import tarfile
import tempfile
from pathlib import Path

import anyio
import pytest

import aioproj
from aioproj.backends.databricks import (
    DatabricksApiError,
    DatabricksBackend,
    DatabricksClient,
    WorkspaceAuth,
    map_state,
    parse_backend_config,
    resolve_workspace,
)
from aioproj.backends.databricks._code import build_archive
from aioproj.errors import BackendError, InvalidArgumentError
from aioproj.handle import RunStatus
from aioproj.testing.databricks import FakeDatabricks, RunScript

from .databricks_support import (  # noqa: F401
    CLUSTER,
    MLPROJECT,
    TRAIN,
    backend,
    clean_env,
    project,
    ws,
)
from .support import all_runs, amake_project

pytestmark = pytest.mark.anyio

# -- state mapping -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"life_cycle_state": "QUEUED"}, (RunStatus.SCHEDULED, False)),
        ({"life_cycle_state": "PENDING"}, (RunStatus.SCHEDULED, False)),
        ({"life_cycle_state": "RUNNING"}, (RunStatus.RUNNING, False)),
        ({"life_cycle_state": "TERMINATING"}, (RunStatus.RUNNING, False)),
        ({"life_cycle_state": "SOMETHING_NEW"}, (RunStatus.RUNNING, False)),
        ({"life_cycle_state": "TERMINATED", "result_state": "SUCCESS"}, (RunStatus.FINISHED, True)),
        ({"life_cycle_state": "TERMINATED", "result_state": "FAILED"}, (RunStatus.FAILED, True)),
        ({"life_cycle_state": "TERMINATED", "result_state": "TIMEDOUT"}, (RunStatus.FAILED, True)),
        ({"life_cycle_state": "TERMINATED", "result_state": "CANCELED"}, (RunStatus.KILLED, True)),
        (
            {"life_cycle_state": "TERMINATED", "result_state": "MAXIMUM_CONCURRENT_RUNS_REACHED"},
            (RunStatus.FAILED, True),
        ),
        ({"life_cycle_state": "TERMINATED"}, (RunStatus.FAILED, True)),
        ({"life_cycle_state": "INTERNAL_ERROR"}, (RunStatus.FAILED, True)),
        ({"life_cycle_state": "SKIPPED"}, (RunStatus.FAILED, True)),
    ],
)
def test_map_state(state: dict[str, str], expected: tuple[RunStatus, bool]) -> None:
    assert map_state({"state": state}) == expected


def test_map_state_reads_the_v2_status_when_state_is_missing() -> None:
    done = {"state": "TERMINATED", "termination_details": {"code": "SUCCESS"}}
    assert map_state({"status": done}) == (RunStatus.FINISHED, True)
    cancelled = {"state": "TERMINATED", "termination_details": {"code": "USER_CANCELED"}}
    assert map_state({"status": cancelled}) == (RunStatus.KILLED, True)
    assert map_state({"status": {"state": "RUNNING"}}) == (RunStatus.RUNNING, False)


# -- backend config ----------------------------------------------------------------------


def test_backend_config_forms() -> None:
    flat = parse_backend_config(CLUSTER)
    assert flat.new_cluster == CLUSTER
    assert flat.libraries == ()
    full = parse_backend_config(
        {"new_cluster": CLUSTER, "libraries": [{"pypi": {"package": "six"}}], "timeout_seconds": 9}
    )
    assert full.new_cluster == CLUSTER
    assert full.libraries == ({"pypi": {"package": "six"}},)
    assert full.timeout_seconds == 9


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (None, "Backend spec must be provided when launching MLflow project runs on Databricks."),
        ({}, "The Databricks backend config is empty"),
        ({"new_cluster": "big"}, "'new_cluster' must be an object"),
        ({"new_cluster": CLUSTER, "libraries": "six"}, "'libraries' must be a list"),
        ({"new_cluster": CLUSTER, "timeout_seconds": -1}, "'timeout_seconds' must be"),
        ({"new_cluster": CLUSTER, "cluster_spec": {}}, "Unknown key\\(s\\) \\['cluster_spec'\\]"),
        ({"new_cluster": CLUSTER, "code_volume": "/dbfs/x"}, "'code_volume' must be a Unity"),
        ({"new_cluster": CLUSTER, "code_volume": "/Volumes/a/b"}, "'code_volume' must be a Unity"),
    ],
)
def test_backend_config_errors(config: dict[str, object] | None, message: str) -> None:
    with pytest.raises(BackendError, match=message):
        parse_backend_config(config)


async def _assert_nothing_made(ws: FakeDatabricks) -> None:
    assert await all_runs(ws.tracking_uri) == []
    assert ws.count("jobs/") == 0
    assert ws.count("dbfs/") == 0


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (None, BackendError, "Backend spec must be provided when launching MLflow project runs"),
        ({"existing_cluster_id": "0101-x"}, InvalidArgumentError, "against existing clusters"),
        ({}, BackendError, "The Databricks backend config is empty"),
    ],
)
async def test_bad_backend_config_tracks_nothing(
    ws: FakeDatabricks,
    project: Path,
    backend: DatabricksBackend,
    config: dict[str, object] | None,
    error: type[Exception],
    message: str,
) -> None:
    async with aioproj.Runner(echo="off") as runner:
        with pytest.raises(error, match=message):
            await runner.run(str(project), backend=backend, backend_config=config)
    await _assert_nothing_made(ws)


async def test_local_tracking_uri_is_refused_with_mlflows_message(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend, tmp_path: Path
) -> None:
    store = (tmp_path / "mlruns").as_uri()
    async with aioproj.Runner(echo="off", tracking_uri=store) as runner:
        with pytest.raises(BackendError, match="tracking URI must be of the form 'databricks'"):
            await runner.run(str(project), backend=backend, backend_config=CLUSTER)
    assert not await anyio.Path(tmp_path / "mlruns").exists()
    await _assert_nothing_made(ws)


async def test_docker_project_is_refused(
    ws: FakeDatabricks, backend: DatabricksBackend, tmp_path: Path
) -> None:
    docker = await amake_project(
        tmp_path / "docker",
        "name: d\ndocker_env:\n  image: python:3.11\nentry_points:\n  main:\n    command: 'true'\n",
    )
    async with aioproj.Runner(echo="off") as runner:
        with pytest.raises(
            BackendError,
            match=r"Running docker-based projects on Databricks is not yet supported\.",
        ):
            await runner.run(str(docker), backend=backend, backend_config=CLUSTER)
    await _assert_nothing_made(ws)


async def test_env_manager_other_than_local_is_refused(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    async with aioproj.Runner(echo="off") as runner:
        with pytest.raises(BackendError, match="env_manager='virtualenv' is not supported"):
            await runner.run(
                str(project), backend=backend, backend_config=CLUSTER, env_manager="virtualenv"
            )
    await _assert_nothing_made(ws)


async def test_missing_credentials_say_where_aioproj_looked(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABRICKS_TOKEN")
    async with aioproj.Runner(echo="off", tracking_uri="http://127.0.0.1:9") as runner:
        with pytest.raises(BackendError, match="No Databricks workspace credentials found"):
            await runner.run(str(project), backend=backend, backend_config=CLUSTER)
    await _assert_nothing_made(ws)


async def test_backend_config_json_file(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend, tmp_path: Path
) -> None:
    ws.script = RunScript(pending=0.01, terminating=0.01, outcome="SUCCESS")
    path = tmp_path / "cluster.json"
    libraries = [{"pypi": {"package": "mlflow==3.17.2"}}]
    await anyio.Path(path).write_text(json.dumps({"new_cluster": CLUSTER, "libraries": libraries}))
    async with aioproj.Runner(echo="off") as runner:
        await runner.run(str(project), backend=backend, backend_config=str(path))
    (fake,) = ws.runs.values()
    assert fake.task["new_cluster"] == CLUSTER
    assert fake.task["libraries"] == libraries  # an mlflow library given is not doubled


# -- secrets -------------------------------------------------------------------------------


async def test_token_never_appears_in_errors_logs_reprs_or_the_run(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "dapi-SECRET-0123456789abcdef"
    caplog.set_level(logging.DEBUG)
    async with FakeDatabricks(token=secret, script=RunScript(pending=0.01)) as ws:
        monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("DATABRICKS_HOST", ws.host)
        monkeypatch.setenv("DATABRICKS_TOKEN", secret)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "databricks")
        good = DatabricksBackend(poll_interval=(0.05, 0.2))
        bad = DatabricksBackend(poll_interval=(0.05, 0.2), token=secret + "-wrong")
        texts: list[str] = []
        try:
            async with aioproj.Runner(echo="off") as runner:
                run = await runner.run(
                    str(project),
                    backend=good,
                    backend_config=CLUSTER,
                    parameters={"fail": 1},
                    synchronous=False,
                )
                await run.wait()
                texts.append("".join([line async for line in run.logs()]))
                with pytest.raises(BackendError) as refused:
                    await runner.run(str(project), backend=bad, backend_config=CLUSTER)
                texts.append(str(refused.value))
                texts.append(repr(refused.value))
                assert "HTTP 401" in str(refused.value)
            texts += [repr(good), repr(bad), repr(good.workspace(ws.host))]
            workspace = good.workspace(ws.host)
            assert workspace is not None
            texts.append(repr(workspace.client))
            texts.append(repr(workspace.client.auth))
            texts.append(json.dumps([r.task for r in ws.runs.values()]))
            records = await all_runs(ws.tracking_uri)
            texts += [json.dumps(r.data.tags) + json.dumps(r.data.params) for r in records]
        finally:
            await good.aclose()
            await bad.aclose()
    texts.append(caplog.text)
    for text in texts:
        assert secret not in text


# -- workspace auth ------------------------------------------------------------------------


def test_auth_from_environment(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABRICKS_HOST", "adb-1.azuredatabricks.net:443/")
    monkeypatch.setenv("DATABRICKS_TOKEN", "dapi-env")
    auth = resolve_workspace("databricks")
    assert auth.host == "https://adb-1.azuredatabricks.net"
    assert auth.token == "dapi-env"
    assert "dapi-env" not in repr(auth)


def test_auth_oauth_m2m_from_environment(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABRICKS_HOST", "https://h.cloud.databricks.com")
    monkeypatch.setenv("DATABRICKS_CLIENT_ID", "sp-1")
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", "dose-secret")
    auth = resolve_workspace(None)
    assert (auth.kind, auth.client_id, auth.client_secret) == ("oauth-m2m", "sp-1", "dose-secret")
    assert "dose-secret" not in repr(auth)


def test_auth_profiles(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env.write_text(
        "[DEFAULT]\nhost = https://default.example\ntoken = dapi-default\n\n"
        "[staging]\nhost = https://staging.example\ntoken = dapi-staging\n\n"
        "[sp]\nhost = https://sp.example\nclient_id = cid\nclient_secret = csecret\n"
    )
    assert resolve_workspace("databricks").token == "dapi-default"
    assert resolve_workspace("databricks://staging").host == "https://staging.example"
    assert resolve_workspace("databricks://sp").kind == "oauth-m2m"
    monkeypatch.setenv("DATABRICKS_CONFIG_PROFILE", "staging")
    assert resolve_workspace("databricks").token == "dapi-staging"
    with pytest.raises(BackendError, match="has no nowhere profile configured"):
        resolve_workspace("databricks://nowhere")


def test_auth_settings_default_profile_and_env_precedence(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_env.write_text(
        "[__settings__]\ndefault_profile = team\n\n[team]\nhost = https://team.example\n"
        "token = dapi-team\n"
    )
    assert resolve_workspace("databricks").host == "https://team.example"
    monkeypatch.setenv("DATABRICKS_HOST", "https://env.example")
    auth = resolve_workspace("databricks")
    assert (auth.host, auth.token) == ("https://env.example", "dapi-team")


def test_auth_missing_credentials(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABRICKS_HOST", "https://h.example")
    with pytest.raises(BackendError, match="DATABRICKS_TOKEN"):
        resolve_workspace("databricks")


# -- code tarball --------------------------------------------------------------------------


async def test_code_tarball_is_deterministic_and_leaves_out_mlruns(tmp_path: Path) -> None:
    one = await amake_project(tmp_path / "one", MLPROJECT, {"train.py": TRAIN, "mlruns/x": "run"})
    two = await amake_project(tmp_path / "two", MLPROJECT, {"train.py": TRAIN})
    await anyio.to_thread.run_sync(lambda: __import__("os").utime(two / "train.py", (1, 1)))
    first = await build_archive(one, tmp_path / "out")
    second = await build_archive(two, tmp_path / "out")
    assert first.sha256 == second.sha256
    assert first.path.name == f"{first.sha256}.tar.gz"

    def names() -> list[tuple[str, int]]:
        with tarfile.open(first.path) as tar:
            return [(m.name, m.mtime) for m in tar.getmembers()]

    assert await anyio.to_thread.run_sync(names) == [
        ("mlflow-project", 0),
        ("mlflow-project/MLproject", 0),
        ("mlflow-project/train.py", 0),
    ]
    await anyio.Path(two / "extra.txt").write_text("more")
    third = await build_archive(two, tmp_path / "out")
    assert third.sha256 != first.sha256


# -- the client ----------------------------------------------------------------------------


async def test_client_maps_errors_and_does_not_repeat_a_lost_post(ws: FakeDatabricks) -> None:
    client = DatabricksClient(WorkspaceAuth(ws.host, token=ws.token), retry_timeout=2)
    try:
        with pytest.raises(
            DatabricksApiError, match="INVALID_PARAMETER_VALUE: Run 7 does not exist"
        ) as err:
            await client.call("GET", "/api/2.2/jobs/runs/get", params={"run_id": "7"})
        assert (err.value.status_code, err.value.error_code) == (400, "INVALID_PARAMETER_VALUE")
        ws.inject("POST dbfs/mkdirs", drop=True)
        with pytest.raises(DatabricksApiError, match="failed after 1 attempt"):
            await client.call("POST", "/api/2.0/dbfs/mkdirs", json={"path": "/a"})
        ws.inject("POST dbfs/mkdirs", drop=True)
        await client.call("POST", "/api/2.0/dbfs/mkdirs", json={"path": "/a"}, repeatable=True)
        assert ws.count("POST dbfs/mkdirs") == 3
        ws.inject("GET dbfs/get-status", status=503, retry_after=1, times=100)
        with pytest.raises(DatabricksApiError, match=r"after \d+ attempts: HTTP 503"):
            await client.call("GET", "/api/2.0/dbfs/get-status", params={"path": "/a"})
    finally:
        await client.aclose()


async def test_oauth_m2m_token_is_fetched_once_and_refreshed(ws: FakeDatabricks) -> None:
    ws.client_id, ws.client_secret, ws.oauth_token_ttl = "sp-1", "sp-secret", 1.0
    auth = WorkspaceAuth(ws.host, client_id="sp-1", client_secret="sp-secret")
    client = DatabricksClient(auth)
    try:
        for _ in range(3):
            await client.call("POST", "/api/2.0/dbfs/mkdirs", json={"path": "/m2m"})
        assert ws.count("POST oidc/v1/token") == 1
        await anyio.sleep(1.1)
        await client.call("GET", "/api/2.0/dbfs/get-status", params={"path": "/m2m"})
        assert ws.count("POST oidc/v1/token") == 2
        bad = DatabricksClient(WorkspaceAuth(ws.host, client_id="sp-1", client_secret="nope"))
        try:
            with pytest.raises(DatabricksApiError, match="OAuth machine-to-machine") as err:
                await bad.call("GET", "/api/2.0/dbfs/get-status", params={"path": "/m2m"})
            assert "nope" not in str(err.value)
        finally:
            await bad.aclose()
    finally:
        await client.aclose()


async def test_poller_sends_no_request_per_run(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    ws.script = RunScript(pending=0.3, running=0.6, terminating=0.05, outcome="SUCCESS")
    count = 40
    async with aioproj.Runner(echo="off") as runner:
        runs: list[aioproj.SubmittedRun] = []

        async def start() -> None:
            runs.append(
                await runner.run(
                    str(project), backend=backend, backend_config=CLUSTER, synchronous=False
                )
            )

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(start)
        assert [await r for r in runs] == [RunStatus.FINISHED] * count
    workspace = backend.workspace(ws.host)
    assert workspace is not None
    rounds = workspace.poller.round_requests
    # At most: one completed-runs page per 25 runs ending, one active sweep page per 25.
    assert rounds
    assert max(rounds) <= 2 * (1 + count // 25)
    assert sum(rounds) / len(rounds) < 3


async def test_runs_started_together_share_one_temporary_directory_and_leave_none(
    ws: FakeDatabricks,
    project: Path,
    backend: DatabricksBackend,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every run of a burst found no directory for the code tarballs yet; each used to make
    # one, and all but the last were left in the temp dir for good.
    temp = anyio.Path(tmp_path / "temp")
    await temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    ws.script = RunScript(pending=0.05, running=0.1, terminating=0.01, outcome="SUCCESS")
    async with aioproj.Runner(echo="off") as runner:
        runs = await asyncio.gather(
            *(
                runner.run(str(project), backend=backend, backend_config=CLUSTER, synchronous=False)
                for _ in range(20)
            )
        )
        assert len([p async for p in temp.glob("aioproj-databricks-*")]) == 1
        assert [await r for r in runs] == [RunStatus.FINISHED] * 20
    await backend.aclose()
    assert [p async for p in temp.iterdir()] == []


async def test_a_run_deleted_on_the_workspace_fails_alone(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    ws.script = RunScript(pending=0.05, running=1.5, terminating=0.02, outcome="SUCCESS")
    async with aioproj.Runner(echo="off") as runner:
        doomed = await runner.run(
            str(project), backend=backend, backend_config=CLUSTER, synchronous=False
        )
        other = await runner.run(
            str(project), backend=backend, backend_config=CLUSTER, synchronous=False
        )
        first = min(ws.runs)
        ws.runs[first].deleted = True  # purged by an admin while running
        assert await doomed == RunStatus.FAILED
        assert isinstance(doomed.error, DatabricksApiError)
        assert "does not exist" in str(doomed.error)
        assert await other == RunStatus.FINISHED
