"""SourceCache: turns a project URI and a version into a directory to run in.

It dispatches on the URI (existing local path, archive, git URL), owns the on-disk cache of
clones, exports and extracted archives, the in-process single-flight locks, and the HTTP
client used for archive downloads.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import httpx

from aioproj.errors import SourceError
from aioproj.sources._store import CacheDir, FetchedProject, in_thread
from aioproj.sources.archive import fetch_archive, new_http_client
from aioproj.sources.git import fetch_git
from aioproj.sources.local import fetch_local
from aioproj.sources.uri import (
    ProjectURI,
    archive_kind,
    is_file_uri,
    is_git_uri,
    is_http_uri,
    local_path_of,
    looks_like_local_path,
    parse_project_uri,
    redact_url,
)

__all__ = ["SourceCache", "default_cache_root"]


def default_cache_root() -> Path:
    """``$AIOPROJ_CACHE_DIR/sources``, else ``$XDG_CACHE_HOME`` or ``~/.cache``/aioproj/sources."""
    configured = os.environ.get("AIOPROJ_CACHE_DIR")
    if configured:
        return Path(os.path.expanduser(configured)) / "sources"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(os.path.expanduser("~")) / ".cache"
    return base / "aioproj" / "sources"


def _existing_path(base: str) -> Path | None:
    """The absolute path ``base`` names when it exists on disk (blocking)."""
    path = Path(os.path.expanduser(local_path_of(base)))
    return path.resolve() if path.exists() else None


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
        # Building the client loads CA certificates from disk: keep that off the loop.
        self._http = await in_thread(new_http_client)
        return self

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
        local = await in_thread(lambda: _existing_path(project.base))
        if local is not None:
            if kind is not None and await in_thread(local.is_file):
                return await fetch_archive(store, project, kind, local)
            return await fetch_local(store, project, local, version)
        if kind is not None and is_http_uri(project.base):
            return await fetch_archive(store, project, kind, None, self._http)
        if is_git_uri(project.base) and not is_file_uri(project.base):
            return await fetch_git(store, project, version)
        raise _not_found(project)
