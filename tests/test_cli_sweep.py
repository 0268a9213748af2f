"""``aioproj sweep``, ``runs`` and ``logs`` as a user runs them: real processes, a pseudo
terminal for the live view, a pipe for the plain lines."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .mlflow_server import MlflowServer
from .support import make_project, mlflow_client, pids_in, process_gone

# Each trial prints its parameter and writes a `loss` metric into the file store.
TRAIN_PY = """\
import os, sys, urllib.parse, time
x = float(sys.argv[1])
print(f"training with x={x}", flush=True)
root = urllib.parse.urlparse(os.environ["MLFLOW_TRACKING_URI"]).path
folder = os.path.join(root, os.environ["MLFLOW_EXPERIMENT_ID"], os.environ["MLFLOW_RUN_ID"])
with open(os.path.join(folder, "metrics", "loss"), "a") as f:
    f.write(f"{int(time.time() * 1000)} {(x - 0.5) ** 2} 0\\n")
time.sleep(float(sys.argv[2]))
"""

MLPROJECT = """
entry_points:
  main:
    parameters:
      x: float
      pause: {type: float, default: 0.3}
    command: "python train.py {x} {pause}"
  fail:
    parameters:
      x: float
    command: "test {x} != 2"
  long:
    parameters:
      x: float
      pids: string
    command: "echo $$ >> {pids}; sleep 60"
  say:
    parameters:
      x: float
    command: "echo training with x={x}"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj", MLPROJECT, {"train.py": TRAIN_PY})


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        "PYTHONUNBUFFERED": "1",
    }


def aioproj_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aioproj", *args],
        cwd=cwd,
        env=_env(cwd),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_plain_output_summary_runs_and_logs(project: Path, tmp_path: Path) -> None:
    done = aioproj_cli(
        "sweep", str(project), "-P", "x=0.1,0.5,0.8", "--max-parallel", "2",
        "--metric", "loss", "--env-manager", "local", "--experiment-name", "cli-sweep",
        "--run-name", "grid", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "\x1b[" not in out  # no terminal control codes in a pipe
    finished = [line for line in out.splitlines() if "] FINISHED in " in line]
    assert len(finished) == 3
    assert any("loss=0.16" in line for line in finished)
    assert "Sweep FINISHED" in out
    assert "best loss=0 (trial 1, x=0.5)" in out
    assert "succeeded" in done.stderr

    client = mlflow_client((tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("cli-sweep")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "grid")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["x"] for r in children) == ["0.1", "0.5", "0.8"]
    assert parent.data.tags["aioproj.sweep.best_value"] == "0.0"

    listing = aioproj_cli("runs", "--experiment-name", "cli-sweep", "--json", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert {row["run_id"] for row in rows} == {r.info.run_id for r in runs}
    assert {row["parent_run_id"] for row in rows} == {None, parent.info.run_id}
    table = aioproj_cli("runs", "--experiment-name", "cli-sweep", cwd=tmp_path)
    assert table.stdout.splitlines()[0].split()[:3] == ["RUN", "ID", "STATUS"]
    assert len(table.stdout.splitlines()) == 5

    child = next(r for r in children if r.data.params["x"] == "0.8")
    logs = aioproj_cli("logs", child.info.run_id, cwd=tmp_path)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == "training with x=0.8\n"


def test_failed_trial_exits_one_and_fail_fast_skips(project: Path, tmp_path: Path) -> None:
    done = aioproj_cli(
        "sweep", str(project), "-e", "fail", "-P", "x=1,2,3", "--env-manager", "local",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1
    assert "[trial 1] FAILED" in done.stdout
    assert "had failures" in done.stderr
    done = aioproj_cli(
        "sweep", str(project), "-e", "fail", "-P", "x=2,1,3", "--max-parallel", "1",
        "--fail-fast", "--env-manager", "local", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1
    assert "2 trials were not started (fail-fast)" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-P", "x=1,,2"], "empty value"),
        (["-P", "x=uniform:0:1"], "a range needs --samples N"),
        (["-P", "x=uniform:a:1", "--samples", "2"], "two numbers"),
        (["-P", "x=loguniform:0:1", "--samples", "2"], "0 < low"),
        ([], "Give the parameters to sweep"),
        (["-P", "x=1", "--max-parallel", "0"], "--max-parallel"),
        (["-P", "x=1", "--early-stop"], "--early-stop needs --metric"),
    ],
)
def test_bad_sweep_options(project: Path, tmp_path: Path, args: list[str], message: str) -> None:
    done = aioproj_cli("sweep", str(project), *args, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "mlruns").exists()  # nothing half made


def test_logs_of_an_unknown_run(tmp_path: Path) -> None:
    (tmp_path / "mlruns").mkdir()
    done = aioproj_cli("logs", "0123abcd", cwd=tmp_path)
    assert done.returncode == 1
    assert "Run '0123abcd' not found" in done.stderr


def _spawn_in_pty(args: list[str], cwd: Path) -> tuple[subprocess.Popen[bytes], int]:
    leader, follower = pty.openpty()
    os.set_inheritable(follower, True)
    env = {**_env(cwd), "TERM": "xterm-256color", "COLUMNS": "140", "LINES": "40"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "aioproj", *args],
        cwd=cwd,
        env=env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        close_fds=True,
    )
    os.close(follower)
    return proc, leader


def _read_until(leader: int, proc: subprocess.Popen[bytes], deadline: float) -> bytes:
    """Everything the program writes to its terminal until it exits."""
    chunks = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.1)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the program exited and closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return b"".join(chunks)


