"""Fetching projects: local directories, zip/tar archives and git repositories.

``SourceCache.fetch(uri, version)`` returns a :class:`FetchedProject`: the directory to run
in and the source tags to record. All blocking work (file system, dulwich, extraction)
runs in worker threads.
"""

from __future__ import annotations

from aioproj.sources._store import FetchedProject
from aioproj.sources.cache import SourceCache, default_cache_root
from aioproj.sources.uri import ProjectURI, parse_project_uri, redact_url

__all__ = [
    "FetchedProject",
    "ProjectURI",
    "SourceCache",
    "default_cache_root",
    "parse_project_uri",
    "redact_url",
]
