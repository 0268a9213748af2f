"""MLflow's backend plugins run unchanged through aioproj.

The plugin is tests/mlflow_plugin/aioproj_test_mlflow_plugin.py: an ``AbstractBackend``
that uses MLflow's helpers to fetch the project and create the run, and starts the entry
point as a local process group. The ``mlflow_test_plugin`` fixture builds it into a wheel
with an ``mlflow.project_backend`` entry point and pip-installs it for the session.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioproj
from aioproj import Runner, RunStatus
from aioproj.backends.mlflow_plugin import MlflowPluginBackend

from .support import all_runs, amake_project, process_gone, read_run, wait_for_file

pytestmark = pytest.mark.anyio

MLPROJECT = """
name: plugged
entry_points:
  main:
    parameters:
      x: {type: int, default: 3}
    command: "echo plugin-ran {x} > ran.txt"
  fail:
    command: "exit 4"
  sleep:
    command: "echo $$ > pid.txt; sleep 60"
"""


@pytest.fixture
async def project(tmp_path: Path) -> Path:
    return await amake_project(tmp_path / "plugged", MLPROJECT)


async def _recorded(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(await anyio.Path(path).read_text())
    return data


async def test_the_plugin_gets_mlflows_arguments_and_its_run_is_tracked(
    mlflow_test_plugin: str, project: Path, tmp_path: Path, tracking_uri: str
) -> None:
    """``mlflow.projects._run``: a name that is not built in is looked up with
    ``backend.loader.load_backend`` in the ``mlflow.project_backend`` group, and called as
    ``backend.run(uri, entry_point, parameters, version, backend_config, tracking_uri,
    experiment_id)`` with ``ENV_MANAGER``, ``SYNCHRONOUS``, ``DOCKER_ARGS``,
    ``STORAGE_DIR``, ``build_image`` and ``docker_auth`` added to the backend config; the
    run it creates then gets ``mlflow.project.backend=<name>`` and ``mlflow.runName``, and
    ``_wait_for`` records FINISHED."""
    record = tmp_path / "call.json"
    storage = tmp_path / "storage"
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            parameters={"x": 5},
            backend=mlflow_test_plugin,
            backend_config={"record_to": str(record)},
            env_manager="local",
            storage_dir=storage,
            run_name="through-a-plugin",
        )
        assert await run.get_status() is RunStatus.FINISHED
    call = await _recorded(record)
    assert call["run_id"] == run.run_id  # the handle follows the run the plugin created
    assert call["project_uri"] == str(project)
    assert call["entry_point"] == "main"
    assert call["params"] == {"x": "5"}
    assert call["version"] is None
    assert call["tracking_uri"] == tracking_uri
    assert call["experiment_id"] == "0"
    assert call["backend_config"] == {
        "record_to": str(record),
        "ENV_MANAGER": "local",
        "SYNCHRONOUS": True,
        "DOCKER_ARGS": None,
        "STORAGE_DIR": str(storage),
        "build_image": False,
        "docker_auth": None,
    }
    assert (await anyio.Path(project / "ran.txt").read_text()) == "plugin-ran 5\n"
    tracked = await read_run(tracking_uri, run.run_id)
    assert tracked.info.status == "FINISHED"
    assert tracked.info.run_name == "through-a-plugin"
    assert tracked.data.params == {"x": "5"}
    assert tracked.data.tags["mlflow.project.backend"] == mlflow_test_plugin
    assert tracked.data.tags["mlflow.project.entryPoint"] == "main"
    assert tracked.data.tags["mlflow.source.type"] == "PROJECT"
    assert len(await all_runs(tracking_uri)) == 1  # the plugin's run, no second one


async def test_a_failing_plugin_run_is_failed_like_mlflow(
    mlflow_test_plugin: str, project: Path, tracking_uri: str
) -> None:
    """``mlflow.projects._wait_for``: ``wait()`` False → the run is set FAILED and
    ``ExecutionException("Run (ID '<id>') failed")`` is raised."""
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.RunFailedError, match=r"Run \(ID '[0-9a-f]+'\) failed"):
            await runner.run(str(project), "fail", backend=mlflow_test_plugin, env_manager="local")
    (tracked,) = await all_runs(tracking_uri)
    assert tracked.info.status == "FAILED"


async def test_cancel_calls_the_plugins_cancel_and_records_killed(
    mlflow_test_plugin: str, project: Path, tracking_uri: str
) -> None:
    """``SubmittedRun.cancel`` of the plugin stops its run (here: its process group);
    aioproj records KILLED where MLflow records FAILED (README, Differences from MLflow)."""
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            "sleep",
            backend=mlflow_test_plugin,
            env_manager="local",
            synchronous=False,
        )
        await wait_for_file(project / "pid.txt")
        pid = int((await anyio.Path(project / "pid.txt").read_text()).split()[0])
        await run.cancel()
        assert await run.get_status() is RunStatus.KILLED
        assert await run.wait() is False
    assert await anyio.to_thread.run_sync(process_gone, pid)
    tracked = await read_run(tracking_uri, run.run_id)
    assert tracked.info.status == "KILLED"


async def test_leaving_the_runner_by_an_exception_cancels_plugin_runs(
    mlflow_test_plugin: str, project: Path, tracking_uri: str
) -> None:
    """A plugin run still going when its Runner is left by an exception is stopped
    through the plugin's ``cancel()`` (called in a thread while ``wait()`` blocks in
    another) and recorded KILLED: no process outlives the runner."""
    started: list[aioproj.SubmittedRun] = []

    async def leave_by_an_error() -> None:
        async with Runner(echo="off") as runner:
            started.append(
                await runner.run(
                    str(project),
                    "sleep",
                    backend=mlflow_test_plugin,
                    env_manager="local",
                    synchronous=False,
                )
            )
            await wait_for_file(project / "pid.txt")
            raise RuntimeError("leave")

    with pytest.raises(RuntimeError, match="leave"):
        await leave_by_an_error()
    (run,) = started
    pid = int((await anyio.Path(project / "pid.txt").read_text()).split()[0])
    assert await anyio.to_thread.run_sync(process_gone, pid)
    assert (await read_run(tracking_uri, run.run_id)).info.status == "KILLED"


async def test_the_plugin_tracks_into_the_runners_store_not_the_global_one(
    mlflow_test_plugin: str,
    project: Path,
    tmp_path: Path,
    tracking_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The plugin creates its run with MLflow's process-wide tracking URI: for the call it
    is the runner's, and afterwards it is what it was (here MLFLOW_TRACKING_URI)."""
    mine = (tmp_path / "runner-store").as_uri()
    record = tmp_path / "call.json"
    async with Runner(echo="off", tracking_uri=mine) as runner:
        run = await runner.run(
            str(project),
            backend=mlflow_test_plugin,
            backend_config={"record_to": str(record)},
            env_manager="local",
        )
    call = await _recorded(record)
    assert call["tracking_uri"] == call["mlflow_tracking_uri"] == mine
    assert (await read_run(mine, run.run_id)).info.status == "FINISHED"
    assert await all_runs(tracking_uri) == []

    def global_uri() -> str:
        import mlflow

        return str(mlflow.get_tracking_uri())

    assert await anyio.to_thread.run_sync(global_uri) == tracking_uri


