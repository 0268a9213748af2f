"""End to end on a real single-node Slurm (see tests/slurm_support.py): runs as batch
jobs, their logs, their ends (exit codes, cancel, time limit), bursts and their poll
rounds, sweeps as job arrays, recovery after the driver is killed, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import anyio
import anyio.to_thread
import pytest

import aioproj
from aioproj import Runner, RunStatus
from aioproj.backends.slurm import SlurmBackend
from aioproj.journal import RECOVERED_TAG

from .mlflow_server import MlflowServer
from .slurm_support import SlurmCluster, slurm  # noqa: F401  (the session fixture)
from .support import (
    all_runs,
    amake_project,
    journal_runs,
    process_gone,
    read_run,
    wait_for_file,
)

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("slurm")]

MLPROJECT = """\
name: slurm-demo
entry_points:
  main:
    parameters:
      code: {type: int, default: 0}
    command: "echo hello from $MLFLOW_RUN_ID in $(basename $PWD); echo to stderr >&2; exit {code}"
  track:
    parameters:
      alpha: {type: float, default: 0.5}
    command: "python track.py {alpha}"
  wait:
    parameters:
      flag: string
      pids: string
    command: >-
      echo $$ > {pids}; echo started;
      while [ ! -e {flag} ]; do sleep 0.05; done; echo finished
  span:
    parameters:
      alpha: {type: float, default: 0.5}
      times: string
    command: "echo start $(date +%s.%N) >> {times}; sleep 0.5; echo end $(date +%s.%N) >> {times}"
  env:
    command: "echo GREETING=$GREETING; echo UNBUFFERED=$PYTHONUNBUFFERED"
  secrets:
    parameters:
      pw_sha: string
      token_sha: string
    command: >-
      test "$(printf %s "$MLFLOW_TRACKING_PASSWORD" | sha256sum | cut -c1-64)" = {pw_sha} &&
      test "$(printf %s "$API_TOKEN" | sha256sum | cut -c1-64)" = {token_sha} &&
      echo secrets-ok
"""

TRACK = """\
import os, sys
import mlflow

alpha = float(sys.argv[1])
given = os.environ["MLFLOW_RUN_ID"]  # start_run() takes it out of the environment
with mlflow.start_run() as run:
    assert run.info.run_id == given
    mlflow.log_metric("score", alpha * 2)
