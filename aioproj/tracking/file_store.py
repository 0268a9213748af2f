"""The MLflow file store layout (``mlruns/``), written natively by aioproj.

The layout is the one MLflow's own file store reads and writes, so ``mlflow ui`` and
``MlflowClient`` see aioproj's runs, and ``mlflow.start_run()`` in a child process logs
into them::

    <root>/.trash/                              deleted experiments
    <root>/<experiment_id>/meta.yaml            experiment record
    <root>/<experiment_id>/<run_id>/meta.yaml   run record (status as an int)
    <root>/<experiment_id>/<run_id>/{tags,params}/<key>   one file per key, '/' = subdir
    <root>/<experiment_id>/<run_id>/{metrics,artifacts}/

All file work happens in a worker thread, one hop per public call. ``meta.yaml`` files are
written to a temporary file and renamed into place, so readers never see half a record; a
new run's tags and params are written before its ``meta.yaml``.

Experiment creation by name is serialised by an :class:`anyio.Lock` inside a process and
by an advisory lock file (``<root>/.aioproj-experiments.lock``, where ``fcntl`` exists)
across aioproj processes. MLflow itself takes no lock, so an MLflow process creating the
same name at the same moment can still race with aioproj.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import yaml

from aioproj._threads import run_short
from aioproj.errors import InvalidArgumentError, TrackingError
from aioproj.tracking.base import (
    DEFAULT_EXPERIMENT_ID,
    PARENT_RUN_TAG,
    RUN_NAME_TAG,
    TERMINAL_STATUSES,
    USER_TAG,
    RunRecord,
    check_params,
    check_tags,
    choose_experiment,
    named_run_tags,
)
from aioproj.tracking.metrics import Metric, MetricCursor

if sys.platform != "win32":
    import fcntl

__all__ = ["FileStore", "local_path"]

_T = TypeVar("_T")


DEFAULT_EXPERIMENT_NAME = "Default"
_META = "meta.yaml"
_TRASH = ".trash"
_LOCK_FILE = ".aioproj-experiments.lock"
# Folders under the root that are not experiments ("models" belongs to MLflow's registry).
_NOT_EXPERIMENTS = frozenset({_TRASH, "models"})
#: What MLflow (>= 3) requires of a run folder before it reads it (ZDI-CAN-26649).
_RUN_SUBDIRS = ("metrics", "params", "artifacts")
_MAX_EXPERIMENT_NAME_LENGTH = 500

_STATUS_CODES = {"RUNNING": 1, "SCHEDULED": 2, "FINISHED": 3, "FAILED": 4, "KILLED": 5}
_STATUS_NAMES = {code: name for name, code in _STATUS_CODES.items()}
_SOURCE_TYPE_LOCAL = 4

_RUN_ID = re.compile(r"[a-zA-Z0-9][\w\-]{0,255}")
_EXPERIMENT_ID = re.compile(r"[a-zA-Z0-9][\w\-]{0,63}")

_Dumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --- small file helpers (run in worker threads) -------------------------------------------


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# meta.yaml files are flat mappings of scalars. PyYAML spends most of a run's tracking CPU
# building and resolving nodes for them, so the common shapes are written and read here
# directly; anything else (long folded strings, nested values, files edited by hand) goes
# through PyYAML. Both paths produce YAML that MLflow reads the same way.

#: Plain scalars PyYAML resolves to strings: a letter first, no YAML 1.1 bool/null word.
_PLAIN = re.compile(r"[A-Za-z_]([A-Za-z0-9_.\-/:@+]*[A-Za-z0-9_.\-/@+])?\Z")
_YAML_WORDS = frozenset({"null", "true", "false", "yes", "no", "on", "off", "y", "n"})
_INT = re.compile(r"-?(0|[1-9][0-9]*)\Z")
_FLAT_LINE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*): (.*)\Z")


#: Characters outside YAML's printable set, and the ones it reads as line breaks.
_YAML_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]")


def _escape_char(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _is_plain(value: str) -> bool:
    return _PLAIN.match(value) is not None and value.lower() not in _YAML_WORDS


def _flat_scalar(value: Any) -> str | None:
    """``value`` as a one-line YAML scalar, or None if it needs PyYAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if _is_plain(value):
            return value
        # A JSON string is a YAML double-quoted scalar once the characters YAML takes for
        # line breaks or does not print are escaped too (JSON leaves them raw).
        return _YAML_UNSAFE.sub(_escape_char, json.dumps(value, ensure_ascii=False))
    if isinstance(value, list) and not value:
        return "[]"
    return None


