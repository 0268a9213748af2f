"""What aioproj.sweep adds over starting the same runs with Runner.run and gather.

N trivial trials (``true``, env manager ``local``, file store in a temporary directory),
all at once (max_parallel = N): through ``runner.run(..., synchronous=False)`` and
``asyncio.gather``; through ``aioproj.sweep`` (each trial's final metrics read once);
and through ``aioproj.sweep`` with ``metric=`` (every trial's metrics followed live,
0.5 s polls, which also delays each result until a poll after its end).

    python benchmarks/sweep_overhead.py -n 100
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

MLPROJECT = """
entry_points:
  main:
    parameters:
      i: {type: int, default: 0}
    command: "true"
"""


async def gathered(project: Path, store: str, n: int) -> None:
    import aioproj

    async with aioproj.Runner(tracking_uri=store, echo="off") as runner:
        runs = await asyncio.gather(
            *(
                runner.run(str(project), parameters={"i": i}, synchronous=False,
                           env_manager="local")
                for i in range(n)
            )
        )  # fmt: skip
        assert all(await asyncio.gather(*(r.wait() for r in runs)))


async def swept(project: Path, store: str, n: int, metric: str | None) -> None:
    import aioproj

    results = await aioproj.sweep(
        str(project),
        {"i": list(range(n))},
        max_parallel=n,
        tracking_uri=store,
        metric=metric,
        env_manager="local",
    )
    assert len(results) == n
    assert all(r.ok for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    import aioproj  # noqa: F401  (imported once, outside the timings)

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "p"
        project.mkdir()
        (project / "MLproject").write_text(MLPROJECT)
        cases = {
            "Runner.run + gather": lambda store: gathered(project, store, args.n),
            "sweep": lambda store: swept(project, store, args.n, None),
            "sweep, live metric (0.5 s)": lambda store: swept(project, store, args.n, "loss"),
        }
        print(f"{args.n} trials at once, median of {args.reps}")
        base = None
        for name, case in cases.items():
            times = []
            for rep in range(args.reps):
                store = (Path(tmp) / f"{len(times)}-{rep}-{name[:5]}").as_uri()
                start = time.perf_counter()
                asyncio.run(case(store))
                times.append(time.perf_counter() - start)
            median = sorted(times)[len(times) // 2]
            base = base or median
            rate = args.n / median
            print(f"{name:<28} {median:7.3f} s  {median / base:5.2f}x  {rate:7.1f} runs/s")


if __name__ == "__main__":
    main()
