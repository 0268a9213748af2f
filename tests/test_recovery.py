"""Crash recovery: the run journal, and ``aioproj.recover`` after the driver is SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

import aioproj
from aioproj import Runner, RunStatus
from aioproj.journal import RECOVERED_TAG, Journal, recover
from aioproj.tracking import FileStore

from .support import amake_project, process_gone, read_run, wait_for_file

pytestmark = pytest.mark.anyio

SLEEPER = """\
name: sleeper
entry_points:
  main:
    parameters:
      pids: string
      seconds: {type: float, default: 300}
    command: "echo $$ >> {pids}; sleep {seconds} & echo $! >> {pids}; wait"
"""

DRIVER = """\
import asyncio, sys
import aioproj

async def main():
    await aioproj.run(
        sys.argv[1], parameters={"pids": sys.argv[2], "seconds": sys.argv[3]},
        env_manager="local",
    )

asyncio.run(main())
"""


def _journal_dir() -> Path:
    return Path(os.environ["AIOPROJ_CACHE_DIR"]) / "journal"


async def _entries() -> list[dict[str, object]]:
    def read() -> list[dict[str, object]]:
        folder = _journal_dir()
        if not folder.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]

    return await anyio.to_thread.run_sync(read)


async def _all_gone(pids: list[int]) -> bool:
    return await anyio.to_thread.run_sync(lambda: all(process_gone(pid) for pid in pids))


async def _none_gone(pids: list[int]) -> bool:
    return await anyio.to_thread.run_sync(lambda: not any(process_gone(pid) for pid in pids))


async def _pids(path: Path) -> list[int]:
    text = await anyio.Path(path).read_text()
    return [int(line) for line in text.split()]


async def test_a_run_is_journalled_while_it_runs_and_forgotten_once_recorded(
    tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(tmp_path / "proj", SLEEPER)
    pids = tmp_path / "pids"
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), parameters={"pids": str(pids), "seconds": 0.5},
            env_manager="local", synchronous=False,
        )  # fmt: skip
        (entry,) = await _entries()
        assert entry["run_id"] == run.run_id
        assert entry["backend"] == "local"
        assert entry["driver_pid"] == os.getpid()
        assert entry["tracking_uri"] == tracking_uri
        await wait_for_file(pids, lines=1)
        state = entry["state"]
        assert isinstance(state, dict)
        assert state["pgid"] == (await _pids(pids))[0]  # the shell that leads the group
        mode = (await anyio.Path(_journal_dir() / f"{run.run_id}.json").stat()).st_mode
        assert mode & 0o077 == 0  # it may hold a tracking URI with a password
        assert await run == RunStatus.FINISHED
    assert await _entries() == []


async def _start_driver(tmp_path: Path, seconds: float) -> tuple[anyio.abc.Process, Path]:
    project = await amake_project(tmp_path / "proj", SLEEPER)
    driver = tmp_path / "driver.py"
    await anyio.Path(driver).write_text(DRIVER)
    pids = tmp_path / "pids"
    proc = await anyio.open_process(
        [sys.executable, str(driver), str(project), str(pids), str(seconds)],
        stdout=None,
        stderr=None,
    )
    await wait_for_file(pids, lines=2, limit=30)
    for _ in range(200):  # the journal entry follows the start
        if await _entries():
            break
        await anyio.sleep(0.05)
    return proc, pids


async def _kill_driver(proc: anyio.abc.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    await proc.wait()


async def test_recover_stops_what_a_killed_driver_left_and_records_it_killed(
    tmp_path: Path, tracking_uri: str
) -> None:
    proc, pids = await _start_driver(tmp_path, 300)
    (entry,) = await _entries()
    run_id = str(entry["run_id"])
    # Another process's live run is not ours to touch.
    assert await recover(grace_period=1) == []
    await _kill_driver(proc)
    orphans = await _pids(pids)
    assert await _none_gone(orphans)  # SIGKILL left them running
    assert [(r.run_id, r.status) for r in await recover(dry_run=True)] == [(run_id, None)]
    assert await _none_gone(orphans)  # dry run touches nothing

    (result,) = await recover(grace_period=1)
    assert (result.run_id, result.status) == (run_id, "KILLED")
    assert "stopped its process group" in result.action
    assert await _all_gone(orphans)
    record = await read_run(tracking_uri, run_id)
    assert record.info.status == "KILLED"
    assert "aioproj recover stopped it" in record.data.tags[RECOVERED_TAG]
    assert await _entries() == []
    assert await recover() == []  # nothing left to do


async def test_a_run_that_ended_unwatched_is_recorded_failed(
    tmp_path: Path, tracking_uri: str
) -> None:
    proc, pids = await _start_driver(tmp_path, 0.5)
    (entry,) = await _entries()
    await _kill_driver(proc)
    orphans = await _pids(pids)
    for _ in range(200):
        if await _all_gone(orphans):
            break
        await anyio.sleep(0.05)
    (result,) = await recover(grace_period=1)
    assert result.status == "FAILED"
    record = await read_run(tracking_uri, str(entry["run_id"]))
    assert record.info.status == "FAILED"
    assert "exit status unknown" in record.data.tags[RECOVERED_TAG]


async def test_a_status_tracking_refused_is_kept_and_replayed(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = await amake_project(tmp_path / "proj", SLEEPER)
    real = FileStore.set_terminated

    async def down(self: FileStore, run_id: str, status: str, **kwargs: object) -> None:
        raise aioproj.TrackingError("tracking server is down")

    monkeypatch.setattr(FileStore, "set_terminated", down)
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), parameters={"pids": str(tmp_path / "pids"), "seconds": 0},
            env_manager="local",
        )  # fmt: skip
    (entry,) = await _entries()
    assert entry["final_status"] == "FINISHED"
    assert (await read_run(tracking_uri, run.run_id)).info.status == "RUNNING"
    # Still down: the entry stays.
    (result,) = await recover()
    assert result.status is None
    assert len(await _entries()) == 1
    monkeypatch.setattr(FileStore, "set_terminated", real)
    (result,) = await recover()
    assert (result.status, result.action) == ("FINISHED", "kept status replayed")
    assert (await read_run(tracking_uri, run.run_id)).info.status == "FINISHED"
    assert await _entries() == []


async def test_unreadable_journal_files_are_skipped(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    await anyio.Path(journal.directory).mkdir()
    await anyio.Path(journal.directory / "junk.json").write_text("{not json")
    assert await anyio.to_thread.run_sync(journal.entries) == []
    assert await recover(journal_dir=journal.directory) == []


def test_recover_is_public() -> None:
    assert aioproj.recover is recover


async def test_the_recover_command(tmp_path: Path, tracking_uri: str) -> None:
    proc, pids = await _start_driver(tmp_path, 300)
    (entry,) = await _entries()
    await _kill_driver(proc)
    aioproj_cli = [sys.executable, "-m", "aioproj.cli", "recover"]
    dry = await anyio.run_process([*aioproj_cli, "--dry-run"])
    assert f"{entry['run_id']}  local       -         stopped its process group" in (
        dry.stdout.decode()
    )
    done = await anyio.run_process([*aioproj_cli, "--grace-period", "1"])
    assert f"{entry['run_id']}  local       KILLED    stopped its process group" in (
        done.stdout.decode()
    )
    assert await _all_gone(await _pids(pids))
    again = await anyio.run_process(aioproj_cli)
    assert again.stdout.decode().strip() == "No runs to recover."
