"""20 concurrent runs of one python_env project (current Python, ``six==1.16.0``):
cold (empty environment root) and warm, with aioproj's virtualenv and uv managers, and
with ``--mlflow`` MLflow's ``mlflow.projects.run(..., env_manager="virtualenv")``.

    /work/venv/bin/python benchmarks/env_sweep.py [--runs 20] [--mlflow]

Everything (tracking store, environment roots) lives in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path

CURRENT = f"{sys.version_info.major}.{sys.version_info.minor}"
MLPROJECT = """
name: envsweep
python_env: python_env.yaml
entry_points:
  main:
    command: "python -c 'import six; print(six.__version__)'"
"""


def make_project(root: Path, python: str = CURRENT) -> Path:
    root.mkdir(parents=True)
    (root / "MLproject").write_text(textwrap.dedent(MLPROJECT))
    (root / "python_env.yaml").write_text(f'python: "{python}"\ndependencies:\n  - six==1.16.0\n')
    return root


async def aioproj_sweep(project: Path, cache: Path, manager: str, runs: int) -> tuple[float, int]:
    """Seconds for ``runs`` concurrent runs (submitted at once, then awaited); failures."""
    from aioproj import Runner

    started = time.perf_counter()
    async with Runner(cache_dir=cache, echo="off") as runner:
        handles = await asyncio.gather(
            *(runner.run(str(project), env_manager=manager, synchronous=False) for _ in range(runs))
        )
        results = await asyncio.gather(*(h.wait() for h in handles))
    return time.perf_counter() - started, sum(not ok for ok in results)


def mlflow_sweep(project: Path, runs: int) -> tuple[float, int]:
    import mlflow.projects

    started = time.perf_counter()
    submitted = [
        mlflow.projects.run(
            str(project), parameters={}, env_manager="virtualenv", synchronous=False
        )
        for _ in range(runs)
    ]
    results = [run.wait() for run in submitted]
    return time.perf_counter() - started, sum(not ok for ok in results)


def env_dirs(root: Path) -> int:
    return sum(1 for p in root.iterdir() if p.is_dir()) if root.is_dir() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--mlflow", action="store_true", help="Also time MLflow.")
    args = parser.parse_args()

    rows: list[tuple[str, str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="env-sweep-") as tmp:
        base = Path(tmp)
        project = make_project(base / "project")
        os.environ["MLFLOW_TRACKING_URI"] = (base / "mlruns").as_uri()
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        os.environ.pop("MLFLOW_ENV_ROOT", None)
        for manager in ("virtualenv", "uv"):
            cache = base / f"aioproj-{manager}"
            for phase in ("cold", "warm"):
                seconds, failed = asyncio.run(aioproj_sweep(project, cache, manager, args.runs))
                built = env_dirs(cache / "envs")
                rows.append(
                    (f"aioproj {manager}", phase, f"{seconds:.2f}", str(failed), str(built))
                )
        if args.mlflow:
            env_root = base / "mlflow-envs"
            os.environ["MLFLOW_ENV_ROOT"] = str(env_root)
            # MLflow re-executes its `mlflow` CLI: this interpreter's bin dir first on PATH.
            bindir = os.path.dirname(sys.executable)
            os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
            # MLflow resolves "3.11" to the newest 3.11 release and asks pyenv to download
            # it; if that fails, retry with the exact running version (pyenv may have it).
            exact = ".".join(str(n) for n in sys.version_info[:3])
            attempts = [("", project), (f" (python {exact})", make_project(base / "p2", exact))]
            for label, mlflow_project in attempts:
                ok = True
                for phase in ("cold", "warm"):
                    try:
                        seconds, failed = mlflow_sweep(mlflow_project, args.runs)
                    except Exception as exc:
                        traceback.print_exc()
                        print(f"MLflow{label} {phase} sweep failed: {exc}", file=sys.stderr)
                        rows.append((f"mlflow virtualenv{label}", phase, "-", "error", "-"))
                        ok = False
                        break
                    built = sum(1 for p in env_root.glob("mlflow-*") if p.is_dir())
                    rows.append(
                        (
                            f"mlflow virtualenv{label}",
                            phase,
                            f"{seconds:.2f}",
                            str(failed),
                            str(built),
                        )
                    )
                if ok:
                    break

    header = ("runner", "phase", f"{args.runs} runs (s)", "failed", "env dirs")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    print(f"Python {sys.version.split()[0]}, one dependency (six==1.16.0)")
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
