"""The driver's side of the journal: one append-only file per driver, written ahead.

A :class:`Journal` is a file ``<id>.log`` of JSON lines (see :mod:`._records`) in the
journal directory, next to ``<id>.lock``, which the driver holds locked (``flock``) for
as long as it lives. The kernel drops that lock when the process dies, SIGKILL included,
so "is the driver alive?" is answered by trying the lock, with no pid that can be reused.

Writes are group commits. :meth:`Journal.note` queues a record; :meth:`Journal.commit`
queues one and waits until it is on disk. One worker-thread call writes every record
queued so far, so a burst of 200 run starts costs a handful of writes, not 200. A run's
intent is committed before anything of the run exists outside the driver; later facts
are noted and written with the next batch (a fact lost to a crash is found again by
``aioproj recover``: a process by its mark, a tracking run by its key).

The file keeps only what is live: once more than half of it describes finished runs, it
is rewritten with the records of unfinished runs alone. Files are mode 0600 in a 0700
directory: a record can hold a tracking URI with a database password.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import anyio

from aioproj._paths import cache_root
from aioproj._threads import run_short
from aioproj.errors import AioprojError

from ._records import VERSION, encode

if sys.platform != "win32":
    import fcntl

__all__ = ["Journal", "JournalError"]

#: Rewrite the file once it holds at least this many records of finished runs...
_COMPACT_AFTER = 2048
#: ... and they outnumber the records of live runs this many times.
_COMPACT_RATIO = 2


class JournalError(AioprojError):
    """The run journal cannot be written, so runs cannot be started safely.

    No run is created when its intent cannot be written ahead: without it, a crash of
    this process could leave a run that ``aioproj recover`` never finds.
    """


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def lock_path(log: Path) -> Path:
    """The lock file of a journal file."""
    return log.with_suffix(".lock")


def try_lock(path: Path, *, create: bool = False) -> int | None:
    """A descriptor holding ``flock(LOCK_EX)`` on ``path``, or None if another process
    holds it (or the file is missing and ``create`` is false). Blocking: use a thread."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        return None
    if sys.platform == "win32":  # pragma: no cover
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class Journal:
    """The write-ahead journal of one driver (one :class:`~aioproj.Runner`).

    Nothing is created until :meth:`open`. Every method that touches the file runs it in
    a worker thread; :meth:`note` only queues.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else cache_root() / "journal"
        #: ``<pid>-<random>``: names the files, and marks the driver's processes.
        self.id = f"{os.getpid()}-{os.urandom(4).hex()}"
        self.path = self.directory / f"{self.id}.log"
        self._lock_fd: int | None = None
        self._log_fd: int | None = None
        self._opening: anyio.Lock | None = None
        self._pending: list[bytes] = []
        self._writer: anyio.Event | None = None  # set when the write in flight is done
        self._scheduled = False  # a background write is about to start
        self._error: OSError | None = None
        #: The records of every unfinished run, by key, for compaction.
        self._live: dict[str, list[bytes]] = {}
        self._finished_records = 0
        self._start_soon: Callable[[Callable[[], Coroutine[Any, Any, None]]], object] | None
        self._start_soon = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<Journal {self.path}>"

    @property
    def opened(self) -> bool:
        return self._log_fd is not None

    # -- lifetime ----------------------------------------------------------------------

    async def open(
        self,
        start_soon: Callable[[Callable[[], Coroutine[Any, Any, None]]], object] | None = None,
    ) -> None:
        """Create the journal's files and take the lock (once; later calls return at once).

        ``start_soon`` starts the background writes of noted records (the runner's task
        group); without it they wait for the next commit, flush or close.

        Raises:
            JournalError: the directory or files cannot be created.
        """
        if self._log_fd is not None:
            return
        if self._opening is None:
            self._opening = anyio.Lock()
        async with self._opening:
            if self.opened:  # opened by the call that held the lock before
                return
            if self._closed:
                raise RuntimeError("This journal is closed.")
            try:
                await run_short(self._open_files)
            except OSError as exc:
                raise JournalError(
                    f"Cannot write the run journal in {self.directory}: {exc.strerror or exc}."
                    " aioproj writes each run's intent there before starting it, so that"
                    " `aioproj recover` can finish runs whose driver died; point"
                    " AIOPROJ_CACHE_DIR (or Runner(cache_dir=...)) at a writable directory."
                ) from exc
            self._start_soon = start_soon

    def _open_files(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = try_lock(lock_path(self.path), create=True)
        if lock is None:  # pragma: no cover - the id is random
            raise OSError(f"the lock {lock_path(self.path)} is held by another process")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            header = {"op": "driver", "v": VERSION, "id": self.id, "pid": os.getpid()}
            os.write(fd, encode({**header, "t": _now_ms()}))
        except BaseException:
            os.close(lock)
            raise
        self._lock_fd, self._log_fd = lock, fd

    async def aclose(self) -> None:
        """Write what is queued and release the lock. Idempotent; shielded.

        A journal with no unfinished run is removed; one that still has some (a final
        status tracking refused, a remote run left running) stays for ``aioproj
        recover``, which may take it over as soon as the lock is released.
        """
        if self._closed:
            return
        self._closed = True
        if self._log_fd is None:
            return
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(JournalError):
                await self.flush()
            await run_short(self._close_files)

    def _close_files(self) -> None:
        if not self._live:
            with contextlib.suppress(OSError):
                self.path.unlink()
            with contextlib.suppress(OSError):
                lock_path(self.path).unlink()
        for fd in (self._log_fd, self._lock_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._log_fd = self._lock_fd = None

    # -- records -----------------------------------------------------------------------

    def mark(self, key: str) -> str:
        """The mark (``AIOPROJ_RUN_MARK``) of the processes of the run ``key``."""
        return f"{self.id}/{key}"

    def note(self, key: str, op: str, **fields: Any) -> None:
        """Queue one record of the run ``key``; it is written with the next batch.

        ``done`` and ``void`` end the run's life in the journal.
        """
        if self._log_fd is None or self._closed:
            return
        line = encode({"op": op, "k": key, **fields})
        self._pending.append(line)
        if op in ("done", "void"):
            self._finished_records += len(self._live.pop(key, ())) + 1
        else:
            self._live.setdefault(key, []).append(line)
        if not self._scheduled and self._writer is None and self._start_soon is not None:
            try:
                self._start_soon(self._write_in_background)
                self._scheduled = True
            except RuntimeError:  # the task group is closed: the next flush writes it
                self._start_soon = None

    async def commit(self, key: str, op: str, **fields: Any) -> None:
        """Queue one record and return once it (and all queued before it) is on disk.

        Raises:
            JournalError: the journal cannot be written.
        """
        if self._log_fd is None:
            raise RuntimeError("Open the journal before committing to it.")
        self.note(key, op, **fields)
        await self.flush()

    async def intent(
        self,
        key: str,
        *,
        tracking_uri: str,
        backend: str,
        experiment_id: str,
        run_id: str | None = None,
        state: Mapping[str, Any] | None = None,
        kind: str = "run",
    ) -> None:
        """Commit the intent of a run: before its tracking run, process or job exists."""
        fields: dict[str, Any] = {
            "uri": tracking_uri,
            "backend": backend,
            "exp": experiment_id,
            "t": _now_ms(),
        }
        if kind != "run":
            fields["kind"] = kind
        if run_id is not None:
            fields["run"] = run_id
        if state:
            fields["state"] = dict(state)
        await self.commit(key, "intent", **fields)

    def live_keys(self) -> list[str]:
        """The runs of this journal that have not ended (for tests and close-down)."""
        return list(self._live)

    async def flush(self) -> None:
        """Return once every record queued so far is on disk.

        Raises:
            JournalError: the journal cannot be written.
        """
        with anyio.CancelScope(shield=True):
            while True:
                if self._writer is not None:
                    await self._writer.wait()
                    continue
                if not self._pending:
                    return
                await self._write_pending()
                if self._error is not None and self._pending:
                    raise self._journal_error(self._error)

    def _journal_error(self, exc: OSError) -> JournalError:
        return JournalError(f"Cannot write the run journal {self.path}: {exc.strerror or exc}.")

    async def _write_in_background(self) -> None:
        self._scheduled = False
        if self._writer is None:
            await self._write_pending()

    async def _write_pending(self) -> None:
        """Write batches until nothing is queued; others wait on ``self._writer`` meanwhile.

        Shielded: a write that started finishes, whatever is cancelled around it.
        """
        writer = self._writer = anyio.Event()
        try:
            with anyio.CancelScope(shield=True):
                while self._pending and self._log_fd is not None:
                    batch, self._pending = self._pending, []
                    try:
                        if self._should_compact():
                            snapshot = [line for lines in self._live.values() for line in lines]
                            self._finished_records = 0
                            await run_short(self._rewrite, snapshot)
                        else:
                            await run_short(self._append, b"".join(batch))
                    except OSError as exc:
                        self._error = exc
                        self._pending[:0] = batch  # kept for a later try
                        return
                    except BaseException:
                        # asyncio's own Task.cancel() (the loop shutting down) goes
                        # through anyio's shield: the batch waits for the final flush.
                        self._pending[:0] = batch
                        raise
                    self._error = None
        finally:
            self._writer = None
            writer.set()

    def _should_compact(self) -> bool:
        live = sum(map(len, self._live.values()))
        return (
            self._finished_records >= _COMPACT_AFTER
            and self._finished_records > _COMPACT_RATIO * live
        )

    def _append(self, data: bytes) -> None:
        assert self._log_fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._log_fd, view)
            view = view[written:]

    def _rewrite(self, lines: list[bytes]) -> None:
        """Replace the file with the header and ``lines`` (the records of live runs).

        The lock is on the lock file, so the driver keeps it across the rename.
        """
        header = {"op": "driver", "v": VERSION, "id": self.id, "pid": os.getpid()}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, encode({**header, "t": _now_ms()}) + b"".join(lines))
        finally:
            os.close(fd)
        new = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        os.replace(tmp, self.path)
        old, self._log_fd = self._log_fd, new
        if old is not None:
            os.close(old)