def _dump_yaml(data: Mapping[str, Any]) -> str:
    lines = []
    for key in sorted(data):
        scalar = _flat_scalar(data[key])
        if scalar is None or not _FLAT_LINE.match(f"{key}: x"):
            return yaml.dump(
                dict(data),
                Dumper=_Dumper,
                default_flow_style=False,
                allow_unicode=True,
                sort_keys=True,
            )
        lines.append(f"{key}: {scalar}\n")
    return "".join(lines)


class _NotFlat(Exception):
    pass


def _parse_flat_scalar(text: str) -> Any:
    if text == "null" or text == "~" or text == "":
        return None
    if _INT.match(text):
        return int(text)
    if text == "[]":
        return []
    if text.startswith("'") and text.endswith("'") and len(text) >= 2:
        inner = text[1:-1]
        if "'" in inner.replace("''", ""):
            raise _NotFlat
        return inner.replace("''", "'")
    if text.startswith('"'):
        try:
            value = json.loads(text)
        except ValueError:
            raise _NotFlat from None
        if isinstance(value, str):
            return value
        raise _NotFlat
    if _is_plain(text):
        return text
    raise _NotFlat


def _load_yaml_text(text: str) -> Any:
    try:
        data: dict[str, Any] = {}
        for line in text.splitlines():
            match = _FLAT_LINE.match(line)
            if match is None:
                raise _NotFlat
            data[match.group(1)] = _parse_flat_scalar(match.group(2))
        return data
    except _NotFlat:
        return yaml.load(text, Loader=_Loader)


def _read_yaml(path: Path) -> dict[str, Any] | None:
    """The mapping in ``path``, or None if the file is missing or not a mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    data = _load_yaml_text(text)
    return data if isinstance(data, dict) else None


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path`` and rename it into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write_yaml(path: Path, data: Mapping[str, Any]) -> None:
    _write_atomic(path, _dump_yaml(data).encode("utf-8"))


def _write_values(folder: Path, values: Mapping[str, str]) -> None:
    """One file per key, no trailing newline; a '/' in a key makes subdirectories."""
    for key, value in values.items():
        path = folder / key
        if "/" in key:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value, encoding="utf-8")


def _read_values(folder: Path) -> dict[str, str]:
    """The key files under ``folder``, keyed by their relative POSIX paths."""
    out: dict[str, str] = {}
    if not folder.is_dir():
        return out
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(dirpath, name)
            key = path.relative_to(folder).as_posix()
            out[key] = path.read_text(encoding="utf-8")
    return out


def _new_experiment_id() -> str:
    """A random 18-digit id, the shape MLflow's file store gives new experiments."""
    return str(10**17 + secrets.randbelow(9 * 10**17))


