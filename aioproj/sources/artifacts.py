"""Download one URI (a ``path`` parameter's value) into a local directory.

What MLflow's ``artifact_utils._download_artifact_from_uri`` does for the project
runner, natively where aioproj already speaks the protocol:

- ``runs:/<run_id>/<path>``: the run's artifact location, read from the runner's
  tracking store; a local (``file:``) location is copied, an ``mlflow-artifacts:`` one is
  read through the tracking server's artifact proxy;
- ``mlflow-artifacts:/<path>`` on a tracking server, the same way;
- ``http(s)://``: one file, streamed with httpx (no credentials are sent);
- ``file://<host>/<path>``: copied;

and through MLflow's artifact utilities (``aioproj[mlflow]``) for every other scheme:
``models:/``, ``s3://``, ``gs://``, ``wasbs://``, ``dbfs:/``, ``hdfs://``... and for
runs whose artifacts live in such a store. The result is ``<dest>/<last part of the
path>`` (a file or a directory), or ``dest`` itself for the root of a run's artifacts.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import posixpath
import re
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

import anyio
import anyio.from_thread
import anyio.to_thread

from aioproj._mlflow_context import call_with_tracking
from aioproj.errors import AioprojError, ExecutionError, SourceError
from aioproj.sources.uri import redact_text, redact_url

if TYPE_CHECKING:
    import httpx

    from aioproj.tracking.base import TrackingStore

__all__ = ["MLFLOW_EXTRA_HINT", "download_uri", "is_remote_path"]

MLFLOW_EXTRA_HINT = "pip install 'aioproj[mlflow]'"
_RUN_ID = re.compile(r"[0-9A-Za-z_-]{1,256}")
_CHUNK = 1 << 20


def is_remote_path(value: str) -> bool:
    """True when a ``path`` value is a URI to download (not a local path or ``file:///``)."""
    parsed = urlsplit(value)
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # no scheme, or a drive letter
        return False
    return not (parsed.scheme == "file" and parsed.netloc in ("", "localhost"))


async def download_uri(uri: str, dest: Path, *, store: TrackingStore) -> Path:
    """Download what ``uri`` names into the existing directory ``dest``; its local path.

    Raises:
        SourceError: the URI names nothing, or the download failed (the message names the
            URI without credentials, and why).
        ExecutionError: the scheme needs MLflow's artifact utilities and mlflow is not
            installed (the message names the ``aioproj[mlflow]`` extra).

    Cancellation stops the download; the caller removes ``dest``.
    """
    scheme = urlsplit(uri).scheme.lower()
    try:
        if scheme == "runs":
            return await _download_run_artifact(uri, dest, store)
        if scheme == "mlflow-artifacts" and isinstance(store, _ArtifactProxy):
            return await _download_proxied(store, uri, dest, _last_part(uri))
        if scheme in ("http", "https"):
            return await _download_http(uri, dest)
        if scheme == "file":
            local = Path(unquote(urlsplit(uri).path))
            return await anyio.to_thread.run_sync(_copy, local, dest / local.name)
        return await _download_with_mlflow(uri, dest, store)
    except (AioprojError, anyio.get_cancelled_exc_class()):
        raise
    except OSError as exc:
        raise SourceError(
            f"Could not download {redact_url(uri)}: {exc.strerror or exc}"
            + (f" ({exc.filename})" if exc.filename else "")
        ) from exc
    except ValueError as exc:  # a NUL in a path, a malformed URL
        raise SourceError(f"Could not download {redact_url(uri)}: {exc}") from exc


def _last_part(location: str) -> str:
    return posixpath.basename(unquote(urlsplit(location).path).rstrip("/"))


@runtime_checkable
class _ArtifactProxy(Protocol):
    """A store that reads artifacts through a tracking server's proxy (the REST store)."""

    async def list_proxied_artifacts(self, location: str) -> list[tuple[str, bool]]: ...

    async def download_proxied_artifact(self, location: str, target: Path) -> None: ...


# --------------------------------------------------------------------------- runs:/


def _split_runs_uri(uri: str) -> tuple[str, str]:
    """``runs:/<run_id>/<path>`` → (run id, path); SourceError when malformed."""
    parsed = urlsplit(uri)
    parts = [p for p in unquote(parsed.path).split("/") if p]
    if parsed.netloc or not parts or not _RUN_ID.fullmatch(parts[0]):
        raise SourceError(
            f"Could not download {redact_url(uri)}: a runs: URI is runs:/<run_id>/<path>."
        )
    path = parts[1:]
    if any(part in (".", "..") for part in path):
        raise SourceError(
            f"Could not download {redact_url(uri)}: the path after the run id may not "
            "contain '.' or '..' parts."
        )
    return parts[0], "/".join(path)


async def _download_run_artifact(uri: str, dest: Path, store: TrackingStore) -> Path:
    run_id, path = _split_runs_uri(uri)
    try:
        record = await store.get_run(run_id)
    except AioprojError as exc:
        raise SourceError(f"Could not download {uri}: {exc}") from exc
    location = record.artifact_uri.rstrip("/")
    scheme = urlsplit(location).scheme.lower()
    name = PurePosixPath(path).name
    if scheme == "file" or (not scheme and location.startswith("/")):
        root = Path(unquote(urlsplit(location).path))
        source = root / path if path else root
        target = dest / name if path else dest
        return await anyio.to_thread.run_sync(_copy, source, target, uri)
    if scheme == "mlflow-artifacts" and isinstance(store, _ArtifactProxy):
        proxied = f"{location}/{path}" if path else location
        return await _download_proxied(store, proxied, dest, name)
    return await _download_with_mlflow(uri, dest, store)


def _copy(source: Path, target: Path, uri: str | None = None) -> Path:
    """Copy a file or a directory tree to ``target`` (blocking); returns ``target``."""
    if not source.exists():
        raise SourceError(
            f"Could not download {redact_url(uri or source.as_uri())}: {source} does not exist."
        )
    if source.is_dir():
        shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    else:
        shutil.copy2(source, target)
    return target


# --------------------------------------------------------------------------- artifact proxy


async def _download_proxied(proxy: _ArtifactProxy, location: str, dest: Path, name: str) -> Path:
    """A file or a directory tree through the tracking server's artifact proxy."""
    target = dest / name if name else dest
    try:
        entries = await proxy.list_proxied_artifacts(location)
        if not entries and name:  # a file (or nothing: the GET says which)
            await proxy.download_proxied_artifact(location, target)
            return target
        await anyio.Path(target).mkdir(parents=True, exist_ok=True)
        for entry, is_dir in entries:
            if is_dir:
                await _download_proxied(proxy, f"{location}/{entry}", target, entry)
            else:
                await proxy.download_proxied_artifact(f"{location}/{entry}", target / entry)
    except AioprojError as exc:
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"Could not download {location}: {exc}") from exc
    return target


