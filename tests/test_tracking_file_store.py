"""The native MLflow file store: layout compatible with MLflow's own client, both ways."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import mlflow
import pytest
import yaml

from aioproj.errors import InvalidArgumentError, TrackingError
from aioproj.tracking import FileStore, RunRecord, TrackingStore, open_store, resolve_tracking_uri

pytestmark = pytest.mark.anyio


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store root that mlflow may open (it refuses file stores without the opt-in)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return tmp_path / "mlruns"


@pytest.fixture
def store(root: Path) -> FileStore:
    return FileStore(root)


async def mlf(store: FileStore, method: str, *args: Any) -> Any:
    """Call an ``MlflowClient`` method in a worker thread (it blocks; blockbuster watches)."""

    def call() -> Any:
        return getattr(mlflow.MlflowClient(tracking_uri=store.uri), method)(*args)

    return await anyio.to_thread.run_sync(call)


async def read_yaml(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(await anyio.Path(path).read_text()))


async def names(folder: Path) -> list[str]:
    return sorted([p.name async for p in anyio.Path(folder).iterdir()])


async def test_store_is_a_tracking_store(store: FileStore) -> None:
    assert isinstance(store, TrackingStore)
    assert store.uri.startswith("file:///")
    assert store.child_env() == {
        "MLFLOW_TRACKING_URI": store.uri,
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }
    await store.aclose()


async def test_default_experiment_created_lazily(store: FileStore, root: Path) -> None:
    assert not await anyio.Path(root).exists()
    assert await store.resolve_experiment(experiment_name=None, experiment_id=None) == "0"
    assert await anyio.Path(root / ".trash").is_dir()
    meta = await read_yaml(root / "0" / "meta.yaml")
    assert meta["name"] == "Default"
    assert meta["experiment_id"] == "0"
    assert meta["lifecycle_stage"] == "active"
    assert meta["artifact_location"] == f"{store.uri}/0"
    experiment = await mlf(store, "get_experiment", "0")
    assert experiment.name == "Default"


async def test_experiment_by_name_created_once(store: FileStore) -> None:
    first = await store.resolve_experiment(experiment_name="exp", experiment_id=None)
    again = await store.resolve_experiment(experiment_name="exp", experiment_id=None)
    assert first == again
    assert first.isdigit()
    assert len(first) == 18
    experiment = await mlf(store, "get_experiment_by_name", "exp")
    assert experiment.experiment_id == first
    assert experiment.artifact_location == f"{store.uri}/{first}"


async def test_concurrent_names_create_one_experiment(store: FileStore, root: Path) -> None:
    ids: list[str] = []

    async def resolve() -> None:
        ids.append(await store.resolve_experiment(experiment_name="many", experiment_id=None))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(resolve)
    assert len(set(ids)) == 1
    assert await names(root) == sorted([".aioproj-experiments.lock", ".trash", "0", ids[0]])


async def test_separate_stores_share_experiments(root: Path) -> None:
    ids = [
        await FileStore(root).resolve_experiment(experiment_name="shared", experiment_id=None)
        for _ in range(3)
    ]
    assert len(set(ids)) == 1


async def test_experiment_by_id(store: FileStore) -> None:
    created = await store.resolve_experiment(experiment_name="x", experiment_id=None)
    assert await store.resolve_experiment(experiment_name=None, experiment_id=created) == created
    with pytest.raises(TrackingError, match="No experiment with id 12345"):
        await store.resolve_experiment(experiment_name=None, experiment_id="12345")
    with pytest.raises(InvalidArgumentError, match="Invalid experiment id"):
        await store.resolve_experiment(experiment_name=None, experiment_id="../x")


async def test_both_name_and_id_rejected(store: FileStore) -> None:
    with pytest.raises(InvalidArgumentError, match="Specify only one of"):
        await store.resolve_experiment(experiment_name="a", experiment_id="0")


async def test_env_defaults(store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    by_name = await store.resolve_experiment(experiment_name=None, experiment_id=None)
    assert by_name == await store.resolve_experiment(experiment_name="from-env", experiment_id=None)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "999")
    with pytest.raises(InvalidArgumentError, match="does not match"):
        await store.resolve_experiment(experiment_name=None, experiment_id=None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", by_name)
    assert await store.resolve_experiment(experiment_name=None, experiment_id=None) == by_name
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "424242")
    with pytest.raises(TrackingError, match="424242"):
        await store.resolve_experiment(experiment_name=None, experiment_id=None)


async def test_mlflow_experiment_found(store: FileStore) -> None:
    mlflow_id = await mlf(store, "create_experiment", "made-by-mlflow")
    found = await store.resolve_experiment(experiment_name="made-by-mlflow", experiment_id=None)
    assert found == mlflow_id
    assert await store.resolve_experiment(experiment_name=None, experiment_id=mlflow_id)


async def test_deleted_experiment_name(store: FileStore) -> None:
    exp_id = await mlf(store, "create_experiment", "gone")
    await mlf(store, "delete_experiment", exp_id)
    with pytest.raises(TrackingError, match="deleted"):
        await store.resolve_experiment(experiment_name="gone", experiment_id=None)
    with pytest.raises(TrackingError, match="deleted"):
        await store.resolve_experiment(experiment_name=None, experiment_id=exp_id)


def _assert_same(ours: RunRecord, theirs: Any) -> None:
    info, data = theirs.info, theirs.data
    assert info.run_id == ours.run_id
    assert info.experiment_id == ours.experiment_id
    assert info.run_name == ours.run_name
    assert info.status == ours.status
    assert info.start_time == ours.start_time_ms
    assert info.end_time == ours.end_time_ms
    assert info.artifact_uri == ours.artifact_uri
    assert info.lifecycle_stage == "active"
    assert data.tags == dict(ours.tags)
    assert data.params == dict(ours.params)


TAGS = {
    "mlflow.user": "alice",
    "mlflow.source.type": "PROJECT",
    "mlflow.project.entryPoint": "main",
    "nested/key:x": "v",
}
PARAMS = {"alpha": "0.5", "path/like": "a b", "unicode": "é✓"}


async def test_run_roundtrip_with_mlflow(store: FileStore) -> None:
    exp = await store.resolve_experiment(experiment_name="runs", experiment_id=None)
    run = await store.create_run(exp, run_name="my-run", tags=TAGS, params=PARAMS)
    assert run.status == "RUNNING"
    assert run.end_time_ms is None
    assert run.run_name == "my-run"
    assert run.tags == {**TAGS, "mlflow.runName": "my-run"}
    assert run.params == PARAMS
    assert await store.get_run(run.run_id) == run
    theirs = await mlf(store, "get_run", run.run_id)
    _assert_same(run, theirs)
    assert theirs.info.user_id == "alice"


@pytest.mark.parametrize("status", ["FINISHED", "FAILED", "KILLED"])
async def test_terminated_status_read_by_mlflow(store: FileStore, status: str) -> None:
    run = await store.create_run("0", run_name=None, tags={}, params={})
    await store.set_terminated(run.run_id, status, end_time_ms=run.start_time_ms + 5)
    ours = await store.get_run(run.run_id)
    assert ours.status == status
    assert ours.end_time_ms == run.start_time_ms + 5
    _assert_same(ours, await mlf(store, "get_run", run.run_id))


async def test_terminated_matches_mlflow_meta(store: FileStore, root: Path) -> None:
    ours = await store.create_run("0", run_name="a", tags={}, params={})
    await store.set_terminated(ours.run_id, "FINISHED")
    theirs = await mlf(store, "create_run", "0", None, {}, "b")
    await mlf(store, "set_terminated", theirs.info.run_id, "FINISHED")

    our_meta = await read_yaml(root / "0" / ours.run_id / "meta.yaml")
    their_meta = await read_yaml(root / "0" / theirs.info.run_id / "meta.yaml")
    assert sorted(our_meta) == sorted(their_meta)
    for key in ("status", "source_type", "lifecycle_stage", "tags", "entry_point_name"):
        assert our_meta[key] == their_meta[key]
    assert await names(root / "0" / ours.run_id) == await names(root / "0" / theirs.info.run_id)
    exp_meta = await read_yaml(root / "0" / "meta.yaml")
    other = await mlf(store, "create_experiment", "keys")
    assert sorted(exp_meta) == sorted(await read_yaml(root / other / "meta.yaml"))


async def test_generated_run_name(store: FileStore) -> None:
    run = await store.create_run("0", run_name=None, tags={}, params={})
    adjective, animal, number = run.run_name.split("-")
    assert adjective.isalpha()
    assert animal.isalpha()
    assert 0 <= int(number) <= 999
    assert run.tags["mlflow.runName"] == run.run_name
    named = await store.create_run("0", run_name=None, tags={"mlflow.runName": "t"}, params={})
    assert named.run_name == "t"
    with pytest.raises(InvalidArgumentError, match="disagree"):
        await store.create_run("0", run_name="x", tags={"mlflow.runName": "y"}, params={})


async def test_set_tags_and_rename(store: FileStore) -> None:
    run = await store.create_run("0", run_name="before", tags={}, params={})
    await store.set_tags(run.run_id, {"mlflow.project.backend": "local", "mlflow.runName": "new"})
    ours = await store.get_run(run.run_id)
    assert ours.run_name == "new"
    assert ours.tags["mlflow.project.backend"] == "local"
    _assert_same(ours, await mlf(store, "get_run", run.run_id))


async def test_mlflow_writes_into_our_run(store: FileStore) -> None:
    run = await store.create_run("0", run_name="shared", tags={"a": "1"}, params={"p": "1"})
    await mlf(store, "log_metric", run.run_id, "loss", 0.25)
    await mlf(store, "log_param", run.run_id, "extra", "2")
    await mlf(store, "set_tag", run.run_id, "b", "2")
    ours = await store.get_run(run.run_id)
    assert ours.params == {"p": "1", "extra": "2"}
    assert ours.tags["b"] == "2"
    await store.set_terminated(run.run_id, "FINISHED")
    theirs = await mlf(store, "get_run", run.run_id)
    assert theirs.data.metrics == {"loss": 0.25}
    _assert_same(await store.get_run(run.run_id), theirs)


async def test_mlflow_run_read_by_us(store: FileStore) -> None:
    theirs = await mlf(store, "create_run", "0", None, {"t": "v"}, "by-mlflow")
    ours = await store.get_run(theirs.info.run_id)
    assert ours.run_name == "by-mlflow"
    assert ours.tags["t"] == "v"
    assert ours.status == "RUNNING"


async def test_artifacts_listed_by_mlflow(store: FileStore, tmp_path: Path) -> None:
    run = await store.create_run("0", run_name=None, tags={}, params={})
    await store.log_artifact_bytes(run.run_id, "aioproj/output.log", b"one\n")
    await store.log_artifact_bytes(run.run_id, "aioproj/output.log", b"two\n", append=True)
    await store.log_artifact_bytes(run.run_id, "top.txt", b"x")
    top = await mlf(store, "list_artifacts", run.run_id)
    assert sorted(a.path for a in top) == ["aioproj", "top.txt"]
    nested = await mlf(store, "list_artifacts", run.run_id, "aioproj")
    assert [(a.path, a.file_size) for a in nested] == [("aioproj/output.log", 8)]
    local = await mlf(store, "download_artifacts", run.run_id, "aioproj/output.log", str(tmp_path))
    assert await anyio.Path(local).read_bytes() == b"one\ntwo\n"
    with pytest.raises(InvalidArgumentError, match="artifact path"):
        await store.log_artifact_bytes(run.run_id, "../escape", b"")


@pytest.mark.parametrize(
    "key", ["", "../up", "/abs", "a//b", "a/", "bad*char", "x" * 251, "trailing\n", "\n"]
)
async def test_bad_keys_rejected(store: FileStore, key: str) -> None:
    with pytest.raises(InvalidArgumentError, match="key"):
        await store.create_run("0", run_name=None, tags={key: "v"}, params={})
    with pytest.raises(InvalidArgumentError, match="key"):
        await store.create_run("0", run_name=None, tags={}, params={key: "v"})


async def test_keys_the_file_system_cannot_take_are_refused_before_writing(
    store: FileStore, root: Path
) -> None:
    """``\u00e9`` * 200 is 400 bytes, past a file name's 255; ``a`` and ``a/b`` cannot be
    a file and a folder at once. Both failed half-way through writing a run before."""
    for tags in ({"\u00e9" * 200: "v"}, {"a": "1", "a/b": "2"}, {"x/y/z": "1", "x": "2"}):
        with pytest.raises(InvalidArgumentError, match="file"):
            await store.create_run("0", run_name=None, tags=tags, params={})
        with pytest.raises(InvalidArgumentError, match="file"):
            await store.create_run("0", run_name=None, tags={}, params=tags)
    written = await anyio.to_thread.run_sync(lambda: [p.name for p in root.glob("*/*")])
    assert [name for name in written if name != "meta.yaml"] == []  # no run folder


WRITE_FAILS = """\
import asyncio, resource, signal, sys
import aioproj

