"""Zip and tar archives, local or over http(s), extracted safely into the cache.

An archive is identified by the sha256 of its bytes: it is extracted once into
``archives/<sha256>`` and reused by every later fetch of the same bytes. Remote archives are
streamed to a temp file with httpx (never held in memory). Extraction checks every member
before writing any: absolute paths, ``..`` escapes, links, special files, a total size
over the limit (``AIOPROJ_MAX_ARCHIVE_BYTES``, default 1 GiB) and more members than
``AIOPROJ_MAX_ARCHIVE_MEMBERS`` (default 100,000) are refused.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import anyio
import anyio.from_thread
import httpx

from aioproj.errors import SourceError
from aioproj.sources._store import CacheDir, FetchedProject, find_subdirectory, in_thread
from aioproj.sources.uri import ArchiveKind, ProjectURI, redact_text, redact_url

__all__ = [
    "DEFAULT_MAX_ARCHIVE_BYTES",
    "DEFAULT_MAX_ARCHIVE_MEMBERS",
    "download",
    "extract_archive",
    "fetch_archive",
    "max_archive_bytes",
    "max_archive_members",
    "new_http_client",
]

DEFAULT_MAX_ARCHIVE_BYTES = 1 << 30
DEFAULT_MAX_ARCHIVE_MEMBERS = 100_000
_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


def _positive_setting(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise SourceError(f"{name} must be a positive integer, not {raw!r}.")
    return value


def max_archive_bytes() -> int:
    """The size limit for downloads and for the total extracted size, in bytes.

    Raises:
        SourceError: ``AIOPROJ_MAX_ARCHIVE_BYTES`` is not a positive integer.
    """
    return _positive_setting("AIOPROJ_MAX_ARCHIVE_BYTES", DEFAULT_MAX_ARCHIVE_BYTES)


def max_archive_members() -> int:
    """The largest number of members (files and directories) an archive may have.

    Raises:
        SourceError: ``AIOPROJ_MAX_ARCHIVE_MEMBERS`` is not a positive integer.
    """
    return _positive_setting("AIOPROJ_MAX_ARCHIVE_MEMBERS", DEFAULT_MAX_ARCHIVE_MEMBERS)


@dataclass(frozen=True)
class _Member:
    """One archive member that passed the checks."""

    path: PurePosixPath
    is_dir: bool
    executable: bool
    open: Callable[[], IO[bytes]]


def _safe_path(name: str, archive: str) -> PurePosixPath:
    """The member name as a relative path; refuses names that leave the target."""
    normalized = name.replace("\\", "/")
    path = PurePosixPath(normalized)
    if path.is_absolute() or _DRIVE.match(normalized) or ".." in path.parts:
        raise SourceError(
            f"Refusing to extract {archive}: member {name!r} would be written outside "
            "the target directory."
        )
    return path


def _check_count(count: int, limit: int, archive: str) -> None:
    if count > limit:
        raise SourceError(
            f"Refusing to extract {archive}: it has more than {limit} members. Raise "
            "AIOPROJ_MAX_ARCHIVE_MEMBERS if this is expected."
        )


def _check_total(total: int, limit: int, archive: str) -> None:
    if total > limit:
        raise SourceError(
            f"Refusing to extract {archive}: its members add up to {total} bytes, over the "
            f"limit of {limit} bytes. Raise AIOPROJ_MAX_ARCHIVE_BYTES if this is expected."
        )


def _zip_members(zf: zipfile.ZipFile, archive: str, limit: int, max_members: int) -> list[_Member]:
    _check_count(len(zf.infolist()), max_members, archive)
    members: list[_Member] = []
    for info in zf.infolist():
        path = _safe_path(info.filename, archive)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise SourceError(
                f"Refusing to extract {archive}: member {info.filename!r} is a symbolic link."
            )
        opener = _zip_opener(zf, info)
        members.append(_Member(path, info.is_dir(), bool(mode & 0o111), opener))
    _check_total(sum(info.file_size for info in zf.infolist()), limit, archive)
    return members


def _zip_opener(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], IO[bytes]]:
    return lambda: zf.open(info)


def _tar_members(tf: tarfile.TarFile, archive: str, limit: int, max_members: int) -> list[_Member]:
    members: list[_Member] = []
    total = 0
    for info in tf:  # one header at a time: a huge member list is refused as it is read
        _check_count(len(members) + 1, max_members, archive)
        path = _safe_path(info.name, archive)
        if not (info.isfile() or info.isdir()):
            raise SourceError(
                f"Refusing to extract {archive}: member {info.name!r} is a link or a special "
                "file; only regular files and directories are allowed."
            )
        if info.isfile():
            total += info.size
            _check_total(total, limit, archive)
        opener = _tar_opener(tf, info)
        members.append(_Member(path, info.isdir(), bool(info.mode & 0o111), opener))
    return members


def _tar_opener(tf: tarfile.TarFile, info: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    def open_member() -> IO[bytes]:
        stream = tf.extractfile(info)
        assert stream is not None  # regular files always have a stream
        return stream

    return open_member


def _copy_limited(src: IO[bytes], dst: IO[bytes], budget: int, archive: str) -> int:
    """Copy and return the bytes written; refuse to go past ``budget``."""
    written = 0
    while chunk := src.read(_CHUNK):
        written += len(chunk)
        if written > budget:
            _check_total(written, budget, archive)
        dst.write(chunk)
    return written


def _write_members(members: list[_Member], dest: Path, limit: int, archive: str) -> None:
    budget = limit
    for member in members:
        anyio.from_thread.check_cancelled()
        target = dest / member.path
        if member.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with member.open() as src, target.open("wb") as out:
            budget -= _copy_limited(src, out, budget, archive)
        target.chmod(0o755 if member.executable else 0o644)


def extract_archive(path: Path, kind: ArchiveKind, dest: Path, limit: int, archive: str) -> None:
    """Check every member of the archive, then extract it into ``dest`` (blocking).

    ``archive`` names the archive in messages. Raises SourceError on an unsafe member, a
    size over ``limit``, more members than :func:`max_archive_members` or a corrupt
    archive (nothing is written when a member is refused); ``CancelledError`` when the
    awaiting task was cancelled.
    """
    max_members = max_archive_members()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as zf:
                members = _zip_members(zf, archive, limit, max_members)
                _write_members(members, dest, limit, archive)
        else:
            with tarfile.open(path, "r:*") as tf:
                members = _tar_members(tf, archive, limit, max_members)
                _write_members(members, dest, limit, archive)
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise SourceError(f"Cannot extract the archive {archive}: {exc}") from exc


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            anyio.from_thread.check_cancelled()
            digest.update(chunk)
    return digest.hexdigest()


def _retrieve_error(kind: ArchiveKind, reason: str) -> SourceError:
    what = "ZIP file" if kind == "zip" else "archive file"
    return SourceError(f"Unable to retrieve {what}. Reason: {reason}")


def new_http_client() -> httpx.AsyncClient:
    """The client for archive downloads (blocking: it loads CA certificates)."""
    return httpx.AsyncClient(follow_redirects=True, timeout=httpx.Timeout(30.0))


async def _client(
    client: httpx.AsyncClient | None,
) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    """The shared client, or a short-lived one (built off the loop: it reads CA files)."""
    if client is not None:
        return nullcontext(client)
    return await in_thread(new_http_client)


async def _stream_to_file(response: httpx.Response, dest: Path, limit: int, url: str) -> str:
    """Write the body to ``dest`` in chunks, hashing as it goes; returns the sha256."""
    digest = hashlib.sha256()
    size = 0
    async with await anyio.open_file(dest, "wb") as out:
        async for chunk in response.aiter_bytes(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise SourceError(
                    f"Refusing to download {redact_url(url)}: it is larger than {limit} bytes. "
                    "Raise AIOPROJ_MAX_ARCHIVE_BYTES if this is expected."
                )
            digest.update(chunk)
            await out.write(chunk)
    return digest.hexdigest()


def _check_response(response: httpx.Response, kind: ArchiveKind, url: str, limit: int) -> None:
    if response.is_error:
        raise _retrieve_error(
            kind, f"HTTP {response.status_code} {response.reason_phrase} for {redact_url(url)}"
        )
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise SourceError(
            f"Refusing to download {redact_url(url)}: it is {length} bytes, over the limit of "
            f"{limit} bytes. Raise AIOPROJ_MAX_ARCHIVE_BYTES if this is expected."
        )


async def download(
    client: httpx.AsyncClient | None, url: str, kind: ArchiveKind, dest: Path, limit: int
) -> str:
    """Stream ``url`` into ``dest`` and return the sha256 of the bytes.

    Raises SourceError ("Unable to retrieve ZIP file. Reason: ...") on an HTTP error status
    or a transport failure, and when the body exceeds ``limit``. Cancellation stops the
    download at once; the caller removes ``dest``.
    """
    try:
        async with await _client(client) as http, http.stream("GET", url) as response:
            _check_response(response, kind, url, limit)
            return await _stream_to_file(response, dest, limit, url)
    except httpx.HTTPError as exc:
        reason = redact_text(str(exc) or type(exc).__name__, url)
        raise _retrieve_error(kind, f"{reason} ({redact_url(url)})") from exc


async def _extract_cached(
    cache: CacheDir, archive: Path, kind: ArchiveKind, digest: str, name: str, limit: int
) -> Path:
    """The cache entry holding the extracted archive, built once (single-flight)."""
    entry = cache.entry("archives", digest)
    if await cache.exists(entry):
        return entry
    async with cache.locks.hold(str(entry)):
        if await cache.exists(entry):
            return entry
        async with cache.temp_dir("extract-") as tmp:
            built = tmp / "tree"
            await in_thread(lambda: extract_archive(archive, kind, built, limit, name))
            await cache.publish(built, entry)
    return entry


async def _fetch_remote(
    cache: CacheDir, url: str, kind: ArchiveKind, limit: int, client: httpx.AsyncClient | None
) -> Path:
    async with cache.temp_dir("download-") as tmp:
        archive = tmp / "archive"
        digest = await download(client, url, kind, archive, limit)
        return await _extract_cached(cache, archive, kind, digest, redact_url(url), limit)


async def fetch_archive(
    cache: CacheDir,
    project: ProjectURI,
    kind: ArchiveKind,
    local_path: Path | None,
    client: httpx.AsyncClient | None = None,
) -> FetchedProject:
    """Fetch a zip or tar archive: ``local_path`` when it is on disk, else ``project.base``.

    ``client`` is used for http(s) downloads (a short-lived one when None). Raises
    SourceError for download failures, unsafe or corrupt archives and a missing
    subdirectory. When cancelled, the partial download and extraction are removed before
    ``CancelledError`` propagates; the cache never holds a partial entry.
    """
    limit = max_archive_bytes()
    if local_path is not None:
        name = str(local_path)
        digest = await in_thread(lambda: _file_sha256(local_path))
        entry = await _extract_cached(cache, local_path, kind, digest, name, limit)
        source_name = name + (f"#{project.subdir}" if project.subdir else "")
    else:
        name = redact_url(project.base)
        entry = await _fetch_remote(cache, project.base, kind, limit, client)
        source_name = redact_url(project.uri)
    work_dir = await in_thread(lambda: find_subdirectory(entry, project.subdir, name))
    return FetchedProject(directory=work_dir, uri=project.uri, source_name=source_name)
