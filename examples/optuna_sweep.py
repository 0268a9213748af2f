"""Tune examples/hello's learning rate with Optuna, several trials at a time, pruning
trials that fall behind.

``aioproj.OptunaTuner`` lets Optuna's sampler propose the next ``alpha`` whenever a trial
slot frees up (ask/tell) and hands each ``loss`` value the trials log while they run to
the study's pruner (``trial.report`` / ``trial.should_prune``): here a MedianPruner, which
stops a trial whose loss is worse than the median of finished trials at the same step.
aioproj runs the trials as child runs of one MLflow parent run; a pruned trial is
recorded KILLED, tagged ``aioproj.sweep.pruned``, and told to Optuna as PRUNED.

With ``--storage sqlite:///study.db`` the study lives in Optuna's own storage: after a
crash, run the same command with ``--resume PARENT_RUN_ID`` and both the sweep and the
study go on where they were.

    pip install 'aioproj[optuna]'
    python examples/optuna_sweep.py --trials 12 --parallel 3
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import optuna

import aioproj

HELLO = Path(__file__).resolve().parent / "hello"


async def main(
    trials: int, parallel: int, seed: int, storage: str | None, resume: str | None
) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = await asyncio.to_thread(  # a database study does I/O: off the event loop
        optuna.create_study,
        study_name="hello-alpha",
        storage=storage,
        load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=3),
    )
    space = {"alpha": aioproj.LogUniform(1e-3, 1.0), "steps": 15}
    tuner = await asyncio.to_thread(aioproj.OptunaTuner, study, space, "loss")
    sweep = aioproj.sweep(
        str(HELLO),
        tuner=tuner,
        samples=trials,
        max_parallel=parallel,
        env_manager="local",
        name="optuna-hello",
        progress=True,
        resume=resume,
    )
    async for result in sweep:
        # Each result arrives as its trial ends; Optuna has already been told.
        if result.error is not None:
            print(f"trial {result.index} could not run: {result.reason}")
    best = await asyncio.to_thread(lambda: study.best_trial)
    print(f"Optuna's best: alpha={best.params['alpha']:.4f} loss={best.value:.5f}")
    states = [t.state.name for t in await asyncio.to_thread(lambda: study.trials)]
    print("Optuna trials:", {s: states.count(s) for s in sorted(set(states))})
    print(f"Parent run: {sweep.parent_run_id}")
    return study


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--parallel", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", help="An Optuna storage URL, e.g. sqlite:///study.db")
    parser.add_argument("--resume", metavar="PARENT_RUN_ID", help="Continue that sweep.")
    args = parser.parse_args()
    asyncio.run(main(args.trials, args.parallel, args.seed, args.storage, args.resume))
