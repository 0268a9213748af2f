"""The emulators against a hostile client: every malformed or hostile request gets the
status a real server gives (400, 401, 413), never a 500, and a flood of unauthenticated
requests to unique paths leaves the emulator's memory flat."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator

import httpx
import pytest

from aioproj.testing._json import MAX_JSON_DEPTH
from aioproj.testing.databricks import FakeDatabricks
from aioproj.testing.kubernetes import FakeKubernetes

pytestmark = pytest.mark.anyio

TOKEN = "emulator-token"

#: Bodies a hostile client sends; each must be a 400.
HOSTILE_JSON = {
    # The C scanner raises RecursionError on this (a 500 before).
    "lists-100000-deep": "[" * 100_000 + "]" * 100_000,
    # Parses, then the handlers' recursion (copies, merges) hits the limit.
    "objects-500-deep": '{"a": ' * 500 + "1" + "}" * 500,
    "just-past-the-limit": "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1),
    "not-json": "{not json",
    "not-utf8": b"\xff\xfe{}",
}


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
async def databricks() -> AsyncIterator[FakeDatabricks]:
    async with FakeDatabricks(token=TOKEN) as workspace:
        yield workspace


@pytest.fixture
async def kubernetes() -> AsyncIterator[FakeKubernetes]:
    async with FakeKubernetes(token=TOKEN) as cluster:
        yield cluster


def _client(base_url: str, token: str | None = TOKEN) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60)


# --------------------------------------------------------------------------- Databricks


@pytest.mark.parametrize("body", sorted(HOSTILE_JSON))
@pytest.mark.parametrize(
    "endpoint", ["/api/2.1/jobs/runs/submit", "/api/2.0/mlflow/runs/create", "/api/2.0/dbfs/put"]
)
async def test_databricks_answers_hostile_json_with_400(
    databricks: FakeDatabricks, endpoint: str, body: str
) -> None:
    raw = HOSTILE_JSON[body]
    async with _client(databricks.host) as client:
        response = await client.post(endpoint, content=raw)
    assert response.status_code == 400, response.text
    assert response.json()["error_code"] == "MALFORMED_REQUEST"


async def test_databricks_answers_a_body_too_large_with_413(databricks: FakeDatabricks) -> None:
    async with _client(databricks.host) as client:
        response = await client.post("/api/2.1/jobs/runs/submit", content=b" " * (64 * 1024**2 + 1))
    assert response.status_code == 413


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", "Bearer \u00e9t\u00e9", "Basic dXNlcjpwdw==", "Bearer", "bearer  x"],
)
async def test_databricks_answers_bad_credentials_with_401(
    databricks: FakeDatabricks, authorization: str | None
) -> None:
    headers = {"Authorization": authorization.encode()} if authorization else {}
    async with httpx.AsyncClient(base_url=databricks.host) as client:
        response = await client.get("/api/2.1/jobs/runs/list", headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["error_code"] == "UNAUTHENTICATED"
    assert databricks.requests == {}  # nothing kept of a refused request


@pytest.mark.slow
async def test_databricks_memory_stays_flat_under_an_unauthenticated_flood(
    databricks: FakeDatabricks,
) -> None:
    """20,000 unauthenticated requests to unique paths grew it from 54 to 194 MB: it kept
    each path as a key of ``requests`` and in ``request_log``. Now a refused request
    leaves one counter behind."""
    padding = "x" * 4000
    async with _client(databricks.host, token=None) as client:
        for i in range(200):  # warm up aiohttp and httpx
            await client.get(f"/api/2.1/warm/{i}")
        gc.collect()
        before = _rss_mb()
        for i in range(5_000):
            response = await client.get(f"/api/2.1/flood/{i}/{padding}")
            assert response.status_code == 401
    gc.collect()
    assert databricks.requests == {}
    assert len(databricks.request_log) == 0
    assert databricks.unauthenticated["GET"] == 5_200
    # Keeping each 4 KB path (twice) grew the old emulator by 40 MB over these requests.
    assert _rss_mb() - before < 15


# --------------------------------------------------------------------------- Kubernetes

JOBS = "/apis/batch/v1/namespaces/default/jobs"


@pytest.mark.parametrize("body", sorted(HOSTILE_JSON))
@pytest.mark.parametrize("method", ["POST", "DELETE", "PATCH"])
async def test_kubernetes_answers_hostile_json_with_400(
    kubernetes: FakeKubernetes, method: str, body: str
) -> None:
    path = JOBS if method == "POST" else f"{JOBS}/some-job"
    if method != "POST":  # the object must exist for a patch or a delete to read the body
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "some-job"},
            "spec": {
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "m", "image": "x", "command": ["sleep", "60"]}],
                    }
                }
            },
        }
        async with _client(kubernetes.url) as client:
            created = await client.post(JOBS, json=job)
            assert created.status_code == 201, created.text
    headers = {"Content-Type": "application/merge-patch+json"}
    async with _client(kubernetes.url) as client:
        response = await client.request(method, path, content=HOSTILE_JSON[body], headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["reason"] == "BadRequest"


async def test_kubernetes_answers_a_body_too_large_with_413(kubernetes: FakeKubernetes) -> None:
    async with _client(kubernetes.url) as client:
        response = await client.post(JOBS, content=b" " * (8 * 1024 * 1024 + 1))
    assert response.status_code == 413


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", "Bearer \u00e9t\u00e9", "Basic dXNlcjpwdw=="]
)
async def test_kubernetes_answers_bad_credentials_with_401(
    kubernetes: FakeKubernetes, authorization: str | None
) -> None:
    headers = {"Authorization": authorization.encode()} if authorization else {}
    async with httpx.AsyncClient(base_url=kubernetes.url) as client:
        response = await client.get(JOBS, headers=headers)
    assert response.status_code == 401, response.text
    assert len(kubernetes.requests) == 0


@pytest.mark.slow
async def test_kubernetes_memory_stays_flat_under_an_unauthenticated_flood(
    kubernetes: FakeKubernetes,
) -> None:
    padding = "x" * 4000
    async with _client(kubernetes.url, token=None) as client:
        for i in range(200):
            await client.get(f"/api/v1/namespaces/warm/pods/{i}")
        gc.collect()
        before = _rss_mb()
        for i in range(5_000):
            response = await client.get(f"/api/v1/namespaces/flood/pods/{i}-{padding}")
            assert response.status_code == 401
    gc.collect()
    assert len(kubernetes.requests) == 0
    assert _rss_mb() - before < 15
    assert kubernetes.requests.maxlen is not None  # an open emulator keeps a bounded log


async def test_kubernetes_answers_a_watch_from_a_version_it_never_made_as_a_real_server(
    kubernetes: FakeKubernetes,
) -> None:
    """A client resuming after the API server lost its state asks for a version newer than
    any it has: "Too large resource version" (504, ResourceVersionTooLarge), on which
    client-go and aioproj list again, instead of a stream that stays silent forever."""
    async with _client(kubernetes.url) as client:
        listed = await client.get(JOBS)
        current = int(listed.json()["metadata"]["resourceVersion"])
        response = await client.get(
            JOBS, params={"watch": "true", "resourceVersion": str(current + 1000)}
        )
    assert response.status_code == 504, response.text
    status = response.json()
    assert status["reason"] == "Timeout"
    assert status["message"].startswith("Too large resource version")
    assert status["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"
