"""Early stopping on real projects that log scripted curves with ``mlflow.log_metric``:
which trials ASHA, the median rule and Optuna's pruners stop, and at which step.

Trials run one after another (``max_parallel=1``), so the order in which values arrive
is fixed and the decisions are exact.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import optuna
import pytest

import aioproj
from aioproj.sweeps import PRUNED_TAG

from .support import make_project, mlflow_client

# loss = quality / (step + 1), one step every `pause` seconds; `score` logs one value and
# then "saves a model" for `save` seconds, as MLflow's sklearn example does.
CURVE_PY = """\
import sys, time
import mlflow

quality, steps, pause = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
for step in range(steps):
    mlflow.log_metric("loss", quality / (step + 1), step=step)
    mlflow.log_metric("cost", step * 0.5 + quality, step=step)
    time.sleep(pause)
"""

SCORE_PY = """\
import sys, time
import mlflow

mlflow.log_metric("rmse", float(sys.argv[1]))
time.sleep(float(sys.argv[2]))
print("model saved")
"""

MLPROJECT = """
entry_points:
  main:
    parameters:
      quality: float
      steps: {type: int, default: 12}
      pause: {type: float, default: 0.15}
    command: "python curve.py {quality} {steps} {pause}"
  score:
    parameters:
      rmse: float
      save: {type: float, default: 2}
    command: "python score.py {rmse} {save}"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj", MLPROJECT, {"curve.py": CURVE_PY, "score.py": SCORE_PY})


def _step(reason: str | None) -> int | None:
    match = re.search(r"at step (\d+)", reason or "")
    return int(match.group(1)) if match else None


