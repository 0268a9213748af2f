"""Read-only views of a tracking store for ``aioproj runs`` and ``aioproj logs``.

The native file store (``mlruns/``) is read directly. Every other store (``sqlite:``,
MLflow servers, Databricks) is read with the ``mlflow`` client in a worker thread, which
needs ``pip install 'aioproj[mlflow]'``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread

from aioproj._output import ARTIFACT_PATH
from aioproj.errors import TrackingError

__all__ = [
    "FULL_ID_LENGTH",
    "SHORT_ID_LENGTH",
    "RunRow",
    "find_run",
    "list_runs",
    "read_output",
    "resolve_run_id",
    "short_ids",
    "sweep_trials",
]

#: The length of a full MLflow run id (32 hex digits): no lookup needed.
FULL_ID_LENGTH = 32
#: The shortest prefix ``aioproj runs`` prints; longer where two runs share it.
SHORT_ID_LENGTH = 8

_STATUS_NAMES = {1: "RUNNING", 2: "SCHEDULED", 3: "FINISHED", 4: "FAILED", 5: "KILLED"}


@dataclass(frozen=True)
class RunRow:
    """One line of ``aioproj runs``."""

    run_id: str
    run_name: str
    experiment_id: str
    status: str
    start_time_ms: int
    end_time_ms: int | None
    parent_run_id: str | None
    entry_point: str | None
    experiment_name: str = ""


def _file_root(uri: str) -> Path | None:
    """The root of a native file store URI; None for stores mlflow reads."""
    from aioproj.tracking.mlruns import local_path
    from aioproj.tracking.resolve import uri_scheme

    return local_path(uri) if uri_scheme(uri) in ("", "file") else None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _tag(run_dir: Path, key: str) -> str | None:
    try:
        return (run_dir / "tags" / key).read_text()
    except OSError:
        return None


def _file_experiments(root: Path, name: str | None, experiment_id: str | None) -> list[Path]:
    if not root.is_dir():
        raise TrackingError(f"No tracking store at {root}.")
    found = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or folder.name == "models" or not folder.is_dir():
            continue
        meta = _read_yaml(folder / "meta.yaml")
        if meta is None or meta.get("lifecycle_stage", "active") != "active":
            continue
        if experiment_id is not None and str(meta.get("experiment_id")) != experiment_id:
            continue
        if name is not None and meta.get("name") != name:
            continue
        found.append(folder)
    if not found and (name is not None or experiment_id is not None):
        what = f"named {name!r}" if name is not None else f"with id {experiment_id}"
        raise TrackingError(f"No experiment {what} in {root}.")
    return found


def _file_runs(root: Path, name: str | None, experiment_id: str | None) -> list[RunRow]:
    rows = []
    experiments = _file_experiments(root, name, experiment_id)
    experiment_names = {
        folder.name: (_read_yaml(folder / "meta.yaml") or {}).get("name", "")
        for folder in experiments
    }
    for experiment in experiments:
        for run_dir in experiment.iterdir():
            meta = _read_yaml(run_dir / "meta.yaml") if run_dir.is_dir() else None
            if meta is None or meta.get("lifecycle_stage", "active") != "active":
                continue
            status = meta.get("status")
            rows.append(
                RunRow(
                    run_id=str(meta.get("run_id", run_dir.name)),
                    run_name=str(meta.get("run_name") or ""),
                    experiment_id=experiment.name,
                    status=_STATUS_NAMES.get(status, str(status))
                    if isinstance(status, int)
                    else str(status),
                    start_time_ms=int(meta.get("start_time") or 0),
                    end_time_ms=meta.get("end_time"),
                    parent_run_id=_tag(run_dir, "mlflow.parentRunId"),
                    entry_point=_tag(run_dir, "mlflow.project.entryPoint"),
                    experiment_name=str(experiment_names.get(experiment.name, "")),
                )
            )
    return rows


def _mlflow_client(uri: str) -> Any:
    if uri.startswith("sqlite:///"):  # reading must not create an empty database
        path = Path(uri[len("sqlite:///") :])
        if not path.exists():
            raise TrackingError(f"No tracking store at {path}: nothing has been run here yet.")
    try:
        from mlflow import MlflowClient
    except ImportError as exc:
        raise TrackingError(
            f"Reading the tracking store {uri!r} needs mlflow: pip install 'aioproj[mlflow]'."
        ) from exc
    return MlflowClient(tracking_uri=uri)


def _mlflow_runs(uri: str, name: str | None, experiment_id: str | None) -> list[RunRow]:
    from mlflow.exceptions import MlflowException

    try:
        client = _mlflow_client(uri)
        if experiment_id is not None:
            experiments = [client.get_experiment(experiment_id)]
        elif name is not None:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise TrackingError(f"No experiment named {name!r} in {uri}.")
            experiments = [experiment]
        else:
            experiments = client.search_experiments()
        names = {e.experiment_id: e.name for e in experiments}
        runs = client.search_runs(list(names), max_results=50000) if names else []
    except MlflowException as exc:
        raise TrackingError(f"Could not list runs in {uri}: {exc.message}") from exc
    return [
        RunRow(
            run_id=r.info.run_id,
            run_name=r.info.run_name or "",
            experiment_id=r.info.experiment_id,
            status=r.info.status,
            start_time_ms=r.info.start_time or 0,
            end_time_ms=r.info.end_time,
            parent_run_id=r.data.tags.get("mlflow.parentRunId"),
            entry_point=r.data.tags.get("mlflow.project.entryPoint"),
            experiment_name=names.get(r.info.experiment_id, ""),
        )
        for r in runs
    ]


def _list(uri: str, name: str | None, experiment_id: str | None) -> list[RunRow]:
    root = _file_root(uri)
    rows = _file_runs(root, name, experiment_id) if root else _mlflow_runs(uri, name, experiment_id)
    rows.sort(key=lambda r: r.start_time_ms, reverse=True)
    return rows


async def list_runs(
    uri: str, *, experiment_name: str | None = None, experiment_id: str | None = None
) -> list[RunRow]:
    """The runs of one experiment (or of all), newest first.

    Raises:
        TrackingError: the store or the experiment does not exist, or cannot be read.
    """
    return await anyio.to_thread.run_sync(_list, uri, experiment_name, experiment_id)


def short_ids(run_ids: Iterable[str]) -> dict[str, str]:
    """Each run id's shortest prefix of at least 8 characters that no other id starts
    with (the id itself when another id is a prefix of it). Raises nothing."""
    ids = sorted(set(run_ids))
    out = {}
    for index, run_id in enumerate(ids):
        length = SHORT_ID_LENGTH
        for other in ids[max(0, index - 1) : index + 2]:  # sorted: neighbours share most
            if other != run_id:
                shared = next(
                    (i for i, (a, b) in enumerate(zip(run_id, other, strict=False)) if a != b),
                    min(len(run_id), len(other)),
                )
                length = max(length, shared + 1)
        out[run_id] = run_id[:length]
    return out


def resolve_run_id(text: str, rows: Sequence[RunRow], where: str) -> str:
    """The id of the one run among ``rows`` whose id is ``text`` or starts with it.

    Raises:
        TrackingError: no run has it (``where`` names the store), or several do (the
            message lists them, with their experiment, status and name).
    """
    if any(row.run_id == text for row in rows):
        return text
    found = [row for row in rows if row.run_id.startswith(text)] if text else []
    if len(found) == 1:
        return found[0].run_id
    if not found:
        raise TrackingError(f"Run '{text}' not found in {where}.")
    listed = "\n".join(
        f"  {row.run_id}  {row.experiment_name or row.experiment_id}  {row.status}"
        f"  {row.run_name}".rstrip()
        for row in found[:20]
    )
    more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
    raise TrackingError(
        f"The run id '{text}' is ambiguous: {len(found)} runs in {where} start with it:\n"
        f"{listed}{more}\nGive more characters of the id."
    )


async def find_run(uri: str, text: str) -> str:
    """The full id of the run whose id is ``text`` or starts with it (a short id as
    ``aioproj runs`` prints it). A full-length id is returned as it is, unread.

    Raises:
        TrackingError: the store cannot be read, no run matches, or several do.
    """
    if len(text) >= FULL_ID_LENGTH:
        return text
    rows = await list_runs(uri)
    return resolve_run_id(text, rows, _where(uri))


def _where(uri: str) -> str:
    root = _file_root(uri)
    return str(root) if root is not None else uri


async def sweep_trials(uri: str, run_id: str) -> list[RunRow]:
    """The runs whose ``mlflow.parentRunId`` is ``run_id`` (a sweep's trials), oldest
    first. Raises TrackingError when the store cannot be read."""
    rows = await list_runs(uri)
    return sorted(
        (row for row in rows if row.parent_run_id == run_id), key=lambda r: r.start_time_ms
    )


def _file_output(root: Path, run_id: str) -> bytes:
    from aioproj.tracking.mlruns import local_path

    for experiment in _file_experiments(root, None, None):
        meta = _read_yaml(experiment / run_id / "meta.yaml")
        if meta is not None:
            break
    else:
        raise TrackingError(f"Run '{run_id}' not found in {root}.")
    artifact_uri = str(meta.get("artifact_uri", ""))
    base = local_path(artifact_uri)
    if base is None:
        raise TrackingError(f"Run '{run_id}' keeps its artifacts at {artifact_uri}.")
    try:
        return (base / ARTIFACT_PATH).read_bytes()
    except FileNotFoundError as exc:
        raise TrackingError(
            f"Run '{run_id}' has no saved output ({ARTIFACT_PATH}): it was not started by "
            "aioproj, or it is still running."
        ) from exc


def _mlflow_output(uri: str, run_id: str) -> bytes:
    from mlflow.exceptions import MlflowException

    # The log goes to stdout; mlflow's download progress bar would clutter the terminal.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = _mlflow_client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, ARTIFACT_PATH, tmp)
        except (MlflowException, OSError) as exc:
            raise TrackingError(
                f"Run '{run_id}' has no saved output ({ARTIFACT_PATH}) in {uri}: {exc}"
            ) from exc
        return Path(os.fspath(path)).read_bytes()


def _output(uri: str, run_id: str) -> bytes:
    root = _file_root(uri)
    return _file_output(root, run_id) if root else _mlflow_output(uri, run_id)


async def read_output(uri: str, run_id: str) -> bytes:
    """The saved output of a run (its ``aioproj/output.log`` artifact).

    Raises:
        TrackingError: no such run, or it has no saved output.
    """
    return await anyio.to_thread.run_sync(_output, uri, run_id)
