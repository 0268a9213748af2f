"""Environment builds show progress: each step says what it does as it starts, that it is
still running (with its latest output) while it runs, and when it is done; ``aioproj run``
prints these lines. No network: ``UV_OFFLINE=1``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from aioproj.envs import steps
from aioproj.errors import EnvironmentBuildError

from .support import make_project, until

MLPROJECT = """
name: progress
python_env: python_env.yaml
entry_points:
  main:
    command: "python -c 'print(42)'"
"""
CURRENT = f"{sys.version_info.major}.{sys.version_info.minor}"

pytestmark = pytest.mark.anyio


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "aioproj.envs"]


async def test_a_step_says_it_starts_runs_and_is_done(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(steps, "PROGRESS_INTERVAL", 0.2)
    caplog.set_level(logging.INFO, logger="aioproj.envs")
    await steps.run_step(
        ["sh", "-c", "echo collecting wheels; sleep 1; echo installed"],
        what="Installing the dependencies",
        hint="",
        cwd=tmp_path,
        env=os.environ,
    )
    messages = _messages(caplog)
    assert messages[0] == "Installing the dependencies ..."
    running = [m for m in messages if "still running" in m]
    assert running, messages
    assert running[0].startswith("Installing the dependencies: still running (")
    assert "last output: collecting wheels" in running[0]
    assert messages[-1].startswith("Installing the dependencies: done in ")


async def test_a_failed_step_is_not_done_and_stops_reporting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(steps, "PROGRESS_INTERVAL", 0.1)
    caplog.set_level(logging.INFO, logger="aioproj.envs")
    with pytest.raises(EnvironmentBuildError, match="Resolving failed"):
        await steps.run_step(
            ["sh", "-c", "echo no such package; exit 3"],
            what="Resolving",
            hint="",
            cwd=tmp_path,
            env=os.environ,
        )
    count = len(_messages(caplog))
    await anyio.sleep(0.3)  # the timer of a finished step is gone
    assert len(_messages(caplog)) == count
    assert not [m for m in _messages(caplog) if "done in" in m]


@pytest.mark.parametrize("outcome", ["done", "failed", "cancelled"])
async def test_a_steps_temporary_files_go_with_it(tmp_path: Path, outcome: str) -> None:
    """What a build leaves in its TMPDIR (ensurepip's wheel, pip's unpacked sources) is
    removed when the step ends, however it ends."""
    seen = tmp_path / "tmpdir"
    script = f'touch "$TMPDIR/pip-unpacked"; echo "$TMPDIR" > {seen}; '
    script += {"done": "exit 0", "failed": "exit 1", "cancelled": "sleep 60"}[outcome]

    async def step() -> None:
        await steps.run_step(
            ["sh", "-c", script], what="Building", hint="", cwd=tmp_path, env=os.environ
        )

    if outcome == "cancelled":
        with anyio.move_on_after(30) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(step)
                await until(seen.exists)
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught
    elif outcome == "failed":
        with pytest.raises(EnvironmentBuildError):
            await step()
    else:
        await step()
    temp = Path((await anyio.Path(seen).read_text()).strip())
    assert temp.name.startswith("aioproj-build-")
    assert not await anyio.Path(temp).exists()


def test_aioproj_run_prints_what_it_builds_and_each_step(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", MLPROJECT, {"python_env.yaml": f'python: "{CURRENT}"\n'})
    done = subprocess.run(
        [sys.executable, "-m", "aioproj", "run", str(project), "--env-manager", "uv"],
        cwd=tmp_path,
        env={
            **os.environ,
            "UV_OFFLINE": "1",
            "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
            "AIOPROJ_CACHE_DIR": str(tmp_path / "cache"),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    building = [i for i, line in enumerate(lines) if "INFO aioproj.envs: Building uv" in line]
    started = [i for i, line in enumerate(lines) if "Creating a uv environment" in line]
    assert building, done.stderr
    assert started, done.stderr
    assert lines[started[0]].endswith(" ...")
    assert any("Creating a uv environment" in line and "done in" in line for line in lines)
    assert building[0] < started[0]
    assert "42" in done.stdout
