"""The plain-script twin of sweep_notebook.ipynb: the same cells, run with asyncio.run.

In Jupyter the cells run as they are, through top-level ``await`` on the notebook's own
event loop, so the kernel stays responsive while trials run; here ``main()`` plays that
loop. tests/test_sweep_examples.py runs this file and checks that its cells match the
notebook's.

    python examples/sweep_notebook.py
"""

import asyncio
from pathlib import Path

HERE = Path(__file__).resolve().parent


async def main() -> None:
    # --- cell: sweep ---
    import aioproj

    sweep = aioproj.sweep(
        str(HERE / "hello"),
        {"alpha": [0.05, 0.2, 0.6], "steps": 15},
        metric="loss",
        goal="min",
        max_parallel=3,
        env_manager="local",
        progress=True,  # a live table in the notebook, redrawn as trials run
    )
    results = await sweep  # every TrialResult, once all trials have ended
    # --- cell: best ---
    best = sweep.best
    assert best is not None, "no trial logged a loss"
    print(f"best alpha={best.params['alpha']} loss={best.metrics['loss']:.5f} run {best.run_id}")
    print(f"parent run {sweep.parent_run_id}: {len(results)} trials")
    # --- cell: iterate ---
    # Results can also be taken one by one as trials end, in completion order;
    # leaving the loop early stops the trials still running (recorded KILLED).
    async with aioproj.sweep(
        str(HERE / "hello"), [{"alpha": 0.1, "steps": 5}, {"alpha": 0.3, "steps": 5}],
        env_manager="local",
    ) as more:  # fmt: skip
        async for result in more:
            print(f"trial {result.index} {result.status} in {result.duration:.1f}s")
    # --- end ---


if __name__ == "__main__":
    asyncio.run(main())
