"""The uv manager with a real uv (the ``uv`` package of the test extra): builds, the cache,
failures, cancellation, and the error when uv is missing. No network: ``UV_OFFLINE=1``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio
import pytest

import aioproj.envs.venv as venv_module
from aioproj.envs import PreparedEnv, prepare_env
from aioproj.envs.cache import MARKER_NAME
from aioproj.errors import EnvironmentBuildError
from aioproj.project import load_project

try:  # tests/ as a package, or as a plain directory on sys.path
    from .test_envs_virtualenv import (
        MLPROJECT,
        StepRecorder,
        list_env_dirs,
        make_project,
        processes_mentioning,
        run_in_env,
        wait_for_env_dir,
        wheel_project,
    )
except ImportError:
    from test_envs_virtualenv import (  # type: ignore[import-not-found,no-redef]
        MLPROJECT,
        StepRecorder,
        list_env_dirs,
        make_project,
        processes_mentioning,
        run_in_env,
        wait_for_env_dir,
        wheel_project,
    )

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UV_OFFLINE", "1")
    monkeypatch.setenv("PIP_NO_INDEX", "1")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "envs"


async def test_uv_is_found() -> None:
    """uv must be installed for these tests (it is in the test extra): never skip."""
    uv = await venv_module.find_uv()
    done = await anyio.run_process([str(uv), "--version"])
    assert done.stdout.startswith(b"uv ")


async def test_uv_env_installs_a_local_wheel_and_is_reused(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = await anyio.to_thread.run_sync(wheel_project, tmp_path / "p")
    project = await anyio.to_thread.run_sync(load_project, root)
    steps = StepRecorder(monkeypatch)
    envs: list[PreparedEnv] = []

    async def prepare() -> None:
        envs.append(await prepare_env(project, "uv", cache_dir=cache_dir))

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(prepare)
    build_time = time.monotonic() - started
    assert steps.count("venv", "--python") == 1
    assert steps.count("pip", "install") == 1
    assert len({e.directory for e in envs}) == 1
    env = envs[0]
    assert (env.manager, env.tag) == ("uv", "uv")
    assert env.directory is not None
    assert env.directory.name.startswith("uv-")
    assert await anyio.Path(env.directory / MARKER_NAME).exists()

    started = time.monotonic()
    assert await prepare_env(project, "uv", cache_dir=cache_dir) == env
    hit_time = time.monotonic() - started
    print(f"uv build {build_time:.2f}s, cache hit {hit_time * 1000:.1f}ms")

    out = await run_in_env(
        env,
        'python -c \'import os, sys, tinypkg; print(tinypkg.VALUE, os.environ["VIRTUAL_ENV"], '
        "sys.prefix)'",
        cwd=tmp_path,
    )
    assert out.split() == ["42", str(env.directory), str(env.directory)]


async def test_uv_and_virtualenv_envs_are_distinct(tmp_path: Path, cache_dir: Path) -> None:
    root = await anyio.to_thread.run_sync(make_project, tmp_path / "p", MLPROJECT)
    project = await anyio.to_thread.run_sync(load_project, root)
    env = await prepare_env(project, "uv", cache_dir=cache_dir)
    assert env.directory is not None
    assert env.directory.name.startswith("uv-")
    version = await run_in_env(env, "python -c 'import sys; print(sys.version_info[:3])'", cwd=root)
    assert version.strip() == str(tuple(sys.version_info[:3]))


async def test_uv_install_failure_is_reported_and_cleaned(tmp_path: Path, cache_dir: Path) -> None:
    root = await anyio.to_thread.run_sync(
        lambda: make_project(
            tmp_path / "p", MLPROJECT, {"python_env.yaml": "dependencies: [./no-such-package]\n"}
        )
    )
    project = await anyio.to_thread.run_sync(load_project, root)
    with pytest.raises(EnvironmentBuildError, match="with uv failed") as info:
        await prepare_env(project, "uv", cache_dir=cache_dir)
    assert "no-such-package" in str(info.value)
    assert await list_env_dirs(cache_dir) == []


async def test_uv_missing_python_is_reported(tmp_path: Path, cache_dir: Path) -> None:
    root = await anyio.to_thread.run_sync(
        lambda: make_project(tmp_path / "p", MLPROJECT, {"python_env.yaml": 'python: "3.99"\n'})
    )
    project = await anyio.to_thread.run_sync(load_project, root)
    with pytest.raises(EnvironmentBuildError, match=r"uv python install 3\.99"):
        await prepare_env(project, "uv", cache_dir=cache_dir)
    assert await list_env_dirs(cache_dir) == []


async def test_cancel_during_uv_build_leaves_nothing(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build step that hangs (a stand-in uv) is killed with its group on cancellation."""
    fake = tmp_path / "bin" / "uv"
    await anyio.Path(fake.parent).mkdir(parents=True)
    await anyio.Path(fake).write_text(
        '#!/bin/sh\nmkdir -p "$4"\npython3 -c "import time; time.sleep(60)" "$4" & wait\n'
    )
    await anyio.Path(fake).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    root = await anyio.to_thread.run_sync(make_project, tmp_path / "p", MLPROJECT)
    project = await anyio.to_thread.run_sync(load_project, root)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: prepare_env(project, "uv", cache_dir=cache_dir))
        with anyio.fail_after(10):
            await wait_for_env_dir(cache_dir)
        tg.cancel_scope.cancel()
    assert await list_env_dirs(cache_dir) == []
    assert await anyio.to_thread.run_sync(processes_mentioning, str(cache_dir)) == []


async def test_missing_uv_says_pip_install_uv(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "uv", None)  # the uv package cannot be imported either
    root = await anyio.to_thread.run_sync(make_project, tmp_path / "p", MLPROJECT)
    project = await anyio.to_thread.run_sync(load_project, root)
    with pytest.raises(EnvironmentBuildError, match="pip install uv"):
        await prepare_env(project, "uv", cache_dir=cache_dir)
    assert await list_env_dirs(cache_dir) == []


async def test_environment_build_output_opens_the_first_runs_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run that built the environment shows the build in its log; the next one not."""
    from aioproj import Runner

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    root = await anyio.to_thread.run_sync(
        make_project, tmp_path / "p", "entry_points:\n  main:\n    command: 'echo ran'\n"
    )
    async with Runner(echo="off", cache_dir=tmp_path / "cache") as runner:
        first = await runner.run(str(root), env_manager="uv")
        second = await runner.run(str(root), env_manager="uv")
    first_log = [line async for line in first.logs()]
    second_log = [line async for line in second.logs()]
    assert second_log == ["ran\n"]
    assert first_log[-1] == "ran\n"
    assert len(first_log) > 1  # uv's own lines about creating the environment came first