print("score logged for", given, flush=True)
"""


@pytest.fixture
async def project(tmp_path: Path) -> Path:
    return await amake_project(tmp_path / "proj", MLPROJECT, {"track.py": TRACK})


@pytest.fixture
async def backend() -> AsyncIterator[SlurmBackend]:
    """A fast-polling backend (runners close only the backends they load by name)."""
    instance = SlurmBackend(poll_interval=(0.05, 0.3))
    try:
        yield instance
    finally:
        await instance.aclose()


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    return tmp_path / "shared"


def config(shared: Path, **more: Any) -> dict[str, Any]:
    return {"shared_dir": str(shared), **more}


async def slurm_state(job: str) -> str:
    """What squeue says about ``job`` now (``-t all``: ended jobs too)."""
    done = await anyio.run_process(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"])
    return done.stdout.decode().strip()


async def output_artifact(tracking_uri: str, run_id: str) -> str:
    record = await read_run(tracking_uri, run_id)
    path = Path(urlparse(record.info.artifact_uri).path) / "aioproj" / "output.log"
    return await anyio.Path(path).read_text()


async def leftovers(shared: Path) -> list[str]:
    jobs = anyio.Path(shared / "jobs")
    if not await jobs.exists():
        return []
    return [p.name async for p in jobs.iterdir()]


# -- a run, its end, its logs ---------------------------------------------------------


async def test_a_run_finishes_and_its_code_logs_into_its_own_run(
    project: Path, backend: SlurmBackend, shared: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), entry_point="track", parameters={"alpha": 0.25},
            backend=backend, backend_config=config(shared), env_manager="local",
        )  # fmt: skip
    assert await run.get_status() is RunStatus.FINISHED
    record = await read_run(tracking_uri, run.run_id)
    assert record.info.status == "FINISHED"
    assert record.data.metrics["score"] == 0.5  # logged by the job, into the same run
    tags = record.data.tags
    assert tags["mlflow.project.backend"] == "slurm"
    job = tags["slurm_job_id"]
    assert job.isdigit()
    assert tags["slurm_cluster"] == await backend.cli.cluster_name()
    assert tags["slurm_job_state"] == "COMPLETED"
    assert await slurm_state(job) == "COMPLETED"
    log = await output_artifact(tracking_uri, run.run_id)
    assert f"=== Submitted Slurm job {job} ===" in log
    assert f"score logged for {run.run_id}" in log
    assert await leftovers(shared) == []  # the run's directory goes when it has ended


async def test_a_failing_run_is_failed_with_its_exit_code(
    project: Path, backend: SlurmBackend, shared: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), parameters={"code": 3}, backend=backend,
            backend_config=config(shared), env_manager="local", synchronous=False,
        )  # fmt: skip
        assert await run is RunStatus.FAILED
        with pytest.raises(aioproj.RunFailedError, match=r"Run \(ID '.*'\) failed"):
            await runner.run(
                str(project), parameters={"code": 4}, backend=backend,
                backend_config=config(shared), env_manager="local",
            )  # fmt: skip
    job = (await read_run(tracking_uri, run.run_id)).data.tags["slurm_job_id"]
    reason = f"Slurm job {job} ended FAILED (NonZeroExitCode, exit code 3)"
    assert run.status_detail == reason
    record = await read_run(tracking_uri, run.run_id)
    assert record.info.status == "FAILED"
    assert record.data.tags["slurm_job_reason"] == reason
    assert record.data.tags["slurm_job_state"] == "FAILED"
    lines = [line async for line in run.logs()]
    assert f"hello from {run.run_id} in proj\n" in lines
    assert "to stderr\n" in lines
    assert lines[-1] == f"[aioproj] {reason}\n"
    assert await leftovers(shared) == []


async def test_logs_follow_the_job_s_output_live(
    project: Path, backend: SlurmBackend, shared: Path, tmp_path: Path, tracking_uri: str
) -> None:
    flag, pids = tmp_path / "flag", tmp_path / "pids"
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), entry_point="wait", parameters={"flag": str(flag), "pids": str(pids)},
            backend=backend, backend_config=config(shared), env_manager="local",
            synchronous=False,
        )  # fmt: skip
        seen = []
        with anyio.fail_after(30):
            async for line in run.logs():
                seen.append(line)
                if line == "started\n":
                    # Read while the job runs: it waits for the flag.
                    assert await run.get_status() is RunStatus.RUNNING
                    job = (await read_run(tracking_uri, run.run_id)).data.tags["slurm_job_id"]
                    assert await slurm_state(job) == "RUNNING"
                    script = shared / "jobs" / run.run_id / "job.sh"
                    text = await anyio.Path(script).read_text()
                    assert text.startswith("#!/bin/bash\n")
                    assert f"export MLFLOW_RUN_ID={run.run_id}" in text
                    await anyio.Path(flag).touch()
        assert await run is RunStatus.FINISHED
    assert seen[-2:] == ["started\n", "finished\n"]
    # Replayed from the start, and saved as the run's artifact.
    assert [line async for line in run.logs()] == seen
    assert (await output_artifact(tracking_uri, run.run_id)).endswith("started\nfinished\n")


async def test_template_modules_and_environment(
    project: Path, backend: SlurmBackend, shared: Path, tmp_path: Path, tracking_uri: str
) -> None:
    template = tmp_path / "template.sh"
    await anyio.Path(template).write_text(
        '#!/bin/bash\n#SBATCH --comment=from-template\nmodule() { echo "module $*"; }\n'
        "{{ modules }}\necho before the run\n{{ command }}\n"
    )
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), entry_point="env", backend=backend, env_manager="local",
            backend_config=config(
                shared, template=str(template), modules="cuda/12 cudnn",
                environment=["GREETING=hi there"],
            ),
        )  # fmt: skip
    lines = [line async for line in run.logs()]
    assert lines[1:] == [
        "module load cuda/12 cudnn\n",
        "before the run\n",
        "GREETING=hi there\n",  # through sbatch's environment, not the script
        "UNBUFFERED=1\n",
    ]


async def test_the_environment_is_built_once_in_the_shared_directory(
    tmp_path: Path,
    backend: SlurmBackend,
    shared: Path,
    tracking_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("UV_OFFLINE", "1")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    project = await amake_project(
        tmp_path / "envproj",
        """\
        name: envproj
        entry_points:
          main:
            command: "python -c 'import sys; print(\\"prefix\\", sys.prefix)'"
        """,
    )
    async with Runner(echo="off") as runner:
        runs = []
        async with anyio.create_task_group() as tg:

            async def start() -> None:
                run = await runner.run(
                    str(project), backend=backend, backend_config=config(shared),
                    env_manager="uv", synchronous=False,
                )  # fmt: skip
                runs.append(run)

            for _ in range(3):
                tg.start_soon(start)
        assert [await run for run in runs] == [RunStatus.FINISHED] * 3
    envs = [p async for p in anyio.Path(shared / "envs").glob("uv-*") if await p.is_dir()]
    assert len(envs) == 1  # one build, shared by the three runs
    for run in runs:
        lines = [line async for line in run.logs()]
        assert f"prefix {envs[0]}\n" in lines  # the job ran in it
    for record in await all_runs(tracking_uri):
        assert record.data.tags["mlflow.project.env"] == "uv"


# -- stopping ---------------------------------------------------------------------------


async def _wait_for_pid(pids: Path) -> int:
    await wait_for_file(pids, limit=30)
    return int((await anyio.Path(pids).read_text()).split()[0])


async def test_cancel_scancels_and_returns_once_the_job_has_ended(
    project: Path, backend: SlurmBackend, shared: Path, tmp_path: Path, tracking_uri: str
) -> None:
    pids = tmp_path / "pids"
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), entry_point="wait",
            parameters={"flag": str(tmp_path / "never"), "pids": str(pids)},
            backend=backend, backend_config=config(shared), env_manager="local",
            synchronous=False,
        )  # fmt: skip
        pid = await _wait_for_pid(pids)
        job = (await read_run(tracking_uri, run.run_id)).data.tags["slurm_job_id"]
        await run.cancel()
        # Returned once the job has left RUNNING: Slurm says CANCELLED, the process is gone.
        assert await slurm_state(job) == "CANCELLED"
        assert await run.get_status() is RunStatus.KILLED
        assert await anyio.to_thread.run_sync(process_gone, pid)
        assert await run is RunStatus.KILLED
        await run.cancel()  # idempotent
    record = await read_run(tracking_uri, run.run_id)
    assert record.info.status == "KILLED"
    assert record.data.tags["slurm_job_state"] == "CANCELLED"
    assert await leftovers(shared) == []


async def test_cancelling_the_caller_or_leaving_the_runner_cancels_the_jobs(
    project: Path, backend: SlurmBackend, shared: Path, tmp_path: Path, tracking_uri: str
) -> None:
    def params(name: str) -> dict[str, str]:
        return {"flag": str(tmp_path / "never"), "pids": str(tmp_path / name)}

    async with Runner(echo="off") as runner:

        async def synchronous_run() -> None:
            await runner.run(
                str(project), entry_point="wait", parameters=params("a"), backend=backend,
                backend_config=config(shared), env_manager="local",
            )  # fmt: skip

        # A synchronous run whose caller is cancelled.
        async with anyio.create_task_group() as tg:
            tg.start_soon(synchronous_run)
            await _wait_for_pid(tmp_path / "a")
            tg.cancel_scope.cancel()

    async def leave_by_an_exception() -> None:
        async with Runner(echo="off") as runner:
            for name in ("b", "c"):
                await runner.run(
                    str(project), entry_point="wait", parameters=params(name),
                    backend=backend, backend_config=config(shared), env_manager="local",
                    synchronous=False,
                )  # fmt: skip
            for name in ("b", "c"):
                await _wait_for_pid(tmp_path / name)
            raise RuntimeError("boom")

    # A runner left by an exception stops its runs.
    with pytest.raises(RuntimeError, match="boom"):
        await leave_by_an_exception()
    records = await all_runs(tracking_uri)
    assert len(records) == 3
    for record in records:
        assert record.info.status == "KILLED"
        assert await slurm_state(record.data.tags["slurm_job_id"]) == "CANCELLED"
    for name in ("a", "b", "c"):
        pid = int((await anyio.Path(tmp_path / name).read_text()).split()[0])
        assert await anyio.to_thread.run_sync(process_gone, pid)
    assert await leftovers(shared) == []


# -- many runs, one status query per round -------------------------------------------


async def test_a_burst_of_20_runs_shares_one_squeue_per_round(
    project: Path, backend: SlurmBackend, shared: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off") as runner:
        runs = []
        async with anyio.create_task_group() as tg:

            async def start() -> None:
                run = await runner.run(
                    str(project), backend=backend, backend_config=config(shared),
                    env_manager="local", synchronous=False,
                )  # fmt: skip
                runs.append(run)

            for _ in range(20):
                tg.start_soon(start)
        statuses = [await run for run in runs]
    assert statuses == [RunStatus.FINISHED] * 20
    jobs = {r.data.tags["slurm_job_id"] for r in await all_runs(tracking_uri)}
    assert len(jobs) == 20
    poller = backend.poller
    assert poller.round_commands == [1] * poller.rounds  # all ended well: squeue alone
    assert backend.cli.calls["squeue"] == poller.rounds
    assert max(poller.round_active) >= 10  # one squeue answered for many jobs
    assert await leftovers(shared) == []


SHIM = """\
#!/bin/sh
echo "$(basename "$0") $*" >> {log}
if [ "$(basename "$0")" = sbatch ]; then
    for arg; do [ -f "$arg" ] && cat "$arg" >> {log}; done
