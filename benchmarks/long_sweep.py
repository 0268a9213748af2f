"""A 10,000-trial aioproj.sweep, at most 200 at once: driver memory and loop lag over time.

Each repetition runs in a fresh process (so that one's memory is not the next one's
start), which imports aioproj, then, with a 10 ms timer on the loop measuring its lag:

1. the **idle loop** for 2 s (the lag's baseline);
2. the **lean floor**: the same N commands (``true`` under ``bash -c``) at most
   ``--max-parallel`` at once, the next started as one ends (local_sweep.py's
   ``lean_floor``: posix_spawn, a pipe and a pidfd on loop callbacks, no threads);
3. ``aioproj.sweep`` of a one-entry-point project whose command is ``true``, over
   ``{"i": range(N)}`` with ``max_parallel``, env manager ``local``, a file store in a
   temporary directory, consumed with ``async for`` (the benchmark keeps nothing;
   the sweep keeps its ``results``, by design). The driver's RSS is read every
   ``--sample-every`` trials.

Printed per repetition: a row per tenth of the trials (trials done, seconds, runs per
second in that tenth, RSS, lag p99 in that tenth). Then, as median [min-max] of the
repetitions: the wall time, its ratio to the floor, driver CPU per trial (this process,
all threads, children excluded); RSS before the sweep and at 1k, 5k and N trials; the
growth in KB per trial over the steady part (least squares over the samples from 1k
trials on); lag p50/p99/max over the whole sweep, of the floor and of the idle loop;
statuses; the load average before and after. (The floor's lag is high by nature: its
loop does nothing but spawn, a burst of callbacks per iteration.)

    python benchmarks/long_sweep.py                    # N = 10,000, max 200, 3 reps
    python benchmarks/long_sweep.py -n 2000 --reps 1

Target (DESIGN.md §5, issue 16): a 10,000-run sweep with max 200 at once finishes, the
driver's memory stays flat (KB per trial), loop lag p99 <= 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from load import _rss_kb
from local_sweep import _lagged, _p99, lean_floor, measure, spread

MLPROJECT = """
entry_points:
  main:
    parameters:
      i: {type: int, default: 0}
    command: "true"
"""


async def _idle(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def _sweep(project: Path, store: str, n: int, max_parallel: int, every: int,
                 out: dict[str, Any]) -> None:  # fmt: skip
    """The sweep, recording (trials done, seconds, RSS KB, lag samples so far) every
    ``every`` trials into ``out["samples"]``; ``out["lags"]`` is filled by the caller's
    watcher."""
    import aioproj

    lags: list[float] = out["lags"]
    statuses: collections.Counter[str] = collections.Counter()
    samples = out["samples"] = [(0, 0.0, _rss_kb(), len(lags))]
    started = time.perf_counter()
    done = 0
    sweep = aioproj.sweep(
        str(project), {"i": list(range(n))}, max_parallel=max_parallel, tracking_uri=store,
        env_manager="local",
    )  # fmt: skip
    async with sweep:
        async for result in sweep:
            done += 1
            statuses[result.status.value] += 1
            if done % every == 0 or done == n:
                samples.append((done, time.perf_counter() - started, _rss_kb(), len(lags)))
    out["statuses"] = dict(statuses)


def one_rep(n: int, max_parallel: int, every: int) -> dict[str, Any]:
    """One repetition in this process; its figures."""
    import aioproj  # noqa: F401  (imported once, outside the timings)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8 * max_parallel:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16 * max_parallel), hard))
    with tempfile.TemporaryDirectory(prefix="aioproj-long-sweep-") as tmp:
        root = Path(tmp)
        project = root / "project"
        project.mkdir()
        (project / "MLproject").write_text(MLPROJECT)
        idle: list[float] = []
        asyncio.run(_lagged(_idle(2.0), idle))
        floor_lags: list[float] = []
        floor = lean_floor(n, command="true", max_parallel=max_parallel)
        floor_s, floor_cpu = measure(_lagged, floor, floor_lags)
        rss_before = _rss_kb()
        out: dict[str, Any] = {"lags": []}
        store = (root / "mlruns").as_uri()
        work = _sweep(project, store, n, max_parallel, every, out)
        wall, cpu = measure(_lagged, work, out["lags"])
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    lags = out["lags"]
    return {
        "floor_s": floor_s,
        "floor_cpu_s": floor_cpu,
        "wall_s": wall,
        "cpu_s": cpu,
        "rss_before_kb": rss_before,
        "rss_after_kb": _rss_kb(),
        "peak_kb": peak,
        "samples": out["samples"],
        "statuses": out["statuses"],
        "lag_ms": {
            "idle": [_p99(idle)],
            "floor": _lag_figures(floor_lags),
            "sweep": _lag_figures(lags),
        },
        "lags": lags,
    }


def _lag_figures(lags: list[float]) -> list[float]:
    """p50, p99 and max of a lag watcher's samples, in ms."""
    if not lags:
        return [0.0, 0.0, 0.0]
    return [statistics.median(lags) * 1000, _p99(lags), max(lags) * 1000]


