"""Run every benchmark of aioproj at one size and write benchmarks/REPORT.md.

Each script in benchmarks/ runs as its own process with the arguments of the chosen size
(scripts this file does not know run with their defaults); its output goes into the
report verbatim, next to its command, exit code and wall time. The local sweep is also
parsed into a table of runs per second versus N for aioproj, the bare subprocess floor
and, when mlflow is installed, ``mlflow.projects.run``, and plotted to
benchmarks/report-runs-per-second.png (when matplotlib, which comes with mlflow, is
importable).

    python benchmarks/report.py --size small     # a few minutes
    python benchmarks/report.py --size full      # the sizes DESIGN.md's targets name
    python benchmarks/report.py --only local_sweep --only import_time
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPORT = HERE / "REPORT.md"
PLOT = HERE / "report-runs-per-second.png"

#: Arguments per script and size; a script may run more than once (a list of arg lists).
RUNS: dict[str, dict[str, list[list[str]]]] = {
    "local_sweep": {
        "small": [["-n", "1", "-n", "20", "-n", "50", "--reps", "1"]],
        "full": [["-n", "1", "-n", "50", "-n", "200", "--reps", "3"]],
    },
    "cancel_sweep": {"small": [["-n", "50"]], "full": [["-n", "200"]]},
    "import_time": {"small": [["--reps", "5"]], "full": [["--reps", "20"]]},
    "long_sweep": {"small": [["-n", "2000", "--reps", "1"]], "full": [["--reps", "1"]]},
    "peers": {"small": [["-n", "20", "--reps", "1"]], "full": [["-n", "200", "--reps", "3"]]},
    "env_sweep": {"small": [["--runs", "5"]], "full": [["--runs", "20"]]},
    "sweep_overhead": {"small": [["-n", "20"]], "full": [["-n", "100"]]},
    "load": {"small": [["-n", "50", "--sweep", "200"]], "full": [[]]},
    "databricks_sweep": {"small": [["-n", "50"]], "full": [[]]},
    "kubernetes_sweep": {"small": [["-n", "20"]], "full": [[]]},
    "slurm_sweep": {"small": [["-n", "20", "--reps", "3"]], "full": [[]]},
    "rest_requests": {"small": [["-n", "10"]], "full": [["-n", "50"]]},
}
#: MLflow's own runs take ~3 s each: its comparison uses smaller N.
MLFLOW_RUNS = {
    "small": ["-n", "1", "-n", "5", "--reps", "1", "--mlflow"],
    "full": ["-n", "1", "-n", "10", "-n", "50", "--reps", "1", "--mlflow"],
}
TIMEOUT = {"small": 600.0, "full": 3600.0}


@dataclass
class Outcome:
    script: str
    args: list[str]
    code: int | None  # None: timed out
    seconds: float
    output: str
    rows: list[dict[str, float]] = field(default_factory=list)


def run_script(script: str, args: list[str], timeout: float) -> Outcome:
    argv = [sys.executable, str(HERE / f"{script}.py"), *args]
    print(f"$ {' '.join(['python', f'benchmarks/{script}.py', *args])}", flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        code, output = (
            done.returncode,
            done.stdout + (f"\n[stderr]\n{done.stderr}" if done.returncode and done.stderr else ""),
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        code, output = None, out + f"\n[timed out after {timeout:.0f} s]"
    seconds = time.perf_counter() - started
    print(output.rstrip() + "\n", flush=True)
    return Outcome(script, args, code, seconds, output)


_ROW = re.compile(r"^(\d+) \|")
_MLFLOW = re.compile(r"mlflow\.projects\.run N=(\d+): ([\d.]+) s")


def _median(cell: str) -> float:
    """The median of a ``median [min-max]`` cell."""
    return float(cell.split()[0])


def parse_local_sweep(output: str) -> list[dict[str, float]]:
    """Rows of local_sweep.py's table (medians): N, lean floor s, aioproj s, their ratio,
    aioproj's driver CPU ms/run, lag p99 ms, and mlflow s where it was timed."""
    rows: list[dict[str, float]] = []
    for line in output.splitlines():
        if _ROW.match(line):
            cells = [c.strip() for c in line.split("|")]
            rows.append(
                {
                    "n": float(cells[0]),
                    "floor_s": _median(cells[1]),
                    "aioproj_s": _median(cells[3]),
                    "ratio": _median(cells[4]),
                    "cpu_ms": _median(cells[6]),
                    "lag_ms": _median(cells[8]),
                }
            )
        elif match := _MLFLOW.search(line):
            for row in rows:
                if row["n"] == float(match[1]):
                    row["mlflow_s"] = float(match[2])
    return rows


def throughput_table(rows: list[dict[str, float]]) -> list[tuple[int, str, str, str]]:
    """(N, floor runs/s, aioproj runs/s, mlflow runs/s) by N, merged over invocations."""
    by_n: dict[int, dict[str, float]] = {}
    for row in rows:
        entry = by_n.setdefault(int(row["n"]), {})
        for key in ("floor_s", "aioproj_s", "mlflow_s"):
            if key in row:
                entry.setdefault(key, row[key])
    table = []
    for n, entry in sorted(by_n.items()):

        def rate(key: str, entry: dict[str, float] = entry, n: int = n) -> str:
            return f"{n / entry[key]:.1f}" if entry.get(key) else "-"

        table.append((n, rate("floor_s"), rate("aioproj_s"), rate("mlflow_s")))
    return table


