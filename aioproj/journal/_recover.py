"""``aioproj recover``: finish what dead drivers left, from their journals.

For every journal whose driver is gone (its lock is free), each unfinished run is
brought to a true final status, whatever point the driver died at:

- its final status was noted but not recorded: that status, with its real end time;
- processes carrying its mark still run: they are stopped (SIGTERM, grace, SIGKILL) and
  the run is KILLED;
- its shell wrote its exit code: FINISHED for 0, else FAILED, with the real end time;
- it ended unwatched with no exit code on record: FAILED, exit status unknown;
- its driver died before it started it: FAILED (a tracking run created but never
  started), or nothing at all when not even the tracking run exists;
- a remote run (Databricks, Kubernetes, Slurm...) gets the status its backend reports,
  or stays in the journal while it still runs;
- a sweep's parent run: KILLED, as its sweep was cut short.

Live drivers' journals are only read for final statuses their tracking store refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from aioproj._paths import cache_root, remove_orphaned_temps
from aioproj.errors import AioprojError

from ._log import lock_path, try_lock
from ._procs import find_marked, stop_marked
from ._records import RunState, encode, fold, parse_lines

__all__ = ["RECOVERED_TAG", "RecoveredRun", "plan_run", "recover"]

logger = logging.getLogger("aioproj")

#: The tag that says a run's final status was written by :func:`recover`, and why.
RECOVERED_TAG = "aioproj.recovered"


@dataclass(frozen=True)
class RecoveredRun:
    """What :func:`recover` found and did for one run."""

    run_id: str
    backend: str
    #: The status written to tracking (None if nothing was written).
    status: str | None
    #: What happened, in words: "stopped its processes", "kept status replayed", ...
    action: str


@dataclass(frozen=True)
class Plan:
    """What to write for one run (pure decision; see :func:`plan_run`)."""

    #: The final status to record; None when there is nothing to record (yet).
    status: str | None
    end_ms: int | None
    #: The text of the ``aioproj.recovered`` tag.
    reason: str
    #: What was done, for the report.
    action: str


def plan_run(run: RunState, *, processes_alive: bool, now_ms: int) -> Plan:
    """The final status of an unfinished run of a dead driver, from its journal alone.

    Remote runs whose backend must be asked are not decided here (see :func:`recover`).
    """
    kept = "the driver ended the run but could not record it"
    if run.status is not None:
        action = "kept status replayed"
        if processes_alive:
            action += "; stopped leftover processes"
        return Plan(run.status, run.end_ms, kept, action)
    if run.kind == "sweep":
        return Plan("KILLED", now_ms, "its driver died during the sweep", "sweep cut short")
    if processes_alive:
        reason = "its driver died; aioproj recover stopped it"
        return Plan("KILLED", now_ms, reason, "stopped its process group")
    if run.exit_code is not None:
        code = run.exit_code
        return Plan(
            "FINISHED" if code == 0 else "FAILED",
            run.exit_ms or now_ms,
            f"its driver died; it ended on its own with exit code {code}",
            f"ended unwatched with exit code {code}",
        )
    if run.started:
        reason = "its driver died and it ended unwatched; exit status unknown"
        return Plan("FAILED", now_ms, reason, "process group already gone")
    return Plan("FAILED", now_ms, "its driver died before the run could start", "never started")


@dataclass
class _JournalFile:
    path: Path
    journal_id: str
    runs: dict[str, RunState]
    #: The driver is gone: its runs are ours to finish.
    dead: bool
    #: The journal's lock, held while recovering a dead driver's journal (not in a dry run).
    lock_fd: int | None = None
    #: Records to append once done.
    notes: list[bytes] = field(default_factory=list)

    def todo(self) -> list[RunState]:
        """Unfinished runs that are ours: all of a dead driver's, a live one's kept ones."""
        return [r for r in self.runs.values() if not r.done and (self.dead or r.kept)]


async def recover(
    *,
    journal_dir: str | Path | None = None,
    grace_period: float = 10.0,
    dry_run: bool = False,
) -> list[RecoveredRun]:
    """Finish the runs that dead drivers left behind; return what was done for each.

    Every journal whose driver process is gone is taken over (its lock) and each of its
    unfinished runs gets a true final status (see this module's docstring); processes
    that still carry one of its marks (runs, environment builds) are stopped first
    (SIGTERM, ``grace_period``, SIGKILL). Journals of live drivers, this process's
    included, are only read for final statuses their tracking store refused, which are
    written now. Every status written carries the tag ``aioproj.recovered`` saying why,
    and the end time the journal knows. A run whose status cannot be written yet
    (tracking unreachable, a remote run still running) stays for a later call. With
    ``dry_run`` nothing is stopped or written.

    Raises nothing for one run's failure (it is logged and its entry kept); raises
    :class:`~aioproj.AioprojError` only if the journal directory cannot be read.
    Cancellation: a stop in progress is finished first (it is shielded), and journals
    taken over are released.
    """
    directory = Path(journal_dir) if journal_dir is not None else cache_root() / "journal"
    try:
        files = await anyio.to_thread.run_sync(_load_journals, directory, dry_run)
    except OSError as exc:
        raise AioprojError(f"Cannot read the run journal in {directory}: {exc}") from exc
    stores: dict[str, Any] = {}
    out: list[RecoveredRun] = []
    try:
        dead_ids = {f.journal_id for f in files if f.dead}
        marked = await anyio.to_thread.run_sync(find_marked, dead_ids)
        todo = [(journal, run) for journal in files for run in journal.todo()]
        now = time.time_ns() // 1_000_000
        plans = []
        for journal, run in todo:
            alive = journal.dead and f"{journal.journal_id}/{run.key}" in marked
            containers = await _stop_containers(run, grace_period, dry_run) if journal.dead else 0
            plan = await _plan(run, alive or containers > 0, now)
            if containers and plan.status == "KILLED":
                plan = _container_stopped(plan, alive)
            plans.append(plan)
        if not dry_run and dead_ids:
            # Every leftover process of the dead drivers, builds included, in one stop.
            await _stop(dead_ids, grace_period)
            # What killed processes left in the temp dir: environment build steps' TMPDIR
            # (once their processes are stopped), the Databricks backend's code tarballs.
            for kind in ("build", "databricks"):
                await anyio.to_thread.run_sync(remove_orphaned_temps, kind)
            # A run that ended on its own meanwhile wrote its exit code: that is its truth.
            exits = await anyio.to_thread.run_sync(_reread_exits, files)
            for index, (journal, run) in enumerate(todo):
                ended = exits.get((journal.journal_id, run.key))
                if plans[index].status == "KILLED" and ended is not None and ended[0] < 128:
                    run.exit_code, run.exit_ms = ended
                    plans[index] = plan_run(run, processes_alive=False, now_ms=now)
        unseen: list[tuple[_JournalFile, RunState, Plan]] = []
        for (journal, run), plan in zip(todo, plans, strict=True):
            result = await _record(run, plan, dry_run, stores, settled=False)
            if result is not None:
                out.append(result)
            elif not run.done:
                unseen.append((journal, run, plan))
            if run.done:
                journal.notes.append(encode({"op": "done", "k": run.key}))
        if unseen:
            # A create the dead driver sent may still be on its way to the server: look
            # once more when the journal has been quiet for a while.
            delay = await anyio.to_thread.run_sync(
                _settle_delay, [journal for journal, _, _ in unseen]
            )
            await anyio.sleep(delay)
            for journal, run, plan in unseen:
                result = await _record(run, plan, dry_run, stores, settled=True)
                if result is not None:
                    out.append(result)
                if run.done:
                    journal.notes.append(encode({"op": "done", "k": run.key}))
    finally:
        with anyio.CancelScope(shield=True):
            for store in stores.values():
                with contextlib.suppress(Exception):
                    await store.aclose()
            await anyio.to_thread.run_sync(_settle_journals, files)
    return out


async def _stop_containers(run: RunState, grace_period: float, dry_run: bool) -> int:
    """docker_env runs: their container outlives the docker CLI that started it, so it is
    found by its ``aioproj.run_id`` label and stopped first (the CLI then ends on its own).
    Returns how many containers there were (a dry run only counts them)."""
    if "docker" not in run.state or run.run_id is None or run.status is not None:
        return 0
    from aioproj.envs.containers import recover_containers

    try:
        with anyio.CancelScope(shield=not dry_run):
            return await recover_containers(
                run.run_id, run.state, grace_period=grace_period, dry_run=dry_run
            )
    except AioprojError as exc:
        logger.error("Run %s: %s", run.run_id, exc)
    return 0


def _container_stopped(plan: Plan, processes_alive: bool) -> Plan:
    action = "stopped its docker container" + (" and process group" if processes_alive else "")
    return Plan(plan.status, plan.end_ms, plan.reason, action)


#: Seconds a dead driver's journal must have been quiet before a run its driver was
#: creating on a tracking server is taken as never created.
_SETTLE = 3.0


def _settle_delay(journals: list[_JournalFile]) -> float:
    """How long until every journal has been quiet for :data:`_SETTLE` seconds."""
    quiet = time.time() - _SETTLE
    newest = max((_mtime(j.path) for j in journals), default=0.0)
    return max(0.0, min(_SETTLE, newest - quiet))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _local_store(uri: str) -> bool:
    """The file store creates runs in this process: nothing of it can be in flight."""
    return uri.startswith("file:") or "://" not in uri


async def _stop(journal_ids: set[str], grace_period: float) -> None:
    if journal_ids:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(stop_marked, journal_ids, grace_period)


async def _plan(run: RunState, processes_alive: bool, now: int) -> Plan:
    """What to record for one run: from the journal, or from its remote backend."""
    if run.backend not in ("local", "") and run.kind == "run" and run.status is None:
        return await _plan_remote(run, now)
    return plan_run(run, processes_alive=processes_alive, now_ms=now)


async def _record(
    run: RunState, plan: Plan, dry_run: bool, stores: dict[str, Any], *, settled: bool
) -> RecoveredRun | None:
    """Write one run's planned status; sets ``run.done`` once nothing is left to do.

    None when there was no run to speak of: the driver died before creating it. Until
    ``settled``, a run not found on a store that picks run ids itself (a server, a
    database) is not given up on yet (``run.done`` stays False): its create may still
    be on its way.
    """
    label = run.run_id or f"(journal key {run.key})"
    if dry_run or plan.status is None:
        return RecoveredRun(label, run.backend, None, plan.action)
    try:
        store = stores.get(run.tracking_uri)
        if store is None:
            from aioproj.tracking import open_store

            store = stores[run.tracking_uri] = await anyio.to_thread.run_sync(
                open_store, run.tracking_uri
            )
        run_id = run.run_id
        if run_id is None:
            run_id = await store.find_run(run.experiment_id, run.key)
            if run_id is None:  # the driver died before the tracking run existed
                run.done = settled or _local_store(run.tracking_uri)
                return None
        record = await store.get_run(run_id)
        status, action = plan.status, plan.action
        if record.status in ("FINISHED", "FAILED", "KILLED"):
            status, action = record.status, f"{action}; tracking already had {record.status}"
        else:
            await store.set_tags(run_id, {RECOVERED_TAG: plan.reason})
            await store.set_terminated(run_id, status, end_time_ms=plan.end_ms)
    except Exception as exc:  # tracking still down: keep the entry for the next call
        logger.error("Could not record run %s as %s: %s", label, plan.status, exc)
        return RecoveredRun(label, run.backend, None, f"{plan.action}; tracking failed")
    run.done = True
    logger.info("Recovered run %s: %s (%s)", run_id, status, action)
    return RecoveredRun(run_id, run.backend, status, action)


async def _plan_remote(run: RunState, now: int) -> Plan:
    """Ask the run's backend how it ended (status None while it runs)."""
    from aioproj.backends import load_backend

    try:
        backend = await anyio.to_thread.run_sync(load_backend, run.backend)
    except AioprojError as exc:
        return Plan(None, None, "", f"cannot load the {run.backend} backend: {exc}")
    try:
        ask = getattr(backend, "recover", None)
        if ask is None:
            return Plan(
                None, None, "", f"the {run.backend} backend cannot recover runs; left as is"
            )
        state = dict(run.state)
        if run.run_id is not None:
            state.setdefault("mlflow_run_id", run.run_id)
        state.setdefault("started", run.started)
        try:
            answer = await ask(state)
        except Exception as exc:
            return Plan(None, None, "", f"asking {run.backend} failed: {exc}")
    finally:
        await backend.aclose()
    if answer is None:
        return Plan(None, None, "", "still running on its backend; left as is")
    status, end = answer if isinstance(answer, tuple) else (answer, None)
    return Plan(
        str(status), end or now, f"its driver died; its {run.backend} run ended {status}",
        f"{run.backend} reports {status}",
    )  # fmt: skip


# -- the journal directory (blocking; in a worker thread) ---------------------------------


def _load_journals(directory: Path, dry_run: bool) -> list[_JournalFile]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.endswith(".log") and not name.startswith("."):
            loaded = _load_log(directory / name, dry_run)
            if loaded is not None:
                out.append(loaded)
    return out


def _load_log(path: Path, dry_run: bool) -> _JournalFile | None:
    """A journal, locked if its driver is dead (and this is no dry run)."""
    fd = _take_over(path)
    try:
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # its driver closed it meanwhile
            return None
        header, runs = fold(parse_lines(data))
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    if fd is not None and dry_run:  # look, do not take over
        os.close(fd)
        fd = None
        dead = True
    else:
        dead = fd is not None
    journal_id = str((header or {}).get("id") or path.stem)
    return _JournalFile(path, journal_id, runs, dead, fd)


#: Seconds to wait for the lock of a journal whose driver is gone (see _take_over).
_HANDOVER = 5.0


def _take_over(path: Path) -> int | None:
    """The journal's lock if its driver is dead, else None.

    A driver killed while it was starting a process leaves that process, between its
    ``fork`` and its ``exec``, holding the driver's descriptors for a moment, the lock
    among them: when the driver's pid is gone, the lock is tried again for a few seconds.
    """
    fd = try_lock(lock_path(path), create=True)
    if fd is not None:
        return fd
    driver = _driver_pid(path)
    if driver is None or _pid_exists(driver):
        return None
    deadline = time.monotonic() + _HANDOVER
    while fd is None and time.monotonic() < deadline:
        time.sleep(0.02)
        fd = try_lock(lock_path(path), create=True)
    return fd


def _driver_pid(path: Path) -> int | None:
    """The driver pid the journal's name starts with (``<pid>-<random>.log``)."""
    head = path.name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reread_exits(files: list[_JournalFile]) -> dict[tuple[str, str], tuple[int, int | None]]:
    """The exit records of dead drivers' journals, read again: (journal, key) -> (code, ms)."""
    out: dict[tuple[str, str], tuple[int, int | None]] = {}
    for journal in files:
        if not journal.dead:
            continue
        try:
            _, runs = fold(parse_lines(journal.path.read_bytes()))
        except OSError:
            continue
        for key, run in runs.items():
            if run.exit_code is not None:
                out[journal.journal_id, key] = (run.exit_code, run.exit_ms)
    return out


def _settle_journals(files: list[_JournalFile]) -> None:
    """Append what was done, remove finished dead journals, release their locks."""
    for journal in files:
        try:
            if journal.lock_fd is not None and all(r.done for r in journal.runs.values()):
                with contextlib.suppress(FileNotFoundError):
                    journal.path.unlink()
                with contextlib.suppress(FileNotFoundError):
                    lock_path(journal.path).unlink()
            elif journal.notes:
                with open(journal.path, "ab") as f:
                    f.write(b"".join(journal.notes))
        except OSError as exc:
            logger.error("Could not update the run journal %s: %s", journal.path, exc)
        finally:
            if journal.lock_fd is not None:
                os.close(journal.lock_fd)
                journal.lock_fd = None
