"""The default tracking URI is the installed MLflow's default, in the same directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import aioproj
from aioproj.tracking import resolve
from aioproj.tracking.resolve import default_tracking_uri, resolve_tracking_uri

from .support import make_project


def _mlflow_default(cwd: Path) -> str:
    """What ``mlflow.get_tracking_uri()`` answers in ``cwd`` with no URI set."""
    code = "import mlflow; print(mlflow.get_tracking_uri())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.allow_blocking
def test_default_is_mlflows_in_an_empty_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve.installed_mlflow_version() is not None  # the test extra installs mlflow
    expected = _mlflow_default(tmp_path)
    assert expected.startswith("sqlite:")  # MLflow >= 3.7
    assert default_tracking_uri() == expected
    assert resolve_tracking_uri() == expected


@pytest.mark.allow_blocking
def test_existing_mlruns_data_keeps_the_file_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlruns" / "0").mkdir(parents=True)
    (tmp_path / "mlruns" / "0" / "meta.yaml").write_text("name: Default\n")
    expected = _mlflow_default(tmp_path)
    assert expected == (tmp_path / "mlruns").as_uri()
    assert default_tracking_uri() == expected


def test_an_mlruns_folder_without_experiments_does_not_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlruns" / ".trash").mkdir(parents=True)
    (tmp_path / "mlruns" / "models").mkdir()
    assert default_tracking_uri() == "sqlite:///" + (tmp_path / "mlflow.db").as_posix()


@pytest.mark.parametrize("version", [None, (3, 6), (2, 16)])
def test_without_mlflow_or_before_3_7_the_default_is_mlruns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: tuple[int, int] | None
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(resolve, "installed_mlflow_version", lambda: version)
    assert default_tracking_uri() == (tmp_path / "mlruns").as_uri()


def test_explicit_uri_and_environment_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///from/env")
    assert resolve_tracking_uri() == "file:///from/env"
    assert resolve_tracking_uri("http://explicit") == "http://explicit"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current directory, and a project elsewhere."""
    make_project(tmp_path / "proj", "name: p\nentry_points:\n  main:\n    command: echo hi\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "work"


@pytest.mark.anyio
# mlflow 3.17's SQL store uses loader options SQLAlchemy 2.1 deprecates.
@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")
async def test_a_run_with_no_uri_lands_where_mlflow_looks(workdir: Path) -> None:
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(str(workdir.parent / "proj"), env_manager="local")
    assert await anyio.Path(workdir / "mlflow.db").exists()
    code = "import mlflow, sys; r = mlflow.MlflowClient().get_run(sys.argv[1]);print(r.info.status)"
    result = await anyio.run_process(
        [sys.executable, "-c", code, run.run_id], cwd=workdir, check=True
    )
    assert result.stdout.decode().strip().splitlines()[-1] == "FINISHED"
