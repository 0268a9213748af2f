"""SourceCache: turns a project URI and a version into a directory to run in.

It dispatches on the URI (existing local path, archive, git URL), owns the on-disk cache of
clones, exports and extracted archives, the in-process single-flight locks, and the HTTP
client used for archive downloads.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING

import anyio

from aioproj.errors import SourceError
from aioproj.sources._store import CacheDir, FetchedProject, in_thread
from aioproj.sources.uri import (
    ProjectURI,
    archive_kind,
    check_git_url,
    is_file_uri,
    is_git_uri,
    is_http_uri,
    local_path_of,
    looks_like_local_path,
    parse_project_uri,
    redact_url,
)

if TYPE_CHECKING:
    import httpx

__all__ = ["SourceCache", "default_cache_root"]


_fetchers: dict[str, ModuleType] = {}


async def _fetcher(name: str) -> ModuleType:
    """Import a fetcher module on first use, in a worker thread.

    They pull in dulwich and httpx: importing them lazily keeps ``import aioproj`` light,
    and importing them off the loop keeps the event loop from stalling on it.
    """
    module = _fetchers.get(name)
    if module is None:
        # Not sys.modules: while another thread imports it, it is there half initialised.
        module = await in_thread(lambda: importlib.import_module(f"aioproj.sources.{name}"))
        _fetchers[name] = module
    return module


def default_cache_root() -> Path:
    """``$AIOPROJ_CACHE_DIR/sources``, else ``$XDG_CACHE_HOME`` or ``~/.cache``/aioproj/sources."""
    configured = os.environ.get("AIOPROJ_CACHE_DIR")
    if configured:
        return Path(os.path.expanduser(configured)) / "sources"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(os.path.expanduser("~")) / ".cache"
    return base / "aioproj" / "sources"


def _existing_path(base: str) -> tuple[Path | None, bool]:
    """The absolute path ``base`` names when it exists on disk, and whether it is a file
    (blocking)."""
    path = Path(os.path.expanduser(local_path_of(base)))
    if not path.exists():
        return None, False
    return path.resolve(), path.is_file()


def _not_found(project: ProjectURI) -> SourceError:
    base = project.base
    if is_file_uri(base) or looks_like_local_path(base):
        path = local_path_of(base)
        return SourceError(
            f"The project path {path} does not exist. Give an existing project directory, "
            "a .zip or .tar.gz archive, or a git URL."
        )
    return SourceError(
        f"Cannot fetch {redact_url(base)}: it is not an existing path, an http(s) archive or a "
        "git URL (https://, http://, ssh://, git:// or user@host:path)."
    )


class SourceCache:
    """Owns the clone/extract cache directory and in-process single-flight locks.

    Use it as an async context manager to share one HTTP connection pool between archive
    downloads; :meth:`fetch` also works outside the ``async with`` (with a short-lived
    client per download). The default root is ``$AIOPROJ_CACHE_DIR/sources``, else
    ``~/.cache/aioproj/sources``.
    """

    def __init__(self, root: Path | None = None) -> None:
        self._root = root if root is not None else default_cache_root()
        self._store: CacheDir | None = None
        self._http: httpx.AsyncClient | None = None
        self._http_lock = anyio.Lock()

    @property
    def root(self) -> Path:
        """The cache directory, as given (made absolute on first use)."""
        return self._root

    async def _cache_dir(self) -> CacheDir:
        if self._store is None:
            absolute = await in_thread(lambda: Path(os.path.abspath(self._root)))
            self._store = self._store or CacheDir(absolute)
        return self._store

    async def __aenter__(self) -> SourceCache:
        return self

    async def _http_client(self) -> httpx.AsyncClient:
        """The shared HTTP client, made on the first download (it loads CA certificates
        from disk, so in a worker thread)."""
        async with self._http_lock:
            if self._http is None:
                archive_module = await _fetcher("archive")
                client: httpx.AsyncClient = await in_thread(archive_module.new_http_client)
                self._http = client
        return self._http

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    async def fetch(self, uri: str, version: str | None = None) -> FetchedProject:
        """Make the project at ``uri`` (at ``version``) available as a local directory.

        Local directories are used in place (with a version, the commit is exported into
        the cache); archives are extracted into the cache (``version`` is ignored, as
        MLflow does); git URLs are cloned into the cache at the resolved commit.

        Raises:
            SourceError: the URI cannot be fetched; the message names the URI (without
                credentials) and what to do.

        Cancellation removes whatever the fetch had half-built, under a shielded scope,
        before ``CancelledError`` propagates; a finished cache entry is never partial.
        """
        project = parse_project_uri(uri)
        store = await self._cache_dir()
        kind = archive_kind(project.base)
        local_path, is_file = await in_thread(lambda: _existing_path(project.base))
        if local_path is not None:
            if kind is not None and is_file:
                archive_module = await _fetcher("archive")
                fetched = await archive_module.fetch_archive(store, project, kind, local_path)
            else:
                local_module = await _fetcher("local")
                fetched = await local_module.fetch_local(store, project, local_path, version)
        elif kind is not None and is_http_uri(project.base):
            archive_module = await _fetcher("archive")
            client = await self._http_client()
            fetched = await archive_module.fetch_archive(store, project, kind, None, client)
        elif is_git_uri(project.base) and not is_file_uri(project.base):
            git_module = await _fetcher("git")
            fetched = await git_module.fetch_git(store, project, version)
        else:
            if "::" in project.base:
                check_git_url(project.base)  # names ext:: and other remote helpers
            raise _not_found(project)
        assert isinstance(fetched, FetchedProject)
        return fetched
