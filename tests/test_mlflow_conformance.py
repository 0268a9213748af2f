"""MLflow's behaviour for MLflow Projects, stated as tests of aioproj.

Each test names, in its docstring, the MLflow code (``mlflow/projects/...``) whose
behaviour it checks; where MLflow is installed (the test extra) the test asks MLflow
itself (its command rendering, its messages, its CLI) and compares. Deliberate
differences are in the README ("Differences from MLflow") and are tested as such here.

More of the same behaviours, in depth: tests/test_path_parameters.py (path parameters
downloaded into ``storage_dir``) and tests/test_mlflow_plugins.py (backend plugins).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioproj
from aioproj import Runner, RunStatus
from aioproj.backends import load_backend
from aioproj.backends.databricks import check_backend_config, check_tracking_uri
from aioproj.backends.mlflow_plugin import MlflowPluginBackend
from aioproj.project import load_project
from aioproj.tracking import open_store

from .support import all_runs, amake_project, make_project, read_run

pytestmark = pytest.mark.anyio

MLPROJECT = """
name: conformance
entry_points:
  main:
    parameters:
      use_start_run: {type: string, default: "0"}
    command: "echo main {use_start_run}"
  line_count:
    parameters:
      path: path
    command: "wc -l < {path} > count.txt"
  sleep:
    parameters:
      duration: float
    command: "sleep {duration}"