# --------------------------------------------------------------------------- http(s)


async def _download_http(url: str, dest: Path) -> Path:
    """One file over http(s), streamed to ``dest/<name>``; no credentials are sent."""
    # httpx's first import reads files: off the event loop, with the client.
    httpx = await anyio.to_thread.run_sync(importlib.import_module, "httpx")
    name = _last_part(url)
    if name in ("", ".", "..") or any(c in name for c in "\\/\0"):
        name = "download"
    target = dest / name
    shown = redact_url(url)
    try:
        client = await anyio.to_thread.run_sync(_http_client)  # it reads CA files
        async with client, client.stream("GET", url) as response:
            if response.is_error:
                raise SourceError(
                    f"Could not download {shown}: HTTP {response.status_code}"
                    f" {response.reason_phrase}"
                )
            async with await anyio.open_file(target, "wb") as out:
                async for chunk in response.aiter_bytes(_CHUNK):
                    await out.write(chunk)
    except httpx.HTTPError as exc:
        reason = redact_text(str(exc) or type(exc).__name__, url)
        raise SourceError(f"Could not download {shown}: {reason}") from exc
    return target


def _http_client() -> httpx.AsyncClient:
    import httpx

    return httpx.AsyncClient(follow_redirects=True, timeout=httpx.Timeout(30.0))


# --------------------------------------------------------------------------- MLflow


async def _download_with_mlflow(uri: str, dest: Path, store: TrackingStore) -> Path:
    """``artifact_utils._download_artifact_from_uri`` in a worker thread, with MLflow
    tracking to the runner's store (``models:/`` URIs are resolved against MLflow's
    process-wide tracking URI)."""
    env = store.child_env()
    tracking_uri = env.get("MLFLOW_TRACKING_URI", store.uri)
    call = functools.partial(_mlflow_download, uri, dest, tracking_uri, env)
    return await anyio.to_thread.run_sync(call)


def _mlflow_download(uri: str, dest: Path, tracking_uri: str, env: Mapping[str, str]) -> Path:
    try:
        artifact_utils = importlib.import_module("mlflow.tracking.artifact_utils")
    except ImportError:
        scheme = urlsplit(uri).scheme
        raise ExecutionError(
            f"Downloading {scheme}: URIs for `path` parameters ({redact_url(uri)}) needs"
            f" MLflow's artifact utilities: {MLFLOW_EXTRA_HINT}. (runs:/ on a file store or"
            " a tracking server, http(s) and file URIs need nothing more.)"
        ) from None
    download = artifact_utils._download_artifact_from_uri
    accepted = inspect.signature(download).parameters
    extra = {k: tracking_uri for k in ("tracking_uri", "registry_uri") if k in accepted}
    call = functools.partial(download, uri, output_path=str(dest), **extra)
    try:
        local = call_with_tracking(tracking_uri, env, call)
    except Exception as exc:
        reason = redact_text(f"{type(exc).__name__}: {exc}", tracking_uri)
        raise SourceError(f"Could not download {redact_url(uri)}: {reason}") from exc
    return Path(os.fspath(local))
