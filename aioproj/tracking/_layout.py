"""Every file operation of the file store, synchronous: each method of :class:`Layout`
runs whole in one worker thread (see :mod:`aioproj.tracking.file_store`)."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from aioproj._keys import new_key
from aioproj.errors import TrackingError
from aioproj.tracking.base import (
    DEFAULT_EXPERIMENT_ID,
    PARENT_RUN_TAG,
    RUN_NAME_TAG,
    USER_TAG,
    RunRecord,
)
from aioproj.tracking.metrics import Metric, MetricCursor
from aioproj.tracking.mlruns import (
    DEFAULT_EXPERIMENT_NAME,
    LOCK_FILE,
    META,
    NOT_EXPERIMENTS,
    RUN_SUBDIRS,
    SOURCE_TYPE_LOCAL,
    STATUS_CODES,
    TRASH,
    dump_yaml,
    file_lock,
    local_path,
    new_experiment_id,
    now_ms,
    read_values,
    read_yaml,
    status_name,
    write_atomic,
    write_values,
    write_yaml,
)

__all__ = ["Layout", "run_record", "tail_metric_file"]


class Layout:
    """Every file operation of the store; each method runs whole in one worker thread."""

    def __init__(self, root: Path, root_uri: str) -> None:
        self.root = root
        self.root_uri = root_uri
        self.trash = root / TRASH
        self._ready = False
        self._ready_lock = threading.Lock()
        self._run_dirs: dict[str, Path] = {}
        self._names: dict[str, str] = {}

    # root and experiments

    def ensure_root(self) -> None:
        """Create the root, ``.trash`` and the Default experiment once, as MLflow does."""
        if not self._ready:
            with self._ready_lock:
                self._prepare_root()

    def _prepare_root(self) -> None:
        if self._ready:  # another thread got here first
            return
        self.trash.mkdir(parents=True, exist_ok=True)
        default = self.root / DEFAULT_EXPERIMENT_ID
        if not default.is_dir() and not (self.trash / DEFAULT_EXPERIMENT_ID).is_dir():
            self._write_experiment(DEFAULT_EXPERIMENT_ID, DEFAULT_EXPERIMENT_NAME)
        self._ready = True

    def _write_experiment(self, experiment_id: str, name: str) -> None:
        folder = self.root / experiment_id
        folder.mkdir(exist_ok=True)
        now = now_ms()
        meta: dict[str, Any] = {
            "artifact_location": f"{self.root_uri}/{experiment_id}",
            "creation_time": now,
            "effective_trace_archival_retention": None,
            "experiment_id": experiment_id,
            "last_update_time": now,
            "lifecycle_stage": "active",
            "name": name,
            "trace_location": None,
            "workspace": "default",
        }
        write_yaml(folder / META, meta)

    def _experiment_meta(self, folder: Path) -> dict[str, Any] | None:
        """The meta.yaml of an experiment folder if it names that folder's id."""
        meta = read_yaml(folder / META)
        if meta is None or str(meta.get("experiment_id")) != folder.name:
            return None
        return meta

    def _experiment_folders(self, parent: Path) -> Iterator[Path]:
        with os.scandir(parent) as entries:
            for entry in entries:
                if entry.name not in NOT_EXPERIMENTS and entry.is_dir():
                    yield Path(entry.path)

    def active_experiment(self, experiment_id: str) -> dict[str, Any]:
        """The meta of an active experiment.

        Raises:
            TrackingError: no such experiment, or it is deleted.
        """
        self.ensure_root()
        meta = self._experiment_meta(self.root / experiment_id)
        if meta is not None and meta.get("lifecycle_stage", "active") == "active":
            return meta
        if meta is not None or self._experiment_meta(self.trash / experiment_id) is not None:
            raise TrackingError(f"Experiment with id {experiment_id} is deleted.")
        raise TrackingError(f"No experiment with id {experiment_id} in {self.root_uri}.")

    def _find_by_name(self, name: str) -> str | None:
        """Id of the experiment called ``name``; TrackingError if it is deleted."""
        cached = self._names.get(name)
        if cached is not None:
            meta = self._experiment_meta(self.root / cached)
            if meta is not None and meta.get("name") == name:
                return cached
            del self._names[name]
        for parent in (self.root, self.trash):
            for folder in self._experiment_folders(parent):
                meta = self._experiment_meta(folder)
                if meta is None or meta.get("name") != name:
                    continue
                if parent is self.trash or meta.get("lifecycle_stage") == "deleted":
                    raise TrackingError(
                        f"Experiment {name!r} exists in deleted state; restore it or remove"
                        f" it from {self.trash} to use the name again."
                    )
                self._names[name] = folder.name
                return folder.name
        return None

    def experiment_named(self, name: str) -> str:
        """Id of the experiment called ``name``, created if missing."""
        self.ensure_root()
        found = self._find_by_name(name)
        if found is not None:
            return found
        with file_lock(self.root / LOCK_FILE):
            found = self._find_by_name(name)
            if found is not None:
                return found
            experiment_id = new_experiment_id()
            self._write_experiment(experiment_id, name)
        self._names[name] = experiment_id
        return experiment_id

    # runs

    def create_run(
        self,
        experiment_id: str,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, str],
        start_time_ms: int,
        run_id: str | None = None,
    ) -> RunRecord:
        """Write a whole run, then move it into place: it appears complete or not at all.

        The run is written in a hidden folder of the experiment (its tags, params,
        ``meta.yaml`` and the ``metrics/``, ``params/`` and ``artifacts/`` folders MLflow
        requires of a run folder) and renamed to its id: ``meta.yaml`` needs no
        temporary file of its own.

        With ``run_id`` given, a run already complete under that id is returned as it is
        (a create repeated after a crash).
        """
        meta_exp = self.active_experiment(experiment_id)
        run_id = run_id or new_key()
        folder = self.root / experiment_id / run_id
        if (folder / META).is_file():
            return self.get_run(run_id)
        location = str(meta_exp["artifact_location"]).rstrip("/")
        meta: dict[str, Any] = {
            "artifact_uri": f"{location}/{run_id}/artifacts",
            "end_time": None,
            "entry_point_name": "",
            "experiment_id": experiment_id,
            "lifecycle_stage": "active",
            "run_id": run_id,
            "run_name": run_name,
            "source_name": "",
            "source_type": SOURCE_TYPE_LOCAL,
            "source_version": "",
            "start_time": start_time_ms,
            "status": STATUS_CODES["RUNNING"],
            "tags": [],
            "user_id": tags.get(USER_TAG, "unknown"),
        }
        draft = folder.with_name(f".{run_id}.{new_key()[:8]}.tmp")
        draft.mkdir()
        try:
            for sub in RUN_SUBDIRS:
                (draft / sub).mkdir()
            if tags:
                (draft / "tags").mkdir()
                write_values(draft / "tags", tags)
            write_values(draft / "params", params)
            (draft / META).write_bytes(dump_yaml(meta).encode("utf-8"))
            if folder.is_dir():  # a folder a dead process left half-written
                shutil.rmtree(folder)
            os.rename(draft, folder)
        except BaseException:
            shutil.rmtree(draft, ignore_errors=True)
            raise
        self._run_dirs[run_id] = folder
        return run_record(meta, dict(tags), dict(params))

    def find_run(self, experiment_id: str, run_id: str) -> str | None:
        """``run_id`` if that run exists. What a dead driver left of it while writing it
        (its hidden draft, a folder without ``meta.yaml``) is removed: no such run was
        made."""
        self.ensure_root()
        experiment = self.root / experiment_id
        for draft in experiment.glob(f".{run_id}.*.tmp"):
            shutil.rmtree(draft, ignore_errors=True)
        folder = experiment / run_id
        if (folder / META).is_file():
            return run_id
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        return None

    def _run_dir(self, run_id: str) -> Path:
        """The folder of a run in an active or deleted experiment; TrackingError if none."""
        self.ensure_root()
        cached = self._run_dirs.get(run_id)
        if cached is not None and (cached / META).is_file():
            return cached
        for parent in (self.root, self.trash):
            for experiment in self._experiment_folders(parent):
                folder = experiment / run_id
                if (folder / META).is_file():
                    self._run_dirs[run_id] = folder
                    return folder
        raise TrackingError(f"Run '{run_id}' not found in {self.root_uri}.")

    def _run_meta(self, run_id: str) -> tuple[Path, dict[str, Any]]:
        folder = self._run_dir(run_id)
        meta = read_yaml(folder / META)
        if meta is None or meta.get("run_id") != run_id:
            raise TrackingError(f"Run '{run_id}' has an invalid {folder / META}.")
        return folder, meta

    def _active_run_meta(self, run_id: str) -> tuple[Path, dict[str, Any]]:
        folder, meta = self._run_meta(run_id)
        if meta.get("lifecycle_stage", "active") != "active":
            raise TrackingError(f"Run '{run_id}' is deleted; it cannot be changed.")
        return folder, meta

    def get_run(self, run_id: str) -> RunRecord:
        folder, meta = self._run_meta(run_id)
        return run_record(meta, read_values(folder / "tags"), read_values(folder / "params"))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        folder, meta = self._active_run_meta(run_id)
        (folder / "tags").mkdir(exist_ok=True)
        write_values(folder / "tags", tags)
        if RUN_NAME_TAG in tags:
            meta["run_name"] = tags[RUN_NAME_TAG]
            write_yaml(folder / META, meta)

    def set_terminated(self, run_id: str, status: str, end_time_ms: int) -> None:
        folder, meta = self._active_run_meta(run_id)
        meta["status"] = STATUS_CODES[status]
        meta["end_time"] = end_time_ms
        write_yaml(folder / META, meta)

    def write_artifact(self, run_id: str, artifact_path: str, data: bytes, append: bool) -> None:
        _folder, meta = self._active_run_meta(run_id)
        uri = str(meta.get("artifact_uri", ""))
        base = local_path(uri)
        if base is None:
            raise TrackingError(
                f"Run '{run_id}' stores artifacts at {uri!r}; the file store writes only"
                " local (file:) artifact locations so far."
            )
        target = base / artifact_path
        target.parent.mkdir(parents=True, exist_ok=True)
        if append:
            with target.open("ab") as handle:
                handle.write(data)
        else:
            write_atomic(target, data)

    def search_child_runs(self, experiment_id: str, parent_run_id: str) -> list[RunRecord]:
        """Active runs of the experiment tagged with ``parent_run_id``: one scan of its
        folder, reading the parent tag file of each run and the rest of the matches."""
        self.active_experiment(experiment_id)
        found = []
        with os.scandir(self.root / experiment_id) as entries:
            for entry in entries:
                try:
                    parent = Path(entry.path, "tags", PARENT_RUN_TAG).read_text(encoding="utf-8")
                except OSError:  # not a run, or a run without a parent
                    continue
                meta = read_yaml(Path(entry.path, META)) if parent == parent_run_id else None
                if meta is None or meta.get("run_id") != entry.name:
                    continue
                if meta.get("lifecycle_stage", "active") == "active":
                    folder = Path(entry.path)
                    tags, params = read_values(folder / "tags"), read_values(folder / "params")
                    found.append(run_record(meta, tags, params))
        return found

    def reopen_run(self, run_id: str) -> None:
        folder, meta = self._active_run_meta(run_id)
        meta["status"] = STATUS_CODES["RUNNING"]
        meta["end_time"] = None
        write_yaml(folder / META, meta)

    def read_new_metrics(self, cursors: Sequence[MetricCursor]) -> list[list[Metric]]:
        """Tail each run's metric files from the cursor's offsets; one thread hop for all."""
        out: list[list[Metric]] = []
        for cursor in cursors:
            folder = self._run_dir(cursor.run_id) / "metrics"
            new: list[Metric] = []
            for dirpath, _dirs, files in os.walk(folder):
                for name in files:
                    path = os.path.join(dirpath, name)
                    key = os.path.relpath(path, folder).replace(os.sep, "/")
                    new.extend(tail_metric_file(path, key, cursor.offsets))
            out.append(new)
        return out


