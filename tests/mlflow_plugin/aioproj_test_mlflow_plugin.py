"""A small, real MLflow project backend plugin for aioproj's tests.

It is what a third-party plugin (mlflow-slurm, mlflow-yarn...) looks like: an
``AbstractBackend`` registered in the ``mlflow.project_backend`` entry-point group, whose
``run`` uses MLflow's public helpers to fetch the project and create the tracking run,
then starts the entry point (here as a local process group) and returns a
``SubmittedRun``. tests/test_mlflow_plugins.py packs it into a wheel and pip-installs it.

When the backend config has ``record_to``, ``run`` writes the arguments it received
there (as JSON) for the tests to check.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any

from mlflow.projects.backend.abstract_backend import AbstractBackend
from mlflow.projects.submitted_run import SubmittedRun
from mlflow.projects.utils import (
    fetch_and_validate_project,
    get_entry_point_command,
    get_or_create_run,
    get_run_env_vars,
    load_project,
)


class ShellSubmittedRun(SubmittedRun):
    """The entry point's ``bash -c`` process group."""

    def __init__(self, run_id: str, proc: subprocess.Popen[bytes]) -> None:
        super().__init__()
        self._run_id = run_id
        self._proc = proc
        self._cancelled = False

    @property
    def run_id(self) -> str:
        return self._run_id

    def wait(self) -> bool:
        return self._proc.wait() == 0

    def get_status(self) -> str:
        code = self._proc.poll()
        if code is None:
            return "RUNNING"
        if self._cancelled:
            return "KILLED"
        return "FINISHED" if code == 0 else "FAILED"

    def cancel(self) -> None:
        if self._proc.poll() is None:
            self._cancelled = True
            os.killpg(self._proc.pid, signal.SIGTERM)
            self._proc.wait()


class ShellBackend(AbstractBackend):
    """Runs the entry point as a local process group, as MLflow's local backend does."""

    def run(
        self,
        project_uri: str,
        entry_point: str,
        params: dict[str, Any],
        version: str | None,
        backend_config: dict[str, Any],
        tracking_uri: str,
        experiment_id: str,
    ) -> ShellSubmittedRun:
        import mlflow

        record_to = backend_config.get("record_to")
        work_dir = fetch_and_validate_project(project_uri, version, entry_point, params)
        run = get_or_create_run(
            None, project_uri, experiment_id, work_dir, version, entry_point, params
        )
        if record_to:
            with open(record_to, "w") as f:
                json.dump(
                    {
                        "project_uri": project_uri,
                        "entry_point": entry_point,
                        "params": params,
                        "version": version,
                        "backend_config": backend_config,
                        "tracking_uri": tracking_uri,
                        "mlflow_tracking_uri": mlflow.get_tracking_uri(),
                        "experiment_id": experiment_id,
                        "run_id": run.info.run_id,
                    },
                    f,
                )
        project = load_project(work_dir)
        storage_dir = backend_config.get("STORAGE_DIR")
        command = " ".join(get_entry_point_command(project, entry_point, params, storage_dir))
        env = {**os.environ, **get_run_env_vars(run.info.run_id, experiment_id)}
        proc = subprocess.Popen(
            ["bash", "-c", command], cwd=work_dir, env=env, start_new_session=True
        )
        return ShellSubmittedRun(run.info.run_id, proc)
