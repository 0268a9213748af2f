"""FakeDatabricks against the official clients: databricks-sdk and MLflow, unchanged.

The SDK is synchronous: every call runs in a worker thread, the emulator on the loop.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any, TypeVar

import anyio
import pytest
from databricks.sdk import WorkspaceClient
from databricks.sdk.config import Config
from databricks.sdk.errors import NotFound, OperationFailed, ResourceAlreadyExists
from databricks.sdk.service.compute import ClusterSpec
from databricks.sdk.service.jobs import (
    RunLifeCycleState,
    RunResultState,
    RunType,
    SparkPythonTask,
    SubmitTask,
)

from aioproj.testing.databricks import FakeDatabricks, RunScript

from .support import process_gone

pytestmark = pytest.mark.anyio

T = TypeVar("T")
CLUSTER = ClusterSpec(spark_version="15.4.x-scala2.12", node_type_id="i3.xlarge", num_workers=1)
SCRIPT = (
    b"import sys\n"
    b"print('hello', sys.argv[1:])\n"
    b"sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)\n"
)


@pytest.fixture
async def ws() -> AsyncIterator[FakeDatabricks]:
    async with FakeDatabricks(script=RunScript(pending=0.02, terminating=0.02)) as workspace:
        yield workspace


async def sdk(ws: FakeDatabricks, call: Callable[[WorkspaceClient], T]) -> T:
    def run() -> T:
        client = WorkspaceClient(
            config=Config(host=ws.host, token=ws.token, retry_timeout_seconds=30)
        )
        return call(client)

    return await anyio.to_thread.run_sync(run)


def task(*params: str, python_file: str = "dbfs:/x/hello.py") -> SubmitTask:
    return SubmitTask(
        task_key="t",
        new_cluster=CLUSTER,
        spark_python_task=SparkPythonTask(python_file=python_file, parameters=list(params)),
    )


def upload_script(w: WorkspaceClient) -> None:
    w.dbfs.upload("/x/hello.py", io.BytesIO(SCRIPT), overwrite=True)


async def test_dbfs_upload_and_download_in_blocks(ws: FakeDatabricks) -> None:
    data = os.urandom(2 * 1024 * 1024 + 512 * 1024)

    def roundtrip(w: WorkspaceClient) -> bytes:
        w.dbfs.upload("/data/blob.bin", io.BytesIO(data), overwrite=True)
        with w.dbfs.download("/data/blob.bin") as handle:
            return handle.read()

    assert await sdk(ws, roundtrip) == data
    assert ws.count("POST dbfs/add-block") == 3  # one per MiB, as the SDK streams
    assert ws.count("POST dbfs/close") == 1
    status = await sdk(ws, lambda w: w.dbfs.get_status("/data/blob.bin"))
    assert status.file_size == len(data)
    assert not status.is_dir


async def test_dbfs_errors_parse_as_the_sdk_exceptions(ws: FakeDatabricks) -> None:
    await sdk(ws, upload_script)
    with pytest.raises(ResourceAlreadyExists):
        await sdk(ws, lambda w: w.dbfs.upload("/x/hello.py", io.BytesIO(b"x"), overwrite=False))
    with pytest.raises(NotFound):
        await sdk(ws, lambda w: w.dbfs.get_status("/x/missing.py"))
    await sdk(ws, lambda w: w.dbfs.mkdirs("/x/sub/dir"))
    listing = await sdk(ws, lambda w: sorted(f.path for f in w.dbfs.list("/x")))
    assert listing == ["/x/hello.py", "/x/sub"]


async def test_submit_result_success_and_output(ws: FakeDatabricks) -> None:
    def go(w: WorkspaceClient) -> Any:
        upload_script(w)
        run = w.jobs.submit(run_name="emu", tasks=[task("--a", "0")]).result(
            timeout=timedelta(seconds=30)
        )
        return run, w.jobs.get_run_output(run.tasks[0].run_id)

    run, output = await sdk(ws, go)
    assert run.state.life_cycle_state == RunLifeCycleState.TERMINATED
    assert run.state.result_state == RunResultState.SUCCESS
    assert run.run_page_url.startswith(ws.host)
    assert output.logs == "hello ['--a', '0']\n"
    assert output.metadata.state.result_state == RunResultState.SUCCESS


async def test_failed_run_returns_with_its_result_state(ws: FakeDatabricks) -> None:
    def go(w: WorkspaceClient) -> Any:
        upload_script(w)
        run = w.jobs.submit(run_name="bad", tasks=[task("--a", "3")]).result(
            timeout=timedelta(seconds=30)
        )
        return run, w.jobs.get_run_output(run.tasks[0].run_id)

    run, output = await sdk(ws, go)
    assert run.state.result_state == RunResultState.FAILED
    assert run.status.termination_details.code.value == "RUN_EXECUTION_ERROR"
    assert output.error


async def test_internal_error_makes_the_waiter_raise(ws: FakeDatabricks) -> None:
    ws.script_next(RunScript(pending=0.02, outcome="INTERNAL_ERROR", state_message="boom"))

    def go(w: WorkspaceClient) -> None:
        upload_script(w)
        w.jobs.submit(run_name="x", tasks=[task()]).result(timeout=timedelta(seconds=30))

    with pytest.raises(OperationFailed, match="INTERNAL_ERROR: boom"):
        await sdk(ws, go)


async def test_cancel_run_and_wait(ws: FakeDatabricks) -> None:
    ws.script_next(RunScript(pending=30))

    def go(w: WorkspaceClient) -> Any:
        upload_script(w)
        waiter = w.jobs.submit(run_name="x", tasks=[task()])
        return w.jobs.cancel_run(waiter.run_id).result(timeout=timedelta(seconds=30))

    run = await sdk(ws, go)
    assert run.state.result_state == RunResultState.CANCELED
    assert run.state.user_cancelled_or_timedout


async def test_list_runs_pages_by_token_and_filters_active(ws: FakeDatabricks) -> None:
    ws.script = RunScript(pending=30)

    def go(w: WorkspaceClient) -> tuple[list[int], list[int]]:
        upload_script(w)
        ids = [w.jobs.submit(run_name=f"r{i}", tasks=[task()]).run_id for i in range(30)]
        w.jobs.cancel_run(ids[0]).result(timeout=timedelta(seconds=30))
        active = [r.run_id for r in w.jobs.list_runs(active_only=True, run_type=RunType.SUBMIT_RUN)]
        return ids, active

    ids, active = await sdk(ws, go)
    assert sorted(active) == sorted(ids[1:])
    assert ws.count("GET jobs/runs/list") == 2  # 29 active runs: two pages of at most 25


async def test_unknown_run_is_not_found_and_delete_needs_an_ended_run(ws: FakeDatabricks) -> None:
    with pytest.raises(NotFound):
        await sdk(ws, lambda w: w.jobs.get_run(42))

    def go(w: WorkspaceClient) -> None:
        upload_script(w)
        run = w.jobs.submit(run_name="x", tasks=[task()]).result(timeout=timedelta(seconds=30))
        w.jobs.delete_run(run.run_id)
        w.jobs.get_run(run.run_id)

    with pytest.raises(NotFound):
        await sdk(ws, go)


async def test_idempotency_token_returns_the_same_run(ws: FakeDatabricks) -> None:
    def go(w: WorkspaceClient) -> tuple[int, int]:
        upload_script(w)
        one = w.jobs.submit(run_name="x", tasks=[task()], idempotency_token="tok-1").run_id
        two = w.jobs.submit(run_name="x", tasks=[task()], idempotency_token="tok-1").run_id
        return one, two

    one, two = await sdk(ws, go)
    assert one == two
    assert len(ws.runs) == 1


async def test_sdk_retries_throttling_with_retry_after(ws: FakeDatabricks) -> None:
    ws.inject("GET jobs/runs/list", status=429, retry_after=1, times=1)
    ws.inject("GET jobs/runs/list", status=503, times=1)
    runs = await sdk(ws, lambda w: list(w.jobs.list_runs()))
    assert runs == []
    assert ws.count("GET jobs/runs/list") == 3


@pytest.mark.allow_blocking  # MLflow's client reads its config files as it starts
async def test_mlflow_client_tracks_through_the_workspace(
    ws: FakeDatabricks, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABRICKS_HOST", ws.host)
    monkeypatch.setenv("DATABRICKS_TOKEN", ws.token)

    def go() -> Any:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri="databricks")
        assert client.get_experiment_by_name("/Users/me/x") is None
        exp = client.create_experiment("/Users/me/x")
        run = client.create_run(exp, run_name="r1")
        client.log_param(run.info.run_id, "alpha", "0.1")
        client.log_metric(run.info.run_id, "loss", 1.5, step=2)
        client.set_terminated(run.info.run_id)
        return client.get_run(run.info.run_id)

    run = await anyio.to_thread.run_sync(go)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("dbfs:/databricks/mlflow-tracking/")
    assert run.data.params == {"alpha": "0.1"}
    assert run.data.metrics == {"loss": 1.5}


async def test_unauthenticated_requests_are_refused(ws: FakeDatabricks) -> None:
    def go() -> Any:
        w = WorkspaceClient(
            config=Config(host=ws.host, token="dapi-wrong", retry_timeout_seconds=5)
        )
        return w.jobs.get_run(1)

    from databricks.sdk.errors import Unauthenticated

    with pytest.raises(Unauthenticated):
        await anyio.to_thread.run_sync(go)


def _serve_and_stop() -> tuple[str, int, str]:
    with subprocess.Popen(
        [sys.executable, "-m", "aioproj.testing.databricks", "--token", "dapi-cli"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            host = proc.stdout.readline().strip()
            w = WorkspaceClient(host=host, token="dapi-cli")
            w.dbfs.mkdirs("/cli")
            assert w.dbfs.get_status("/cli").is_dir
        finally:
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=30)
    return host, proc.returncode, err


async def test_command_line_server_prints_its_host_and_stops_on_ctrl_c() -> None:
    host, code, err = await anyio.to_thread.run_sync(_serve_and_stop)
    assert host.startswith("http://127.0.0.1:")
    assert code == 0
    assert "DATABRICKS_HOST=" in err


async def test_leaving_the_emulator_stops_its_runs_and_processes() -> None:
    async with FakeDatabricks(script=RunScript(pending=0.01)) as ws:
        sleeper = b"import time\nprint('up', flush=True)\ntime.sleep(600)\n"
        await ws.dbfs.put("/x/sleep.py", base64.b64encode(sleeper).decode(), True)

        def submit(w: WorkspaceClient) -> int:
            return w.jobs.submit(run_name="s", tasks=[task(python_file="dbfs:/x/sleep.py")]).run_id

        run_id = await sdk(ws, submit)
        fake = ws.runs[run_id]
        with anyio.fail_after(30):
            while b"up" not in fake.logs:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        pid = fake.pid
    assert pid is not None
    assert process_gone(pid)
    assert not fake.active


async def test_files_api_on_unity_catalog_volumes(ws: FakeDatabricks) -> None:
    path = "/Volumes/main/default/vol/dir/a.txt"

    def go(w: WorkspaceClient) -> tuple[bytes, int | None]:
        w.files.upload(path, io.BytesIO(b"volume data"), overwrite=True)
        data = w.files.download(path).contents.read(-1)
        return data, w.files.get_metadata(path).content_length

    assert await sdk(ws, go) == (b"volume data", 11)
    with pytest.raises(NotFound):
        await sdk(ws, lambda w: w.files.download("/Volumes/main/default/vol/missing"))
