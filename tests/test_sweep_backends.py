"""A sweep on a remote backend: Databricks runs in FakeDatabricks, tracked through the
workspace's MLflow REST API."""

# The fixtures come from databricks_support; their names are reused as parameters.
# ruff: noqa: F811

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import aioproj
from aioproj.backends.databricks import DatabricksBackend
from aioproj.testing.databricks import FakeDatabricks

from .databricks_support import CLUSTER, backend, project, ws  # noqa: F401
from .support import all_runs, process_gone

pytestmark = pytest.mark.anyio


async def test_sweep_on_databricks_records_parent_and_children(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    sweep = aioproj.sweep(
        str(project),
        {"alpha": [0.1, 0.2, 0.3], "fail": [0, 3]},
        max_parallel=3,
        backend=backend,
        backend_config={"new_cluster": CLUSTER},
        experiment_name="/Shared/sweep",
    )
    results = await sweep
    assert sorted((r.params["fail"], r.status.value) for r in results) == [
        (0, "FINISHED"),
        (0, "FINISHED"),
        (0, "FINISHED"),
        (3, "FAILED"),
        (3, "FAILED"),
        (3, "FAILED"),
    ]
    assert all(r.attempts == 1 for r in results)  # a failing project is not retried
    assert len(ws.runs) == 6
    records = {r.info.run_id: r for r in await all_runs(ws.tracking_uri)}
    parent = records.pop(sweep.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {r.run_id for r in results} == set(records)
    for record in records.values():
        assert record.data.tags["mlflow.parentRunId"] == sweep.parent_run_id
        assert record.data.tags["mlflow.project.backend"] == "databricks"


async def test_cancelled_sweep_cancels_the_databricks_runs(
    ws: FakeDatabricks, project: Path, backend: DatabricksBackend
) -> None:
    sweep = aioproj.sweep(
        str(project),
        {"alpha": [0.1, 0.2, 0.3], "sleep": 60},
        max_parallel=2,
        backend=backend,
        backend_config={"new_cluster": CLUSTER},
    )
    async with sweep:
        with anyio.fail_after(30):
            while sum(b"training" in run.logs for run in ws.runs.values()) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.02)
    assert sweep.status is aioproj.RunStatus.KILLED
    assert ws.count("POST jobs/runs/cancel") == 2
    for fake in list(ws.runs.values()):
        fake = await ws.wait_run(fake.run_id)
        assert fake.result_state == "CANCELED"
        assert fake.pid is not None
        assert process_gone(fake.pid)
    statuses = sorted(r.info.status for r in await all_runs(ws.tracking_uri))
    assert statuses == ["KILLED"] * 3  # the parent and the two trials that had started
