"""End to end on the local backend: real processes, real file store, read back by MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import aioproj
from aioproj import Runner, RunStatus

from .support import (
    PYTHON,
    all_runs,
    amake_project,
    make_project,
    mlflow_client,
    pids_in,
    process_gone,
    read_run,
)

pytestmark = pytest.mark.anyio

MLPROJECT = """
name: demo
entry_points:
  main:
    parameters:
      alpha: {type: float, default: 0.1}
      words: {type: string, default: "two words"}
    command: "echo alpha={alpha} words={words}"
  fail:
    command: "echo about to fail; exit 3"
  sleep:
    parameters:
      seconds: float
    command: "sleep {seconds}"
  track:
    parameters:
      python: string
      value: {type: float, default: 2.5}
    command: "{python} track.py {value}"
"""

TRACK_PY = """
import sys
import mlflow

with mlflow.start_run():
    mlflow.log_metric("score", float(sys.argv[1]))
    mlflow.log_param("from_child", "yes")
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "demo", MLPROJECT, {"track.py": TRACK_PY})


async def test_synchronous_run_is_recorded_like_mlflow_run(
    project: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off") as runner:
        run = await runner.run(str(project), parameters={"alpha": 0.5}, env_manager="local")
        assert await run.get_status() is RunStatus.FINISHED
    record = await read_run(tracking_uri, run.run_id)
    assert record.info.status == "FINISHED"
    assert record.info.end_time is not None
    assert record.info.end_time >= record.info.start_time
    assert record.data.params == {"alpha": "0.5", "words": "two words"}
    tags = record.data.tags
    assert tags["mlflow.source.type"] == "PROJECT"
    assert tags["mlflow.source.name"] == str(project)
    assert tags["mlflow.project.entryPoint"] == "main"
    assert tags["mlflow.project.backend"] == "local"
    assert tags["mlflow.user"]
    assert "mlflow.project.env" not in tags  # env_manager=local creates no environment
    assert tags["mlflow.runName"] == record.info.run_name


async def test_output_reaches_logs_and_artifact(project: Path, tracking_uri: str) -> None:
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), parameters={"words": "a b; echo injected"}, env_manager="local"
        )
    lines = [line async for line in run.logs()]
    assert lines == ["alpha=0.1 words=a b; echo injected\n"]  # quoted: no injection
    artifacts = Path(tracking_uri.removeprefix("file://")) / run.experiment_id / run.run_id
    saved = await anyio.Path(artifacts / "artifacts/aioproj/output.log").read_text()
    assert saved == lines[0]


async def test_failed_run_raises_mlflow_message_and_records_failed(
    project: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off") as runner:
        with pytest.raises(
            aioproj.RunFailedError, match=r"Run \(ID '[0-9a-f]{32}'\) failed"
        ) as info:
            await runner.run(str(project), entry_point="fail", env_manager="local")
    record = await read_run(tracking_uri, info.value.run_id)
    assert record.info.status == "FAILED"
    assert record.info.end_time is not None


async def test_asynchronous_runs_gathered_and_awaited(project: Path, tracking_uri: str) -> None:
    async with Runner(echo="off") as runner:
        runs = [
            await runner.run(
                str(project), parameters={"alpha": a}, synchronous=False, env_manager="local"
            )
            for a in (0.1, 0.2, 0.3)
        ]
        runs += [
            await runner.run(
                str(project), entry_point="fail", synchronous=False, env_manager="local"
            )
        ]
        statuses = [await run for run in runs]
    assert statuses == [RunStatus.FINISHED] * 3 + [RunStatus.FAILED]
    assert [await run.wait() for run in runs] == [True, True, True, False]
    recorded = {r.info.run_id: r.info.status for r in await all_runs(tracking_uri)}
    assert recorded == {
        run.run_id: status.value for run, status in zip(runs, statuses, strict=True)
    }


async def test_parameters_none_in_both_modes(tmp_path: Path, tracking_uri: str) -> None:
    project = await amake_project(tmp_path / "p", "entry_points:\n  main:\n    command: 'true'\n")
    async with Runner(echo="off") as runner:
        sync = await runner.run(str(project), parameters=None, env_manager="local")
        later = await runner.run(
            str(project), parameters=None, synchronous=False, env_manager="local"
        )
        assert await later is RunStatus.FINISHED
    assert await sync.get_status() is RunStatus.FINISHED


async def test_project_code_logs_into_the_same_run(project: Path, tracking_uri: str) -> None:
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project),
            entry_point="track",
            parameters={"python": PYTHON, "value": 4.5},
            env_manager="local",
        )
    record = await read_run(tracking_uri, run.run_id)
    assert record.data.metrics == {"score": 4.5}
    assert record.data.params["from_child"] == "yes"
    assert record.data.params["value"] == "4.5"
    assert record.info.status == "FINISHED"
    assert len(await all_runs(tracking_uri)) == 1


