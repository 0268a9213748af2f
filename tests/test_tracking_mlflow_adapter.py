"""The mlflow client adapter: sqlite (and any other MLflow store) through MlflowClient."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from aioproj import Runner, RunStatus
from aioproj.errors import InvalidArgumentError, TrackingError
from aioproj.tracking import FileStore, MlflowStore, TrackingStore, open_store
from aioproj.tracking.base import CLIENT_KEY_TAG

from .mlflow_server import read_back, write_tracked_project
from .support import download_artifact

pytestmark = [
    pytest.mark.anyio,
    # mlflow 3.17's SQL store uses loader options SQLAlchemy 2.1 deprecates.
    pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning"),
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in tmp_path: MLflow's sqlite store puts default artifacts under ./mlruns."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return tmp_path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_tracked_project(tmp_path / "project")


def test_open_store_sends_other_schemes_to_the_adapter(workdir: Path) -> None:
    store = open_store("sqlite:///rel.db")
    assert isinstance(store, MlflowStore)
    assert isinstance(store, TrackingStore)
    assert store.uri == f"sqlite:///{workdir / 'rel.db'}"  # absolute: children run elsewhere
    assert store.child_env() == {"MLFLOW_TRACKING_URI": store.uri}
    for uri in ("postgresql+psycopg2://u@h/db", "mysql://u@h/db", "mssql://h/db"):
        assert isinstance(open_store(uri), MlflowStore)
    absolute = f"sqlite:///{workdir / 'abs.db'}"
    assert open_store(absolute).uri == absolute


async def test_records_match_the_file_store(workdir: Path) -> None:
    tags = {"mlflow.user": "alice", "mlflow.source.type": "PROJECT", "with/slash": "x"}
    params = {"alpha": "0.5", "words": "two words"}
    adapter = MlflowStore(f"sqlite:///{workdir / 'db.sqlite'}")
    views = []
    for store in (adapter, FileStore(workdir / "mlruns-file")):
        exp = await store.resolve_experiment(experiment_name="same", experiment_id=None)
        assert exp == await store.resolve_experiment(experiment_name="same", experiment_id=None)
        record = await store.create_run(
            exp, run_name="calm-owl-1", tags=tags, params=params, start_time_ms=1_000
        )
        assert (record.status, record.end_time_ms, record.run_name) == (
            "RUNNING",
            None,
            "calm-owl-1",
        )
        await store.set_tags(record.run_id, {"late": "1"})
        await store.log_artifact_bytes(record.run_id, "aioproj/output.log", b"a\n")
        await store.log_artifact_bytes(record.run_id, "aioproj/output.log", b"b\n", append=True)
        await store.set_terminated(record.run_id, "KILLED", end_time_ms=2_000)
        back = await store.get_run(record.run_id)
        assert (back.status, back.end_time_ms) == ("KILLED", 2_000)
        assert back.params == params
        assert back.tags == {**tags, "mlflow.runName": "calm-owl-1", "late": "1"}
        views.append(await anyio.to_thread.run_sync(_view, store.uri, record.run_id))
    assert views[0] == views[1]
    assert views[0]["artifact"] == b"a\nb\n"
    await adapter.aclose()


def _view(uri: str, run_id: str) -> dict[str, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    return {
        "info": (run.info.status, run.info.run_name, run.info.start_time, run.info.end_time),
        "user": run.info.user_id,
        "tags": dict(run.data.tags),
        "params": dict(run.data.params),
        "artifact": download_artifact(client, run_id, "aioproj/output.log"),
    }


async def test_errors_become_tracking_errors(workdir: Path) -> None:
    store = MlflowStore(f"sqlite:///{workdir / 'db.sqlite'}")
    with pytest.raises(TrackingError, match="987654"):
        await store.resolve_experiment(experiment_name=None, experiment_id="987654")
    with pytest.raises(TrackingError, match="deadbeef"):
        await store.get_run("deadbeef")
    with pytest.raises(InvalidArgumentError):
        await store.set_terminated("deadbeef", "RUNNING")
    assert await store.resolve_experiment(experiment_name=None, experiment_id=None) == "0"


def test_missing_mlflow_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys, anyio; sys.modules['mlflow'] = None\n"
        "from aioproj.tracking import open_store\n"
        "from aioproj.errors import InvalidArgumentError\n"
        f"store = open_store('sqlite:///{tmp_path}/x.db')\n"
        "try:\n"
        "    anyio.run(lambda: store.get_run('abc'))\n"
        "except InvalidArgumentError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'aioproj[mlflow]'" in out.stdout


async def test_end_to_end_run_on_sqlite(project: Path, workdir: Path) -> None:
    seen = []
    for uri in (f"sqlite:///{workdir / 'db.sqlite'}", (workdir / "file-store").as_uri()):
        async with Runner(tracking_uri=uri, echo="off") as runner:
            run = await runner.run(str(project), parameters={"alpha": 1.5}, env_manager="local")
            assert await run.get_status() is RunStatus.FINISHED
        seen.append(await anyio.to_thread.run_sync(read_back, uri, run.run_id))
    on_sqlite, on_file = seen
    assert on_sqlite["status"] == "FINISHED"
    assert on_sqlite["metrics"] == {"score": 3.0}
    assert on_sqlite["tags"]["from_child"] == "yes"
    for view in seen:
        assert view["tags"].pop("mlflow.runName") == view.pop("run_name")
    # The database picks the run id, so the run carries its journal key as a tag; the
    # file store's run id is that key.
    assert on_sqlite["tags"].pop(CLIENT_KEY_TAG) != run.run_id
    assert on_sqlite == on_file


async def test_database_password_never_appears_in_errors_or_repr() -> None:
    store = MlflowStore("mysqlx://alice:S3cretPW@127.0.0.1:1/db")
    assert "S3cretPW" not in repr(store)
    with pytest.raises(TrackingError) as info:
        await store.resolve_experiment(experiment_name="x", experiment_id=None)
    assert "S3cretPW" not in str(info.value)
    assert "alice@127.0.0.1" in str(info.value)
