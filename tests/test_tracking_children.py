"""search_child_runs and reopen_run, what resuming a sweep reads and writes, on all three
stores: the native file store, a real ``mlflow server`` (REST) and sqlite through the
mlflow client. Each answer is checked against MLflow's own client."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest

from aioproj.errors import InvalidArgumentError, TrackingError
from aioproj.tracking import TrackingStore, open_store

from .mlflow_server import MlflowServer

pytestmark = [
    pytest.mark.anyio,
    # mlflow 3.17 on SQLAlchemy 2.1 (the sqlite store): not ours to fix.
    pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning"),
]


@pytest.fixture(params=["file", "rest", "sqlite"])
def store_uri(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    if request.param == "file":
        return (tmp_path / "mlruns").as_uri()
    if request.param == "rest":
        server: MlflowServer = request.getfixturevalue("mlflow_server")
        return server.uri
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
async def store(store_uri: str) -> AsyncIterator[TrackingStore]:
    opened = await anyio.to_thread.run_sync(open_store, store_uri)
    assert isinstance(opened, TrackingStore)
    yield opened
    await opened.aclose()


def _mlflow_children(uri: str, experiment_id: str, parent: str) -> set[str]:
    from mlflow import MlflowClient

    runs = MlflowClient(tracking_uri=uri).search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    return {r.info.run_id for r in runs}


def _mlflow_status(uri: str, run_id: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id).info.status


async def test_children_of_a_parent_and_nothing_else(store: TrackingStore) -> None:
    experiment = await store.resolve_experiment(
        experiment_name=f"kids-{uuid.uuid4().hex[:8]}", experiment_id=None
    )
    parent = await store.create_run(experiment, run_name="parent", tags={}, params={})
    other = await store.create_run(experiment, run_name="other", tags={}, params={})
    kids = [
        await store.create_run(
            experiment,
            run_name=f"kid-{i}",
            tags={"mlflow.parentRunId": parent.run_id, "aioproj.sweep.trial": str(i)},
            params={"x": str(i)},
        )
        for i in range(3)
    ]
    await store.create_run(
        experiment, run_name="cousin", tags={"mlflow.parentRunId": other.run_id}, params={}
    )
    await store.set_terminated(kids[1].run_id, "FAILED")

    found = await store.search_child_runs(experiment, parent.run_id)
    by_id = {r.run_id: r for r in found}
    assert set(by_id) == {k.run_id for k in kids}
    assert by_id[kids[1].run_id].status == "FAILED"
    assert by_id[kids[2].run_id].params == {"x": "2"}
    assert by_id[kids[2].run_id].tags["aioproj.sweep.trial"] == "2"
    mlflow_view = await anyio.to_thread.run_sync(
        _mlflow_children, store.uri, experiment, parent.run_id
    )
    assert mlflow_view == set(by_id)
    assert await store.search_child_runs(experiment, kids[0].run_id) == []


async def test_reopen_makes_an_ended_run_running(store: TrackingStore) -> None:
    experiment = await store.resolve_experiment(experiment_name=None, experiment_id=None)
    run = await store.create_run(experiment, run_name="sweep", tags={}, params={})
    await store.set_terminated(run.run_id, "KILLED")
    await store.reopen_run(run.run_id)
    assert (await store.get_run(run.run_id)).status == "RUNNING"
    assert await anyio.to_thread.run_sync(_mlflow_status, store.uri, run.run_id) == "RUNNING"
    await store.set_terminated(run.run_id, "FINISHED")
    record = await store.get_run(run.run_id)
    assert record.status == "FINISHED"
    assert record.end_time_ms is not None


async def test_bad_ids_are_refused_before_any_query(store: TrackingStore) -> None:
    with pytest.raises(InvalidArgumentError, match="Invalid run id"):
        await store.search_child_runs("0", "x' OR tags.a = 'b")
    with pytest.raises((TrackingError, InvalidArgumentError)):
        await store.reopen_run(uuid.uuid4().hex)
