"""The conda manager against a stand-in conda: exact commands, naming, single flight,
failures and cancellation removing the environment, and a whole run inside it.

No conda exists here. ``fake_conda`` installs a small Python script as ``<root>/bin/conda``
(and ``mamba``) that logs its argv as JSON lines, answers ``--help`` and
``env list --json`` from a state file, and for ``env create`` makes a real prefix
``<root>/envs/<name>/bin/python``; ``<root>/etc/profile.d/conda.sh`` and ``bin/activate``
activate it in a shell by setting CONDA_DEFAULT_ENV, CONDA_PREFIX and PATH.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioproj.envs.conda as conda_module
from aioproj import Runner, RunStatus
from aioproj.envs import prepare_env
from aioproj.envs.cache import env_dir_for
from aioproj.envs.conda import conda_env_name
from aioproj.errors import EnvironmentBuildError
from aioproj.project import Project, load_project

from .support import make_project, process_gone, read_run

pytestmark = pytest.mark.anyio

CONDA_YAML = """\
name: demo
channels:
  - conda-forge
dependencies:
  - python=3.11
  - pip
  - pip:
      - requests
"""

MLPROJECT = """
name: condademo
conda_env: conda.yaml
entry_points:
  main:
    command: "echo env=$CONDA_DEFAULT_ENV python=$(command -v python)"
"""

STAND_IN = """\
#!{python}
import json, os, shutil, sys, time
from pathlib import Path

ROOT = Path({root!r})
STATE = ROOT / "state.json"
argv = sys.argv[1:]
with open(ROOT / "calls.jsonl", "a") as log:
    record = {{"exe": os.path.basename(sys.argv[0]), "argv": argv, "pid": os.getpid()}}
    log.write(json.dumps(record) + "\\n")


def envs():
    return json.loads(STATE.read_text()) if STATE.exists() else []


def save(prefixes):
    tmp = STATE.with_suffix(".tmp")
    tmp.write_text(json.dumps(prefixes))
    os.replace(tmp, STATE)


if argv[:1] == ["--help"]:
    print("usage: conda [-h] command ...")
elif argv[:3] == ["env", "list", "--json"]:
    print(json.dumps({{"envs": [str(ROOT)] + envs()}}, indent=2))
elif argv[:2] == ["env", "create"]:
    name = argv[argv.index("-n") + 1]
    prefix = ROOT / "envs" / name
    (prefix / "conda-meta").mkdir(parents=True)
    (prefix / "bin").mkdir()
    (prefix / "bin" / "python").symlink_to(sys.executable)
    save(envs() + [str(prefix)])
    print("Installing pip dependencies: ...working...", flush=True)
    time.sleep(float(os.environ.get("FAKE_CONDA_SLEEP", "0")))
    if os.environ.get("FAKE_CONDA_FAIL"):
        print("Pip subprocess error:", file=sys.stderr)
        print("ERROR: No matching distribution found for nosuchpkg==9.9", file=sys.stderr)
        print("CondaEnvException: Pip failed", file=sys.stderr)
        sys.exit(1)
    (prefix / "conda-meta" / "history").write_text("complete")
    print("done")
elif argv[:1] == ["remove"] and "--all" in argv:
    name = argv[argv.index("--name") + 1]
    prefix = ROOT / "envs" / name
    shutil.rmtree(prefix, ignore_errors=True)
    save([p for p in envs() if p != str(prefix)])
else:
    print("unexpected arguments", argv, file=sys.stderr)
    sys.exit(2)
