"""``run(..., detach=True)``: a local run supervised by a detached aioproj process that
outlives its caller and records the final status itself."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest

import aioproj
from aioproj import Runner, RunStatus

from .support import amake_project, process_gone, read_run, wait_for_file

pytestmark = pytest.mark.anyio

MLPROJECT = """\
name: detached
entry_points:
  main:
    parameters:
      pids: string
      seconds: {type: float, default: 0}
      code: {type: int, default: 0}
    command: "echo $$ >> {pids}; echo working; sleep {seconds}; exit {code}"
"""


async def _pid(path: Path) -> int:
    await wait_for_file(path, lines=1)
    return int((await anyio.Path(path).read_text()).split()[0])


async def test_a_detached_run_finishes_and_records_itself(
    tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(tmp_path / "proj", MLPROJECT)
    pids = tmp_path / "pids"
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), parameters={"pids": str(pids), "seconds": 0.3},
            env_manager="local", synchronous=False, detach=True,
        )  # fmt: skip
        assert not runner.active_runs  # its supervisor is another process
        assert await run == RunStatus.FINISHED
        assert await run.wait()
        lines = [line async for line in run.logs()]
    assert "supervised by the detached aioproj process" in lines[0]
    record = await read_run(tracking_uri, run.run_id)
    assert record.info.status == "FINISHED"
    assert record.data.params == {"pids": str(pids), "seconds": "0.3", "code": "0"}
    client_log = Path(record.info.artifact_uri.removeprefix("file://")) / "aioproj/output.log"
    assert "working" in await anyio.Path(client_log).read_text()


async def test_a_failing_detached_run_is_failed(tmp_path: Path, tracking_uri: str) -> None:
    project = await amake_project(tmp_path / "proj", MLPROJECT)
    run = await aioproj.run(
        str(project), parameters={"pids": str(tmp_path / "pids"), "code": 3},
        env_manager="local", synchronous=False, detach=True,
    )  # fmt: skip
    assert await run == RunStatus.FAILED
    assert (await read_run(tracking_uri, run.run_id)).info.status == "FAILED"


async def test_cancel_stops_a_detached_run_and_it_is_recorded_killed(
    tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(tmp_path / "proj", MLPROJECT)
    pids = tmp_path / "pids"
    run = await aioproj.run(
        str(project), parameters={"pids": str(pids), "seconds": 300},
        env_manager="local", synchronous=False, detach=True,
    )  # fmt: skip
    child = await _pid(pids)
    await run.cancel()
    assert await run.get_status() is RunStatus.KILLED
    assert (await read_run(tracking_uri, run.run_id)).info.status == "KILLED"
    assert await anyio.to_thread.run_sync(process_gone, child)


DRIVER = """\
import asyncio, sys
import aioproj

async def main():
    run = await aioproj.run(sys.argv[1], parameters={"pids": sys.argv[2], "seconds": 1},
                            env_manager="local", synchronous=False, detach=True)
    print(run.run_id)

asyncio.run(main())
"""


async def test_a_detached_run_outlives_its_caller(tmp_path: Path, tracking_uri: str) -> None:
    project = await amake_project(tmp_path / "proj", MLPROJECT)
    pids = tmp_path / "pids"
    driver = tmp_path / "driver.py"
    await anyio.Path(driver).write_text(DRIVER)
    done = await anyio.run_process([sys.executable, str(driver), str(project), str(pids)])
    assert b"still going" not in done.stderr  # nothing was cancelled with the loop
    run_id = done.stdout.decode().split()[-1]
    child = await _pid(pids)
    assert not await anyio.to_thread.run_sync(process_gone, child)
    with anyio.fail_after(30):
        while (await read_run(tracking_uri, run_id)).info.status == "RUNNING":  # noqa: ASYNC110
            await anyio.sleep(0.1)
    assert (await read_run(tracking_uri, run_id)).info.status == "FINISHED"


async def test_cancelling_the_awaiting_task_leaves_a_detached_run_alone(
    tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(tmp_path / "proj", MLPROJECT)
    pids = tmp_path / "pids"
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), parameters={"pids": str(pids), "seconds": 1},
            env_manager="local", synchronous=False, detach=True,
        )  # fmt: skip
        with anyio.move_on_after(0.2):
            await run
        assert not run.done
        assert await run == RunStatus.FINISHED  # awaiting again follows it to the end


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "kubernetes"}, "detach=True is for the local backend"),
        ({"synchronous": True}, "pass synchronous=False"),
        ({"docker_auth": {"username": "u", "password": "p"}}, "docker login"),
    ],
)
async def test_detach_refuses_what_it_cannot_do(
    tmp_path: Path, tracking_uri: str, kwargs: dict[str, object], message: str
) -> None:
    project = await amake_project(tmp_path / "proj", MLPROJECT)
    args: dict[str, object] = {"synchronous": False, **kwargs}
    with pytest.raises(aioproj.InvalidArgumentError, match=message):
        await aioproj.run(str(project), detach=True, **args)  # type: ignore[arg-type]


async def test_a_detached_start_error_is_raised_and_nothing_runs(
    tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(tmp_path / "proj", MLPROJECT)
    with pytest.raises(aioproj.ExecutionError, match="No value given for missing parameters"):
        await aioproj.run(str(project), synchronous=False, detach=True, env_manager="local")
    assert not await anyio.Path(tmp_path / "pids").exists()  # the command never ran
