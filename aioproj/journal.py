"""The journal of active runs: what a driver leaves behind if it dies, and how to finish it.

Every run a :class:`~aioproj.Runner` starts gets a small JSON file in the journal
directory (``$AIOPROJ_CACHE_DIR/journal``, else ``~/.cache/aioproj/journal``): the run id,
its tracking URI, the backend, the driver process, and what the backend needs to find the
run again (for a local run, its process group). The file goes when the run's final status
is recorded. If recording fails (the tracking server is down), the status is kept in the
file instead, so it is not lost.

If the driver is killed (SIGKILL, OOM, a lost machine), its files stay. :func:`recover`
(the ``aioproj recover`` command) finds entries whose driver is gone, stops what is left of
their runs, and writes each run's final status: the kept status if there is one, KILLED
for a run it had to stop, FAILED (tagged with the reason) for a run that ended while
nobody watched, so its exit status is unknown.

Journal files can hold a tracking URI with credentials (a database password): they are
created with mode 0600 in a 0700 directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from aioproj._paths import cache_root
from aioproj.errors import AioprojError

__all__ = ["Journal", "JournalEntry", "RecoveredRun", "recover"]

logger = logging.getLogger("aioproj")

#: The tag that says a run's final status was written by :func:`recover`, and why.
RECOVERED_TAG = "aioproj.recovered"


def _proc_start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (Linux); None if unknown or gone.

    A pid and its start time name one process for good: pids are reused, the pair is not.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of stat(5), counted after "pid (comm)"
    except (OSError, IndexError, ValueError):
        return None


def _process_alive(pid: int, start_ticks: int | None) -> bool:
    """True if the process ``pid`` that started at ``start_ticks`` still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start_ticks is None or not sys.platform.startswith("linux"):
        return True
    return _proc_start_ticks(pid) == start_ticks


@dataclass
class JournalEntry:
    """One active run, as its driver recorded it."""

    run_id: str
    experiment_id: str
    tracking_uri: str = field(repr=False)  # may carry a database password
    backend: str
    driver_pid: int
    driver_start: int | None
    started_ms: int
    #: What the backend needs to find the run again (local: ``pgid``, ``leader_start``).
    state: dict[str, Any] = field(default_factory=dict)
    #: Set when the run ended but its status could not be recorded.
    final_status: str | None = None

    @property
    def driver_alive(self) -> bool:
        """True while the driver that started the run is running (blocking: reads /proc)."""
        return _process_alive(self.driver_pid, self.driver_start)


