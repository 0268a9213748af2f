"""``path`` parameters given as URIs are downloaded before a local run, as MLflow does.

MLflow: ``_project_spec.Parameter._compute_path_value`` downloads a ``path`` value that is
a URI with ``artifact_utils._download_artifact_from_uri`` into ``<storage dir>/param_<i>``,
where the storage dir is ``utils._get_storage_dir(storage_dir)`` (a new directory in
``storage_dir``, or in the system temp dir), and the command gets the local path; the run
records the URI (``_create_run`` computes params with ``storage_dir=None``).

Servers here are real: a local HTTP server, the file store, ``mlflow server``.
"""

from __future__ import annotations

import collections
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioproj
from aioproj import Runner, RunStatus
from aioproj.backends.base import LaunchRequest
from aioproj.backends.local import LocalBackend, LocalLaunch
from aioproj.tracking import open_store

from .mlflow_server import MlflowServer
from .support import all_runs, amake_project, read_run

pytestmark = pytest.mark.anyio

MLPROJECT = """
entry_points:
  main:
    parameters:
      label: {type: string, default: x}
      data: path
    command: "echo {data} > where.txt; cat {data} > seen.txt"
  listing:
    parameters:
      data: path
    command: "echo {data} > where.txt; ls {data} > seen.txt"
"""


class _Files(ThreadingHTTPServer):
    """Serves ``files`` by path; counts GETs; ``/slow`` answers headers, then waits."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.gets: collections.Counter[str] = collections.Counter()
        self.slow_started = threading.Event()
        self.release = threading.Event()
        self.gate = threading.Event()  # "/gated" answers once it is set
        self.gated_seen = threading.Event()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: _Files

    def do_GET(self) -> None:
        self.server.gets[self.path] += 1
        if self.path == "/gated":
            self.server.gated_seen.set()
            self.server.gate.wait(30)
            self.server.files["/gated"] = b"gated\n"
        if self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"partial")
            self.wfile.flush()
            self.server.slow_started.set()
            self.server.release.wait(30)
            return
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_files() -> Iterator[_Files]:
    server = _Files()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.gate.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
async def project(tmp_path: Path) -> Path:
    return await amake_project(tmp_path / "proj", MLPROJECT)


async def _read(path: Path) -> str:
    return await anyio.Path(path).read_text()


async def _entries(path: Path) -> list[str]:
    if not await anyio.Path(path).exists():
        return []
    return sorted([p.name async for p in anyio.Path(path).iterdir()])


async def test_an_http_uri_is_downloaded_into_storage_dir(
    project: Path, tmp_path: Path, tracking_uri: str, http_files: _Files
) -> None:
    """The command gets ``<storage_dir>/<new dir>/param_<i>/<name>``; the run's param is
    the URI as given."""
    http_files.files["/data/train.csv"] = b"a,b\n1,2\n"
    url = http_files.url("/data/train.csv")
    storage = tmp_path / "storage"
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), parameters={"data": url}, env_manager="local", storage_dir=storage
        )
    where = Path((await _read(project / "where.txt")).strip())
    assert where.name == "train.csv"
    assert where.parent.name == "param_1"  # "data" is the entry point's second parameter
    assert where.parent.parent.parent == storage
    assert await _read(project / "seen.txt") == "a,b\n1,2\n"
    assert await _read(where) == "a,b\n1,2\n"  # kept after the run, as MLflow keeps it
    record = await read_run(tracking_uri, run.run_id)
    assert record.data.params == {"label": "x", "data": url}


async def test_without_storage_dir_downloads_go_to_the_system_temp_dir(
    project: Path, tmp_path: Path, tracking_uri: str, http_files: _Files,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """``_get_storage_dir(None)`` is ``tempfile.mkdtemp()``."""
    system_temp = tmp_path / "system-temp"
    await anyio.Path(system_temp).mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    http_files.files["/m.bin"] = b"model"
    async with Runner(echo="off") as runner:
        await runner.run(
            str(project), parameters={"data": http_files.url("/m.bin")}, env_manager="local"
        )
    where = Path((await _read(project / "where.txt")).strip())
    assert where.parent.parent.parent == system_temp
    assert await _read(where) == "model"


async def test_runs_uri_on_the_file_store(project: Path, tmp_path: Path, tracking_uri: str) -> None:
    """``runs:/<run_id>/<path>`` names a file or a directory of the run's artifacts."""
    store = open_store(tracking_uri)
    try:
        source = await store.create_run("0", run_name="trainer", tags={}, params={})
        await store.log_artifact_bytes(source.run_id, "model/weights.txt", b"w=1\n")
        await store.log_artifact_bytes(source.run_id, "model/sub/extra.txt", b"e\n")
    finally:
        await store.aclose()
    storage = tmp_path / "storage"
    async with Runner(echo="off") as runner:
        await runner.run(
            str(project),
            parameters={"data": f"runs:/{source.run_id}/model/weights.txt"},
            env_manager="local",
            storage_dir=storage,
        )
        assert await _read(project / "seen.txt") == "w=1\n"
        await runner.run(
            str(project),
            "listing",
            parameters={"data": f"runs:/{source.run_id}/model"},
            env_manager="local",
            storage_dir=storage,
        )
    where = Path((await _read(project / "where.txt")).strip())
    assert where.name == "model"
    assert where.parent.name == "param_0"
    assert await _read(project / "seen.txt") == "sub\nweights.txt\n"
    assert await _read(where / "sub" / "extra.txt") == "e\n"


