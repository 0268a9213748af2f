"""The environment cache: one directory per spec hash, built once, never seen half-built.

An environment lives in ``<cache_dir>/<manager>-<digest[:16]>``. It is complete when its
marker file (:data:`MARKER_NAME`) exists; the marker is written last, atomically, so a
directory without it is never used.

Builds are single-flight inside the process (concurrent callers for one directory queue
on one :class:`anyio.Lock`; the first builds, the others find the marker) and serialised
across processes by ``fcntl.flock`` on ``<dir>.lock``. Virtual environments are not
relocatable (``bin/activate`` and script shebangs contain their path), so the build
happens in the final directory while both locks are held: leftovers without a marker
(from a crashed build) are removed first, and a failed or cancelled build is removed
before the error propagates.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio

from aioproj.errors import EnvironmentBuildError

from .base import ENV_ROOT_VAR, env_root

__all__ = [
    "ENV_ROOT_VAR",
    "MARKER_NAME",
    "EnvBuild",
    "ensure_env_dir",
    "env_dir_for",
    "env_root",
    "is_complete",
    "read_marker",
]


#: The file whose presence means the environment in its directory is complete.
MARKER_NAME = ".aioproj-env.json"

#: Seconds between attempts to take another process's lock (doubling up to the maximum).
_LOCK_POLL_START = 0.02
_LOCK_POLL_MAX = 0.25


@dataclass
class _Flight:
    lock: anyio.Lock
    users: int = 0
    #: Why the build failed, for the callers that queued behind it.
    failure: str | None = None


#: In-process single flight: env directory → the lock its builders queue on.
_FLIGHTS: dict[str, _Flight] = {}


@dataclass(frozen=True)
class EnvBuild:
    """The outcome of :func:`ensure_env_dir`: the directory, whether this call built it
    and the marker's contents."""

    directory: Path
    built: bool
    info: Mapping[str, object]


def env_dir_for(cache_dir: Path, manager: str, digest: str) -> Path:
    """``<cache_dir>/<manager>-<digest[:16]>``."""
    return cache_dir / f"{manager}-{digest[:16]}"


def is_complete(directory: Path) -> bool:
    """True if ``directory`` holds a complete environment (blocking; use a thread)."""
    return (directory / MARKER_NAME).is_file()


def read_marker(directory: Path) -> dict[str, object]:
    """The marker's JSON (blocking). Raises OSError or ValueError if it is unreadable."""
    data = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


async def ensure_env_dir(
    directory: Path, build: Callable[[Path], Awaitable[Mapping[str, object]]]
) -> EnvBuild:
    """Return ``directory`` complete, calling ``build(directory)`` only if nobody built it.

    ``build`` fills the (absent) directory and returns what to record in the marker.
    Its exceptions propagate after the directory is removed; callers that were waiting
    for that build meanwhile get an :class:`EnvironmentBuildError` with the same message
    rather than building again (later callers build anew). Cancellation while waiting
    for a lock simply stops waiting; cancellation during a build removes the partial
    directory (shielded) and propagates.
    """
    if await _complete(directory):
        return EnvBuild(directory, built=False, info=await _marker(directory))
    key = str(directory)
    flight = _FLIGHTS.get(key)
    if flight is None:
        flight = _FLIGHTS[key] = _Flight(anyio.Lock())
    flight.users += 1
    try:
        async with flight.lock:
            if flight.failure is not None:
                # The build these callers queued behind failed: a sweep's hundred runs
                # get its error at once instead of failing the same build in turn.
                raise EnvironmentBuildError(flight.failure)
            try:
                return await _build_once(directory, build)
            except Exception as exc:
                flight.failure = str(exc)
                raise
    finally:
        flight.users -= 1
        if flight.users == 0:
            del _FLIGHTS[key]


async def _build_once(
    directory: Path, build: Callable[[Path], Awaitable[Mapping[str, object]]]
) -> EnvBuild:
    if await _complete(directory):
        return EnvBuild(directory, built=False, info=await _marker(directory))
    async with _file_lock(directory.with_name(directory.name + ".lock")):
        if await _complete(directory):
            return EnvBuild(directory, built=False, info=await _marker(directory))
        info = await _build_in_place(directory, build)
        return EnvBuild(directory, built=True, info=info)


async def _build_in_place(
    directory: Path, build: Callable[[Path], Awaitable[Mapping[str, object]]]
) -> Mapping[str, object]:
    await anyio.to_thread.run_sync(_remove_tree, directory)
    started = time.monotonic()
    try:
        info = dict(await build(directory))
        info.setdefault("build_seconds", round(time.monotonic() - started, 3))
        info.setdefault("built_by_pid", os.getpid())
        info.setdefault("created", time.time())
        await anyio.to_thread.run_sync(_write_marker, directory, info)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_remove_tree, directory)
        raise
    return info


@contextlib.asynccontextmanager
async def _file_lock(path: Path) -> AsyncIterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``path``, created if missing.

    The lock is tried without blocking in a worker thread and retried after a short
    async sleep, so waiting for another process is cancellable and holds no thread.
    """
    while True:
        fd = await anyio.to_thread.run_sync(_open_lock_file, path)
        try:
            delay = _LOCK_POLL_START
            while not await anyio.to_thread.run_sync(_try_lock, fd):
                await anyio.sleep(delay)
                delay = min(delay * 2, _LOCK_POLL_MAX)
            # ``aioproj envs prune`` deletes lock files while holding them: a lock taken
            # on a deleted (or replaced) file protects nothing, so take the new one.
            if await anyio.to_thread.run_sync(_is_current, fd, path):
                yield
                return
        finally:
            # Closing the descriptor releases the lock.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(os.close, fd)


def _is_current(fd: int, path: Path) -> bool:
    """True if ``fd`` is still the file at ``path`` (not unlinked or replaced)."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _open_lock_file(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


async def _complete(directory: Path) -> bool:
    return await anyio.to_thread.run_sync(is_complete, directory)


async def _marker(directory: Path) -> Mapping[str, object]:
    """The marker's contents ({} if unreadable); its mtime is set to now, which is when
    the environment was last used (``aioproj envs list`` / ``prune --older-than``)."""
    try:
        return await anyio.to_thread.run_sync(_read_and_touch, directory)
    except (OSError, ValueError):
        return {}


def _read_and_touch(directory: Path) -> dict[str, object]:
    info = read_marker(directory)
    with contextlib.suppress(OSError):  # a read-only cache is still usable
        os.utime(directory / MARKER_NAME)
    return info


def _write_marker(directory: Path, info: Mapping[str, object]) -> None:
    """Write the marker atomically: a temp file renamed over the final name."""
    temp = directory / (MARKER_NAME + ".tmp")
    temp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(temp, directory / MARKER_NAME)


def _remove_tree(directory: Path) -> None:
    if directory.is_symlink() or directory.is_file():
        directory.unlink()
    elif directory.exists():
        shutil.rmtree(directory)
