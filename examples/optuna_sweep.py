"""Tune examples/hello's learning rate with Optuna's ask/tell interface, several trials at
a time, stopping trials that fall behind the median early.

Optuna proposes the next ``alpha`` whenever a trial slot frees up (``Tuner.ask``) and
learns each result as it arrives (``Tuner.tell``); aioproj runs the trials as child runs
of one MLflow parent run and stops, with the median rule, those whose live ``loss`` is
worse than the median of ended trials at the same step (recorded KILLED, tagged
``aioproj.sweep.pruned``, told to Optuna as pruned).

    pip install optuna
    python examples/optuna_sweep.py --trials 12 --parallel 3
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

import aioproj

HELLO = Path(__file__).resolve().parent / "hello"


class OptunaTuner:
    """An aioproj tuner backed by an Optuna study (minimising ``metric``)."""

    def __init__(self, study: optuna.Study, trials: int, metric: str = "loss") -> None:
        self.study = study
        self.trials = trials
        self.metric = metric
        self._pending: dict[int, optuna.Trial] = {}

    def ask(self, index: int) -> Mapping[str, Any] | None:
        if index >= self.trials:
            return None  # the budget is spent: the sweep ends when running trials do
        trial = self.study.ask()
        self._pending[index] = trial
        return {"alpha": trial.suggest_float("alpha", 1e-3, 1.0, log=True), "steps": 15}

    def tell(self, result: aioproj.TrialResult) -> None:
        trial = self._pending.pop(result.index)
        if result.ok and self.metric in result.metrics:
            self.study.tell(trial, result.metrics[self.metric])
        elif result.pruned:
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)


async def main(trials: int, parallel: int, seed: int) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    sweep = aioproj.sweep(
        str(HELLO),
        tuner=OptunaTuner(study, trials),
        max_parallel=parallel,
        metric="loss",
        early_stopping=aioproj.MedianStopping("loss", warmup_steps=3, min_trials=2),
        env_manager="local",
        name="optuna-hello",
        progress=True,
    )
    async for result in sweep:
        # Each result arrives as its trial ends; Optuna has already been told.
        if result.error is not None:
            print(f"trial {result.index} could not run: {result.error}")
    print(f"Optuna's best: alpha={study.best_params['alpha']:.4f} loss={study.best_value:.5f}")
    states = [t.state.name for t in study.trials]
    print("Optuna trials:", {s: states.count(s) for s in sorted(set(states))})
    return study


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--parallel", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(main(args.trials, args.parallel, args.seed))
