"""Why trials fail, on screen and in records: the last lines of a failed run's output (or
the error), redacted; a warning when no trial logs the sweep's metric; one summary."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import aioproj
from aioproj.sweeps import REASON_TAG

from .support import amake_project, make_project, read_run

HELLO = Path(__file__).resolve().parent.parent / "examples" / "hello"

# Logs `loss` and `w` into the file store, or fails printing what it was given.
TRAIN_PY = """\
import os, sys, time, urllib.parse

root = urllib.parse.urlparse(os.environ["MLFLOW_TRACKING_URI"]).path
folder = os.path.join(
    root, os.environ["MLFLOW_EXPERIMENT_ID"], os.environ["MLFLOW_RUN_ID"], "metrics"
)
for key, value in (("loss", float(sys.argv[1])), ("w", 3.0)):
    with open(os.path.join(folder, key), "a") as f:
        f.write(f"{int(time.time() * 1000)} {value} 0\\n")
"""

MLPROJECT = """
entry_points:
  main:
    parameters:
      x: float
    command: "python train.py {x}"
  leaky:
    parameters:
      x: float
    command: >-
      echo "starting with x={x}";
      echo "token=$MY_API_TOKEN";
      echo "cloning https://bob:hunter22@example.com/repo.git" >&2;
      exit 4
"""


@pytest.fixture
async def project(tmp_path: Path) -> Path:
    return await amake_project(tmp_path / "proj", MLPROJECT, {"train.py": TRAIN_PY})


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": (cwd / "mlruns").as_uri()}
    return subprocess.run(
        [sys.executable, "-m", "aioproj", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.anyio
async def test_a_mistyped_parameter_says_why(tracking_uri: str) -> None:
    # The example's script rejects the unknown option MLflow appends: --alpah 0.3.
    sweep = aioproj.sweep(str(HELLO), {"alpah": [0.3]}, env_manager="local")
    [result] = await sweep
    assert result.status is aioproj.RunStatus.FAILED
    assert result.error is None  # the project failed, not aioproj
    assert result.reason is not None
    last = result.reason.splitlines()[-1]
    assert last.endswith("error: unrecognized arguments: --alpah 0.3 (exit status 2)")
    assert result.reason.splitlines()[0].startswith("usage: train.py")
    assert sweep.trials[0].note == last
    assert result.run_id is not None
    run = await read_run(tracking_uri, result.run_id)
    assert run.data.tags[REASON_TAG] == result.reason


@pytest.mark.anyio
async def test_reasons_are_redacted(
    project: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_API_TOKEN", "s3cr3t-t0ken-42")
    [result] = await aioproj.sweep(
        str(project), {"x": [1]}, entry_point="leaky", env_manager="local"
    )
    assert result.reason is not None
    assert "s3cr3t-t0ken-42" not in result.reason
    assert "hunter22" not in result.reason
    assert "token=***" in result.reason
    assert "cloning https://example.com/repo.git" in result.reason  # the URL, no userinfo
    assert result.reason.endswith("(exit status 4)")
    assert result.run_id is not None
    run = await read_run(tracking_uri, result.run_id)
    assert "s3cr3t" not in run.data.tags[REASON_TAG]


@pytest.mark.anyio
async def test_an_invalid_value_is_the_reason(tracking_uri: str) -> None:
    [result] = await aioproj.sweep(str(HELLO), {"alpha": ["fast"]}, env_manager="local")
    assert result.status is aioproj.RunStatus.FAILED
    assert result.run_id is None
    assert result.reason is not None
    assert result.reason.startswith("ParameterError: ")
    assert "alpha" in result.reason


@pytest.mark.anyio
async def test_a_metric_no_trial_logs_is_warned_about_once(
    project: Path, tracking_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aioproj")
    sweep = aioproj.sweep(
        str(project), {"x": [1, 2, 3]}, metric="lsos", max_parallel=1, env_manager="local"
    )
    results = await sweep
    assert all(r.ok for r in results)
    warnings = [r.getMessage() for r in caplog.records if "lsos" in r.getMessage()]
    assert warnings == [
        "No trial has logged the metric 'lsos'; the trials that ended logged 'loss', 'w'. "
        "Is the metric name right?"
    ]
    assert sweep.notices == warnings
    caplog.clear()
    fine = aioproj.sweep(str(project), {"x": [1, 2]}, metric="loss", env_manager="local")
    await fine
    assert fine.notices == []
    assert not [r for r in caplog.records if "has logged the metric" in r.getMessage()]


def test_the_command_line_shows_reasons_warnings_and_one_summary(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj", MLPROJECT, {"train.py": TRAIN_PY})
    done = _cli(
        "sweep", str(HELLO), "-P", "alpah=0.3,0.4", "--metric", "loss", "--env-manager",
        "local", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1
    out = done.stdout
    failed = [line for line in out.splitlines() if "] FAILED in" in line]
    assert len(failed) == 2
    assert all("unrecognized arguments: --alpah 0." in line for line in failed)
    assert "trial 0 FAILED:" in out  # the summary's reasons, a few lines each
    assert "    usage: train.py" in out
    assert out.count("Sweep FINISHED") == 1
    assert out.count("┃trial") == 1  # one table: the summary

    done = _cli(
        "sweep", str(project), "-P", "x=1,2", "--metric", "lsos", "--env-manager", "local",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "WARNING No trial has logged the metric 'lsos'" in done.stdout
    assert done.stdout.count("No trial has logged the metric") == 2  # as it came, and at the end
    assert done.stderr.count("No trial has logged the metric") == 1  # the log record
