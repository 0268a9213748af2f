"""The project's code on DBFS: a deterministic tarball and a small bootstrap script.

The tarball is MLflow's: one top directory ``mlflow-project``, entries named ``mlruns``
left out, modification times zeroed in the tar and in the gzip header; aioproj also
zeroes owners and sorts entries, so equal contents give equal bytes on any machine. Its
SHA-256 names it: ``/mlflow-experiments/<experiment>/projects-code/<sha256>.tar.gz``, as
MLflow lays it out, so code already uploaded (by aioproj or by MLflow) is not uploaded
again. The bootstrap script, stdlib only, is stored the same way next to it.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import stat
import tarfile
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread

from ._client import DatabricksApiError, DatabricksClient

__all__ = [
    "BOOTSTRAP",
    "CodeArchive",
    "build_archive",
    "dbfs_code_dir",
    "upload_bytes",
    "upload_file",
]

ARCHIVE_TOP = "mlflow-project"
EXCLUDED_NAMES = frozenset({"mlruns"})
#: DBFS accepts at most 1 MiB of data per add-block or put.
BLOCK_BYTES = 1024 * 1024

BOOTSTRAP = '''\
"""aioproj bootstrap: unpack an MLflow project from DBFS and run one entry point.

Run as a spark_python_task: argv[1] is the dbfs:/ path of the project tarball, argv[2] a
JSON object with the shell command and the environment (MLflow run, experiment and
tracking URI). Standard library only; nothing of aioproj is installed on the cluster.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile


def fuse_path(path):
    if path.startswith("/Volumes/"):  # Unity Catalog volumes are mounted as they are named
        return os.environ.get("AIOPROJ_VOLUMES_FUSE_ROOT", "") + path
    root = os.environ.get("AIOPROJ_DBFS_FUSE_ROOT", "/dbfs")
    if path.startswith("dbfs:"):
        path = path[len("dbfs:"):]
    return os.path.join(root, path.lstrip("/"))


def safe_members(tar, target):
    for member in tar.getmembers():
        dest = os.path.realpath(os.path.join(target, member.name))
        if not dest.startswith(os.path.realpath(target) + os.sep):
            raise SystemExit("aioproj: unsafe path in the project archive: " + member.name)
        if member.issym() or member.islnk():
            link = os.path.realpath(os.path.join(os.path.dirname(dest), member.linkname))
            if not link.startswith(os.path.realpath(target) + os.sep):
                raise SystemExit("aioproj: unsafe link in the project archive: " + member.name)
        yield member


def unpack(tar_path):
    name = os.path.basename(tar_path)
    if name.endswith(".tar.gz"):
        name = name[: -len(".tar.gz")]
    base = os.path.join(tempfile.gettempdir(), "aioproj-projects")
    target = os.path.join(base, name)
    if os.path.isdir(target):
        return target
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(dir=base, prefix=".unpack-")
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            tar.extractall(work, members=list(safe_members(tar, work)))
        try:
            os.rename(os.path.join(work, "mlflow-project"), target)
        except OSError:
            if not os.path.isdir(target):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def main():
    tar_path, spec = sys.argv[1], json.loads(sys.argv[2])
    project = unpack(fuse_path(tar_path))
    env = dict(os.environ)
    env.update(spec.get("env") or {})
    # `python` in the command is the cluster's driver Python, where libraries are installed.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    sys.stderr.write(
        "=== aioproj: running entry point %s of the project (%s) ===\\n"
        % (spec.get("entry_point", "main"), os.path.basename(project))
    )
    sys.stderr.flush()
    child = subprocess.Popen(["bash", "-c", spec["command"]], cwd=project, env=env)

    def forward(signum, frame):
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, forward)
        except ValueError:
            pass
    code = child.wait()
    if code < 0:
        code = 128 - code
    if code:
        raise SystemExit("aioproj: the entry point's command exited with code %d" % code)


if __name__ == "__main__":
    main()
