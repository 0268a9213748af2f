"""N trivial local runs through aioproj versus the same commands as bare subprocesses.

Each round starts N runs of a one-entry-point project whose command is
``python -c "import time,sys; time.sleep(float(sys.argv[1]))" 0`` (env manager ``local``,
file store in a temporary directory), all at once with ``asyncio.gather``, and waits for
them. The floor starts the same N commands with ``asyncio.create_subprocess_exec("bash",
"-c", ...)`` in the same process. Printed: wall time of each, the ratio, and aioproj's own
CPU per run (driver CPU time beyond the floor's, divided by N).

    python benchmarks/local_sweep.py                 # N = 1, 50, 200
    python benchmarks/local_sweep.py -n 200 --reps 3
    python benchmarks/local_sweep.py -n 10 --mlflow  # also mlflow.projects.run, if installed

Targets (DESIGN.md §5): ratio ≤ 1.5 at N = 200; engine CPU ≤ 5 ms per run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

COMMAND = 'python -c "import time,sys; time.sleep(float(sys.argv[1]))" {sleep}'
MLPROJECT = f"""
name: noop
entry_points:
  main:
    parameters:
      sleep: {{type: float, default: 0}}
    command: '{COMMAND}'
"""


def _make_project(root: Path) -> Path:
    project = root / "noop"
    project.mkdir()
    (project / "MLproject").write_text(MLPROJECT)
    return project


async def floor(n: int, lags: list[float] | None = None) -> None:
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_lag(stop, lags)) if lags is not None else None
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    command = COMMAND.format(sleep=0)

    async def one() -> int:
        proc = await asyncio.create_subprocess_exec("bash", "-c", command, env=env)
        return await proc.wait()

    codes = await asyncio.gather(*(one() for _ in range(n)))
    stop.set()
    if watcher is not None:
        await watcher
    assert codes == [0] * n, codes


async def _watch_lag(stop: asyncio.Event, lags: list[float]) -> None:
    """Record how late a 10 ms timer fires: the event loop's lag."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        start = loop.time()
        await asyncio.sleep(0.01)
        lags.append(loop.time() - start - 0.01)


async def with_aioproj(n: int, project: Path, store: str, lags: list[float] | None = None) -> None:
    import aioproj

    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_lag(stop, lags)) if lags is not None else None
    async with aioproj.Runner(tracking_uri=store, echo="off") as runner:
        runs = await asyncio.gather(
            *(runner.run(str(project), synchronous=False, env_manager="local") for _ in range(n))
        )
        statuses = await asyncio.gather(*runs)
    stop.set()
    if watcher is not None:
        await watcher
    assert all(s is aioproj.RunStatus.FINISHED for s in statuses), statuses


def with_mlflow(n: int, project: Path, store: str) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = store
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    # MLflow re-executes its `mlflow` command per asynchronous run: it must be on PATH.
    os.environ["PATH"] = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    import mlflow.projects

    runs = [
        mlflow.projects.run(
            str(project), parameters={"sleep": "0"}, synchronous=False, env_manager="local"
        )
        for _ in range(n)
    ]
    assert all(run.wait() for run in runs)


def _p99(lags: list[float]) -> float:
    return sorted(lags)[int(len(lags) * 0.99)] * 1000 if lags else 0.0


def measure(fn, *args) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Wall seconds and this process's CPU seconds (all threads, no children)."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = fn(*args)
    if asyncio.iscoroutine(result):
        asyncio.run(result)
    return time.perf_counter() - wall0, time.process_time() - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, action="append", help="runs per round (repeatable)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mlflow", action="store_true", help="also time mlflow.projects.run")
    args = parser.parse_args()
    sizes = args.n or [1, 50, 200]

    import aioproj  # noqa: F401  (imported once, outside the timings)

    print(
        f"{'N':>5} {'floor s':>9} {'aioproj s':>10} {'ratio':>7} {'engine CPU ms/run':>18}"
        f" {'lag p99 ms (floor)':>18}"
        + (f" {'mlflow s':>9} {'mlflow/aioproj':>15}" if args.mlflow else "")
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        project = _make_project(root)
        asyncio.run(floor(2))  # warm up bash and python
        for n in sizes:
            floors, ours, extra_cpu = [], [], []
            for rep in range(args.reps):
                store = (root / f"mlruns-{n}-{rep}").as_uri()
                f_wall, f_cpu = measure(floor, n)
                a_wall, a_cpu = measure(with_aioproj, n, project, store)
                floors.append(f_wall)
                ours.append(a_wall)
                extra_cpu.append(max(a_cpu - f_cpu, 0.0) / n)
            f, a = statistics.median(floors), statistics.median(ours)
            cpu_ms = statistics.median(extra_cpu) * 1000
            # One more round of each, untimed, with a lag watcher on the loop.
            floor_lags: list[float] = []
            asyncio.run(floor(n, floor_lags))
            lags: list[float] = []
            asyncio.run(with_aioproj(n, project, (root / f"lag-{n}").as_uri(), lags))
            lag = f"{_p99(lags):.1f} ({_p99(floor_lags):.1f})"
            line = f"{n:>5} {f:>9.3f} {a:>10.3f} {a / f:>7.2f} {cpu_ms:>18.2f} {lag:>18}"
            if args.mlflow:
                m_wall, _ = measure(with_mlflow, n, project, (root / f"mlflow-{n}").as_uri())
                line += f" {m_wall:>9.2f} {m_wall / a:>15.1f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
