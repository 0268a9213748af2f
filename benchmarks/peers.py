"""The same N trivial runs through aioproj, Prefect, Ray and MLflow, against the lean floor.

The workload is local_sweep.py's: N runs of ``python -c "import time,sys;
time.sleep(float(sys.argv[1]))" 0`` started at once and awaited, each through

- **aioproj**: ``Runner.run(..., synchronous=False, env_manager="local")`` on a file
  store, in this process (local_sweep.py's ``with_aioproj``);
- **Prefect 3**: one flow that submits N tasks (the default thread-pool task runner: a
  thread a task, unbounded), each running the command with ``subprocess.run``; the
  default tracking: a temporary local Prefect server (SQLite in a fresh ``PREFECT_HOME``)
  records the flow run and every task run with its state and logs;
- **Ray 2**: N ``@ray.remote`` tasks, each running the command with ``subprocess.run``, on
  a local cluster started by ``ray.init()`` with its defaults (one CPU a task, so as many
  at once as the machine has cores); nothing is tracked;
- **MLflow**: ``mlflow.projects.run`` of the same MLproject, ``synchronous=False``,
  ``env_manager="local"``, file store (local_sweep.py's ``with_mlflow``).

Each peer pins dependencies the others (and aioproj's test extra) conflict with, so each
runs in its own virtualenv: this script starts ``<peer python> peers.py --worker NAME``,
which imports the peer, warms it up (its import, its server or cluster and one run: the
one-off cost, printed on its own line, like aioproj's import), then times, per repetition,
the lean floor and the peer's N runs back to back in that same process. Create the venvs
(any directory; here under /tmp), with the Python that runs aioproj (3.11 here):

    python3 -m venv /tmp/peers-prefect && /tmp/peers-prefect/bin/pip install 'prefect==3.9.1'
    python3 -m venv /tmp/peers-ray && /tmp/peers-ray/bin/pip install 'ray==2.60.0'
    python3 -m venv /tmp/peers-mlflow && /tmp/peers-mlflow/bin/pip install 'mlflow==3.17.2'

and point this script at them (or set AIOPROJ_BENCH_PREFECT_PYTHON, ..._RAY_PYTHON,
..._MLFLOW_PYTHON). A peer with no venv given is looked for in this Python (mlflow is in
aioproj's test extra); a peer found in neither is reported as skipped with the reason.

    python benchmarks/peers.py -n 200 --reps 3 --prefect-python /tmp/peers-prefect/bin/python \\
        --ray-python /tmp/peers-ray/bin/python --mlflow-python /tmp/peers-mlflow/bin/python

Printed per N and runner, as median [min-max] of ``--reps`` repetitions: wall time; its
ratio to the lean floor measured just before it in the same process; driver CPU per run
(the driver process's user+system time over all its threads, children excluded:
``time.process_time``); the CPU per run of everything the round ran (the driver, the
children it reaped, and its other descendants: the Prefect server, Ray's raylet, GCS and
workers with the commands they ran, read from /proc at the start and end of the round;
this includes the command itself, ~20 ms of Python start-up); the one-off cost of each
peer; the load average as it went. MLflow re-executes its CLI per run (~5 s of CPU and
~210 MB each, /work/shared/reference/mlflow-baseline.md), all N at once: an N whose
projected memory is over 60 % of the machine's available memory is skipped, with the
figures.

Target (DESIGN.md §5): aioproj ahead of Prefect and >= 100x faster than MLflow.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from local_sweep import (
    COMMAND,
    _child_env,
    _make_project,
    lean_floor,
    measure,
    spread,
    with_aioproj,
    with_mlflow,
)

HERE = Path(__file__).resolve().parent
PEERS = ("prefect", "ray", "mlflow")
#: Peak memory of one concurrent ``mlflow.projects.run`` (the CLI it re-executes).
MLFLOW_MB_PER_RUN = 215


# -- the peers, each run in its own venv by a worker process ------------------------------


def _run_command() -> int:
    """What a Prefect or Ray task does: the workload's command, output captured."""
    done = subprocess.run(
        ["bash", "-c", COMMAND.format(sleep=0)], env=_child_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, check=False,
    )  # fmt: skip
    return done.returncode