async def test_bad_input_never_reaches_the_plugin(
    mlflow_test_plugin: str, project: Path, tmp_path: Path, tracking_uri: str
) -> None:
    """aioproj checks the project, entry point and parameters before it calls the plugin
    (MLflow leaves that to the plugin): a bad value tracks nothing and submits nothing."""
    record = tmp_path / "call.json"
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.ParameterError, match="expects an int"):
            await runner.run(
                str(project),
                parameters={"x": "three"},
                backend=mlflow_test_plugin,
                backend_config={"record_to": str(record)},
            )
    assert not await anyio.Path(record).exists()
    assert await all_runs(tracking_uri) == []


async def test_unknown_backend_names_the_installed_plugins(
    mlflow_test_plugin: str, project: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.ExecutionError) as caught:
            await runner.run(str(project), backend="nowhere")
    assert (
        "Got unsupported execution mode nowhere. Supported values: ['databricks',"
        f" 'kubernetes', 'local', 'slurm', '{mlflow_test_plugin}']"
    ) in str(caught.value)
    assert await all_runs(tracking_uri) == []


class _NotAPlugin:
    pass


class _Exploding:
    def run(self, *args: object) -> object:
        raise ValueError("the cluster said no")


async def test_broken_plugins_are_backend_errors(project: Path, tracking_uri: str) -> None:
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.BackendError, match="has no run\\(\\) method"):
            await runner.run(
                str(project), backend=MlflowPluginBackend("odd", _NotAPlugin), env_manager="local"
            )
        with pytest.raises(aioproj.BackendError, match="could not submit the run: ValueError"):
            await runner.run(
                str(project), backend=MlflowPluginBackend("boom", _Exploding), env_manager="local"
            )
    assert await all_runs(tracking_uri) == []