fi
exec {real} "$@"
"""


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Slurm's commands behind shims on PATH that log each call; the log's path."""
    log = tmp_path / "slurm-calls.log"
    bin_dir = tmp_path / "shims"
    bin_dir.mkdir()
    for name in ("sbatch", "squeue", "sacct", "scontrol", "scancel"):
        real = subprocess.run(["which", name], capture_output=True, text=True).stdout.strip()
        shim = bin_dir / name
        shim.write_text(SHIM.format(log=log, real=real))
        shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


async def test_status_commands_per_poll_round_do_not_grow_with_the_runs(
    project: Path, shared: Path, counted: Path, tracking_uri: str
) -> None:
    backend = SlurmBackend(poll_interval=(0.05, 0.3))
    try:
        async with Runner(echo="off") as runner:
            runs = []
            for i in range(12):
                run = await runner.run(
                    str(project), parameters={"code": 5 if i < 3 else 0}, backend=backend,
                    backend_config=config(shared), env_manager="local", synchronous=False,
                )  # fmt: skip
                runs.append(run)
            statuses = [await run for run in runs]
    finally:
        await backend.aclose()
    assert statuses.count(RunStatus.FAILED) == 3
    assert statuses.count(RunStatus.FINISHED) == 9
    calls = (await anyio.Path(counted).read_text()).splitlines()
    status_calls = [c for c in calls if c.split()[0] in ("squeue", "sacct") or "show job" in c]
    poller = backend.poller
    # The shims saw exactly what the poller counted: one squeue per round, and one more
    # command (the exit codes of the failed jobs) only in the rounds where jobs failed.
    assert sum(poller.round_commands) == len(status_calls)
    assert [c for c in calls if c.startswith("squeue")] == [
        "squeue --me -h -t all -r -o %i|%A|%T|%r"
    ] * poller.rounds
    # The first lookup also finds out how this cluster keeps accounts (here: no slurmdbd,
    # so `sacct` fails and `sacct -c` answers), once per backend.
    assert all(n in (1, 2, 3) for n in poller.round_commands), poller.round_commands
    assert sum(n - 1 for n in poller.round_commands) <= 3 + 1
    # One per job per round would have cost this many.
    assert sum(poller.round_active) >= 2 * len(status_calls)


