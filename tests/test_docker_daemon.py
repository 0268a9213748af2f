"""docker_env projects on a real Docker daemon (see tests/docker_daemon.py).

What tests/test_envs_docker.py checks on the exact command line with a stand-in docker,
these tests prove on ``dockerd``: the code runs in a container, logs into its run, gets
its volumes, variables and docker_args, and leaves no container behind on any path.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import aioproj
from aioproj import Runner, RunStatus
from aioproj.errors import RunFailedError

from .docker_daemon import BASE_IMAGE, MLFLOW_IMAGE, DockerDaemon
from .mlflow_server import MlflowServer
from .support import amake_project, read_run

# The session fixture may install packages and build images first (minutes on a fresh
# machine, once): the per-test timeout counts the test itself only.
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120, func_only=True)]

AIOPROJ = str(Path(sys.executable).with_name("aioproj"))

PROBE_MLPROJECT = f"""
name: probe
docker_env:
  image: {BASE_IMAGE}
entry_points:
  main:
    parameters:
      words: {{type: string, default: "two words"}}
    command: "python probe.py {{words}}"
  fail:
    command: "python -c 'import sys; print(\\"going down\\", flush=True); sys.exit(3)'"
  sleep:
    command: "python -c 'import time; print(\\"sleeping\\", flush=True); time.sleep(300)'"
"""

PROBE_PY = """
import os, sys
print("args=" + "|".join(sys.argv[1:]))
print("cwd=" + os.getcwd())
print("in_container=" + str(os.path.exists("/.dockerenv")))
mounts = [line.split()[4] for line in open("/proc/self/mountinfo")]
print("code_mounted=" + str("/mlflow/projects/code" in mounts))
print("pid=" + str(os.getpid()))
print("run_id=" + os.environ.get("MLFLOW_RUN_ID", "-"))
print("uri=" + os.environ.get("MLFLOW_TRACKING_URI", "-"))
print("files=" + ",".join(sorted(os.listdir("."))))
"""

# MLflow's tests/resources/example_docker_project, with a check that it logs into the run
# aioproj created and a look at what docker_args did to the container.
TRACKING_MLPROJECT = f"""
name: docker-example
docker_env:
  image: {MLFLOW_IMAGE}
entry_points:
  main:
    command: "echo 'Main entry point'"
  test_tracking:
    parameters:
      use_start_run: bool
    command: "python tracking_test.py {{use_start_run}}"
"""

TRACKING_PY = """
import os, sys, tempfile
import mlflow

expected = os.environ["MLFLOW_RUN_ID"]
print("uri=" + os.environ["MLFLOW_TRACKING_URI"], flush=True)


def call_tracking_apis():
    mlflow.log_metric("some_key", 3)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as temp_file:
        temp_file.write("Temporary content.")
        temp_file.flush()
        mlflow.log_artifact(temp_file.name)


if sys.argv[1].lower() in ("1", "true"):
    with mlflow.start_run() as run:
        assert run.info.run_id == expected, "not the run aioproj created"
        call_tracking_apis()
else:
    call_tracking_apis()
    assert mlflow.active_run().info.run_id == expected, "not the run aioproj created"
print("logged", flush=True)
"""

LIMITS_PY = """
import os
for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    if os.path.exists(path):
        print("memory=" + open(path).read().strip())
caps = [l for l in open("/proc/self/status") if l.startswith("CapEff")]
print("capeff=" + caps[0].split()[1])
"""


# -- helpers -------------------------------------------------------------------------------


async def docker_out(daemon: DockerDaemon, *args: str, check: bool = True) -> str:
    """``docker <args>``'s output (off the event loop)."""

    def call() -> str:
        done = subprocess.run(
            [daemon.docker, *args], capture_output=True, text=True, check=False, timeout=60
        )
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    return await anyio.to_thread.run_sync(call)


async def containers(daemon: DockerDaemon, label: str) -> list[str]:
    """Every container (running or not) with ``label`` (``key`` or ``key=value``)."""
    return (await docker_out(daemon, "ps", "-aq", "--filter", f"label={label}")).split()


