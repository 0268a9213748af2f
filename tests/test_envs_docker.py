"""docker_env projects through the docker CLI: the exact commands, with a stand-in
``docker`` on PATH.

The behaviour (containers, mounts, tracking from inside, clean-up, secrets) is proved on
a real Docker daemon in tests/test_docker_daemon.py. These tests pin what aioproj asks
docker for, call by call and argument by argument, and inject the faults a daemon does
not produce on demand (a failing ``docker info``, pull or build). The stand-in logs its
argv as JSON lines, keeps a small image registry in a JSON file, builds "images" by
copying the build context, and runs ``docker run`` commands locally (container paths
mapped back to the host), so the runner's side of a run is exercised too.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from aioproj import Runner, RunStatus
from aioproj.envs import prepare_env
from aioproj.envs.docker import (
    DockerPreparedEnv,
    container_env_names,
    docker_args_argv,
    docker_run_argv,
    dockerfile_text,
    image_tag,
    tracking_mount,
)
from aioproj.errors import EnvironmentBuildError
from aioproj.project import load_project

from .support import all_runs, make_project, process_gone, read_run

pytestmark = pytest.mark.anyio

SECRET = "s3cr3t-Value-9f8e7d"
PASSWORD = "hunter2-registry-pw"

FAKE_DOCKER = r'''#!{python}
"""A stand-in docker CLI (see tests/test_envs_docker.py)."""
import hashlib, json, os, shutil, subprocess, sys

state_dir = os.environ["FAKE_DOCKER_STATE"]
images_file = os.path.join(state_dir, "images.json")
args = sys.argv[1:]
entry = {{"argv": args}}


def load():
    try:
        with open(images_file) as f:
            return json.load(f)
    except FileNotFoundError:
        return {{}}


def save(images):
    with open(images_file, "w") as f:
        json.dump(images, f)


def log():
    with open(os.path.join(state_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")


def image_id(name):
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


cmd = args[0] if args else ""
if cmd == "info":
    log()
    if os.environ.get("FAKE_DOCKER_INFO_FAIL"):
        print("Cannot connect to the Docker daemon at unix:///var/run/docker.sock.")
        sys.exit(1)
    print("Server Version: 99.0-fake")
elif args[:2] == ["image", "inspect"]:
    log()
    images = load()
    if args[2] not in images:
        print("Error: No such image: " + args[2], file=sys.stderr)
        sys.exit(1)
    print(json.dumps([{{"Id": images[args[2]]["id"], "RepoTags": [args[2]]}}]))
elif cmd == "pull":
    log()
    if args[1] in os.environ.get("FAKE_DOCKER_UNPULLABLE", "").split(","):
        print("Error response from daemon: pull access denied for " + args[1])
        sys.exit(1)
    images = load()
    images[args[1]] = {{"id": image_id(args[1]), "code": None}}
    save(images)
    print("Status: Downloaded newer image for " + args[1])
elif cmd == "login":
    password = sys.stdin.read()
    entry["password_received"] = bool(password.strip())
    log()
    print("Login Succeeded")
elif cmd == "build":
    tag = args[args.index("-t") + 1]
    dockerfile = args[args.index("-f") + 1]
    context = args[-1]
    with open(dockerfile) as f:
        entry["dockerfile"] = f.read()
    entry["context_files"] = sorted(
        os.path.relpath(os.path.join(d, n), context)
        for d, _, names in os.walk(context) for n in names
    )
    log()
    if os.environ.get("FAKE_DOCKER_BUILD_SLEEP"):
        import time
        with open(os.path.join(state_dir, "build.pid"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(float(os.environ["FAKE_DOCKER_BUILD_SLEEP"]))
    if os.environ.get("FAKE_DOCKER_BUILD_FAIL"):
        print("Step 2/3 : COPY . /mlflow/projects/code/ failed: no space left on device")
        sys.exit(1)
    code = os.path.join(state_dir, "images", tag.replace("/", "_").replace(":", "_"))
    shutil.rmtree(code, ignore_errors=True)
    shutil.copytree(context, code)
    images = load()
    images[tag] = {{"id": image_id(tag + "built"), "code": code}}
    save(images)
    print("Successfully tagged " + tag)
elif cmd == "run":
    rest = args[1:]
    mounts, envs, workdir, flags, labels, entrypoint = [], [], None, [], [], None
    with_value = {{"--gpus", "--memory", "--name", "--network", "--shm-size", "-m"}}
    while rest and rest[0].startswith("-"):
        opt = rest.pop(0)
        if opt == "-v":
            mounts.append(rest.pop(0).split(":")[:2])
        elif opt == "-e":
            envs.append(rest.pop(0))
        elif opt == "-w":
            workdir = rest.pop(0)
        elif opt == "--label":
            labels.append(rest.pop(0))
        elif opt == "--entrypoint":
            entrypoint = rest.pop(0)
        elif opt in with_value:
            flags += [opt, rest.pop(0)]
        else:
            flags.append(opt)
    image, command = rest[0], rest[1:]
    images = load()
    entry.update(image=image, mounts=mounts, env_names=envs, workdir=workdir, flags=flags,
                 labels=labels, entrypoint=entrypoint, command=command,
                 tracking_uri_seen=os.environ.get("MLFLOW_TRACKING_URI"),
                 env_present={{n: n in os.environ for n in envs}})
    if entrypoint is not None:
        command = [entrypoint] + command
    log()
    if image not in images:
        print("Unable to find image " + image, file=sys.stderr)
        sys.exit(125)

    def to_host(value):
        for host, ctr in sorted(mounts, key=lambda m: -len(m[1])):
            if ctr in value:
                return value.replace(ctr, host)
        return value

    env = {{n: to_host(os.environ[n]) for n in envs if n in os.environ}}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env["HOME"] = os.environ.get("HOME", "/tmp")
    cwd = to_host(workdir) if workdir else images[image]["code"] or state_dir
    sys.stdout.flush()
    sys.exit(subprocess.call([to_host(c) for c in command], cwd=cwd, env=env))
elif cmd in ("ps", "stop", "rm"):
    log()  # its "containers" are processes that are gone once `run` returns: none to list
else:
    log()
    print("fake docker: unknown command " + " ".join(args), file=sys.stderr)
    sys.exit(2)
'''

MLPROJECT = """
name: docker-example
docker_env:
  image: python:3.11-fake
  volumes: ["/data/in:/in:ro"]
  environment: [["DEFINED_VAR", "defined-value"], "COPIED_VAR"]
