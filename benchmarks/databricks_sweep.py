"""N Databricks runs from one event loop, against FakeDatabricks: poll requests versus N.

    python benchmarks/databricks_sweep.py                 # N = 50, 200, 500
    python benchmarks/databricks_sweep.py -n 100 --execute

Every run is submitted through the real backend (code upload, runs/submit, tracking on the
emulator's MLflow endpoints) and followed by the workspace's one shared poller. By default
the emulator scripts the runs (PENDING 1 s, RUNNING 5-20 s spread evenly, TERMINATING
0.2 s) without starting processes, so N = 500 measures aioproj, not 500 Python start-ups;
``--execute`` runs each one's Python driver for real.

Printed per N: wall time, poll rounds, poll requests per round (mean and max) and in
total; what one ``runs/get`` per active run per round would have cost for the same
rounds (the same freshness); and MLflow's approach, one ``runs/get`` per run every 30 s
(at least one per run; N per round while all are active). Target (DESIGN.md §5):
requests per round grow sub-linearly with N, none per run per round.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import anyio

MLPROJECT = """
name: sweep
entry_points:
  main:
    parameters:
      x: {type: float, default: 0}
    command: "python -c 'import sys; print(sys.argv[1])' {x}"
"""
CLUSTER = {"spark_version": "15.4.x-scala2.12", "node_type_id": "i3.xlarge", "num_workers": 1}
MLFLOW_POLL_SECONDS = 30.0


async def one_sweep(n: int, execute: bool, interval: tuple[float, float]) -> dict[str, float]:
    import aioproj
    from aioproj.backends.databricks import DatabricksBackend
    from aioproj.testing.databricks import FakeDatabricks, RunScript

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "p"
        project.mkdir()
        (project / "MLproject").write_text(MLPROJECT)
        async with FakeDatabricks() as ws:
            for i in range(n):
                running = 5.0 + 15.0 * i / max(1, n - 1)
                ws.script_next(
                    RunScript(
                        pending=1.0,
                        running=running,
                        terminating=0.2,
                        outcome="EXECUTE" if execute else "SUCCESS",
                    )
                )
            os.environ.update(
                DATABRICKS_HOST=ws.host,
                DATABRICKS_TOKEN=ws.token,
                DATABRICKS_CONFIG_FILE=str(Path(tmp) / "none"),
            )
            backend = DatabricksBackend(poll_interval=interval)
            start = time.perf_counter()
            try:
                async with aioproj.Runner(tracking_uri="databricks", echo="off") as runner:
                    runs: list[aioproj.SubmittedRun] = []

                    async def submit(i: int) -> None:
                        runs.append(
                            await runner.run(
                                str(project),
                                backend=backend,
                                backend_config=CLUSTER,
                                parameters={"x": i},
                                synchronous=False,
                            )
                        )

                    async with anyio.create_task_group() as tg:
                        for i in range(n):
                            tg.start_soon(submit, i)
                    submitted = time.perf_counter() - start
                    statuses = [await run for run in runs]
                wall = time.perf_counter() - start
                workspace = backend.workspace(ws.host)
                assert workspace is not None
                rounds = workspace.poller.round_requests
                active = workspace.poller.round_active
            finally:
                await backend.aclose()
            finished = sum(1 for s in statuses if s == aioproj.RunStatus.FINISHED)
            lifetimes = [(r.end_time - r.start_time) / 1000 for r in ws.runs.values() if r.end_time]
            return {
                "n": n,
                "finished": finished,
                "submitted_s": submitted,
                "wall_s": wall,
                "rounds": len(rounds),
                "mean_per_round": statistics.fmean(rounds) if rounds else 0.0,
                "max_per_round": max(rounds, default=0),
                "poll_total": sum(rounds),
                "per_run_total": sum(active),
                "max_active": max(active, default=0),
                "mlflow_total": sum(max(1, math.ceil(t / MLFLOW_POLL_SECONDS)) for t in lifetimes),
                "uploads": ws.count("POST dbfs/create"),
                "requests": sum(ws.requests.values()),
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, action="append", help="runs (repeatable)")
    parser.add_argument("--execute", action="store_true", help="run each driver for real")
    parser.add_argument("--min-interval", type=float, default=0.5)
    parser.add_argument("--max-interval", type=float, default=5.0)
    args = parser.parse_args()
    sizes = args.n or [50, 200, 500]
    logging.basicConfig(level=logging.CRITICAL)
    interval = (args.min_interval, args.max_interval)
    print(
        f"poll interval {interval[0]}-{interval[1]} s (adaptive); "
        f"{'real drivers' if args.execute else 'scripted runs'}; MLflow: runs/get per run "
        f"every {MLFLOW_POLL_SECONDS:.0f} s"
    )
    header = (
        f"{'N':>5} {'ok':>5} {'submit s':>9} {'wall s':>7} {'rounds':>6} {'req/round':>9}"
        f" {'max':>4} {'poll req':>8} {'1/run/round':>11} {'ratio':>6} {'MLflow 30s':>10}"
        f" {'uploads':>7} {'all req':>7}"
    )
    print(header)
    for n in sizes:
        r = anyio.run(one_sweep, n, args.execute, interval)
        print(
            f"{r['n']:>5.0f} {r['finished']:>5.0f} {r['submitted_s']:>9.2f} {r['wall_s']:>7.2f}"
            f" {r['rounds']:>6.0f} {r['mean_per_round']:>9.2f} {r['max_per_round']:>4.0f}"
            f" {r['poll_total']:>8.0f} {r['per_run_total']:>11.0f}"
            f" {r['per_run_total'] / max(1, r['poll_total']):>6.1f} {r['mlflow_total']:>10.0f}"
            f" {r['uploads']:>7.0f} {r['requests']:>7.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