async def test_experiment_by_name_is_created_once(project: Path, tracking_uri: str) -> None:
    async with Runner(echo="off") as runner:
        runs = []
        async with anyio.create_task_group() as tg:

            async def one() -> None:
                runs.append(
                    await runner.run(str(project), experiment_name="sweep", env_manager="local")
                )

            for _ in range(5):
                tg.start_soon(one)
    assert len({run.experiment_id for run in runs}) == 1
    assert runs[0].experiment_id != "0"


@pytest.mark.allow_blocking  # capfd reads its capture file
async def test_echo_labels_each_line_with_the_run(
    project: Path, tracking_uri: str, capfd: pytest.CaptureFixture[str]
) -> None:
    async with Runner() as runner:
        run = await runner.run(str(project), env_manager="local", run_name="first")
    out = capfd.readouterr().out
    assert "[first] alpha=0.1 words=two words\n" in out
    assert run.label == "first"


async def test_max_concurrency_bounds_active_runs(project: Path, tracking_uri: str) -> None:
    peak = 0
    async with Runner(echo="off", max_concurrency=2) as runner:

        async def one() -> None:
            nonlocal peak
            run = await runner.run(
                str(project),
                entry_point="sleep",
                parameters={"seconds": 0.2},
                synchronous=False,
                env_manager="local",
            )
            peak = max(peak, len(runner.active_runs))
            await run

        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(one)
    assert peak == 2
    assert len(await all_runs(tracking_uri)) == 6


async def test_module_level_run_uses_one_default_runner(project: Path, tracking_uri: str) -> None:
    first, second = (
        await aioproj.run(str(project), env_manager="local", synchronous=False),
        await aioproj.run(str(project), env_manager="local", synchronous=False),
    )
    assert await first is RunStatus.FINISHED
    assert await second is RunStatus.FINISHED
    from aioproj.runner import default_runner

    assert (await default_runner()) is (await default_runner())


def test_unawaited_runs_are_killed_when_the_loop_ends(tmp_path: Path) -> None:
    """A script that starts runs and returns: they are cancelled, recorded KILLED, warned of."""
    pids = tmp_path / "pids"
    project = make_project(
        tmp_path / "p", f"entry_points:\n  main:\n    command: 'echo $$ >> {pids}; sleep 60'\n"
    )
    uri = (tmp_path / "mlruns").as_uri()
    script = f"""
import asyncio, os, aioproj
async def main():
    runs = [await aioproj.run({str(project)!r}, synchronous=False, env_manager="local")
            for _ in range(3)]
    while not os.path.exists({str(pids)!r}) or len(open({str(pids)!r}).read().split()) < 3:
        await asyncio.sleep(0.02)
    print(" ".join(r.run_id for r in runs), flush=True)
asyncio.run(main())
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    run_ids = done.stdout.split()
    assert len(run_ids) == 3
    assert "3 local aioproj run(s) were still going when their event loop ended" in done.stderr
    client = mlflow_client(uri)
    assert {client.get_run(r).info.status for r in run_ids} == {"KILLED"}
    assert [pid for pid in pids_in(pids) if not process_gone(pid)] == []


async def test_python_output_streams_line_by_line(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Python child writing to our pipe still flushes each line (not at exit)."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    gate = tmp_path / "gate"
    script = (
        "import os, time\n"
        "print('first')\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.02)\n"
        "print('second')\n"
    )
    project = await amake_project(
        tmp_path / "p", "entry_points:\n  main:\n    command: 'python w.py'\n", {"w.py": script}
    )
    async with Runner(echo="off") as runner:
        run = await runner.run(str(project), synchronous=False, env_manager="local")
        lines = run.logs()
        with anyio.fail_after(20):
            assert await lines.__anext__() == "first\n"  # arrives while the run waits
        await anyio.Path(gate).touch()
        assert [line async for line in lines] == ["second\n"]


async def test_slots_are_released_after_failure_and_cancel(
    project: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off", max_concurrency=1) as runner:
        with pytest.raises(aioproj.RunFailedError):
            await runner.run(str(project), entry_point="fail", env_manager="local")
        slow = await runner.run(
            str(project),
            entry_point="sleep",
            parameters={"seconds": 60},
            synchronous=False,
            env_manager="local",
        )
        await slow.cancel()
        with anyio.fail_after(20):
            done = await runner.run(str(project), env_manager="local")
        assert await done.get_status() is RunStatus.FINISHED


async def test_run_started_while_the_runner_closes_creates_nothing(
    project: Path, tracking_uri: str
) -> None:
    outcome: list[BaseException] = []
    runners: list[Runner] = []
    opened, close = anyio.Event(), anyio.Event()

    async def host() -> None:
        async with Runner(echo="off") as runner:
            runners.append(runner)
            opened.set()
            await close.wait()

    async def late() -> None:
        try:
            await runners[0].run(str(project), env_manager="local")
        except RuntimeError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(host)
        await opened.wait()
        tg.start_soon(late)
        await anyio.lowlevel.checkpoint()  # late() has entered run() and is preparing
        close.set()
    assert outcome, "run() should have seen the runner close"
    assert "no run was created" in str(outcome[0])
    assert await all_runs(tracking_uri) == []