"""

CONDA_SH = """\
conda() {{
  if [ "$1" = "activate" ]; then
    export CONDA_DEFAULT_ENV="$2"
    export CONDA_PREFIX="{root}/envs/$2"
    export PATH="$CONDA_PREFIX/bin:$PATH"
    echo "activated $2"
  else
    command "{root}/bin/conda" "$@"
  fi
}}
"""

ACTIVATE = """\
export CONDA_DEFAULT_ENV="$1"
export CONDA_PREFIX="{root}/envs/$1"
export PATH="$CONDA_PREFIX/bin:$PATH"
"""


@dataclass
class FakeConda:
    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def exe(self) -> str:
        return str(self.bin / "conda")

    def calls(self, exe: str | None = None) -> list[list[str]]:
        """Every argv the stand-ins were called with (blocking; small file)."""
        log = self.root / "calls.jsonl"
        if not log.exists():
            return []
        records = [json.loads(line) for line in log.read_text().splitlines()]
        return [r["argv"] for r in records if exe is None or r["exe"] == exe]

    def records(self) -> list[dict[str, Any]]:
        log = self.root / "calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()]

    def creates(self) -> list[list[str]]:
        return [argv for argv in self.calls() if argv[:2] == ["env", "create"]]

    def envs(self) -> list[str]:
        state = self.root / "state.json"
        return json.loads(state.read_text()) if state.exists() else []


def install_fake_conda(root: Path, names: tuple[str, ...] = ("conda", "mamba")) -> FakeConda:
    (root / "bin").mkdir(parents=True)
    (root / "envs").mkdir()
    (root / "etc" / "profile.d").mkdir(parents=True)
    script = STAND_IN.format(python=sys.executable, root=str(root))
    for name in names:
        path = root / "bin" / name
        path.write_text(script)
        path.chmod(0o755)
    (root / "etc" / "profile.d" / "conda.sh").write_text(CONDA_SH.format(root=root))
    (root / "bin" / "activate").write_text(ACTIVATE.format(root=root))
    return FakeConda(root)


@pytest.fixture
def fake_conda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeConda:
    """The stand-in, named by CONDA_EXE; probes are not remembered between tests."""
    fake = install_fake_conda(tmp_path / "miniconda")
    monkeypatch.setenv("CONDA_EXE", fake.exe)
    monkeypatch.setattr(conda_module, "_PROBED", set())
    return fake


@pytest.fixture
def project(tmp_path: Path) -> Project:
    root = make_project(tmp_path / "proj", MLPROJECT, {"conda.yaml": CONDA_YAML})
    return load_project(root)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "envcache"


async def project_at(root: Path, mlproject: str, files: dict[str, str]) -> Project:
    def write_and_load() -> Project:
        return load_project(make_project(root, mlproject, files))

    return await anyio.to_thread.run_sync(write_and_load)


async def calls(fake: FakeConda, exe: str | None = None) -> list[list[str]]:
    return await anyio.to_thread.run_sync(fake.calls, exe)


async def creates(fake: FakeConda) -> list[list[str]]:
    return await anyio.to_thread.run_sync(fake.creates)


async def wait_for_create(fake: FakeConda) -> None:
    """Until a stand-in has been asked to create an environment."""
    while True:
        if await creates(fake):
            return
        await anyio.sleep(0.02)


def sha1_name(text: str) -> str:
    return "mlflow-" + hashlib.sha1(text.encode()).hexdigest()


# --- naming and commands -------------------------------------------------------------


def test_env_name_is_mlflows_sha1_of_the_yaml_text() -> None:
    assert conda_env_name(CONDA_YAML) == sha1_name(CONDA_YAML)
    assert conda_env_name(CONDA_YAML) == conda_env_name(str(CONDA_YAML))
    assert conda_env_name(CONDA_YAML + "# changed\n") != conda_env_name(CONDA_YAML)


async def test_creates_with_mlflows_exact_commands(
    fake_conda: FakeConda, project: Project, cache_dir: Path
) -> None:
    env = await prepare_env(project, "conda", cache_dir=cache_dir)
    name = sha1_name(CONDA_YAML)
    spec = str(project.directory / "conda.yaml")
    assert await calls(fake_conda) == [
        ["--help"],
        ["env", "list", "--json"],
        ["env", "create", "-n", name, "--file", spec],
        ["env", "list", "--json"],
    ]
    assert env.manager == "conda"
    assert env.tag == "conda"
    assert env.directory == fake_conda.root / "envs" / name
    assert env.activate == (
        f"source {fake_conda.bin}/../etc/profile.d/conda.sh && conda activate {name} 1>&2"
    )
    # The record: complete marker, no building flag, lock file beside it.
    record = env_dir_for(cache_dir, "conda", name.removeprefix("mlflow-"))
    marker = json.loads(await anyio.Path(record / ".aioproj-env.json").read_text())
    assert marker["name"] == name
    assert not await anyio.Path(record / "building").exists()


async def test_same_file_reuses_changed_file_creates_another(
    fake_conda: FakeConda, tmp_path: Path, cache_dir: Path
) -> None:
    root = tmp_path / "p2"
    project = await project_at(root, MLPROJECT, {"conda.yaml": CONDA_YAML})
    first = await prepare_env(project, "conda", cache_dir=cache_dir)
    again = await prepare_env(project, "conda", cache_dir=cache_dir)
    assert first == again
    assert len(await creates(fake_conda)) == 1
    changed = CONDA_YAML + "  - numpy\n"
    project = await project_at(root, MLPROJECT, {"conda.yaml": changed})
    other = await prepare_env(project, "conda", cache_dir=cache_dir)
    made = await creates(fake_conda)
    assert [argv[3] for argv in made] == [sha1_name(CONDA_YAML), sha1_name(changed)]
    assert other.directory == fake_conda.root / "envs" / sha1_name(changed)


async def test_existing_env_is_reused_without_create(
    fake_conda: FakeConda, project: Project, cache_dir: Path
) -> None:
    """An environment conda already lists (made by MLflow, say) is used as it is."""
    name = sha1_name(CONDA_YAML)
    prefix = fake_conda.root / "envs" / name
    await anyio.Path(prefix / "bin").mkdir(parents=True)
    await anyio.Path(fake_conda.root / "state.json").write_text(json.dumps([str(prefix)]))
    env = await prepare_env(project, "conda", cache_dir=cache_dir)
    assert env.directory == prefix
    assert await creates(fake_conda) == []
    assert ["env", "list", "--json"] in await calls(fake_conda)


async def test_create_command_from_mlflow_conda_create_env_cmd(
    fake_conda: FakeConda, project: Project, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_CONDA_CREATE_ENV_CMD", "mamba")
    await prepare_env(project, "conda", cache_dir=cache_dir)
    name = sha1_name(CONDA_YAML)
    spec = str(project.directory / "conda.yaml")
    assert await calls(fake_conda, "mamba") == [
        ["--help"],
        ["env", "create", "-n", name, "--file", spec],
    ]
    conda_calls = await calls(fake_conda, "conda")
    assert conda_calls == [["--help"], ["env", "list", "--json"], ["env", "list", "--json"]]


async def test_mlflow_conda_home_and_conda_on_path(
    tmp_path: Path, project: Project, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLFLOW_CONDA_HOME names the installation (bin/conda); with neither it nor
    CONDA_EXE, conda comes from PATH and activation is MLflow's ``source activate``."""
    monkeypatch.setattr(conda_module, "_PROBED", set())
    monkeypatch.delenv("CONDA_EXE", raising=False)
    fake = await anyio.to_thread.run_sync(install_fake_conda, tmp_path / "home")
    monkeypatch.setenv("MLFLOW_CONDA_HOME", str(fake.root))
    env = await prepare_env(project, "conda", cache_dir=cache_dir)
    assert env.activate is not None
    assert env.activate.startswith(f"source {fake.bin}/../etc/profile.d/conda.sh && ")
    assert len(await creates(fake)) == 1

    monkeypatch.delenv("MLFLOW_CONDA_HOME")
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
    env = await prepare_env(project, "conda", cache_dir=cache_dir)
    assert env.activate == f"source activate {sha1_name(CONDA_YAML)} 1>&2"
    assert len(await creates(fake)) == 1  # found through PATH, already there


