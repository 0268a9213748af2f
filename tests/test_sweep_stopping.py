"""Early stopping: trials whose live metric falls behind the median are stopped, recorded
KILLED and tagged; finished trials carry their final metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import aioproj
from aioproj.sweeps import ASHA, PRUNED_TAG, MedianStopping
from aioproj.sweeps.stoppers import percentile

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
    ended = [{0: 1.0, 1: 0.5, 2: 0.3}, {0: 2.0, 1: 0.7, 2: 0.6}]
    assert rule.verdict(0, 9.0, ended) is None  # still warming up
    assert rule.verdict(1, 0.6, ended) is None  # the median at step 1 is 0.6
    assert rule.verdict(1, 0.61, ended) is not None
    assert rule.verdict(1, 0.9, ended[:1]) is None  # too few finished trials
    # Step 2 is the last the finished trials logged: stopping there saves nothing.
    assert rule.verdict(2, 5.0, ended) is None
    # Each finished trial counts with its latest value at or before the step.
    gaps = [{0: 1.0, 4: 0.2, 9: 0.1}, {0: 2.0, 5: 0.3, 9: 0.2}]
    assert rule.verdict(3, 1.49, gaps) is None  # the median of 1.0 and 2.0
    assert rule.verdict(3, 1.51, gaps) is not None
    higher = MedianStopping("acc", goal="max", warmup_steps=0, min_trials=1)
    assert higher.verdict(0, 0.5, [{0: 0.8, 1: 0.9}]) is not None
    assert higher.verdict(0, 0.9, [{0: 0.8, 1: 0.9}]) is None


def test_median_rule_never_judges_a_metric_logged_once() -> None:
    # A final score (one value per run, at step 0) is no curve: however bad, it stays.
    rule = MedianStopping("rmse", warmup_steps=0, min_trials=1)
    for trial, rmse in enumerate([1.0, 1.2, 0.9]):
        assert rule.observe(trial, 0, rmse) is None
        rule.ended(trial, aioproj.RunStatus.FINISHED)
    assert rule.observe(3, 0, 50.0) is None


def test_median_rule_defaults_wait_for_warmup_and_finished_trials() -> None:
    rule = MedianStopping("loss")
    assert rule.warmup_steps > 0
    curves = [{s: 1.0 / (s + 1) for s in range(20)} for _ in range(3)]
    for trial, curve in enumerate(curves):
        for step, value in curve.items():
            assert rule.observe(trial, step, value) is None
        if trial < 2:  # only two finished: nothing is judged yet
            assert rule.observe(10 + trial, 10, 99.0) is None
        rule.ended(trial, aioproj.RunStatus.FINISHED)
    # Three finished trials: a bad value after the warm-up stops; at step 0 it does not.
    assert rule.observe(20, 0, 99.0) is None
    assert rule.observe(20, rule.warmup_steps, 99.0) is not None
    # FAILED and KILLED trials are no peers.
    other = MedianStopping("loss", warmup_steps=0, min_trials=1)
    other.observe(0, 0, 0.1)
    other.observe(0, 1, 0.1)
    other.ended(0, aioproj.RunStatus.FAILED)
    assert other.observe(1, 0, 99.0) is None


@pytest.mark.parametrize(
    ("kwargs", "rungs"),
    [
        ({"max_t": 20, "grace_period": 1, "reduction_factor": 3}, (1, 3, 9)),
        ({"max_t": 100}, (1, 4, 16, 64)),  # Ray's defaults: grace 1, factor 4
        ({"max_t": 64}, (1, 4, 16)),  # a rung at max_t would only end trials
        ({"max_t": 30, "grace_period": 5, "reduction_factor": 2}, (5, 10, 20)),
    ],
)
def test_asha_rungs(kwargs: dict[str, float], rungs: tuple[float, ...]) -> None:
    assert ASHA("loss", **kwargs).rungs == rungs  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reduction_factor": 1}, "reduction_factor"),
        ({"grace_period": 0}, "grace_period"),
        ({"max_t": 1}, "max_t"),
        ({"goal": "best"}, "goal"),
    ],
)
def test_asha_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(aioproj.InvalidArgumentError, match=message):
        ASHA("loss", **kwargs)  # type: ignore[arg-type]


def _stops(rule: ASHA, schedule: list[tuple[int, int, float]]) -> dict[int, int]:
    """Feed (trial, step, value) in order; the step at which each stopped trial stopped
    (a stopped trial logs nothing more, as its run is cancelled)."""
    stopped: dict[int, int] = {}
    for trial, step, value in schedule:
        if trial in stopped:
            continue
        if rule.observe(trial, step, value) is not None:
            stopped[trial] = step
    return stopped


QUALITY = {0: 1.0, 1: 2.0, 2: 5.0, 3: 0.5}  # loss = quality / (step + 1), 20 steps


def test_asha_on_scripted_curves_one_after_another() -> None:
    # Rungs at steps 1, 3, 9; the best third of the trials at a rung goes on.
    # Trial 0 is first everywhere. At rung 1 the cutoff for trial 1 is trial 0's loss
    # 0.5: its 1.0 is worse, stop. For trial 2 the cutoff is the 2/3-quantile of the
    # rewards -1.0, -0.5: a loss of 0.667; its 2.5 is worse, stop. Trial 3 (0.25 at rung
    # 1, then 0.125 and 0.05) beats every cutoff and runs to its end.
    schedule = [(t, s, q / (s + 1)) for t, q in QUALITY.items() for s in range(20)]
    rule = ASHA("loss", max_t=20, grace_period=1, reduction_factor=3)
    assert _stops(rule, schedule) == {1: 1, 2: 1}


def test_asha_on_scripted_curves_side_by_side() -> None:
    # The four trials log step by step in turns: the same trials stop at the same rung.
    schedule = [(t, s, q / (s + 1)) for s in range(20) for t, q in QUALITY.items()]
    rule = ASHA("loss", max_t=20, grace_period=1, reduction_factor=3)
    assert _stops(rule, schedule) == {1: 1, 2: 1}


def test_asha_judges_a_trial_once_per_rung_and_late_rungs_by_their_own_peers() -> None:
    rule = ASHA("loss", max_t=100, grace_period=1, reduction_factor=4)  # rungs 1, 4, 16, 64
    for step in range(0, 40):
        assert rule.observe(0, step, 1.0 / (step + 1)) is None
    # A trial that reports sparsely: step 0, then step 20 (rung 16 only: cutoff 1/17).
    assert rule.observe(1, 0, 9.0) is None  # its first value, before any rung
    verdict = rule.observe(1, 20, 0.5)
    assert verdict is not None
    assert "at step 20" in verdict
    assert "rung 16" in verdict
    # Recorded at rung 16, it is not judged again at rung 4 or 1.
    assert rule.observe(1, 21, 0.5) is None
    # A first value is never judged, however bad: it may be the only one (a score).
    assert rule.observe(2, 30, 99.0) is None
    # Not finite: neither judged nor recorded.
    assert rule.observe(3, 0, 1.0) is None
    assert rule.observe(3, 5, math.nan) is None


def test_asha_maximises_too() -> None:
    rule = ASHA("accuracy", goal="max", max_t=10, grace_period=1, reduction_factor=2)
    schedule = [(t, s, a * s / 10) for t, a in {0: 0.9, 1: 0.5, 2: 0.95}.items() for s in range(10)]
    # Rung 1: trial 1's 0.05 is below trial 0's 0.09: stop. Trial 2 leads at each rung.
    assert _stops(rule, schedule) == {1: 1}


def test_percentile_interpolates_like_numpy() -> None:
    import numpy as np

    values = [3.0, -1.0, 7.5, 2.0, 2.0, 10.0]
    for q in (0, 12.5, 50, 66.6667, 75, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None