def _prefect(root: Path) -> tuple[str, Callable[[int], None], Callable[[], None]]:
    os.environ["PREFECT_HOME"] = str(root / "prefect")
    os.environ.pop("PREFECT_API_URL", None)
    # The temporary server's start-up waits 20 s by default: not enough on a busy machine.
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    import prefect
    from prefect import flow, task

    run_command = task(_run_command)

    @flow
    def trivial_runs(n: int) -> list[int]:
        futures = [run_command.submit() for _ in range(n)]
        return [future.result() for future in futures]

    def run(n: int) -> None:
        codes = trivial_runs(n)
        assert codes == [0] * n, codes

    return f"prefect {prefect.__version__}", run, lambda: None


def _ray(root: Path) -> tuple[str, Callable[[int], None], Callable[[], None]]:
    import ray

    ray.init(_temp_dir=str(root / "ray"))
    run_command = ray.remote(_run_command)

    def run(n: int) -> None:
        codes = ray.get([run_command.remote() for _ in range(n)])
        assert codes == [0] * n, codes

    return f"ray {ray.__version__}", run, ray.shutdown


def _mlflow(root: Path) -> tuple[str, Callable[[int], None], Callable[[], None]]:
    import mlflow

    project = _make_project(root)
    rounds = itertools.count()

    def run(n: int) -> None:
        with_mlflow(n, project, (root / f"mlruns-{next(rounds)}").as_uri())

    return f"mlflow {mlflow.__version__}", run, lambda: None


SETUPS = {"prefect": _prefect, "ray": _ray, "mlflow": _mlflow}