async def test_credentials_reach_the_job_through_sbatch_s_environment_only(
    project: Path,
    shared: Path,
    counted: Path,
    mlflow_server: MlflowServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    password, token = f"pw-{uuid.uuid4().hex}", f"tok-{uuid.uuid4().hex}"
    host = mlflow_server.uri.removeprefix("http://")
    uri = f"http://user:{password}@{host}"

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    backend = SlurmBackend(poll_interval=(0.05, 0.3))
    settings = config(shared, environment={"API_TOKEN": token})
    try:
        async with Runner(tracking_uri=uri, echo="off") as runner:
            run = await runner.run(
                str(project), entry_point="secrets", backend=backend, env_manager="local",
                parameters={"pw_sha": sha(password), "token_sha": sha(token)},
                backend_config=settings,
            )  # fmt: skip
            with pytest.raises(aioproj.BackendError) as refused:
                await runner.run(
                    str(project), backend=backend, env_manager="local",
                    backend_config={**settings, "partition": "no-such-partition"},
                )  # fmt: skip
            surfaces = {
                "logs": "".join([line async for line in run.logs()]),
                "error": str(refused.value),
                "reprs": repr((run, run._execution, backend)),
            }
    finally:
        await backend.aclose()
    assert "secrets-ok\n" in surfaces["logs"]  # the job got both, byte for byte
    record = await read_run(mlflow_server.uri, run.run_id)
    surfaces["tags and params"] = json.dumps([record.data.tags, record.data.params])
    surfaces["commands and scripts"] = await anyio.Path(counted).read_text()
    assert "sbatch --parsable" in surfaces["commands and scripts"]
    assert f"export MLFLOW_RUN_ID={run.run_id}" in surfaces["commands and scripts"]
    surfaces["log records"] = caplog.text
    for name, text in surfaces.items():
        assert password not in text, name
        assert token not in text, name


# -- sweeps -----------------------------------------------------------------------------


async def test_a_sweep_goes_out_as_one_job_array(
    project: Path, backend: SlurmBackend, shared: Path, tmp_path: Path, tracking_uri: str
) -> None:
    times = tmp_path / "times"
    alphas = [0.1, 0.2, 0.3, 0.4, 0.5]
    async with Runner(echo="off") as runner:
        sweep = aioproj.sweep(
            str(project), {"alpha": alphas, "times": str(times)}, entry_point="span",
            max_parallel=2, runner=runner, backend=backend, backend_config=config(shared),
            env_manager="local", retries=0,
        )  # fmt: skip
        results = await sweep
    assert [r.status for r in results] == [RunStatus.FINISHED] * 5
    records = {r.info.run_id: r for r in await all_runs(tracking_uri)}
    children = [records[r.run_id] for r in results if r.run_id is not None]
    assert {float(c.data.params["alpha"]) for c in children} == set(alphas)
    jobs = [c.data.tags["slurm_job_id"] for c in children]
    array = {job.split("_")[0] for job in jobs}
    assert len(array) == 1  # one sbatch --array for the whole sweep
    assert sorted(int(job.split("_")[1]) for job in jobs) == [0, 1, 2, 3, 4]
    assert all(c.data.tags["mlflow.parentRunId"] == sweep.parent_run_id for c in children)
    assert backend.cli.calls["sbatch"] == 2  # the --test-only check, then the array
    # %2: never more than two tasks ran at once.
    events = []
    for line in (await anyio.Path(times).read_text()).splitlines():
        kind, at = line.split()
        events.append((float(at), 1 if kind == "start" else -1))
    running = peak = 0
    for _, step in sorted(events):
        running += step
        peak = max(peak, running)
    assert peak == 2
    assert await leftovers(shared) == []


async def test_adaptive_sweeps_send_one_job_per_trial(
    project: Path, backend: SlurmBackend, shared: Path, tracking_uri: str
) -> None:
    class Halving:
        def ask(self, index: int) -> dict[str, Any] | None:
            return {"code": 0} if index < 3 else None

        def tell(self, result: Any) -> None:
            pass

    async with Runner(echo="off") as runner:
        results = await aioproj.sweep(
            str(project), tuner=Halving(), max_parallel=2, runner=runner, backend=backend,
            backend_config=config(shared), env_manager="local",
        )  # fmt: skip
    assert [r.status for r in results] == [RunStatus.FINISHED] * 3
    jobs = {
        r.data.tags["slurm_job_id"]
        for r in await all_runs(tracking_uri)
        if "slurm_job_id" in r.data.tags
    }
    assert len(jobs) == 3
    assert all(job.isdigit() for job in jobs)


# -- the command line -------------------------------------------------------------------


async def _aioproj(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "aioproj", *args]
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run(argv, capture_output=True, text=True, timeout=60)
    )


