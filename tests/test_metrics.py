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


class _FlakyStore:
    """A metrics reader that fails ``down`` rounds, then answers; one value per round."""

    def __init__(self, down: int) -> None:
        self.down = down
        self.calls = 0

    def __repr__(self) -> str:
        return "FlakyStore()"

    async def read_new_metrics(self, cursors: Any) -> list[list[Metric]]:
        self.calls += 1
        if self.down:
            self.down -= 1
            raise aioproj.TrackingError("store is down")
        return [[Metric("loss", float(self.calls), self.calls, self.calls)] for _ in cursors]


class _Run:
    run_id, experiment_id, done = "r" * 32, "0", False


async def test_a_store_outage_delays_metrics_and_never_drops_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the store fails, rounds back off and a warning says so, once; the follower
    keeps going and gets values once the store answers."""
    store = _FlakyStore(down=4)
    run = _Run()
    async with anyio.create_task_group() as tg:
        poller = MetricsPoller(store, tg.start_soon, max_backoff=0.05)
        seen: list[Metric] = []
        with anyio.fail_after(10):
            async for metric in poller.follow(run, interval=0.01):  # type: ignore[arg-type]
                seen.append(metric)
                if len(seen) == 2:
                    run.done = True
    assert store.calls >= 6
    assert [m.step for m in seen][:2] == [5, 6]
    outage = [r for r in caplog.records if "Could not read live metrics" in r.message]
    back = [r for r in caplog.records if "can be read again" in r.message]
    assert len(outage) == 1
    assert len(back) == 1
    assert "FlakyStore()" in outage[0].message


async def test_an_ended_run_gives_up_after_a_long_outage() -> None:
    """Followers of a live run wait out any outage; once the run has ended, they give
    up after ``give_up_after`` seconds of failures, with the store's error."""
    store = _FlakyStore(down=10**6)
    run = _Run()

    async def end_later() -> None:
        await anyio.sleep(0.3)
        run.done = True

    async with anyio.create_task_group() as tg:
        poller = MetricsPoller(store, tg.start_soon, give_up_after=0.5, max_backoff=0.02)
        tg.start_soon(end_later)
        started = anyio.current_time()
        with pytest.raises(aioproj.TrackingError, match="store is down"), anyio.fail_after(10):
            async for _ in poller.follow(run, interval=0.01):  # type: ignore[arg-type]
                pass
        assert anyio.current_time() - started >= 0.5
        assert poller.failing_since is not None


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
