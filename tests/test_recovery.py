"""Crash recovery: the write-ahead run journal, and ``aioproj.recover`` after a SIGKILL.

The crash-injection suite (a driver killed at every step) is ``test_crash.py``; this
module covers the journal itself and each kind of leftover one at a time.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread
import pytest

import aioproj
from aioproj import Runner, RunStatus
from aioproj.journal import RECOVERED_TAG, Journal, JournalError, recover
from aioproj.journal._records import RunState, fold, parse_lines
from aioproj.tracking import FileStore

from .support import amake_project, journal_runs, process_gone, read_run, wait_for_file

pytestmark = pytest.mark.anyio

SLEEPER = """\
name: sleeper
entry_points:
  main:
    parameters:
      pids: string
      seconds: {type: float, default: 300}
      code: {type: int, default: 0}
    command: "echo $$ >> {pids}; sleep {seconds} & echo $! >> {pids}; wait; exit {code}"
"""

DRIVER = """\
import asyncio, sys
import aioproj

async def main():
    await aioproj.run(
        sys.argv[1], parameters={"pids": sys.argv[2], "seconds": sys.argv[3], "code": sys.argv[4]},
        env_manager="local",
    )

asyncio.run(main())
"""


def _journal_dir() -> Path:
    return Path(os.environ["AIOPROJ_CACHE_DIR"]) / "journal"


def _read_journals() -> list[RunState]:
    folder = _journal_dir()
    if not folder.is_dir():
        return []
    runs: list[RunState] = []
    for path in sorted(folder.glob("*.log")):
        _, found = fold(parse_lines(path.read_bytes()))
        runs.extend(found.values())
    return runs


async def _all_gone(pids: list[int]) -> bool:
    return await anyio.to_thread.run_sync(lambda: all(process_gone(pid) for pid in pids))


async def _none_gone(pids: list[int]) -> bool:
    return await anyio.to_thread.run_sync(lambda: not any(process_gone(pid) for pid in pids))


async def _pids(path: Path) -> list[int]:
    text = await anyio.Path(path).read_text()
    return [int(line) for line in text.split()]


async def test_a_run_is_journalled_ahead_and_forgotten_once_recorded(
    tmp_path: Path, tracking_uri: str
) -> None:
    project = await amake_project(tmp_path / "proj", SLEEPER)
    pids = tmp_path / "pids"
    async with Runner(echo="off") as runner:
        run = await runner.run(
            str(project), parameters={"pids": str(pids), "seconds": 0.5},
            env_manager="local", synchronous=False,
        )  # fmt: skip
        await runner._journal.flush()
        (entry,) = await journal_runs()
        assert entry.run_id == run.run_id
        assert entry.backend == "local"
        assert entry.tracking_uri == tracking_uri
        assert entry.intent_ms > 0
        await wait_for_file(pids, lines=1)
        assert entry.started
        assert entry.state["pgid"] == (await _pids(pids))[0]  # the shell that leads the group
        log = runner._journal.path
        assert log.name.startswith(f"{os.getpid()}-")
        # It may hold a tracking URI with a password.
        assert (await anyio.Path(log).stat()).st_mode & 0o077 == 0
        assert (await anyio.Path(log.parent).stat()).st_mode & 0o077 == 0
        assert await run == RunStatus.FINISHED
    assert await journal_runs() == []
    assert not await anyio.Path(log).exists()  # nothing live: the journal is removed


async def test_the_intent_is_on_disk_before_the_tracking_run_exists(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Write-ahead: when the store is asked to create the run, the journal has the intent."""
    project = await amake_project(tmp_path / "proj", SLEEPER)
    seen: list[list[RunState]] = []
    real = FileStore.create_run

    async def create_run(self: FileStore, *args: object, **kwargs: object) -> object:
        seen.append(await anyio.to_thread.run_sync(_read_journals))
        return await real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(FileStore, "create_run", create_run)
    async with Runner(echo="off") as runner:
        await runner.run(
            str(project), parameters={"pids": str(tmp_path / "pids"), "seconds": 0},
            env_manager="local",
        )  # fmt: skip
    ((intent,),) = seen
    assert intent.run_id is None
    assert not intent.started
    assert not intent.done


