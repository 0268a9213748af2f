"""docker_env projects on a real Docker daemon (see tests/docker_daemon.py).

What tests/test_envs_docker.py checks on the exact command line with a stand-in docker,
these tests prove on ``dockerd``: the code runs in a container, logs into its run, gets
its volumes, variables and docker_args, and leaves no container behind on any path.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioproj
from aioproj import Runner, RunStatus
from aioproj.errors import RunFailedError
from aioproj.journal import RECOVERED_TAG, recover
from aioproj.testing.kubernetes import FakeKubernetes

from .docker_daemon import BASE_IMAGE, MLFLOW_IMAGE, TEST_LABEL, DockerDaemon, Registry
from .mlflow_server import MlflowServer
from .support import all_runs, amake_project, journal_runs, process_gone, read_run
from .test_kubernetes_backend import config, kube, mlproject, template  # noqa: F401

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
  limits:
    command: "python limits.py"
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
print("cwd=" + os.getcwd())
mounts = [line.split()[4] for line in open("/proc/self/mountinfo")]
print("code_mounted=" + str("/mlflow/projects/code" in mounts))
print("files=" + ",".join(sorted(os.listdir("."))))
for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    if os.path.exists(path):
        print("memory=" + open(path).read().strip())
caps = [l for l in open("/proc/self/status") if l.startswith("CapEff")]
print("capeff=" + caps[0].split()[1])
try:
    open("/rootfs-probe", "w")
    print("rootfs=writable")
except OSError:
    print("rootfs=readonly")
"""


#: CAP_SYS_ADMIN: not in a container's effective set unless docker_args add it. (The
#: tests add it with ``cap-add``: ``--privileged`` needs every capability, and this
#: machine's root lacks CAP_SYS_RESOURCE, so runc refuses privileged containers here.)
CAP_SYS_ADMIN = 1 << 21
#: docker_args with a value, a flag (``--read-only``) and a limit, all visible inside.
DOCKER_ARGS: dict[str, str | bool] = {"memory": "1g", "cap-add": "SYS_ADMIN", "read-only": True}

VOLUMES_MLPROJECT = f"""
name: volumes
docker_env:
  image: {BASE_IMAGE}
  volumes: ["$AIOPROJ_TEST_DATA:/data", "$AIOPROJ_TEST_DATA/ro:/ro:ro"]
  environment: [["DEFINED_VAR", "defined value"], "COPIED_VAR"]
entry_points:
  main:
    command: "python env.py"
"""

ENV_PY = """
import os
print("in=" + open("/data/in.txt").read().strip())
open("/data/out.txt", "w").write("written in the container")
try:
    open("/ro/x", "w")
    print("ro=writable")
except OSError:
    print("ro=readonly")
print("defined=" + os.environ.get("DEFINED_VAR", "-"))
print("copied=" + os.environ.get("COPIED_VAR", "-"))
"""


# The entry points run as the container's PID 1: ``sleep`` has no SIGTERM handler, so the
# kernel ignores SIGTERM for it and only SIGKILL (docker stop's, after the grace period)
# ends it; ``polite`` exits on SIGTERM. ``environment`` makes it go through the env file.
SLEEPER_MLPROJECT = f"""
name: sleeper
docker_env:
  image: {BASE_IMAGE}
  environment: [["SLEEPER_VAR", "set"]]
entry_points:
  sleep:
    command: "python -c 'import time; print(\\"sleeping\\", flush=True); time.sleep(300)'"
  polite:
    command: "python polite.py"
"""

POLITE_PY = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *args: sys.exit(143))
print("sleeping", flush=True)
time.sleep(300)
"""

# A driver that dies after its run's container exists but before the start is journalled:
# only the intent (with what the docker launch noted) and the tracking run are on record.
EARLY_DEATH = """
import anyio, os, subprocess, sys
from aioproj.journal import Journal
from aioproj.tracking import open_store