entry_points:
  main:
    parameters:
      words: {type: string, default: "two words"}
    command: "python show.py {words}"
  fail:
    command: "python -c 'import sys; print(\\"going down\\"); sys.exit(3)'"
"""

SHOW_PY = """
import os, sys
print("args=" + "|".join(sys.argv[1:]))
print("cwd=" + os.path.basename(os.getcwd()))
print("defined=" + os.environ.get("DEFINED_VAR", "-"))
print("copied=" + os.environ.get("COPIED_VAR", "-"))
print("run_id=" + os.environ.get("MLFLOW_RUN_ID", "-"))
print("uri=" + os.environ.get("MLFLOW_TRACKING_URI", "-"))
"""

TRACK_PY = """
import mlflow
with mlflow.start_run():
    mlflow.log_metric("from_container", 1.5)
"""


class FakeDocker:
    """The stand-in's state directory: its log and images."""

    def __init__(self, state: Path) -> None:
        self.state = state

    def calls(self) -> list[dict[str, Any]]:
        log = self.state / "log.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    async def acalls(self) -> list[dict[str, Any]]:
        return await anyio.to_thread.run_sync(self.calls)

    async def argvs(self) -> list[list[str]]:
        return [c["argv"] for c in await self.acalls()]

    async def raw_log(self) -> str:
        path = anyio.Path(self.state / "log.jsonl")
        return await path.read_text() if await path.exists() else ""

    def add_image(self, name: str) -> None:
        images = self.state / "images.json"
        data = json.loads(images.read_text()) if images.exists() else {}
        data[name] = {"id": "sha256:" + hashlib.sha256(name.encode()).hexdigest(), "code": None}
        images.write_text(json.dumps(data))


@pytest.fixture
def docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDocker:
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    exe = bindir / "docker"
    exe.write_text(FAKE_DOCKER.format(python=sys.executable))
    exe.chmod(0o755)
    state = tmp_path / "docker-state"
    state.mkdir()
    monkeypatch.setenv("FAKE_DOCKER_STATE", str(state))
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("COPIED_VAR", "copied-value")
    return FakeDocker(state)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = make_project(tmp_path / "proj", MLPROJECT, {"show.py": SHOW_PY, "track.py": TRACK_PY})
    (root / "mlruns").mkdir()
    (root / "mlruns" / "junk").write_text("not for the image")
    return root