@pytest.mark.allow_blocking  # the mlflow client registers a model
async def test_runs_and_models_uris_on_a_tracking_server(
    project: Path, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    """On ``mlflow server`` a run's artifacts are ``mlflow-artifacts:`` locations, read
    through the server's artifact proxy; ``models:/`` goes through MLflow's artifact
    utilities (the ``aioproj[mlflow]`` extra) against the same server."""
    store = open_store(mlflow_server.uri)
    try:
        exp = await store.resolve_experiment(experiment_name="path-params", experiment_id=None)
        source = await store.create_run(exp, run_name="trainer", tags={}, params={})
        await store.log_artifact_bytes(source.run_id, "model/weights.txt", b"w=2\n")
        await store.log_artifact_bytes(source.run_id, "model/MLmodel", b"flavors: {}\n")
    finally:
        await store.aclose()
    storage = tmp_path / "storage"
    async with Runner(echo="off", tracking_uri=mlflow_server.uri) as runner:
        await runner.run(
            str(project),
            parameters={"data": f"runs:/{source.run_id}/model/weights.txt"},
            env_manager="local",
            storage_dir=storage,
            experiment_id=exp,
        )
        assert await _read(project / "seen.txt") == "w=2\n"
        await runner.run(
            str(project),
            "listing",
            parameters={"data": f"runs:/{source.run_id}/model"},
            env_manager="local",
            storage_dir=storage,
            experiment_id=exp,
        )
        assert await _read(project / "seen.txt") == "MLmodel\nweights.txt\n"

        def register() -> str:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=mlflow_server.uri)
            name = f"m-{source.run_id[:8]}"
            client.create_registered_model(name)
            version = client.create_model_version(
                name, f"runs:/{source.run_id}/model", run_id=source.run_id
            )
            return f"models:/{name}/{version.version}"

        models_uri = await anyio.to_thread.run_sync(register)
        await runner.run(
            str(project),
            "listing",
            parameters={"data": models_uri},
            env_manager="local",
            storage_dir=storage,
            experiment_id=exp,
        )
        assert "weights.txt" in (await _read(project / "seen.txt")).split()


