"""N trivial local runs through aioproj against the lean floor of starting N processes.

Each round starts N runs of a one-entry-point project whose command is
``python -c "import time,sys; time.sleep(float(sys.argv[1]))" 0`` (env manager
``local``, file store in a temporary directory), all at once with ``asyncio.gather``,
and waits for them.

The lean floor (DESIGN.md §5) does the least work that starting and watching the same
commands can take: the same ``bash -c`` command started with ``posix_spawn`` in a
session of its own, its output read from a pipe by a loop callback, its exit awaited on
a pidfd by a loop callback, no threads and no task per child. A second baseline,
``asyncio.create_subprocess_exec`` (what a program would write first; on Python < 3.12
it starts a waiter thread per child), is printed beside it, labelled.

Printed per N, as median [min-max] of ``--reps`` repetitions: wall time of the lean
floor, of asyncio's subprocesses and of aioproj; aioproj's ratio to each; aioproj's
driver CPU per run, absolute (this process's user+system time over all its threads,
children excluded: ``time.process_time``), next to the floor's; the p99 lag of a 10 ms
timer on the loop during separate rounds of each; the load average while it ran. First,
in fresh interpreters (``--reps`` of them), after writing aioproj's bytecode as an install
does: ``import aioproj``, the CPU of the first run on a fresh loop and Runner, and of a
second Runner's first run in the same interpreter; their difference is the one-off cost.

    python benchmarks/local_sweep.py                 # N = 1, 50, 200
    python benchmarks/local_sweep.py -n 200 -n 1000 --reps 3
    python benchmarks/local_sweep.py -n 10 --mlflow  # also mlflow.projects.run, if installed

Targets (DESIGN.md §5): aioproj / lean floor <= 1.2 at N = 200 and 1,000; driver CPU
<= 3 ms per run; loop lag p99 <= 20 ms while 200 runs start; one-off cost <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def _child_env() -> dict[str, str]:
    path = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    return {"PYTHONUNBUFFERED": "1", **os.environ, "PATH": path}


# -- baselines ------------------------------------------------------------------------------


async def lean_floor(n: int, *, command: str | None = None, max_parallel: int = 0) -> None:
    """posix_spawn + a pipe and a pidfd watched by loop callbacks: no threads, no tasks.

    ``command`` (default: the workload's) runs under ``bash -c``; with ``max_parallel``
    at most that many run at once, the next one started as one ends."""
    loop = asyncio.get_running_loop()
    bash = shutil.which("bash") or "/bin/bash"
    argv = [bash, "-c", COMMAND.format(sleep=0) if command is None else command]
    env = _child_env()
    remaining = to_start = n
    done = loop.create_future()
    codes: list[int] = []

    def start_one() -> None:
        nonlocal to_start
        to_start -= 1
        read_fd, write_fd = os.pipe()
        pid = os.posix_spawn(
            bash,
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, write_fd, 1),
                (os.POSIX_SPAWN_DUP2, write_fd, 2),
            ],
            setsid=True,
        )
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        pidfd = os.pidfd_open(pid)
        open_ends = [2]

        def end_one() -> None:
            nonlocal remaining
            open_ends[0] -= 1
            if open_ends[0] == 0:
                remaining -= 1
                if remaining == 0:
                    done.set_result(None)
                elif to_start:
                    start_one()

        def on_output() -> None:
            try:
                data = os.read(read_fd, 65536)
            except BlockingIOError:
                return
            if not data:
                loop.remove_reader(read_fd)
                os.close(read_fd)
                end_one()

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            _, status = os.waitpid(pid, 0)
            codes.append(os.waitstatus_to_exitcode(status))
            end_one()

        loop.add_reader(read_fd, on_output)
        loop.add_reader(pidfd, on_exit)

    for _ in range(min(n, max_parallel or n)):
        start_one()
    await done
    assert codes == [0] * n, codes


async def asyncio_subprocesses(n: int) -> None:
    """``asyncio.create_subprocess_exec`` per child, output piped and read."""
    env = _child_env()
    command = COMMAND.format(sleep=0)

    async def one() -> int:
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", command, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        await proc.communicate()
        return proc.returncode or 0

    codes = await asyncio.gather(*(one() for _ in range(n)))
    assert codes == [0] * n, codes


async def with_aioproj(n: int, project: Path, store: str) -> None:
    import aioproj

    async with aioproj.Runner(tracking_uri=store, echo="off") as runner:
        runs = await asyncio.gather(
            *(runner.run(str(project), synchronous=False, env_manager="local") for _ in range(n))
        )
        statuses = await asyncio.gather(*runs)
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


# -- measuring --------------------------------------------------------------------------------


async def _lagged(coro: Any, lags: list[float]) -> None:
    """Run ``coro`` while recording how late a 10 ms timer fires: the loop's lag."""
    loop = asyncio.get_running_loop()
    stop = False

    async def watch() -> None:
        while not stop:
            start = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - start - 0.01)

    watcher = asyncio.create_task(watch())
    try:
        await coro
    finally:
        stop = True
        await watcher