def docker_exe() -> str:
    found = next(
        (Path(d) / "docker" for d in os.environ["PATH"].split(os.pathsep) if d), Path("docker")
    )
    return str(found)


# -- pure command building --------------------------------------------------------------


def test_docker_args_become_options() -> None:
    assert docker_args_argv(
        {"gpus": "all", "privileged": True, "t": True, "m": "1g", "memory": "1g", "off": False}
    ) == ["--gpus", "all", "--privileged", "-t", "-m", "1g", "--memory", "1g"]


def test_docker_run_argv_is_exact() -> None:
    argv = docker_run_argv(
        "/bin/docker",
        "img:1",
        docker_args={"gpus": "all", "privileged": True},
        labels=["aioproj.run_id=r1"],
        mounts=["/h:/c", "/data:/data:ro"],
        workdir="/mlflow/projects/code",
        env_names=["MLFLOW_RUN_ID", "API_TOKEN"],
    )
    assert argv == [
        "/bin/docker", "run", "--rm", "--gpus", "all", "--privileged",
        "--label", "aioproj.run_id=r1",
        "-v", "/h:/c", "-v", "/data:/data:ro", "-w", "/mlflow/projects/code",
        "-e", "MLFLOW_RUN_ID", "-e", "API_TOKEN", "img:1",
    ]  # fmt: skip


def test_env_file_mode_starts_the_loader_then_the_entrypoint() -> None:
    argv = docker_run_argv(
        "/bin/docker",
        "img:1",
        docker_args={"entrypoint": "/ignored", "m": "1g"},
        mounts=["$F:/run/aioproj/env:ro"],
        entrypoint=("/docker-entrypoint.sh", "--flag"),
    )
    assert argv == [
        "/bin/docker", "run", "--rm", "-m", "1g", "-v", "$F:/run/aioproj/env:ro",
        "--entrypoint", "/bin/sh", "img:1", "-c", '. /run/aioproj/env && exec "$@"',
        "aioproj-env", "/docker-entrypoint.sh", "--flag",
    ]  # fmt: skip


def test_env_file_holds_values_as_shell_data() -> None:
    from aioproj.envs.docker import env_file_text

    text = env_file_text({"A": "it's $(rm -rf /) `x`\nline2", "B": ""})
    assert text == "export A='it'\"'\"'s $(rm -rf /) `x`\nline2'\nexport B=''\n"


def test_tracking_mount_for_local_stores_only() -> None:
    assert tracking_mount("file:///tmp/x/mlruns") == ("/tmp/x/mlruns", "file:///mlflow/tmp/mlruns")
    assert tracking_mount("/tmp/y") == ("/tmp/y", "file:///mlflow/tmp/mlruns")
    assert tracking_mount("sqlite:////tmp/db.sqlite") == (
        "/tmp/db.sqlite",
        "sqlite:////mlflow/tmp/mlruns",
    )
    assert tracking_mount("http://mlflow:5000") is None
    assert tracking_mount("databricks") is None
    assert tracking_mount("databricks://profile") is None


def test_env_names_pass_names_only() -> None:
    items: list[str | tuple[str, str]] = [("DEFINED", "v"), "COPIED", "MLFLOW_RUN_ID"]
    assert container_env_names(items, "file:///x") == [
        "MLFLOW_RUN_ID",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_ALLOW_FILE_STORE",
        "DEFINED",
        "COPIED",
    ]
    assert "DATABRICKS_TOKEN" in container_env_names([], "databricks")
    assert "MLFLOW_TRACKING_TOKEN" in container_env_names([], "https://mlflow.example")


def test_dockerfile_and_tag() -> None:
    assert dockerfile_text("python:3.11") == (
        "FROM python:3.11\nCOPY . /mlflow/projects/code/\nWORKDIR /mlflow/projects/code/\n"
    )
    assert image_tag("docker-example", "0123456789abcdef") == "docker-example:0123456"
    assert image_tag("docker-example", None) == "docker-example:latest"


# -- preparation ------------------------------------------------------------------------


async def load(root: Path) -> Any:
    return await anyio.to_thread.run_sync(load_project, root)


