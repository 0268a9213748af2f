"""Secrets never leave the environment: not into logs, errors, tags, params, artifacts,
caches or reprs.

Runs on the local backend, with the file store and with the REST store (a real ``mlflow
server``), with every kind of secret a user hands aioproj set at once:
MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_PASSWORD, a password in the tracking URI, a
password in a git URL, a ``docker_auth`` password, a secret defined in ``docker_env``
(passed as ``docker run -e NAME``), a host variable copied into the container, and a token
in ``backend_config``. The runs succeed, fail, cannot start, are cancelled and are refused
before they start; then every surface is searched for each secret, raw, percent-encoded
and base64-encoded (as a Basic ``Authorization`` header would carry it):

- every log record (caplog, DEBUG, all loggers) and everything printed (capfd);
- every error (message, repr, chained causes, formatted traceback) and warning;
- every byte the tracking store persisted (the file store directory; the server's
  database and artifact store): tags, params, meta.yaml, ``aioproj/output.log``;
- every byte in aioproj's caches (clones, extracted archives, environments);
- the reprs of the runner, the handles and the stores, and each run's ``logs()``.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import textwrap
import traceback
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import anyio
import anyio.to_thread
import pytest

import aioproj
from aioproj import Runner, RunStatus, SubmittedRun

from .gitserver import GitServer, closed_port
from .mlflow_server import MlflowServer
from .support import all_runs, make_project, process_gone
from .test_envs_docker import FakeDocker, docker  # noqa: F401  (the stand-in docker CLI)
from .test_sources import init_repo

pytestmark = pytest.mark.anyio


def _secret(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:12]}-s3cr3t"


@dataclass
class Secrets:
    token: str = field(default_factory=lambda: _secret("token"))
    password: str = field(default_factory=lambda: _secret("password"))
    uri_password: str = field(default_factory=lambda: _secret("uripw"))
    git_password: str = field(default_factory=lambda: _secret("gitpw"))
    docker_password: str = field(default_factory=lambda: _secret("dockerpw"))
    docker_defined: str = field(default_factory=lambda: _secret("defined"))
    docker_copied: str = field(default_factory=lambda: _secret("copied"))
    backend_token: str = field(default_factory=lambda: _secret("backendcfg"))

    def all(self) -> list[str]:
        return list(vars(self).values())

    def forms(self) -> Iterator[tuple[str, str]]:
        """(secret, form) for each way a secret could be written down."""
        for secret in self.all():
            for user in ("alice", "user", "u"):
                basic = base64.b64encode(f"{user}:{secret}".encode()).decode()
                yield secret, basic
            yield secret, secret
            yield secret, quote(secret, safe="")
            yield secret, base64.b64encode(secret.encode()).decode()


@dataclass
class Surfaces:
    """Everything a test gathered that a user, a log or a store could see."""

    texts: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, text: str) -> None:
        self.texts.append((where, text))

    def add_error(self, where: str, error: BaseException) -> None:
        seen: BaseException | None = error
        while seen is not None:
            self.add(f"{where}: str", str(seen))
            self.add(f"{where}: repr", repr(seen))
            seen = seen.__cause__ or seen.__context__
        self.add(f"{where}: traceback", "".join(traceback.format_exception(error)))

    def add_tree(self, where: str, root: Path) -> int:
        """Every file under ``root``, as text (bytes decoded leniently); returns the count."""
        count = 0
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = Path(dirpath, name)
                if path.is_symlink() or not path.is_file():
                    continue
                data = path.read_bytes()
                self.add(f"{where}: {path}", data.decode("utf-8", "replace"))
                self.add(f"{where}: {path} (latin-1)", data.decode("latin-1"))
                count += 1
        return count

    def leaks(self, secrets: Secrets) -> list[str]:
        found = []
        for where, text in self.texts:
            for secret, form in secrets.forms():
                if form in text:
                    found.append(f"{secret!r} (as {form!r}) in {where}")
        return found


MLPROJECT = """
name: secretive
entry_points:
  main:
    parameters:
      alpha: {type: float, default: 0.5}
    command: "echo alpha={alpha} run=$MLFLOW_RUN_ID"
  fail:
    command: "echo going down; exit 3"
  missing:
    command: "no-such-command-aioproj-test"
  slow:
    command: "echo started; sleep 30"
  quiet:
    command: "true"
"""

DOCKER_MLPROJECT = """
name: secretive-docker
docker_env:
  image: python:3.11-fake
  environment: [["DEFINED_TOKEN", "{defined}"], "COPIED_TOKEN"]
entry_points:
  main:
    command: "python check.py"
  fail:
    command: "python check.py 3"
