"""A real ``mlflow server`` behind a proxy that loses answers and refuses for a while.

Run creation is idempotent (a ``runs/create`` whose answer is lost never leaves a ghost
or a duplicate), a server down for a few seconds delays runs without failing them, and
live metrics come back after an outage.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

import aioproj
from aioproj import Runner, RunStatus
from aioproj.tracking import RestStore
from aioproj.tracking.base import CLIENT_KEY_TAG

from .faultproxy import FaultProxy
from .mlflow_server import MlflowServer
from .support import make_project, mlflow_client

pytestmark = [pytest.mark.anyio, pytest.mark.allow_blocking]


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    with FaultProxy(mlflow_server.uri) as proxy:
        yield proxy


def _runs(uri: str, experiment: str) -> list[Any]:
    client = mlflow_client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return list(client.search_runs([found.experiment_id], run_view_type=3))


def _creates(proxy: FaultProxy) -> int:
    return sum(1 for method, path in proxy.requests if path.endswith("/runs/create"))


async def test_a_create_whose_answer_is_lost_is_found_not_repeated(
    proxy: FaultProxy, mlflow_server: MlflowServer
) -> None:
    store = RestStore(proxy.url, sleep=lambda _: anyio.lowlevel.checkpoint())
    experiment = await store.resolve_experiment(
        experiment_name=f"lost-{uuid.uuid4().hex[:8]}", experiment_id=None
    )
    key = uuid.uuid4().hex
    proxy.drop_answer("POST", "/runs/create")
    try:
        record = await store.create_run(
            experiment, run_name="r", tags={"t": "1"}, params={"p": "2"}, client_key=key
        )
    finally:
        await store.aclose()
    assert _creates(proxy) == 1  # found by its key, not created again
    client = mlflow_client(mlflow_server.uri)
    runs = await anyio.to_thread.run_sync(lambda: client.search_runs([experiment], run_view_type=3))
    assert [r.info.run_id for r in runs] == [record.run_id]
    assert runs[0].data.tags[CLIENT_KEY_TAG] == key
    assert runs[0].data.params == {"p": "2"}


async def test_a_create_lost_and_not_made_is_sent_again(proxy: FaultProxy) -> None:
    """The connection drops before the server sees the request: one run, created later."""
    store = RestStore(proxy.url, sleep=lambda _: anyio.sleep(0.3))
    name = f"refused-{uuid.uuid4().hex[:8]}"
    experiment = await store.resolve_experiment(experiment_name=name, experiment_id=None)
    proxy.refuse(1.0)
    try:
        record = await store.create_run(
            experiment, run_name="r", tags={}, params={}, client_key=uuid.uuid4().hex
        )
    finally:
        await store.aclose()
    runs = await anyio.to_thread.run_sync(_runs, proxy.target, name)
    assert [r.info.run_id for r in runs] == [record.run_id]


MLPROJECT = """\
name: faults
entry_points:
  main:
    parameters:
      seconds: {type: float, default: 0}
    command: "sleep {seconds}"
"""


async def test_runs_started_through_lost_answers_leave_no_ghost(
    proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10 runs; the answers to 3 creates are lost: 10 runs recorded, all FINISHED."""
    experiment = f"ghosts-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    project = make_project(tmp_path / "p", MLPROJECT)
    proxy.drop_answer("POST", "/runs/create", count=3)
    async with Runner(tracking_uri=proxy.url, echo="off") as runner:
        runs = [
            await runner.run(str(project), env_manager="local", synchronous=False)
            for _ in range(10)
        ]
        statuses = [await run for run in runs]
    assert statuses == [RunStatus.FINISHED] * 10
    recorded = await anyio.to_thread.run_sync(_runs, proxy.target, experiment)
    assert sorted(r.info.run_id for r in recorded) == sorted(r.run_id for r in runs)
    assert {r.info.status for r in recorded} == {"FINISHED"}


async def test_a_sweep_through_lost_answers_has_no_duplicate_trial(
    proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = f"sweep-ghosts-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    project = make_project(tmp_path / "p", MLPROJECT)
    proxy.drop_answer("POST", "/runs/create", count=2)
    results = await aioproj.sweep(
        str(project), {"seconds": [0, 0.1, 0.2]}, tracking_uri=proxy.url,
        env_manager="local", echo="off",
    )  # fmt: skip
    assert [r.status for r in results] == [RunStatus.FINISHED] * 3
    recorded = await anyio.to_thread.run_sync(_runs, proxy.target, experiment)
    assert len(recorded) == 4  # the parent and three trials, no duplicate
    assert {r.info.status for r in recorded} == {"FINISHED"}


async def test_a_server_down_for_seconds_delays_runs_without_failing_them(
    proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = f"outage-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    project = make_project(tmp_path / "p", MLPROJECT)
    async with Runner(tracking_uri=proxy.url, echo="off") as runner:
        run = await runner.run(
            str(project), parameters={"seconds": 1}, env_manager="local", synchronous=False
        )
        proxy.refuse(4.0)  # down when the run ends and its status is written
        assert await run == RunStatus.FINISHED
    (recorded,) = await anyio.to_thread.run_sync(_runs, proxy.target, experiment)
    assert recorded.info.status == "FINISHED"


METRICS_PY = """\
import sys, time
import mlflow

scale = float(sys.argv[1])
with mlflow.start_run():
    for step in range(8):
        mlflow.log_metric("loss", scale / (step + 1), step=step)
        time.sleep(0.4)
"""

METRICS_MLPROJECT = """\
name: curves
entry_points:
  main:
    parameters:
      scale: float
    command: "python curves.py {scale}"
"""


@pytest.mark.slow
async def test_live_metrics_survive_a_tracking_outage_mid_sweep(
    proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Down for 12 s (past the store's own retries) while trials log: every trial still
    ends with its last value, the best trial is tagged on the parent, and no metric is
    given up on."""
    experiment = f"metrics-outage-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    # The projects' own mlflow client retries quickly through the outage.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    project = make_project(tmp_path / "p", METRICS_MLPROJECT, {"curves.py": METRICS_PY})
    sweep = aioproj.sweep(
        str(project), {"scale": [1.0, 2.0, 3.0]}, tracking_uri=proxy.url,
        env_manager="local", echo="off", metric="loss", goal="min",
    )  # fmt: skip

    async def outage() -> None:
        await anyio.sleep(1.5)
        proxy.refuse(12.0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(outage)
        results = await sweep
    assert [r.status for r in results] == [RunStatus.FINISHED] * 3
    assert sorted(r.metrics["loss"] for r in results) == [1.0 / 8, 2.0 / 8, 3.0 / 8]
    assert sweep.best is not None
    assert sweep.best.params == {"scale": 1.0}
    parent = mlflow_client(proxy.target).get_run(sweep.parent_run_id)
    assert parent.data.tags["aioproj.sweep.best_run_id"] == sweep.best.run_id
    # (Whether the poller saw the outage or the store's own retries hid it depends on
    # timing; either way nothing is given up on.)
    assert not [r for r in caplog.records if "Could not read the metrics" in r.message]
