"""FakeDatabricks' Jobs API (2.0, 2.1, 2.2): runs/submit with its task types and
idempotency tokens, runs/get, runs/list with paging, runs/cancel, get-output; submitted
runs executed as local processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aiohttp import web

from ._api import ApiError
from ._dbfs import DbfsError
from ._jobs import FakeRun, drive, run_process, subprocess_env
from ._storage_api import StorageApi

__all__ = [
    "JobsApi",
]

_TASK_TYPES = (
    "spark_python_task",
    "notebook_task",
    "spark_jar_task",
    "spark_submit_task",
    "python_wheel_task",
    "pipeline_task",
    "sql_task",
    "dbt_task",
    "run_job_task",
    "condition_task",
    "for_each_task",
    "shell_command_task",
)
_LIST_LIMIT_MAX = 25


class JobsApi(StorageApi):
    """The Jobs API endpoints."""

    async def _jobs(self, request: web.Request, version: str, endpoint: str) -> dict[str, Any]:
        if endpoint == "runs/submit":
            self._method(request, "POST")
            return self._submit(version, await self._body(request))
        if endpoint == "runs/get":
            self._method(request, "GET")
            run = self._run(request.query.get("run_id"), task_ok=True)
            return run.run_json()
        if endpoint == "runs/list":
            self._method(request, "GET")
            return self._list(request.query)
        if endpoint == "runs/cancel":
            self._method(request, "POST")
            body = await self._body(request)
            run = self._run(body.get("run_id"), task_ok=True)
            if run.active:
                run.cancel_requested.set()
            return {}
        if endpoint == "runs/get-output":
            self._method(request, "GET")
            raw = request.query.get("run_id")
            run = self._run(raw, task_ok=True)
            if version != "2.0" and str(run.run_id) == raw:
                raise ApiError(
                    400,
                    "INVALID_PARAMETER_VALUE",
                    "Retrieving the output of runs with multiple tasks is not supported. Please"
                    " retrieve the output of each individual task run instead.",
                )
            return run.output_json()
        if endpoint == "runs/delete":
            self._method(request, "POST")
            body = await self._body(request)
            run = self._run(body.get("run_id"))
            if run.active:
                raise ApiError(400, "INVALID_STATE", "Cannot delete an active run")
            run.deleted = True
            return {}
        raise ApiError(
            404, "ENDPOINT_NOT_FOUND", f"No API found for '{request.method} {request.path}'"
        )

    def _run(self, raw: object, *, task_ok: bool = False) -> FakeRun:
        try:
            run_id = int(raw)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise ApiError(
                400, "INVALID_PARAMETER_VALUE", f"Invalid run_id: {raw!r} is not an integer"
            ) from None
        run = self.runs.get(run_id)
        if run is None and task_ok:
            run = next((r for r in self.runs.values() if r.task_run_id == run_id), None)
        if run is None or run.deleted:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Run {run_id} does not exist")
        return run

    def _submit(self, version: str, body: dict[str, Any]) -> dict[str, Any]:
        token = body.get("idempotency_token")
        if token is not None:
            if not isinstance(token, str) or len(token) > 64:
                raise ApiError(
                    400,
                    "INVALID_PARAMETER_VALUE",
                    "idempotency_token must be a string of at most 64 characters",
                )
            if token in self._by_token:
                existing = self.runs[self._by_token[token]]
                if existing.deleted:
                    raise ApiError(
                        400,
                        "INVALID_PARAMETER_VALUE",
                        f"The run with idempotency token {token} was deleted",
                    )
                return {"run_id": existing.run_id}
        run_name = body.get("run_name", "Untitled")
        if not isinstance(run_name, str) or len(run_name.encode()) > 4096:
            raise ApiError(
                400, "INVALID_PARAMETER_VALUE", "run_name must be a string of at most 4096 bytes"
            )
        tasks = body.get("tasks")
        if version == "2.0" and tasks is None:
            tasks = [
                {
                    "task_key": "task",
                    **{
                        k: v
                        for k, v in body.items()
                        if k not in ("run_name", "idempotency_token", "timeout_seconds")
                    },
                }
            ]
        if not isinstance(tasks, list) or not tasks:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "At least one task is required.")
        if len(tasks) > 1:
            raise ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                "FakeDatabricks runs one task per submit run; got " + str(len(tasks)),
            )
        task = tasks[0]
        if (
            not isinstance(task, dict)
            or not isinstance(task.get("task_key"), str)
            or not task["task_key"]
        ):
            raise ApiError(
                400, "INVALID_PARAMETER_VALUE", "Task key must be set: tasks[0].task_key"
            )
        kinds = [k for k in _TASK_TYPES if k in task]
        if len(kinds) != 1:
            raise ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                f"Exactly one task type must be set for task {task['task_key']},"
                f" got {kinds or 'none'}",
            )
        if kinds[0] != "spark_python_task":
            raise ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                f"FakeDatabricks runs spark_python_task tasks only, not {kinds[0]}",
            )
        spt = task["spark_python_task"]
        if not isinstance(spt, dict) or not isinstance(spt.get("python_file"), str):
            raise ApiError(
                400, "INVALID_PARAMETER_VALUE", "spark_python_task.python_file is required"
            )
        params = spt.get("parameters", [])
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                "spark_python_task.parameters must be a list of strings",
            )
        if not any(
            k in task
            for k in ("new_cluster", "existing_cluster_id", "job_cluster_key", "environment_key")
        ):
            raise ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                "One of job_cluster_key, new_cluster, or existing_cluster_id must be specified.",
            )
        cluster = task.get("new_cluster")
        if cluster is not None and (
            not isinstance(cluster, dict) or "spark_version" not in cluster
        ):
            raise ApiError(
                400, "INVALID_PARAMETER_VALUE", "Missing required field: new_cluster.spark_version"
            )
        libraries = task.get("libraries", [])
        if not isinstance(libraries, list) or not all(isinstance(lib, dict) for lib in libraries):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "libraries must be a list of objects")
        timeout = body.get("timeout_seconds") or task.get("timeout_seconds") or 0
        if not isinstance(timeout, int) or timeout < 0:
            raise ApiError(
                400, "INVALID_PARAMETER_VALUE", "timeout_seconds must be a non-negative integer"
            )
        run_id = next(self._ids)
        task_run_id = next(self._ids)
        job_id = next(self._job_ids)
        script = self._scripts.popleft() if self._scripts else self.script
        run = FakeRun(
            run_id=run_id,
            task_run_id=task_run_id,
            job_id=job_id,
            run_name=run_name,
            task=dict(task),
            script=script,
            page_url=f"{self.host}/?o={self.workspace_id}#job/{job_id}/run/{run_id}",
            timeout_seconds=timeout,
            idempotency_token=token,
        )
        self.runs[run_id] = run
        if token is not None:
            self._by_token[token] = run_id
        assert self._tg is not None
        self._tg.start_soon(drive, run, self._execute)
        return {"run_id": run_id}

    async def _execute(self, run: FakeRun) -> str:
        python_file = run.task["spark_python_task"]["python_file"]
        script: Path | None
        try:
            if python_file.startswith("/Volumes/"):
                script = self.volume_path(python_file)
            else:
                script = self.dbfs.local(self.dbfs.normalise(python_file))
        except (DbfsError, ApiError):
            script = None
        env = subprocess_env(
            os.environ,
            {
                "DATABRICKS_HOST": self.host,
                "DATABRICKS_TOKEN": self.token,
                # The emulator's stand-in for the /dbfs FUSE mount of a cluster.
                "AIOPROJ_DBFS_FUSE_ROOT": str(self.dbfs.root),
                # ... and for the /Volumes mount of Unity Catalog volumes.
                "AIOPROJ_VOLUMES_FUSE_ROOT": str(self.workdir / "uc"),
                "DB_IS_DRIVER": "TRUE",
                "DATABRICKS_RUNTIME_VERSION": "15.4",
            },
        )
        cwd = self.workdir / "runs" / str(run.run_id)
        return await run_process(run, python=self.python, script_path=script, cwd=cwd, env=env)

    def _list(self, query: Any) -> dict[str, Any]:
        def flag(name: str) -> bool:
            return str(query.get(name, "false")).lower() in ("true", "1")

        active_only, completed_only = flag("active_only"), flag("completed_only")
        if active_only and completed_only:
            raise ApiError(
                400, "INVALID_PARAMETER_VALUE", "active_only and completed_only cannot both be true"
            )
        try:
            limit = int(query.get("limit", 20))
            offset = int(query.get("page_token") or query.get("offset") or 0)
            start_from = int(query.get("start_time_from", 0))
            start_to = int(query.get("start_time_to", 0))
        except ValueError:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "Invalid list parameters") from None
        if limit == 0:
            limit = _LIST_LIMIT_MAX
        if not 1 <= limit <= _LIST_LIMIT_MAX:
            raise ApiError(
                400, "INVALID_PARAMETER_VALUE", f"limit must be between 1 and {_LIST_LIMIT_MAX}"
            )
        run_type = query.get("run_type")
        runs = [
            r
            for r in self.runs.values()
            if not r.deleted
            and (not active_only or r.active)
            and (not completed_only or not r.active)
            and (run_type in (None, "SUBMIT_RUN"))
            and (not query.get("job_id") or str(r.job_id) == query.get("job_id"))
            and r.start_time >= start_from
            and (not start_to or r.start_time <= start_to)
        ]
        runs.sort(key=lambda r: (r.end_time or r.start_time, r.run_id), reverse=True)
        page = runs[offset : offset + limit]
        expand = flag("expand_tasks")
        out: dict[str, Any] = {"has_more": offset + limit < len(runs)}
        if page:
            out["runs"] = [r.run_json(with_tasks=expand) for r in page]
        if offset + limit < len(runs):
            out["next_page_token"] = str(offset + limit)
        if offset:
            out["prev_page_token"] = str(max(0, offset - limit))
        return out
