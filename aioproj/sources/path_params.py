"""The download phase of a run's preparation: ``path`` parameters given as URIs.

As MLflow (``_project_spec.Parameter._compute_path_value`` with the directory of
``utils._get_storage_dir``): a ``path`` parameter whose value is a URI (``runs:/``,
``s3://``, ``https://``...) is downloaded into ``<new dir under storage_dir>/param_<i>/``
(``i``: the parameter's position in the entry point; the system temp dir when no
``storage_dir`` is given) and the command gets the local path, while tracking records the
URI as given. Local paths are left as they are.

Differences, for runs started together: runs whose preparation overlaps share one
download of a URI (a sweep of 200 runs over one model downloads it once), each run holding
a lease on it. A download that no started run uses is removed (the run failed or was
cancelled before it started, or the download itself failed); once a run has started, its
files stay, as MLflow leaves them.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from aioproj.errors import ExecutionError
from aioproj.project import EntryPoint, Project, ResolvedParameters, resolve_parameters
from aioproj.sources.artifacts import download_uri, is_remote_path
from aioproj.sources.uri import redact_url

if TYPE_CHECKING:
    from aioproj.tracking.base import TrackingStore

__all__ = ["Localized", "PathDownloads", "remote_path_parameters"]

logger = logging.getLogger("aioproj")

T = TypeVar("T")


def remote_path_parameters(entry_point: EntryPoint, resolved: ResolvedParameters) -> list[str]:
    """The declared ``path`` parameters whose value is a URI to download, in order."""
    return [
        name
        for name, parameter in entry_point.parameters.items()
        if parameter.type == "path"
        and isinstance(value := resolved.values.get(name), str)
        and is_remote_path(value)
    ]


@dataclass
class _Download:
    """One download of one URI, shared by the runs that asked for it while it ran."""

    done: anyio.Event = field(default_factory=anyio.Event)
    root: Path | None = None  # the new directory under storage_dir, removed if unused
    path: Path | None = None  # what the commands get
    error: Exception | None = None
    users: int = 0  # runs holding (or waiting for) it
    kept: bool = False  # a run that uses it has started: never removed


@dataclass
class Localized:
    """A run's parameters with its downloads in place, and its hold on those downloads.

    Call :meth:`keep` once the run has started; :meth:`release` always (it removes the
    downloads no started run uses).
    """

    parameters: ResolvedParameters
    _downloads: list[_Download]
    _owner: PathDownloads
    _released: bool = False

    def keep(self) -> None:
        """The run started with these files: they stay, as MLflow leaves them."""
        for download in self._downloads:
            download.kept = True

    async def release(self) -> None:
        """Let go of the downloads (shielded; idempotent)."""
        if self._released:
            return
        self._released = True
        for download in self._downloads:
            await self._owner._release(download)


class PathDownloads:
    """Downloads ``path`` parameters for the runs of one Runner (single-flight per URI)."""

    def __init__(self) -> None:
        self._flights: dict[str, _Download] = {}

    async def localize(
        self,
        project: Project,
        entry_point: EntryPoint,
        parameters: Mapping[str, Any] | None,
        resolved: ResolvedParameters,
        *,
        storage_dir: Path | None,
        store: TrackingStore,
    ) -> Localized:
        """Download the remote ``path`` values of ``resolved``; the parameters with the
        local paths in the command (``logged`` keeps the URIs).

        Raises:
            SourceError: a download failed (nothing is left of it).
            ExecutionError: a scheme needs ``aioproj[mlflow]``, which is not installed.

        Cancellation removes what this run alone was downloading.
        """
        names = remote_path_parameters(entry_point, resolved)
        position = {name: i for i, name in enumerate(entry_point.parameters)}
        held: list[_Download] = []
        localized = Localized(resolved, held, self)
        try:
            local: dict[str, str] = {}
            for name in names:
                uri = str(resolved.values[name])
                key = "\0".join((store.uri, str(storage_dir), uri))
                start = functools.partial(
                    self._download, uri, f"param_{position[name]}", storage_dir, store
                )
                download = await self._join(key, start)
                held.append(download)
                assert download.path is not None
                local[name] = str(download.path)
            overrides = {**(parameters or {}), **local}
            again = await anyio.to_thread.run_sync(
                resolve_parameters, project, entry_point, overrides
            )
        except BaseException:
            await localized.release()
            raise
        localized.parameters = ResolvedParameters(
            values=again.values, logged=resolved.logged, command=again.command
        )
        return localized

    async def alongside(
        self,
        prepare: Callable[[], Awaitable[T]],
        download: Callable[[], Awaitable[Localized]],
    ) -> tuple[T, Localized]:
        """Run ``prepare()`` (the backend's preparation) and ``download()`` at once.

        The first to fail cancels the other and its error is raised (never a group);
        a cancellation of the caller cancels both. Downloads are released on failure.
        """
        results: list[T] = []
        localized: list[Localized] = []
        errors: list[Exception] = []
        try:
            async with anyio.create_task_group() as tg:

                async def fetch() -> None:
                    try:
                        localized.append(await download())
                    except Exception as exc:
                        errors.append(exc)
                        tg.cancel_scope.cancel()

                tg.start_soon(fetch)
                try:
                    results.append(await prepare())
                except Exception as exc:
                    errors.append(exc)
                    tg.cancel_scope.cancel()
        except BaseException:
            for item in localized:
                await item.release()
            raise
        if errors:
            for item in localized:
                await item.release()
            raise errors[0]
        return results[0], localized[0]

    async def _join(self, key: str, start: Callable[[], Awaitable[tuple[Path, Path]]]) -> _Download:
        """The download of ``key`` in flight, or a new one this call leads; held once."""
        while True:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = _Download(users=1)
                try:
                    flight.root, flight.path = await start()
                except BaseException as exc:
                    if isinstance(exc, Exception):
                        flight.error = exc
                    flight.users -= 1
                    raise
                finally:
                    # Later runs download afresh: what the URI names may have changed.
                    del self._flights[key]
                    flight.done.set()
                return flight
            flight.users += 1
            try:
                await flight.done.wait()
            except BaseException:
                await self._release(flight)
                raise
            if flight.error is not None:
                flight.users -= 1
                raise copy.copy(flight.error) from flight.error
            if flight.path is not None:
                return flight
            flight.users -= 1  # its leader was cancelled: lead a new one

    async def _download(
        self, uri: str, subdir: str, storage_dir: Path | None, store: TrackingStore
    ) -> tuple[Path, Path]:
        """A new directory under ``storage_dir`` holding ``uri``'s download; removed again
        if the download fails or is cancelled."""
        root = await anyio.to_thread.run_sync(_new_storage_dir, storage_dir)
        logger.info(
            "=== Created directory %s for downloading remote URIs passed to arguments of"
            " type 'path' ===",
            root,
        )
        try:
            target = root / subdir
            await anyio.Path(target).mkdir()
            local = await download_uri(uri, target, store=store)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_remove, root)
            raise
        logger.info("Downloaded %s to %s", redact_url(uri), local)
        return root, local

    async def _release(self, download: _Download) -> None:
        download.users -= 1
        if download.users == 0 and not download.kept and download.root is not None:
            root, download.root = download.root, None
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_remove, root)


def _new_storage_dir(storage_dir: Path | None) -> Path:
    """MLflow's ``_get_storage_dir``: a new directory in ``storage_dir`` (made if missing),
    or in the system temp dir.

    Raises ExecutionError if it cannot be made.
    """
    try:
        if storage_dir is not None:
            os.makedirs(storage_dir, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=storage_dir))
    except OSError as exc:
        raise ExecutionError(
            f"Could not make a directory in {storage_dir or tempfile.gettempdir()} for the"
            f" downloads of `path` parameters: {exc.strerror or exc}. Give a writable"
            " storage_dir (--storage-dir, MLFLOW_TMP_DIR)."
        ) from exc


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
