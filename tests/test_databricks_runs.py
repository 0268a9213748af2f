"""End to end: aioproj.run(..., backend="databricks") against FakeDatabricks."""

# The fixtures come from databricks_support; their names are reused as parameters.
# ruff: noqa: F811

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

import aioproj
from aioproj.backends.databricks import DatabricksBackend
from aioproj.testing.databricks import FakeDatabricks, RunScript
from aioproj.tracking.rest import RestStore

from .databricks_support import CLUSTER, backend, fast_backend, project, ws  # noqa: F401
from .support import all_runs, process_gone, read_run

pytestmark = pytest.mark.anyio


async def test_run_finishes_and_logs_through_the_workspace(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            backend=backend,
            backend_config={"new_cluster": CLUSTER},
            parameters={"alpha": 0.25, "track": 1},
        )
        assert await run.get_status() == aioproj.RunStatus.FINISHED
        lines = [line async for line in run.logs()]
    text = "".join(lines)
    assert "training with alpha 0.25" in text
    assert "done" in text
    record = await read_run(ws.tracking_uri, run.run_id)
    assert record.info.status == "FINISHED"
    assert record.data.params["alpha"] == "0.25"
    assert record.data.metrics["loss"] == 0.5
    assert record.data.tags["trained.on"] == "fake-databricks"
    assert record.data.tags["mlflow.project.backend"] == "databricks"
    db_run_id = record.data.tags["mlflow.databricks.shellJobRunID"]
    assert record.data.tags["mlflow.databricks.runURL"].endswith(f"/run/{db_run_id}")
    assert record.data.tags["mlflow.databricks.webappURL"] == ws.host
    fake = ws.runs[int(db_run_id)]
    assert fake.result_state == "SUCCESS"
    assert fake.exit_code == 0
    # The run's output is saved among its artifacts, in the workspace's DBFS.
    log = ws.mlflow.root / record.info.experiment_id / run.run_id / "artifacts" / "aioproj"
    assert "training with alpha 0.25" in await anyio.Path(log / "output.log").read_text()


async def test_rest_store_writes_dbfs_artifacts_of_any_size(ws: FakeDatabricks) -> None:
    store = RestStore("databricks")
    try:
        record = await store.create_run("0", run_name="r", tags={}, params={})
        big = os.urandom(2 * 1024 * 1024 + 100)
        await store.log_artifact_bytes(record.run_id, "blobs/big.bin", big)
        await store.log_artifact_bytes(record.run_id, "blobs/big.bin", b"tail", append=True)
    finally:
        await store.aclose()
    local = ws.mlflow.root / "0" / record.run_id / "artifacts" / "blobs" / "big.bin"
    assert await anyio.Path(local).read_bytes() == big + b"tail"
    assert ws.count("POST dbfs/add-block") == 6  # 3 blocks, written twice


