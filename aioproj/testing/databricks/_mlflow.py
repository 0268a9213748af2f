"""The MLflow tracking REST API as a Databricks workspace serves it, over aioproj's file store.

Experiments and runs live in a native ``mlruns`` folder (aioproj's file store), so a test
can read them back with ``MlflowClient`` on the ``file:`` URI as well as through the
emulator. Artifact locations are shown as the workspace shows them
(``dbfs:/databricks/mlflow-tracking/<experiment>/<run>/artifacts``) and the emulator's
DBFS maps that prefix onto the store's artifact folders.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from aioproj.errors import InvalidArgumentError, TrackingError
from aioproj.tracking import mlruns
from aioproj.tracking.base import RUN_NAME_TAG, TERMINAL_STATUSES, validate_key
from aioproj.tracking.file_store import FileStore

__all__ = ["ARTIFACT_PREFIX", "MlflowApi", "MlflowApiError"]

#: Where a workspace keeps MLflow artifacts in DBFS.
ARTIFACT_PREFIX = "/databricks/mlflow-tracking"

_T = TypeVar("_T")


class MlflowApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _not_found(message: str) -> MlflowApiError:
    return MlflowApiError(404, "RESOURCE_DOES_NOT_EXIST", message)


def _invalid(message: str) -> MlflowApiError:
    return MlflowApiError(400, "INVALID_PARAMETER_VALUE", message)


def _kv(values: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in sorted(values.items())]


def _float(value: float) -> Any:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


class MlflowApi:
    """The tracking endpoints (``/api/2.0/mlflow/...``), backed by a file store at ``root``."""

    def __init__(self, root: Path) -> None:
        self.store = FileStore(root)
        self._layout = self.store._layout
        self.root = root

    def _in_root(self, func: Callable[..., _T], *args: Any) -> _T:
        self._layout.ensure_root()
        return func(*args)

    async def _call(self, func: Callable[..., _T], *args: Any) -> _T:
        try:
            return await anyio.to_thread.run_sync(functools.partial(self._in_root, func, *args))
        except InvalidArgumentError as exc:
            raise _invalid(str(exc)) from None
        except TrackingError as exc:
            text = str(exc)
            if "not found" in text or "No experiment" in text:
                raise _not_found(text) from None
            raise _invalid(text) from None

    # -- experiments -------------------------------------------------------------------

    def _experiment_json(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        exp_id = str(meta["experiment_id"])
        return {
            "experiment_id": exp_id,
            "name": str(meta.get("name", "")),
            "artifact_location": f"dbfs:{ARTIFACT_PREFIX}/{exp_id}",
            "lifecycle_stage": str(meta.get("lifecycle_stage", "active")),
            "creation_time": int(meta.get("creation_time") or 0),
            "last_update_time": int(meta.get("last_update_time") or 0),
            "tags": [],
        }

    async def get_experiment(self, experiment_id: str) -> dict[str, Any]:
        if not experiment_id:
            raise _invalid("Missing value for required parameter 'experiment_id'.")
        meta = await self._call(self._layout.active_experiment, experiment_id)
        return {"experiment": self._experiment_json(meta)}

    async def get_experiment_by_name(self, name: str) -> dict[str, Any]:
        if not name:
            raise _invalid("Missing value for required parameter 'experiment_name'.")
        found = await self._call(self._layout._find_by_name, name)
        if found is None:
            raise _not_found(f"Node named '{name}' does not exist.")
        return await self.get_experiment(found)

    async def create_experiment(self, name: object) -> dict[str, Any]:
        if not isinstance(name, str) or not name:
            raise _invalid("Missing value for required parameter 'name'.")
        if await self._call(self._layout._find_by_name, name) is not None:
            raise MlflowApiError(
                400, "RESOURCE_ALREADY_EXISTS", f"Node named '{name}' already exists"
            )
        experiment_id = await self._call(self._layout.experiment_named, name)
        return {"experiment_id": experiment_id}

    async def search_experiments(self) -> dict[str, Any]:
        def collect() -> list[dict[str, Any]]:
            self._layout.ensure_root()
            out = []
            for folder in self._layout._experiment_folders(self.root):
                meta = self._layout._experiment_meta(folder)
                if meta is not None:
                    out.append(self._experiment_json(meta))
            return out

        return {"experiments": await self._call(collect)}

    # -- runs --------------------------------------------------------------------------

    def _run_json(self, run_id: str) -> dict[str, Any]:
        folder, meta = self._layout._run_meta(run_id)
        tags = mlruns.read_values(folder / "tags")
        params = mlruns.read_values(folder / "params")
        metrics = _latest_metrics(folder / "metrics")
        exp_id = str(meta["experiment_id"])
        info: dict[str, Any] = {
            "run_id": run_id,
            "run_uuid": run_id,
            "experiment_id": exp_id,
            "run_name": str(meta.get("run_name") or tags.get(RUN_NAME_TAG, "")),
            "user_id": str(meta.get("user_id") or "unknown"),
            "status": mlruns.status_name(meta.get("status")),
            "start_time": int(meta.get("start_time") or 0),
            "artifact_uri": f"dbfs:{ARTIFACT_PREFIX}/{exp_id}/{run_id}/artifacts",
            "lifecycle_stage": str(meta.get("lifecycle_stage", "active")),
        }
        if meta.get("end_time") is not None:
            info["end_time"] = int(meta["end_time"])
        return {
            "info": info,
            "data": {"metrics": metrics, "params": _kv(params), "tags": _kv(tags)},
            "inputs": {},
        }

    async def get_run(self, run_id: str) -> dict[str, Any]:
        if not run_id:
            raise _invalid("Missing value for required parameter 'run_id'.")
        return {"run": await self._call(self._run_json, run_id)}

    async def create_run(self, body: Mapping[str, Any]) -> dict[str, Any]:
        experiment_id = str(body.get("experiment_id") or "0")
        tags = {str(t["key"]): str(t.get("value", "")) for t in body.get("tags") or []}
        if body.get("user_id") and "mlflow.user" not in tags:
            tags["mlflow.user"] = str(body["user_id"])
        start = body.get("start_time")
        try:
            record = await self.store.create_run(
                experiment_id,
                run_name=body.get("run_name") or None,
                tags=tags,
                params={},
                start_time_ms=int(start) if start is not None else None,
            )
        except InvalidArgumentError as exc:
            raise _invalid(str(exc)) from None
        except TrackingError as exc:
            raise _not_found(str(exc)) from None
        return await self.get_run(record.run_id)

    async def update_run(self, body: Mapping[str, Any]) -> dict[str, Any]:
        run_id = str(body.get("run_id") or body.get("run_uuid") or "")
        status = body.get("status")
        end_time = body.get("end_time")
        run_name = body.get("run_name")

        def update() -> Any:
            folder, meta = self._layout._active_run_meta(run_id)
            if status is not None:
                if status not in mlruns.STATUS_CODES:
                    raise InvalidArgumentError(f"Invalid run status {status!r}.")
                meta["status"] = mlruns.STATUS_CODES[str(status)]
                if status not in TERMINAL_STATUSES:
                    meta["end_time"] = None
            if end_time is not None:
                meta["end_time"] = int(end_time)
            if run_name:
                meta["run_name"] = str(run_name)
                mlruns.write_values(folder / "tags", {RUN_NAME_TAG: str(run_name)})
            mlruns.write_yaml(folder / mlruns.META, meta)
            return self._run_json(run_id)["info"]

        return {"run_info": await self._call(update)}

    async def log_batch(
        self,
        run_id: str,
        *,
        metrics: list[Mapping[str, Any]] = (),  # type: ignore[assignment]
        params: list[Mapping[str, Any]] = (),  # type: ignore[assignment]
        tags: list[Mapping[str, Any]] = (),  # type: ignore[assignment]
    ) -> dict[str, Any]:
        if not run_id:
            raise _invalid("Missing value for required parameter 'run_id'.")

        def log() -> None:
            folder, _meta = self._layout._active_run_meta(run_id)
            new_params: dict[str, str] = {}
            for item in params:
                key, value = str(item["key"]), str(item.get("value", ""))
                validate_key("param", key)
                path = folder / "params" / key
                if path.is_file() and path.read_text() != value:
                    raise InvalidArgumentError(
                        f"Changing param values is not allowed. Param with key='{key}' was"
                        f" already logged with value='{path.read_text()}' for run ID='{run_id}'."
                        f" Attempted logging new value '{value}'."
                    )
                new_params[key] = value
            mlruns.write_values(folder / "params", new_params)
            new_tags = {str(t["key"]): str(t.get("value", "")) for t in tags}
            for key in new_tags:
                validate_key("tag", key)
            if new_tags:
                self._layout.set_tags(run_id, new_tags)
            for metric in metrics:
                key = str(metric["key"])
                validate_key("metric", key)
                number = float(metric.get("value", 0.0))
                stamp = int(metric.get("timestamp") or 0)
                line = f"{stamp} {number} {int(metric.get('step') or 0)}\n"
                path = folder / "metrics" / key
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a") as handle:
                    handle.write(line)

        await self._call(log)
        return {}

    async def metric_history(self, run_id: str, key: str) -> dict[str, Any]:
        def read() -> list[dict[str, Any]]:
            folder, _meta = self._layout._run_meta(run_id)
            return _metric_lines(folder / "metrics" / key, key)

        return {"metrics": await self._call(read)}

    async def delete_tag(self, run_id: str, key: str) -> dict[str, Any]:
        def delete() -> None:
            folder, _meta = self._layout._active_run_meta(run_id)
            path = folder / "tags" / key
            if not path.is_file():
                raise TrackingError(f"No tag with name: {key} in run with id {run_id}")
            path.unlink()

        await self._call(delete)
        return {}

    async def search_runs(self, body: Mapping[str, Any]) -> dict[str, Any]:
        ids = [str(e) for e in body.get("experiment_ids") or []]

        def collect() -> list[dict[str, Any]]:
            out = []
            for exp in ids:
                folder = self.root / exp
                if not folder.is_dir():
                    continue
                for entry in sorted(folder.iterdir()):
                    if (entry / mlruns.META).is_file():
                        out.append(self._run_json(entry.name))
            out.sort(key=lambda r: -int(r["info"]["start_time"]))
            return out

        runs = await self._call(collect)
        return {"runs": runs} if runs else {}


def _metric_lines(path: Path, key: str) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            step = int(parts[2]) if len(parts) > 2 else 0
            out.append(
                {
                    "key": key,
                    "value": _float(float(parts[1])),
                    "timestamp": int(parts[0]),
                    "step": step,
                }
            )
    return out


def _latest_metrics(folder: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not folder.is_dir():
        return out
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(dirpath) / name
            key = path.relative_to(folder).as_posix()
            lines = _metric_lines(path, key)
            if lines:
                out.append(max(lines, key=lambda m: (m["step"], m["timestamp"])))
    return sorted(out, key=lambda m: m["key"])
