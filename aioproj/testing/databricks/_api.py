"""What FakeDatabricks' API handlers share: the error they raise, the JSON error answer,
reading a request's body and method, and the workspace state the handlers use."""

from __future__ import annotations

import collections
import itertools
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from aiohttp import web

from aioproj.testing._json import JsonBodyError, loads_bounded

from ._dbfs import FakeDbfs
from ._jobs import FakeRun, RunScript
from ._mlflow import MlflowApi

__all__ = [
    "ApiBase",
    "ApiError",
    "error_response",
]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error_code": code, "message": message}, status=status, headers=headers
    )


class ApiBase:
    """The workspace state FakeDatabricks' handlers share (set in its __init__), and the
    request helpers they use."""

    host: str
    token: str
    workdir: Path
    python: str
    script: RunScript
    workspace_id: int
    runs: dict[int, FakeRun]
    dbfs: FakeDbfs
    mlflow: MlflowApi
    _scripts: collections.deque[RunScript]
    _ids: itertools.count[int]
    _job_ids: itertools.count[int]
    _by_token: dict[str, int]
    _tg: anyio.abc.TaskGroup | None

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        raw = await request.read()  # past client_max_size: 413, as the service answers
        if not raw.strip():
            return {}
        try:
            body = loads_bounded(raw)
        except JsonBodyError as exc:
            raise ApiError(
                400, "MALFORMED_REQUEST", f"Invalid JSON given in the body of the request: {exc}"
            ) from None
        if not isinstance(body, dict):
            raise ApiError(400, "MALFORMED_REQUEST", "The request body must be a JSON object")
        return body

    @staticmethod
    def _method(request: web.Request, *allowed: str) -> None:
        if request.method not in allowed:
            raise ApiError(
                405 if request.method not in ("GET", "POST") else 404,
                "ENDPOINT_NOT_FOUND",
                f"No API found for '{request.method} {request.path}'",
            )