def tail_metric_file(path: str, key: str, offsets: dict[str, int]) -> list[Metric]:
    """Complete ``timestamp value step`` lines of ``path`` after ``offsets[key]``."""
    start = offsets.get(key, 0)
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read()
    except OSError:
        return []
    end = data.rfind(b"\n") + 1  # a line being written is read next time
    offsets[key] = start + end
    metrics = []
    for line in data[:end].splitlines():
        fields = line.split()
        try:
            step = int(fields[2]) if len(fields) > 2 else 0
            metrics.append(Metric(key, float(fields[1]), int(fields[0]), step))
        except (IndexError, ValueError):
            continue  # not a metric line: skip it, as MLflow's reader would fail on it
    return metrics


def run_record(meta: Mapping[str, Any], tags: dict[str, str], params: dict[str, str]) -> RunRecord:
    end = meta.get("end_time")
    return RunRecord(
        run_id=str(meta["run_id"]),
        experiment_id=str(meta["experiment_id"]),
        run_name=str(meta.get("run_name") or tags.get(RUN_NAME_TAG, "")),
        status=status_name(meta.get("status")),
        start_time_ms=int(meta.get("start_time") or 0),
        end_time_ms=None if end is None else int(end),
        artifact_uri=str(meta.get("artifact_uri", "")),
        tags=tags,
        params=params,
    )
