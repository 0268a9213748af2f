"""Cancellation at every stage leaves no process, no RUNNING record, no half-made state."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.abc
import pytest

from aioproj import Runner, RunStatus

from .support import all_runs, amake_project, make_project, read_run, survivors, wait_for_file

pytestmark = pytest.mark.anyio

# The entry point starts a grandchild in the background, then waits: cancel must reach both.
MLPROJECT = """
entry_points:
  main:
    parameters:
      pids: path
    command: "sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; wait"
  stubborn:
    parameters:
      pids: path
    command: "trap '' TERM; echo $$ >> {pids}; while true; do sleep 0.05; done"
  leaves_child:
    parameters:
      pids: path
    command: "sleep 300 > /dev/null & echo $! >> {pids}; echo done"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj", MLPROJECT)


@pytest.fixture
def pids(tmp_path: Path) -> Path:
    path = tmp_path / "pids"
    path.touch()
    return path


async def _assert_killed(tracking_uri: str, run_id: str, pids: Path) -> None:
    record = await read_run(tracking_uri, run_id)
    assert record.info.status == "KILLED"
    assert record.info.end_time is not None
    assert await survivors(pids) == []


async def test_cancel_handle_stops_group_and_records_killed(
    project: Path, pids: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off", grace_period=2) as runner:
        run = await runner.run(
            str(project), parameters={"pids": str(pids)}, synchronous=False, env_manager="local"
        )
        await wait_for_file(pids, lines=2)
        assert await run.get_status() is RunStatus.RUNNING
        await run.cancel()
        assert await run.get_status() is RunStatus.KILLED
        await run.cancel()  # idempotent
        assert await run is RunStatus.KILLED
        assert not await run.wait()
    await _assert_killed(tracking_uri, run.run_id, pids)


async def test_cancelling_the_awaiting_task_cancels_a_synchronous_run(
    project: Path, pids: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off", grace_period=2) as runner:
        with anyio.move_on_after(60) as scope:
            async with anyio.create_task_group() as tg:

                async def caller() -> None:
                    await runner.run(
                        str(project), parameters={"pids": str(pids)}, env_manager="local"
                    )

                tg.start_soon(caller)
                await wait_for_file(pids, lines=2)
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught
        assert runner.active_runs == frozenset()
    [record] = await all_runs(tracking_uri)
    await _assert_killed(tracking_uri, record.info.run_id, pids)


async def test_timeout_around_run_cancels_it(project: Path, pids: Path, tracking_uri: str) -> None:
    async with Runner(echo="off", grace_period=2) as runner:
        with anyio.move_on_after(1.5) as scope:
            await runner.run(str(project), parameters={"pids": str(pids)}, env_manager="local")
        assert scope.cancelled_caught
    [record] = await all_runs(tracking_uri)
    await _assert_killed(tracking_uri, record.info.run_id, pids)


async def test_sigterm_ignored_means_sigkill_after_grace(
    project: Path, pids: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off", grace_period=0.3) as runner:
        run = await runner.run(
            str(project),
            entry_point="stubborn",
            parameters={"pids": str(pids)},
            synchronous=False,
            env_manager="local",
        )
        await wait_for_file(pids)
        with anyio.fail_after(5):
            await run.cancel()
    await _assert_killed(tracking_uri, run.run_id, pids)


async def test_cancel_after_finish_is_a_no_op(tmp_path: Path, tracking_uri: str) -> None:
    project = await amake_project(tmp_path / "p", "entry_points:\n  main:\n    command: 'true'\n")
    async with Runner(echo="off") as runner:
        run = await runner.run(str(project), env_manager="local")
        await run.cancel()
        assert await run.get_status() is RunStatus.FINISHED
    assert (await read_run(tracking_uri, run.run_id)).info.status == "FINISHED"


async def test_leftover_background_processes_are_stopped_when_the_run_ends(
    project: Path, pids: Path, tracking_uri: str
) -> None:
    async with Runner(echo="off", grace_period=1) as runner:
        run = await runner.run(
            str(project),
            entry_point="leaves_child",
            parameters={"pids": str(pids)},
            env_manager="local",
        )
    assert await run.get_status() is RunStatus.FINISHED
    assert await survivors(pids) == []


async def test_runner_exit_by_exception_cancels_live_runs(
    project: Path, pids: Path, tracking_uri: str
) -> None:
    with pytest.raises(RuntimeError, match="boom"):  # noqa: PT012
        async with Runner(echo="off", grace_period=2) as runner:
            run = await runner.run(
                str(project), parameters={"pids": str(pids)}, synchronous=False, env_manager="local"
            )
            await wait_for_file(pids, lines=2)
            raise RuntimeError("boom")
    assert await run.get_status() is RunStatus.KILLED
    await _assert_killed(tracking_uri, run.run_id, pids)


async def test_runner_normal_exit_waits_for_runs(tmp_path: Path, tracking_uri: str) -> None:
    project = await amake_project(
        tmp_path / "p", "entry_points:\n  main:\n    command: 'sleep 0.3'\n"
    )
    async with Runner(echo="off") as runner:
        run = await runner.run(str(project), synchronous=False, env_manager="local")
    assert await run.get_status() is RunStatus.FINISHED


async def test_cancel_many_runs_concurrently(
    project: Path, tmp_path: Path, tracking_uri: str
) -> None:
    pid_files = [tmp_path / f"pids{i}" for i in range(20)]
    for p in pid_files:
        await anyio.Path(p).touch()
    async with Runner(echo="off", grace_period=2) as runner:
        runs = [
            await runner.run(
                str(project), parameters={"pids": str(p)}, synchronous=False, env_manager="local"
            )
            for p in pid_files
        ]
        for p in pid_files:
            await wait_for_file(p, lines=2)
        with anyio.fail_after(10):
            await runner.cancel_all()
    assert {await run.get_status() for run in runs} == {RunStatus.KILLED}
    assert {r.info.status for r in await all_runs(tracking_uri)} == {"KILLED"}
    for p in pid_files:
        assert await survivors(p) == []


async def test_cancel_during_fetch_creates_nothing(tmp_path: Path, tracking_uri: str) -> None:
    """A zip download that never completes: cancelling leaves no run and no temp files."""
    hanging = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = hanging.extra(anyio.abc.SocketAttribute.local_port)
    cache = tmp_path / "cache"

    async def accept_and_stall(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nPK")
            await anyio.sleep_forever()

    async with hanging, anyio.create_task_group() as server:
        server.start_soon(hanging.serve, accept_and_stall)
        async with Runner(echo="off", cache_dir=cache) as runner:
            with anyio.move_on_after(1):
                await runner.run(f"http://127.0.0.1:{port}/project.zip", env_manager="local")
        server.cancel_scope.cancel()
    assert await all_runs(tracking_uri) == []
    leftovers = await anyio.to_thread.run_sync(lambda: [p for p in cache.rglob("*") if p.is_file()])
    assert leftovers == []


@pytest.mark.slow
async def test_cancel_during_environment_build_creates_nothing(
    tmp_path: Path, tracking_uri: str
) -> None:
    """A virtualenv being built (venv + pip bootstrap takes seconds): cancel it midway."""
    project = await amake_project(tmp_path / "p", "entry_points:\n  main:\n    command: 'true'\n")
    cache = tmp_path / "cache"
    async with Runner(echo="off", cache_dir=cache) as runner:
        with anyio.move_on_after(1.0) as scope:
            await runner.run(str(project), env_manager="virtualenv")
        assert scope.cancelled_caught
    assert await all_runs(tracking_uri) == []
    envs = anyio.Path(cache / "envs")
    if await envs.exists():
        left = [p.name async for p in envs.iterdir() if not p.name.endswith(".lock")]
        assert left == []


async def test_cancelling_the_canceller_still_stops_and_records(
    project: Path, pids: Path, tracking_uri: str
) -> None:
    """Clean-up is shielded: cancelling the task that awaits run.cancel() does not cut it."""
    async with Runner(echo="off", grace_period=2) as runner:
        run = await runner.run(
            str(project), parameters={"pids": str(pids)}, synchronous=False, env_manager="local"
        )
        await wait_for_file(pids, lines=2)
        with anyio.move_on_after(0.01):
            await run.cancel()
        with anyio.fail_after(10):
            assert await run is RunStatus.KILLED
    await _assert_killed(tracking_uri, run.run_id, pids)


async def test_asyncio_task_cancel_at_any_moment_leaves_nothing_behind(
    project: Path, pids: Path, tracking_uri: str
) -> None:
    # asyncio's own cancellation (Task.cancel, asyncio.timeout, wait_for) is not held back
    # by anyio's shields: the start and the stop must still never be cut in half.
    import asyncio

    loop = asyncio.get_running_loop()
    async with Runner(echo="off", grace_period=1) as runner:
        tasks = [
            asyncio.ensure_future(
                runner.run(str(project), parameters={"pids": str(pids)}, env_manager="local")
            )
            for _ in range(30)
        ]
        for i, task in enumerate(tasks):  # cancellations spread over the start burst
            loop.call_later(0.01 * i, task.cancel)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    assert await survivors(pids) == []
    statuses = [r.info.status for r in await all_runs(tracking_uri)]
    assert set(statuses) <= {"KILLED"}, statuses