async def main():
    async with aioproj.Runner(echo="off", tracking_uri=sys.argv[1]) as runner:
        await runner.run(sys.argv[2], env_manager="local", parameters={"v": "fits"})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
        try:
            await runner.run(sys.argv[2], env_manager="local", parameters={"v": "x" * 5000})
        except aioproj.TrackingError as exc:
            print("refused:", exc)

asyncio.run(main())
"""


async def test_a_run_that_fails_while_written_leaves_no_folder(root: Path, tmp_path: Path) -> None:
    """A real write failure half-way through a run (the file size limit gives EFBIG where a
    full disk gives ENOSPC): the run is refused and no folder without meta.yaml is left."""
    import sys

    project = tmp_path / "proj"
    await anyio.Path(project).mkdir()
    mlproject = "entry_points:\n  main:\n    parameters: {v: string}\n    command: 'true'\n"
    await anyio.Path(project / "MLproject").write_text(mlproject)
    script = tmp_path / "write_fails.py"
    await anyio.Path(script).write_text(WRITE_FAILS)
    done = await anyio.run_process([sys.executable, str(script), root.as_uri(), str(project)])
    assert b"refused:" in done.stdout, done.stderr
    runs = [p async for p in anyio.Path(root / "0").iterdir() if await p.is_dir()]
    assert len(runs) == 1  # the first run, whole
    assert await (runs[0] / "meta.yaml").is_file()


async def test_unknown_run_and_experiment(store: FileStore) -> None:
    with pytest.raises(TrackingError, match="not found"):
        await store.get_run("0" * 32)
    with pytest.raises(TrackingError, match="not found"):
        await store.set_terminated("0" * 32, "FINISHED")
    with pytest.raises(InvalidArgumentError):
        await store.get_run("../../etc")
    with pytest.raises(InvalidArgumentError):
        await store.get_run("0" * 32 + "\n")
    with pytest.raises(TrackingError, match="No experiment"):
        await store.create_run("777", run_name=None, tags={}, params={})
    run = await store.create_run("0", run_name=None, tags={}, params={})
    with pytest.raises(InvalidArgumentError, match="status"):
        await store.set_terminated(run.run_id, "RUNNING")


async def test_get_run_without_cache(root: Path) -> None:
    run = await FileStore(root).create_run("0", run_name="r", tags={}, params={"k": "v"})
    assert await FileStore(root.as_uri()).get_run(run.run_id) == run


def test_resolve_tracking_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///from/env")
    assert resolve_tracking_uri() == "file:///from/env"
    assert resolve_tracking_uri("http://explicit") == "http://explicit"


@pytest.mark.parametrize(
    ("uri", "store"),
    [("http://host:5000", "RestStore"), ("https://host", "RestStore"),
     ("databricks", "RestStore"), ("databricks://profile", "RestStore"),
     ("sqlite:////tmp/x.db", "MlflowStore"), ("postgresql+psycopg2://u@h/db", "MlflowStore")],
)  # fmt: skip
def test_open_store_picks_the_store_for_the_scheme(uri: str, store: str) -> None:
    assert type(open_store(uri)).__name__ == store


def test_open_store_empty_uri() -> None:
    with pytest.raises(InvalidArgumentError, match="empty"):
        open_store("")


def test_open_store_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    by_uri = open_store((tmp_path / "a").as_uri())
    by_path = open_store("a")
    assert isinstance(by_uri, FileStore)
    assert by_uri.uri == by_path.uri == (tmp_path / "a").as_uri()
    with pytest.raises(InvalidArgumentError):
        FileStore("file://otherhost/x")
