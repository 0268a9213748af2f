"""The sweep examples run as users run them: the notebook's plain-script twin (whose cells
must match the notebook's) and the Optuna ask/tell example. Their trials import mlflow,
a few seconds each, hence slow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .support import mlflow_client

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": (cwd / "mlruns").as_uri()}
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_notebook_cells_match_the_script_twin() -> None:
    notebook = json.loads((EXAMPLES / "sweep_notebook.ipynb").read_text())
    code = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    twin = (EXAMPLES / "sweep_notebook.py").read_text()
    cells = re.findall(r"    # --- cell: \w+ ---\n(.*?)(?=    # --- (?:cell|end))", twin, re.S)
    assert len(cells) == len(code)
    for script_cell, notebook_cell in zip(cells, code, strict=True):
        body = textwrap.dedent(script_cell).strip()
        # The notebook's first cell adds its imports and HERE; the rest is the same code.
        for line in body.splitlines():
            assert line in notebook_cell.splitlines(), line
    assert "await sweep" in code[0]  # top-level await, on the kernel's event loop


@pytest.mark.slow
def test_notebook_twin_runs(tmp_path: Path) -> None:
    done = _run(EXAMPLES / "sweep_notebook.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Sweep FINISHED" in done.stdout
    assert re.search(r"best alpha=0\.6 loss=0\.0\d+ run [0-9a-f]{32}", done.stdout)
    assert "parent run" in done.stdout
    assert "trial 0 FINISHED" in done.stdout
    assert "trial 1 FINISHED" in done.stdout
    client = mlflow_client((tmp_path / "mlruns").as_uri())
    runs = client.search_runs(["0"])
    assert len(runs) == 2 + 3 + 2  # two parents, five trials
    assert {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow
def test_optuna_example_tunes_with_ask_and_tell(tmp_path: Path) -> None:
    done = _run(EXAMPLES / "optuna_sweep.py", "--trials", "4", "--parallel", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    match = re.search(r"Optuna's best: alpha=([\d.]+) loss=([\d.]+)", done.stdout)
    assert match is not None, done.stdout
    assert "Optuna trials: {" in done.stdout
    client = mlflow_client((tmp_path / "mlruns").as_uri())
    runs = client.search_runs(["0"])
    [parent] = [r for r in runs if r.info.run_name == "optuna-hello"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    best = min(
        (r for r in children if r.info.status == "FINISHED"), key=lambda r: r.data.metrics["loss"]
    )
    assert float(match.group(2)) == pytest.approx(best.data.metrics["loss"], rel=1e-4)
    for run in children:
        if run.info.status == "KILLED":  # pruned by the study's MedianPruner
            assert run.data.tags["aioproj.sweep.pruned"].startswith("Optuna MedianPruner")