"""

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    """MLflow's ``local_git_repo`` fixture, in spirit: a git repository (branch
    ``master``, no remote) with the project in ``example_project/``."""
    repo = tmp_path / "repo"
    make_project(repo / "example_project", MLPROJECT)
    _git(repo, "init", "-q", "-b", "master")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "init")
    return repo


@pytest.fixture
async def project(tmp_path: Path) -> Path:
    return await amake_project(tmp_path / "proj", MLPROJECT)


# -- 1. path parameters given a URI are downloaded ----------------------------------------


async def test_path_parameter_with_a_runs_uri_is_downloaded(
    project: Path, tmp_path: Path, tracking_uri: str
) -> None:
    """``_project_spec.Parameter._compute_path_value``: a ``path`` value that is a URI is
    downloaded with ``artifact_utils._download_artifact_from_uri`` into
    ``<utils._get_storage_dir(storage_dir)>/param_<position>``, and the command gets the
    local file (MLflow's ``test_run_with_artifact_path`` runs ``runs:/<id>/model.pkl``);
    ``utils._create_run`` logs the URI itself (params computed with ``storage_dir=None``).
    """
    store = open_store(tracking_uri)
    try:
        source = await store.create_run("0", run_name="src", tags={}, params={})
        await store.log_artifact_bytes(source.run_id, "model.pkl", b"a\nb\nc\n")
    finally:
        await store.aclose()
    uri = f"runs:/{source.run_id}/model.pkl"
    storage = tmp_path / "storage"
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            "line_count",
            parameters={"path": uri},
            env_manager="local",
            storage_dir=storage,
        )
    assert (await anyio.Path(project / "count.txt").read_text()).strip() == "3"
    (made,) = [p async for p in anyio.Path(storage).iterdir()]
    assert [p.name async for p in (made / "param_0").iterdir()] == ["model.pkl"]
    assert (await read_run(tracking_uri, run.run_id)).data.params == {"path": uri}


# -- 2. unknown backend ------------------------------------------------------------------


async def test_unknown_backend_is_an_execution_error_with_mlflows_message(
    project: Path, tracking_uri: str
) -> None:
    """``mlflow.projects._run``: ``ExecutionException("Got unsupported execution mode
    {backend}. Supported values: ['databricks', 'kubernetes', 'local']")`` (MLflow's
    ``test_invalid_run_mode``). MLflow creates the run before it finds out; aioproj
    tracks nothing (README, Differences from MLflow)."""
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.ExecutionError) as caught:
            await runner.run(str(project), backend="some unsupported mode")
    assert str(caught.value).startswith(
        "Got unsupported execution mode some unsupported mode. Supported values:"
        " ['databricks', 'kubernetes', 'local'"
    )
    assert not isinstance(caught.value, aioproj.InvalidArgumentError)
    assert await all_runs(tracking_uri) == []


# -- 3. and 4. versions of local git repositories -----------------------------------------


@pytest.mark.parametrize("version", ["master", "commit"])
async def test_file_git_url_with_a_version_records_mlflows_git_tags(
    git_repo: Path, tracking_uri: str, version: str
) -> None:
    """``utils._fetch_project`` + ``_fetch_git_repo`` + ``_create_run`` (MLflow's
    ``test_run_local_git_repo``): for ``file://<repo>#example_project`` at a version,
    ``mlflow.source.git.repoURL`` is the ``file://`` URI (MLflow adds it to the
    repository as ``origin`` and records that remote), ``mlflow.source.git.branch`` the
    version when it is a branch, ``mlflow.source.git.commit`` the commit run."""
    head = await anyio.to_thread.run_sync(_git, git_repo, "rev-parse", "HEAD")
    uri = git_repo.as_uri()
    async with Runner(echo="off") as runner:
        run = await runner.run(
            f"{uri}#example_project",
            version=head if version == "commit" else version,
            parameters={"use_start_run": "1"},
            env_manager="local",
        )
        assert await run.get_status() is RunStatus.FINISHED
    record = await read_run(tracking_uri, run.run_id)
    tags = record.data.tags
    assert tags["mlflow.source.git.repoURL"] == uri
    assert tags["mlflow.source.git.commit"] == head
    assert "file:" in tags["mlflow.source.name"]
    assert tags["mlflow.source.type"] == "PROJECT"
    assert tags["mlflow.project.backend"] == "local"
    if version == "master":
        assert tags["mlflow.source.git.branch"] == "master"
    else:
        assert "mlflow.source.git.branch" not in tags
    assert record.data.params == {"use_start_run": "1"}
    # MLflow checks the version out in the user's repository; aioproj never touches it.
    assert await anyio.to_thread.run_sync(_git, git_repo, "remote") == ""


async def test_repo_url_is_the_first_remote_without_credentials(
    git_repo: Path, tracking_uri: str
) -> None:
    """``mlflow.utils.git_utils.get_git_repo_url``: the first remote's URL, credentials
    stripped. Asked of MLflow itself, on the same repository."""
    await anyio.to_thread.run_sync(
        _git, git_repo, "remote", "add", "origin", "https://bob:s3cret@git.example.com/o/r.git"
    )
    async with Runner(echo="off") as runner:
        run = await runner.run(f"{git_repo}#example_project", version="master", env_manager="local")
    tags = (await read_run(tracking_uri, run.run_id)).data.tags

    def mlflows() -> str | None:
        from mlflow.utils.git_utils import get_git_repo_url

        return get_git_repo_url(str(git_repo))

    assert tags["mlflow.source.git.repoURL"] == await anyio.to_thread.run_sync(mlflows)
    assert tags["mlflow.source.git.repoURL"] == "https://git.example.com/o/r.git"


@pytest.mark.parametrize("where", ["subdirectory", "plain directory", "no commit"])
async def test_version_needs_a_git_repository_root(
    git_repo: Path, tmp_path: Path, tracking_uri: str, where: str
) -> None:
    """``utils._fetch_project``: with a version, a local path must pass ``_is_git_repo``
    (``git.Repo(path)`` without searching upwards, and at least one branch), else
    ``ExecutionException("Setting a version is only supported for Git project URIs")``.
    A directory inside a repository is refused (give ``<root>#subdir``)."""
    if where == "subdirectory":
        uri = str(git_repo / "example_project")
    elif where == "plain directory":
        uri = str(await amake_project(tmp_path / "plain", MLPROJECT))
    else:
        empty = tmp_path / "empty"
        await anyio.Path(empty).mkdir()
        await anyio.to_thread.run_sync(_git, empty, "init", "-q")
        uri = str(empty)
    async with Runner(echo="off") as runner:
        with pytest.raises(
            aioproj.SourceError, match=r"^Setting a version is only supported for Git project URIs"
        ):
            await runner.run(uri, version="master", env_manager="local")
    assert await all_runs(tracking_uri) == []


# -- 5. and 6. Databricks backend_config -------------------------------------------------


def _mlflows_validation(tracking_uri: str, config: dict[str, Any] | None) -> str:
    """The message of MLflow's own ``databricks.before_run_validations``."""
    from mlflow.projects.databricks import before_run_validations

    try:
        before_run_validations(tracking_uri, config)
    except Exception as exc:
        return str(getattr(exc, "message", exc))
    return ""


async def test_databricks_empty_backend_config_goes_on_to_the_tracking_uri_check(
    project: Path, tracking_uri: str
) -> None:
    """``databricks.before_run_validations``: only ``backend_config is None`` is
    "Backend spec must be provided"; ``{}`` goes on to the next check, the tracking URI,
    which a file store fails. Same messages as MLflow's, in the same order."""
    local = "file:///tmp/mlruns"
    with pytest.raises(aioproj.BackendError) as missing:
        check_backend_config(None)
    assert str(missing.value) == await anyio.to_thread.run_sync(_mlflows_validation, local, None)
    check_backend_config({})  # not missing
    with pytest.raises(aioproj.BackendError) as local_uri:
        check_tracking_uri(local)
    assert str(local_uri.value) == await anyio.to_thread.run_sync(_mlflows_validation, local, {})

    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.BackendError, match=r"^Backend spec must be provided"):
            await runner.run(str(project), backend="databricks")
        with pytest.raises(aioproj.BackendError, match=r"^When running on Databricks, the"):
            await runner.run(str(project), backend="databricks", backend_config={})
    assert await all_runs(tracking_uri) == []