async def prepare(root: Path, **kwargs: Any) -> DockerPreparedEnv:
    env = await prepare_env(
        await load(root), "docker", cache_dir=root.parent / "envs", project_dir=root, **kwargs
    )
    assert isinstance(env, DockerPreparedEnv)
    return env


async def test_missing_image_is_pulled_then_run_command_built(
    docker: FakeDocker, project: Path
) -> None:
    env = await prepare(
        project, docker_args={"gpus": "all", "privileged": True}, tracking_uri="file:///t/mlruns"
    )
    exe = docker_exe()
    assert await docker.argvs() == [
        ["info"],
        ["image", "inspect", "python:3.11-fake"],
        ["pull", "python:3.11-fake"],
        ["image", "inspect", "python:3.11-fake"],
    ]
    # The project has docker_env.environment: its values go through the env file.
    assert env.run_argv == (
        exe, "run", "--rm", "--gpus", "all", "--privileged",
        "--label", "aioproj.run_id=$MLFLOW_RUN_ID",
        "-v", f"{project}:/mlflow/projects/code",
        "-v", "/t/mlruns:/mlflow/tmp/mlruns",
        "-v", "/t/mlruns:/t/mlruns",
        "-v", "/data/in:/in:ro",
        "-v", "$AIOPROJ_DOCKER_ENV_FILE:/run/aioproj/env:ro",
        "-w", "/mlflow/projects/code",
        "-e", "MLFLOW_RUN_ID", "-e", "MLFLOW_TRACKING_URI", "-e", "MLFLOW_EXPERIMENT_ID",
        "-e", "MLFLOW_ALLOW_FILE_STORE",
        "--entrypoint", "/bin/sh", "python:3.11-fake",
        "-c", '. /run/aioproj/env && exec "$@"', "aioproj-env",
    )  # fmt: skip
    assert env.wrap("python show.py 'a b'") == (
        "MLFLOW_TRACKING_URI=file:///mlflow/tmp/mlruns "
        f'{exe} run --rm --gpus all --privileged --label "aioproj.run_id=$MLFLOW_RUN_ID" '
        f"-v {project}:/mlflow/projects/code -v /t/mlruns:/mlflow/tmp/mlruns "
        "-v /t/mlruns:/t/mlruns -v /data/in:/in:ro "
        '-v "$AIOPROJ_DOCKER_ENV_FILE:/run/aioproj/env:ro" -w /mlflow/projects/code '
        "-e MLFLOW_RUN_ID -e MLFLOW_TRACKING_URI -e MLFLOW_EXPERIMENT_ID "
        "-e MLFLOW_ALLOW_FILE_STORE --entrypoint /bin/sh python:3.11-fake "
        "-c '. /run/aioproj/env && exec \"$@\"' aioproj-env python show.py 'a b'"
    )
    assert env.file_env_names == ("DEFINED_VAR", "COPIED_VAR")
    assert env.defined == {"DEFINED_VAR": "defined-value"}
    assert env.env_vars == {}  # values never reach the docker CLI's environment
    image_id = "sha256:" + hashlib.sha256(b"python:3.11-fake").hexdigest()
    assert env.tag == "docker"
    assert env.tags == {
        "mlflow.docker.image.uri": "python:3.11-fake",
        "mlflow.docker.image.id": image_id,
    }


async def test_without_secrets_the_command_is_mlflows_plus_a_label(
    docker: FakeDocker, tmp_path: Path
) -> None:
    root = await anyio.to_thread.run_sync(
        make_project,
        tmp_path / "plain",
        "name: plain\ndocker_env:\n  image: img:1\nentry_points:\n  main:\n    command: x\n",
    )
    await anyio.to_thread.run_sync(docker.add_image, "img:1")
    env = await prepare(root, tracking_uri="file:///t/mlruns")
    assert env.run_argv == (
        docker_exe(), "run", "--rm", "--label", "aioproj.run_id=$MLFLOW_RUN_ID",
        "-v", f"{root}:/mlflow/projects/code",
        "-v", "/t/mlruns:/mlflow/tmp/mlruns", "-v", "/t/mlruns:/t/mlruns",
        "-w", "/mlflow/projects/code",
        "-e", "MLFLOW_RUN_ID", "-e", "MLFLOW_TRACKING_URI", "-e", "MLFLOW_EXPERIMENT_ID",
        "-e", "MLFLOW_ALLOW_FILE_STORE", "img:1",
    )  # fmt: skip
    assert env.file_env_names == ()