def _descendant_ticks(root_pid: int) -> dict[int, int]:
    """Clock ticks of user+system time of each descendant of ``root_pid``, its own and
    its reaped children's, by pid, read from /proc."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        ticks[pid] = sum(int(x) for x in fields[11:15])
    found: dict[int, int] = {}
    for pid, spent in ticks.items():
        ancestor = parents.get(pid, 0)
        while ancestor > 1 and ancestor != root_pid:
            ancestor = parents.get(ancestor, 0)
        if ancestor == root_pid:
            found[pid] = spent
    return found


def measure_all(fn: Callable[..., Any], *args: Any) -> tuple[float, float, float]:
    """Wall seconds, this process's CPU seconds (local_sweep's ``measure``), and the CPU
    seconds of everything the round ran: this process, the children it reaped (the
    commands; MLflow's CLI) and its other descendants (a peer's server, cluster and
    workers, with the children they reaped)."""
    me = os.getpid()
    children0, helpers0 = resource.getrusage(resource.RUSAGE_CHILDREN), _descendant_ticks(me)
    wall, cpu = measure(fn, *args)
    children1, helpers1 = resource.getrusage(resource.RUSAGE_CHILDREN), _descendant_ticks(me)
    reaped = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    helpers = sum(t - helpers0.get(pid, 0) for pid, t in helpers1.items())
    return wall, cpu, cpu + reaped + helpers / os.sysconf("SC_CLK_TCK")


def worker(name: str, sizes: list[int], reps: int) -> None:
    """Set the peer up, then print one JSON line per repetition (see main)."""
    with tempfile.TemporaryDirectory(prefix=f"peers-{name}-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        try:
            label, run, close = SETUPS[name](root)
            asyncio.run(lean_floor(2))  # warm up bash and python
            run(1)
        except Exception as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
            return
        print(json.dumps({"label": label, "setup_s": time.perf_counter() - started}), flush=True)
        try:
            for n in sizes:
                for _ in range(reps):
                    floor_s, _ = measure(lean_floor, n)
                    wall, cpu, total = measure_all(run, n)
                    row = {"n": n, "floor_s": floor_s, "wall_s": wall, "cpu_s": cpu}
                    print(json.dumps({**row, "total_s": total}), flush=True)
        finally:
            close()


# -- the driver ------------------------------------------------------------------------------


def _python_for(name: str, given: str | None) -> tuple[str | None, str]:
    """The Python to run a peer with, or None and why it is skipped."""
    given = given or os.environ.get(f"AIOPROJ_BENCH_{name.upper()}_PYTHON")
    if given:
        if not os.access(given, os.X_OK):
            return None, f"{given} is not an executable Python (see the docstring for the venv)"
        return given, ""
    if importlib.util.find_spec(name) is not None:
        return sys.executable, ""
    return None, (
        f"{name} is not importable here and no --{name}-python was given "
        "(see this script's docstring for its venv)"
    )


def _mlflow_memory_check(n: int) -> str:
    """Why MLflow cannot run N at once on this machine, or ''."""
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    available_mb = int(info["MemAvailable"].split()[0]) // 1024
    needed_mb = n * MLFLOW_MB_PER_RUN
    if needed_mb <= 0.6 * available_mb:
        return ""
    return (
        f"N={n} concurrent `mlflow run` processes project to {needed_mb / 1024:.1f} GiB"
        f" (~{MLFLOW_MB_PER_RUN} MB each) against {available_mb / 1024:.1f} GiB available"
    )


def _peer_rows(name: str, python: str, sizes: list[int], reps: int) -> Iterator[dict[str, Any]]:
    """Run the peer's worker; yield its JSON lines (an ``error`` line if it failed)."""
    argv = [python, str(HERE / "peers.py"), "--worker", name, "--reps", str(reps)]
    for n in sizes:
        argv += ["-n", str(n)]
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors, text=True
        )
        assert proc.stdout is not None
        got_any = False
        for line in proc.stdout:
            if line.startswith("{"):
                got_any = True
                yield json.loads(line)
        code = proc.wait()
        if code != 0 or not got_any:
            errors.seek(0)
            tail = " ".join(errors.read().strip().splitlines()[-3:])
            yield {"error": f"worker exited {code}: {tail[-400:]}"}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, action="append", help="runs per round (repeatable)")
    parser.add_argument("--reps", type=int, default=3)
    for name in PEERS:
        parser.add_argument(f"--{name}-python", metavar="PATH", help=f"the venv with {name}")
    parser.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = args.n or [50, 200]
    if args.worker:
        worker(args.worker, sizes, args.reps)
        return

    pythons: dict[str, str] = {}
    for name in PEERS:
        python, reason = _python_for(name, getattr(args, f"{name}_python"))
        if python is None:
            print(f"{name}: skipped: {reason}")
        else:
            pythons[name] = python
    if not pythons:
        return
    import aioproj  # noqa: F401  (imported once, outside the timings)

    print(f"load average before: {_load()}", flush=True)
    # (n, runner) -> lists of wall, ratio, driver and total CPU ms/run; or a skip reason.
    cells: dict[tuple[int, str], dict[str, list[float]]] = {}
    skipped: dict[tuple[int, str], str] = {}
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        root = Path(tmp)
        project = _make_project(root)
        asyncio.run(lean_floor(2))
        measure(with_aioproj, 1, project, (root / "first").as_uri())  # one-off imports
        for n in sizes:
            for rep in range(args.reps):
                floor = measure_all(lean_floor, n)
                store = (root / f"mlruns-{n}-{rep}").as_uri()
                ours = measure_all(with_aioproj, n, project, store)
                for label, (wall, cpu, total) in (("lean floor", floor), ("aioproj", ours)):
                    cell = cells.setdefault((n, label), {})
                    for key, value in (
                        ("wall", wall), ("ratio", wall / floor[0]), ("cpu", cpu / n),
                        ("total", total / n),
                    ):  # fmt: skip
                        cell.setdefault(key, []).append(value)
        print(f"load average after aioproj: {_load()}", flush=True)

    for name, python in pythons.items():
        peer_sizes = sizes
        if name == "mlflow":
            peer_sizes = []
            for n in sizes:
                reason = _mlflow_memory_check(n)
                if reason:
                    skipped[(n, name)] = reason
                else:
                    peer_sizes.append(n)
            if not peer_sizes:
                continue
        label = name
        for row in _peer_rows(name, python, peer_sizes, args.reps):
            if "error" in row:
                for n in peer_sizes:
                    skipped.setdefault((n, label), row["error"])
                print(f"{name}: failed or not importable in {python}: {row['error']}")
                break
            if "label" in row:
                label = row["label"]
                print(f"{label}: one-off setup (import, server or cluster, first run):"
                      f" {row['setup_s']:.1f} s", flush=True)  # fmt: skip
                continue
            n = row["n"]
            cell = cells.setdefault((n, label), {})
            for key, value in (
                ("wall", row["wall_s"]), ("ratio", row["wall_s"] / row["floor_s"]),
                ("cpu", row["cpu_s"] / n), ("total", row["total_s"] / n),
            ):  # fmt: skip
                cell.setdefault(key, []).append(value)
        print(f"load average after {label}: {_load()}", flush=True)

    print("N | runner | wall s | wall / lean floor | driver CPU ms/run | all processes CPU ms/run")
    for n in sizes:
        for (size, label), cell in cells.items():
            if size != n:
                continue
            print(
                f"{n} | {label} | {spread(cell['wall'], digits=3)} | {spread(cell['ratio'])}"
                f" | {spread(cell['cpu'], 1000)} | {spread(cell['total'], 1000)}"
            )
        for (size, label), reason in skipped.items():
            if size == n:
                print(f"{n} | {label} | skipped: {reason}")
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
