"""docker_env projects on a real Docker daemon (see tests/docker_daemon.py)."""

from __future__ import annotations

import pytest

from .docker_daemon import BASE_IMAGE, MLFLOW_IMAGE, DockerDaemon

# The session fixture may install packages and build images first (minutes on a fresh
# machine, once): the per-test timeout counts the test itself only.
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120, func_only=True)]


def test_the_images_run_python_and_mlflow(docker_daemon: DockerDaemon) -> None:
    import subprocess

    out = subprocess.run(
        [
            docker_daemon.docker,
            "run",
            "--rm",
            MLFLOW_IMAGE,
            "python",
            "-c",
            "import mlflow, sqlalchemy; print(mlflow.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip()
    out = subprocess.run(
        [docker_daemon.docker, "run", "--rm", BASE_IMAGE, "python", "-c", "print(6*7)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "42"