def local_path(uri_or_path: str) -> Path | None:
    """The local path of a ``file:`` URI or a plain path; None for other schemes."""
    parsed = urllib.parse.urlparse(uri_or_path)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            return None
        return Path(urllib.parse.unquote(parsed.path))
    if len(parsed.scheme) <= 1:  # no scheme, or a Windows drive letter
        return Path(uri_or_path)
    return None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock across processes (a no-op on Windows)."""
    if sys.platform == "win32":  # pragma: no cover
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _check_run_id(run_id: str) -> None:
    if not _RUN_ID.fullmatch(run_id):
        raise InvalidArgumentError(f"Invalid run id {run_id!r}.")


def _check_experiment_id(experiment_id: str) -> None:
    if not _EXPERIMENT_ID.fullmatch(experiment_id):
        raise InvalidArgumentError(f"Invalid experiment id {experiment_id!r}.")


def _check_experiment_name(name: str) -> None:
    if not name:
        raise InvalidArgumentError("Invalid experiment name: ''.")
    if len(name) > _MAX_EXPERIMENT_NAME_LENGTH:
        raise InvalidArgumentError(
            f"Invalid experiment name {name[:50]!r}...: longer than"
            f" {_MAX_EXPERIMENT_NAME_LENGTH} characters."
        )


def _check_artifact_path(artifact_path: str) -> str:
    """A normalised relative POSIX path; raises InvalidArgumentError otherwise."""
    norm = artifact_path.replace("\\", "/")
    if not norm or norm.startswith("/") or ".." in norm.split("/") or norm.endswith("/"):
        raise InvalidArgumentError(
            f"Invalid artifact path {artifact_path!r}: it must be a relative file path"
            " without '..'."
        )
    return "/".join(part for part in norm.split("/") if part not in ("", "."))


def _status_name(value: object) -> str:
    if isinstance(value, int):
        return _STATUS_NAMES.get(value, "RUNNING")
    return str(value) if value else "RUNNING"


# --- the synchronous layout ---------------------------------------------------------------


class _Layout:
    """Every file operation of the store; each method runs whole in one worker thread."""

    def __init__(self, root: Path, root_uri: str) -> None:
        self.root = root
        self.root_uri = root_uri
        self.trash = root / _TRASH
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
        now = _now_ms()
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
        _write_yaml(folder / _META, meta)

    def _experiment_meta(self, folder: Path) -> dict[str, Any] | None:
        """The meta.yaml of an experiment folder if it names that folder's id."""
        meta = _read_yaml(folder / _META)
        if meta is None or str(meta.get("experiment_id")) != folder.name:
            return None
        return meta

    def _experiment_folders(self, parent: Path) -> Iterator[Path]:
        with os.scandir(parent) as entries:
            for entry in entries:
                if entry.name not in _NOT_EXPERIMENTS and entry.is_dir():
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
        with _file_lock(self.root / _LOCK_FILE):
            found = self._find_by_name(name)
            if found is not None:
                return found
            experiment_id = _new_experiment_id()
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
        run_id = run_id or uuid.uuid4().hex
        folder = self.root / experiment_id / run_id
        if (folder / _META).is_file():
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
            "source_type": _SOURCE_TYPE_LOCAL,
            "source_version": "",
            "start_time": start_time_ms,
            "status": _STATUS_CODES["RUNNING"],
            "tags": [],
            "user_id": tags.get(USER_TAG, "unknown"),
        }
        draft = folder.with_name(f".{run_id}.{uuid.uuid4().hex[:8]}.tmp")
        draft.mkdir()
        try:
            for sub in _RUN_SUBDIRS:
                (draft / sub).mkdir()
            if tags:
                (draft / "tags").mkdir()
                _write_values(draft / "tags", tags)
            _write_values(draft / "params", params)
            (draft / _META).write_bytes(_dump_yaml(meta).encode("utf-8"))
            if folder.is_dir():  # a folder a dead process left half-written
                shutil.rmtree(folder)
            os.rename(draft, folder)
        except BaseException:
            shutil.rmtree(draft, ignore_errors=True)
            raise
        self._run_dirs[run_id] = folder
        return _record(meta, dict(tags), dict(params))

    def find_run(self, experiment_id: str, run_id: str) -> str | None:
        """``run_id`` if that run exists. What a dead driver left of it while writing it
        (its hidden draft, a folder without ``meta.yaml``) is removed: no such run was
        made."""
        self.ensure_root()
        experiment = self.root / experiment_id
        for draft in experiment.glob(f".{run_id}.*.tmp"):
            shutil.rmtree(draft, ignore_errors=True)
        folder = experiment / run_id
        if (folder / _META).is_file():
            return run_id
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        return None

    def _run_dir(self, run_id: str) -> Path:
        """The folder of a run in an active or deleted experiment; TrackingError if none."""
        self.ensure_root()
        cached = self._run_dirs.get(run_id)
        if cached is not None and (cached / _META).is_file():
            return cached
        for parent in (self.root, self.trash):
            for experiment in self._experiment_folders(parent):
                folder = experiment / run_id
                if (folder / _META).is_file():
                    self._run_dirs[run_id] = folder
                    return folder
        raise TrackingError(f"Run '{run_id}' not found in {self.root_uri}.")

    def _run_meta(self, run_id: str) -> tuple[Path, dict[str, Any]]:
        folder = self._run_dir(run_id)
        meta = _read_yaml(folder / _META)
        if meta is None or meta.get("run_id") != run_id:
            raise TrackingError(f"Run '{run_id}' has an invalid {folder / _META}.")
        return folder, meta

    def _active_run_meta(self, run_id: str) -> tuple[Path, dict[str, Any]]:
        folder, meta = self._run_meta(run_id)
        if meta.get("lifecycle_stage", "active") != "active":
            raise TrackingError(f"Run '{run_id}' is deleted; it cannot be changed.")
        return folder, meta

    def get_run(self, run_id: str) -> RunRecord:
        folder, meta = self._run_meta(run_id)
        return _record(meta, _read_values(folder / "tags"), _read_values(folder / "params"))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        folder, meta = self._active_run_meta(run_id)
        (folder / "tags").mkdir(exist_ok=True)
        _write_values(folder / "tags", tags)
        if RUN_NAME_TAG in tags:
            meta["run_name"] = tags[RUN_NAME_TAG]
            _write_yaml(folder / _META, meta)

    def set_terminated(self, run_id: str, status: str, end_time_ms: int) -> None:
        folder, meta = self._active_run_meta(run_id)
        meta["status"] = _STATUS_CODES[status]
        meta["end_time"] = end_time_ms
        _write_yaml(folder / _META, meta)

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
            _write_atomic(target, data)

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
                meta = _read_yaml(Path(entry.path, _META)) if parent == parent_run_id else None
                if meta is None or meta.get("run_id") != entry.name:
                    continue
                if meta.get("lifecycle_stage", "active") == "active":
                    folder = Path(entry.path)
                    tags, params = _read_values(folder / "tags"), _read_values(folder / "params")
                    found.append(_record(meta, tags, params))
        return found

    def reopen_run(self, run_id: str) -> None:
        folder, meta = self._active_run_meta(run_id)
        meta["status"] = _STATUS_CODES["RUNNING"]
        meta["end_time"] = None
        _write_yaml(folder / _META, meta)

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
                    new.extend(_tail_metric_file(path, key, cursor.offsets))
            out.append(new)
        return out