async def test_the_journal_stays_small_over_many_runs(tmp_path: Path, tracking_uri: str) -> None:
    """Finished runs are compacted away; a long-lived driver's journal does not grow."""
    journal = Journal(tmp_path / "journal")
    await journal.open()
    try:
        await journal.intent("a" * 32, tracking_uri="x", backend="local", experiment_id="0")
        for i in range(5000):
            key = f"{i:032x}"
            await journal.intent(key, tracking_uri="x", backend="local", experiment_id="0")
            journal.note(key, "tracked", run=key)
            journal.note(key, "done")
        await journal.flush()
        data = await anyio.Path(journal.path).read_bytes()
        assert len(data) < 2_000_000
        _, runs = fold(parse_lines(data))
        assert [k for k, r in runs.items() if not r.done] == ["a" * 32]
    finally:
        await journal.aclose()
    assert await anyio.Path(journal.path).exists()  # a live run: kept for recover


async def _start_driver(
    tmp_path: Path, seconds: float, code: int = 0
) -> tuple[anyio.abc.Process, Path]:
    project = await amake_project(tmp_path / "proj", SLEEPER)
    driver = tmp_path / "driver.py"
    await anyio.Path(driver).write_text(DRIVER)
    pids = tmp_path / "pids"
    proc = await anyio.open_process(
        [sys.executable, str(driver), str(project), str(pids), str(seconds), str(code)],
        stdout=None,
        stderr=None,
    )
    await wait_for_file(pids, lines=2, limit=30)
    return proc, pids


