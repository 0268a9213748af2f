"""The files of MLflow's ``mlruns`` layout: flat ``meta.yaml`` records, one file per tag
or param, status codes, id and path checks, atomic writes and the experiments lock.

Synchronous: the file store (:mod:`aioproj.tracking.file_store`) runs them in worker
threads; FakeDatabricks' MLflow API writes the same files.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from aioproj._keys import new_key
from aioproj.errors import InvalidArgumentError

if sys.platform != "win32":
    import fcntl

__all__ = [
    "DEFAULT_EXPERIMENT_NAME",
    "LOCK_FILE",
    "META",
    "NOT_EXPERIMENTS",
    "RUN_SUBDIRS",
    "SOURCE_TYPE_LOCAL",
    "STATUS_CODES",
    "TRASH",
    "check_artifact_path",
    "check_experiment_folder_id",
    "check_experiment_name",
    "check_run_folder_id",
    "dump_yaml",
    "file_lock",
    "load_yaml_text",
    "local_path",
    "new_experiment_id",
    "now_ms",
    "read_values",
    "read_yaml",
    "root_path",
    "status_name",
    "write_atomic",
    "write_values",
    "write_yaml",
]

DEFAULT_EXPERIMENT_NAME = "Default"
META = "meta.yaml"
TRASH = ".trash"
LOCK_FILE = ".aioproj-experiments.lock"
# Folders under the root that are not experiments ("models" belongs to MLflow's registry).
NOT_EXPERIMENTS = frozenset({TRASH, "models"})
#: What MLflow (>= 3) requires of a run folder before it reads it (ZDI-CAN-26649).
RUN_SUBDIRS = ("metrics", "params", "artifacts")
_MAX_EXPERIMENT_NAME_LENGTH = 500

STATUS_CODES = {"RUNNING": 1, "SCHEDULED": 2, "FINISHED": 3, "FAILED": 4, "KILLED": 5}
_STATUS_NAMES = {code: name for name, code in STATUS_CODES.items()}
SOURCE_TYPE_LOCAL = 4

_RUN_ID = re.compile(r"[a-zA-Z0-9][\w\-]{0,255}")
_EXPERIMENT_ID = re.compile(r"[a-zA-Z0-9][\w\-]{0,63}")

_Dumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def now_ms() -> int:
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


def dump_yaml(data: Mapping[str, Any]) -> str:
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


def load_yaml_text(text: str) -> Any:
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


def read_yaml(path: Path) -> dict[str, Any] | None:
    """The mapping in ``path``, or None if the file is missing or not a mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    data = load_yaml_text(text)
    return data if isinstance(data, dict) else None


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path`` and rename it into place."""
    tmp = path.with_name(f".{path.name}.{new_key()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_yaml(path: Path, data: Mapping[str, Any]) -> None:
    write_atomic(path, dump_yaml(data).encode("utf-8"))


def write_values(folder: Path, values: Mapping[str, str]) -> None:
    """One file per key, no trailing newline; a '/' in a key makes subdirectories."""
    for key, value in values.items():
        path = folder / key
        if "/" in key:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value, encoding="utf-8")


def read_values(folder: Path) -> dict[str, str]:
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


def new_experiment_id() -> str:
    """A random 18-digit id, the shape MLflow's file store gives new experiments."""
    return str(10**17 + random.SystemRandom().randrange(9 * 10**17))


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
def file_lock(path: Path) -> Iterator[None]:
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


def check_run_folder_id(run_id: str) -> None:
    if not _RUN_ID.fullmatch(run_id):
        raise InvalidArgumentError(f"Invalid run id {run_id!r}.")


def check_experiment_folder_id(experiment_id: str) -> None:
    if not _EXPERIMENT_ID.fullmatch(experiment_id):
        raise InvalidArgumentError(f"Invalid experiment id {experiment_id!r}.")


def check_experiment_name(name: str) -> None:
    if not name:
        raise InvalidArgumentError("Invalid experiment name: ''.")
    if len(name) > _MAX_EXPERIMENT_NAME_LENGTH:
        raise InvalidArgumentError(
            f"Invalid experiment name {name[:50]!r}...: longer than"
            f" {_MAX_EXPERIMENT_NAME_LENGTH} characters."
        )


def check_artifact_path(artifact_path: str) -> str:
    """A normalised relative POSIX path; raises InvalidArgumentError otherwise."""
    norm = artifact_path.replace("\\", "/")
    if not norm or norm.startswith("/") or ".." in norm.split("/") or norm.endswith("/"):
        raise InvalidArgumentError(
            f"Invalid artifact path {artifact_path!r}: it must be a relative file path"
            " without '..'."
        )
    return "/".join(part for part in norm.split("/") if part not in ("", "."))


def status_name(value: object) -> str:
    if isinstance(value, int):
        return _STATUS_NAMES.get(value, "RUNNING")
    return str(value) if value else "RUNNING"


def root_path(root: str | Path) -> Path:
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
