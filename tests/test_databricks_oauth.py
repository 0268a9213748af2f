"""OAuth machine-to-machine (a service principal) and the other Databricks credentials,
resolved once for the REST tracking store and the Databricks backend."""

# The fixtures come from databricks_support; their names are reused as parameters.
# ruff: noqa: F811

from __future__ import annotations

import base64
import functools
import logging
from pathlib import Path

import anyio
import pytest

import aioproj
from aioproj._databricks_auth import OAuthM2M, WorkspaceAuth, resolve_workspace
from aioproj.backends.databricks import DatabricksClient
from aioproj.backends.databricks import resolve_workspace as backend_resolve
from aioproj.errors import BackendError, InvalidArgumentError, TrackingError
from aioproj.testing.databricks import FakeDatabricks, RunScript
from aioproj.tracking._http import resolve_creds
from aioproj.tracking.rest import RestError, RestStore

from .databricks_support import CLUSTER, clean_env, project, ws  # noqa: F401
from .support import read_run

pytestmark = pytest.mark.anyio

CLIENT_ID = "sp-7e1d"
CLIENT_SECRET = "dose-c1ient-s3cret"


@pytest.fixture
def oauth_only(ws: FakeDatabricks, monkeypatch: pytest.MonkeyPatch) -> FakeDatabricks:
    """The workspace with a service principal; the environment has its client id and
    secret and no token."""
    ws.client_id, ws.client_secret = CLIENT_ID, CLIENT_SECRET
    monkeypatch.delenv("DATABRICKS_TOKEN")
    monkeypatch.setenv("DATABRICKS_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", CLIENT_SECRET)
    return ws


def assert_no_secret(text: str, *extra: str) -> None:
    for secret in (CLIENT_SECRET, *extra):
        assert secret not in text


async def test_rest_store_tracks_with_oauth_and_refreshes_the_token(
    oauth_only: FakeDatabricks, caplog: pytest.LogCaptureFixture
) -> None:
    ws = oauth_only
    ws.oauth_token_ttl = 1.0
    caplog.set_level(logging.DEBUG)
    store = RestStore("databricks")
    try:
        experiment = await store.resolve_experiment(experiment_name="oauth", experiment_id=None)
        run_id = (
            await store.create_run(
                experiment, run_name="sp-run", tags={"k": "v"}, params={"a": "1"}
            )
        ).run_id
        await store.set_tags(run_id, {"step": "1"})
        assert ws.count("POST oidc/v1/token") == 1  # one token for all of these
        auth = store._client.auth if store._client is not None else None
        assert isinstance(auth, OAuthM2M)
        first = await auth.token()

        ws.oauth_token_ttl = 3600.0
        await anyio.sleep(1.05)  # the token is (nearly) expired: a new one is fetched first
        await store.set_tags(run_id, {"step": "2"})
        assert ws.count("POST oidc/v1/token") == 2
        second = await auth.token()

        # The workspace revokes the (hour-long) token: concurrent requests get 401, one new
        # token is fetched for all of them, and each request is sent again with it.
        ws.revoke_oauth_tokens()
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(store.set_tags, run_id, {f"c{i}": str(i)})
        assert ws.count("POST oidc/v1/token") == 3
        await store.log_artifact_bytes(run_id, "aioproj/output.log", b"hello", append=False)
        await store.set_terminated(run_id, "FINISHED")
        tokens = (first, second, await auth.token())
        assert len(set(tokens)) == 3
        assert_no_secret(repr(store) + repr(auth) + repr(store._creds), *tokens)
    finally:
        await store.aclose()
    record = await read_run(ws.tracking_uri, run_id)
    assert record.info.status == "FINISHED"
    assert record.data.params == {"a": "1"}
    assert [record.data.tags[k] for k in ("k", "step", "c0", "c5")] == ["v", "2", "0", "5"]
    assert_no_secret(caplog.text, *tokens)