async def test_the_cli_runs_and_sweeps_on_slurm(
    project: Path, shared: Path, tmp_path: Path, tracking_uri: str
) -> None:
    config_file = tmp_path / "slurm.json"
    await anyio.Path(config_file).write_text(json.dumps(config(shared)))
    common = ["-b", "slurm", "-c", str(config_file), "--env-manager", "local"]
    # `aioproj run -b slurm` waits for the job (as for local and kubernetes) and prints it.
    done = await _aioproj("run", *common, "-P", "code=0", str(project))
    assert done.returncode == 0, done.stderr
    assert "hello from" in done.stdout
    swept = await _aioproj(
        "sweep", *common, "-P", "code=0,0,0", "--max-parallel", "2", "--progress", "lines",
        str(project),
    )  # fmt: skip
    assert swept.returncode == 0, swept.stderr
    records = await all_runs(tracking_uri)
    jobs = sorted(r.data.tags["slurm_job_id"] for r in records if "slurm_job_id" in r.data.tags)
    assert len(jobs) == 4
    arrays = {job.split("_")[0] for job in jobs if "_" in job}
    assert len(arrays) == 1  # the sweep's three trials: one job array
    assert await leftovers(shared) == []


# -- the driver dies; aioproj recover asks Slurm --------------------------------------

