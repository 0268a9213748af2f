"""Live metrics: ``run.metrics()`` yields what a project logs while it runs, from every store,
with one shared poll per store."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioproj
from aioproj import Metric, Runner, RunStatus
from aioproj.tracking.metrics import MetricCursor, MetricsPoller
from aioproj.tracking.rest import RestStore

from .mlflow_server import MlflowServer
from .support import amake_project, mlflow_client, read_run

pytestmark = pytest.mark.anyio

# Logs step 0 with mlflow, waits until the test has seen it (a "go" file), logs 1..4.
LIVE_PY = """\
import os, pathlib, sys, time
import mlflow

go = pathlib.Path(sys.argv[1])
with mlflow.start_run():
    mlflow.log_metric("loss", 1.0, step=0)
    deadline = time.time() + 60
    while not go.exists():
        if time.time() > deadline:
            sys.exit("the test never saw step 0 while the run was live")
        time.sleep(0.02)
    for step in range(1, 5):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    mlflow.log_metrics({"acc": 0.9, "nested/f1": 0.5}, step=4)
"""

LIVE_MLPROJECT = """\
name: live
entry_points:
  main:
    parameters:
      go: string
    command: "python live.py {go}"
"""


async def _follow_live(tmp_path: Path, tracking_uri: str) -> tuple[list[Metric], Any]:
    project = await amake_project(tmp_path / "proj", LIVE_MLPROJECT, {"live.py": LIVE_PY})
    go = tmp_path / "go"
    seen: list[Metric] = []
    async with Runner(tracking_uri=tracking_uri, echo="off") as runner:
        run = await runner.run(
            str(project), parameters={"go": str(go)}, env_manager="local", synchronous=False
        )
        async for metric in run.metrics(interval=0.05):
            seen.append(metric)
            if metric.step == 0:
                assert not run.done, "step 0 must arrive while the run is live"
                await anyio.Path(go).touch()
        assert run.done  # the iteration ends only after the run has ended
        assert await run.get_status() is RunStatus.FINISHED
    return seen, run


def _check_live(seen: list[Metric]) -> None:
    loss = [(m.step, m.value) for m in seen if m.key == "loss"]
    assert loss == [(0, 1.0), (1, 0.5), (2, 1 / 3), (3, 0.25), (4, 0.2)]
    others = {m.key: (m.value, m.step) for m in seen if m.key != "loss"}
    assert others == {"acc": (0.9, 4), "nested/f1": (0.5, 4)}
    assert all(m.timestamp > 1_600_000_000_000 for m in seen)


async def test_file_store_metrics_arrive_live_and_in_order(
    tmp_path: Path, tracking_uri: str
) -> None:
    seen, run = await _follow_live(tmp_path, tracking_uri)
    _check_live(seen)
    record = await read_run(tracking_uri, run.run_id)
    assert record.data.metrics["loss"] == 0.2  # what we saw is what MLflow reads


async def test_rest_server_metrics_arrive_live_and_in_order(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    seen, _run = await _follow_live(tmp_path, mlflow_server.uri)
    _check_live(seen)


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")
async def test_sqlite_adapter_metrics_arrive_live_and_in_order(tmp_path: Path) -> None:
    seen, _run = await _follow_live(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    _check_live(seen)


# A child that appends to its metric file the way MLflow's file store does, no mlflow import:
# many of them run at once cheaply.
APPEND_PY = """\
import os, pathlib, sys, time
root = pathlib.Path(sys.argv[1]) / os.environ["MLFLOW_EXPERIMENT_ID"] / os.environ["MLFLOW_RUN_ID"]
path = root / "metrics" / "m"
path.parent.mkdir(parents=True, exist_ok=True)
time.sleep(0.5)  # followers start meanwhile
for step in range(3):
    with path.open("a") as f:
        f.write(f"{int(time.time() * 1000)} {step * 1.5} {step}\\n")
    time.sleep(0.1)
"""

APPEND_MLPROJECT = """\
name: append
entry_points:
  main:
    parameters:
      root: string
    command: "python append.py {root}"