async def test_other_schemes_need_the_mlflow_extra(
    project: Path, tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without mlflow installed, an ``s3://`` value is a clear error naming the extra,
    before anything is tracked."""
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    storage = tmp_path / "storage"
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.ExecutionError, match=r"pip install 'aioproj\[mlflow\]'"):
            await runner.run(
                str(project),
                parameters={"data": "s3://bucket/data.csv"},
                env_manager="local",
                storage_dir=storage,
            )
    monkeypatch.undo()
    assert await all_runs(tracking_uri) == []
    assert await _entries(storage) == []


async def test_a_failed_download_tracks_nothing_and_leaves_nothing(
    project: Path, tmp_path: Path, tracking_uri: str, http_files: _Files
) -> None:
    """Downloads are part of preparation: a 404 (or a run id that does not exist) is a
    SourceError before any run is created, and its directory is gone."""
    storage = tmp_path / "storage"
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.SourceError, match=r"Could not download .*: HTTP 404"):
            await runner.run(
                str(project),
                parameters={"data": http_files.url("/missing.csv")},
                env_manager="local",
                storage_dir=storage,
            )
        with pytest.raises(aioproj.SourceError, match="Could not download runs:/0123abc/x"):
            await runner.run(
                str(project),
                parameters={"data": "runs:/0123abc/x"},
                env_manager="local",
                storage_dir=storage,
            )
        assert runner.active_runs == frozenset()
    assert await all_runs(tracking_uri) == []
    assert await _entries(storage) == []


async def test_a_cancelled_download_leaves_nothing(
    project: Path, tmp_path: Path, tracking_uri: str, http_files: _Files
) -> None:
    storage = tmp_path / "storage"
    async with Runner(echo="off") as runner:
        with anyio.move_on_after(10) as scope:
            async with anyio.create_task_group() as tg:

                async def start() -> None:
                    await runner.run(
                        str(project),
                        parameters={"data": http_files.url("/slow")},
                        env_manager="local",
                        storage_dir=storage,
                    )

                tg.start_soon(start)
                await anyio.to_thread.run_sync(http_files.slow_started.wait, 10)
                assert len(await _entries(storage)) == 1  # the download's directory
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught
    assert await all_runs(tracking_uri) == []
    assert await _entries(storage) == []


async def test_a_download_no_started_run_uses_is_removed(
    project: Path, tmp_path: Path, tracking_uri: str, http_files: _Files
) -> None:
    """A run that fails after its download (here: an experiment that does not exist)
    removes it: nothing half made is left."""
    http_files.files["/d.csv"] = b"d"
    storage = tmp_path / "storage"
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.AioprojError, match="12345"):
            await runner.run(
                str(project),
                parameters={"data": http_files.url("/d.csv")},
                env_manager="local",
                storage_dir=storage,
                experiment_id="12345",
            )
    assert http_files.gets["/d.csv"] == 1
    assert await all_runs(tracking_uri) == []
    assert await _entries(storage) == []


async def test_runs_started_together_download_a_uri_once(
    project: Path, tmp_path: Path, tracking_uri: str, http_files: _Files
) -> None:
    """A sweep over one dataset: the runs share one download of it (one GET)."""
    http_files.files["/shared.csv"] = b"shared\n"
    url = http_files.url("/shared.csv")
    storage = tmp_path / "storage"
    runs: list[aioproj.SubmittedRun] = []
    async with Runner(echo="off") as runner:

        async def start(i: int) -> None:
            runs.append(
                await runner.run(
                    str(project),
                    parameters={"data": url, "label": str(i)},
                    env_manager="local",
                    storage_dir=storage,
                    synchronous=False,
                )
            )

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(start, i)
        assert [await run for run in runs] == [RunStatus.FINISHED] * 8
    assert http_files.gets["/shared.csv"] == 1
    assert len(await _entries(storage)) == 1
    assert len(await all_runs(tracking_uri)) == 8


async def test_local_paths_are_not_downloaded(
    project: Path, tmp_path: Path, tracking_uri: str
) -> None:
    """A path without a scheme, or ``file://`` without a host, is made absolute and must
    exist ("Got value X for parameter data, but no such file or directory was found.")."""
    data = tmp_path / "local.csv"
    await anyio.Path(data).write_text("local\n")
    storage = tmp_path / "storage"
    async with Runner(echo="off") as runner:
        for value in (str(data), data.as_uri()):
            await runner.run(
                str(project), parameters={"data": value}, env_manager="local", storage_dir=storage
            )
            assert (await _read(project / "where.txt")).strip() == str(data)
        with pytest.raises(
            aioproj.ParameterError,
            match=r"Got value /no/such\.csv for parameter data, but no such file or directory",
        ):
            await runner.run(str(project), parameters={"data": "/no/such.csv"})
    assert await _entries(storage) == []


class _MeetsTheDownload(LocalBackend):
    """Prepares only once the download is in flight, and lets it answer: a run can only
    start if the two overlap. ``fail`` makes the preparation fail instead."""

    def __init__(self, server: _Files, *, fail: bool = False) -> None:
        super().__init__()
        self._server = server
        self._fail = fail

    async def prepare(self, request: LaunchRequest) -> LocalLaunch:
        assert await anyio.to_thread.run_sync(self._server.gated_seen.wait, 10)
        if self._fail:
            raise aioproj.EnvironmentBuildError("the environment could not be built")
        self._server.gate.set()
        return await super().prepare(request)


async def test_downloads_run_alongside_the_backends_preparation(
    project: Path, tmp_path: Path, tracking_uri: str, http_files: _Files
) -> None:
    """The environment is prepared while the download runs (here each waits for the
    other: run one after the other, they would never finish)."""
    async with Runner(echo="off") as runner:
        await runner.run(
            str(project),
            parameters={"data": http_files.url("/gated")},
            backend=_MeetsTheDownload(http_files),
            env_manager="local",
            storage_dir=tmp_path / "storage",
        )
    assert await _read(project / "seen.txt") == "gated\n"


async def test_a_failed_preparation_stops_the_download(
    project: Path, tmp_path: Path, tracking_uri: str, http_files: _Files
) -> None:
    """The preparation's error is raised as itself (never in a group), the download in
    flight is cancelled and its directory removed."""
    storage = tmp_path / "storage"
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.EnvironmentBuildError, match="could not be built"):
            await runner.run(
                str(project),
                parameters={"data": http_files.url("/gated")},
                backend=_MeetsTheDownload(http_files, fail=True),
                env_manager="local",
                storage_dir=storage,
            )
    assert await all_runs(tracking_uri) == []
    assert await _entries(storage) == []


@pytest.mark.parametrize(
    "value",
    ["runs:/", "runs:/abc123/../../etc/passwd", "runs://host/abc123/x", "runs:/abc%00/x"],
)
async def test_malformed_runs_uris_are_source_errors(
    project: Path, tmp_path: Path, tracking_uri: str, value: str
) -> None:
    storage = tmp_path / "storage"
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.SourceError, match="Could not download runs:"):
            await runner.run(
                str(project), parameters={"data": value}, env_manager="local", storage_dir=storage
            )
    assert await all_runs(tracking_uri) == []
    assert await _entries(storage) == []


async def test_a_default_uri_is_downloaded_too(
    tmp_path: Path, tracking_uri: str, http_files: _Files
) -> None:
    """``EntryPoint.compute_parameters`` computes defaults like given values: a ``path``
    default that is a URI is downloaded (MLflow's ``test_path_params``)."""
    http_files.files["/default.txt"] = b"from the default\n"
    project = await amake_project(
        tmp_path / "with-default",
        f"""
        entry_points:
          main:
            parameters:
              data: {{type: path, default: "{http_files.url("/default.txt")}"}}
            command: "cat {{data}} > seen.txt"
        """,
    )
    async with Runner(echo="off") as runner:
        run = await runner.run(str(project), env_manager="local", storage_dir=tmp_path / "s")
    assert await _read(project / "seen.txt") == "from the default\n"
    params = (await read_run(tracking_uri, run.run_id)).data.params
    assert params == {"data": http_files.url("/default.txt")}