async def test_a_remote_tracking_uri_goes_through_the_env_file(
    docker: FakeDocker, project: Path
) -> None:
    env = await prepare(project, tracking_uri="https://mlflow.example")
    names = [env.run_argv[i + 1] for i, a in enumerate(env.run_argv) if a == "-e"]
    assert names == ["MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_ALLOW_FILE_STORE"]
    assert env.file_env_names == (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_INSECURE_TLS",
        "MLFLOW_TRACKING_SERVER_CERT_PATH",
        "DEFINED_VAR",
        "COPIED_VAR",
    )


async def test_a_loopback_tracking_server_without_host_network_is_warned_about(
    docker: FakeDocker, project: Path
) -> None:
    with pytest.warns(UserWarning, match=r"network.*host"):
        await prepare(project, tracking_uri="http://127.0.0.1:5000")
    await prepare(project, tracking_uri="http://127.0.0.1:5000", docker_args={"network": "host"})


async def test_concurrent_preparations_share_one_info_pull_and_build(
    docker: FakeDocker, project: Path
) -> None:
    envs: list[DockerPreparedEnv] = []

    async def one() -> None:
        envs.append(await prepare(project, build_image=True))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)
    assert [argv[:2] for argv in await docker.argvs()] == [
        ["info"],
        ["image", "inspect"],
        ["pull", "python:3.11-fake"],
        ["image", "inspect"],
        ["build", "-t"],
        ["image", "inspect"],
    ]
    assert len({env.image_id for env in envs}) == 1
    await prepare(project, build_image=True)  # once done, a new call looks again
    assert [argv[0] for argv in await docker.argvs()].count("build") == 2


async def test_the_launch_notes_where_to_look_for_its_container(
    docker: FakeDocker, project: Path
) -> None:
    """What the journal gets with the run's intent, before any container exists (the
    state tests/test_docker_daemon.py's early-death driver writes)."""
    env = await prepare(project)

    class Inner:
        tags: dict[str, str] = {}

    launch = env.wrap_launch(Inner())  # type: ignore[arg-type]
    assert launch.journal_state == {"docker": docker_exe()}  # type: ignore[attr-defined]


async def test_present_image_is_not_pulled(docker: FakeDocker, project: Path) -> None:
    await anyio.to_thread.run_sync(docker.add_image, "python:3.11-fake")
    env = await prepare(project)
    assert await docker.argvs() == [["info"], ["image", "inspect", "python:3.11-fake"]]
    assert env.image_uri == "python:3.11-fake"
    assert "-v" in env.run_argv  # the code mount; no tracking mount without a local store
    assert not any("/mlflow/tmp/mlruns" in a for a in env.run_argv)


async def test_login_feeds_the_password_on_stdin(docker: FakeDocker, project: Path) -> None:
    auth = {"registry": "registry.example:5000", "username": "bob", "password": PASSWORD}
    env = await prepare(project, docker_auth=auth)
    calls = await docker.acalls()
    login = [c for c in calls if c["argv"][0] == "login"]
    assert login == [
        {
            "argv": ["login", "registry.example:5000", "-u", "bob", "--password-stdin"],
            "password_received": True,
        }
    ]
    assert [c["argv"][0] for c in calls] == ["info", "login", "image", "pull", "image"]
    assert PASSWORD not in await docker.raw_log()
    assert PASSWORD not in repr(env)