'''


@dataclass(frozen=True)
class CodeArchive:
    """A built tarball on local disk and its SHA-256."""

    path: Path
    sha256: str
    size: int


def dbfs_code_dir(experiment_id: str) -> str:
    """MLflow's DBFS folder for the code of an experiment's project runs."""
    return f"/mlflow-experiments/{experiment_id}/projects-code"


def _entries(root: Path) -> Iterator[tuple[Path, str]]:
    """(local path, archive name) for every entry, sorted, skipping ``mlruns``."""
    yield root, ARCHIVE_TOP
    stack = [(root, ARCHIVE_TOP)]
    while stack:
        folder, arc = stack.pop()
        children = []
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name not in EXCLUDED_NAMES:
                    children.append(entry.name)
        for name in sorted(children, reverse=True):
            path, arcname = folder / name, f"{arc}/{name}"
            yield path, arcname
            if path.is_dir() and not path.is_symlink():
                stack.append((path, arcname))


def _build(directory: Path, target_dir: Path) -> CodeArchive:
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = target_dir / f".{uuid.uuid4().hex}.tar.gz"
    digest = hashlib.sha256()

    class _Hashing:
        def __init__(self, raw: object) -> None:
            self.raw = raw

        def write(self, data: bytes) -> int:
            digest.update(data)
            return self.raw.write(data)  # type: ignore[attr-defined,no-any-return]

        def flush(self) -> None:
            self.raw.flush()  # type: ignore[attr-defined]

    try:
        with tmp.open("wb") as raw:
            hashing = _Hashing(raw)
            with (
                gzip.GzipFile(filename="", fileobj=hashing, mode="wb", mtime=0) as zipped,
                tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for path, arcname in sorted(_entries(directory), key=lambda e: e[1]):
                    info = tar.gettarinfo(str(path), arcname)
                    info.mtime = 0
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    if info.isfile():
                        info.mode = 0o755 if info.mode & stat.S_IXUSR else 0o644
                        with path.open("rb") as handle:
                            tar.addfile(info, handle)
                    else:
                        if info.isdir():
                            info.mode = 0o755
                        tar.addfile(info)
        sha = digest.hexdigest()
        final = target_dir / f"{sha}.tar.gz"
        os.replace(tmp, final)
        return CodeArchive(final, sha, final.stat().st_size)
    finally:
        tmp.unlink(missing_ok=True)


async def build_archive(directory: Path, target_dir: Path) -> CodeArchive:
    """Tar and gzip ``directory`` deterministically into ``target_dir`` (in a thread).

    Raises OSError if the project cannot be read or the archive written.
    """
    return await anyio.to_thread.run_sync(_build, directory, target_dir)


def volume_code_dir(volume: str, experiment_id: str) -> str:
    """MLflow's layout for an experiment's project code, under a Unity Catalog volume."""
    return f"{volume.rstrip('/')}/mlflow-experiments/{experiment_id}/projects-code"


def _files_api(path: str) -> str:
    return "/api/2.0/fs/files" + urllib.parse.quote(path)


async def volume_file_exists(client: DatabricksClient, path: str) -> bool:
    """Whether the volume file ``path`` exists (Files API ``HEAD``)."""
    try:
        await client.send("HEAD", _files_api(path))
    except DatabricksApiError as exc:
        if exc.status_code == 404:
            return False
        raise
    return True


async def upload_volume_file(client: DatabricksClient, local: Path, path: str) -> None:
    """Write ``local`` to the volume file ``path`` with the Files API (one ``PUT``).

    Raises DatabricksApiError, or OSError if ``local`` cannot be read.
    """
    data = await anyio.Path(local).read_bytes()
    await upload_volume_bytes(client, path, data)


async def upload_volume_bytes(client: DatabricksClient, path: str, data: bytes) -> None:
    """Write ``data`` to the volume file ``path``, replacing it (content-addressed)."""
    await client.send(
        "PUT",
        _files_api(path),
        params={"overwrite": "true"},
        content=data,
        headers={"Content-Type": "application/octet-stream"},
        repeatable=True,
    )


async def exists(client: DatabricksClient, path: str) -> bool:
    """Whether ``path`` exists in DBFS (``get-status``)."""
    try:
        await client.call("GET", "/api/2.0/dbfs/get-status", params={"path": path})
    except DatabricksApiError as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or exc.status_code == 404:
            return False
        raise
    return True


async def upload_bytes(client: DatabricksClient, path: str, data: bytes) -> None:
    """Write a small file (≤ 1 MiB) with ``dbfs/put``, replacing it."""
    await client.call(
        "POST",
        "/api/2.0/dbfs/put",
        json={"path": path, "contents": base64.b64encode(data).decode("ascii"), "overwrite": True},
        repeatable=True,
    )


async def upload_file(client: DatabricksClient, local: Path, path: str, *, tries: int = 3) -> None:
    """Stream ``local`` to DBFS ``path`` with create/add-block/close, then move it into place.

    The blocks go to a temporary name that is moved to ``path`` at the end, so nobody
    sees half a file; if ``path`` appeared meanwhile (another client uploaded the same
    content), the copy is deleted. A lost answer to a block restarts the upload.

    Raises:
        DatabricksApiError: the workspace refused or could not be reached.
        OSError: ``local`` cannot be read.
    """
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.part"
    for attempt in range(1, tries + 1):
        try:
            answer = await client.call(
                "POST", "/api/2.0/dbfs/create", json={"path": tmp, "overwrite": True}
            )
            handle = answer["handle"]
            async with await anyio.open_file(local, "rb") as source:
                while block := await source.read(BLOCK_BYTES):
                    await client.call(
                        "POST",
                        "/api/2.0/dbfs/add-block",
                        json={"handle": handle, "data": base64.b64encode(block).decode("ascii")},
                    )
            await client.call("POST", "/api/2.0/dbfs/close", json={"handle": handle})
            break
        except DatabricksApiError as exc:
            if attempt == tries or exc.status_code not in (0, 404):
                raise
    try:
        await client.call(
            "POST",
            "/api/2.0/dbfs/move",
            json={"source_path": tmp, "destination_path": path},
        )
    except DatabricksApiError as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        await client.call(
            "POST", "/api/2.0/dbfs/delete", json={"path": tmp, "recursive": False}, repeatable=True
        )