class Journal:
    """The journal directory. Every method does file I/O: call it in a worker thread."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else cache_root() / "journal"
        self._ready = False

    def _path(self, run_id: str) -> Path:
        return self.directory / f"{run_id}.json"

    def write(self, entry: JournalEntry) -> None:
        """Create or replace the entry of ``entry.run_id`` (atomically, mode 0600)."""
        if not self._ready:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._ready = True
        path = self._path(entry.run_id)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(entry), f)
        os.replace(tmp, path)

    def remove(self, run_id: str) -> None:
        """Forget a run whose final status is recorded."""
        with contextlib.suppress(FileNotFoundError):
            self._path(run_id).unlink()

    def entries(self) -> list[JournalEntry]:
        """Every entry; unreadable files are skipped with a warning."""
        out = []
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            path = self.directory / name
            try:
                data = json.loads(path.read_text())
                out.append(JournalEntry(**data))
            except FileNotFoundError:
                continue  # recorded and removed meanwhile
            except (OSError, ValueError, TypeError) as exc:
                logger.warning("Skipping unreadable journal file %s: %s", path, exc)
        return out

    def record_start(
        self,
        *,
        run_id: str,
        experiment_id: str,
        tracking_uri: str,
        backend: str,
        state: Mapping[str, Any],
    ) -> None:
        """Write the entry of a run this process has just started."""
        state = dict(state)
        if "pgid" in state:
            state["leader_start"] = _proc_start_ticks(int(state["pgid"]))
        self.write(
            JournalEntry(
                run_id=run_id,
                experiment_id=experiment_id,
                tracking_uri=tracking_uri,
                backend=backend,
                driver_pid=os.getpid(),
                driver_start=_proc_start_ticks(os.getpid()),
                started_ms=int(time.time() * 1000),
                state=state,
            )
        )

    def keep_final_status(self, run_id: str, status: str) -> None:
        """Keep the final status of a run whose status could not be recorded."""
        path = self._path(run_id)
        try:
            entry = JournalEntry(**json.loads(path.read_text()))
        except FileNotFoundError:
            return
        entry.final_status = status
        self.write(entry)


@dataclass(frozen=True)
class RecoveredRun:
    """What :func:`recover` found and did for one run."""

    run_id: str
    backend: str
    #: The status written to tracking (None if nothing was written).
    status: str | None
    #: What happened, in words: "stopped its process group", "kept status replayed", ...
    action: str


def _local_group_alive(state: Mapping[str, Any]) -> bool:
    from aioproj.backends._process import _live_members

    pgid = int(state.get("pgid", 0))
    if pgid <= 1:
        return False
    leader_start = state.get("leader_start")
    if leader_start is not None and sys.platform.startswith("linux"):
        now = _proc_start_ticks(pgid)
        if now is not None and now != leader_start:
            return False  # the pid was reused by a process that is not ours
    return _live_members(pgid)


def _kill_local_group(state: Mapping[str, Any], grace_period: float) -> None:
    """SIGTERM the group, wait up to ``grace_period``, SIGKILL what is left (blocking)."""
    pgid = int(state["pgid"])
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_period
    while time.monotonic() < deadline and _local_group_alive(state):
        time.sleep(0.05)
    if _local_group_alive(state):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _local_group_alive(state):
            time.sleep(0.05)


async def recover(
    *,
    journal_dir: str | Path | None = None,
    grace_period: float = 10.0,
    dry_run: bool = False,
) -> list[RecoveredRun]:
    """Finish the runs that a dead driver left behind; return what was done for each.

    Replays every final status that was kept because tracking failed, and looks at
    every other journal entry whose driver process is gone (runs of live drivers,
    including this process, are left alone). A local run whose process group
    still runs is stopped (SIGTERM, ``grace_period``, SIGKILL) and recorded KILLED; one
    that already ended is recorded FAILED, since its exit status is unknown. A remote
    run goes on without its driver: its backend's ``recover(state)`` method (where the
    backend has one) tells its real state; an ended run gets that status, a running one
    is left running and keeps its entry for a later call.
    Every status written by recover carries the tag ``aioproj.recovered`` saying why. An
    entry is removed once its status is recorded; if tracking is still unreachable it
    stays for the next call. With ``dry_run`` nothing is stopped or written.

    Raises nothing for one run's failure (it is logged and its entry kept); raises
    :class:`~aioproj.AioprojError` only if the journal directory cannot be read.
    Cancellation: a run being stopped is finished first (the stop is shielded).
    """
    journal = Journal(Path(journal_dir) if journal_dir is not None else None)
    try:
        entries = await anyio.to_thread.run_sync(journal.entries)
    except OSError as exc:
        raise AioprojError(f"Cannot read the run journal in {journal.directory}: {exc}") from exc
    out = []
    for entry in entries:
        # A kept status belongs to a run that has ended: replay it even if its driver lives.
        if entry.final_status is None and await anyio.to_thread.run_sync(_driver_alive, entry):
            continue
        out.append(await _recover_one(journal, entry, grace_period, dry_run))
    return out


def _driver_alive(entry: JournalEntry) -> bool:
    return entry.driver_alive


async def _recover_one(
    journal: Journal, entry: JournalEntry, grace_period: float, dry_run: bool
) -> RecoveredRun:
    status, reason, action = await _decide(entry, grace_period, dry_run)
    if dry_run or status is None:
        return RecoveredRun(entry.run_id, entry.backend, None, action)
    from aioproj.tracking import open_store

    store = await anyio.to_thread.run_sync(open_store, entry.tracking_uri)
    try:
        record = await store.get_run(entry.run_id)
        if record.status in ("FINISHED", "FAILED", "KILLED"):
            action += f"; tracking already had {record.status}"
            status = record.status
        else:
            await store.set_tags(entry.run_id, {RECOVERED_TAG: reason})
            await store.set_terminated(entry.run_id, status)
    except Exception as exc:  # tracking still down: keep the entry for the next call
        logger.error("Could not record run %s as %s: %s", entry.run_id, status, exc)
        if entry.final_status is None:
            await anyio.to_thread.run_sync(journal.keep_final_status, entry.run_id, status)
        return RecoveredRun(entry.run_id, entry.backend, None, f"{action}; tracking failed")
    finally:
        await store.aclose()
    await anyio.to_thread.run_sync(journal.remove, entry.run_id)
    logger.info("Recovered run %s: %s (%s)", entry.run_id, status, action)
    return RecoveredRun(entry.run_id, entry.backend, status, action)


async def _decide(
    entry: JournalEntry, grace_period: float, dry_run: bool
) -> tuple[str | None, str, str]:
    """(status to write, tag text, what was done) for one orphaned run."""
    if entry.final_status is not None:
        return (
            entry.final_status,
            "the driver ended the run but could not record it",
            ("kept status replayed"),
        )
    if entry.backend == "local":
        alive = await anyio.to_thread.run_sync(_local_group_alive, entry.state)
        if alive:
            if not dry_run:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_kill_local_group, entry.state, grace_period)
            return (
                "KILLED",
                "its driver died; aioproj recover stopped it",
                ("stopped its process group"),
            )
        return (
            "FAILED",
            "its driver died and it ended unwatched; exit status unknown",
            ("process group already gone"),
        )
    from aioproj.backends import load_backend

    backend = await anyio.to_thread.run_sync(load_backend, entry.backend)
    try:
        recover_remote = getattr(backend, "recover", None)
        if recover_remote is None:
            return None, "", f"the {entry.backend} backend cannot recover runs; left as is"
        status = await recover_remote(entry.state)
    finally:
        await backend.aclose()
    if status is None:
        return None, "", "still running on its backend; left as is"
    return (
        str(status),
        f"its driver died; its {entry.backend} run ended {status}",
        (f"{entry.backend} reports {status}"),
    )
