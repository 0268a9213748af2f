"""A run as a Slurm job: followed through the backend's shared poller, its output file
tailed into the run's output, cancelled with scancel."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio

from aioproj._output import RunOutput
from aioproj._status import RunStatus
from aioproj._threads import run_short

from ._cli import SlurmCli
from ._poller import Poller, Watch
from ._state import JobInfo, describe_end, normalize_state

__all__ = ["JobFiles", "SharedFiles", "SlurmExecution", "read_from", "remove_files"]

logger = logging.getLogger("aioproj.slurm")

_CHUNK = 1024 * 1024
#: Seconds between reads of a running job's output file: the shortest, the longest.
_TAIL_INTERVAL = (0.1, 2.0)


def read_from(path: Path, offset: int, limit: int = _CHUNK) -> bytes:
    """Up to ``limit`` bytes of ``path`` from ``offset``; nothing if it does not exist yet
    (blocking)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""


def remove_files(paths: tuple[str, ...]) -> None:
    """Remove files and directories; what is gone already is no error (blocking)."""
    for name in paths:
        path = Path(name)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@dataclass(eq=False)
class SharedFiles:
    """Files of a whole submission (an array's directory), removed by the last of its
    ``users`` runs to end."""

    paths: tuple[str, ...]
    users: int


@dataclass(eq=False)
class JobFiles:
    """What a run left on the shared filesystem, removed once it has ended: ``own`` its
    own files, ``shared`` those it shares with the other tasks of its array."""

    own: tuple[str, ...]
    shared: SharedFiles | None = None

    @property
    def journal(self) -> list[str]:
        """What ``aioproj recover`` removes if this process dies (the run's own files:
        other tasks of its array may still write next to them)."""
        return list(self.own)

    async def release(self) -> None:
        paths = self.own
        if self.shared is not None:
            self.shared.users -= 1
            if self.shared.users <= 0:
                paths += self.shared.paths
        with anyio.CancelScope(shield=True):
            try:
                await run_short(remove_files, paths)
            except OSError as exc:
                logger.warning("Could not remove %s: %s", ", ".join(paths), exc)


class SlurmExecution:
    """A run's Slurm job, as the handle sees it. ``job_id`` is Slurm's (``123``, or
    ``123_4`` for a task of a job array)."""

    waits_for_stop = False

    def __init__(
        self,
        *,
        job_id: str,
        cli: SlurmCli,
        poller: Poller,
        output: RunOutput,
        log_path: Path,
        files: JobFiles,
        set_tags: Callable[[Mapping[str, str]], Awaitable[None]],
    ) -> None:
        self.job_id = job_id
        self._cli = cli
        self._poller = poller
        self._watch = Watch(job_id)
        self._output = output
        self.log_path = log_path
        self._files = files
        self._set_tags = set_tags
        self._final: RunStatus | None = None
        self._cancel_sent = False
        self._released = False
        self._waiting = False
        #: Why the job waits (``Resources``, ``JobArrayTaskLimit``) or how it ended badly.
        self.detail: str | None = None
        #: What the run journal keeps to find the job again (set by the launch).
        self.journal_state: dict[str, object] = {}

    def __repr__(self) -> str:
        return f"<SlurmExecution job_id={self.job_id} {self.status().value}>"

    def status(self) -> RunStatus:
        return self._final or self._watch.status

    @property
    def info(self) -> JobInfo | None:
        """What Slurm said last about the job."""
        return self._watch.info

    async def wait(self) -> RunStatus:
        """Follow the job to its end through the shared poller, its output file into the
        run's output; return FINISHED, FAILED or KILLED.

        Raises :class:`BackendError` if Slurm cannot be asked any more (the job may go
        on; the handle cancels it). Cancellation stops following, not the job.
        """
        self._waiting = True
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._tail)
                await self._poller.follow(self._watch)
            if self._watch.error is not None:
                raise self._watch.error
            await self._ended()
            assert self._final is not None
            return self._final
        finally:
            self._waiting = False
            self._output.close()
            if self._watch.done.is_set() and self._watch.error is None:
                await self._release()

    async def _ended(self) -> None:
        watch = self._watch
        info = watch.info or JobInfo(state="")
        status = watch.status
        state = normalize_state(info.state)
        tags = {"slurm_job_state": state}
        if status is not RunStatus.FINISHED:
            self.detail = describe_end(self.job_id, info)
            if status is RunStatus.FAILED:
                tags["slurm_job_reason"] = self.detail
                self._output.feed(f"[aioproj] {self.detail}\n".encode())
        self._final = status
        try:
            await self._set_tags(tags)
        except Exception as exc:  # the status matters more than its tags
            logger.warning("Could not tag the run of Slurm job %s: %s", self.job_id, exc)

    async def _tail(self) -> None:
        """Feed the job's output file to the run's output while it runs, and the rest of
        it once it has ended."""
        watch = self._watch
        while watch.status is RunStatus.SCHEDULED and not watch.done.is_set():
            reason = watch.info.reason if watch.info is not None else ""
            if reason and reason not in ("None", "(null)"):
                self.detail = f"pending: {reason}"
            await watch.changed.wait()
        if self.detail is not None and self.detail.startswith("pending:"):
            self.detail = None
        offset = 0
        interval = _TAIL_INTERVAL[0]
        while True:
            ending = watch.done.is_set()
            data = await run_short(read_from, self.log_path, offset)
            if data:
                self._output.feed(data)
                offset += len(data)
                interval = _TAIL_INTERVAL[0]
                continue
            if ending:
                return
            with anyio.move_on_after(interval):
                await watch.done.wait()
            interval = min(_TAIL_INTERVAL[1], interval * 2)

    async def cancel(self) -> None:
        """``scancel`` the job and return once it has left RUNNING (Slurm reports it
        ended). Idempotent; a no-op once the job has ended.

        Raises :class:`BackendError` with scancel's message if it refused.
        """
        if self._watch.done.is_set():
            return
        if not self._cancel_sent:
            logger.info("Cancelling Slurm job %s", self.job_id)
            await self._cli.cancel([self.job_id])
            self._cancel_sent = True
        self._poller.nudge()
        await self._poller.follow(self._watch)
        if self._watch.error is None:
            if self._final is None:
                self._final = self._watch.status
            if not self._waiting:  # else wait() reads the rest of the log, then removes it
                await self._release()

    async def _release(self) -> None:
        if not self._released:
            self._released = True
            await self._files.release()