"""


async def test_many_runs_share_one_poll_of_the_store(tmp_path: Path) -> None:
    project = await amake_project(tmp_path / "proj", APPEND_MLPROJECT, {"append.py": APPEND_PY})
    root = tmp_path / "mlruns"
    n = 12
    async with Runner(tracking_uri=root.as_uri(), echo="off") as runner:
        runs = [
            await runner.run(
                str(project), parameters={"root": str(root)}, env_manager="local",
                synchronous=False,
            )
            for _ in range(n)
        ]  # fmt: skip
        store = await runner._store()
        calls: list[int] = []
        original = store.read_new_metrics

        async def counted(cursors: Any) -> Any:
            calls.append(len(cursors))
            return await original(cursors)

        store.read_new_metrics = counted  # type: ignore[method-assign]
        results: dict[str, list[tuple[int, float]]] = {}

        async def follow(run: aioproj.SubmittedRun) -> None:
            results[run.run_id] = [(m.step, m.value) async for m in run.metrics(interval=0.05)]

        async with anyio.create_task_group() as tg:
            for run in runs:
                tg.start_soon(follow, run)
        poller = runner._metrics_poller(store)
    assert all(v == [(0, 0.0), (1, 1.5), (2, 3.0)] for v in results.values()), results
    assert len(results) == n
    # One store call per round for all followed runs (plus one read for a follower that
    # comes after its run ended), not one call per run per round.
    assert max(calls) > n // 2
    assert len(calls) <= poller.rounds + n
    assert len(calls) < n * poller.rounds / 2


async def test_two_followers_of_one_run_both_get_everything(
    tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(tmp_path / "proj", APPEND_MLPROJECT, {"append.py": APPEND_PY})
    root = Path(tracking_uri.removeprefix("file://"))
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), parameters={"root": str(root)}, env_manager="local", synchronous=False
        )
        got: list[list[int]] = []

        async def follow() -> None:
            got.append([m.step async for m in run.metrics(interval=0.05)])

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            tg.start_soon(follow)
    assert got == [[0, 1, 2], [0, 1, 2]]


async def test_breaking_out_stops_following_and_the_run_goes_on(
    tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(tmp_path / "proj", APPEND_MLPROJECT, {"append.py": APPEND_PY})
    root = Path(tracking_uri.removeprefix("file://"))
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), parameters={"root": str(root)}, env_manager="local", synchronous=False
        )
        async for metric in run.metrics(interval=0.05):
            assert metric.step == 0
            break
        assert await run == RunStatus.FINISHED
        # After the end: one read of the whole history, no polling loop needed.
        after = [m.step async for m in run.metrics()]
        poller = runner._metrics_poller(await runner._store())
        assert not poller._followers
    assert after == [0, 1, 2]


async def test_a_store_error_reaches_the_follower(tmp_path: Path, tracking_uri: str) -> None:
    project = await amake_project(
        tmp_path / "proj", "name: p\nentry_points:\n  main:\n    command: sleep 30\n"
    )
    async with Runner(echo="off") as runner:
        run = await runner.run(str(project), env_manager="local", synchronous=False)
        store = await runner._store()

        async def broken(cursors: Any) -> Any:
            raise aioproj.TrackingError("store is down")

        store.read_new_metrics = broken  # type: ignore[method-assign]
        with pytest.raises(aioproj.TrackingError, match="store is down"):
            async for _ in run.metrics(interval=0.05):
                pass
        await run.cancel()
    assert await run.get_status() is RunStatus.KILLED


def test_metric_is_public_and_frozen() -> None:
    metric = Metric("k", 1.0, 2, 3)
    assert aioproj.Metric is Metric
    with pytest.raises(AttributeError):
        metric.value = 2.0  # type: ignore[misc]
    assert MetricsPoller.__module__ == "aioproj.tracking.metrics"
    assert sys.modules["aioproj.tracking.metrics"].Metric is Metric


async def test_rest_round_costs_one_search_per_100_runs(mlflow_server: MlflowServer) -> None:
    store = RestStore(mlflow_server.uri)
    try:
        exp = await store.resolve_experiment(experiment_name="metrics-rounds", experiment_id=None)
        records = []
        for _ in range(150):
            records.append(await store.create_run(exp, run_name=None, tags={}, params={}))
        calls: list[str] = []
        original = store._call

        async def counted(method: str, endpoint: str, **kwargs: Any) -> Any:
            calls.append(endpoint)
            return await original(method, endpoint, **kwargs)

        store._call = counted  # type: ignore[method-assign]

        def log() -> None:
            client = mlflow_client(mlflow_server.uri)
            for record in records[:2]:
                for step in range(3):
                    client.log_metric(record.run_id, "m", float(step), step=step)

        await anyio.to_thread.run_sync(log)
        cursors = [MetricCursor(r.run_id, exp) for r in records]
        first = await store.read_new_metrics(cursors)
        assert [[m.step for m in new] for new in first[:3]] == [[0, 1, 2], [0, 1, 2], []]
        assert calls == ["runs/search", "runs/search", "metrics/get-history", "metrics/get-history"]
        calls.clear()
        assert await store.read_new_metrics(cursors) == [[] for _ in cursors]
        assert calls == ["runs/search", "runs/search"]  # nothing changed: no history
    finally:
        await store.aclose()
