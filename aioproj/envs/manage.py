"""Listing and pruning the environment cache (``aioproj envs list`` / ``aioproj envs prune``).

virtualenv and uv environments live in ``$MLFLOW_ENV_ROOT`` when it is set, else in
``<AIOPROJ_CACHE_DIR or ~/.cache/aioproj>/envs`` (:func:`aioproj.envs.env_root`); conda
record directories always live in the latter. Both places are scanned; only directories
aioproj names (``virtualenv-<hash>``, ``uv-<hash>``, ``conda-<hash>``) are considered, so
MLflow's own environments under ``$MLFLOW_ENV_ROOT`` are never touched.

Pruning takes each environment's build lock (``<dir>.lock``) without blocking: a build in
progress holds it, and such an environment is skipped. Under the lock the directory and
then its lock file are removed; a builder that had opened the old lock file notices that
it was deleted and takes the new one (:func:`aioproj.envs.cache._file_lock`). A run that
is *using* an environment holds no lock: pruning it with ``--all`` breaks that run, which
``--older-than`` avoids. Conda environments are not removed (conda owns them): prune
prints the ``conda remove`` command for those it would select.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shlex
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from aioproj._paths import cache_root

from .cache import MARKER_NAME, env_root, read_marker

__all__ = [
    "EnvEntry",
    "PruneOutcome",
    "default_env_roots",
    "list_envs",
    "prune_envs",
]

_NAME = re.compile(r"^(virtualenv|uv|conda)-[0-9a-f]{16}$")
_LOCK_SUFFIX = ".lock"


@dataclass(frozen=True)
class EnvEntry:
    """One cached environment.

    ``status`` is ``complete`` (its marker exists), ``building`` (no marker and a build
    holds its lock) or ``broken`` (no marker and nobody building: a crashed build).
    ``last_used`` is when a run last reused it (else when it was built), as a Unix time;
    ``size`` is in bytes (of the conda prefix for conda, when it is known).
    """

    manager: str
    directory: Path
    status: str
    size: int
    created: float | None
    last_used: float
    python_version: str | None
    conda_name: str | None = None
    conda_prefix: str | None = None

    @property
    def lock_file(self) -> Path:
        return self.directory.with_name(self.directory.name + _LOCK_SUFFIX)


@dataclass(frozen=True)
class PruneOutcome:
    """What :func:`prune_envs` did (or, in a dry run, would do) to one environment:
    ``action`` is ``removed``, ``would remove``, ``skipped`` (a build holds its lock),
    ``failed`` or ``conda`` (not removed: ``note`` has the command to do it)."""

    entry: EnvEntry
    action: str
    note: str = ""


def default_env_roots() -> list[Path]:
    """The directories scanned: ``$MLFLOW_ENV_ROOT`` (if set) and the aioproj cache."""
    default = cache_root() / "envs"
    roots = [env_root(default), default]
    return list(dict.fromkeys(roots))


async def list_envs(roots: Sequence[Path] | None = None) -> list[EnvEntry]:
    """The environments in ``roots`` (default: :func:`default_env_roots`), oldest use
    first. Scanning and sizing run in a worker thread."""
    chosen = list(roots) if roots is not None else default_env_roots()
    return await anyio.to_thread.run_sync(_scan, chosen)


async def prune_envs(
    *,
    older_than_days: float | None = None,
    remove_all: bool = False,
    dry_run: bool = False,
    roots: Sequence[Path] | None = None,
) -> list[PruneOutcome]:
    """Remove the selected virtualenv/uv environments and their lock files.

    Selected: broken ones always; with ``remove_all`` every one; with
    ``older_than_days`` those not used for that long. One whose build lock is held is
    skipped. Blocking work runs in a worker thread, one environment at a time.
    """
    entries = await list_envs(roots)
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    outcomes: list[PruneOutcome] = []
    for entry in entries:
        selected = (
            remove_all
            or entry.status == "broken"
            or (cutoff is not None and entry.last_used < cutoff)
        )
        if not selected:
            continue
        if entry.manager == "conda":
            outcomes.append(_conda_outcome(entry))
            continue
        outcomes.append(await anyio.to_thread.run_sync(_prune_one, entry, dry_run))
    return outcomes


# --- blocking helpers (worker thread) ----------------------------------------------


def _scan(roots: Sequence[Path]) -> list[EnvEntry]:
    entries: list[EnvEntry] = []
    seen: set[Path] = set()
    for root in roots:
        try:
            names = sorted(os.listdir(root))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            match = _NAME.match(name)
            directory = root / name
            if match is None or directory in seen or not directory.is_dir():
                continue
            seen.add(directory)
            entries.append(_entry(match.group(1), directory))
    entries.sort(key=lambda e: e.last_used)
    return entries


def _entry(manager: str, directory: Path) -> EnvEntry:
    marker = directory / MARKER_NAME
    try:
        info = read_marker(directory)
        last_used = marker.stat().st_mtime
        complete = True
    except (OSError, ValueError):
        info = {}
        complete = marker.is_file()
        last_used = _mtime(directory)
    status = "complete" if complete else "building" if _lock_held(directory) else "broken"
    created = info.get("created")
    python = info.get("python_version")
    name = info.get("name")
    prefix = info.get("prefix")
    sized = Path(prefix) if manager == "conda" and isinstance(prefix, str) else directory
    return EnvEntry(
        manager=manager,
        directory=directory,
        status=status,
        size=_size(sized),
        created=float(created) if isinstance(created, (int, float)) else None,
        last_used=last_used,
        python_version=str(python) if python else None,
        conda_name=str(name) if manager == "conda" and name else None,
        conda_prefix=str(prefix) if manager == "conda" and prefix else None,
    )


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _lock_held(directory: Path) -> bool:
    """True if a build holds ``<directory>.lock`` (probed without blocking)."""
    with _try_flock(directory.with_name(directory.name + _LOCK_SUFFIX), create=False) as got:
        return got is False


@contextlib.contextmanager
def _try_flock(path: Path, *, create: bool) -> Iterator[bool | None]:
    """Try ``flock(LOCK_EX | LOCK_NB)`` on ``path``: yields True (held by us until the
    block ends), False (somebody else holds it) or None (no lock file, not created)."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _prune_one(entry: EnvEntry, dry_run: bool) -> PruneOutcome:
    lock = entry.lock_file
    try:
        # A dry run only probes the lock (creating no file); a prune holds it throughout.
        with _try_flock(lock, create=not dry_run) as got:
            if got is False:
                return PruneOutcome(entry, "skipped", "a build in progress holds its lock")
            if dry_run:
                return PruneOutcome(entry, "would remove")
            # Marker first: whatever happens next, nobody uses a half-removed environment.
            with contextlib.suppress(FileNotFoundError):
                (entry.directory / MARKER_NAME).unlink()
            shutil.rmtree(entry.directory)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
    except OSError as exc:
        return PruneOutcome(entry, "failed", str(exc))
    return PruneOutcome(entry, "removed")


def _conda_outcome(entry: EnvEntry) -> PruneOutcome:
    name = entry.conda_name or "mlflow-<sha1 of conda.yaml>"
    command = f"conda remove --yes --name {shlex.quote(name)} --all && rm -r " + shlex.quote(
        str(entry.directory)
    )
    return PruneOutcome(entry, "conda", f"not removed (conda owns it); run: {command}")
