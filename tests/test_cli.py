"""The ``aioproj run`` command, as a user runs it: a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .support import make_project, mlflow_client, process_gone

MLPROJECT = """
entry_points:
  main:
    parameters:
      x: {type: string, default: "0"}
    command: "echo x={x}"
  fail:
    command: "exit 4"
"""


@pytest.fixture(autouse=True)
def file_store_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs go to ./mlruns of the test's directory (with no URI set, the installed
    MLflow's default would be ./mlflow.db, which tests/test_tracking_default_uri.py
    covers)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj", MLPROJECT)


def aioproj_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "aioproj", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_run_records_params_and_prints_output(project: Path, tmp_path: Path) -> None:
    done = aioproj_cli(
        "run",
        str(project),
        "-P",
        "x=a=b",
        "--env-manager",
        "local",
        "--experiment-name",
        "cli",
        "--run-name",
        "named",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "x=a=b" in done.stdout
    client = mlflow_client((tmp_path / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert run.data.params == {"x": "a=b"}
    assert run.info.run_name == "named"
    assert run.info.status == "FINISHED"
    assert f"Run (ID '{run.info.run_id}') succeeded" in done.stderr


def test_failed_run_exits_one(project: Path, tmp_path: Path) -> None:
    done = aioproj_cli("run", str(project), "-e", "fail", "--env-manager", "local", cwd=tmp_path)
    assert done.returncode == 1
    assert "failed ===" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-P", "x=1", "-P", "x=2"], "Repeated parameter: 'x'"),
        (["-P", "novalue"], "Invalid format for -P parameter: 'novalue'. Use -P name=value."),
        (["-A", "gpus=all", "-A", "gpus=none"], "Repeated parameter: 'gpus'"),
        (
            ["--experiment-name", "a", "--experiment-id", "1"],
            "Specify only one of 'experiment-name' or 'experiment-id' options.",
        ),
        (["-b", "databricks", "-c", "{not json"], "Invalid backend config JSON. Parse error"),
        (["--env-manager", "pipenv"], "invalid choice: 'pipenv'"),
        (["-b", "kubernetes"], "Specify 'backend_config' when using kubernetes mode."),
    ],
)
def test_usage_errors_exit_two(
    project: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    done = aioproj_cli("run", str(project), *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "mlruns").exists() or not any(
        (tmp_path / "mlruns").glob("*/*/meta.yaml")
    )


def test_experiment_name_from_environment(project: Path, tmp_path: Path) -> None:
    done = aioproj_cli(
        "run",
        str(project),
        "--env-manager",
        "local",
        cwd=tmp_path,
        env={"MLFLOW_EXPERIMENT_NAME": "from-env"},
    )
    assert done.returncode == 0, done.stderr
    client = mlflow_client((tmp_path / "mlruns").as_uri())
    assert client.get_experiment_by_name("from-env") is not None


def test_env_file_is_loaded_without_overriding(project: Path, tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("# settings\nexport MLFLOW_EXPERIMENT_NAME='dotenv'\n")
    done = aioproj_cli(
        "--env-file", str(env_file), "run", str(project), "--env-manager", "local", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    client = mlflow_client((tmp_path / "mlruns").as_uri())
    assert client.get_experiment_by_name("dotenv") is not None


def test_backend_config_json_file_is_read(project: Path, tmp_path: Path) -> None:
    config = tmp_path / "local.json"
    config.write_text(json.dumps({"anything": 1}))
    done = aioproj_cli(
        "run", str(project), "-c", str(config), "--env-manager", "local", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr


def test_help_lists_mlflow_run_options(tmp_path: Path) -> None:
    done = aioproj_cli("run", "--help", cwd=tmp_path)
    for option in (
        "--entry-point",
        "--version",
        "--param-list",
        "--docker-args",
        "--experiment-name",
        "--experiment-id",
        "--backend",
        "--backend-config",
        "--env-manager",
        "--storage-dir",
        "--run-id",
        "--run-name",
        "--build-image",
        "--wait",
        "--no-wait",
    ):
        assert option in done.stdout


def test_no_wait_on_local_detaches_a_supervisor(tmp_path: Path) -> None:
    # The run waits for a file that only appears after the command has returned.
    go = tmp_path / "go"
    command = f"while [ ! -f {go} ]; do sleep 0.05; done; echo late"
    project = make_project(tmp_path / "slow", f"entry_points:\n  main:\n    command: '{command}'\n")
    try:
        done = aioproj_cli("run", str(project), "--no-wait", "--env-manager", "local", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        run_id = done.stdout.strip().splitlines()[-1]
        client = mlflow_client((tmp_path / "mlruns").as_uri())
        assert client.get_run(run_id).info.status == "RUNNING"
    finally:
        go.touch()  # whatever happened, let the detached run end
    for _ in range(300):
        if client.get_run(run_id).info.status != "RUNNING":
            break
        time.sleep(0.05)
    assert client.get_run(run_id).info.status == "FINISHED"
    log = client.download_artifacts(run_id, "aioproj/output.log", str(tmp_path))
    assert Path(log).read_text() == "late\n"


def test_no_wait_reports_bad_input_at_once(project: Path, tmp_path: Path) -> None:
    done = aioproj_cli(
        "run", str(project), "--no-wait", "-e", "nope", "--env-manager", "local", cwd=tmp_path
    )
    assert done.returncode == 1
    assert "Could not find nope among entry points" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-b", "nowhere"], "=== Got unsupported execution mode nowhere. Supported values:"),
        (["--experiment-id", "12345"], "No experiment with id"),
        (["-e", "nope"], "=== Could not find nope among entry points"),
    ],
)
def test_errors_from_the_run_exit_one_like_mlflow(
    project: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    done = aioproj_cli("run", str(project), "--env-manager", "local", *args, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_termination_signal_cancels_the_run_and_records_killed(
    tmp_path: Path, sig: signal.Signals
) -> None:
    pids = tmp_path / "pids"
    project = make_project(
        tmp_path / "p",
        f"entry_points:\n  main:\n    command: 'echo $$ >> {pids}; sleep 300'\n",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "aioproj", "run", str(project), "--env-manager", "local"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(400):
            if pids.exists() and pids.read_text().strip():
                break
            time.sleep(0.025)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "recorded KILLED" in err
    client = mlflow_client((tmp_path / "mlruns").as_uri())
    [run] = client.search_runs(["0"])
    assert run.info.status == "KILLED"
    assert process_gone(int(pids.read_text()))
