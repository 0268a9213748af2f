"""Load: event-loop lag and memory with many live runs, and a long sweep with cancels.

Three measurements, each in this process, against its own baseline:

1. **Lag with N live runs.** N local runs of ``sleep S`` are started at once; once all
   are live, a 10 ms timer measures how late the loop wakes for ``--window`` seconds
   (p50/p99/max). The baseline is the same timer on an idle loop. The start burst is
   reported separately (the runs' starts are where the engine works).
2. **Memory per active run.** Driver RSS with N live runs minus RSS before them, over N.
3. **A long sweep.** ``--sweep`` runs (default 1000) of short commands with
   ``max_concurrency=50``; every 7th is long and cancelled after a random delay. Printed:
   wall time, statuses, and processes left (must be 0).

    python benchmarks/load.py                # N = 200
    python benchmarks/load.py -n 500 --sweep 2000

Targets (DESIGN.md §5): lag p99 ≤ 20 ms with 200 live runs; RSS ≤ 100 KB per run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

MLPROJECT = """\
name: load
entry_points:
  main:
    parameters:
      seconds: {type: float, default: 0}
      pids: {type: string, default: /dev/null}
    command: "echo $$ >> {pids}; sleep {seconds}"
"""


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


async def _lag(stop: asyncio.Event, out: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        start = loop.time()
        await asyncio.sleep(0.01)
        out.append((loop.time() - start - 0.01) * 1000)


def _summary(lags: list[float]) -> str:
    if not lags:
        return "-"
    ordered = sorted(lags)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered):6.1f}  p99 {p99:6.1f}  max {ordered[-1]:6.1f} ms"


async def live_runs(project: Path, store: str, n: int, window: float) -> None:
    import aioproj

    idle: list[float] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(_lag(stop, idle))
    await asyncio.sleep(window)
    stop.set()
    await watcher

    async with aioproj.Runner(tracking_uri=store, echo="off") as runner:
        await runner.run(str(project), env_manager="local")  # warm caches and imports
        rss_before = _rss_kb()
        burst: list[float] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(_lag(stop, burst))
        started = time.perf_counter()
        runs = await asyncio.gather(
            *[
                runner.run(
                    str(project), parameters={"seconds": window + 30}, env_manager="local",
                    synchronous=False,
                )
                for _ in range(n)
            ]
        )  # fmt: skip
        start_s = time.perf_counter() - started
        stop.set()
        await watcher
        live: list[float] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(_lag(stop, live))
        await asyncio.sleep(window)
        stop.set()
        await watcher
        rss_live = _rss_kb()
        await asyncio.gather(*[run.cancel() for run in runs])
    per_run = (rss_live - rss_before) / n
    print(f"lag, idle loop             {_summary(idle)}")
    print(f"lag, starting {n} runs   {_summary(burst)}   ({start_s:.2f} s to start all)")
    print(f"lag, {n} runs live       {_summary(live)}")
    print(f"memory: {rss_before / 1024:.1f} MB before, {rss_live / 1024:.1f} MB with {n} live"
          f" runs: {per_run:.1f} KB per run")  # fmt: skip


async def sweep(project: Path, store: str, n: int, pids_file: Path) -> None:
    import aioproj

    rng = random.Random(1)
    statuses: collections.Counter[str] = collections.Counter()
    started = time.perf_counter()
    async with aioproj.Runner(tracking_uri=store, echo="off", max_concurrency=50,
                              grace_period=1) as runner:  # fmt: skip

        async def one(i: int) -> None:
            seconds = 30.0 if i % 7 == 0 else rng.choice([0, 0.02, 0.1])
            try:
                async with asyncio.timeout(rng.uniform(0.1, 3) if i % 7 == 0 else None):
                    run = await runner.run(
                        str(project),
                        parameters={"seconds": seconds, "pids": str(pids_file)},
                        env_manager="local",
                    )
                statuses[(await run.get_status()).value] += 1
            except TimeoutError:
                statuses["cancelled"] += 1

        await asyncio.gather(*[one(i) for i in range(n)])
    elapsed = time.perf_counter() - started
    left = [pid for pid in _pids(pids_file) if _alive(pid)]
    print(f"sweep of {n} runs, max_concurrency 50, every 7th cancelled: {elapsed:.1f} s,"
          f" {dict(statuses)}, processes left: {len(left)}")  # fmt: skip


def _pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=200, help="live runs (default 200)")
    parser.add_argument("--window", type=float, default=3.0, help="seconds of lag sampling")
    parser.add_argument("--sweep", type=int, default=1000, help="runs in the long sweep")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * args.n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * args.n), hard))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="aioproj-load-") as tmp:
        root = Path(tmp)
        project = root / "proj"
        project.mkdir()
        (project / "MLproject").write_text(MLPROJECT)
        asyncio.run(live_runs(project, (root / "mlruns").as_uri(), args.n, args.window))
        if args.sweep:
            asyncio.run(sweep(project, (root / "sweep").as_uri(), args.sweep, root / "pids"))


if __name__ == "__main__":
    main()
