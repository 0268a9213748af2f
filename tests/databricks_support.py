"""Fixtures for the Databricks tests: a FakeDatabricks workspace and a project that logs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aioproj.backends.databricks import DatabricksBackend
from aioproj.testing.databricks import FakeDatabricks, RunScript

from .support import amake_project

#: Fast state changes: tests see runs go through every state in a fraction of a second.
FAST = RunScript(pending=0.02, terminating=0.02)
CLUSTER = {"spark_version": "15.4.x-scala2.12", "node_type_id": "i3.xlarge", "num_workers": 1}

MLPROJECT = """\
name: dbx-demo
entry_points:
  main:
    parameters:
      alpha: {type: float, default: 0.5}
      fail: {type: int, default: 0}
      sleep: {type: float, default: 0}
      track: {type: int, default: 0}
    command: "python train.py --alpha {alpha} --fail {fail} --sleep {sleep} --track {track}"
"""

# mlflow takes seconds to import: only runs that check tracking ask for it (--track 1).
TRAIN = """\
import argparse, os, sys, time

p = argparse.ArgumentParser()
p.add_argument("--alpha", type=float)
p.add_argument("--fail", type=int)
p.add_argument("--sleep", type=float)
p.add_argument("--track", type=int)
a = p.parse_args()
print("pid", os.getpid(), flush=True)
print("training with alpha", a.alpha, flush=True)
if a.track:
    import mlflow

    with mlflow.start_run():
        mlflow.log_metric("loss", a.alpha * 2, step=1)
        mlflow.set_tag("trained.on", "fake-databricks")
if a.sleep:
    time.sleep(a.sleep)
if a.fail:
    print("about to fail", file=sys.stderr, flush=True)
    sys.exit(a.fail)
print("done", flush=True)
"""


@pytest.fixture
async def ws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[FakeDatabricks]:
    """A FakeDatabricks workspace, set as DATABRICKS_HOST/TOKEN, tracking URI databricks."""
    async with FakeDatabricks(script=FAST) as workspace:
        for var in (
            "DATABRICKS_CONFIG_PROFILE",
            "DATABRICKS_CLIENT_ID",
            "DATABRICKS_CLIENT_SECRET",
        ):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / "no-databrickscfg"))
        monkeypatch.setenv("DATABRICKS_HOST", workspace.host)
        monkeypatch.setenv("DATABRICKS_TOKEN", workspace.token)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "databricks")
        yield workspace


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Databricks credentials in the environment; DATABRICKS_CONFIG_FILE is the
    returned path (not created)."""
    for var in (
        "DATABRICKS_HOST",
        "DATABRICKS_TOKEN",
        "DATABRICKS_CLIENT_ID",
        "DATABRICKS_CLIENT_SECRET",
        "DATABRICKS_CONFIG_PROFILE",
    ):
        monkeypatch.delenv(var, raising=False)
    cfg = tmp_path / "databrickscfg"
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(cfg))
    return cfg


@pytest.fixture
async def project(tmp_path: Path) -> Path:
    return await amake_project(tmp_path / "proj", MLPROJECT, {"train.py": TRAIN})


def fast_backend(**kwargs: object) -> DatabricksBackend:
    """A backend that polls every 0.05-0.2 s (the default starts at 1 s)."""
    return DatabricksBackend(poll_interval=(0.05, 0.2), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def backend() -> AsyncIterator[DatabricksBackend]:
    """A fast-polling backend instance, closed after the test (runners close only the
    backends they load by name)."""
    instance = fast_backend()
    try:
        yield instance
    finally:
        await instance.aclose()