async def test_failing_project_is_failed_with_its_output(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    async with aioproj.Runner(echo="off") as runner:
        with pytest.raises(aioproj.RunFailedError, match=r"Run \(ID '.*'\) failed"):
            await runner.run(
                str(project),
                backend=backend,
                backend_config={"new_cluster": CLUSTER},
                parameters={"fail": 3},
            )
    (fake,) = ws.runs.values()
    assert fake.result_state == "FAILED"
    assert fake.exit_code != 0
    records = await all_runs(ws.tracking_uri)
    assert [r.info.status for r in records] == ["FAILED"]


async def test_failing_run_output_is_in_its_logs(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            backend=backend,
            backend_config={"new_cluster": CLUSTER},
            parameters={"fail": 2},
            synchronous=False,
        )
        assert not await run.wait()
        assert await run.get_status() == aioproj.RunStatus.FAILED
        text = "".join([line async for line in run.logs()])
    assert "about to fail" in text
    assert "training with alpha 0.5" in text
    assert "ended FAILED" in text


async def test_cancel_posts_runs_cancel_returns_at_once_and_kills_the_driver(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    ws.script_next(RunScript(pending=0.02, terminating=0.5))
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            backend=backend,
            backend_config={"new_cluster": CLUSTER},
            parameters={"sleep": 60},
            synchronous=False,
        )
        (fake,) = ws.runs.values()
        with anyio.fail_after(30):
            while b"training" not in fake.logs:  # noqa: ASYNC110  (the driver is up)
                await anyio.sleep(0.02)
        await run.cancel()
        # Returned as soon as the workspace accepted it: the run is still terminating.
        assert ws.count("POST jobs/runs/cancel") == 1
        assert fake.active
        assert await run == aioproj.RunStatus.KILLED
    assert fake.result_state == "CANCELED"
    assert fake.user_cancelled_or_timedout
    assert process_gone(fake.pid)
    (record,) = await all_runs(ws.tracking_uri)
    assert record.info.status == "KILLED"


async def test_cancelling_a_synchronous_run_cancels_the_databricks_run(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    async with aioproj.Runner(echo="off") as runner:
        with anyio.move_on_after(1.5):
            await runner.run(
                str(project),
                backend=backend,
                backend_config={"new_cluster": CLUSTER},
                parameters={"sleep": 60},
            )
    (fake,) = ws.runs.values()
    assert ws.count("POST jobs/runs/cancel") == 1
    fake = await ws.wait_run(fake.run_id)
    assert fake.result_state == "CANCELED"
    (record,) = await all_runs(ws.tracking_uri)
    assert record.info.status == "KILLED"


async def test_timeout_from_the_backend_config_fails_the_run(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            backend=backend,
            backend_config={"new_cluster": CLUSTER, "timeout_seconds": 1},
            parameters={"sleep": 60},
            synchronous=False,
        )
        assert await run == aioproj.RunStatus.FAILED
    (fake,) = ws.runs.values()
    assert fake.result_state == "TIMEDOUT"
    assert process_gone(fake.pid)


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (RunScript(pending=0.01, outcome="INTERNAL_ERROR"), aioproj.RunStatus.FAILED),
        (RunScript(pending=0.01, outcome="SKIPPED"), aioproj.RunStatus.FAILED),
        (RunScript(pending=0.01, outcome="TIMEDOUT"), aioproj.RunStatus.FAILED),
        (
            RunScript(pending=0.01, outcome="MAXIMUM_CONCURRENT_RUNS_REACHED"),
            aioproj.RunStatus.FAILED,
        ),
        (RunScript(pending=0.01, outcome="CANCELED"), aioproj.RunStatus.KILLED),
        (RunScript(queued=0.05, pending=0.01, outcome="SUCCESS"), aioproj.RunStatus.FINISHED),
    ],
)
async def test_terminal_states_map_to_run_status(
    ws: FakeDatabricks,
    project: Path,
    backend: DatabricksBackend,
    script: RunScript,
    expected: aioproj.RunStatus,
) -> None:
    ws.script_next(script)
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project), backend=backend, backend_config=CLUSTER, synchronous=False
        )
        assert await run == expected
    (record,) = await all_runs(ws.tracking_uri)
    assert record.info.status == expected.value


async def test_throttling_and_unavailability_storms_are_absorbed(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    ws.inject("jobs/runs/submit", status=429, retry_after=0, times=4)
    ws.inject("dbfs/", status=503, retry_after=0, times=4)
    ws.inject("jobs/runs/list", status=429, retry_after="0", times=6)
    ws.inject("jobs/runs/get-output", status=503, times=2)
    ws.inject("GET jobs/runs/get$", drop=True)
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            backend=backend,
            backend_config={"new_cluster": CLUSTER},
            parameters={"sleep": 1.5},
        )
        assert await run.get_status() == aioproj.RunStatus.FINISHED
        text = "".join([line async for line in run.logs()])
    assert "done" in text
    assert not ws.faults  # every injected fault was met, and absorbed
    assert len(ws.runs) == 1
    assert ws.count("POST jobs/runs/submit") == 5


