"""Where environments live (MLFLOW_ENV_ROOT) and ``aioproj envs list|prune``, through the
real CLI in a subprocess, on real uv environments. No network: ``UV_OFFLINE=1``."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from aioproj.envs import env_root, prepare_env
from aioproj.envs.cache import MARKER_NAME
from aioproj.project import load_project

from .support import make_project

MLPROJECT = """
name: envdemo
python_env: python_env.yaml
entry_points:
  main:
    command: "python -c 'import sys; print(sys.prefix)'"
"""
CURRENT = f"{sys.version_info.major}.{sys.version_info.minor}"


def python_env(extra: str = "") -> str:
    return f'python: "{CURRENT}"\n{extra}'


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UV_OFFLINE", "1")
    monkeypatch.setenv("PIP_NO_INDEX", "1")


def aioproj_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aioproj", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- MLFLOW_ENV_ROOT ------------------------------------------------------------------


def test_env_root_is_mlflow_env_root_when_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    default = tmp_path / "default"
    monkeypatch.delenv("MLFLOW_ENV_ROOT", raising=False)
    assert env_root(default) == default
    monkeypatch.setenv("MLFLOW_ENV_ROOT", "")
    assert env_root(default) == default
    monkeypatch.setenv("MLFLOW_ENV_ROOT", str(tmp_path / "mlflow-envs"))
    assert env_root(default) == tmp_path / "mlflow-envs"


@pytest.mark.anyio
async def test_prepare_env_builds_under_mlflow_env_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = await anyio.to_thread.run_sync(
        lambda: make_project(tmp_path / "p", MLPROJECT, {"python_env.yaml": python_env()})
    )
    project = await anyio.to_thread.run_sync(load_project, root)
    mlflow_root = tmp_path / "mlflow-envs"
    monkeypatch.setenv("MLFLOW_ENV_ROOT", str(mlflow_root))
    env = await prepare_env(project, "uv", cache_dir=tmp_path / "default")
    assert env.directory is not None
    assert env.directory.parent == mlflow_root
    assert env.directory.name.startswith("uv-")
    assert await anyio.Path(env.directory / MARKER_NAME).exists()
    assert not await anyio.Path(tmp_path / "default").exists()

    monkeypatch.delenv("MLFLOW_ENV_ROOT")
    again = await prepare_env(project, "uv", cache_dir=tmp_path / "default")
    assert again.directory is not None
    assert again.directory.parent == tmp_path / "default"


def test_cli_run_builds_under_mlflow_env_root(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", MLPROJECT, {"python_env.yaml": python_env()})
    mlflow_root = tmp_path / "mlflow-envs"
    done = aioproj_cli(
        "run",
        str(project),
        "--env-manager",
        "uv",
        cwd=tmp_path,
        env={
            "MLFLOW_ENV_ROOT": str(mlflow_root),
            "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        },
    )
    assert done.returncode == 0, done.stderr
    (env_dir,) = [p for p in mlflow_root.iterdir() if p.is_dir()]
    assert env_dir.name.startswith("uv-")
    assert done.stdout.strip().splitlines()[-1] == str(env_dir)
    assert not (Path(os.environ["AIOPROJ_CACHE_DIR"]) / "envs").exists()


# --- aioproj envs list | prune -----------------------------------------------------------

FULL = ".".join(str(n) for n in sys.version_info[:3])


@pytest.fixture
def two_envs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two real uv environments (built by ``aioproj run``) and a broken directory, in a
    fresh cache; returns (env A, env B, broken dir)."""
    envs_root = Path(os.environ["AIOPROJ_CACHE_DIR"]) / "envs"
    built: list[Path] = []
    for name, python in (("a", CURRENT), ("b", FULL)):
        project = make_project(
            tmp_path / name, MLPROJECT, {"python_env.yaml": f'python: "{python}"\n'}
        )
        done = aioproj_cli(
            "run",
            str(project),
            "--env-manager",
            "uv",
            cwd=tmp_path,
            env={"MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()},
        )
        assert done.returncode == 0, done.stderr
        built.append(Path(done.stdout.strip().splitlines()[-1]))  # after the build output
    assert built[0] != built[1]
    assert all(p.parent == envs_root for p in built)
    broken = envs_root / "uv-0123456789abcdef"
    (broken / "bin").mkdir(parents=True)
    (broken / "bin" / "python").write_text("half-built")
    return built[0], built[1], broken


def list_json(tmp_path: Path) -> list[dict[str, object]]:
    done = aioproj_cli("envs", "list", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert isinstance(data, list)
    return data


def test_list_shows_each_env(tmp_path: Path, two_envs: tuple[Path, Path, Path]) -> None:
    env_a, env_b, broken = two_envs
    done = aioproj_cli("envs", "list", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert header.split()[:3] == ["MANAGER", "STATUS", "SIZE"]
    assert len(lines) == 3
    by_dir = {line.split()[-1]: line.split() for line in lines}
    for env in (env_a, env_b):
        manager, status, size = by_dir[str(env)][:3]
        assert (manager, status) == ("uv", "complete")
        assert size.endswith("M") or size.endswith("K")
        assert FULL in by_dir[str(env)]
    assert by_dir[str(broken)][:2] == ["uv", "broken"]

    entries = {e["directory"]: e for e in list_json(tmp_path)}
    assert set(entries) == {str(env_a), str(env_b), str(broken)}
    assert entries[str(env_a)]["python_version"] == FULL
    assert isinstance(entries[str(env_a)]["size"], int)
    assert entries[str(env_a)]["size"] > 10_000  # type: ignore[operator]
    assert entries[str(broken)]["status"] == "broken"
    assert entries[str(broken)]["created"] is None


def test_list_empty_and_mlflow_env_root(tmp_path: Path) -> None:
    done = aioproj_cli("envs", "list", cwd=tmp_path)
    assert (done.returncode, done.stdout.splitlines()[1:]) == (0, [])
    # MLflow's own environments under MLFLOW_ENV_ROOT are not aioproj's: never listed.
    mlflow_root = tmp_path / "mlflow-envs"
    (mlflow_root / "mlflow-0123abcd").mkdir(parents=True)
    done = aioproj_cli(
        "envs", "list", "--json", cwd=tmp_path, env={"MLFLOW_ENV_ROOT": str(mlflow_root)}
    )
    assert (done.returncode, json.loads(done.stdout)) == (0, [])


def test_prune_dry_run_removes_nothing(tmp_path: Path, two_envs: tuple[Path, Path, Path]) -> None:
    env_a, env_b, broken = two_envs
    done = aioproj_cli("envs", "prune", "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"would remove: uv broken {broken}"]
    done = aioproj_cli("envs", "prune", "--all", "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(
        [
            f"would remove: uv complete {env_a}",
            f"would remove: uv complete {env_b}",
            f"would remove: uv broken {broken}",
        ]
    )
    assert "would free" in done.stderr
    assert all(p.is_dir() for p in two_envs)
    assert not broken.with_name(broken.name + ".lock").exists()  # a dry run creates nothing
    assert len(list_json(tmp_path)) == 3


def test_prune_removes_broken_by_default(tmp_path: Path, two_envs: tuple[Path, Path, Path]) -> None:
    env_a, env_b, broken = two_envs
    done = aioproj_cli("envs", "prune", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"removed: uv broken {broken}"]
    assert not broken.exists()
    assert not broken.with_name(broken.name + ".lock").exists()
    assert env_a.is_dir()
    assert env_b.is_dir()


def test_prune_all_keeps_an_env_whose_build_holds_the_lock(
    tmp_path: Path, two_envs: tuple[Path, Path, Path]
) -> None:
    env_a, env_b, broken = two_envs
    lock_a = env_a.with_name(env_a.name + ".lock")
    assert lock_a.exists()  # left by the build
    fd = os.open(lock_a, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a build in progress holds it
        done = aioproj_cli("envs", "prune", "--all", cwd=tmp_path)
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"skipped: uv complete {env_a} (a build in progress holds its lock)" in lines
    assert f"removed: uv complete {env_b}" in lines
    assert f"removed: uv broken {broken}" in lines
    assert env_a.is_dir()
    assert (env_a / MARKER_NAME).is_file()
    assert lock_a.exists()
    assert not env_b.exists()
    assert not env_b.with_name(env_b.name + ".lock").exists()
    assert [e["directory"] for e in list_json(tmp_path)] == [str(env_a)]

    # A pruned environment is simply rebuilt by the next run.
    done = aioproj_cli(
        "run",
        str(tmp_path / "b"),
        "--env-manager",
        "uv",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(env_b)  # after the build output
    assert (env_b / MARKER_NAME).is_file()


def test_list_says_building_while_a_build_holds_the_lock(tmp_path: Path) -> None:
    envs_root = Path(os.environ["AIOPROJ_CACHE_DIR"]) / "envs"
    building = envs_root / "virtualenv-00000000000000ff"
    building.mkdir(parents=True)
    fd = os.open(building.with_name(building.name + ".lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (entry,) = list_json(tmp_path)
        done = aioproj_cli("envs", "prune", "--all", cwd=tmp_path)
    finally:
        os.close(fd)
    assert (entry["manager"], entry["status"]) == ("virtualenv", "building")
    assert done.returncode == 0
    assert done.stdout.startswith("skipped: virtualenv building")
    assert building.is_dir()


def test_prune_older_than(tmp_path: Path, two_envs: tuple[Path, Path, Path]) -> None:
    env_a, env_b, broken = two_envs
    old = time.time() - 10 * 86400
    os.utime(env_a / MARKER_NAME, (old, old))
    done = aioproj_cli("envs", "prune", "--older-than", "5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(
        [f"removed: uv complete {env_a}", f"removed: uv broken {broken}"]
    )
    assert not env_a.exists()
    assert env_b.is_dir()


@pytest.mark.parametrize(
    "args",
    [
        ("envs",),
        ("envs", "prune", "--older-than", "-1"),
        ("envs", "prune", "--older-than", "soon"),
        ("envs", "prune", "--all", "--older-than", "3"),
        ("envs", "remove"),
    ],
)
def test_envs_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    done = aioproj_cli(*args, cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "usage:" in done.stderr


def test_conda_records_are_listed_and_not_pruned(tmp_path: Path) -> None:
    envs_root = Path(os.environ["AIOPROJ_CACHE_DIR"]) / "envs"
    record = envs_root / "conda-0123456789abcdef"
    prefix = tmp_path / "conda" / "envs" / "mlflow-0123456789abcdef0000"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python").write_text("x" * 5000)
    record.mkdir(parents=True)
    (record / MARKER_NAME).write_text(
        json.dumps({"manager": "conda", "name": prefix.name, "prefix": str(prefix), "created": 1.0})
    )
    (entry,) = list_json(tmp_path)
    assert (entry["manager"], entry["status"], entry["conda_name"]) == (
        "conda",
        "complete",
        prefix.name,
    )
    assert entry["size"] == 5000
    done = aioproj_cli("envs", "prune", "--all", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"conda remove --yes --name {prefix.name} --all" in done.stdout
    assert record.is_dir()
    assert prefix.is_dir()