def _rss_at(samples: list[list[float]], trials: int) -> float:
    """RSS KB at the first sample with at least ``trials`` done."""
    return next(rss for done, _, rss, _ in samples if done >= trials)


def _growth(samples: list[list[float]], start: int) -> float:
    """KB per trial: the least-squares slope of RSS over trials, from ``start`` on."""
    steady = [(done, rss) for done, _, rss, _ in samples if done >= start]
    if len(steady) < 2:
        return float("nan")
    slope, _ = statistics.linear_regression(*zip(*steady, strict=True))
    return slope


def _tenths(rep: dict[str, Any], n: int) -> list[str]:
    """A row per tenth of the trials: done, seconds, runs/s in it, RSS MB, lag p99 in it."""
    rows = []
    previous = rep["samples"][0]
    lags = rep["lags"]
    for mark in sorted({max(1, n * k // 10) for k in range(1, 11)}):
        sample = next(s for s in rep["samples"] if s[0] >= mark)
        if sample[0] <= previous[0]:
            continue
        done, seconds, rss, lag_index = sample
        rate = (done - previous[0]) / max(seconds - previous[1], 1e-9)
        window = lags[previous[3] : lag_index]
        rows.append(
            f"  {done:>6} | {seconds:7.1f} | {rate:6.1f} | {rss / 1024:7.1f} | {_p99(window):5.1f}"
        )
        previous = sample
    return rows


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="trials (default 10,000)")
    parser.add_argument("--max-parallel", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sample-every", type=int, default=100, help="trials between RSS reads")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_rep(args.n, args.max_parallel, args.sample_every)))
        return 0

    n, steady_from = args.n, min(1000, args.n // 10)
    print(f"{n} trials (`true`), max_parallel {args.max_parallel}, file store;"
          f" {args.reps} repetitions, each in a fresh process")  # fmt: skip
    print(f"load average before: {_load()}", flush=True)
    reps = []
    for rep in range(args.reps):
        argv = [sys.executable, __file__, "--child", "-n", str(n)]
        argv += ["--max-parallel", str(args.max_parallel), "--sample-every", str(args.sample_every)]
        done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:
            print(f"repetition {rep + 1} failed with exit code {done.returncode}")
            return 1
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        reps.append(figures)
        print(f"repetition {rep + 1} (load average now {_load()}):")
        print("  trials |       s | runs/s |  RSS MB | lag p99 ms (in this tenth)")
        print("\n".join(_tenths(figures, n)), flush=True)

    def column(key: str, scale: float = 1.0) -> list[float]:
        return [r[key] * scale for r in reps]

    marks = [m for m in (1000, 5000, n) if m <= n]
    rss = {m: [_rss_at(r["samples"], m) / 1024 for r in reps] for m in marks}
    print(
        f"sweep wall s: {spread(column('wall_s'), digits=1)};"
        f" lean floor s: {spread(column('floor_s'), digits=1)};"
        f" sweep / floor: {spread([r['wall_s'] / r['floor_s'] for r in reps])}"
    )
    print(
        f"driver CPU ms/trial: sweep {spread(column('cpu_s', 1000 / n))},"
        f" floor {spread(column('floor_cpu_s', 1000 / n))}"
    )
    print(
        f"RSS MB: before the sweep {spread(column('rss_before_kb', 1 / 1024), digits=1)}; "
        + "; ".join(f"at {m} trials {spread(rss[m], digits=1)}" for m in marks)
        + f"; peak {spread(column('peak_kb', 1 / 1024), digits=1)}"
    )
    growth = [_growth(r["samples"], steady_from) for r in reps]
    print(f"growth from {steady_from} trials on: {spread(growth)} KB/trial")
    for name in ("sweep", "floor"):
        p50, p99, top = ([r["lag_ms"][name][i] for r in reps] for i in range(3))
        print(
            f"lag ms, {name}: p50 {spread(p50, digits=1)}, p99 {spread(p99, digits=1)},"
            f" max {spread(top, digits=1)}"
        )
    print(f"lag ms, idle loop: p99 {spread([r['lag_ms']['idle'][0] for r in reps], digits=1)}")
    print(f"statuses: {[r['statuses'] for r in reps]}")
    print(f"load average after: {_load()}")
    return 0 if all(r["statuses"] == {"FINISHED": n} for r in reps) else 1


if __name__ == "__main__":
    sys.exit(main())
