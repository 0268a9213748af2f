"""FakeDatabricks' storage endpoints: DBFS, the Files API on Unity Catalog volumes, and
the MLflow tracking API of the workspace."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from aiohttp import web

from ._api import ApiBase, ApiError

__all__ = [
    "StorageApi",
]


class StorageApi(ApiBase):
    """DBFS, the Files API (volumes) and MLflow's tracking API."""

    async def _dbfs(self, request: web.Request, endpoint: str) -> dict[str, Any]:
        dbfs = self.dbfs
        if request.method == "GET":
            query = request.query
            body = await self._body(request) if request.can_read_body else {}
            path = query.get("path", body.get("path"))
            if endpoint == "get-status":
                return await dbfs.get_status(path)
            if endpoint == "list":
                return await dbfs.list(path)
            if endpoint == "read":
                return await dbfs.read(
                    path,
                    query.get("offset", body.get("offset")),
                    query.get("length", body.get("length")),
                )
            raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for 'GET {request.path}'")
        self._method(request, "POST")
        body = await self._body(request)
        if endpoint == "put":
            await dbfs.put(
                body.get("path"), body.get("contents", ""), bool(body.get("overwrite", False))
            )
            return {}
        if endpoint == "create":
            return {
                "handle": await dbfs.create(body.get("path"), bool(body.get("overwrite", False)))
            }
        if endpoint == "add-block":
            await dbfs.add_block(body.get("handle"), body.get("data"))
            return {}
        if endpoint == "close":
            await dbfs.close(body.get("handle"))
            return {}
        if endpoint == "mkdirs":
            await dbfs.mkdirs(body.get("path"))
            return {}
        if endpoint == "delete":
            await dbfs.delete(body.get("path"), bool(body.get("recursive", False)))
            return {}
        if endpoint == "move":
            await dbfs.move(body.get("source_path"), body.get("destination_path"))
            return {}
        raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for 'POST {request.path}'")

    def volume_path(self, path: str) -> Path:
        """The local file behind a ``/Volumes/...`` path."""
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if len(parts) < 5 or parts[0] != "Volumes" or ".." in parts:
            raise ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                f"Invalid path {path}: expected /Volumes/<catalog>/<schema>/<volume>/<file>",
            )
        return self.workdir / "uc" / "/".join(parts)

    async def _files(self, request: web.Request, path: str) -> web.StreamResponse:
        local = anyio.Path(self.volume_path(path))
        missing = ApiError(404, "NOT_FOUND", f"The file {path} does not exist.")
        if request.method == "PUT":
            overwrite = request.query.get("overwrite", "false").lower() in ("true", "1")
            if await local.exists() and not overwrite:
                raise ApiError(409, "ALREADY_EXISTS", f"The file {path} already exists.")
            data = await request.read()
            await local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".aioproj-tmp-{secrets.token_hex(6)}")
            await tmp.write_bytes(data)
            await tmp.replace(local)
            return web.Response(status=204)
        if request.method in ("GET", "HEAD"):
            if not await local.is_file():
                if request.method == "HEAD":
                    return web.Response(status=404)
                raise missing
            stat = await local.stat()
            headers = {
                "Content-Type": "application/octet-stream",
                "Last-Modified": time.strftime(
                    "%a, %d %b %Y %H:%M:%S GMT", time.gmtime(stat.st_mtime)
                ),
            }
            if request.method == "HEAD":
                headers["Content-Length"] = str(stat.st_size)
                return web.Response(status=200, headers=headers)
            return web.Response(body=await local.read_bytes(), headers=headers)
        if request.method == "DELETE":
            if not await local.is_file():
                raise missing
            await local.unlink()
            return web.Response(status=204)
        raise ApiError(
            405, "ENDPOINT_NOT_FOUND", f"No API found for '{request.method} {request.path}'"
        )

    async def _mlflow(self, request: web.Request, endpoint: str) -> dict[str, Any]:
        api = self.mlflow
        query = request.query
        if request.method == "GET":
            if endpoint == "experiments/get":
                return await api.get_experiment(query.get("experiment_id", ""))
            if endpoint == "experiments/get-by-name":
                return await api.get_experiment_by_name(query.get("experiment_name", ""))
            if endpoint == "runs/get":
                return await api.get_run(query.get("run_id") or query.get("run_uuid") or "")
            if endpoint in ("metrics/get-history", "metrics/get-history-bulk-interval"):
                return await api.metric_history(
                    query.get("run_id", ""), query.get("metric_key", "")
                )
            if endpoint == "experiments/search":
                return await api.search_experiments()
            raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for 'GET {request.path}'")
        self._method(request, "POST")
        body = await self._body(request)
        run_id = str(body.get("run_id") or body.get("run_uuid") or "")
        if endpoint == "experiments/create":
            return await api.create_experiment(body.get("name"))
        if endpoint == "experiments/search":
            return await api.search_experiments()
        if endpoint == "runs/create":
            return await api.create_run(body)
        if endpoint == "runs/update":
            return await api.update_run(body)
        if endpoint == "runs/log-batch":
            return await api.log_batch(
                run_id,
                metrics=body.get("metrics") or [],
                params=body.get("params") or [],
                tags=body.get("tags") or [],
            )
        if endpoint == "runs/log-metric":
            return await api.log_batch(run_id, metrics=[body])
        if endpoint == "runs/log-parameter":
            return await api.log_batch(run_id, params=[body])
        if endpoint == "runs/set-tag":
            return await api.log_batch(run_id, tags=[body])
        if endpoint == "runs/delete-tag":
            return await api.delete_tag(run_id, str(body.get("key", "")))
        if endpoint == "runs/search":
            return await api.search_runs(body)
        if endpoint in ("runs/log-inputs", "runs/log-model", "runs/outputs"):
            await api.get_run(run_id)
            return {}
        raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for 'POST {request.path}'")