DRIVER = """\
import asyncio, json, sys
import aioproj

async def main():
    await aioproj.run(sys.argv[1], entry_point="wait", parameters=json.loads(sys.argv[2]),
                      backend="slurm", backend_config=json.loads(sys.argv[3]),
                      env_manager="local")

asyncio.run(main())
"""


async def test_recover_asks_slurm_how_a_killed_driver_s_job_ended(
    project: Path, shared: Path, tmp_path: Path, tracking_uri: str
) -> None:
    flag, pids = tmp_path / "flag", tmp_path / "pids"
    driver = tmp_path / "driver.py"
    await anyio.Path(driver).write_text(DRIVER)
    params = json.dumps({"flag": str(flag), "pids": str(pids)})
    proc = await anyio.open_process(
        [sys.executable, str(driver), str(project), params, json.dumps(config(shared))],
        stdout=None,
        stderr=None,
    )
    try:
        await _wait_for_pid(pids)
        with anyio.fail_after(10):
            while not any(run.started for run in await journal_runs()):  # noqa: ASYNC110
                await anyio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    (entry,) = await journal_runs()
    job = entry.state["job_id"]
    assert entry.backend == "slurm"
    assert await slurm_state(job) == "RUNNING"  # the job outlives its driver
    (still,) = await aioproj.recover()
    assert (still.status, still.action) == (None, "still running on its backend; left as is")
    await anyio.Path(flag).touch()
    with anyio.fail_after(20):
        while await slurm_state(job) != "COMPLETED":  # noqa: ASYNC110 (Slurm's state)
            await anyio.sleep(0.1)
    (done,) = await aioproj.recover()
    assert (done.run_id, done.status) == (entry.run_id, "FINISHED")
    record = await read_run(tracking_uri, entry.run_id)
    assert record.info.status == "FINISHED"
    assert "slurm run ended FINISHED" in record.data.tags[RECOVERED_TAG]
    assert await journal_runs() == []
    assert await leftovers(shared) == []