async def _kill_driver(proc: anyio.abc.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    await proc.wait()


async def _the_run_id(tracking_uri: str) -> str:
    from .support import all_runs

    (run,) = await all_runs(tracking_uri)
    return str(run.info.run_id)


async def test_recover_stops_what_a_killed_driver_left_and_records_it_killed(
    tmp_path: Path, tracking_uri: str
) -> None:
    proc, pids = await _start_driver(tmp_path, 300)
    run_id = await _the_run_id(tracking_uri)
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
    assert await anyio.to_thread.run_sync(_read_journals) == []
    assert await anyio.to_thread.run_sync(os.listdir, _journal_dir()) == []  # log and lock gone
    assert await recover() == []  # nothing left to do


async def test_a_process_that_left_its_group_is_found_by_its_mark(
    tmp_path: Path, tracking_uri: str
) -> None:
    """A grandchild in a session of its own escapes the group, not ``aioproj recover``."""
    escapee = tmp_path / "escapee"
    project = await amake_project(
        tmp_path / "proj",
        f"""\
        name: escape
        entry_points:
          main:
            command: "setsid sleep 300 & echo $! > {escapee}; sleep 300"
        """,
    )
    driver = tmp_path / "driver.py"
    await anyio.Path(driver).write_text(
        "import asyncio, sys, aioproj\nasyncio.run(aioproj.run(sys.argv[1], env_manager='local'))\n"
    )
    proc = await anyio.open_process([sys.executable, str(driver), str(project)])
    await wait_for_file(escapee, lines=1, limit=30)
    await _kill_driver(proc)
    (pid,) = await _pids(escapee)
    assert await _none_gone([pid])
    (result,) = await recover(grace_period=1)
    assert result.status == "KILLED"
    assert await _all_gone([pid])


@pytest.mark.parametrize(("code", "status"), [(0, "FINISHED"), (3, "FAILED")])
async def test_a_run_that_ended_unwatched_gets_its_true_status_and_end(
    tmp_path: Path, tracking_uri: str, code: int, status: str
) -> None:
    """The run's shell writes its exit code and end time: recover records both."""
    proc, pids = await _start_driver(tmp_path, 0.5, code)
    run_id = await _the_run_id(tracking_uri)
    await _kill_driver(proc)
    orphans = await _pids(pids)
    with anyio.fail_after(20):
        while not await _all_gone(orphans):  # noqa: ASYNC110 - no event for another's exit
            await anyio.sleep(0.05)
    ended = time.time() * 1000
    await anyio.sleep(1.0)  # recover runs well after the end
    (result,) = await recover(grace_period=1)
    assert result.status == status
    record = await read_run(tracking_uri, run_id)
    assert record.info.status == status
    assert f"exit code {code}" in record.data.tags[RECOVERED_TAG]
    assert abs(record.info.end_time - ended) < 800  # the run's end, not recover's


async def test_a_status_tracking_refused_is_kept_and_replayed_with_its_end_time(
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
        ended = time.time() * 1000
        # Kept statuses are replayed even while their driver lives.
        (kept,) = await journal_runs()
        assert (kept.status, kept.kept) == ("FINISHED", True)
    assert (await read_run(tracking_uri, run.run_id)).info.status == "RUNNING"
    # Still down: the entry stays.
    (result,) = await recover()
    assert result.status is None
    assert len(await journal_runs()) == 1
    monkeypatch.setattr(FileStore, "set_terminated", real)
    await anyio.sleep(1.0)
    (result,) = await recover()
    assert (result.status, result.action) == ("FINISHED", "kept status replayed")
    record = await read_run(tracking_uri, run.run_id)
    assert record.info.status == "FINISHED"
    assert abs(record.info.end_time - ended) < 800
    assert await journal_runs() == []


async def test_torn_and_foreign_lines_are_skipped(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    await anyio.Path(directory).mkdir()
    await anyio.Path(directory / "junk-1.log").write_bytes(
        b'{not json\n{"op": 3}\n[1, 2]\n{"op":"tracked","k":"x","run":"y"}\n{"op":"intent","k'
    )
    assert await recover(journal_dir=directory) == []
    assert not await anyio.Path(directory / "junk-1.log").exists()


def test_recover_is_public() -> None:
    assert aioproj.recover is recover


async def test_the_recover_command(tmp_path: Path, tracking_uri: str) -> None:
    proc, pids = await _start_driver(tmp_path, 300)
    run_id = await _the_run_id(tracking_uri)
    await _kill_driver(proc)
    aioproj_cli = [sys.executable, "-m", "aioproj.cli", "recover"]
    dry = await anyio.run_process([*aioproj_cli, "--dry-run"])
    assert f"{run_id}  local       -         stopped its process group" in dry.stdout.decode()
    done = await anyio.run_process([*aioproj_cli, "--grace-period", "1"])
    assert f"{run_id}  local       KILLED    stopped its process group" in (done.stdout.decode())
    assert await _all_gone(await _pids(pids))
    again = await anyio.run_process(aioproj_cli)
    assert again.stdout.decode().strip() == "No runs to recover."


async def test_an_unwritable_journal_stops_runs_before_anything_is_made(
    tmp_path: Path, tracking_uri: str
) -> None:
    """No intent written ahead, no run: a JournalError that says where and what to do."""
    project = await amake_project(tmp_path / "proj", SLEEPER)
    blocked = tmp_path / "cache"
    await anyio.Path(blocked).write_text("a file where the cache directory should be")
    async with Runner(echo="off", cache_dir=blocked) as runner:
        with pytest.raises(JournalError, match="AIOPROJ_CACHE_DIR") as caught:
            await runner.run(
                str(project), parameters={"pids": str(tmp_path / "pids"), "seconds": 0},
                env_manager="local",
            )  # fmt: skip
    assert isinstance(caught.value, aioproj.AioprojError)
    assert str(blocked) in str(caught.value)
    assert await anyio.to_thread.run_sync(_store_is_empty, tracking_uri)
    assert not await anyio.Path(tmp_path / "pids").exists()


def _store_is_empty(tracking_uri: str) -> bool:
    from .support import _all_runs

    return _all_runs(tracking_uri) == []