async def test_pull_failure_is_an_environment_error(
    docker: FakeDocker, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DOCKER_UNPULLABLE", "python:3.11-fake")
    with pytest.raises(EnvironmentBuildError, match="pull access denied") as error:
        await prepare(project)
    assert "Pulling the docker image python:3.11-fake" in str(error.value)


async def test_build_image_builds_from_a_generated_dockerfile(
    docker: FakeDocker, project: Path
) -> None:
    env = await prepare(project, build_image=True, git_commit="abcdef0123456789")
    calls = await docker.acalls()
    build = next(c for c in calls if c["argv"][0] == "build")
    argv = build["argv"]
    assert argv[:3] == ["build", "-t", "docker-example:abcdef0"]
    assert argv[3] == "-f"
    assert argv[4].endswith("Dockerfile.mlflow-autogenerated")
    assert build["dockerfile"] == dockerfile_text("python:3.11-fake")
    assert build["context_files"] == ["MLproject", "show.py", "track.py"]  # no mlruns
    assert [c["argv"][:2] for c in calls][-1] == ["image", "inspect"]
    assert env.image_uri == "docker-example:abcdef0"
    assert env.tags["mlflow.docker.image.uri"] == "docker-example:abcdef0"
    built_id = "sha256:" + hashlib.sha256(b"docker-example:abcdef0built").hexdigest()
    assert env.tags["mlflow.docker.image.id"] == built_id
    assert "-w" not in env.run_argv  # the code is in the image
    assert not any(a.endswith(":/mlflow/projects/code") for a in env.run_argv)
    # the temporary context is gone
    assert not await anyio.Path(argv[-1]).exists()
    assert not await anyio.Path(argv[4]).exists()


async def test_failed_build_is_an_error_and_leaves_no_context(
    docker: FakeDocker, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DOCKER_BUILD_FAIL", "1")
    with pytest.raises(EnvironmentBuildError, match="no space left on device") as error:
        await prepare(project, build_image=True)
    assert "Building the docker image docker-example:latest" in str(error.value)
    build = next(c for c in await docker.acalls() if c["argv"][0] == "build")
    assert not await anyio.Path(build["argv"][-1]).parent.exists()


async def test_cancelled_build_is_killed_and_leaves_no_context(
    docker: FakeDocker, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DOCKER_BUILD_SLEEP", "30")
    pid_file = anyio.Path(docker.state / "build.pid")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: prepare(project, build_image=True))
            for _ in range(200):  # the stand-in writes its pid once the build started
                if await pid_file.exists() and (await pid_file.read_text()).strip():
                    break
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    pid = int(await pid_file.read_text())
    assert process_gone(pid)
    build = next(c for c in await docker.acalls() if c["argv"][0] == "build")
    assert not await anyio.Path(build["argv"][-1]).parent.exists()


async def test_build_image_tag_outside_git(docker: FakeDocker, project: Path) -> None:
    env = await prepare(project, build_image=True)
    assert env.image_uri == "docker-example:latest"


async def test_project_name_is_required(docker: FakeDocker, tmp_path: Path) -> None:
    root = await anyio.to_thread.run_sync(
        make_project, tmp_path / "noname", "docker_env:\n  image: x\n"
    )
    with pytest.raises(
        EnvironmentBuildError,
        match=r"Project name in MLProject must be specified when using docker for image tagging\.",
    ):
        await prepare(root)
    assert await docker.argvs() == []


async def test_docker_must_be_on_path(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("COPIED_VAR", "x")
    with pytest.raises(EnvironmentBuildError, match="Could not find Docker executable"):
        await prepare(project)


async def test_docker_info_failure_shows_its_output(
    docker: FakeDocker, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DOCKER_INFO_FAIL", "1")
    with pytest.raises(EnvironmentBuildError) as error:
        await prepare(project)
    message = str(error.value)
    assert "Ran `docker info` to ensure docker daemon is running but it failed" in message
    assert "Cannot connect to the Docker daemon" in message


async def test_a_non_docker_project_is_refused(docker: FakeDocker, tmp_path: Path) -> None:
    root = await anyio.to_thread.run_sync(make_project, tmp_path / "plain", "name: plain\n")
    with pytest.raises(EnvironmentBuildError, match="docker_env"):
        await prepare(root)


# -- end to end -------------------------------------------------------------------------


async def test_docker_run_finishes_with_output_and_tags(
    docker: FakeDocker, project: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            parameters={"words": "hello there"},
            docker_args={"gpus": "all"},
            env_manager="virtualenv",  # ignored for docker projects
        )
        assert await run.get_status() is RunStatus.FINISHED
        lines = [line async for line in run.logs()]
    text = "\n".join(lines)
    assert "args=hello there" in text
    assert "cwd=proj" in text
    assert "defined=defined-value" in text
    assert "copied=copied-value" in text
    assert f"run_id={run.run_id}" in text
    host_store = tracking_uri.removeprefix("file://")
    assert f"uri=file://{host_store}" in text  # the container's URI, mapped back by the stand-in
    docker_run = next(c for c in await docker.acalls() if c["argv"][0] == "run")
    assert docker_run["tracking_uri_seen"] == "file:///mlflow/tmp/mlruns"
    assert docker_run["flags"] == ["--rm", "--gpus", "all"]
    assert docker_run["labels"] == [f"aioproj.run_id={run.run_id}"]
    assert docker_run["entrypoint"] == "/bin/sh"
    assert docker_run["command"][-3:] == ["python", "show.py", "hello there"]
    assert docker_run["env_present"]["MLFLOW_RUN_ID"]
    assert "DEFINED_VAR" not in docker_run["env_names"]  # it came through the env file
    record = await read_run(tracking_uri, run.run_id)
    tags = record.data.tags
    assert tags["mlflow.project.env"] == "docker"
    assert tags["mlflow.project.backend"] == "local"
    assert tags["mlflow.docker.image.uri"] == "python:3.11-fake"
    assert tags["mlflow.docker.image.id"].startswith("sha256:")


async def test_missing_host_variable_creates_no_run(
    docker: FakeDocker, project: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COPIED_VAR")
    async with Runner(echo="off") as runner:
        with pytest.raises(EnvironmentBuildError, match="COPIED_VAR was not set"):
            await runner.run(str(project))
    assert await all_runs(tracking_uri) == []
    assert await docker.argvs() == []


SECRET_PROJECT = """
name: secretive
docker_env:
  image: python:3.11-fake
  environment: ["AWS_SECRET_ACCESS_KEY", ["DATABRICKS_TOKEN", "{secret}"]]
entry_points:
  main:
    command: "python check.py"
"""

CHECK_PY = """
import hashlib, os
for name in ("AWS_SECRET_ACCESS_KEY", "DATABRICKS_TOKEN"):
    print(name, hashlib.sha256(os.environ[name].encode()).hexdigest())
"""


async def test_secrets_never_leave_the_environment(
    docker: FakeDocker,
    tmp_path: Path,
    tracking_uri: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    root = await anyio.to_thread.run_sync(
        lambda: make_project(
            tmp_path / "secretive",
            textwrap.dedent(SECRET_PROJECT).format(secret=SECRET + "-db"),
            {"check.py": CHECK_PY},
        )
    )
    auth = {"registry": "r.example", "username": "u", "password": PASSWORD}
    async with Runner(echo="labelled") as runner:
        run = await runner.run(str(root), docker_auth=auth)
        lines = [line async for line in run.logs()]
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    db_digest = hashlib.sha256((SECRET + "-db").encode()).hexdigest()
    assert any(f"AWS_SECRET_ACCESS_KEY {digest}" in line for line in lines)  # it arrived
    assert any(f"DATABRICKS_TOKEN {db_digest}" in line for line in lines)
    log = await docker.raw_log()
    assert ':/run/aioproj/env:ro"' in log  # the env file's mount
    assert '"AWS_SECRET_ACCESS_KEY"' not in log  # not even by name: it is in the file
    captured = await anyio.to_thread.run_sync(capfd.readouterr)
    assert digest in captured.out + captured.err  # the echo was captured
    record = await read_run(tracking_uri, run.run_id)
    for secret in (SECRET, PASSWORD):
        assert secret not in log
        assert secret not in captured.out
        assert secret not in captured.err
        assert secret not in caplog.text
        assert secret not in json.dumps(record.data.tags)
        assert secret not in json.dumps(record.data.params)
        assert all(secret not in line for line in lines)


async def test_secrets_are_not_in_errors(
    docker: FakeDocker, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DOCKER_UNPULLABLE", "python:3.11-fake")
    auth = {"registry": "r.example", "username": "u", "password": PASSWORD}
    with pytest.raises(EnvironmentBuildError) as error:
        await prepare(project, docker_auth=auth)
    assert PASSWORD not in str(error.value)


def test_volumes_expand_variables_and_home_on_the_host_side(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aioproj.envs.docker import expand_volume

    monkeypatch.setenv("DATA_DIR", "/srv/data")
    monkeypatch.setenv("HOME", "/home/me")
    assert expand_volume("$DATA_DIR/x:/data") == "/srv/data/x:/data"
    assert expand_volume("~/.aws:/root/.aws:ro") == "/home/me/.aws:/root/.aws:ro"
    assert expand_volume("/abs:/c:$KEEP") == "/abs:/c:$KEEP"