async def test_recover_finds_a_job_by_its_run_s_name_when_its_id_was_not_noted(
    backend: SlurmBackend, shared: Path, tmp_path: Path
) -> None:
    # The driver died between sbatch and noting the job id: only the intent's state.
    flag = tmp_path / "flag"
    run_id = uuid.uuid4().hex
    state = {"mlflow_run_id": run_id, "shared_dir": str(shared), "started": False}
    run_dir = shared / "jobs" / run_id
    await anyio.Path(run_dir).mkdir(parents=True)
    submitted = await anyio.run_process(
        [
            "sbatch", "--parsable", f"--job-name=mlflow-{run_id}", "--output=/dev/null",
            f"--wrap=while [ ! -e {flag} ]; do sleep 0.05; done",
        ]
    )  # fmt: skip
    job = submitted.stdout.decode().strip()
    with anyio.fail_after(20):
        while await slurm_state(job) != "RUNNING":  # noqa: ASYNC110 (Slurm's state)
            await anyio.sleep(0.05)
    assert await backend.recover(state) is None
    assert await anyio.Path(run_dir).exists()
    await anyio.Path(flag).touch()
    with anyio.fail_after(20):
        while await slurm_state(job) != "COMPLETED":  # noqa: ASYNC110 (Slurm's state)
            await anyio.sleep(0.05)
    assert await backend.recover(state) is RunStatus.FINISHED
    assert not await anyio.Path(run_dir).exists()
    # No job of that name: never submitted.
    other = {"mlflow_run_id": uuid.uuid4().hex, "shared_dir": str(shared), "started": False}
    assert await backend.recover(other) is RunStatus.FAILED


# -- bad input --------------------------------------------------------------------------


async def test_bad_config_and_an_unknown_partition_fail_before_anything_is_tracked(
    project: Path, backend: SlurmBackend, shared: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.BackendError, match=r"unknown key\(s\) \['gpu'\].*partition"):
            await runner.run(
                str(project), backend=backend, backend_config=config(shared, gpu=1),
                env_manager="local",
            )  # fmt: skip
        with pytest.raises(aioproj.BackendError) as info:
            await runner.run(
                str(project), backend=backend, env_manager="local",
                backend_config=config(shared, partition="no-such-partition"),
            )  # fmt: skip
        assert "sbatch refused the job" in str(info.value)
        assert "invalid partition specified: no-such-partition" in str(info.value)  # Slurm's
        with pytest.raises(aioproj.BackendError, match="unrecognized option '--frobnicate=1'"):
            await runner.run(
                str(project), backend=backend, env_manager="local",
                backend_config=config(shared, sbatch_args=["--frobnicate=1"]),
            )  # fmt: skip
    assert await all_runs(tracking_uri) == []
    assert await leftovers(shared) == []