async def test_rest_store_oauth_refused_names_the_client_not_the_secret(
    oauth_only: FakeDatabricks, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", "wrong-s3cret-value")
    store = RestStore("databricks")
    try:
        with pytest.raises(RestError, match="OAuth machine-to-machine") as info:
            await store.set_tags("abc", {"k": "v"})
    finally:
        await store.aclose()
    assert isinstance(info.value, TrackingError)
    assert info.value.status_code == 401
    assert CLIENT_ID in str(info.value)
    assert_no_secret(str(info.value), "wrong-s3cret-value")
    assert oauth_only.count("POST oidc/v1/token") == 1  # refused credentials: no retry


async def test_run_on_databricks_with_oauth_only(oauth_only: FakeDatabricks, project: Path) -> None:
    ws = oauth_only
    ws.script = RunScript(pending=0.01, terminating=0.01)
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project), backend="databricks", backend_config={"new_cluster": CLUSTER}
        )
        assert await run.get_status() == aioproj.RunStatus.FINISHED
    assert len(ws.runs) == 1
    record = await read_run(ws.tracking_uri, run.run_id)
    assert record.info.status == "FINISHED"
    assert record.data.tags["mlflow.project.backend"] == "databricks"
    # No token in the environment: everything went through OAuth, one token per client
    # (the backend's, the runner's tracking store, the store the backend tags runs with).
    assert ws.count("POST oidc/v1/token") == 3
    assert_no_secret(repr(run))


async def test_backend_client_refetches_a_revoked_token_once(ws: FakeDatabricks) -> None:
    ws.client_id, ws.client_secret = CLIENT_ID, CLIENT_SECRET
    auth = WorkspaceAuth(ws.host, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    client = DatabricksClient(auth)
    try:
        assert isinstance(client.oauth, OAuthM2M)
        await client.call("POST", "/api/2.0/dbfs/mkdirs", json={"path": "/sp"})
        ws.revoke_oauth_tokens()
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(
                    functools.partial(
                        client.call, "GET", "/api/2.0/dbfs/get-status", params={"path": "/sp"}
                    )
                )
        assert ws.count("POST oidc/v1/token") == 2
        assert client.oauth.fetch_count == 2
        assert_no_secret(repr(client) + client.scrub(f"x {await client.oauth.token()} x"))
    finally:
        await client.aclose()


# -- one resolution for both -----------------------------------------------------------------


@pytest.fixture
def cfg(clean_env: Path) -> Path:
    path = clean_env
    path.write_text(
        "[__settings__]\ndefault_profile = sp\n\n"
        f"[sp]\nhost = sp.example:443/\nclient_id = {CLIENT_ID}\n"
        f"client_secret = {CLIENT_SECRET}\n\n"
        "[basic]\nhost = http://basic.example\nusername = bob\npassword = pa:ss\n"
        "insecure = true\n"
    )
    return path


def test_tracking_and_backend_resolve_the_same_credentials(cfg: Path) -> None:
    for uri, kind in (("databricks", "oauth-m2m"), ("databricks://basic", "basic")):
        workspace = resolve_workspace(uri)
        backend = backend_resolve(uri)
        creds = resolve_creds(uri)
        assert workspace == backend
        assert workspace.kind == kind
        assert (creds.host, creds.verify) == (workspace.host, workspace.verify)
        assert_no_secret(repr(workspace) + repr(creds), "pa:ss")
    sp = resolve_creds("databricks")
    assert (sp.host, sp.client_id, sp.client_secret) == (
        "https://sp.example",
        CLIENT_ID,
        CLIENT_SECRET,
    )
    assert sp.auth_header() is None
    basic = resolve_creds("databricks:basic")
    assert basic.verify is False
    assert basic.auth_header() == "Basic " + base64.b64encode(b"bob:pa:ss").decode()
    assert "pa:ss" in basic.secrets()


def test_errors_are_each_callers_own_and_hold_no_secret(
    cfg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABRICKS_CONFIG_PROFILE", "nope")
    with pytest.raises(InvalidArgumentError, match=r"Tracking URI 'databricks'.*\[nope\]"):
        resolve_creds("databricks")
    with pytest.raises(BackendError, match="has no nope profile configured"):
        backend_resolve("databricks")
    cfg.write_text(f"[DEFAULT]\nhost = h.example\nclient_secret = {CLIENT_SECRET}\n[broken\n")
    monkeypatch.delenv("DATABRICKS_CONFIG_PROFILE")
    with pytest.raises(InvalidArgumentError, match="Cannot read the Databricks config") as err:
        resolve_creds("databricks")
    assert_no_secret(str(err.value))
    cfg.write_text(f"[DEFAULT]\nhost = h.example\nclient_secret = {CLIENT_SECRET}\n")
    with pytest.raises(InvalidArgumentError, match="DATABRICKS_CLIENT_ID") as err:
        resolve_creds("databricks")
    assert_no_secret(str(err.value))