async def main(uri, docker, image, label):
    store = open_store(uri)
    experiment = await store.resolve_experiment(experiment_name=None, experiment_id=None)
    record = await store.create_run(experiment, run_name=None, tags={}, params={})
    journal = Journal()
    await journal.open()
    key = "k" * 32
    await journal.intent(
        key, tracking_uri=uri, backend="local", experiment_id=experiment,
        state={"docker": docker},
    )
    await journal.commit(key, "tracked", run=record.run_id)
    subprocess.run(
        [docker, "run", "-d", "--label", "aioproj.run_id=" + record.run_id, "--label", label,
         image, "sleep", "300"],
        check=True, stdout=subprocess.DEVNULL,
    )
    os.mkdir("/dev/shm/aioproj-docker-env-" + record.run_id + "-x", 0o700)
    print(record.run_id, flush=True)
    os._exit(0)

anyio.run(main, *sys.argv[1:])
"""

DRIVER = """
import asyncio, sys
import aioproj

async def main():
    await aioproj.run(sys.argv[1], entry_point="sleep", docker_args={"label": sys.argv[2]})

asyncio.run(main())
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


async def finished(runner: Runner, uri: str, **kwargs: Any) -> tuple[aioproj.SubmittedRun, str]:
    """Run to its end; the handle and the output, which an assertion shows if it failed."""
    run = await runner.run(uri, synchronous=False, **kwargs)
    status = await run
    output = await logs_of(run)
    assert status is RunStatus.FINISHED, f"run {status}:\n{output}"
    return run, output


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
    return f"{TEST_LABEL}={uuid.uuid4().hex}"


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


async def logs_to_the_server(
    server: MlflowServer, project: Path, docker_args: dict[str, str | bool]
) -> None:
    """The project's own mlflow calls reach ``server`` (MLFLOW_TRACKING_URI points there)."""
    async with Runner(echo="off") as runner:
        run, output = await finished(
            runner,
            str(project),
            entry_point="test_tracking",
            parameters={"use_start_run": "1"},
            docker_args=docker_args,
        )
    assert f"uri={server.uri}" in output
    record = await read_run(server.uri, run.run_id)
    assert record.data.metrics == {"some_key": 3}
    assert record.info.status == "FINISHED"


