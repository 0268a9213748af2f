"""What every fetcher shares: the result type and the on-disk cache primitives.

The cache directory holds finished entries (``git/``, ``local/``, ``archives/``) and a
``tmp/`` folder where entries are built. An entry is built in its own temp dir and renamed
into place, so a reader never sees half an entry: rename is atomic on one filesystem, and
when another process renamed first, ours is dropped. Within one process a lock per entry
makes concurrent fetches of the same thing share one build (single-flight).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread

from aioproj._shared import SharedCalls
from aioproj.errors import SourceError

__all__ = [
    "CacheDir",
    "FetchedProject",
    "KeyedLocks",
    "SharedCalls",
    "find_subdirectory",
    "in_thread",
]

T = TypeVar("T")


@dataclass(frozen=True)
class FetchedProject:
    """A project ready to run, and the tracking tags that describe where it came from.

    ``directory`` is the absolute work dir (after ``#subdir``); ``uri`` the URI as given
    with quotes stripped. ``source_name``, ``git_commit``, ``git_repo_url`` and
    ``git_branch`` are the values of the ``mlflow.source.name``,
    ``mlflow.source.git.commit``, ``mlflow.source.git.repoURL`` and
    ``mlflow.source.git.branch`` tags (``None``: do not set the tag). None of them
    contains credentials; ``uri`` may (a ``https://user:token@host/...`` URL), so it is
    left out of ``repr()``: show ``source_name`` instead.
    """

    directory: Path
    uri: str = field(repr=False)
    source_name: str
    git_commit: str | None = None
    git_repo_url: str | None = None
    git_branch: str | None = None


async def in_thread(func: Callable[[], T]) -> T:
    """Run blocking ``func`` in a worker thread.

    Cancellation waits for the thread: workers call ``anyio.from_thread.check_cancelled()``
    between steps so that a cancelled fetch stops at the next step rather than running on.
    """
    return await anyio.to_thread.run_sync(func)


def find_subdirectory(base: Path, subdir: str, where: str) -> Path:
    """``base/subdir`` when it is a directory (blocking: call it in a worker thread).

    Raises:
        SourceError: "Could not find subdirectory ..." naming ``where`` (the project URI
            or directory the user knows).
    """
    if not subdir:
        return base
    candidate = base / subdir
    if not candidate.is_dir():
        raise SourceError(f"Could not find subdirectory {subdir} of {where}")
    return candidate


class KeyedLocks:
    """One ``anyio.Lock`` per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[anyio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Hold the lock of ``key``; other holders of the same key wait (cancellable)."""
        lock, users = self._locks.get(key, (anyio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _rename_into_place(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst``; False when ``dst`` already exists (someone else won)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
    except OSError:
        if dst.is_dir():
            return False
        raise
    return True


class CacheDir:
    """The cache layout under ``root`` and the build-then-rename protocol for entries."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.locks = KeyedLocks()
        self.shared = SharedCalls()

    def entry(self, *parts: str) -> Path:
        """The path of a finished entry, e.g. ``entry("git", url_key, commit)``."""
        return self.root.joinpath(*parts)

    async def exists(self, path: Path) -> bool:
        """Whether a finished entry (a directory) is present."""
        return await in_thread(path.is_dir)

    @asynccontextmanager
    async def temp_dir(self, prefix: str) -> AsyncIterator[Path]:
        """A fresh directory under ``tmp/``, removed on exit whatever happens.

        The removal is shielded from cancellation so a cancelled fetch leaves nothing.

        Raises:
            SourceError: the cache directory cannot be written.
        """

        def make() -> Path:
            self.tmp.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp))

        try:
            path = await in_thread(make)
        except OSError as exc:
            raise SourceError(
                f"Cannot create a temporary directory in the source cache {self.root}: {exc}. "
                "Set AIOPROJ_CACHE_DIR to a writable directory."
            ) from exc
        try:
            yield path
        finally:
            with anyio.CancelScope(shield=True):
                await in_thread(lambda: _remove_tree(path))

    async def publish(self, built: Path, entry: Path) -> None:
        """Move a finished build into place; if another process was first, keep theirs.

        Raises:
            SourceError: the cache directory cannot be written.
        """
        try:
            await in_thread(lambda: _rename_into_place(built, entry))
        except OSError as exc:
            raise SourceError(
                f"Cannot store {entry} in the source cache: {exc}. "
                "Set AIOPROJ_CACHE_DIR to a writable directory."
            ) from exc
