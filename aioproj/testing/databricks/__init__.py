"""FakeDatabricks: an emulated Databricks workspace for tests (Jobs runs, DBFS, MLflow).

::

    from aioproj.testing.databricks import FakeDatabricks

    async with FakeDatabricks() as ws:
        os.environ["DATABRICKS_HOST"], os.environ["DATABRICKS_TOKEN"] = ws.host, ws.token
        ...

It is an aiohttp server on 127.0.0.1 that speaks the Jobs API 2.0/2.1/2.2 (runs submit,
get, list, cancel, get-output, delete), the DBFS API 2.0 and the MLflow tracking REST API
closely enough that the official databricks-sdk and MLflow work against it unchanged.
Submitted ``spark_python_task`` runs execute for real as local subprocesses. From a
shell: ``python -m aioproj.testing.databricks [--port N] [--token T]``.
"""

from __future__ import annotations

from ._jobs import FakeRun, RunScript
from ._server import FakeDatabricks, Fault

__all__ = ["FakeDatabricks", "FakeRun", "Fault", "RunScript"]
