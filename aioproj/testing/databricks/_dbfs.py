"""DBFS as FakeDatabricks serves it: the DBFS API 2.0 over a local directory.

Paths are absolute DBFS paths (``/a/b``; ``dbfs:/a/b`` is accepted too). Every file
operation runs in a worker thread, so the emulator never blocks the event loop it shares
with the code under test. The limits are the service's: 1 MiB of decoded data per ``put``,
``add-block`` and ``read``; streaming handles expire after 10 idle minutes.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread

__all__ = ["MAX_BLOCK_BYTES", "DbfsError", "FakeDbfs"]

#: The DBFS API's limit for one put, add-block or read.
MAX_BLOCK_BYTES = 1024 * 1024
_HANDLE_IDLE_SECONDS = 600.0


class DbfsError(Exception):
    """An error answer: HTTP status, Databricks error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class _Handle:
    path: str
    data: bytearray = field(default_factory=bytearray)
    used: float = field(default_factory=time.monotonic)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class FakeDbfs:
    """The DBFS namespace of one emulated workspace, stored under ``root``.

    ``mounts`` maps a DBFS prefix (``/databricks/mlflow-tracking``) to another local
    directory: the emulator keeps MLflow artifacts in its tracking store that way.
    """

    def __init__(self, root: Path, mounts: dict[str, Path] | None = None) -> None:
        self.root = root
        self.mounts = dict(mounts or {})
        self._handles: dict[int, _Handle] = {}
        self._ids = itertools.count(1001)

    # -- paths ------------------------------------------------------------------------

    @staticmethod
    def normalise(path: object) -> str:
        """``/a/b`` from ``/a/b``, ``dbfs:/a/b`` or ``dbfs:a/b``; DbfsError if invalid."""
        if not isinstance(path, str) or not path:
            raise DbfsError(400, "INVALID_PARAMETER_VALUE", "Path must be a non-empty string.")
        if path.startswith("dbfs:"):
            path = path[len("dbfs:") :]
        if not path.startswith("/"):
            raise DbfsError(400, "INVALID_PARAMETER_VALUE", f"Path must be absolute: {path}")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise DbfsError(400, "INVALID_PARAMETER_VALUE", f"Invalid path: {path}")
        return "/" + "/".join(parts)

    def local(self, path: str) -> Path:
        """The local file behind a normalised DBFS path."""
        for prefix, target in self.mounts.items():
            if path == prefix or path.startswith(prefix + "/"):
                return target / path[len(prefix) :].lstrip("/")
        return self.root / path.lstrip("/")

    # -- the API ----------------------------------------------------------------------

    async def get_status(self, path: object) -> dict[str, Any]:
        norm = self.normalise(path)
        return await anyio.to_thread.run_sync(self._status, norm)

    def _status(self, norm: str) -> dict[str, Any]:
        local = self.local(norm)
        try:
            st = local.stat()
        except FileNotFoundError:
            raise DbfsError(
                404, "RESOURCE_DOES_NOT_EXIST", f"No file or directory exists on path {norm}."
            ) from None
        is_dir = local.is_dir()
        return {
            "path": norm,
            "is_dir": is_dir,
            "file_size": 0 if is_dir else st.st_size,
            "modification_time": int(st.st_mtime * 1000),
        }

    async def list(self, path: object) -> dict[str, Any]:
        norm = self.normalise(path)
        return await anyio.to_thread.run_sync(self._list, norm)

    def _list(self, norm: str) -> dict[str, Any]:
        status = self._status(norm)
        if not status["is_dir"]:
            return {"files": [status]}
        local = self.local(norm)
        names = sorted(p.name for p in local.iterdir() if not p.name.startswith(".aioproj-tmp"))
        files = [self._status(f"{norm.rstrip('/')}/{name}") for name in names]
        return {"files": files} if files else {}

    async def mkdirs(self, path: object) -> None:
        norm = self.normalise(path)
        await anyio.to_thread.run_sync(self._mkdirs, norm)

    def _mkdirs(self, norm: str) -> None:
        self._check_no_file_prefix(norm, include_self=True)
        self.local(norm).mkdir(parents=True, exist_ok=True)

    def _check_no_file_prefix(self, norm: str, *, include_self: bool) -> None:
        parts = norm.strip("/").split("/")
        upto = len(parts) if include_self else len(parts) - 1
        for i in range(1, upto + 1):
            prefix = "/" + "/".join(parts[:i])
            if self.local(prefix).is_file():
                raise DbfsError(
                    400,
                    "RESOURCE_ALREADY_EXISTS",
                    f"A file or directory already exists at the input path {prefix}.",
                )

    async def put(self, path: object, contents: object, overwrite: bool) -> None:
        norm = self.normalise(path)
        data = self._decode(contents, "contents")
        await anyio.to_thread.run_sync(self._write, norm, bytes(data), overwrite)

    def _write(self, norm: str, data: bytes, overwrite: bool) -> None:
        local = self.local(norm)
        if local.is_dir():
            raise DbfsError(
                400, "RESOURCE_ALREADY_EXISTS", f"A directory already exists at {norm}."
            )
        if local.exists() and not overwrite:
            raise DbfsError(
                400,
                "RESOURCE_ALREADY_EXISTS",
                f"A file or directory already exists at the input path {norm}.",
            )
        self._check_no_file_prefix(norm, include_self=False)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".aioproj-tmp-{uuid.uuid4().hex}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _decode(value: object, name: str) -> bytes:
        if not isinstance(value, str):
            raise DbfsError(400, "INVALID_PARAMETER_VALUE", f"'{name}' must be base64 text.")
        if len(value) > (MAX_BLOCK_BYTES * 4) // 3 + 4:
            raise DbfsError(
                400,
                "MAX_BLOCK_SIZE_EXCEEDED",
                f"The block of data is larger than the maximum of {MAX_BLOCK_BYTES} bytes.",
            )
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise DbfsError(
                400, "INVALID_PARAMETER_VALUE", f"'{name}' is not valid base64."
            ) from None
        if len(data) > MAX_BLOCK_BYTES:
            raise DbfsError(
                400,
                "MAX_BLOCK_SIZE_EXCEEDED",
                f"The block of data is larger than the maximum of {MAX_BLOCK_BYTES} bytes.",
            )
        return data

    async def create(self, path: object, overwrite: bool) -> int:
        norm = self.normalise(path)
        await anyio.to_thread.run_sync(self._check_creatable, norm, overwrite)
        self._expire_handles()
        handle = next(self._ids)
        self._handles[handle] = _Handle(norm)
        return handle

    def _check_creatable(self, norm: str, overwrite: bool) -> None:
        local = self.local(norm)
        if local.is_dir() or (local.exists() and not overwrite):
            raise DbfsError(
                400,
                "RESOURCE_ALREADY_EXISTS",
                f"A file or directory already exists at the input path {norm}.",
            )
        self._check_no_file_prefix(norm, include_self=False)

    def _handle(self, handle: object) -> _Handle:
        self._expire_handles()
        found = self._handles.get(handle) if isinstance(handle, int) else None
        if found is None:
            raise DbfsError(404, "RESOURCE_DOES_NOT_EXIST", f"The handle {handle} does not exist.")
        found.used = time.monotonic()
        return found

    def _expire_handles(self) -> None:
        now = time.monotonic()
        for key in [k for k, h in self._handles.items() if now - h.used > _HANDLE_IDLE_SECONDS]:
            del self._handles[key]

    async def add_block(self, handle: object, data: object) -> None:
        found = self._handle(handle)
        found.data += self._decode(data, "data")

    async def close(self, handle: object) -> None:
        found = self._handle(handle)
        del self._handles[handle]  # type: ignore[arg-type]
        await anyio.to_thread.run_sync(self._write, found.path, bytes(found.data), True)

    async def read(self, path: object, offset: object, length: object) -> dict[str, Any]:
        norm = self.normalise(path)
        try:
            start = int(offset) if offset is not None else 0  # type: ignore[call-overload]
            size = int(length) if length is not None else 512 * 1024  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise DbfsError(
                400, "INVALID_PARAMETER_VALUE", "offset and length must be integers."
            ) from None
        if start < 0 or size < 0:
            raise DbfsError(
                400, "INVALID_PARAMETER_VALUE", "offset and length must not be negative."
            )
        if size > MAX_BLOCK_BYTES:
            raise DbfsError(
                400,
                "MAX_READ_SIZE_EXCEEDED",
                f"Cannot read more than {MAX_BLOCK_BYTES} bytes at a time.",
            )
        chunk = await anyio.to_thread.run_sync(self._read, norm, start, size)
        return {"bytes_read": len(chunk), "data": base64.b64encode(chunk).decode("ascii")}

    def _read(self, norm: str, start: int, size: int) -> bytes:
        local = self.local(norm)
        if local.is_dir():
            raise DbfsError(400, "INVALID_PARAMETER_VALUE", f"The path {norm} is a directory.")
        try:
            with local.open("rb") as handle:
                handle.seek(start)
                return handle.read(size)
        except FileNotFoundError:
            raise DbfsError(
                404, "RESOURCE_DOES_NOT_EXIST", f"No file or directory exists on path {norm}."
            ) from None

    async def delete(self, path: object, recursive: bool) -> None:
        norm = self.normalise(path)
        await anyio.to_thread.run_sync(self._delete, norm, recursive)

    def _delete(self, norm: str, recursive: bool) -> None:
        local = self.local(norm)
        if local.is_dir():
            if any(local.iterdir()) and not recursive:
                raise DbfsError(
                    400,
                    "IO_ERROR",
                    f"Cannot delete the non-empty directory {norm} without recursive=true.",
                )
            shutil.rmtree(local)
        else:
            local.unlink(missing_ok=True)

    async def move(self, source: object, destination: object) -> None:
        src = self.normalise(source)
        dst = self.normalise(destination)
        await anyio.to_thread.run_sync(self._move, src, dst)

    def _move(self, src: str, dst: str) -> None:
        source, target = self.local(src), self.local(dst)
        if not source.exists():
            raise DbfsError(
                404, "RESOURCE_DOES_NOT_EXIST", f"No file or directory exists on path {src}."
            )
        exists = DbfsError(
            400,
            "RESOURCE_ALREADY_EXISTS",
            f"A file or directory already exists at the input path {dst}.",
        )
        if target.exists():
            raise exists
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            os.rename(source, target)
            return
        try:  # a link never replaces an existing file: concurrent moves cannot clobber
            os.link(source, target)
        except FileExistsError:
            raise exists from None
        source.unlink()