"""

CHECK_PY = """
import hashlib, os, sys
for name in ("DEFINED_TOKEN", "COPIED_TOKEN", "MLFLOW_TRACKING_TOKEN"):
    value = os.environ.get(name, "")
    print(name, "set" if value else "unset", hashlib.sha256(value.encode()).hexdigest()[:12])
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> Secrets:
    found = Secrets()
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", found.token)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", found.password)
    monkeypatch.setenv("COPIED_TOKEN", found.docker_copied)
    return found


@pytest.fixture(params=["file", "rest"])
def store(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    secrets: Secrets,
) -> tuple[str, Path]:
    """(tracking URI, directory holding every byte the store persists)."""
    if request.param == "file":
        root = tmp_path / "mlruns"
        uri = root.as_uri()
    else:
        server: MlflowServer = request.getfixturevalue("mlflow_server")
        root = server.root
        host = server.uri.removeprefix("http://")
        uri = f"http://alice:{quote(secrets.uri_password, safe='')}@{host}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri, root


@pytest.fixture(scope="module")
def private_git(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    root = tmp_path_factory.mktemp("private-git")
    with GitServer(root) as server:
        init_repo(root / "proj", {"MLproject": textwrap.dedent(MLPROJECT)})
        yield server


async def _gather_store_and_caches(surfaces: Surfaces, store_root: Path) -> None:
    cache = Path(os.environ["AIOPROJ_CACHE_DIR"])

    def walk() -> None:
        assert surfaces.add_tree("tracking store", store_root) > 0
        surfaces.add_tree("cache", cache)

    await anyio.to_thread.run_sync(walk)


async def _attempt(
    runner: Runner, surfaces: Surfaces, label: str, *args: object, **kwargs: object
) -> SubmittedRun | None:
    """One run that may fail in any way; its error goes into ``surfaces``."""
    kwargs.setdefault("env_manager", "local")
    wait = kwargs.setdefault("synchronous", False) is False and label != "cancelled"
    try:
        run = await runner.run(*args, **kwargs)  # type: ignore[arg-type]
    except aioproj.AioprojError as exc:
        surfaces.add_error(label, exc)
        return None
    if wait:
        await run.wait()
    surfaces.add(f"{label}: repr", repr(run))
    return run


async def test_local_runs_leak_no_secret(
    store: tuple[str, Path],
    secrets: Secrets,
    private_git: GitServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level("DEBUG")
    tracking_uri, store_root = store
    project = await anyio.to_thread.run_sync(lambda: make_project(tmp_path / "proj", MLPROJECT))
    private_git.auth = ("user", secrets.git_password)
    git_url = private_git.url("proj", userinfo=f"user:{secrets.git_password}")
    surfaces = Surfaces()
    runs: list[SubmittedRun] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with Runner(echo="labelled", grace_period=2) as runner:
            attempts: list[tuple[str, tuple[str], dict[str, object]]] = [
                ("succeeds", (str(project),), {}),
                ("fails", (str(project),), {"entry_point": "fail"}),
                ("fails, awaited", (str(project),), {"entry_point": "fail", "synchronous": True}),
                ("cannot start", (str(project),), {"entry_point": "missing"}),
                ("bad parameter", (str(project),), {"parameters": {"alpha": "x"}}),
                ("from git", (git_url,), {}),
                ("git fails", (git_url,), {"entry_point": "fail"}),
                ("git unknown version", (git_url,), {"version": "no-such-branch"}),
                (
                    "git unreachable",
                    (f"http://user:{secrets.git_password}@127.0.0.1:{closed_port()}/r.git",),
                    {},
                ),
                (
                    "zip unreachable",
                    (f"http://user:{secrets.git_password}@127.0.0.1:{closed_port()}/p.zip",),
                    {},
                ),
                (
                    "backend_config",
                    (str(project),),
                    {"backend_config": {"token": secrets.backend_token}},
                ),
            ]
            for label, args, kwargs in attempts:
                run = await _attempt(runner, surfaces, label, *args, **kwargs)
                if run is not None:
                    runs.append(run)
            slow = await _attempt(runner, surfaces, "cancelled", str(project), entry_point="slow")
            assert slow is not None
            await slow.cancel()
            runs.append(slow)
            for run in runs:
                surfaces.add(
                    f"logs of {run.run_id}", "\n".join([line async for line in run.logs()])
                )
            surfaces.add("runner repr", repr(runner))
            surfaces.add("store reprs", repr(list(runner._stores.values())))
    # What happened is what the test meant to happen.
    statuses = sorted([(await run.get_status()).value for run in runs])
    assert statuses == ["FAILED"] * 3 + ["FINISHED"] * 3 + ["KILLED"]
    records = await all_runs(tracking_uri)
    ours = {run.run_id for run in runs}
    assert {r.info.run_id for r in records} >= ours
    assert all(r.info.status != "RUNNING" for r in records if r.info.run_id in ours)
    for record in records:
        if record.info.run_id in ours:
            surfaces.add(f"tags of {record.info.run_id}", repr(record.data.tags))
            surfaces.add(f"params of {record.info.run_id}", repr(record.data.params))
    for warning in caught:
        surfaces.add("warning", str(warning.message))
    assert any("backend_config" in str(w.message) for w in caught)
    captured = await anyio.to_thread.run_sync(capfd.readouterr)
    surfaces.add("stdout", captured.out)
    surfaces.add("stderr", captured.err)
    assert "alpha=0.5" in captured.out  # the echo was captured
    surfaces.add("log records", caplog.text)
    await _gather_store_and_caches(surfaces, store_root)
    assert surfaces.leaks(secrets) == []


async def test_docker_runs_leak_no_secret(
    store: tuple[str, Path],
    secrets: Secrets,
    docker: FakeDocker,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level("DEBUG")
    tracking_uri, store_root = store
    project = await anyio.to_thread.run_sync(
        lambda: make_project(
            tmp_path / "docker-proj",
            DOCKER_MLPROJECT.format(defined=secrets.docker_defined),
            {"check.py": CHECK_PY},
        )
    )
    auth = {"registry": "r.example", "username": "u", "password": secrets.docker_password}
    surfaces = Surfaces()
    runs: list[SubmittedRun] = []
    async with Runner(echo="labelled", grace_period=2) as runner:
        docker_attempts: list[tuple[str, dict[str, object]]] = [
            ("docker succeeds", {}),
            ("docker fails", {"entry_point": "fail"}),
            ("docker build", {"build_image": True}),
        ]
        for label, kwargs in docker_attempts:
            run = await _attempt(
                runner,
                surfaces,
                label,
                str(project),
                docker_auth=auth,
                env_manager=None,
                docker_args={"network": "host"},  # a server on 127.0.0.1 is the host's
                **kwargs,
            )
            if run is not None:
                runs.append(run)
        for run in runs:
            lines = [line async for line in run.logs()]
            surfaces.add(f"logs of {run.run_id}", "\n".join(lines))
    assert sorted([(await run.get_status()).value for run in runs]) == [
        RunStatus.FAILED.value,
        RunStatus.FINISHED.value,
        RunStatus.FINISHED.value,
    ]
    records = {r.info.run_id: r for r in await all_runs(tracking_uri)}
    for run in runs:
        surfaces.add("tags", repr(records[run.run_id].data.tags))
        surfaces.add("params", repr(records[run.run_id].data.params))
    captured = await anyio.to_thread.run_sync(capfd.readouterr)
    assert "DEFINED_TOKEN set" in captured.out  # the secrets did reach the container
    assert "COPIED_TOKEN set" in captured.out
    surfaces.add("stdout", captured.out)
    surfaces.add("stderr", captured.err)
    surfaces.add("log records", caplog.text)
    # The stand-in logs what it saw in its environment too; the argv is what we passed.
    argvs = await docker.argvs()
    assert any(argv[0] == "run" for argv in argvs)
    surfaces.add("docker CLI argv of every call", repr(argvs))
    await _gather_store_and_caches(surfaces, store_root)
    assert surfaces.leaks(secrets) == []


def _tree_cmdlines(root: int) -> list[tuple[int, list[str]]]:
    """The argv of ``root`` and of all its descendants (blocking)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    found = []
    for pid in sorted(tree):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        found.append((pid, [arg.decode("utf-8", "replace") for arg in raw.split(b"\0")]))
    return found


async def _running_tree(root: int) -> list[tuple[int, list[str]]]:
    """:func:`_tree_cmdlines` once the run's ``sleep`` is among them."""
    with anyio.fail_after(30):
        while True:
            found = await anyio.to_thread.run_sync(_tree_cmdlines, root)
            if any("sleep" in argv for _, argv in found):
                return found
            await anyio.sleep(0.05)


async def _until_gone(pid: int) -> None:
    with anyio.fail_after(30):
        while not await anyio.to_thread.run_sync(process_gone, pid):  # noqa: ASYNC110
            await anyio.sleep(0.05)


async def test_a_git_password_reaches_no_sweep_record_supervisor_argv_or_error(
    store: tuple[str, Path],
    secrets: Secrets,
    private_git: GitServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The sinks a git password in a project URI reached before: a sweep's parent run
    (``mlflow.source.name``), the command line of a detached supervisor (``detach=True``
    and ``aioproj run --no-wait``, with a backend_config JSON), error messages quoting a
    value, run names and param values. The supervisors' argv is read from
    /proc/PID/cmdline while they run, as any local user could."""
    caplog.set_level("DEBUG")
    tracking_uri, store_root = store
    private_git.auth = ("user", secrets.git_password)
    git_url = private_git.url("proj", userinfo=f"user:{secrets.git_password}")
    config = json.dumps({"token": secrets.backend_token})
    earlier = {r.info.run_id for r in await all_runs(tracking_uri)}  # a shared server's
    surfaces = Surfaces()
    cmdlines: list[tuple[int, list[str]]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with Runner(echo="off", grace_period=2) as runner:
            # A sweep over the private repository: its parent run and its repr.
            sweep = aioproj.sweep(
                git_url, {"alpha": [0.1, 0.2]}, entry_point="quiet", runner=runner,
                env_manager="local", name="sweep-of-private-repo",
            )  # fmt: skip
            surfaces.add("sweep repr", repr(sweep))
            results = await sweep
            assert [r.status for r in results] == [RunStatus.FINISHED] * 2
            assert sweep.parent_run_id is not None
            # Errors quoting a value that holds the URL (an MLproject value error).
            for label, kwargs in [
                ("float given the git URL", {"parameters": {"alpha": git_url}}),
                ("malformed URL with a password", {"uri": git_url.replace("127.0.0.1", "[::1")}),
                ("run name with a NUL and the URL", {"run_name": f"{git_url}\0"}),
            ]:
                uri = str(kwargs.pop("uri", git_url))
                with pytest.raises(aioproj.AioprojError) as refused:
                    await runner.run(uri, env_manager="local", **kwargs)  # type: ignore[arg-type]
                surfaces.add_error(label, refused.value)
            # The URL in a run name and a param value: recorded without the password.
            named = await runner.run(
                git_url, entry_point="quiet", env_manager="local",
                run_name=f"try {git_url}", parameters={"data": git_url},
            )  # fmt: skip
            # A detached supervisor with the URL and a backend_config JSON.
            detached = await runner.run(
                git_url, entry_point="slow", env_manager="local", synchronous=False,
                detach=True, backend_config=config,
            )  # fmt: skip
            supervisor = detached._execution.pid  # type: ignore[attr-defined]
            cmdlines += await _running_tree(supervisor)
            surfaces.add("detached repr", repr(detached))
            await detached.cancel()
            assert await detached.get_status() is RunStatus.KILLED
    # `aioproj run --no-wait`: the CLI's supervisor, while it runs.
    cli = [sys.executable, "-m", "aioproj", "run", git_url, "-e", "slow", "--no-wait"]
    started = await anyio.run_process([*cli, "--env-manager", "local", "-c", config])
    surfaces.add("CLI --no-wait stdout", started.stdout.decode())
    surfaces.add("CLI --no-wait stderr", started.stderr.decode())
    cli_supervisor = int(started.stderr.decode().split("aioproj process ")[1].split()[0])
    cmdlines += await _running_tree(cli_supervisor)
    os.kill(cli_supervisor, signal.SIGTERM)
    await _until_gone(cli_supervisor)
    # `aioproj sweep` with the URL, as the report found it.
    swept = await anyio.run_process(
        [sys.executable, "-m", "aioproj", "sweep", git_url, "-P", "alpha=0.3,0.4", "-e",
         "quiet", "--env-manager", "local", "--progress", "lines"],
    )  # fmt: skip
    surfaces.add("CLI sweep stdout", swept.stdout.decode())
    surfaces.add("CLI sweep stderr", swept.stderr.decode())
    # The supervisors ran with their arguments, on no command line.
    supervisors = [argv for pid, argv in cmdlines if pid in (supervisor, cli_supervisor)]
    assert supervisors == [[sys.executable, "-m", "aioproj", ""]] * 2
    surfaces.add("argv of the supervisors and their descendants", repr(cmdlines))
    # What was recorded: the sweep parents, the named run, the detached runs.
    records = [r for r in await all_runs(tracking_uri) if r.info.run_id not in earlier]
    parents = [r for r in records if "aioproj.sweep.size" in r.data.tags]
    assert len(parents) == 2
    assert {r.data.tags["mlflow.source.name"] for r in parents} == {private_git.url("proj")}
    (record,) = [r for r in records if r.info.run_id == named.run_id]
    assert record.info.run_name == f"try {private_git.url('proj')}"
    assert record.data.params["data"] == private_git.url("proj")
    for record in records:
        surfaces.add(f"tags of {record.info.run_id}", repr(record.data.tags))
        surfaces.add(f"params of {record.info.run_id}", repr(record.data.params))
        surfaces.add(f"name of {record.info.run_id}", record.info.run_name)
    assert sum(r.info.status == "KILLED" for r in records) == 2  # both supervised runs
    for warning in caught:
        surfaces.add("warning", str(warning.message))
    captured = await anyio.to_thread.run_sync(capfd.readouterr)
    surfaces.add("stdout", captured.out)
    surfaces.add("stderr", captured.err)
    surfaces.add("log records", caplog.text)
    await _gather_store_and_caches(surfaces, store_root)
    assert surfaces.leaks(secrets) == []