@pytest.mark.slow
def test_asha_from_the_command_line(project: Path, tmp_path: Path) -> None:
    # Rungs at steps 2, 4, 8, 16, 32; the better half at a rung goes on. Worked out by
    # hand in the order the trials run (loss = quality / (step + 1)):
    # trial 0 (1.0) is alone at each rung; trial 1 (1.5) is worse than it at rung 2:
    # stopped at step 2; trial 2 (0.8) leads every rung; trial 3 (3.0): cutoff at rung 2
    # is the median of 0.33, 0.5, 0.27: stopped at step 2; trial 4 (1.1) passes rung 2
    # (0.37 against 0.42) but not rung 4 (0.22 against the median 0.18 of trials 0 and 2).
    env = {**os.environ, "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()}
    done = subprocess.run(
        [sys.executable, "-m", "aioproj", "sweep", str(project),
         "-P", "quality=1.0,1.5,0.8,3.0,1.1", "-P", "steps=40", "-P", "pause=0.1",
         "--max-parallel", "1", "--metric", "loss", "--env-manager", "local",
         "--early-stop", "asha", "--max-t", "40", "--grace-period", "2",
         "--reduction-factor", "2", "--progress", "lines"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr  # stopped trials are no failure
    print(done.stdout)  # the ASHA run, as a user sees it (pytest -s)
    killed = {
        int(m.group(1)): m.group(2)
        for m in re.finditer(r"\[trial (\d)\] KILLED .*?\((ASHA: .*)\)$", done.stdout, re.M)
    }
    assert {trial: _step(why) for trial, why in killed.items()} == {1: 2, 3: 2, 4: 4}
    assert "rung 4" in killed[4]
    assert "best loss=0.02 (trial 2, quality=0.8" in done.stdout
    client = mlflow_client((tmp_path / "mlruns").as_uri())
    runs = client.search_runs(["0"])
    trials = {int(r.data.tags["aioproj.sweep.trial"]): r for r in runs if r.data.params}
    assert {i: r.info.status for i, r in trials.items()} == {
        0: "FINISHED", 1: "KILLED", 2: "FINISHED", 3: "KILLED", 4: "KILLED",
    }  # fmt: skip
    for index in (1, 3, 4):
        assert trials[index].data.tags[PRUNED_TAG] == killed[index]
        # it was stopped well before its 40 steps
        assert len(client.get_metric_history(trials[index].info.run_id, "loss")) < 30


@pytest.mark.anyio
@pytest.mark.slow
async def test_median_rule_spares_a_metric_logged_once(project: Path, tracking_uri: str) -> None:
    # The second trial logs a far worse rmse, its only value, then saves its model for a
    # while: the median rule must let it finish.
    results = await aioproj.sweep(
        str(project),
        {"rmse": [1.0, 5.0, 0.5]},
        entry_point="score",
        max_parallel=1,
        metric="rmse",
        early_stopping=aioproj.MedianStopping("rmse", warmup_steps=0, min_trials=1),
        metrics_interval=0.1,
        env_manager="local",
    )
    assert [(r.status.value, r.pruned) for r in results] == [("FINISHED", None)] * 3


def _reference(pruner: Any, qualities: list[float], steps: int, name: str) -> dict[int, int]:
    """What Optuna itself prunes for these curves, in process: trial -> step."""
    study = optuna.create_study(study_name=name, pruner=pruner)
    for quality in qualities:
        study.enqueue_trial({"quality": quality})
    pruned = {}
    space = {"quality": optuna.distributions.CategoricalDistribution(qualities)}
    for index in range(len(qualities)):
        trial = study.ask(space)
        quality = trial.params["quality"]
        for step in range(steps):
            trial.report(quality / (step + 1), step)
            if step > 0 and trial.should_prune():  # aioproj's guard: never the first value
                pruned[index] = step
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, quality / steps)
    return pruned


PRUNERS: dict[str, Callable[[], Any]] = {
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=2),
    "successive-halving": lambda: optuna.pruners.SuccessiveHalvingPruner(
        min_resource=2, reduction_factor=2
    ),
    "hyperband": lambda: optuna.pruners.HyperbandPruner(
        min_resource=2, max_resource=12, reduction_factor=2
    ),
}


def _study(name: str, pruner: Any, enqueued: list[float]) -> optuna.Study:
    study = optuna.create_study(study_name=name, pruner=pruner)
    for quality in enqueued:  # the sampler proposes these, in this order
        study.enqueue_trial({"quality": quality})
    return study


@pytest.mark.anyio
@pytest.mark.slow
@pytest.mark.parametrize("kind", list(PRUNERS))
async def test_optuna_pruners_prune_what_optuna_prunes(
    project: Path, tracking_uri: str, kind: str
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    qualities = [1.0, 3.0, 0.8, 1.4]
    # Hyperband puts trials in brackets by a hash of the study name and trial number:
    # with this name, trials 1 and 3 share a bracket with better ones.
    name = "curves-hyperband-18" if kind == "hyperband" else f"curves-{kind}"
    expected = await anyio.to_thread.run_sync(_reference, PRUNERS[kind](), qualities, 12, name)
    study = await anyio.to_thread.run_sync(_study, name, PRUNERS[kind](), qualities)
    # 0.3 s a step: a value is judged well before the trial's last step, even on a busy
    # machine (the pruned trials are stopped at step 2 to 8 of 12).
    tuner = aioproj.OptunaTuner(study, {"quality": qualities, "pause": 0.3}, "loss")
    results = await aioproj.sweep(
        str(project),
        tuner=tuner,
        samples=len(qualities),
        max_parallel=1,
        metrics_interval=0.05,
        env_manager="local",
    )
    by_index = {r.index: r for r in results}
    assert [by_index[i].params["quality"] for i in range(4)] == qualities
    pruned = {i: _step(r.pruned) for i, r in by_index.items() if r.pruned}
    assert pruned == expected
    assert pruned, "the scripted curves are meant to prune trials"
    states = [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]
    assert states == ["PRUNED" if i in expected else "COMPLETE" for i in range(4)]
    for index in expected:
        assert by_index[index].status is aioproj.RunStatus.KILLED
        assert by_index[index].pruned is not None
        assert by_index[index].pruned.startswith(f"Optuna {type(study.pruner).__name__}")


@pytest.mark.anyio
@pytest.mark.slow
async def test_optuna_multi_objective(project: Path, tracking_uri: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = await anyio.to_thread.run_sync(
        lambda: optuna.create_study(
            directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=3)
        )
    )
    tuner = aioproj.OptunaTuner(study, {"quality": aioproj.Uniform(0.5, 2.0)}, ["loss", "cost"])
    sweep = aioproj.sweep(
        str(project),
        tuner=tuner,
        samples=3,
        max_parallel=3,
        env_manager="local",
    )
    results = await sweep
    assert sweep.metric == "loss"
    assert all(r.ok for r in results)
    by_run = {r.run_id: r for r in results}
    assert len(study.trials) == 3
    for trial in study.trials:
        assert trial.state.name == "COMPLETE"
        result = by_run[trial.user_attrs["aioproj.run_id"]]
        assert trial.values == [result.metrics["loss"], result.metrics["cost"]]
        assert trial.params["quality"] == result.params["quality"]
    assert len(study.best_trials) >= 1


def test_optuna_tuner_refuses_what_does_not_fit() -> None:
    study = optuna.create_study(directions=["minimize", "maximize"])
    with pytest.raises(aioproj.InvalidArgumentError, match="2 objective"):
        aioproj.OptunaTuner(study, {"x": [1, 2]}, "loss")
    with pytest.raises(aioproj.InvalidArgumentError, match=r"optuna\.Study"):
        aioproj.OptunaTuner(object(), {"x": [1, 2]}, "loss")  # type: ignore[arg-type]
    with pytest.raises(aioproj.InvalidArgumentError, match="space"):
        aioproj.OptunaTuner(study, 3, ["a", "b"])  # type: ignore[arg-type]