async def test_no_sbatch_on_path_is_a_clear_error(
    project: Path, shared: Path, tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    backend = SlurmBackend()
    async with Runner(echo="off") as runner:
        with pytest.raises(aioproj.BackendError, match="Slurm's sbatch is not on PATH"):
            await runner.run(
                str(project), backend=backend, backend_config=config(shared),
                env_manager="local",
            )  # fmt: skip
    assert await all_runs(tracking_uri) == []


async def test_a_submission_sbatch_refuses_leaves_nothing_running(
    project: Path,
    backend: SlurmBackend,
    shared: Path,
    slurm: SlurmCluster,  # noqa: F811
    tracking_uri: str,
) -> None:
    if not slurm.started:
        pytest.skip("changes a partition: only on the cluster these tests started")
    partition = "debug"
    async with Runner(echo="off") as runner:
        # Checked once by sbatch --test-only; the next run with this config is not.
        await runner.run(
            str(project), backend=backend, backend_config=config(shared, partition=partition),
            env_manager="local",
        )  # fmt: skip
        await anyio.run_process(
            ["scontrol", "update", f"PartitionName={partition}", "State=INACTIVE"]
        )
        try:
            with pytest.raises(aioproj.BackendError) as info:
                await runner.run(
                    str(project), backend=backend, env_manager="local",
                    backend_config=config(shared, partition=partition),
                )  # fmt: skip
        finally:
            await anyio.run_process(
                ["scontrol", "update", f"PartitionName={partition}", "State=UP"]
            )
    assert "Required partition not available" in str(info.value)  # Slurm's message
    statuses = sorted(r.info.status for r in await all_runs(tracking_uri))
    assert statuses == ["FAILED", "FINISHED"]  # the refused run is not left RUNNING
    assert await leftovers(shared) == []


# -- the time limit (last: its run started with the module, Slurm's limits take a minute) --

TIMEOUT_DRIVER = """\
import asyncio, json, sys
import aioproj
from aioproj.backends.slurm import SlurmBackend

async def main():
    backend = SlurmBackend(poll_interval=(0.2, 1.0))
    async with aioproj.Runner(echo="off") as runner:
        run = await runner.run(sys.argv[1], entry_point="main", backend=backend,
                               backend_config=json.loads(sys.argv[2]), env_manager="local",
                               synchronous=False)
        status = await run
        lines = [line async for line in run.logs()]
    await backend.aclose()
    print(json.dumps({"run_id": run.run_id, "status": str(status),
                      "detail": run.status_detail, "lines": lines}))

asyncio.run(main())
"""


@pytest.fixture(scope="module", autouse=True)
def timed_out_run(
    slurm: SlurmCluster,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A driver whose run sleeps past its one-minute ``time`` limit, started with the
    module so that the minute (and up to 30 s until slurmctld checks limits) passes while
    the other tests run. Yields the process and its tracking URI."""
    root = tmp_path_factory.mktemp("timeout")
    project = root / "proj"
    project.mkdir()
    (project / "MLproject").write_text(
        textwrap.dedent(
            """\
            name: sleeper
            entry_points:
              main:
                command: "echo sleeping; sleep 300"
            """
        )
    )
    (root / "driver.py").write_text(TIMEOUT_DRIVER)
    uri = (root / "mlruns").as_uri()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"MLFLOW_TRACKING_URI": uri, "AIOPROJ_CACHE_DIR": str(root / "cache")})
    backend_config = json.dumps({"time": 1, "shared_dir": str(root / "shared")})
    proc = subprocess.Popen(
        [sys.executable, str(root / "driver.py"), str(project), backend_config],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, uri
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.slow
async def test_a_run_past_its_time_limit_is_failed(
    timed_out_run: tuple[subprocess.Popen[str], str],
) -> None:
    proc, uri = timed_out_run
    out, err = await anyio.to_thread.run_sync(proc.communicate, None, 110)
    assert proc.returncode == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["status"] == "FAILED"
    assert result["detail"].endswith("ended TIMEOUT (TimeLimit)")
    assert result["lines"][1] == "sleeping\n"
    assert any("DUE TO TIME LIMIT" in line for line in result["lines"])  # slurmstepd's
    record = await read_run(uri, result["run_id"])
    assert record.info.status == "FAILED"
    assert record.data.tags["slurm_job_state"] == "TIMEOUT"