def _tail_metric_file(path: str, key: str, offsets: dict[str, int]) -> list[Metric]:
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


def _record(meta: Mapping[str, Any], tags: dict[str, str], params: dict[str, str]) -> RunRecord:
    end = meta.get("end_time")
    return RunRecord(
        run_id=str(meta["run_id"]),
        experiment_id=str(meta["experiment_id"]),
        run_name=str(meta.get("run_name") or tags.get(RUN_NAME_TAG, "")),
        status=_status_name(meta.get("status")),
        start_time_ms=int(meta.get("start_time") or 0),
        end_time_ms=None if end is None else int(end),
        artifact_uri=str(meta.get("artifact_uri", "")),
        tags=tags,
        params=params,
    )


def _root_path(root: str | Path) -> Path:
    """The absolute local path of a file store root given as a path or ``file:`` URI.

    Only a relative root asks for the current directory (``os.getcwd``); absolute ones
    are normalised without any system call.

    Raises:
        InvalidArgumentError: a URI with another scheme or a remote host.
    """
    path = local_path(root) if isinstance(root, str) else root
    if path is None or str(path) == "":
        raise InvalidArgumentError(
            f"The file store needs a local path or a file: URI, not {str(root)!r}."
        )
    if path.is_absolute():
        return Path(os.path.normpath(path))
    return Path(os.path.abspath(path))


# --- the async store ----------------------------------------------------------------------