async def test_the_container_logs_to_an_mlflow_server_over_the_host_network(
    docker_daemon: DockerDaemon,
    tracking_project: Path,
    mlflow_server: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    # 127.0.0.1 is the host's own only on the host's network.
    await logs_to_the_server(mlflow_server, tracking_project, {"network": "host"})


async def test_the_container_logs_to_an_mlflow_server_on_the_bridge_gateway(
    docker_daemon: DockerDaemon,
    tracking_project: Path,
    bridge_server: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", bridge_server.uri)
    await logs_to_the_server(bridge_server, tracking_project, {})  # docker's default bridge


# -- volumes, environment, docker_args -------------------------------------------------------


async def test_volumes_environment_and_docker_args_reach_the_container(
    docker_daemon: DockerDaemon,
    tmp_path: Path,
    tracking_uri: str,
    test_label: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data"
    await anyio.Path(data / "ro").mkdir(parents=True)
    await anyio.Path(data / "in.txt").write_text("from the host")
    monkeypatch.setenv("AIOPROJ_TEST_DATA", str(data))  # expanded on the host side
    monkeypatch.setenv("COPIED_VAR", "copied value")
    project = await amake_project(
        tmp_path / "volumes", VOLUMES_MLPROJECT, {"env.py": ENV_PY, "limits.py": LIMITS_PY}
    )
    async with Runner(echo="off") as runner:
        _, output = await finished(
            runner,
            str(project),
            docker_args={"label": test_label},
        )
        seen = fields(output)
        _, output = await finished(
            runner,
            str(project),
            entry_point="limits.py",
            docker_args=DOCKER_ARGS,
        )
        limits = fields(output)
        _, output = await finished(runner, str(project), entry_point="limits.py")
        defaults = fields(output)
    assert seen["in"] == "from the host"
    assert await anyio.Path(data / "out.txt").read_text() == "written in the container"
    assert seen["ro"] == "readonly"
    assert seen["defined"] == "defined value"
    assert seen["copied"] == "copied value"
    assert limits["memory"] == str(1 << 30)
    assert int(limits["capeff"], 16) & CAP_SYS_ADMIN
    assert limits["rootfs"] == "readonly"
    assert limits["memory"] != defaults["memory"]
    assert not int(defaults["capeff"], 16) & CAP_SYS_ADMIN
    assert defaults["rootfs"] == "writable"
    assert await containers(docker_daemon, test_label) == []  # --rm, and the label was set


async def test_the_cli_passes_docker_args_with_dash_a(
    docker_daemon: DockerDaemon, tracking_project: Path, tracking_uri: str
) -> None:
    done = await anyio.run_process(
        [
            AIOPROJ, "run", str(tracking_project), "-e", "limits",
            "-A", "memory=512m", "-A", "cap-add=SYS_ADMIN", "-A", "read-only",
        ],
        check=False,
    )  # fmt: skip
    output = done.stdout.decode()
    assert done.returncode == 0, output + done.stderr.decode()
    seen = fields(output)
    assert seen["memory"] == str(512 << 20)
    assert int(seen["capeff"], 16) & CAP_SYS_ADMIN
    assert seen["rootfs"] == "readonly"


# -- --build-image ---------------------------------------------------------------------------


@pytest.mark.parametrize("use_start_run", ["0", "1"])
async def test_build_image_runs_the_project_from_its_image_as_mlflow_does(
    docker_daemon: DockerDaemon, tracking_project: Path, tracking_uri: str, use_start_run: str
) -> None:
    await anyio.Path(tracking_project / "mlruns").mkdir()  # not copied into the image
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(tracking_project),
            experiment_id="0",
            parameters={"use_start_run": use_start_run},
            entry_point="test_tracking",
            build_image=True,
            docker_args={"memory": "1g", "cap-add": "SYS_ADMIN"},
        )
        _, output = await finished(
            runner, str(tracking_project), entry_point="limits", build_image=True,
            docker_args=DOCKER_ARGS,
        )  # fmt: skip
        seen = fields(output)
    record = await read_run(tracking_uri, run.run_id)
    assert record.data.params == {"use_start_run": use_start_run}
    assert record.data.metrics == {"some_key": 3}
    tags = record.data.tags
    assert tags["mlflow.project.env"] == "docker"
    assert tags["mlflow.project.backend"] == "local"
    assert tags["mlflow.docker.image.uri"] == "docker-example:latest"  # not a git repo
    assert tags["mlflow.docker.image.id"].startswith("sha256:")
    assert tags["mlflow.docker.image.id"] == await image_id(docker_daemon, "docker-example:latest")
    # The code is in the image, not mounted; MLflow's build context leaves mlruns out.
    assert seen["cwd"] == "/mlflow/projects/code"
    assert seen["code_mounted"] == "False"
    assert seen["files"] == "MLproject,limits.py,tracking_test.py"
    assert seen["memory"] == str(1 << 30)  # docker_args apply to a built image's run too


async def test_build_image_tags_a_git_project_with_its_commit(
    docker_daemon: DockerDaemon, tmp_path: Path, tracking_uri: str
) -> None:
    from dulwich import porcelain

    project = await amake_project(tmp_path / "gitproj", PROBE_MLPROJECT, {"probe.py": PROBE_PY})

    def commit() -> str:
        repo = porcelain.init(str(project))
        porcelain.add(repo, [str(project / "MLproject"), str(project / "probe.py")])
        sha = porcelain.commit(repo, b"probe", author=b"t <t@e>", committer=b"t <t@e>")
        return sha.decode()

    sha = await anyio.to_thread.run_sync(commit)
    async with Runner(echo="off") as runner:
        run = await runner.run(str(project), build_image=True)
        seen = fields(await logs_of(run))
    tags = (await read_run(tracking_uri, run.run_id)).data.tags
    assert tags["mlflow.docker.image.uri"] == f"probe:{sha[:7]}"
    assert tags["mlflow.docker.image.id"] == await image_id(docker_daemon, f"probe:{sha[:7]}")
    assert seen["code_mounted"] == "False"


async def test_a_burst_of_runs_shares_one_image_build(
    docker_daemon: DockerDaemon, tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(
        tmp_path / "burst", PROBE_MLPROJECT.replace("name: probe", "name: burst"),
        {"probe.py": PROBE_PY},
    )  # fmt: skip
    since = str(int(time.time()))
    runs: list[aioproj.SubmittedRun] = []
    async with Runner(echo="off") as runner:

        async def one() -> None:
            runs.append(await runner.run(str(project), build_image=True, synchronous=False))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one)
        assert [await run for run in runs] == [RunStatus.FINISHED] * 4
        outputs = [await logs_of(run) for run in runs]
    assert await tag_events(docker_daemon, since, "burst:latest") == 1  # one build for four
    # Its output is in the log of the run that built it, and only there.
    assert sum("burst:latest" in output for output in outputs) == 1
    ids = {
        (await read_run(tracking_uri, r.run_id)).data.tags["mlflow.docker.image.id"] for r in runs
    }
    assert len(ids) == 1


async def test_an_image_built_beforehand_is_used_as_it_is(
    docker_daemon: DockerDaemon, tmp_path: Path, tracking_uri: str
) -> None:
    """MLflow's test_docker_build_image_local."""
    await anyio.to_thread.run_sync(
        docker_daemon.build, f"FROM {BASE_IMAGE}\nRUN python --version\n", "my-python:latest"
    )
    project = await amake_project(
        tmp_path / "local-image",
        "name: test\ndocker_env:\n  image: my-python\nentry_points:\n  main:\n"
        "    command: python --version\n",
    )
    async with Runner(echo="off") as runner:
        run = await runner.run(str(project))
        output = await logs_of(run)
    assert "Python 3.11" in output
    tags = (await read_run(tracking_uri, run.run_id)).data.tags
    assert tags["mlflow.docker.image.uri"] == "my-python"
    assert tags["mlflow.docker.image.id"] == await image_id(docker_daemon, "my-python")


async def tag_events(daemon: DockerDaemon, since: str, name: str) -> int:
    """How many times docker tagged an image ``name`` since ``since`` (a build, a tag)."""
    await anyio.sleep(1.1)  # docker events counts in whole seconds
    events = await docker_out(
        daemon, "events", "--since", since, "--until", str(int(time.time())),
        "--filter", "type=image", "--filter", "event=tag", "--format", "{{json .}}",
    )  # fmt: skip
    return sum(
        1 for e in map(json.loads, events.splitlines())
        if e["Actor"]["Attributes"].get("name") == name
    )  # fmt: skip


# -- registries --------------------------------------------------------------------------------


async def test_a_missing_image_is_pulled_from_its_registry_after_docker_login(
    docker_daemon: DockerDaemon,
    docker_registry: Registry,
    tmp_path: Path,
    tracking_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MLflow's test_docker_build_image_remote, with the registry on this machine."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))  # login writes it
    remote = f"{docker_registry.host}/aioproj/python:remote"
    await docker_out(docker_daemon, "tag", BASE_IMAGE, remote)
    await docker_out(docker_daemon, "push", remote)
    await docker_out(docker_daemon, "rmi", remote)
    project = await amake_project(
        tmp_path / "remote",
        f"name: test\ndocker_env:\n  image: {remote}\nentry_points:\n  main:\n"
        "    command: python --version\n",
    )
    password = f"pw-{uuid.uuid4().hex}"
    auth = {"registry": docker_registry.host, "username": "tester", "password": password}
    try:
        async with Runner(echo="off") as runner:
            run, output = await finished(runner, str(project), docker_auth=auth)
        assert "Python 3.11" in output
        assert password not in output
        tags = (await read_run(tracking_uri, run.run_id)).data.tags
        assert tags["mlflow.docker.image.uri"] == remote
        assert tags["mlflow.docker.image.id"] == await image_id(docker_daemon, remote)
        config_file = tmp_path / "docker-config" / "config.json"
        assert docker_registry.host in await anyio.Path(config_file).read_text()  # logged in
    finally:
        await docker_out(docker_daemon, "rmi", remote, check=False)


async def test_build_image_on_kubernetes_pushes_once_and_the_job_names_the_image(
    docker_daemon: DockerDaemon,
    docker_registry: Registry,
    kube: FakeKubernetes,  # noqa: F811
    template: Path,  # noqa: F811
    tmp_path: Path,
    tracking_uri: str,
) -> None:
    repository = f"{docker_registry.host}/aioproj/k8s-demo"
    project = await amake_project(
        tmp_path / "proj", mlproject("python -c 'print(1)'", image=BASE_IMAGE)
    )
    since = str(int(time.time()))
    runs: list[aioproj.SubmittedRun] = []
    async with Runner(echo="off") as runner:

        async def one() -> None:
            run = await runner.run(
                str(project),
                backend="kubernetes",
                build_image=True,
                synchronous=False,
                backend_config=config(kube, template, **{"repository-uri": repository}),
            )
            runs.append(run)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one)
        for run in runs:
            await run
    digest = await anyio.to_thread.run_sync(
        docker_registry.manifest_digest, "aioproj/k8s-demo", "latest"
    )
    assert digest is not None
    assert digest.startswith("sha256:")
    jobs = kube.objects("jobs", "default")
    assert len(jobs) == 3
    for job in jobs:
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["image"] == f"{repository}@{digest}"
    for run in runs:
        tags = (await read_run(tracking_uri, run.run_id)).data.tags
        assert tags["mlflow.docker.image.uri"] == repository
        assert tags["mlflow.docker.image.id"] == digest
    assert await tag_events(docker_daemon, since, f"{repository}:latest") == 1  # one build


# -- cancellation and crashes -------------------------------------------------------------------


@pytest.fixture
async def sleeper(tmp_path: Path) -> Path:
    return await amake_project(tmp_path / "sleeper", SLEEPER_MLPROJECT, {"polite.py": POLITE_PY})


def docker_cli_pids(pgid: int) -> list[int]:
    """The live docker CLI processes in process group ``pgid`` (blocking: reads /proc)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        comm, rest = stat.partition(" (")[2].rpartition(")")[::2]
        state, _ppid, group = rest.split()[:3]
        if comm == "docker" and int(group) == pgid and state != "Z":  # zombies have ended
            pids.append(int(name))
    return pids


async def gone(pid: int) -> bool:
    return await anyio.to_thread.run_sync(process_gone, pid)


async def env_dirs(run_id: str = "") -> list[str]:
    """The env-file directories that exist now: of the run ``run_id``, or of any run
    (other test processes make theirs too: compare a run's own)."""
    prefix = f"aioproj-docker-env-{run_id}"

    def listing() -> list[str]:
        return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]

    return await anyio.to_thread.run_sync(listing)


async def test_cancel_stops_and_removes_a_container_that_ignores_sigterm(
    docker_daemon: DockerDaemon, sleeper: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off", grace_period=1) as runner:
        run = await runner.run(str(sleeper), entry_point="sleep", synchronous=False)
        label = f"aioproj.run_id={run.run_id}"
        await wait_running(docker_daemon, label)
        assert await env_dirs(run.run_id)  # the run's env file exists while it runs
        pgid = run._execution.pid
        await run.cancel()
        assert await run.get_status() is RunStatus.KILLED
        assert await containers(docker_daemon, label) == []
        assert await anyio.to_thread.run_sync(docker_cli_pids, pgid) == []
        assert await gone(pgid)
    assert (await read_run(tracking_uri, run.run_id)).info.status == "KILLED"
    assert await env_dirs(run.run_id) == []


async def test_cancelling_at_any_moment_of_the_start_leaves_no_container(
    docker_daemon: DockerDaemon, sleeper: Path, tracking_uri: str, test_label: str
) -> None:
    async with Runner(echo="off", grace_period=1) as runner:
        for delay in (0.0, 0.2, 0.5, 1.0):
            run = await runner.run(
                str(sleeper), entry_point="sleep", synchronous=False,
                docker_args={"label": test_label},
            )  # fmt: skip
            await anyio.sleep(delay)
            await run.cancel()
            assert await containers(docker_daemon, test_label) == [], f"after {delay} s"
    assert {r.info.status for r in await all_runs(tracking_uri)} == {"KILLED"}


async def test_a_runner_left_by_an_exception_stops_its_containers(
    docker_daemon: DockerDaemon, sleeper: Path, tracking_uri: str, test_label: str
) -> None:

    async def caller() -> None:
        async with Runner(echo="off", grace_period=1) as runner:
            for entry_point in ("sleep", "polite"):
                await runner.run(
                    str(sleeper), entry_point=entry_point, synchronous=False,
                    docker_args={"label": test_label},
                )  # fmt: skip
            await wait_running(docker_daemon, test_label)
            raise RuntimeError("the caller failed")

    with pytest.raises(RuntimeError, match="the caller failed"):
        await caller()
    assert await containers(docker_daemon, test_label) == []
    assert [r.info.status for r in await all_runs(tracking_uri)] == ["KILLED", "KILLED"]


async def test_a_timeout_stops_the_container(
    docker_daemon: DockerDaemon, sleeper: Path, tracking_uri: str, test_label: str
) -> None:
    async with Runner(echo="off", grace_period=1) as runner:
        with anyio.move_on_after(5) as scope:
            await runner.run(str(sleeper), entry_point="sleep", docker_args={"label": test_label})
        assert scope.cancelled_caught
        assert await containers(docker_daemon, test_label) == []
    (record,) = await all_runs(tracking_uri)
    assert record.info.status == "KILLED"


async def test_ctrl_c_of_the_cli_stops_the_container(
    docker_daemon: DockerDaemon, sleeper: Path, tracking_uri: str, test_label: str
) -> None:
    process = await anyio.open_process(
        [AIOPROJ, "run", str(sleeper), "-e", "polite", "-A", f"label={test_label}"],
        stdin=subprocess.DEVNULL,
    )
    try:
        await wait_running(docker_daemon, test_label)
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(60):
            code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        await process.aclose()
    assert code == 130
    assert await containers(docker_daemon, test_label) == []
    (record,) = await all_runs(tracking_uri)
    assert record.info.status == "KILLED"


async def test_a_docker_cli_killed_under_its_container_leaves_no_container(
    docker_daemon: DockerDaemon, sleeper: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off", grace_period=1) as runner:
        run = await runner.run(str(sleeper), entry_point="sleep", synchronous=False)
        label = f"aioproj.run_id={run.run_id}"
        await wait_running(docker_daemon, label)
        (cli,) = await anyio.to_thread.run_sync(docker_cli_pids, run._execution.pid)
        os.kill(cli, signal.SIGKILL)  # the container goes on without its client
        assert await run == RunStatus.FAILED
        assert await containers(docker_daemon, label) == []  # removed when the run ended


async def journal_text() -> str:
    """Every run journal of this test's cache, as written."""

    def read() -> str:
        folder = Path(os.environ["AIOPROJ_CACHE_DIR"]) / "journal"
        files = sorted(folder.glob("*.log")) if folder.is_dir() else []
        return "".join(p.read_text(errors="replace") for p in files)

    return await anyio.to_thread.run_sync(read)


@pytest.mark.parametrize("cli_killed_too", [False, True])
async def test_recover_stops_the_container_of_a_killed_driver(
    docker_daemon: DockerDaemon,
    sleeper: Path,
    tmp_path: Path,
    tracking_uri: str,
    test_label: str,
    cli_killed_too: bool,
) -> None:
    driver = tmp_path / "driver.py"
    await anyio.Path(driver).write_text(DRIVER)
    process = await anyio.open_process([sys.executable, str(driver), str(sleeper), test_label])
    try:
        await wait_running(docker_daemon, test_label)
        with anyio.fail_after(10):  # the driver notes the start right after it
            while not [r for r in await journal_runs() if r.started]:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        (entry,) = await journal_runs()
        process.kill()
        await process.wait()
    finally:
        await process.aclose()
    run_id, state = entry.run_id, entry.state
    assert state["docker"]  # what recover needs to find the container
    if cli_killed_too:  # the container is all that is left
        os.killpg(state["pgid"], signal.SIGKILL)
        with anyio.fail_after(10):
            while not await gone(state["pgid"]):  # noqa: ASYNC110
                await anyio.sleep(0.05)
    assert await containers(docker_daemon, test_label)  # the SIGKILL left it running
    (dry,) = await recover(dry_run=True)
    assert (dry.run_id, dry.status) == (run_id, None)
    assert await containers(docker_daemon, test_label)  # a dry run touches nothing

    (result,) = await recover(grace_period=1)
    assert (result.run_id, result.status) == (run_id, "KILLED")
    assert "stopped its docker container" in result.action
    assert await containers(docker_daemon, test_label) == []
    assert await gone(state["pgid"])
    assert not await anyio.Path(state["docker_env_dir"]).exists()
    record = await read_run(tracking_uri, run_id)
    assert record.info.status == "KILLED"
    assert "aioproj recover stopped it" in record.data.tags[RECOVERED_TAG]
    assert await journal_runs() == []


# -- secrets -------------------------------------------------------------------------------------

SECRET_MLPROJECT = f"""
name: secretive
docker_env:
  image: {MLFLOW_IMAGE}
  volumes: ["$AIOPROJ_TEST_SIGNAL:/signal"]
  environment: ["COPIED_SECRET", ["DEFINED_SECRET", "{{defined}}"]]
entry_points:
  main:
    command: "python secretive.py"
"""

SECRETIVE_PY = """
import hashlib, os, time
import mlflow
for name in ("COPIED_SECRET", "DEFINED_SECRET", "MLFLOW_TRACKING_TOKEN",
             "MLFLOW_TRACKING_PASSWORD"):
    value = os.environ.get(name, "")
    print(name, hashlib.sha256(value.encode()).hexdigest(), flush=True)
mlflow.log_metric("through_the_env_file", 1.0)
print("waiting", flush=True)
while not os.path.exists("/signal/go"):
    time.sleep(0.05)
"""


def cmdlines() -> str:
    """Every process's command line, as ps shows them (blocking: reads /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                out.append(Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" "))
            except OSError:
                continue
    return b"\n".join(out).decode(errors="replace")


async def test_secrets_reach_the_container_and_no_argv_inspect_log_or_record(
    docker_daemon: DockerDaemon,
    docker_registry: Registry,
    mlflow_server: MlflowServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level("DEBUG")
    token = f"tok-{uuid.uuid4().hex}"
    password = f"pw-{uuid.uuid4().hex}"
    secrets = {
        "COPIED_SECRET": f"copied-{uuid.uuid4().hex}",
        "DEFINED_SECRET": f"defined-{uuid.uuid4().hex}",
        "MLFLOW_TRACKING_TOKEN": token,
        "MLFLOW_TRACKING_PASSWORD": password,
    }
    registry_password = f"registry-{uuid.uuid4().hex}"
    signal_dir = tmp_path / "signal"
    await anyio.Path(signal_dir).mkdir()
    monkeypatch.setenv("AIOPROJ_TEST_SIGNAL", str(signal_dir))
    monkeypatch.setenv("COPIED_SECRET", secrets["COPIED_SECRET"])
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    uri = mlflow_server.uri.replace("http://", f"http://alice:{password}@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    project = await amake_project(
        tmp_path / "secretive",
        SECRET_MLPROJECT.format(defined=secrets["DEFINED_SECRET"]),
        {"secretive.py": SECRETIVE_PY},
    )
    dockerd_log = anyio.Path("/run/aioproj-tests/dockerd.log")
    log_start = (await dockerd_log.stat()).st_size if await dockerd_log.exists() else 0
    auth = {"registry": docker_registry.host, "username": "bob", "password": registry_password}
    seen: dict[str, str] = {}
    async with Runner(echo="labelled") as runner:
        run = await runner.run(
            str(project),
            docker_auth=auth,
            docker_args={"network": "host"},
            synchronous=False,
        )
        container = await wait_running(docker_daemon, f"aioproj.run_id={run.run_id}")
        lines = []
        with anyio.move_on_after(60):
            async for line in run.logs():  # live, while the container runs
                lines.append(line.rstrip("\n"))
                if lines[-1] == "waiting":
                    break
        assert lines[-1:] == ["waiting"], lines
        seen["argv of every process"] = await anyio.to_thread.run_sync(cmdlines)
        seen["docker inspect"] = await docker_out(docker_daemon, "inspect", container)
        seen["journal"] = await journal_text()
        inspected = json.loads(seen["docker inspect"])[0]
        await anyio.Path(signal_dir / "go").write_text("")
        assert await run == RunStatus.FINISHED
        output = await logs_of(run)
    # The values arrived, each as itself.
    for name, value in secrets.items():
        assert f"{name} {hashlib.sha256(value.encode()).hexdigest()}" in output
    # ... through the env file, not docker's configuration.
    assert any(m["Destination"] == "/run/aioproj/env" for m in inspected["Mounts"])
    env_names = {item.split("=", 1)[0] for item in inspected["Config"]["Env"]}
    assert not env_names & set(secrets)
    record = await read_run(mlflow_server.uri, run.run_id)
    assert record.data.metrics == {"through_the_env_file": 1.0}
    captured = await anyio.to_thread.run_sync(capfd.readouterr)
    seen["output"] = output
    seen["stdout"] = captured.out
    seen["stderr"] = captured.err
    seen["log records"] = caplog.text
    seen["tags"] = json.dumps(record.data.tags)
    seen["params"] = json.dumps(record.data.params)
    seen["dockerd log"] = (await dockerd_log.read_bytes())[log_start:].decode(errors="replace")
    leaks = [
        (where, name)
        for where, text in seen.items()
        for name, value in [*secrets.items(), ("registry password", registry_password)]
        if value in text
    ]
    # The run journal keeps the tracking URI as given, credentials included (mode 0600, for
    # `aioproj recover`; see aioproj/journal.py): that one is by design, nothing else is.
    assert leaks == [("journal", "MLFLOW_TRACKING_PASSWORD")]
    assert f"alice:{password}" not in seen["argv of every process"]


async def test_recover_finds_the_container_of_a_run_whose_start_was_never_journalled(
    docker_daemon: DockerDaemon, tmp_path: Path, tracking_uri: str, test_label: str
) -> None:
    driver = tmp_path / "early_death.py"
    await anyio.Path(driver).write_text(EARLY_DEATH)
    done = await anyio.run_process(
        [sys.executable, str(driver), tracking_uri, docker_daemon.docker, BASE_IMAGE, test_label]
    )
    run_id = done.stdout.decode().strip()
    assert await containers(docker_daemon, test_label)
    (result,) = await recover(grace_period=1)
    assert (result.run_id, result.status) == (run_id, "KILLED")
    assert result.action == "stopped its docker container"
    assert await containers(docker_daemon, test_label) == []
    assert not [d for d in await env_dirs() if run_id in d]


@pytest.mark.slow
async def test_a_detached_run_keeps_its_docker_args_and_its_cancel_stops_the_container(
    docker_daemon: DockerDaemon,
    tracking_project: Path,
    sleeper: Path,
    tracking_uri: str,
    test_label: str,
) -> None:
    """MLflow's test_docker_project_execution_async_docker_args: an asynchronous run that
    a separate process supervises (aioproj's detach=True) gets the same docker_args."""
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(tracking_project), entry_point="limits", synchronous=False, detach=True,
            docker_args={"memory": "512m", "read-only": True, "label": test_label},
        )  # fmt: skip
        assert await run == RunStatus.FINISHED
        sleeping = await runner.run(
            str(sleeper), entry_point="polite", synchronous=False, detach=True,
            docker_args={"label": test_label},
        )  # fmt: skip
        await wait_running(docker_daemon, test_label)
        await sleeping.cancel()
        assert await sleeping == RunStatus.KILLED
    assert await containers(docker_daemon, test_label) == []
    log = Path(tracking_uri.removeprefix("file://")) / "0" / run.run_id / "artifacts"
    seen = fields(await anyio.Path(log / "aioproj" / "output.log").read_text())
    assert seen["memory"] == str(512 << 20)
    assert seen["rootfs"] == "readonly"