def plot(table: list[tuple[int, str, str, str]], size: str) -> str:
    """Write the PNG; return a line for the report saying what happened."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (it comes with `pip install mlflow`): no plot."
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for column, label, style in ((1, "lean floor", "k--"), (2, "aioproj", "o-")):
        points = [(row[0], float(row[column])) for row in table if row[column] != "-"]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    mlflow_points = [(row[0], float(row[3])) for row in table if row[3] != "-"]
    if mlflow_points:
        ax.plot(*zip(*mlflow_points, strict=True), "s-", color="tab:red", label="mlflow")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N concurrent trivial local runs")
    ax.set_ylabel("runs per second (higher is better)")
    ax.set_title(f"Local runs per second ({size} size, {os.cpu_count()} cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT)
    plt.close(fig)
    return f"![runs per second versus N]({PLOT.name})"


def write_report(outcomes: list[Outcome], size: str, skipped: list[str]) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    has_mlflow = importlib.util.find_spec("mlflow") is not None
    lines = [
        "# aioproj benchmark report",
        "",
        f"Written by `python benchmarks/report.py --size {size}` on {now}: Python "
        f"{platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} cores. Targets are in DESIGN.md §5. Wall times on a shared "
        "machine carry the noise of whatever else runs on it; ratios measured in one "
        "process (aioproj against its floor) are the figures to compare.",
        "",
    ]
    sweep_rows = [row for o in outcomes if o.script == "local_sweep" for row in o.rows]
    if sweep_rows:
        table = throughput_table(sweep_rows)
        lines += [
            "## Runs per second",
            "",
            "N trivial local runs started at once and awaited (env manager `local`, file "
            "store), as runs per second: aioproj, the lean floor (the same commands started "
            "with `posix_spawn` and watched with loop callbacks on a pipe and a pidfd: "
            "benchmarks/local_sweep.py) and `mlflow.projects.run(synchronous=False)`"
            + ("" if has_mlflow else " (not installed here)")
            + ".",
            "",
            "| N | floor runs/s | aioproj runs/s | mlflow runs/s |",
            "|---:|---:|---:|---:|",
            *(f"| {n} | {f} | {a} | {m} |" for n, f, a, m in table),
            "",
            "| N | aioproj / lean floor wall time | driver CPU ms/run | loop lag p99 ms"
            " | mlflow / aioproj wall time |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in sorted(sweep_rows, key=lambda r: (r["n"], "mlflow_s" in r)):
            versus = f"{row['mlflow_s'] / row['aioproj_s']:.0f}x" if "mlflow_s" in row else "-"
            n, ratio, cpu, lag = int(row["n"]), row["ratio"], row["cpu_ms"], row["lag_ms"]
            lines.append(f"| {n} | {ratio:.2f} | {cpu:.2f} | {lag:.1f} | {versus} |")
        lines += ["", plot(table, size), ""]
    lines += ["## Every benchmark", "", "| script | arguments | exit | wall s |"]
    lines.append("|---|---|---:|---:|")
    for o in outcomes:
        code = "timeout" if o.code is None else str(o.code)
        shown = " ".join(o.args) or "(defaults)"
        lines.append(f"| {o.script} | `{shown}` | {code} | {o.seconds:.1f} |")
    if skipped:
        lines += ["", "Not run at this size: " + ", ".join(skipped) + "."]
    for o in outcomes:
        lines += [
            "",
            f"### {o.script}",
            "",
            f"`python benchmarks/{o.script}.py {' '.join(o.args)}`".replace(" `", "`"),
            "",
            "```",
            o.output.strip("\n") or "(no output)",
            "```",
        ]
    REPORT.write_text("\n".join(lines) + "\n")


def _is_script(path: Path) -> bool:
    """A benchmark is a script (helpers imported by benchmarks are not run)."""
    return 'if __name__ == "__main__":' in path.read_text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("small", "full"), default="small")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="Run only this script (repeatable)."
    )
    parser.add_argument("--no-mlflow", action="store_true", help="Skip MLflow's comparison.")
    args = parser.parse_args()
    scripts = sorted(
        p.stem
        for p in HERE.glob("*.py")
        if p.stem != "report" and not p.stem.startswith("_") and _is_script(p)
    )
    if args.only:
        unknown = set(args.only) - set(scripts)
        if unknown:
            parser.error(f"no such benchmark: {', '.join(sorted(unknown))}")
        scripts = [s for s in scripts if s in args.only]
    outcomes, skipped = [], []
    for script in scripts:
        invocations = RUNS.get(script, {}).get(args.size, [[]])
        if script in RUNS and not invocations:
            skipped.append(script)
            continue
        for script_args in invocations:
            outcome = run_script(script, script_args, TIMEOUT[args.size])
            if script == "local_sweep":
                outcome.rows = parse_local_sweep(outcome.output)
            outcomes.append(outcome)
        if (
            script == "local_sweep"
            and not args.no_mlflow
            and importlib.util.find_spec("mlflow") is not None
        ):
            outcome = run_script(script, MLFLOW_RUNS[args.size], TIMEOUT[args.size])
            outcome.rows = parse_local_sweep(outcome.output)
            outcomes.append(outcome)
    write_report(outcomes, args.size, skipped)
    print(f"wrote {REPORT}")
    return 0 if all(o.code == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