def test_live_view_in_a_terminal(project: Path, tmp_path: Path) -> None:
    proc, leader = _spawn_in_pty(
        ["sweep", str(project), "-P", "x=0.1,0.5,0.9", "-P", "pause=0.6", "--max-parallel",
         "2", "--metric", "loss", "--env-manager", "local"],
        tmp_path,
    )  # fmt: skip
    try:
        screen = _read_until(leader, proc, time.monotonic() + 60).decode(errors="replace")
        assert proc.wait(timeout=30) == 0, screen
    finally:
        os.close(leader)
    assert "\x1b[?25l" in screen  # the live display hid the cursor to redraw in place
    assert "\x1b[2K" in screen  # and erased its lines to redraw them
    assert "RUNNING" in screen  # trials were shown while they ran
    assert "queued 1" in screen  # the third waited for a slot
    assert screen.count("Sweep FINISHED") == 1  # one summary: the live view's last frame
    assert "best loss=0" in screen
    assert "] FINISHED in" not in screen  # no plain lines on a terminal


def test_ctrl_c_in_a_terminal_kills_every_trial(project: Path, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    proc, leader = _spawn_in_pty(
        ["sweep", str(project), "-e", "long", "-P", "x=1,2,3,4", "-P", f"pids={pids}",
         "--max-parallel", "3", "--env-manager", "local", "--experiment-name", "stop"],
        tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (pids.exists() and len(pids_in(pids)) >= 3):
            assert time.monotonic() < deadline, "the trials never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        screen = _read_until(leader, proc, time.monotonic() + 30).decode(errors="replace")
        assert proc.wait(timeout=30) == 130, screen
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    assert "Interrupted: every trial was cancelled and recorded KILLED" in screen
    assert "Sweep KILLED" in screen
    assert "killed 3" in screen  # the summary counts the trials it stopped
    assert all(process_gone(pid) for pid in pids_in(pids))
    client = mlflow_client((tmp_path / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("stop").experiment_id])
    assert len(runs) == 4  # the parent and three trials; the fourth never started
    assert {r.info.status for r in runs} == {"KILLED"}


@pytest.mark.slow
def test_runs_and_logs_read_a_sqlite_store(project: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    missing = aioproj_cli("runs", "--tracking-uri", uri, cwd=tmp_path)
    assert missing.returncode == 1
    assert "nothing has been run here yet" in missing.stderr
    assert not (tmp_path / "mlflow.db").exists()  # reading created nothing
    done = subprocess.run(
        [sys.executable, "-m", "aioproj", "sweep", str(project), "-e", "say",
         "-P", "x=0.1,0.2", "--env-manager", "local"],
        cwd=tmp_path, env={**_env(tmp_path), "MLFLOW_TRACKING_URI": uri},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    listing = aioproj_cli("runs", "--tracking-uri", uri, "--json", cwd=tmp_path)
    rows = json.loads(listing.stdout)
    assert [row["status"] for row in rows] == ["FINISHED"] * 3
    [parent] = [row for row in rows if row["parent_run_id"] is None]
    trial = next(row for row in rows if row["parent_run_id"] == parent["run_id"])
    logs = aioproj_cli("logs", trial["run_id"], "--tracking-uri", uri, cwd=tmp_path)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.startswith("training with x=0.")
    assert logs.stderr == ""


def test_a_sweep_whose_parent_status_is_refused_exits_1(
    project: Path, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    """Both trials finish, the server refuses the parent's final status: the sweep says
    so and exits 1; the status is kept in the journal and ``aioproj recover`` writes it."""
    from .faultproxy import FaultProxy

    with FaultProxy(mlflow_server.uri) as proxy:
        # The two trials' final writes go through; the parent's is refused.
        refused = proxy.reject("POST", "/runs/update", status=400, after=2)
        env = {**_env(tmp_path), "MLFLOW_TRACKING_URI": proxy.url}
        done = subprocess.run(
            [sys.executable, "-m", "aioproj.cli", "sweep", str(project), "-e", "say",
             "-P", "x=1,2", "--env-manager", "local", "--progress", "lines",
             "--experiment-name", f"refused-{os.getpid()}-{time.time_ns()}"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert refused.is_set()
        assert done.returncode == 1, done.stderr
        assert "its parent run's final status could not be recorded" in done.stderr
        assert "aioproj recover" in done.stderr
        parent = done.stderr.split("parent run ID '")[1].split("'")[0]
        assert mlflow_client(mlflow_server.uri).get_run(parent).info.status == "RUNNING"
        proxy.clear()
        recovered = subprocess.run(
            [sys.executable, "-m", "aioproj.cli", "recover"],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert parent in recovered.stdout
    record = mlflow_client(mlflow_server.uri).get_run(parent)
    assert record.info.status == "FINISHED"