class FileStore:
    """A :class:`~aioproj.tracking.base.TrackingStore` over MLflow's ``mlruns`` layout.

    ``root`` is a local path or a ``file:`` URI (a relative one is resolved against the
    current directory now). Nothing is touched until the first call, which creates the
    root, ``.trash`` and the Default experiment ("0") if missing.

    Raises:
        InvalidArgumentError: ``root`` is a URI with another scheme or a remote host.
    """

    def __init__(self, root: str | Path) -> None:
        path = _root_path(root)
        self.uri: str = path.as_uri()
        self.root = path
        self._layout = _Layout(path, self.uri)
        self._name_lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"FileStore({self.uri!r})"

    async def _call(self, func: Callable[..., _T], *args: Any) -> _T:
        """Run ``func`` in a worker thread; OSError and YAML errors become TrackingError."""
        try:
            return await run_short(functools.partial(func, *args))
        except (OSError, yaml.YAMLError) as exc:
            raise TrackingError(f"File store {self.uri}: {exc}") from exc

    async def resolve_experiment(
        self, *, experiment_name: str | None, experiment_id: str | None
    ) -> str:
        """Return the id of the experiment to run in.

        Raises:
            InvalidArgumentError: both arguments given, a malformed id or name, or
                MLFLOW_EXPERIMENT_ID disagreeing with MLFLOW_EXPERIMENT_NAME.
            TrackingError: the id does not exist, the named experiment is deleted, or the
                store cannot be read or written.
        """
        return await choose_experiment(
            experiment_name=experiment_name,
            experiment_id=experiment_id,
            by_id=self._experiment_by_id,
            by_name=self._experiment_named,
        )

    async def _experiment_by_id(self, experiment_id: str) -> str:
        _check_experiment_id(experiment_id)
        await self._call(self._layout.active_experiment, experiment_id)
        return experiment_id

    async def _experiment_named(self, name: str) -> str:
        _check_experiment_name(name)
        async with self._name_lock:
            return await self._call(self._layout.experiment_named, name)

    async def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str | None,
        tags: Mapping[str, str],
        params: Mapping[str, str],
        start_time_ms: int | None = None,
        client_key: str | None = None,
    ) -> RunRecord:
        """Create a RUNNING run with all its tags and params, in one thread hop.

        ``mlflow.runName`` is set to ``run_name`` (or a generated name). ``client_key``
        becomes the run id, so creating it again after a crash finds the same run.

        Raises:
            InvalidArgumentError: a bad key, a bad experiment id, or ``run_name``
                disagreeing with an ``mlflow.runName`` tag.
            TrackingError: the experiment does not exist or is deleted, or writing failed.
        """
        _check_experiment_id(experiment_id)
        all_tags, name = named_run_tags(tags, run_name)
        start = _now_ms() if start_time_ms is None else start_time_ms
        if client_key is not None:
            _check_run_id(client_key)
        return await self._call(
            self._layout.create_run,
            experiment_id,
            name,
            all_tags,
            check_params(params),
            start,
            client_key,
        )

    async def find_run(self, experiment_id: str, client_key: str) -> str | None:
        """The run created with ``client_key`` (its id) if it exists in the experiment.

        A run folder left without its ``meta.yaml`` by a process that died creating it is
        removed (readers would take it for a malformed run).

        Raises:
            InvalidArgumentError: a malformed experiment id or key.
            TrackingError: the store cannot be read.
        """
        _check_experiment_id(experiment_id)
        _check_run_id(client_key)
        return await self._call(self._layout.find_run, experiment_id, client_key)

    async def get_run(self, run_id: str) -> RunRecord:
        """Read a run back.

        Raises:
            InvalidArgumentError: a malformed run id.
            TrackingError: no such run, or its record cannot be read.
        """
        _check_run_id(run_id)
        return await self._call(self._layout.get_run, run_id)

    async def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags of a run; ``mlflow.runName`` also renames it.

        Raises:
            InvalidArgumentError: a malformed run id or tag key.
            TrackingError: no such run, the run is deleted, or writing failed.
        """
        _check_run_id(run_id)
        checked = check_tags(tags)
        if checked:
            await self._call(self._layout.set_tags, run_id, checked)

    async def set_terminated(
        self, run_id: str, status: str, *, end_time_ms: int | None = None
    ) -> None:
        """Write the final status and end time (now if not given); the last call wins.

        Raises:
            InvalidArgumentError: a malformed run id, or a status other than FINISHED,
                FAILED or KILLED.
            TrackingError: no such run, the run is deleted, or writing failed.
        """
        _check_run_id(run_id)
        if status not in TERMINAL_STATUSES:
            raise InvalidArgumentError(
                f"Invalid final status {status!r}; expected one of {sorted(TERMINAL_STATUSES)}."
            )
        end = _now_ms() if end_time_ms is None else end_time_ms
        await self._call(self._layout.set_terminated, run_id, status, end)

    async def log_artifact_bytes(
        self, run_id: str, artifact_path: str, data: bytes, *, append: bool = False
    ) -> None:
        """Write ``data`` as the artifact ``artifact_path`` (e.g. ``aioproj/output.log``).

        With ``append`` the bytes are added to the end of the file; otherwise the file is
        replaced atomically.

        Raises:
            InvalidArgumentError: a malformed run id or artifact path.
            TrackingError: no such run, a non-local artifact location, or writing failed.
        """
        _check_run_id(run_id)
        path = _check_artifact_path(artifact_path)
        await self._call(self._layout.write_artifact, run_id, path, data, append)

    async def read_new_metrics(self, cursors: Sequence[MetricCursor]) -> list[list[Metric]]:
        """Values logged since each cursor, one list per cursor, in one worker-thread hop.

        Raises:
            TrackingError: a run does not exist.
        """
        return await self._call(self._layout.read_new_metrics, cursors)

    async def search_child_runs(self, experiment_id: str, parent_run_id: str) -> list[RunRecord]:
        """The active runs of an experiment whose ``mlflow.parentRunId`` is ``parent_run_id``.

        Raises:
            InvalidArgumentError: a malformed experiment or run id.
            TrackingError: no such experiment, or the store cannot be read.
        """
        _check_experiment_id(experiment_id)
        _check_run_id(parent_run_id)
        return await self._call(self._layout.search_child_runs, experiment_id, parent_run_id)

    async def reopen_run(self, run_id: str) -> None:
        """Mark an ended run RUNNING again, without an end time.

        Raises:
            InvalidArgumentError: a malformed run id.
            TrackingError: no such run, the run is deleted, or writing failed.
        """
        _check_run_id(run_id)
        await self._call(self._layout.reopen_run, run_id)

    def child_env(self) -> dict[str, str]:
        """MLFLOW_TRACKING_URI, and MLFLOW_ALLOW_FILE_STORE which mlflow>=3 needs."""
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_ALLOW_FILE_STORE": "true"}

    async def aclose(self) -> None:
        """Nothing to release: the file store holds no open files between calls."""