async def test_databricks_existing_cluster_id_is_an_invalid_argument(
    project: Path, tracking_uri: str
) -> None:
    """``databricks.before_run_validations``: ``existing_cluster_id`` is
    ``MlflowException(..., INVALID_PARAMETER_VALUE)`` (an argument error, not an
    ExecutionException), checked before the tracking URI; same message."""
    config = {"existing_cluster_id": "0101-x"}
    mlflows = await anyio.to_thread.run_sync(_mlflows_validation, "databricks", config)
    with pytest.raises(aioproj.InvalidArgumentError) as caught:
        check_backend_config(config)
    assert str(caught.value) == mlflows

    def mlflows_error_code() -> str:
        from mlflow.exceptions import MlflowException
        from mlflow.projects.databricks import before_run_validations

        try:
            before_run_validations("databricks", config)
        except MlflowException as exc:
            return str(exc.error_code)
        return ""

    assert await anyio.to_thread.run_sync(mlflows_error_code) == "INVALID_PARAMETER_VALUE"
    async with Runner(echo="off") as runner:  # a file store: existing_cluster_id first
        with pytest.raises(aioproj.InvalidArgumentError, match="existing clusters"):
            await runner.run(str(project), backend="databricks", backend_config=config)
    assert await all_runs(tracking_uri) == []


# -- 7. the CLI without a URI --------------------------------------------------------------