async def wait_running(daemon: DockerDaemon, label: str, limit: float = 60) -> str:
    """The id of the running container with ``label``, once there is one."""
    with anyio.fail_after(limit):
        while True:
            found = (
                await docker_out(
                    daemon, "ps", "-q", "--filter", f"label={label}", "--filter", "status=running"
                )
            ).split()
            if found:
                return found[0]
            await anyio.sleep(0.1)


async def image_id(daemon: DockerDaemon, image: str) -> str:
    return (await docker_out(daemon, "image", "inspect", "--format", "{{.Id}}", image)).strip()


async def logs_of(run: aioproj.SubmittedRun) -> str:
    return "\n".join([line async for line in run.logs()])


def fields(text: str) -> dict[str, str]:
    """``key=value`` lines of a probe's output."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isidentifier():
            out.setdefault(key, value)
    return out


@pytest.fixture
def test_label() -> str:
    """A label for the containers of one test, passed with docker_args."""
    return f"aioproj.test={uuid.uuid4().hex}"


@pytest.fixture
async def probe(tmp_path: Path) -> Path:
    root = await amake_project(tmp_path / "probe", PROBE_MLPROJECT, {"probe.py": PROBE_PY})
    await anyio.Path(root / "mlruns").mkdir()
    return root


@pytest.fixture
async def tracking_project(tmp_path: Path) -> Path:
    return await amake_project(
        tmp_path / "docker-example",
        TRACKING_MLPROJECT,
        {"tracking_test.py": TRACKING_PY, "limits.py": LIMITS_PY},
    )


@pytest.fixture
def bridge_server(
    docker_daemon: DockerDaemon, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` listening on the docker bridge's gateway address, which the
    host and containers on the default bridge network both reach."""
    gateway = docker_daemon.docker_json(
        "network", "inspect", "bridge", "--format", "{{json (index .IPAM.Config 0).Gateway}}"
    )
    assert isinstance(gateway, str)
    server = MlflowServer(tmp_path_factory.mktemp("bridge-server"), host=gateway)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- a container runs the entry point --------------------------------------------------------


