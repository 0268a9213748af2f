"""Where environments live (MLFLOW_ENV_ROOT) and ``aioproj envs list|prune``, through the
real CLI in a subprocess, on real uv environments. No network: ``UV_OFFLINE=1``."""

from __future__ import annotations

import os
import subprocess
import sys
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
    assert done.stdout.strip() == str(env_dir)
    assert not (Path(os.environ["AIOPROJ_CACHE_DIR"]) / "envs").exists()