def test_cli_without_uri_says_missing_argument_like_mlflow_run(tmp_path: Path) -> None:
    """``mlflow/cli/__init__.py::run`` (click): ``mlflow run`` with no URI exits 2 with
    "Missing argument 'URI'". Both commands, run for real."""
    ours = subprocess.run(
        [sys.executable, "-m", "aioproj", "run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    mlflows = subprocess.run(
        [MLFLOW, "run"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert mlflows.returncode == ours.returncode == 2
    assert "Missing argument 'URI'" in mlflows.stderr
    assert "Missing argument 'URI'" in ours.stderr
    assert "usage: aioproj run" in ours.stderr


# -- 8. cancellation -----------------------------------------------------------------------


async def test_cancel_stops_one_run_and_records_killed(project: Path, tracking_uri: str) -> None:
    """MLflow's ``test_cancel_run``: cancelling one of two async runs stops it and not the
    other, and ``cancel()`` after the end changes nothing. MLflow then records the
    cancelled run FAILED (``_wait_for`` on interrupt, #1832); aioproj records KILLED,
    which MLflow's ``RunStatus`` has and which is what happened (README, Differences)."""
    async with Runner(echo="off") as runner:
        first, second = [
            await runner.run(
                str(project),
                "sleep",
                parameters={"duration": 2},
                env_manager="local",
                synchronous=False,
            )
            for _ in range(2)
        ]
        await first.cancel()
        assert await first.get_status() is RunStatus.KILLED
        assert await second.wait() is True
        await second.cancel()
        assert await second.get_status() is RunStatus.FINISHED
    assert (await read_run(tracking_uri, first.run_id)).info.status == "KILLED"
    assert (await read_run(tracking_uri, second.run_id)).info.status == "FINISHED"


# -- 9. R entry points ---------------------------------------------------------------------


def _mlflows_command(directory: Path, entry_point: str, params: dict[str, Any]) -> str:
    from mlflow.projects import _project_spec

    project = _project_spec.load_project(str(directory))
    command: str = project.get_entry_point(entry_point).compute_command(params, None)
    return command


@pytest.mark.parametrize(
    ("script", "params"),
    [("train.R", {}), ("models/fit.R", {"alpha": 0.5, "name": "two words"})],
)
async def test_r_script_entry_point_renders_as_mlflow_renders_it(
    project: Path, script: str, params: dict[str, Any]
) -> None:
    """``_project_spec.Project.get_entry_point``: an ``.R`` entry point is ``Rscript -e
    "mlflow::mlflow_source('<script>')" --args``, extra parameters appended by
    ``EntryPoint.compute_command``. Compared with MLflow's own rendering."""
    ours = aioproj.project.resolve_parameters(
        await anyio.to_thread.run_sync(load_project, project),
        (await anyio.to_thread.run_sync(load_project, project)).get_entry_point(script),
        params,
    ).command
    assert ours == await anyio.to_thread.run_sync(_mlflows_command, project, script, params)
    assert ours.startswith(f"Rscript -e \"mlflow::mlflow_source('{script}')\" --args")


STAND_IN_RSCRIPT = """\
#!{python}
# A stand-in for R's Rscript (R is not installed here): it checks its exact argv.
import json, os, sys

expected = json.loads(os.environ["EXPECTED_RSCRIPT_ARGV"])
with open("rscript-argv.json", "w") as f:
    json.dump({{"argv": sys.argv[1:], "run_id": os.environ.get("MLFLOW_RUN_ID")}}, f)
sys.exit(0 if sys.argv[1:] == expected else 3)
"""


async def test_r_script_runs_with_rscript(
    project: Path, tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of ``train.R`` starts ``Rscript`` with exactly ``-e
    mlflow::mlflow_source('train.R') --args --alpha 0.5`` in the project directory, inside
    the tracked run (MLFLOW_RUN_ID set, as the R package's ``mlflow_source`` expects)."""
    bin_dir = tmp_path / "bin"
    await anyio.Path(bin_dir).mkdir()
    rscript = anyio.Path(bin_dir / "Rscript")
    await rscript.write_text(STAND_IN_RSCRIPT.format(python=sys.executable))
    await rscript.chmod(0o755)
    expected = ["-e", "mlflow::mlflow_source('train.R')", "--args", "--alpha", "0.5"]
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("EXPECTED_RSCRIPT_ARGV", json.dumps(expected))
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), "train.R", parameters={"alpha": 0.5}, env_manager="local"
        )
    seen = json.loads(await anyio.Path(project / "rscript-argv.json").read_text())
    assert seen == {"argv": expected, "run_id": run.run_id}
    record = await read_run(tracking_uri, run.run_id)
    assert record.info.status == "FINISHED"
    assert record.data.tags["mlflow.project.entryPoint"] == "train.R"


# -- 10. MLflow backend plugins ------------------------------------------------------------


async def test_a_backend_plugin_is_found_where_mlflow_finds_it(
    mlflow_test_plugin: str, project: Path, tracking_uri: str
) -> None:
    """``backend/loader.py::load_backend``: a name that is not built in is the entry point
    of that name in the ``mlflow.project_backend`` group, called with no arguments. The
    same plugin class for MLflow's loader and for aioproj; the run is tagged with the
    plugin's name (``mlflow.projects._run``). tests/test_mlflow_plugins.py has the rest."""

    def mlflows() -> type:
        from mlflow.projects.backend import loader

        return type(loader.load_backend(mlflow_test_plugin))

    backend = await anyio.to_thread.run_sync(load_backend, mlflow_test_plugin)
    assert isinstance(backend, MlflowPluginBackend)
    assert backend._builder is await anyio.to_thread.run_sync(mlflows)
    async with Runner(echo="off") as runner:
        run = await runner.run(str(project), backend=mlflow_test_plugin, env_manager="local")
    tags = (await read_run(tracking_uri, run.run_id)).data.tags
    assert tags["mlflow.project.backend"] == mlflow_test_plugin


# -- 11. the "Running command" line --------------------------------------------------------


async def test_running_command_line_before_a_local_run(
    project: Path, tracking_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``backend/local.py::_run_entry_point`` logs ``=== Running command '<command>' in
    run with ID '<run_id>' ===`` before it starts the process; the command is MLflow's
    rendering. Unlike MLflow, credentials in URLs are redacted."""
    caplog.set_level(logging.INFO, logger="aioproj.backends.local")
    params = {"use_start_run": "https://bob:s3cret@host.example/x"}
    async with Runner(echo="off") as runner:
        run = await runner.run(str(project), parameters=params, env_manager="local")
    lines = [r.getMessage() for r in caplog.records if r.name == "aioproj.backends.local"]
    shown = {"use_start_run": "https://host.example/x"}
    command = await anyio.to_thread.run_sync(_mlflows_command, project, "main", shown)
    assert lines == [f"=== Running command '{command}' in run with ID '{run.run_id}' ==="]
    assert "s3cret" not in caplog.text


def test_cli_prints_the_running_command_line(tmp_path: Path) -> None:
    """``mlflow run`` shows that line (MLflow's logger prints INFO); so does ``aioproj
    run``, on stderr, before the run's end."""
    proj = make_project(tmp_path / "proj", MLPROJECT)
    done = subprocess.run(
        [sys.executable, "-m", "aioproj", "run", str(proj), "--env-manager", "local"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={**os.environ, "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "main 0\n"
    running = done.stderr.index("=== Running command 'echo main 0' in run with ID '")
    assert running < done.stderr.index("succeeded ===")


# -- synchronous waits -----------------------------------------------------------------------


async def test_failed_synchronous_run_raises_mlflows_message(
    project: Path, tracking_uri: str
) -> None:
    """``mlflow.projects._wait_for``: a failed run is set FAILED and raises
    ``ExecutionException("Run (ID '<run_id>') failed")``."""
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.ExecutionError, match=r"^Run \(ID '[0-9a-f]{32}'\) failed$"):
            await runner.run(
                str(project), "sleep", parameters={"duration": -1}, env_manager="local"
            )
    (record,) = await all_runs(tracking_uri)
    assert record.info.status == "FAILED"


async def test_async_run_is_running_then_finished(project: Path, tracking_uri: str) -> None:
    """MLflow's ``test_run_async``: an asynchronous ``sleep`` run is RUNNING, then
    FINISHED once waited for."""
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            "sleep",
            parameters={"duration": 1},
            env_manager="local",
            synchronous=False,
        )
        assert await run.get_status() is RunStatus.RUNNING
        assert await run.wait() is True
        assert await run.get_status() is RunStatus.FINISHED


async def test_run_id_is_reused_with_its_name(project: Path, tracking_uri: str) -> None:
    """``mlflow.projects.run(run_id=...)``: the local backend records into that run
    (``utils.get_or_create_run``) and ``_run`` sets ``mlflow.runName`` on it."""
    store = open_store(tracking_uri)
    try:
        existing = await store.create_run("0", run_name="before", tags={}, params={})
    finally:
        await store.aclose()
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), run_id=existing.run_id, run_name="after", env_manager="local"
        )
    assert run.run_id == existing.run_id
    record = await read_run(tracking_uri, existing.run_id)
    assert record.info.run_name == "after"
    assert record.info.status == "FINISHED"
    assert len(await all_runs(tracking_uri)) == 1