async def test_the_entry_point_runs_in_the_image_with_the_project_mounted(
    docker_daemon: DockerDaemon, probe: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off") as runner:
        run = await runner.run(str(probe), parameters={"words": "hello there"})
        assert await run.get_status() is RunStatus.FINISHED
        seen = fields(await logs_of(run))
    assert seen["args"] == "hello there"  # one argument, as MLflow quotes it
    assert seen["in_container"] == "True"
    assert seen["pid"] == "1"  # the entry point is the container's process
    assert seen["cwd"] == "/mlflow/projects/code"  # MLflow's mount point, the working dir
    assert seen["code_mounted"] == "True"
    assert "probe.py" in seen["files"].split(",")
    assert seen["run_id"] == run.run_id
    assert seen["uri"] == "file:///mlflow/tmp/mlruns"  # a local store, rewritten
    record = await read_run(tracking_uri, run.run_id)
    assert record.data.tags["mlflow.project.env"] == "docker"
    assert record.data.tags["mlflow.project.backend"] == "local"
    assert record.data.tags["mlflow.docker.image.uri"] == BASE_IMAGE
    assert record.data.tags["mlflow.docker.image.id"] == await image_id(docker_daemon, BASE_IMAGE)
    assert await containers(docker_daemon, f"aioproj.run_id={run.run_id}") == []


async def test_exit_codes_and_docker_errors_fail_the_run_with_their_output(
    docker_daemon: DockerDaemon, probe: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off") as runner:
        with pytest.raises(RunFailedError):
            await runner.run(str(probe), entry_point="fail")
        run = await runner.run(str(probe), entry_point="fail", synchronous=False)
        assert await run == RunStatus.FAILED
        assert "going down" in await logs_of(run)
        # docker itself refuses the container (exit code 125): FAILED with its message.
        bad = await runner.run(str(probe), docker_args={"memory": "lots"}, synchronous=False)
        assert await bad == RunStatus.FAILED
        assert "invalid argument" in (await logs_of(bad)).lower()
    assert (await read_run(tracking_uri, run.run_id)).info.status == "FAILED"
    assert (await read_run(tracking_uri, bad.run_id)).info.status == "FAILED"


# -- the run's own mlflow calls log into the run -----------------------------------------------


@pytest.mark.parametrize("use_start_run", ["0", "1"])
async def test_the_container_logs_into_its_run_in_a_mounted_file_store(
    docker_daemon: DockerDaemon, tracking_project: Path, tracking_uri: str, use_start_run: str
) -> None:
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(tracking_project),
            entry_point="test_tracking",
            parameters={"use_start_run": use_start_run},
            experiment_id="0",
        )
        output = await logs_of(run)
    assert "uri=file:///mlflow/tmp/mlruns" in output  # MLflow's rewrite for a local store
    record = await read_run(tracking_uri, run.run_id)
    assert record.info.status == "FINISHED"
    assert record.data.params == {"use_start_run": use_start_run}
    assert record.data.metrics == {"some_key": 3}
    # The artifact was written through the store's own path, mounted as it is.
    artifacts = Path(tracking_uri.removeprefix("file://")) / "0" / run.run_id / "artifacts"
    names = sorted(
        p.name for p in await anyio.to_thread.run_sync(lambda: list(artifacts.iterdir()))
    )
    assert [n for n in names if n.endswith(".txt")]  # the project's own artifact
    assert "aioproj" in names  # the run's output


@pytest.mark.allow_blocking  # the sqlite store is read with MLflow's synchronous client
@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")
async def test_a_sqlite_store_is_mounted_and_its_uri_rewritten(
    docker_daemon: DockerDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    project = await amake_project(
        tmp_path / "proj",
        f"name: sq\ndocker_env:\n  image: {MLFLOW_IMAGE}\nentry_points:\n  main:\n"
        "    command: python log.py\n",
        {
            "log.py": "import os, mlflow\n"
            "print('uri=' + os.environ['MLFLOW_TRACKING_URI'])\n"
            "mlflow.log_metric('from_sqlite', 2.5)\n"
        },
    )
    async with Runner(echo="off") as runner:
        run = await runner.run(str(project))
        output = await logs_of(run)
    assert "uri=sqlite:////mlflow/tmp/mlruns" in output
    from mlflow import MlflowClient

    record = MlflowClient(tracking_uri=uri).get_run(run.run_id)
    assert record.data.metrics == {"from_sqlite": 2.5}
    assert record.info.status == "FINISHED"


async def test_the_container_logs_to_an_mlflow_server_over_the_host_network(
    docker_daemon: DockerDaemon,
    tracking_project: Path,
    mlflow_server: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(tracking_project),
            entry_point="test_tracking",
            parameters={"use_start_run": "1"},
            docker_args={"network": "host"},  # 127.0.0.1 is the host's own
        )
        output = await logs_of(run)
    assert f"uri={mlflow_server.uri}" in output
    record = await read_run(mlflow_server.uri, run.run_id)
    assert record.data.metrics == {"some_key": 3}
    assert record.info.status == "FINISHED"


async def test_the_container_logs_to_an_mlflow_server_on_the_bridge_gateway(
    docker_daemon: DockerDaemon,
    tracking_project: Path,
    bridge_server: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", bridge_server.uri)
    async with Runner(echo="off") as runner:  # the default network: docker's bridge
        run = await runner.run(
            str(tracking_project),
            entry_point="test_tracking",
            parameters={"use_start_run": "0"},
        )
        output = await logs_of(run)
    assert f"uri={bridge_server.uri}" in output
    record = await read_run(bridge_server.uri, run.run_id)
    assert record.data.metrics == {"some_key": 3}
    assert record.info.status == "FINISHED"
