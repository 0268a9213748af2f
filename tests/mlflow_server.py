"""A real ``mlflow server`` for tests: sqlite backend, proxied artifacts, a free port.

Started in its own process group and stopped with the whole group (uvicorn workers
included). The server's job runner (huey consumers) is switched off: tests do not use
it and it costs seconds at start-up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .support import download_artifact

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MlflowServer:
    """``mlflow server`` on ``host`` (127.0.0.1 unless given); ``uri`` is its tracking URI
    once :meth:`start` returns."""

    def __init__(self, root: Path, host: str = "127.0.0.1") -> None:
        self.root = root
        self.host = host
        self.port = free_port()
        self.uri = f"http://{host}:{self.port}"
        self.log_path = root / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait for ``GET /health``; RuntimeError with its log if not."""
        self.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        args = [
            MLFLOW, "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", self.host,
            "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                args,
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"mlflow server did not start:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds, reap the leader."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        # Workers may outlive the leader: kill whatever is left of the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)


# --- one end-to-end run, the same for every store -------------------------------------------

TRACKED_MLPROJECT = """\
name: tracked
entry_points:
  main:
    parameters:
      alpha: {type: float, default: 0.1}
      words: {type: string, default: "two words"}
    command: "python track.py {alpha}"
"""

TRACKED_PY = """\
import os
import sys

import mlflow

expected = os.environ["MLFLOW_RUN_ID"]  # start_run() consumes it
with mlflow.start_run() as run:
    assert run.info.run_id == expected, "not the run aioproj created"
    mlflow.log_metric("score", float(sys.argv[1]) * 2)
    mlflow.set_tag("from_child", "yes")
print("logged")
"""


def write_tracked_project(root: Path) -> Path:
    """A project whose code logs a metric with mlflow into the run aioproj created."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "MLproject").write_text(TRACKED_MLPROJECT)
    (root / "track.py").write_text(TRACKED_PY)
    return root


def read_back(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """The run as MlflowClient sees it, with the fields that do not depend on the store.

    Blocking: call it in a worker thread.
    """
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    tags = dict(run.data.tags)
    output = download_artifact(client, run_id, "aioproj/output.log")
    return {
        "status": run.info.status,
        "run_name": run.info.run_name,
        "lifecycle_stage": run.info.lifecycle_stage,
        "ended_after_start": run.info.end_time is not None
        and run.info.end_time >= run.info.start_time,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": {k: v for k, v in tags.items() if k not in _STORE_DEPENDENT_TAGS},
        "output": output.decode(),
    }


# Tags MLflow's client or server add by themselves, which differ by store and process.
_STORE_DEPENDENT_TAGS = frozenset({"mlflow.source.name", "mlflow.user"})