async def test_missing_conda_says_how_to_point_at_it(
    tmp_path: Path, project: Project, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONDA_EXE", str(tmp_path / "nowhere" / "conda"))
    with pytest.raises(EnvironmentBuildError) as info:
        await prepare_env(project, "conda", cache_dir=cache_dir)
    message = str(info.value)
    assert "Could not find Conda executable at" in message
    assert "CONDA_EXE" in message
    assert "MLFLOW_CONDA_HOME" in message
    assert "install" in message.lower()

    monkeypatch.delenv("CONDA_EXE")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(EnvironmentBuildError, match="Could not find Conda executable at conda"):
        await prepare_env(project, "conda", cache_dir=cache_dir)


async def test_missing_create_command(
    fake_conda: FakeConda, project: Project, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_CONDA_CREATE_ENV_CMD", "micromamba-missing")
    with pytest.raises(EnvironmentBuildError) as info:
        await prepare_env(project, "conda", cache_dir=cache_dir)
    assert str(info.value).startswith(
        "You have set the env variable MLFLOW_CONDA_CREATE_ENV_CMD to 'micromamba-missing', "
        "but micromamba-missing does not exist"
    )
    assert await creates(fake_conda) == []


async def test_python_env_project_is_refused(
    fake_conda: FakeConda, tmp_path: Path, cache_dir: Path
) -> None:
    project = await project_at(
        tmp_path / "py",
        'name: p\npython_env: python_env.yaml\nentry_points:\n  main:\n    command: "true"\n',
        {"python_env.yaml": "python: '3.11'\n"},
    )
    with pytest.raises(EnvironmentBuildError, match="python_env project cannot be executed"):
        await prepare_env(project, "conda", cache_dir=cache_dir)


# --- concurrency, failure, cancellation ----------------------------------------------


async def test_ten_concurrent_preparations_create_once(
    fake_conda: FakeConda, project: Project, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CONDA_SLEEP", "0.3")
    results: list[Any] = []

    async def one() -> None:
        results.append(await prepare_env(project, "conda", cache_dir=cache_dir))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(one)
    assert len(results) == 10
    assert len({r.directory for r in results}) == 1
    assert len(await creates(fake_conda)) == 1
    # The waiters took the first caller's result: conda listed its environments twice
    # (before and after creating), not once per caller.
    argvs = await calls(fake_conda)
    assert argvs.count(["env", "list", "--json"]) == 2
    assert conda_module._FLIGHTS == {}


CHILD = """
import sys
from pathlib import Path

import anyio

from aioproj.envs import prepare_env
from aioproj.envs.cache import env_dir_for
from aioproj.project import load_project


async def main() -> None:
    project = load_project(Path(sys.argv[1]))
    env = await prepare_env(project, "conda", cache_dir=Path(sys.argv[2]))
    print(env.directory)


anyio.run(main)
"""


async def test_another_process_creating_is_waited_for(
    fake_conda: FakeConda, project: Project, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another aioproj process creates the environment (conda already lists it,
    half-made), this one waits on the lock file and then uses it without creating."""
    monkeypatch.setenv("FAKE_CONDA_SLEEP", "1")
    argv = [sys.executable, "-c", CHILD, str(project.directory), str(cache_dir)]
    with anyio.fail_after(15):
        async with await anyio.open_process(argv) as child:
            await wait_for_create(fake_conda)
            env = await prepare_env(project, "conda", cache_dir=cache_dir)
            assert await anyio.Path(env.directory or "", "conda-meta", "history").exists()
            assert child.stdout is not None
            out = b"".join([chunk async for chunk in child.stdout])
            assert await child.wait() == 0
    assert out.decode().strip() == str(env.directory)
    assert len(await creates(fake_conda)) == 1


async def test_failed_create_surfaces_pip_error_and_removes_env(
    fake_conda: FakeConda, project: Project, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CONDA_FAIL", "1")
    output: list[bytes] = []
    with pytest.raises(EnvironmentBuildError) as info:
        await prepare_env(project, "conda", cache_dir=cache_dir, on_output=output.append)
    name = sha1_name(CONDA_YAML)
    message = str(info.value)
    assert f"Creating conda environment {name} failed (exit code 1)" in message
    assert "No matching distribution found for nosuchpkg==9.9" in message
    assert b"Pip subprocess error" in b"".join(output)
    assert ["remove", "--yes", "--name", name, "--all"] in await calls(fake_conda)
    assert await anyio.to_thread.run_sync(fake_conda.envs) == []
    assert not await anyio.Path(fake_conda.root / "envs" / name).exists()
    record = env_dir_for(cache_dir, "conda", name.removeprefix("mlflow-"))
    assert not await anyio.Path(record / "building").exists()

    # Fixed: the next preparation creates it afresh.
    monkeypatch.delenv("FAKE_CONDA_FAIL")
    env = await prepare_env(project, "conda", cache_dir=cache_dir)
    assert env.directory == fake_conda.root / "envs" / name
    assert len(await creates(fake_conda)) == 2


async def test_cancel_during_create_kills_it_and_removes_env(
    fake_conda: FakeConda, project: Project, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CONDA_SLEEP", "30")
    name = sha1_name(CONDA_YAML)
    started = anyio.Event()

    def on_output(chunk: bytes) -> None:
        if b"Installing pip dependencies" in chunk:
            started.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def prepare() -> None:
                await prepare_env(project, "conda", cache_dir=cache_dir, on_output=on_output)

            tg.start_soon(prepare)
            await started.wait()
            tg.cancel_scope.cancel()
    records = await anyio.to_thread.run_sync(fake_conda.records)
    create_pid = next(r["pid"] for r in records if r["argv"][:2] == ["env", "create"])
    assert process_gone(create_pid)
    assert ["remove", "--yes", "--name", name, "--all"] in [r["argv"] for r in records]
    assert not await anyio.Path(fake_conda.root / "envs" / name).exists()
    record = env_dir_for(cache_dir, "conda", name.removeprefix("mlflow-"))
    assert not await anyio.Path(record / "building").exists()


async def test_env_left_half_made_by_a_crash_is_rebuilt(
    fake_conda: FakeConda, project: Project, cache_dir: Path
) -> None:
    """A building flag found under the lock means a creator died: its env is removed."""
    name = sha1_name(CONDA_YAML)
    prefix = fake_conda.root / "envs" / name
    await anyio.Path(prefix / "bin").mkdir(parents=True)
    await anyio.Path(fake_conda.root / "state.json").write_text(json.dumps([str(prefix)]))
    record = env_dir_for(cache_dir, "conda", name.removeprefix("mlflow-"))
    await anyio.Path(record).mkdir(parents=True)
    await anyio.Path(record / "building").write_text("12345")
    env = await prepare_env(project, "conda", cache_dir=cache_dir)
    argvs = await calls(fake_conda)
    removal = argvs.index(["remove", "--yes", "--name", name, "--all"])
    assert argvs[removal + 1][:2] == ["env", "create"]
    assert env.directory == prefix
    assert await anyio.Path(prefix / "bin" / "python").exists()


# --- a whole run ---------------------------------------------------------------------


async def test_run_in_conda_env_end_to_end(
    fake_conda: FakeConda, project: Project, tracking_uri: str
) -> None:
    async with Runner(echo="off") as runner:
        run = await runner.run(str(project.directory))  # conda.yaml → conda by default
        assert await run.get_status() is RunStatus.FINISHED
    lines = [line async for line in run.logs()]
    name = sha1_name(CONDA_YAML)
    python = fake_conda.root / "envs" / name / "bin" / "python"
    assert f"env={name} python={python}\n" in lines
    record = await read_run(tracking_uri, run.run_id)
    assert record.info.status == "FINISHED"
    assert record.data.tags["mlflow.project.env"] == "conda"
    assert record.data.tags["mlflow.project.backend"] == "local"
