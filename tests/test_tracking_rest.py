"""The REST store against a real ``mlflow server`` and against a small recording server."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from aiohttp import web

from aioproj import Runner, RunStatus
from aioproj.errors import InvalidArgumentError, TrackingError
from aioproj.tracking import FileStore, RestStore, TrackingStore, open_store
from aioproj.tracking.base import CLIENT_KEY_TAG
from aioproj.tracking.rest import RestError

from .mlflow_server import MlflowServer, free_port, read_back, write_tracked_project
from .support import download_artifact

pytestmark = pytest.mark.anyio

TOKEN = "s3cr3t-t0ken-value"


@pytest.fixture
async def rest(mlflow_server: MlflowServer) -> AsyncIterator[RestStore]:
    store = RestStore(mlflow_server.uri)
    yield store
    await store.aclose()


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


async def mlf(uri: str, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call an MlflowClient method in a worker thread."""

    def call() -> Any:
        return getattr(_client(uri), method)(*args, **kwargs)

    return await anyio.to_thread.run_sync(call)


# --- against the real server ----------------------------------------------------------------


async def test_open_store_picks_the_rest_store(mlflow_server: MlflowServer) -> None:
    store = open_store(mlflow_server.uri + "/")
    assert isinstance(store, RestStore)
    assert isinstance(store, TrackingStore)
    assert store.uri == mlflow_server.uri
    assert store.child_env() == {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    assert isinstance(open_store("databricks://prof"), RestStore)
    assert isinstance(open_store("databricks"), RestStore)
    await store.aclose()


async def test_experiment_by_name_created_once(mlflow_server: MlflowServer) -> None:
    name = f"exp-{uuid.uuid4().hex[:8]}"
    stores = [RestStore(mlflow_server.uri) for _ in range(2)]
    ids: list[str] = []

    async def resolve(store: RestStore) -> None:
        ids.append(await store.resolve_experiment(experiment_name=name, experiment_id=None))

    async with anyio.create_task_group() as tg:
        for i in range(10):  # two stores, so the server sees concurrent creates too
            tg.start_soon(resolve, stores[i % 2])
    assert len(set(ids)) == 1
    found = await mlf(mlflow_server.uri, "search_experiments", filter_string=f"name = '{name}'")
    assert [e.experiment_id for e in found] == ids[:1]
    assert await stores[0].resolve_experiment(experiment_name=None, experiment_id=ids[0]) == ids[0]
    for store in stores:
        await store.aclose()


async def test_default_experiment_and_env(rest: RestStore, monkeypatch: pytest.MonkeyPatch) -> None:
    assert await rest.resolve_experiment(experiment_name=None, experiment_id=None) == "0"
    name = f"env-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    exp_id = await rest.resolve_experiment(experiment_name=None, experiment_id=None)
    assert (await mlf(rest.uri, "get_experiment", exp_id)).name == name
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    with pytest.raises(InvalidArgumentError, match="does not match"):
        await rest.resolve_experiment(experiment_name=None, experiment_id=None)
    with pytest.raises(InvalidArgumentError):
        await rest.resolve_experiment(experiment_name="a", experiment_id="0")


async def test_missing_experiment_and_run(rest: RestStore) -> None:
    with pytest.raises(TrackingError, match="No experiment with id 987654") as info:
        await rest.resolve_experiment(experiment_name=None, experiment_id="987654")
    assert "RESOURCE_DOES_NOT_EXIST" in str(info.value)
    assert "/api/2.0/mlflow/experiments/get" in str(info.value)
    with pytest.raises(TrackingError, match="No experiment with id 987654"):
        await rest.create_run("987654", run_name=None, tags={}, params={})
    with pytest.raises(TrackingError, match="not found"):
        await rest.get_run(uuid.uuid4().hex)


async def test_deleted_experiment_is_refused(rest: RestStore) -> None:
    name = f"gone-{uuid.uuid4().hex[:8]}"
    exp_id = await rest.resolve_experiment(experiment_name=name, experiment_id=None)
    await mlf(rest.uri, "delete_experiment", exp_id)
    with pytest.raises(TrackingError, match="deleted"):
        await rest.resolve_experiment(experiment_name=None, experiment_id=exp_id)
    with pytest.raises(TrackingError, match="deleted"):
        await rest.resolve_experiment(experiment_name=name, experiment_id=None)


TAGS = {
    "mlflow.user": "alice",
    "mlflow.source.type": "PROJECT",
    "mlflow.source.name": "/src/demo",
    "mlflow.project.entryPoint": "main",
    "with/slash": "x",
    "spaces and: colons": "unicode ✓",
}
PARAMS = {"alpha": "0.5", "words": "two words", "empty": ""}


def _mlflow_view(uri: str, run_id: str) -> dict[str, Any]:
    client = _client(uri)
    run = client.get_run(run_id)
    return {
        "status": run.info.status,
        "run_name": run.info.run_name,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "lifecycle_stage": run.info.lifecycle_stage,
        "user_id": run.info.user_id,
        "tags": dict(run.data.tags),
        "params": dict(run.data.params),
        "artifact": download_artifact(client, run_id, "aioproj/output.log"),
    }


@pytest.mark.parametrize("final", ["FINISHED", "FAILED", "KILLED"])
async def test_records_match_the_file_store(
    rest: RestStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, final: str
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    file_store = FileStore(tmp_path / "mlruns")
    views = []
    for store in (rest, file_store):
        exp = await store.resolve_experiment(experiment_name="same", experiment_id=None)
        record = await store.create_run(
            exp, run_name="brisk-owl-1", tags=TAGS, params=PARAMS, start_time_ms=1_000
        )
        assert record.status == "RUNNING"
        assert record.end_time_ms is None
        assert (await store.get_run(record.run_id)).status == "RUNNING"
        await store.set_tags(record.run_id, {"late": "1"})
        await store.set_tags(record.run_id, {"late2": "2", "late3": "3"})
        await store.log_artifact_bytes(record.run_id, "aioproj/output.log", b"line 1\n")
        await store.log_artifact_bytes(
            record.run_id, "aioproj/output.log", b"line 2\n", append=True
        )
        await store.set_terminated(record.run_id, final, end_time_ms=2_000)
        back = await store.get_run(record.run_id)
        assert (back.status, back.end_time_ms, back.run_name) == (final, 2_000, "brisk-owl-1")
        assert back.params == PARAMS
        assert back.tags == {**TAGS, "mlflow.runName": "brisk-owl-1", **_LATE}
        views.append(await anyio.to_thread.run_sync(_mlflow_view, store.uri, record.run_id))
    assert views[0] == views[1]
    assert views[0]["artifact"] == b"line 1\nline 2\n"
    assert views[0]["user_id"] == "alice"


_LATE = {"late": "1", "late2": "2", "late3": "3"}


async def test_requests_for_one_run(rest: RestStore) -> None:
    exp = await rest.resolve_experiment(experiment_name=None, experiment_id=None)
    before = rest.request_count
    record = await rest.create_run(exp, run_name=None, tags=TAGS, params=PARAMS)
    await rest.log_artifact_bytes(record.run_id, "aioproj/output.log", b"out\n")
    await rest.set_terminated(record.run_id, "FINISHED")
    # runs/create (tags), runs/log-batch (params), the artifact PUT, runs/update.
    assert rest.request_count - before == 4
    assert record.run_name  # generated, as the file store does
    run = await mlf(rest.uri, "get_run", record.run_id)
    assert run.info.run_name == record.run_name == run.data.tags["mlflow.runName"]


async def test_batches_respect_mlflow_limits(rest: RestStore) -> None:
    exp = await rest.resolve_experiment(experiment_name=None, experiment_id=None)
    params = {f"p{i}": str(i) for i in range(250)}
    tags = {f"t{i}": str(i) for i in range(149)}  # + mlflow.runName = 150
    before = rest.request_count
    record = await rest.create_run(exp, run_name="many", tags=tags, params=params)
    # create (100 tags), then log-batch 100 p, 100 p, 50 p + 50 t.
    assert rest.request_count - before == 4
    run = await mlf(rest.uri, "get_run", record.run_id)
    assert dict(run.data.params) == params
    assert dict(run.data.tags) == {**tags, "mlflow.runName": "many"}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_tracked_project(tmp_path / "project")


async def test_end_to_end_run_on_the_server(
    mlflow_server: MlflowServer, project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    file_uri = (tmp_path / "mlruns").as_uri()
    seen = []
    for uri in (mlflow_server.uri, file_uri):
        async with Runner(tracking_uri=uri, echo="off") as runner:
            run = await runner.run(str(project), parameters={"alpha": 1.5}, env_manager="local")
            assert await run.get_status() is RunStatus.FINISHED
        seen.append(await anyio.to_thread.run_sync(read_back, uri, run.run_id))
    on_server, on_file = seen
    assert on_server["status"] == "FINISHED"
    assert on_server["metrics"] == {"score": 3.0}
    assert on_server["params"] == {"alpha": "1.5", "words": "two words"}
    assert on_server["tags"]["from_child"] == "yes"
    # MLflow's client prints "View run ... at: <server>" links only for a server.
    assert on_server["output"].endswith("logged\n")
    assert on_file["output"] == "logged\n"
    assert without_run_name(on_server) == without_run_name(on_file)


async def test_a_password_in_the_uri_reaches_the_child_but_not_its_output(
    mlflow_server: MlflowServer, project: Path
) -> None:
    password = "pw-in-uri-5b1f"
    uri = mlflow_server.uri.replace("http://", f"http://someone:{password}@")
    async with Runner(tracking_uri=uri, echo="off") as runner:
        run = await runner.run(str(project), parameters={"alpha": 2.0}, env_manager="local")
        lines = [line async for line in run.logs()]
    view = await anyio.to_thread.run_sync(read_back, mlflow_server.uri, run.run_id)
    assert view["metrics"] == {"score": 4.0}  # the project's own mlflow logged
    # MLflow prints "View run ... at: <tracking URI>": the URI it got has no password.
    assert "View run" in view["output"]
    assert password not in view["output"]
    assert not any(password in line for line in lines)


def without_run_name(view: dict[str, Any]) -> dict[str, Any]:
    """A read-back view without the (randomly generated) run name, and without the
    journal key that stores choosing their own run ids carry (the file store's run id
    is that key)."""
    tags = {k: v for k, v in view["tags"].items() if k not in ("mlflow.runName", CLIENT_KEY_TAG)}
    assert view["tags"]["mlflow.runName"] == view["run_name"]
    if CLIENT_KEY_TAG in view["tags"]:
        assert re.fullmatch("[0-9a-f]{32}", view["tags"][CLIENT_KEY_TAG])
    return {**view, "run_name": None, "tags": tags, "output": None}


# --- against a recording server ---------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Recorder:
    """A tiny HTTP server on 127.0.0.1: scripted replies per path, every request recorded."""

    port: int
    replies: dict[str, list[Reply]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, path: str) -> int:
        return sum(1 for _m, p, _h in self.requests if p.endswith(path))

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, dict(request.headers)))
        await request.read()
        script = self.replies.get(request.path.rsplit("/mlflow/", 1)[-1], [])
        reply = script.pop(0) if script else Reply()
        return web.Response(
            status=reply.status,
            text=json.dumps(reply.body),
            headers=reply.headers,
            content_type="application/json",
        )


async def _serve(recorder: Recorder) -> web.AppRunner:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", recorder.port).start()
    return runner


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder(free_port())
    runner = await _serve(rec)
    yield rec
    await runner.cleanup()


class Sleeps:
    """An instant ``sleep`` that remembers what it was asked to wait."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await anyio.lowlevel.checkpoint()


GOOD_RUN = {"run": {"info": {"run_id": "abc123", "experiment_id": "0", "status": "RUNNING"}}}


async def test_bearer_token(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    store = RestStore(recorder.uri)
    await store.set_terminated("abc123", "FINISHED", end_time_ms=5)
    await store.aclose()
    method, path, headers = recorder.requests[0]
    assert (method, path) == ("POST", "/api/2.0/mlflow/runs/update")
    assert headers["Authorization"] == f"Bearer {TOKEN}"


async def test_basic_auth_wins_over_token(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pa:ss")
    store = RestStore(recorder.uri)
    await store.set_tags("abc123", {"k": "v"})
    await store.aclose()
    expected = "Basic " + base64.b64encode(b"bob:pa:ss").decode()
    assert recorder.requests[0][2]["Authorization"] == expected
    assert recorder.requests[0][1].endswith("/runs/set-tag")


async def test_databricks_profile(
    recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "databrickscfg"
    await anyio.Path(cfg).write_text(
        f"[DEFAULT]\nhost = http://127.0.0.1:1\ntoken = wrong\n\n"
        f"[dev]\nhost = {recorder.uri}\ntoken = {TOKEN}\n"
    )
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(cfg))
    store = RestStore("databricks://dev")
    await store.set_terminated("abc123", "KILLED")
    await store.aclose()
    assert recorder.requests[0][2]["Authorization"] == f"Bearer {TOKEN}"
    assert store.child_env() == {"MLFLOW_TRACKING_URI": "databricks://dev"}
    monkeypatch.setenv("DATABRICKS_CONFIG_PROFILE", "nope")
    with pytest.raises(InvalidArgumentError, match=r"\[nope\]") as info:
        await RestStore("databricks").set_terminated("abc123", "KILLED")
    assert TOKEN not in str(info.value)


async def test_retry_after_on_429(recorder: Recorder) -> None:
    recorder.replies["runs/update"] = [Reply(429, headers={"Retry-After": "7"})]
    sleeps = Sleeps()
    store = RestStore(recorder.uri, sleep=sleeps)
    await store.set_terminated("abc123", "FINISHED")
    await store.aclose()
    assert recorder.count("runs/update") == 2
    assert sleeps.calls == [7.0]


async def test_backoff_on_503_then_success(recorder: Recorder) -> None:
    recorder.replies["runs/get"] = [Reply(503), Reply(502), Reply(body=GOOD_RUN)]
    sleeps = Sleeps()
    store = RestStore(recorder.uri, sleep=sleeps)
    record = await store.get_run("abc123")
    await store.aclose()
    assert record.run_id == "abc123"
    assert recorder.count("runs/get") == 3
    assert len(sleeps.calls) == 2
    assert 0.25 <= sleeps.calls[0] <= 0.5 <= sleeps.calls[1] <= 1.0  # jittered, doubling


async def test_retries_are_bounded_and_never_show_the_token(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    error = {"error_code": "TEMPORARILY_UNAVAILABLE", "message": f"echo {TOKEN}"}
    recorder.replies["runs/update"] = [Reply(503, body=error) for _ in range(10)]
    sleeps = Sleeps()
    store = RestStore(recorder.uri, sleep=sleeps)
    with pytest.raises(RestError) as info:
        await store.set_terminated("abc123", "FINISHED")
    await store.aclose()
    assert recorder.count("runs/update") == 5
    assert len(sleeps.calls) == 4
    text = str(info.value)
    assert "HTTP 503 TEMPORARILY_UNAVAILABLE" in text
    assert "/api/2.0/mlflow/runs/update" in text
    assert TOKEN not in text
    assert TOKEN not in repr(info.value)


async def test_retry_budget_caps_long_retry_after(recorder: Recorder) -> None:
    recorder.replies["runs/update"] = [Reply(429, headers={"Retry-After": "3600"})]
    sleeps = Sleeps()
    store = RestStore(recorder.uri, sleep=sleeps)
    with pytest.raises(RestError, match="429"):
        await store.set_terminated("abc123", "FINISHED")
    await store.aclose()
    assert sleeps.calls == []
    assert recorder.count("runs/update") == 1


async def test_connection_refused_then_ok() -> None:
    rec = Recorder(free_port())
    runners: list[web.AppRunner] = []

    async def sleep(seconds: float) -> None:
        if not runners:  # the server comes up during the first wait
            runners.append(await _serve(rec))

    store = RestStore(rec.uri, sleep=sleep)
    try:
        await store.set_terminated("abc123", "FINISHED")
    finally:
        await store.aclose()
        for runner in runners:
            await runner.cleanup()
    assert rec.count("runs/update") == 1
    assert store.request_count == 2


async def test_connection_refused_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    sleeps = Sleeps()
    store = RestStore(f"http://127.0.0.1:{free_port()}", sleep=sleeps)
    with pytest.raises(TrackingError, match="ConnectError") as info:
        await store.get_run("abc123")
    await store.aclose()
    assert store.request_count == 5
    assert TOKEN not in str(info.value)


async def test_auth_errors_are_not_retried(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    recorder.replies["runs/get"] = [
        Reply(401, {"error_code": "UNAUTHENTICATED", "message": "bad token"}),
        Reply(403, {"error_code": "PERMISSION_DENIED", "message": "no"}),
    ]
    store = RestStore(recorder.uri, sleep=Sleeps())
    with pytest.raises(RestError, match="HTTP 401 UNAUTHENTICATED: bad token") as info:
        await store.get_run("abc123")
    assert info.value.status_code == 401
    assert "MLFLOW_TRACKING_TOKEN" in str(info.value)
    assert TOKEN not in str(info.value)
    with pytest.raises(RestError, match="HTTP 403 PERMISSION_DENIED: no"):
        await store.get_run("abc123")
    await store.aclose()
    assert recorder.count("runs/get") == 2


async def test_run_create_is_not_retried_after_a_500(recorder: Recorder) -> None:
    recorder.replies["runs/create"] = [Reply(500), Reply(body=GOOD_RUN)]
    store = RestStore(recorder.uri, sleep=Sleeps())
    with pytest.raises(RestError, match="500"):
        await store.create_run("0", run_name="x", tags={}, params={})
    await store.aclose()
    assert recorder.count("runs/create") == 1


async def test_failed_params_mark_the_run_failed(recorder: Recorder) -> None:
    recorder.replies["runs/create"] = [Reply(body=GOOD_RUN)]
    recorder.replies["runs/log-batch"] = [Reply(400, {"error_code": "INVALID_PARAMETER_VALUE"})]
    store = RestStore(recorder.uri, sleep=Sleeps())
    with pytest.raises(RestError, match="INVALID_PARAMETER_VALUE"):
        await store.create_run("0", run_name="x", tags={}, params={"a": "1"})
    await store.aclose()
    assert [p.rsplit("/", 1)[-1] for _m, p, _h in recorder.requests] == [
        "create",
        "log-batch",
        "update",
    ]


async def test_unsupported_artifact_store(recorder: Recorder) -> None:
    run = {"run": {"info": {**GOOD_RUN["run"]["info"], "artifact_uri": "s3://b/x"}}}
    recorder.replies["runs/get"] = [Reply(body=run)]
    store = RestStore(recorder.uri)
    with pytest.raises(TrackingError, match="'s3' artifact store is not supported"):
        await store.log_artifact_bytes("abc123", "a.txt", b"x")
    await store.aclose()


async def test_redirect_is_an_error_naming_where_to_go(recorder: Recorder) -> None:
    recorder.replies["runs/get"] = [
        Reply(301, {}, {"Location": "https://tracking.example/api/2.0/mlflow/runs/get"})
    ]
    store = RestStore(recorder.uri, sleep=Sleeps())
    with pytest.raises(RestError, match=r"redirects to https://tracking\.example") as info:
        await store.get_run("abc123")
    assert info.value.status_code == 301
    await store.aclose()


# --- TLS: the CA bundles MLflow's client (requests) trusts --------------------------------------


@pytest.fixture
async def tls_recorder(tmp_path: Path) -> AsyncIterator[tuple[Recorder, Path]]:
    """The recording server over HTTPS, with a self-signed certificate for 127.0.0.1."""
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await anyio.run_process(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ]
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    await anyio.to_thread.run_sync(context.load_cert_chain, str(cert), str(key))
    # A client that refuses the certificate resets the handshake: expected here, so the
    # server's side of it is not an error of the test.
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), (ConnectionResetError, ssl.SSLError)):
            return
        (previous or asyncio.AbstractEventLoop.default_exception_handler)(loop, context)

    loop.set_exception_handler(handler)
    rec = Recorder(free_port())
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", rec.port, ssl_context=context).start()
    try:
        yield rec, cert
    finally:
        await runner.cleanup()
        loop.set_exception_handler(previous)


async def _get_experiment(uri: str) -> str:
    store = RestStore(uri)
    try:
        return await store.resolve_experiment(experiment_name=None, experiment_id="0")
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    "variable", ["MLFLOW_TRACKING_SERVER_CERT_PATH", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"]
)
async def test_a_private_ca_is_trusted_from_mlflows_and_requests_variables(
    tls_recorder: tuple[Recorder, Path], monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    rec, cert = tls_recorder
    rec.replies["experiments/get"] = [Reply(body={"experiment": {"experiment_id": "0"}})]
    uri = rec.uri.replace("http://", "https://")
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    if variable == "REQUESTS_CA_BUNDLE":  # once (retries take seconds): the check is real
        with pytest.raises(TrackingError):  # the system CAs do not know this certificate
            await _get_experiment(uri)
    monkeypatch.setenv(variable, str(cert))
    assert await _get_experiment(uri) == "0"