def _p99(lags: list[float]) -> float:
    return sorted(lags)[int(len(lags) * 0.99)] * 1000 if lags else 0.0


def measure(fn: Callable[..., Any], *args: Any) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads, no children)."""
    wall, cpu, _ = measure_split(fn, *args)
    return wall, cpu


def measure_split(fn: Callable[..., Any], *args: Any) -> tuple[float, float, float]:
    """Wall seconds, this process's CPU seconds (all threads, no children), and the CPU
    seconds of the thread that runs the event loop."""
    cpu0, wall0, loop0 = time.process_time(), time.perf_counter(), time.thread_time()
    result = fn(*args)
    if asyncio.iscoroutine(result):
        asyncio.run(result)
    return time.perf_counter() - wall0, time.process_time() - cpu0, time.thread_time() - loop0


def store_entries_per_run(store_uri: str, n: int) -> float:
    """Files and folders the runs of a file store hold, per run (MLflow's layout)."""
    root = Path(store_uri.removeprefix("file://"))
    entries = 0
    for experiment in root.iterdir():
        if not experiment.is_dir() or experiment.name.startswith("."):
            continue
        for run in experiment.iterdir():
            if run.is_dir():
                entries += 1 + sum(len(d) + len(f) for _, d, f in os.walk(run))
    return entries / n


def creation_cost(directory: Path, count: int = 300) -> float:
    """CPU seconds of creating one folder or small file on ``directory``'s file system."""
    base = Path(tempfile.mkdtemp(dir=directory))
    start = time.thread_time()
    for i in range(count):
        (base / f"d{i}").mkdir()
        (base / f"d{i}" / "f").write_text("x")
    return (time.thread_time() - start) / (2 * count)


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """``median [min-max]``."""
    med, low, high = statistics.median(values), min(values), max(values)
    return f"{med * scale:.{digits}f} [{low * scale:.{digits}f}-{high * scale:.{digits}f}]"


def _compile_bytecode() -> None:
    """Write aioproj's bytecode, as installing it does: the first-run figures are then an
    installed package's, not a source tree's compiled on every import (which is what
    they would be with PYTHONDONTWRITEBYTECODE set, or a read-only checkout)."""
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("aioproj")
    if spec is None or spec.origin is None:
        raise SystemExit("aioproj is not importable from this Python")
    compileall.compile_dir(os.path.dirname(spec.origin), quiet=1)


def _first_run_in_fresh_process() -> tuple[float, float, float]:
    """In a fresh interpreter: ``import aioproj`` wall seconds, the CPU seconds of the first
    run on a fresh loop with a fresh Runner (one-off imports included), and of the same on
    a second fresh loop and Runner (what every Runner pays)."""
    done = subprocess.run(
        [sys.executable, __file__, "--first-run"], stdout=subprocess.PIPE, text=True, check=True
    )
    imported, first, second = map(float, done.stdout.split())
    return imported, first, second


def _first_run_here() -> None:
    """``--first-run``: what :func:`_first_run_in_fresh_process` reads."""
    start = time.perf_counter()
    import aioproj  # noqa: F401

    imported = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        project = _make_project(root)
        asyncio.run(lean_floor(2))  # warm up bash and python, as the main rounds do
        _, first = measure(with_aioproj, 1, project, (root / "first").as_uri())
        _, second = measure(with_aioproj, 1, project, (root / "second").as_uri())
    print(imported, first, second)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, action="append", help="runs per round (repeatable)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mlflow", action="store_true", help="also time mlflow.projects.run")
    parser.add_argument("--first-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_run:
        _first_run_here()
        return
    sizes = args.n or [1, 50, 200]

    _compile_bytecode()
    firsts = [_first_run_in_fresh_process() for _ in range(args.reps)]
    import aioproj  # noqa: F401  (imported once, outside the timings)

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"in a fresh interpreter: import aioproj {spread([f[0] for f in firsts], 1000, 0)} ms"
        f" wall; the first run on a fresh loop {spread([f[1] for f in firsts], 1000, 0)} ms CPU,"
        f" a second Runner's first run {spread([f[2] for f in firsts], 1000, 0)} ms CPU:"
        f" one-off cost {spread([f[1] - f[2] for f in firsts], 1000, 0)} ms CPU"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        project = _make_project(root)
        asyncio.run(lean_floor(2))  # warm up bash and python
        # The one-off imports (measured above, in fresh interpreters) stay out of the rounds.
        asyncio.run(with_aioproj(1, project, (root / "warm-up").as_uri()))
        print(
            "N | lean floor s | asyncio s | aioproj s | aioproj/floor | aioproj/asyncio"
            " | aioproj CPU ms/run | floor CPU ms/run | lag p99 ms aioproj (floor)"
        )
        for n in sizes:
            floors, asyncios, ours, ratios, ratios_asyncio = [], [], [], [], []
            cpu_ours, cpu_floor, cpu_loop = [], [], []
            for rep in range(args.reps):
                store = (root / f"mlruns-{n}-{rep}").as_uri()
                f_wall, f_cpu = measure(lean_floor, n)
                s_wall, _ = measure(asyncio_subprocesses, n)
                a_wall, a_cpu, a_loop = measure_split(with_aioproj, n, project, store)
                cpu_loop.append(a_loop / n)
                floors.append(f_wall)
                asyncios.append(s_wall)
                ours.append(a_wall)
                ratios.append(a_wall / f_wall)
                ratios_asyncio.append(a_wall / s_wall)
                cpu_ours.append(a_cpu / n)
                cpu_floor.append(f_cpu / n)
            # As many more rounds of each, untimed, with a lag watcher on the loop.
            lags, floor_lags = [], []
            for rep in range(args.reps):
                lagged: list[float] = []
                asyncio.run(_lagged(lean_floor(n), lagged))
                floor_lags.append(_p99(lagged))
                lagged = []
                store = (root / f"lag-{n}-{rep}").as_uri()
                asyncio.run(_lagged(with_aioproj(n, project, store), lagged))
                lags.append(_p99(lagged))
            print(
                f"{n} | {spread(floors, digits=3)} | {spread(asyncios, digits=3)}"
                f" | {spread(ours, digits=3)} | {spread(ratios)} | {spread(ratios_asyncio)}"
                f" | {spread(cpu_ours, 1000)} | {spread(cpu_floor, 1000)}"
                f" | {spread(lags, digits=1)} ({spread(floor_lags, digits=1)})",
                flush=True,
            )
            entries = store_entries_per_run(store, n)
            cost = creation_cost(root)
            print(
                f"  aioproj CPU ms/run in the event loop's thread: {spread(cpu_loop, 1000)};"
                f" the file store holds {entries:.1f} files and folders per run, at"
                f" {cost * 1e6:.0f} us of CPU each on this file system:"
                f" {entries * cost * 1000:.2f} ms/run of the total is creating them",
                flush=True,
            )
            if args.mlflow:
                m_wall, _ = measure(with_mlflow, n, project, (root / f"mlflow-{n}").as_uri())
                print(f"  mlflow.projects.run N={n}: {m_wall:.2f} s, {m_wall / min(ours):.0f}x")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
