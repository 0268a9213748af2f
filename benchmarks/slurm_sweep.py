"""N jobs on a real Slurm through aioproj: status commands per poll round, and wall time
against the same runs on the local backend.

Two shapes, each N at a time: N independent runs (``runner.run(..., synchronous=False)``
all at once, then awaited: N ``sbatch``), and a sweep of N trials (``aioproj.sweep``:
one ``sbatch --array``). The project's command is ``echo run {i}`` (env manager
``local``, file store in a temporary directory). Printed per shape and N, as the median
and range of ``--reps`` repetitions: the wall time on Slurm and on the local backend, the
status commands per poll round (squeue, and sacct/scontrol when a job ended badly or
aged out), their total, what one status command per job per round would have cost over
the same rounds (the per-job polling baseline), and every Slurm command run. The
machine's load average is printed before and after.

If no Slurm answers, a private single-node cluster is installed (apt-get, as root) and
started as the tests do (tests/slurm_support.py), and stopped at the end.

    python benchmarks/slurm_sweep.py              # N = 20, 100; 3 reps
    python benchmarks/slurm_sweep.py -n 20 --reps 5

Target (DESIGN.md §5): status commands per poll round independent of N.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aioproj  # noqa: E402
from aioproj.backends.slurm import SlurmBackend  # noqa: E402
from tests.slurm_support import SlurmCluster, SlurmUnavailable  # noqa: E402

MLPROJECT = """\
name: bench
entry_points:
  main:
    parameters:
      i: {type: int, default: 0}
    command: "echo run {i}"
"""


def _spread(values: list[float], unit: str = "", digits: int = 2) -> str:
    low, high = min(values), max(values)
    return f"{statistics.median(values):.{digits}f}{unit} ({low:.{digits}f}-{high:.{digits}f})"


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min) on {os.cpu_count()} cores"


async def _runs(
    project: Path, n: int, uri: str, backend: str | SlurmBackend, config: dict[str, str]
) -> float:
    started = time.perf_counter()
    async with aioproj.Runner(tracking_uri=uri, echo="off") as runner:

        async def one(i: int) -> aioproj.SubmittedRun:
            return await runner.run(
                str(project), parameters={"i": i}, backend=backend, env_manager="local",
                backend_config=config or None, synchronous=False,
            )  # fmt: skip

        runs = await asyncio.gather(*(one(i) for i in range(n)))
        statuses = [await run for run in runs]
    wall = time.perf_counter() - started
    assert statuses == [aioproj.RunStatus.FINISHED] * n, Counter(statuses)
    return wall


async def _sweep(
    project: Path, n: int, uri: str, backend: str | SlurmBackend, config: dict[str, str]
) -> float:
    started = time.perf_counter()
    async with aioproj.Runner(tracking_uri=uri, echo="off") as runner:
        results = await aioproj.sweep(
            str(project), [{"i": i} for i in range(n)], max_parallel=n, runner=runner,
            backend=backend, backend_config=config or None, env_manager="local",
        )  # fmt: skip
    wall = time.perf_counter() - started
    assert all(r.ok for r in results), Counter(r.status for r in results)
    return wall


async def measure(shape: str, n: int, reps: int, root: Path) -> None:
    project = root / "project"
    project.mkdir(exist_ok=True)
    (project / "MLproject").write_text(MLPROJECT)
    go = _runs if shape == "runs" else _sweep
    slurm_walls, local_walls, rounds, totals, per_job, peaks = [], [], [], [], [], []
    commands: Counter[str] = Counter()
    for rep in range(reps):
        config = {"shared_dir": str(root / "shared")}
        backend = SlurmBackend()
        try:
            slurm_walls.append(
                await go(project, n, (root / f"slurm-{n}-{rep}").as_uri(), backend, config)
            )
        finally:
            await backend.aclose()
        local_walls.append(await go(project, n, (root / f"local-{n}-{rep}").as_uri(), "local", {}))
        poller = backend.poller
        rounds.append(float(poller.rounds))
        totals.append(float(sum(poller.round_commands)))
        per_job.append(float(sum(poller.round_active)))
        peaks.append(float(max(poller.round_commands, default=0)))
        commands.update(backend.cli.calls)
    ratio = [s / max(loc, 1e-9) for s, loc in zip(slurm_walls, local_walls, strict=True)]
    fewer = [p / max(t, 1.0) for p, t in zip(per_job, totals, strict=True)]
    print(f"N = {n} {shape} ({reps} reps; median (min-max)):")
    print(f"  wall on slurm  {_spread(slurm_walls, ' s')}")
    print(f"  wall on local  {_spread(local_walls, ' s')}")
    print(f"  slurm / local  {_spread(ratio, 'x', 1)}")
    print(
        f"  poll rounds {_spread(rounds, '', 0)}; status commands per round: at most "
        f"{_spread(peaks, '', 0)}, {_spread([t / r for t, r in zip(totals, rounds, strict=True)])}"
        " on average"
    )
    print(
        f"  status commands in total {_spread(totals, '', 0)}; one per job per round: "
        f"{_spread(per_job, '', 0)} ({_spread(fewer, 'x', 1)} more)"
    )
    each = ", ".join(f"{name} {count / reps:.0f}" for name, count in sorted(commands.items()))
    print(f"  Slurm commands per rep: {each}")


def _version() -> str:
    try:
        out = subprocess.run(["sbatch", "--version"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, action="append", help="number of jobs (repeatable)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--shape", choices=("runs", "sweep"), action="append", help="Default: both."
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aioproj-slurm-bench-") as tmp:
        cluster = SlurmCluster(Path(tmp) / "cluster")
        try:
            cluster.up()
        except SlurmUnavailable as exc:
            print(f"skipped: no Slurm ({exc})")
            return 0
        os.environ.update(cluster.env)
        try:
            print(f"{_version()}, {'a private' if cluster.started else 'the running'} cluster")
            print(f"load before: {_load()}")
            for shape in args.shape or ["runs", "sweep"]:
                for n in args.n or [20, 100]:
                    root = Path(tmp) / f"{shape}-{n}"
                    root.mkdir()
                    asyncio.run(measure(shape, n, args.reps, root))
            print(f"load after: {_load()}")
        finally:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
