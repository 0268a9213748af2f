"""Early stopping: trials whose live metric falls behind the median are stopped, recorded
KILLED and tagged; finished trials carry their final metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

import aioproj
from aioproj.sweeps import PRUNED_TAG, MedianStopping

from .support import all_runs, amake_project

pytestmark = pytest.mark.anyio

# Writes loss = quality / (step + 1) straight into the run's metric file in the file
# store (MLflow's format: "timestamp value step" lines), one step every `pause` seconds.
TRAIN_PY = """\
import os, sys, time, urllib.parse

quality, steps, pause = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
root = urllib.parse.urlparse(os.environ["MLFLOW_TRACKING_URI"]).path
folder = os.path.join(
    root, os.environ["MLFLOW_EXPERIMENT_ID"], os.environ["MLFLOW_RUN_ID"], "metrics"
)
for step in range(steps):
    with open(os.path.join(folder, "loss"), "a") as f:
        f.write(f"{int(time.time() * 1000)} {quality / (step + 1)} {step}\\n")
    time.sleep(pause)
"""

MLPROJECT = """
entry_points:
  main:
    parameters:
      quality: float
      steps: {type: int, default: 4}
      pause: {type: float, default: 0.02}
    command: "python train.py {quality} {steps} {pause}"
"""


@pytest.fixture
async def project(tmp_path: Path) -> Path:
    return await amake_project(tmp_path / "proj", MLPROJECT, {"train.py": TRAIN_PY})


async def test_median_rule_stops_a_lagging_trial(project: Path, tracking_uri: str) -> None:
    # Two good trials end first (max_parallel=2); the third logs 5x their loss and would
    # run for a minute: it is stopped once it has logged step 2.
    sweep = aioproj.sweep(
        str(project),
        [
            {"quality": 1.0},
            {"quality": 1.2},
            {"quality": 5.0, "steps": 600, "pause": 0.1},
        ],
        max_parallel=2,
        metric="loss",
        early_stopping=MedianStopping("loss", warmup_steps=2, min_trials=2),
        metrics_interval=0.05,
        env_manager="local",
    )
    results = {r.index: r for r in await sweep}
    assert results[0].status is aioproj.RunStatus.FINISHED
    assert results[0].metrics == {"loss": 0.25}  # the final value, step 3
    assert results[1].metrics["loss"] == pytest.approx(0.3)
    stopped = results[2]
    assert stopped.status is aioproj.RunStatus.KILLED
    assert stopped.pruned is not None
    assert "median rule" in stopped.pruned
    assert stopped.metrics["loss"] >= 5.0 / 3  # it never got far
    assert sweep.best is results[0]

    records = {r.info.run_id: r for r in await all_runs(tracking_uri)}
    assert records[stopped.run_id].info.status == "KILLED"
    assert records[stopped.run_id].data.tags[PRUNED_TAG] == stopped.pruned
    parent = records[sweep.parent_run_id]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["aioproj.sweep.best_run_id"] == results[0].run_id


def test_median_rule_verdicts() -> None:
    rule = MedianStopping("loss", warmup_steps=1, min_trials=2)
    ended = [{0: 1.0, 1: 0.5, 2: 0.3}, {0: 2.0, 1: 0.7}]
    assert rule.verdict(0, 9.0, ended) is None  # still warming up
    assert rule.verdict(1, 0.6, ended) is None  # the median at step 1 is 0.6
    assert rule.verdict(1, 0.61, ended) is not None
    # At step 3, each ended trial counts with its latest value at or before it.
    assert rule.verdict(3, 0.49, ended) is None
    assert rule.verdict(3, 0.51, ended) is not None
    assert rule.verdict(1, 0.9, ended[:1]) is None  # too few ended trials
    higher = MedianStopping("acc", goal="max", min_trials=1)
    assert higher.verdict(0, 0.5, [{0: 0.8}]) is not None
    assert higher.verdict(0, 0.9, [{0: 0.8}]) is None