async def test_lost_submit_answer_is_retried_without_a_second_run(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    ws.inject("jobs/runs/submit", drop_after=True, times=2)
    async with aioproj.Runner(echo="off") as runner:
        await runner.run(str(project), backend=backend, backend_config={"new_cluster": CLUSTER})
    assert ws.count("POST jobs/runs/submit") == 3
    assert len(ws.runs) == 1


async def test_restarted_driver_resubmitting_a_run_gets_the_same_databricks_run(
    ws: FakeDatabricks, project: Path, tmp_path: Path
) -> None:
    ws.script_next(RunScript(pending=0.5, terminating=0.02))
    first, second = fast_backend(), fast_backend()
    try:
        async with aioproj.Runner(echo="off") as one, aioproj.Runner(echo="off") as two:
            run = await one.run(
                str(project), backend=first, backend_config=CLUSTER, synchronous=False
            )
            again = await two.run(
                str(project),
                backend=second,
                backend_config=CLUSTER,
                run_id=run.run_id,
                synchronous=False,
            )
            assert await run == await again == aioproj.RunStatus.FINISHED
    finally:
        await first.aclose()
        await second.aclose()
    assert ws.count("POST jobs/runs/submit") == 2
    assert len(ws.runs) == 1


@pytest.mark.slow
async def test_concurrent_runs_upload_the_code_once_and_share_one_poller(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    # Scripted runs end without starting a process: the test is about the client.
    ws.script = RunScript(pending=0.05, running=0.3, terminating=0.02, outcome="SUCCESS")
    count = 100
    handles: list[aioproj.SubmittedRun] = []
    async with aioproj.Runner(echo="off") as runner:

        async def start(i: int) -> None:
            handles.append(
                await runner.run(
                    str(project),
                    backend=backend,
                    backend_config={"new_cluster": CLUSTER},
                    parameters={"alpha": i},
                    synchronous=False,
                )
            )

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(start, i)
        statuses = [await h for h in handles]
    assert statuses == [aioproj.RunStatus.FINISHED] * count
    assert len(ws.runs) == count
    assert ws.count("POST dbfs/create") == 1  # the tarball, streamed once
    assert ws.count("GET dbfs/get-status") == 2  # one existence check per file
    listing = await ws.dbfs.list("/mlflow-experiments/0/projects-code")
    assert len(listing["files"]) == 2  # the tarball and the bootstrap script
    # Per run: one submit, one read-back, one output; status comes from list requests only.
    assert ws.count("POST jobs/runs/submit") == count
    assert ws.count("GET jobs/runs/get") == count + ws.count("GET jobs/runs/get-output")
    assert ws.count("GET jobs/runs/get-output") == count
    workspace = backend.workspace(ws.host)
    assert workspace is not None
    assert workspace.uploads == 2
    assert max(workspace.poller.round_requests) <= 2 * (1 + count // 25)


async def test_backend_by_name_with_environment_credentials(
    ws: FakeDatabricks, project: Path
) -> None:
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project), backend="databricks", backend_config={"new_cluster": CLUSTER}
        )
        assert await run.get_status() == aioproj.RunStatus.FINISHED
    (fake,) = ws.runs.values()
    task = fake.task
    assert task["new_cluster"] == CLUSTER
    assert any("mlflow" in lib["pypi"]["package"] for lib in task["libraries"])
    params = task["spark_python_task"]["parameters"]
    assert params[0].startswith("dbfs:/mlflow-experiments/0/projects-code/")
    assert params[0].endswith(".tar.gz")
    assert task["spark_python_task"]["python_file"].endswith(".py")
    spec = json.loads(params[1])
    assert spec["env"]["MLFLOW_TRACKING_URI"] == "databricks"
    assert spec["env"]["MLFLOW_RUN_ID"] == run.run_id
    assert fake.idempotency_token == f"aioproj-{run.run_id}"
    assert fake.run_name.startswith("MLflow Run for ")


async def test_profile_tracking_uri_names_the_workspace(
    ws: FakeDatabricks,
    project: Path,
    backend: DatabricksBackend,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ws.script = RunScript(pending=0.01, terminating=0.01, outcome="SUCCESS")
    config = tmp_path / "databrickscfg"
    await anyio.Path(config).write_text(f"[emu]\nhost = {ws.host}\ntoken = {ws.token}\n")
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(config))
    monkeypatch.delenv("DATABRICKS_HOST")
    monkeypatch.delenv("DATABRICKS_TOKEN")
    async with aioproj.Runner(echo="off", tracking_uri="databricks://emu") as runner:
        run = await runner.run(str(project), backend=backend, backend_config=CLUSTER)
    (fake,) = ws.runs.values()
    spec = json.loads(fake.task["spark_python_task"]["parameters"][1])
    assert spec["env"]["MLFLOW_TRACKING_URI"] == "databricks"  # as MLflow passes it on
    (record,) = await all_runs(ws.tracking_uri)
    assert record.info.run_id == run.run_id
    assert record.info.status == "FINISHED"


async def test_submits_beyond_the_workspace_rate_limit_wait_their_turn(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    ws.script = RunScript(pending=0.01, terminating=0.01, outcome="SUCCESS")
    ws.rate_limit("POST jobs/runs/submit", per_second=5)
    count = 12
    handles: list[aioproj.SubmittedRun] = []
    async with aioproj.Runner(echo="off") as runner:

        async def start() -> None:
            handles.append(
                await runner.run(
                    str(project), backend=backend, backend_config=CLUSTER, synchronous=False
                )
            )

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(start)
        assert [await h for h in handles] == [aioproj.RunStatus.FINISHED] * count
    assert ws.throttled["POST jobs/runs/submit"] > 0
    assert len(ws.runs) == count


async def test_code_in_a_unity_catalog_volume(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    volume = "/Volumes/main/default/vol/aioproj"
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            backend=backend,
            backend_config={"new_cluster": CLUSTER, "code_volume": volume},
            parameters={"alpha": 0.75},
        )
        text = "".join([line async for line in run.logs()])
    assert "training with alpha 0.75" in text
    (fake,) = ws.runs.values()
    task = fake.task["spark_python_task"]
    assert task["python_file"].startswith(f"{volume}/mlflow-experiments/0/projects-code/")
    assert task["parameters"][0].endswith(".tar.gz")
    assert ws.count("PUT fs/files/Volumes/") == 2
    assert ws.count("POST dbfs/create") == 0


# The default runner: the run is submitted, then the event loop ends at once.
RECOVER_DRIVER = """\
import asyncio, json, sys
import aioproj

async def main():
    run = await aioproj.run(sys.argv[1], backend="databricks",
                            backend_config={"new_cluster": json.loads(sys.argv[2])},
                            parameters={"sleep": 2}, synchronous=False)
    print(run.run_id)

asyncio.run(main())
"""


async def test_a_run_outlives_its_loop_and_recover_records_its_end(
    ws: FakeDatabricks, project: Path, tmp_path: Path
) -> None:
    import sys

    driver = tmp_path / "driver.py"
    await anyio.Path(driver).write_text(RECOVER_DRIVER)
    done = await anyio.run_process(
        [sys.executable, str(driver), str(project), json.dumps(CLUSTER)], check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    assert b"remote aioproj run(s) were still going" in done.stderr
    run_id = done.stdout.decode().split()[-1]
    (fake,) = ws.runs.values()
    assert fake.result_state is None  # not cancelled with the loop
    assert (await read_run(ws.tracking_uri, run_id)).info.status == "RUNNING"
    (still,) = await aioproj.recover()
    assert (still.run_id, still.status) == (run_id, None)
    with anyio.fail_after(30):
        while fake.result_state is None:  # noqa: ASYNC110 (the emulator's state)
            await anyio.sleep(0.1)
    (ended,) = await aioproj.recover()
    assert ended.status == "FINISHED"
    record = await read_run(ws.tracking_uri, run_id)
    assert record.info.status == "FINISHED"
    assert "databricks run ended FINISHED" in record.data.tags["aioproj.recovered"]
    assert await aioproj.recover() == []
